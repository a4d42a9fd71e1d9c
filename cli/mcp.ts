import type { JSONRPCMessage, JSONRPCRequest } from '@modelcontextprotocol/sdk/types.js';
import { baseUrl, fetchFailure, identityToken, neverSent, parse, TOKEN_OPTION } from './client/context';
import { EXIT, unexpectedArgument, usageError } from './client/errors';

/**
 * `mailgent mcp`: MCP over stdio for agents that launch their tools as processes. It is a bridge,
 * not a second server: every message goes to a running Mailgent's /mcp with the identity token
 * from MAILGENT_TOKEN, and every answer comes back unchanged. So the tools, their scoping, audit
 * and masking are the server's by construction, and the agent's machine holds no master key,
 * no database address and no secret beyond its own token. Stdout carries only the protocol.
 */
export const MCP_USAGE = `Usage: mailgent mcp [--url <url>] [--token <token>]

MCP over stdio, bridged to a running Mailgent's /mcp (MAILGENT_URL, default http://127.0.0.1:8080)
with an identity token (MAILGENT_TOKEN). Configure it as a stdio server in the agent's MCP client.`;

export async function mcpCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, TOKEN_OPTION, MCP_USAGE);
  if (positionals.length) throw unexpectedArgument(1, MCP_USAGE);
  // Stdout is the MCP channel: no JSON document of the CLI's own can go there (before, --json was
  // taken and ignored).
  if (values.json) throw usageError('--json is not for mcp: its stdout carries only the MCP protocol', MCP_USAGE);
  await mcpBridge(new URL(`${baseUrl(values.url)}/mcp`), identityToken(values.token));
  return EXIT.ok;
}

/** How long a bridge whose stdin ended waits for the answers still due. */
const DRAIN_MS = 120_000;

export async function mcpBridge(url: URL, token: string): Promise<void> {
  // Loaded here, not at the top: every other mailgent command would pay for the SDK's import.
  const [{ StreamableHTTPClientTransport }, { StdioServerTransport }, { isJSONRPCRequest }] = await Promise.all([
    import('@modelcontextprotocol/sdk/client/streamableHttp.js'),
    import('@modelcontextprotocol/sdk/server/stdio.js'),
    import('@modelcontextprotocol/sdk/types.js'),
  ]);
  const remote = new StreamableHTTPClientTransport(url, { requestInit: { headers: { authorization: `Bearer ${token}` } } });
  const local = new StdioServerTransport();
  const closed = new Promise<void>((resolve) => {
    local.onclose = resolve;
  });

  // Closing the remote side aborts what it still has open (its fetches, a stream): on the way out
  // that is no error to report (before, every normal exit wrote "This operation was aborted").
  let closing = false;
  const abortedOnClose = (err: Error) => closing && (err.name === 'AbortError' || /^SSE stream disconnected: AbortError\b/.test(err.message));

  // Requests sent on and not yet answered: stdin may end before their answers come (a client that
  // pipes its requests in whole), and closing the remote side then would abort them.
  const pending = new Set<string | number>();
  let drained: (() => void) | undefined;
  const answered = (id: string | number) => {
    pending.delete(id);
    if (pending.size === 0) drained?.();
  };
  local.onmessage = (message: JSONRPCMessage) => {
    if (isJSONRPCRequest(message)) pending.add(message.id);
    remote.send(message).catch((err: Error) => {
      // The server could not be reached, refused the request (a bad token is a 401 problem) or its
      // answer was lost: the caller gets a JSON-RPC error for its request instead of waiting forever.
      if (isJSONRPCRequest(message)) {
        void local.send({ jsonrpc: '2.0', id: message.id, error: { code: -32000, message: `mailgent: ${sendFailure(message, err, url)}` } });
        answered(message.id);
      } else if (!abortedOnClose(err)) {
        process.stderr.write(`mailgent mcp: ${err.message}\n`);
      }
    });
  };
  remote.onmessage = (message: JSONRPCMessage) => {
    // Later requests carry the negotiated version in their header, as the SDK's own client does.
    const version = (message as { result?: { protocolVersion?: unknown } }).result?.protocolVersion;
    if (typeof version === 'string') remote.setProtocolVersion(version);
    void local
      .send(message)
      .catch(() => undefined) // stdout gone: the client has left; nothing is waiting for this answer either
      .then(() => {
        if ('id' in message && ('result' in message || 'error' in message)) answered(message.id as string | number);
      });
  };
  remote.onerror = (err) => {
    if (!abortedOnClose(err)) process.stderr.write(`mailgent mcp: ${err.message}\n`);
  };

  await remote.start();
  await local.start();
  // Stdin closing (the client went away, or piped its requests in whole) ends the bridge, once the
  // requests already sent on have their answers (for at most DRAIN_MS: a server that never answers
  // does not keep the process alive).
  process.stdin.once('end', () => {
    const ended = pending.size === 0 ? Promise.resolve() : new Promise<void>((resolve) => (drained = resolve));
    const cap = new Promise<void>((resolve) => setTimeout(resolve, DRAIN_MS).unref());
    void Promise.race([ended, cap]).then(() => local.close());
  });
  await closed;
  closing = true;
  await remote.close();
}

/**
 * What the agent is told when its request could not be sent on, or its answer did not come back,
 * with the cause's code (ECONNREFUSED, UND_ERR_SOCKET, HTTP 502 …) always. A tool call that reached
 * the server (the connection made, then reset, or cut after the headers; a proxy's 502 or 504, or a
 * 2xx that is not a JSON-RPC answer, in the server's place) may have been carried out: told only
 * "fetch failed", an agent repeated it, and a vault_store, rotate_credentials, report_leak or
 * mail_send was done twice. Only one that never connected (the CLI's own neverSent) is safe to repeat
 * as it is; an answer of the server's own (a 401 problem) is handed on as it was.
 */
function sendFailure(request: JSONRPCRequest, err: Error, url: URL): string {
  // The SDK's StreamableHTTPError carries the HTTP status as its code (-1: a 2xx of another content type).
  const code = (err as { code?: unknown }).code;
  const status = typeof code === 'number' ? code : undefined;
  const cause = status === undefined ? fetchFailure(err) : status === -1 ? 'not a JSON-RPC answer' : `HTTP ${status}`;
  const unanswered = status === undefined ? !neverSent(cause) : status === -1 || status === 502 || status === 504;
  if (request.method === 'tools/call' && unanswered) {
    return `the request was sent to the Mailgent API at ${url.href} but no answer came from it (${cause}); it may have been carried out: check (e.g. with list_credentials or rotation_status) before repeating it (a mail_send, rotate_credentials or report_leak given an idempotencyKey may be repeated with the same key)`;
  }
  return `${err.message} (${cause})`;
}
