import { Router, type Request, type Response } from 'express';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
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
      requestBody: { contentType: 'application/json', description: 'a JSON-RPC message or batch (Model Context Protocol)' },
      responses: { 200: { description: 'the JSON-RPC response' }, 202: { description: 'a notification or response was accepted' } },
      // Refused before MCP sees it (JSON-RPC errors, tool errors included, are answered with 200; the
      // transport's own protocol errors, 400 and 406, are JSON-RPC error objects).
      problems: [400, 413, 415],
    }),
    (_req, res, next) => {
      // The audit action of a request refused before it reaches a tool (a bad token, a malformed body).
      res.locals.action = 'mcp.request';
      next();
    },
    authenticate(auth, 'identity'),
    jsonBody,
    async (req: Request, res: Response) => {
      if (!transportTakesHost(req.headers.host)) {
        throw new AppError(400, 'malformed-request', 'Malformed request', 'MCP over HTTP needs a Host header that names a host (and port)');
      }
      const identity: Identity = res.locals.identity;
      const server = createMcpServer(deps, { identityId: identity.id, actor: `identity:${identity.id}`, requestId: res.locals.requestId, via: 'mcp' });
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
      res.on('close', () => {
        void transport.close();
        void server.close();
      });
      await server.connect(transport);
      await transport.handleRequest(req, res, req.body);
      // The transport answers protocol errors itself, as JSON-RPC errors (MCP's streamable HTTP asks
      // for them, not problems): an Accept without application/json and text/event-stream (406), a
      // body that is not a JSON-RPC message or an unsupported MCP-Protocol-Version (400). Refused
      // calls all the same: audited as the others are.
      if (res.statusCode >= 400) {
        const failed = res.statusCode >= 500;
        await appendAudit(deps.pool, {
          identityId: identity.id,
          actor: `identity:${identity.id}`,
          action: 'mcp.request',
          outcome: failed ? 'failed' : 'rejected',
          requestId: res.locals.requestId,
          detail: { error: failed ? 'internal' : 'mcp-protocol', status: res.statusCode },
        }).catch((err) => deps.logger.error({ err, requestId: res.locals.requestId }, 'could not audit a refused MCP request'));
      }
    },
  );
  router.all(
    '/mcp',
    documented({ summary: 'MCP: only POST (stateless, no sessions)', auth: 'none', methods: ['GET', 'DELETE'], responses: { 405: { description: 'JSON-RPC error' } } }),
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
