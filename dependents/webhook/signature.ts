import { createHmac, timingSafeEqual } from 'node:crypto';

/**
 * Webhook signatures, Stripe style. Each request carries
 *   Mailgent-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<raw body>")>
 * where key is the UTF-8 value of the signing-key credential. A receiver recomputes the HMAC over
 * the raw bytes it received (before any JSON parsing), compares in constant time, and refuses a
 * timestamp more than the tolerance away from its clock, so a captured request cannot be replayed
 * later. Several v1 entries may appear (e.g. while a signing key rotates); one match suffices.
 */
export const SIGNATURE_HEADER = 'Mailgent-Signature';

export function signatureHeader(key: string, body: string, now = new Date()): string {
  const t = Math.floor(now.getTime() / 1000);
  return `t=${t},v1=${hmac(key, t, body).toString('hex')}`;
}

export function verifyWebhookSignature(
  header: string | undefined | null,
  rawBody: string | Buffer,
  key: string,
  { toleranceSeconds = 300, now = new Date() }: { toleranceSeconds?: number; now?: Date } = {},
): boolean {
  if (!header || !key) return false;
  let t: number | undefined;
  const signatures: Buffer[] = [];
  for (const part of header.split(',')) {
    const [name, value = ''] = part.trim().split('=', 2) as [string, string?];
    if (name === 't' && /^\d{1,12}$/.test(value)) t = Number(value);
    if (name === 'v1' && /^[0-9a-f]{64}$/i.test(value)) signatures.push(Buffer.from(value, 'hex'));
  }
  if (t === undefined || signatures.length === 0) return false;
  if (Math.abs(now.getTime() / 1000 - t) > toleranceSeconds) return false;
  const expected = hmac(key, t, rawBody);
  return signatures.map((s) => timingSafeEqual(s, expected)).includes(true);
}

function hmac(key: string, t: number, body: string | Buffer): Buffer {
  return createHmac('sha256', key).update(`${t}.`).update(body).digest();
}
