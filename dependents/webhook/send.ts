import { UnprocessableError } from '../../core/errors';
import type { WebhookSettings } from './schema';
import { SIGNATURE_HEADER, signatureHeader } from './signature';
import { checkOutbound, outboundDispatcher, outboundRefusal } from '../../core/outbound';
import { cancellationOf, outboundSignal } from '../../core/outbound-cancel';
import { readCapped } from '../../core/read-capped';

export type WebhookEventType = 'credential.pending' | 'credential.verify' | 'credential.restored' | 'credential.promoted';

/**
 * What a receiver gets: ids and a version, never a value. It reads the value itself with vault.get.
 * The same body on every attempt under one id (its idempotency key): a receiver may refuse a key
 * reused with another body. When it was sent is the signature's `t`.
 */
export interface WebhookEvent {
  id: string;
  type: WebhookEventType;
  credentialId: string;
  credentialName: string;
  version: number;
}

const MAX_ANSWER_BYTES = 64 * 1024;

/**
 * POSTs one signed event and returns the parsed JSON answer (undefined when there is none).
 * Redirects are not followed: they would carry the signed event somewhere not configured.
 * Errors name the receiver's origin and the status, never its body (it could echo anything).
 */
export async function postEvent(settings: WebhookSettings, key: string, event: WebhookEvent): Promise<unknown> {
  const origin = new URL(settings.url).origin;
  await checkOutbound(settings.url, `webhook ${origin}`);
  const body = JSON.stringify(event);
  let res: Response;
  try {
    res = await fetch(settings.url, {
      method: 'POST',
      body,
      redirect: 'manual',
      signal: outboundSignal(settings.timeoutMs),
      headers: {
        'content-type': 'application/json',
        'user-agent': 'mailgent-webhook/1',
        'idempotency-key': event.id,
        [SIGNATURE_HEADER]: signatureHeader(key, body),
      },
      // Checks the addresses it connects to as checkOutbound did the name (DNS rebinding).
      dispatcher: outboundDispatcher,
    } as RequestInit);
  } catch (err) {
    throw cancellationOf() ?? outboundRefusal(err, `webhook ${origin}`) ?? failure(err, `webhook ${origin} did not answer ${event.type}`, settings.timeoutMs);
  }
  if (res.status < 200 || res.status > 299) {
    await res.body?.cancel().catch(() => undefined);
    const message = `webhook ${origin} answered ${res.status} to ${event.type}${res.status < 400 ? ' (redirects are not followed)' : ''}`;
    // Timeouts, rate limits and server errors may heal, as may a 409: what a receiver that keeps
    // idempotency keys answers a retry while the first request with its key is still in progress (a
    // worker killed mid-call). Any other answer means a misconfiguration.
    const transient = res.status >= 500 || [408, 409, 425, 429].includes(res.status);
    throw transient ? new Error(message) : new UnprocessableError(message);
  }
  let text: string | null;
  try {
    text = await readCapped(res, MAX_ANSWER_BYTES);
  } catch (err) {
    throw cancellationOf() ?? failure(err, `webhook ${origin} did not finish its answer to ${event.type}`, settings.timeoutMs);
  }
  if (text === null) throw new Error(`webhook ${origin} answered ${event.type} with more than ${MAX_ANSWER_BYTES} bytes`);
  try {
    return text.trim() ? JSON.parse(text) : undefined;
  } catch {
    return undefined;
  }
}

function failure(err: unknown, what: string, timeoutMs: number): Error {
  const e = err as { name?: string; cause?: { code?: string; message?: string } };
  if (e.name === 'TimeoutError') return new Error(`${what} within ${timeoutMs} ms`);
  // The cause is a network-level reason (ECONNREFUSED, ENOTFOUND, bad port …), never an answer body.
  return new Error(`${what}: ${e.cause?.code ?? e.cause?.message ?? e.name ?? 'request failed'}`);
}

