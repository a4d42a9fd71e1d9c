import { UnprocessableError } from '../../core/errors';
import { checkOutbound, outboundDispatcher, outboundRefusal } from '../../core/outbound';
import { cancellationOf, outboundSignal } from '../../core/outbound-cancel';
import { readCapped } from '../../core/read-capped';

/**
 * One HTTP call and the errors it may raise. No message carries a header value or a response
 * body: either may hold a secret (a provider may echo the key it just made).
 */
export interface Call {
  method: string;
  url: string;
  headers: Record<string, string>;
  body?: unknown;
  timeoutMs: number;
  /** How messages name the call, where its URL carries what they must not (a key's id): callName's otherwise. */
  name?: string;
}

/** `POST https://host/path`, without the query string, for messages. */
export function callName(call: Pick<Call, 'method' | 'url' | 'name'>): string {
  if (call.name) return call.name;
  const url = new URL(call.url);
  return `${call.method} ${url.origin}${url.pathname}`;
}

/** A call named by its URL template, `{id}` left unfilled: `DELETE https://host/keys/{id}`. */
export function templateCallName(method: string, template: string): string {
  const marker = 'mailgent-key-id-placeholder';
  const url = new URL(template.replaceAll('{id}', marker));
  return `${method} ${url.origin}${url.pathname.replaceAll(marker, '{id}')}`;
}

export async function send(call: Call): Promise<Response> {
  await checkOutbound(call.url, callName(call));
  try {
    return await fetch(call.url, {
      method: call.method,
      headers: { accept: 'application/json', ...(call.body === undefined ? {} : { 'content-type': 'application/json' }), ...call.headers },
      body: call.body === undefined ? undefined : JSON.stringify(call.body),
      // A redirect would carry our headers to wherever it points; treat it as an answer instead.
      redirect: 'manual',
      signal: outboundSignal(call.timeoutMs),
      // Checks the addresses it connects to as checkOutbound did the name (DNS rebinding).
      dispatcher: outboundDispatcher,
    } as RequestInit);
  } catch (err) {
    const cancelled = cancellationOf();
    if (cancelled) throw cancelled;
    const refused = outboundRefusal(err, callName(call));
    if (refused) throw refused;
    // No `cause`: fetch's own errors can quote a header value. The message keeps only the error code.
    // eslint-disable-next-line preserve-caught-error
    if ((err as Error)?.name === 'TimeoutError') throw new Error(`${callName(call)} timed out after ${call.timeoutMs} ms`);
    const cause = (err as { cause?: { code?: unknown } })?.cause;
    // eslint-disable-next-line preserve-caught-error
    throw new Error(`${callName(call)} failed: ${typeof cause?.code === 'string' ? cause.code : ((err as Error)?.name ?? 'error')}`);
  }
}

/**
 * A non-2xx answer as an error: status and status text (secrets cut out), never the body.
 * 4xx other than timeouts, conflicts and rate limits will not heal by retrying: permanent.
 */
export function statusError(what: string, res: Response, secrets: string[]): Error {
  // Cut out first, then shortened: shortened first, a secret across the cut kept its head.
  let text = res.statusText;
  for (const s of secrets) if (s) text = text.split(s).join('[redacted]');
  text = text.slice(0, 80);
  const message = `${what} answered ${res.status}${text ? ` ${text}` : ''}`;
  const transient = res.status < 400 || res.status >= 500 || [408, 409, 425, 429].includes(res.status);
  return transient ? new Error(message) : new ProviderRefused(message, res.status);
}

/** A provider's 4xx answer that a retry would not change: the call was refused, and did nothing. */
export class ProviderRefused extends UnprocessableError {
  constructor(
    message: string,
    readonly providerStatus: number,
  ) {
    super(message);
  }
}

/** Lets the connection go back to the pool without reading a body we do not need. */
export async function discardBody(res: Response): Promise<void> {
  await res.body?.cancel().catch(() => undefined);
}

/** A provider's answer is a small JSON document; a larger one is refused before it is all read. */
export const MAX_ANSWER_BYTES = 1024 * 1024;

export async function readJson(res: Response, what: string): Promise<unknown> {
  const text = await readCapped(res, MAX_ANSWER_BYTES);
  if (text === null) throw new Error(`${what} answered ${res.status} with a body over ${MAX_ANSWER_BYTES} bytes`);
  try {
    return JSON.parse(text);
  } catch {
    // JSON.parse's message quotes the text it choked on.
    throw new Error(`${what} answered ${res.status} with a body that is not JSON`);
  }
}

/** `data.items.0.secret` → doc.data.items[0].secret; own properties only, no evaluation. */
export function resolvePath(doc: unknown, path: string): unknown {
  let at = doc;
  for (const key of path.split('.')) {
    if (at === null || typeof at !== 'object' || !Object.hasOwn(at, key)) return undefined;
    at = (at as Record<string, unknown>)[key];
  }
  return at;
}

/** A header value with the secret; refuses characters a header cannot carry (fetch would quote them). */
export function credentialHeader(scheme: string, secret: string, what: string): string {
  if (!/^[\x20-\x7e]+$/.test(secret)) throw new UnprocessableError(`${what} cannot be sent in an HTTP header (empty or not printable ASCII)`);
  return scheme ? `${scheme} ${secret}` : secret;
}
