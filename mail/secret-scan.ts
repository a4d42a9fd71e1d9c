/**
 * Finds a stored secret inside an outgoing message: the value itself or its common encodings
 * (base64, base64url, hex, URL-encoding in any of its spellings, HTML entities), and for TOTP
 * seeds the bare base32 secret.
 * Values shorter than MIN_SCANNED_LENGTH are not matched: they would block ordinary words.
 */
export const MIN_SCANNED_LENGTH = 6;

export interface ScannedMessage {
  to?: string[];
  subject: string;
  text: string;
  html?: string | null;
}

export function findStoredValue(message: ScannedMessage, stored: { name: string; value: string }[]): string | undefined {
  const haystack = [...(message.to ?? []), message.subject, message.text, message.html ?? ''].join('\n');
  const lower = haystack.toLowerCase();
  // base64 tools wrap their output (`base64` at 76 columns, PEM at 64): a long value's encoding may
  // be split across lines.
  const unwrapped = haystack.replace(/\s+/g, '');
  // Escaped text decoded, to look for the value itself: percent-escapes in either case, `+` for a
  // space (a form or a query string: URLSearchParams, quote_plus, QueryEscape), HTML entities.
  const decoded = [percentDecoded(haystack), percentDecoded(haystack.replaceAll('+', ' ')), htmlDecoded(haystack), percentDecoded(htmlDecoded(haystack))].filter(
    (text) => text !== haystack,
  );
  for (const { name, value } of stored) {
    if (value.length < MIN_SCANNED_LENGTH) continue;
    if (decoded.some((text) => text.includes(value))) return name;
    for (const { form, caseless, wraps } of forms(value)) {
      if (form.length < MIN_SCANNED_LENGTH) continue;
      if (haystack.includes(form) || (caseless && lower.includes(form.toLowerCase())) || (wraps && unwrapped.includes(form))) return name;
    }
  }
  return undefined;
}

/** findStoredValue over pages of values (Vault.storedValues), stopping at the first page with a hit. */
export async function findStoredValueIn(message: ScannedMessage, pages: AsyncIterable<{ name: string; value: string }[]>): Promise<string | undefined> {
  for await (const page of pages) {
    const hit = findStoredValue(message, page);
    if (hit) return hit;
  }
  return undefined;
}

/**
 * The forms a value may take in a message. Hex and a TOTP seed's base32 mean the same in either case
 * (authenticator apps take `jbswy3dp…` as readily as `JBSWY3DP…`), so they match caselessly.
 */
function forms(value: string): { form: string; caseless: boolean; wraps?: boolean }[] {
  const bytes = Buffer.from(value, 'utf8');
  const out: { form: string; caseless: boolean; wraps?: boolean }[] = [value, bytes.toString('hex'), encodeURIComponent(value)].map((form) => ({
    form,
    caseless: /^[0-9a-f]+$/i.test(form),
  }));
  for (const form of base64Cores(bytes)) out.push({ form, caseless: false, wraps: true }, { form: toBase64url(form), caseless: false, wraps: true });
  const seed = /^otpauth:\/\/.*[?&]secret=([A-Z2-7]+)/i.exec(value)?.[1];
  if (seed) out.push({ form: seed, caseless: true });
  return out;
}

/**
 * base64 of the value wherever it stands in what was encoded: `echo "$KEY" | base64` encodes a
 * newline after it, a Basic auth header `user:` before it, a file the bytes around it. Each of
 * the three alignments (0, 1 or 2 bytes before it within a 3-byte group) encodes the value to a
 * different text; of each, only the characters every one of whose bits comes from the value are
 * the same whatever surrounds it.
 */
function base64Cores(bytes: Buffer): string[] {
  return [0, 1, 2].map((shift) => {
    const encoded = Buffer.concat([Buffer.alloc(shift), bytes]).toString('base64');
    return encoded.slice(Math.ceil((8 * shift) / 6), Math.floor((8 * (shift + bytes.length)) / 6));
  });
}

/** Runs of percent-escapes decoded as UTF-8 (a byte that is no valid UTF-8 becomes U+FFFD, the rest decoded all the same). */
function percentDecoded(text: string): string {
  return text.replace(/(?:%[0-9a-f]{2})+/gi, (run) => Buffer.from(run.replaceAll('%', ''), 'hex').toString('utf8'));
}

const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: '\u00a0' };

/** HTML character references decoded: the five XML ones, &nbsp;, and numeric ones. */
function htmlDecoded(text: string): string {
  return text.replace(/&(#x[0-9a-f]+|#[0-9]+|[a-z]+);/gi, (ref, body: string) => {
    const code = body[0] !== '#' ? undefined : body[1] === 'x' || body[1] === 'X' ? parseInt(body.slice(2), 16) : parseInt(body.slice(1), 10);
    if (code === undefined) return ENTITIES[body.toLowerCase()] ?? ref;
    return code <= 0x10ffff ? String.fromCodePoint(code) : ref;
  });
}

function toBase64url(base64: string): string {
  return base64.replaceAll('+', '-').replaceAll('/', '_');
}
