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
    if (!tool) throw new McpError(ErrorCode.InvalidParams, `no tool named ${request.params.name}`);
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
        if (isJSONRPCErrorResponse(message)) await this.auditRefused(requested, message.error.code);
      }
      return send(message, options);
    };
  }

  /** What an audit row may say of a request: its method and tool name (capped, storable), and why a tools/call will be refused. */
  private requested(message: Extract<JSONRPCMessage, { method: string; id: RequestId }>): Requested {
    if (message.method !== 'tools/call') return { method: auditable(message.method) };
    const name: unknown = (message.params as { name?: unknown } | undefined)?.name;
    const tool = typeof name === 'string' ? auditable(name) : undefined;
    if (!CallToolRequestSchema.safeParse(message).success) return { method: message.method, tool, refusal: 'mcp-invalid-params' };
    if (!this.hasTool(name as string)) return { method: message.method, tool, refusal: 'mcp-unknown-tool' };
    return { method: message.method, tool };
  }

  private async auditRefused(requested: Requested, code: number): Promise<void> {
    const { deps, caller } = this;
    const detail: Record<string, unknown> = { error: requested.refusal ?? 'mcp-protocol', code };
    if (requested.method !== undefined) detail.method = requested.method;
    if (requested.tool !== undefined) detail.tool = requested.tool;
    await appendAudit(deps.pool, { identityId: caller.identityId, actor: caller.actor, action: 'mcp.request', outcome: 'rejected', requestId: caller.requestId, via: caller.via, detail }).catch((err) =>
      deps.logger.error({ err, requestId: caller.requestId }, 'could not audit a refused MCP request'),
    );
  }
}

interface Requested {
  method: string | undefined;
  tool?: string;
  refusal?: 'mcp-invalid-params' | 'mcp-unknown-tool';
}

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
