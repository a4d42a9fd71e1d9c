import { Router, type NextFunction, type Request, type Response } from 'express';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isJsonContentType } from '@modelcontextprotocol/sdk/shared/mediaType.js';
import { ErrorCode, JSONRPCMessageSchema } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';
import type { Logger } from '../../core/logger';
import { createMcpServer } from '../../mcp/server';
import type { McpDeps } from '../../mcp/tools';
import type { Identity } from '../../vault/identities';
import { AppError } from '../../core/errors';
import { appendAudit } from '../../vault/audit';
import { authenticate, jsonBody, type AuthDeps } from '../endpoint';
import { documented } from '../openapi';

/**
 * MCP over streamable HTTP at /mcp, stateless: every POST is authenticated by its own bearer token
 * (the REST API's authentication, so a bad token is the same 401 problem) and gets a fresh server
 * and transport for that identity. No sessions, so no server-sent stream to GET and nothing to DELETE.
 */
export function mcpRoutes(auth: AuthDeps, deps: McpDeps & { logger: Logger }): Router {
  const router = Router();
  router.post(
    '/mcp',
    documented({
      summary: 'MCP (streamable HTTP, stateless): JSON-RPC requests to the vault, mail and rotation tools',
      auth: 'identity',
      requestBody: { contentType: 'application/json', description: 'one JSON-RPC message (Model Context Protocol); a batch is refused with a 400 JSON-RPC error (-32600): MCP 2025-06-18 removed batching' },
      responses: {
        200: {
          description: 'The JSON-RPC response: a result (a tool’s failure is a result with isError: true and the problem), or a JSON-RPC error object for a refused request (an unknown tool, arguments that are not an object, an unknown method)',
          contentType: 'application/json',
        },
        202: { description: 'a notification or response was accepted' },
        400: {
          description: 'Refused before MCP sees it (a problem: a malformed body, a Host header the transport cannot use), or as MCP refuses it (a JSON-RPC error object: not one JSON-RPC message (a batch, JSON that is not JSON-RPC: -32600), an unsupported MCP-Protocol-Version)',
          contentType: 'application/json',
          schema: jsonRpcError,
        },
        406: { description: 'The Accept header does not list both application/json and text/event-stream (a JSON-RPC error object, from the MCP transport)', contentType: 'application/json', schema: jsonRpcError },
      },
      // Problems: refused before MCP sees it. The MCP transport's own protocol errors (400, 406) are
      // JSON-RPC error objects, documented above; JSON-RPC errors of a call are answered with 200.
      problems: [400, 413, 415],
    }),
    (_req, res, next) => {
      // The audit action of a request refused before it reaches a tool (a bad token, a malformed body).
      res.locals.action = 'mcp.request';
      res.locals.via = 'mcp';
      next();
    },
    authenticate(auth, 'identity'),
    onlyJson,
    jsonBody,
    async (req: Request, res: Response) => {
      if (!transportTakesHost(req.headers.host)) {
        throw new AppError(400, 'malformed-request', 'Malformed request', 'MCP over HTTP needs a Host header that names a host (and port)');
      }
      const identity: Identity = res.locals.identity;
      const invalid = notOneMessage(req.body);
      if (invalid) {
        res.status(400).json({ jsonrpc: '2.0', error: { code: ErrorCode.InvalidRequest, message: invalid }, id: null });
      } else {
        const server = createMcpServer(deps, { identityId: identity.id, actor: `identity:${identity.id}`, requestId: res.locals.requestId, via: 'mcp' });
        const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
        res.on('close', () => {
          void transport.close();
          void server.close();
        });
        await server.connect(transport);
        await transport.handleRequest(req, res, req.body);
      }
      // The transport answers protocol errors itself, as JSON-RPC errors (MCP's streamable HTTP asks
      // for them, not problems): an Accept without application/json and text/event-stream (406), an
      // unsupported MCP-Protocol-Version (400); and a body that is not one JSON-RPC message is
      // answered above (400). Refused calls all the same: audited as the others are.
      if (res.statusCode >= 400) {
        const failed = res.statusCode >= 500;
        await appendAudit(deps.pool, {
          identityId: identity.id,
          actor: `identity:${identity.id}`,
          action: 'mcp.request',
          outcome: failed ? 'failed' : 'rejected',
          requestId: res.locals.requestId,
          via: 'mcp',
          detail: { error: failed ? 'internal' : 'mcp-protocol', status: res.statusCode },
        }).catch((err) => deps.logger.error({ err, requestId: res.locals.requestId }, 'could not audit a refused MCP request'));
      }
    },
  );
  router.all(
    '/mcp',
    documented({
      summary: 'MCP: only POST (stateless, no sessions)',
      auth: 'none',
      // (HEAD is answered as GET is, without the body.)
      methods: ['GET', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
      responses: { 405: { description: 'JSON-RPC error', contentType: 'application/json', schema: jsonRpcError } },
    }),
    (req: Request, res: Response) => {
      // Answer once the request's body (if any) is drained: answering first left the unread body on
      // the connection, and clients read it as garbage after the response (found by test/fuzz.test.ts).
      const answer = () =>
        res
          .status(405)
          .set('Allow', 'POST')
          .json({ jsonrpc: '2.0', error: { code: -32000, message: 'Method not allowed: this server is stateless; POST each message to /mcp' }, id: null });
      if (req.complete) answer();
      else req.on('end', answer).resume();
    },
  );
  return router;
}

/**
 * Why a body is not one JSON-RPC message, checked before the transport, which got both wrong:
 * - a batch (an array): MCP 2025-06-18 removed JSON-RPC batching, and the SDK's handling of it broke
 *   JSON-RPC: `[]` was a 202 (nothing refused, nothing audited), a batch whose requests share an id
 *   ran them all and answered one (a second store or send the client never heard of), and a batch
 *   of one request was answered by an object, not an array. One message per POST;
 * - JSON that is not a JSON-RPC message (`{}`, `null`): the transport answered -32700, a parse
 *   error, for JSON it had parsed; it is an invalid request (-32600).
 */
function notOneMessage(body: unknown): string | undefined {
  if (Array.isArray(body)) return 'Invalid Request: JSON-RPC batches are not served (MCP removed them in 2025-06-18): POST one message at a time';
  if (!JSONRPCMessageSchema.safeParse(body).success) return 'Invalid Request: the body is not a JSON-RPC message';
  return undefined;
}

/** A JSON-RPC error object as the MCP transport (and the 405 above) answers it: no request id. */
const jsonRpcError = z.strictObject({
  jsonrpc: z.literal('2.0'),
  error: z.strictObject({ code: z.number().int(), message: z.string(), data: z.unknown().optional() }),
  id: z.null(),
});

/**
 * Only application/json (any parameters), checked as the SDK's transport checks it, after the token
 * and before the body is read. jsonBody also takes application/*+json, which the transport then
 * refused with a 415 JSON-RPC error the document did not give; this is the API's 415 problem (the
 * one any other media type gets), audited as a rejected mcp.request by the problem handler.
 */
function onlyJson(req: Request, _res: Response, next: NextFunction): void {
  if (isJsonContentType(req.headers['content-type'])) return next();
  next(new AppError(415, 'unsupported-media-type', 'Unsupported media type', 'send MCP messages as application/json'));
}

/**
 * Whether the SDK's transport can make its request URL of this Host header. It builds a web Request
 * through @hono/node-server, which answers a bare 400 (no body, no problem) to a missing Host or one
 * that does not parse as its own hostname; this is that rule (its `buildUrl`), checked first so the
 * caller gets a problem instead (found by test/fuzz.test.ts: `Host:` empty).
 */
function transportTakesHost(host: string | undefined): boolean {
  if (!host) return false;
  try {
    const { hostname } = new URL(`http://${host}/`);
    return hostname.length === host.length || hostname === (host.includes(':') ? host.replace(/:\d+$/, '') : host).toLowerCase();
  } catch {
    return false;
  }
}
