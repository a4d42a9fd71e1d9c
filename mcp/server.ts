import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { CallToolRequestSchema, ErrorCode, ListToolsRequestSchema, McpError, type CallToolResult, type Tool as ToolInfo } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';
import type { Logger } from '../core/logger';
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
  const server = new Server({ name: 'mailgent', version: pkg.version }, { capabilities: { tools: {} }, instructions: INSTRUCTIONS });
  server.setRequestHandler(ListToolsRequestSchema, () => ({ tools: [...tools.values()].map(describe) }));
  server.setRequestHandler(CallToolRequestSchema, async (request) => {
    const tool = tools.get(request.params.name);
    if (!tool) throw new McpError(ErrorCode.InvalidParams, `no tool named ${request.params.name}`);
    return callTool(deps, tool, caller, request.params.arguments);
  });
  return server;
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
