/**
 * Finds a stored secret inside an outgoing message: the value itself or its common encodings
 * (base64, base64url, hex, URL-encoding), and for TOTP seeds the bare base32 secret.
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
  for (const { name, value } of stored) {
    for (const { form, caseless } of forms(value)) {
      if (form.length < MIN_SCANNED_LENGTH) continue;
      if (haystack.includes(form) || (caseless && lower.includes(form.toLowerCase()))) return name;
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
function forms(value: string): { form: string; caseless: boolean }[] {
  const bytes = Buffer.from(value, 'utf8');
  const out = [value, bytes.toString('base64'), bytes.toString('base64url'), bytes.toString('hex'), encodeURIComponent(value)].map((form) => ({
    form,
    caseless: /^[0-9a-f]+$/i.test(form),
  }));
  const seed = /^otpauth:\/\/.*[?&]secret=([A-Z2-7]+)/i.exec(value)?.[1];
  if (seed) out.push({ form: seed, caseless: true });
  return out;
}
