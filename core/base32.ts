const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
/** Each character code's base32 digit (either case), or -1. */
const DIGITS = new Int8Array(128).fill(-1);
for (const [i, c] of [...ALPHABET].entries()) {
  DIGITS[c.charCodeAt(0)] = i;
  DIGITS[c.toLowerCase().charCodeAt(0)] = i;
}

/**
 * RFC 4648 base32 (no padding, either case) to bytes, as authenticator apps read a TOTP secret: the
 * bits after the last whole byte are dropped whatever they hold, and any length is taken (a 20-character
 * secret, or one whose last character is not the canonical one). Undefined if a character is no base32.
 */
export function decodeBase32(text: string): Buffer | undefined {
  const out = Buffer.alloc(Math.floor((text.length * 5) / 8));
  let bits = 0;
  let acc = 0;
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    const digit = code < 128 ? DIGITS[code]! : -1;
    if (digit < 0) {
      out.fill(0);
      return undefined;
    }
    acc = ((acc << 5) | digit) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out[n++] = (acc >>> bits) & 0xff;
    }
  }
  return out;
}
