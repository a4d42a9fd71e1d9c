import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { DEFAULT_PORT } from '../../core/defaults';
import type { z } from 'zod';
import { mismatchedFields } from './answers';
import { ANSWER_LOST, answerLost, CliError, EXIT, exitCodeOf, HelpRequested, unexpectedAnswer, unreachable, usageError, type Problem } from './errors';

/**
 * What every client command shares: its flags (node:util parseArgs, strict), where the API is,
 * which token it sends, and how it answers (human text, or one JSON document with --json).
 */
type Options = NonNullable<ParseArgsConfig['options']>;

const COMMON = {
  url: { type: 'string' },
  json: { type: 'boolean', default: false },
} as const satisfies Options;

const HELP = { help: { type: 'boolean', short: 'h' } } as const satisfies Options;

/**
 * Whether `args` ask for help: `--help` or `-h` parsed as an option of its own, with the command's
 * options, so that one given as an option's value (`--details -h`) is not. Checked leniently (unknown
 * options and all), before the strict parse: `--help` beside a mistake still shows the usage.
 */
export function helpAsked(args: string[], options: Options = {}): boolean {
  try {
    const { tokens } = parseArgs({ args, options: { ...options, ...HELP }, allowPositionals: true, strict: false, tokens: true });
    return tokens.some((t) => t.kind === 'option' && t.name === 'help' && t.value === undefined);
  } catch {
    return false;
  }
}

export function parse<T extends Options>(args: string[], options: T, usage: string) {
  if (helpAsked(args, { ...COMMON, ...options })) throw new HelpRequested();
  try {
    return parseArgs({ args, options: { ...COMMON, ...options, ...HELP }, allowPositionals: true, strict: true });
  } catch (err) {
    throw usageError((err as Error).message, usage);
  }
}

export const TOKEN_OPTION = { token: { type: 'string' } } as const satisfies Options;
export const ADMIN_TOKEN_OPTION = { 'admin-token': { type: 'string' } } as const satisfies Options;

export function baseUrl(flag: string | undefined, env = process.env): string {
  const raw = flag ?? (env.MAILGENT_URL || `http://127.0.0.1:${DEFAULT_PORT}`);
  // A URL with an '@' may hold a password (user:password@host), even one that does not parse: it is never repeated.
  const shown = raw.includes('@') ? '' : ` (got ${JSON.stringify(raw)})`;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw usageError(`the API URL (--url or MAILGENT_URL) must be an http:// or https:// URL${shown}`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw usageError(`the API URL (--url or MAILGENT_URL) must be an http:// or https:// URL${shown}`);
  }
  // fetch refuses such a URL anyway, quoting it whole in its error; the identity is the bearer token.
  if (url.username || url.password) {
    throw usageError('the API URL (--url or MAILGENT_URL) must not hold a user name or password (user:password@host); the identity comes from the token');
  }
  return raw.replace(/\/+$/, '');
}

export function identityToken(flag: string | undefined, env = process.env): string {
  if (flag === '') throw usageError('--token is empty');
  const token = flag ?? env.MAILGENT_TOKEN;
  if (!token) throw usageError('no identity token: set MAILGENT_TOKEN (or pass --token)');
  return headerSafe(token, 'the identity token (MAILGENT_TOKEN or --token)');
}

/**
 * A token goes into an Authorization header, which takes visible ASCII only; anything else (a pasted
 * newline, a typographic quote) would fail in fetch as "unreachable", quoting the token.
 */
function headerSafe(token: string, what: string): string {
  if (!/^[\x21-\x7e]+$/.test(token)) throw usageError(`${what} holds a character a token never has (a space, a line break or a non-ASCII character); check how it was copied`);
  return token;
}

/** The admin token: --admin-token, MAILGENT_ADMIN_TOKEN, ADMIN_TOKEN, else the file `serve` generated in DATA_DIR. */
export function adminToken(flag: string | undefined, env = process.env): string {
  // An empty flag is an unset shell variable in a script, not leave to use whatever token is found elsewhere.
  if (flag === '') throw usageError('--admin-token is empty');
  const given = flag ?? (env.MAILGENT_ADMIN_TOKEN || env.ADMIN_TOKEN);
  if (given) return headerSafe(given, 'the admin token (MAILGENT_ADMIN_TOKEN, ADMIN_TOKEN or --admin-token)');
  const file = path.resolve(env.DATA_DIR || '.data', 'admin-token');
  try {
    const token = readFileSync(file, 'utf8').trim();
    if (token) return headerSafe(token, `the admin token in ${file}`);
  } catch {
    // Not there: say where we looked.
  }
  throw usageError(`no admin token: set MAILGENT_ADMIN_TOKEN (or pass --admin-token), or run where ${file} exists`);
}

/**
 * A small client for the HTTP API. A refusal becomes a CliError carrying the API's problem details;
 * a success is the API's JSON document, once it has the fields `answer` names (cli/client/answers.ts).
 */
export class Api {
  constructor(
    readonly url: string,
    private readonly token: string,
  ) {}

  async call<S extends z.ZodType>(method: string, route: string, answer: S, body?: unknown, opts: { timeoutMs?: number; headers?: Record<string, string> } = {}): Promise<z.infer<S>> {
    let res: Response;
    try {
      res = await fetch(this.url + route, {
        method,
        headers: { authorization: `Bearer ${this.token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...opts.headers },
        body: body === undefined ? undefined : JSON.stringify(body),
        // Never followed: see redirected.
        redirect: 'manual',
        signal: AbortSignal.timeout(opts.timeoutMs ?? 60_000),
      });
    } catch (err) {
      // fetch refuses some ports outright (the Fetch standard's "bad ports": 1, 25, 6000 …): nothing
      // was sent, and nothing will be at that address, so it is the URL that is wrong.
      if (fetchFailure(err) === 'bad port') {
        throw usageError(`the API URL (--url or MAILGENT_URL) has a port that fetch refuses to connect to (bad port): ${this.url}`);
      }
      // Only a read, or a request that never reached the API, is safe to repeat: "try again later".
      if (!readOnly(method, route) && !neverSent(fetchFailure(err))) {
        throw answerLost(`the request to the Mailgent API at ${this.url} was sent but no answer came (${fetchFailure(err)}); it may have been carried out: check before repeating it`);
      }
      throw unreachable(`cannot reach the Mailgent API at ${this.url}: ${fetchFailure(err)}`);
    }
    if (res.status >= 300 && res.status < 400) {
      res.body?.cancel().catch(() => undefined);
      throw redirected(this.url, route, res);
    }
    let text: string;
    try {
      text = await res.text();
    } catch (err) {
      throw bodyLost(this.url, method, route, res, fetchFailure(err));
    }
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = undefined;
    }
    const maybeDone = readOnly(method, route) ? '' : ' (the request may have been carried out)';
    if (res.ok) {
      // Every route the CLI calls answers a JSON document. Anything else (a proxy's or captive
      // portal's HTML page, an empty body) is not the API's answer, and must not pass for success.
      if (parsed === null || typeof parsed !== 'object') {
        throw unexpectedAnswer(
          `the API at ${this.url} answered HTTP ${res.status} with ${res.headers.get('content-type') || 'no content type'}, not a JSON document; ` +
            `check that --url (MAILGENT_URL) points at the Mailgent API${maybeDone}`,
        );
      }
      // Nor does a JSON document of another shape (a gateway's `{"error": "login required"}`).
      const checked = answer.safeParse(parsed);
      if (checked.success) return parsed as z.infer<S>;
      throw unexpectedAnswer(
        `the API at ${this.url} answered HTTP ${res.status} with a JSON document that is not the answer to ${method} ${route.split('?')[0]} ` +
          `(missing or of the wrong type: ${mismatchedFields(checked.error)}); check that --url (MAILGENT_URL) points at the Mailgent API${maybeDone}`,
      );
    }
    // The API never answers 502 or 504: a proxy in front of it does, when the API's answer did not
    // come (a timeout, a dropped connection). For a change, as when the CLI itself sees that, it may
    // have been carried out. (A 503 is the API's own, which tells the two apart: `unconfirmed`.)
    if ((res.status === 502 || res.status === 504) && !readOnly(method, route)) {
      throw answerLost(
        `the request to the Mailgent API at ${this.url} was sent but a proxy answered HTTP ${res.status} in its place; it may have been carried out: check before repeating it`,
      );
    }
    const problem: Problem = parsed && typeof parsed === 'object' && 'detail' in parsed ? (parsed as Problem) : statusProblem(res, `the API answered HTTP ${res.status}`);
    throw new CliError(exitCodeOf(res.status, problem), problem);
  }
}

/** The problem of an answer that has none of its own (not JSON, or lost): what its status says. */
function statusProblem(res: Response, detail: string): Problem {
  return { type: 'about:blank', title: res.statusText || 'Error', status: res.status, detail };
}

/**
 * A redirect (a proxy's HTTP → HTTPS 308, a moved host) is not followed: following it sent the
 * request, the secret in its body too, a second time, to wherever the Location said, and fetch drops
 * the Authorization header across origins, so the answer was a misleading 401. It is the URL that is
 * wrong (exit 2): the Location is named, without user info, query or fragment (they may hold a
 * credential), and, when it ends with the route asked for, the API URL that it implies.
 */
function redirected(base: string, route: string, res: Response): CliError {
  const location = res.headers.get('location');
  let target: URL | undefined;
  try {
    target = location ? new URL(location, base + route) : undefined;
  } catch {
    target = undefined;
  }
  const refused = `the API URL (--url or MAILGENT_URL) ${base} answered HTTP ${res.status}, a redirect`;
  const notFollowed = 'the CLI does not follow redirects (it would send the request, and any secret in it, a second time)';
  if (!target) return usageError(`${refused} ${location ? 'to a Location that is not a URL' : 'without a Location'}; ${notFollowed}: point MAILGENT_URL (or --url) at the Mailgent API itself`);
  target.username = target.password = target.search = target.hash = '';
  const path = route.split('?')[0]!;
  const api = target.pathname.endsWith(path) ? target.href.slice(0, -path.length) : target.href;
  return usageError(`${refused} to ${target.href}; ${notFollowed}: if that is where the Mailgent API is, point MAILGENT_URL (or --url) at ${api}`);
}

/**
 * The connection dropped (or the timeout passed) after the status line, before the rest of the
 * answer (the API stopped, a proxy reset it): the status is all there is. A change answered with
 * success was carried out; one answered ≥ 500 (a server error, a proxy's 502 or 504, a 503 whose
 * `unconfirmed` went with the body) may have been. A read answered with success is to be asked again.
 * Any other status says what it says (a 409 is a conflict, a 404 not found, a 400 a malformed
 * request) with the exit code its problem would have had: before, every one was "unreachable, try
 * again later" (exit 4), even a change a 5xx may have carried out.
 */
function bodyLost(url: string, method: string, route: string, res: Response, why: string): CliError {
  const change = !readOnly(method, route);
  if (change && res.ok) {
    return answerLost(`the Mailgent API at ${url} answered HTTP ${res.status} but dropped the connection before the rest of its answer: the request was carried out (${why})`);
  }
  if (change && res.status >= 500) {
    return answerLost(
      `the Mailgent API at ${url} answered HTTP ${res.status} but dropped the connection before the rest of its answer (${why}); it may have been carried out: check before repeating it`,
    );
  }
  if (res.ok) return unreachable(`the Mailgent API at ${url} dropped the connection before its answer was read: ${why}`);
  return new CliError(exitCodeOf(res.status), statusProblem(res, `the API answered HTTP ${res.status} but dropped the connection before the rest of its answer (${why})`));
}

/** Where answers go: with --json exactly one JSON document on stdout; otherwise text for people. */
export class Out {
  constructor(readonly json: boolean) {}

  /** The command's result: JSON, or the human rendering. */
  result(value: unknown, human: () => void): void {
    if (this.json) process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
    else human();
  }

  line(text = ''): void {
    process.stdout.write(`${text}\n`);
  }

  /** Descriptions and progress for people, on stderr; nothing in --json mode. */
  note(text: string): void {
    if (!this.json) process.stderr.write(`${text}\n`);
  }
}

/** Reports a failure: the problem as JSON on stdout in --json mode, and one readable message on stderr. */
export function reportError(err: CliError, command: string, json: boolean): void {
  const p = err.problem;
  if (json) process.stdout.write(`${JSON.stringify(p, null, 2)}\n`);
  const status = p.status ? ` (${p.status})` : '';
  const lines = [`mailgent ${command}: ${p.title}${status}: ${p.detail}`];
  for (const e of p.errors ?? []) lines.push(`  ${e.path}: ${e.message}`);
  if (typeof p.requestId === 'string') lines.push(`  request id: ${p.requestId}`);
  if (err.usage && !json) lines.push('', err.usage);
  process.stderr.write(`${lines.join('\n')}\n`);
}

export { EXIT };

/** Calls that change nothing, so may be repeated whatever became of them: GETs, and the vault's reads (POSTs, audited). */
function readOnly(method: string, route: string): boolean {
  return method === 'GET' || route === '/v1/vault.get' || route === '/v1/vault.totp';
}

/**
 * Failures of fetch (as fetchFailure names them) that mean no request was sent: no connection was
 * made, or the TLS handshake failed (a certificate refused) before it, or fetch refused the URL
 * itself (one that does not parse, a "bad port"). Exported for `mailgent mcp` (cli/mcp.ts), which
 * tells an agent the same.
 */
const NEVER_CONNECTED = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'UND_ERR_CONNECT_TIMEOUT', 'ERR_INVALID_URL', 'bad port']);
export const neverSent = (code: string) => NEVER_CONNECTED.has(code) || /^(CERT_|ERR_TLS_|ERR_SSL_|DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_)/.test(code);

/** What a failed fetch says went wrong: its cause's code (ECONNREFUSED …) or message, else its own. */
export function fetchFailure(err: unknown): string {
  const cause = (err as { cause?: { code?: string; message?: string } }).cause;
  return cause?.code ?? cause?.message ?? (err as Error).message;
}

/** Tries of a keyed change whose answer was lost, or that the API could not carry out now (503). */
export const KEYED_TRIES = 3;

/**
 * A change sent with an Idempotency-Key (this invocation's own, or --idempotency-key): one whose
 * answer was lost (the connection dropped, a proxy's 502 or 504) or that the API answered 503 is
 * sent again, up to KEYED_TRIES in all, with the same key, which the API answers with what the first
 * made (if it made anything) instead of doing it again. If the tries run out after an answer was
 * lost, the change may have been carried out: that is the failure (exit 1), with the key to run
 * again with, whatever the last try got (a 503 would say "try again later", and a run with a new key
 * could do it a second time). `what`: the change, for that message ("the rotation's start").
 */
export async function sendKeyed<S extends z.ZodType>(api: Api, route: string, answer: S, body: Record<string, unknown>, key: string, what: { sent: string; made: string }): Promise<z.infer<S>> {
  const headers = { 'idempotency-key': key };
  let lost: CliError | undefined;
  for (let tried = 1; ; tried++) {
    try {
      return await api.call('POST', route, answer, body, { headers });
    } catch (err) {
      const wasLost = err instanceof CliError && (err.problem.type === ANSWER_LOST || err.problem.unconfirmed === true);
      if (wasLost) lost = err;
      const again = wasLost || (err instanceof CliError && err.problem.status === 503);
      if (!again || tried >= KEYED_TRIES) {
        if (!lost) throw err;
        throw answerLost(
          `${what.sent} was sent ${tried} times and no answer confirmed it (last: ${(err as Error).message}); it may have been carried out: run again with --idempotency-key ${key} to get ${what.made}`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 500 * tried));
    }
  }
}

/** A --idempotency-key given, checked, or a new one. */
export function idempotencyKeyOption(given: string | undefined, usage: string): string {
  const key = given ?? randomUUID();
  if (!/^[\x21-\x7e]{1,255}$/.test(key)) throw usageError('--idempotency-key must be 1–255 visible ASCII characters (no spaces)', usage);
  return key;
}
