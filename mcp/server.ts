import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import type { Transport } from '@modelcontextprotocol/sdk/shared/transport.js';
import {
  CallToolRequestSchema,
  ErrorCode,
  isJSONRPCErrorResponse,
  isJSONRPCRequest,
  isJSONRPCResultResponse,
  ListToolsRequestSchema,
  McpError,
  type CallToolResult,
  type JSONRPCMessage,
  type RequestId,
  type Tool as ToolInfo,
} from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';
import type { Logger } from '../core/logger';
import { storableText } from '../core/storable';
import { parse } from '../api/endpoint';
import { problemOf, toAppError } from '../api/problem';
import { jsonSchema } from '../api/openapi';
import { appendAudit, errorDetail, isAudited, outcomeOf } from '../vault/audit';
import type { Caller } from '../vault/vault';
import { withholdStored } from '../vault/withheld';
import pkg from '../package.json' with { type: 'json' };
import { mcpTools, type McpDeps, type Tool } from './tools';

const INSTRUCTIONS = `Mailgent keeps secrets for you. vault_get answers a handle (mailgent://credentials/<id>@<version>) and
metadata, not the value: pass the handle to vault_totp, rotate_credentials and report_leak, and never put a value in mail.`;

/**
 * An MCP server for one caller (one identity, one HTTP request in stateless mode). The low-level
 * Server rather than McpServer.registerTool: McpServer validates arguments itself and answers its
 * own error text, while these tools must fail exactly as the HTTP API does (the same zod parse and
 * problem type, title and detail), with the failure audited under the endpoint's action.
 */
export function createMcpServer(deps: McpDeps & { logger: Logger }, caller: Caller): Server {
  const tools = new Map(mcpTools(deps).map((t) => [t.name, t]));
  const server = new AuditedServer(deps, caller, (name) => tools.has(name));
  server.setRequestHandler(ListToolsRequestSchema, () => ({ tools: [...tools.values()].map(describe) }));
  server.setRequestHandler(CallToolRequestSchema, async (request) => {
    const tool = tools.get(request.params.name);
    // Not repeated: a value pasted where the name goes would come back into the client's context.
    if (!tool) throw new McpError(ErrorCode.InvalidParams, 'the tools/call names no tool this server has (tools/list gives their names)');
    return callTool(deps, tool, caller, request.params.arguments);
  });
  return server;
}

/**
 * The Server, with every JSON-RPC error it answers to a request audited as a rejected `mcp.request`
 * before the answer goes out. Those answers are HTTP 200s the route never sees as refusals: a
 * `tools/call` naming no tool (the handler above), one the SDK refuses before any handler runs
 * (`arguments` not an object, no `name`: the SDK answers -32603 with zod's issues, so the code
 * does not tell a refusal from a fault), a method this server does not serve. Every one is the
 * request's doing: the handlers here turn their own failures into results (a tool's failure is
 * `isError`, audited by callTool under the tool's action, not here). The row keeps the JSON-RPC
 * code, the method and the tool name (capped), never an argument: arguments may hold secrets.
 */
class AuditedServer extends Server {
  constructor(
    private readonly deps: McpDeps & { logger: Logger },
    private readonly caller: Caller,
    private readonly hasTool: (name: string) => boolean,
  ) {
    super({ name: 'mailgent', version: pkg.version }, { capabilities: { tools: {} }, instructions: INSTRUCTIONS });
  }

  override async connect(transport: Transport): Promise<void> {
    await super.connect(transport);
    const requests = new Map<RequestId, Requested>();
    const receive = transport.onmessage;
    transport.onmessage = (message, extra) => {
      if (isJSONRPCRequest(message)) requests.set(message.id, this.requested(message));
      receive?.(message, extra);
    };
    const send = transport.send.bind(transport);
    transport.send = async (message, options) => {
      const answered = isJSONRPCErrorResponse(message) || isJSONRPCResultResponse(message) ? message.id : undefined;
      const requested = answered === undefined ? undefined : requests.get(answered);
      if (requested) {
        requests.delete(answered!);
        if (isJSONRPCErrorResponse(message)) {
          // Arguments that are not an object, or no tool name: the SDK's parse of the request fails
          // inside its handler and answers -32603 (internal error), which a client takes for a fault
          // of the server to retry or report. It is the request's: invalid params.
          if (requested.refusal === 'mcp-invalid-params' && message.error.code === ErrorCode.InternalError) {
            message = { ...message, error: { ...message.error, code: ErrorCode.InvalidParams } };
          }
          await this.auditRefused(requested, message.error.code);
        }
      }
      return send(message, options);
    };
  }

  /** What an audit row may say of a request: its method and tool name (capped, storable), and why a tools/call will be refused. */
  private requested(message: Extract<JSONRPCMessage, { method: string; id: RequestId }>): Requested {
    const given = { method: message.method };
    if (message.method !== 'tools/call') return { method: auditable(message.method), given };
    const name: unknown = (message.params as { name?: unknown } | undefined)?.name;
    const tool = typeof name === 'string' ? auditable(name) : undefined;
    if (typeof name === 'string' && !this.hasTool(name)) Object.assign(given, { tool: name });
    if (!CallToolRequestSchema.safeParse(message).success) return { method: message.method, tool, given, refusal: 'mcp-invalid-params' };
    if (!this.hasTool(name as string)) return { method: message.method, tool, given, refusal: 'mcp-unknown-tool' };
    return { method: message.method, tool, given };
  }

  private async auditRefused(requested: Requested, code: number): Promise<void> {
    const { deps, caller } = this;
    const detail: Record<string, unknown> = { error: requested.refusal ?? 'mcp-protocol', code };
    if (requested.method !== undefined) detail.method = requested.method;
    if (requested.tool !== undefined) detail.tool = requested.tool;
    try {
      // A name the client chose that is none of this server's (a tool it does not have, a method it
      // does not serve) goes into the append-only log as given, unless it is a value the caller can
      // read: a secret pasted (or injected into an agent's prompt) where a name goes, withheld as a
      // credential name is (vault/withheld.ts; a check that fails withholds it too).
      // Checked whole: the row keeps at most 64 characters of a name, a longer secret's head.
      const chosen: Record<string, unknown> = { tool: requested.given.tool };
      if (!KNOWN_METHODS.has(requested.given.method)) chosen.method = requested.given.method;
      await withholdStored(deps.pool, deps.secrets, caller.identityId, detail, chosen).catch(() => undefined);
      await appendAudit(deps.pool, { identityId: caller.identityId, actor: caller.actor, action: 'mcp.request', outcome: 'rejected', requestId: caller.requestId, via: caller.via, detail });
    } catch (err) {
      deps.logger.error({ err, requestId: caller.requestId }, 'could not audit a refused MCP request');
    }
  }
}

interface Requested {
  method: string | undefined;
  tool?: string;
  /** The method, and the tool name unless it is one of this server's, as the client gave them (uncapped). */
  given: { method: string; tool?: string };
  refusal?: 'mcp-invalid-params' | 'mcp-unknown-tool';
}

/** Methods an MCP server may be sent (whether or not this one serves them): written as given. */
const KNOWN_METHODS = new Set([
  'initialize',
  'ping',
  'tools/list',
  'tools/call',
  'resources/list',
  'resources/templates/list',
  'resources/read',
  'resources/subscribe',
  'resources/unsubscribe',
  'prompts/list',
  'prompts/get',
  'completion/complete',
  'logging/setLevel',
  'tasks/get',
  'tasks/list',
  'tasks/cancel',
  'tasks/result',
]);

/** The longest method or tool name an audit row keeps (MCP allows tool names of up to 128 characters). */
const MAX_AUDITED_NAME = 64;

/** A client-chosen name as an audit row may hold it: at most MAX_AUDITED_NAME code points, or nothing if PostgreSQL could not store it. */
function auditable(name: string): string | undefined {
  const capped = name.length > MAX_AUDITED_NAME ? [...name].slice(0, MAX_AUDITED_NAME).join('') : name;
  return storableText(capped) ? capped : undefined;
}

async function callTool(deps: McpDeps & { logger: Logger }, tool: Tool, caller: Caller, args: unknown): Promise<CallToolResult> {
  try {
    const result = await tool.run(caller, parse(tool.input, args ?? {}, 'body'));
    return { content: [{ type: 'text', text: JSON.stringify(result) }], structuredContent: result };
  } catch (err) {
    const appErr = toAppError(err);
    if (appErr.status >= 500) deps.logger.error({ err, requestId: caller.requestId, tool: tool.name }, 'MCP tool failed');
    if (!isAudited(err)) {
      await appendAudit(deps.pool, { ...caller, action: tool.action, outcome: outcomeOf(appErr), detail: errorDetail(appErr) }).catch((auditErr) =>
        deps.logger.error({ err: auditErr, requestId: caller.requestId }, 'could not audit a failed MCP call'),
      );
    }
    const problem = problemOf(appErr, undefined, caller.requestId);
    return { isError: true, content: [{ type: 'text', text: JSON.stringify(problem) }], structuredContent: problem };
  }
}

const inputSchemas = new WeakMap<z.ZodType, ToolInfo['inputSchema']>();

/** The tool's listing: its input schema is the zod schema the HTTP API validates with, as the OpenAPI document gives it. */
function describe(tool: Tool): ToolInfo {
  let inputSchema = inputSchemas.get(tool.input);
  if (!inputSchema) {
    inputSchema = jsonSchema(tool.input, 'input') as ToolInfo['inputSchema'];
    inputSchemas.set(tool.input, inputSchema);
  }
  return { name: tool.name, title: tool.title, description: tool.description, inputSchema, annotations: { title: tool.title, ...tool.hints } };
}
