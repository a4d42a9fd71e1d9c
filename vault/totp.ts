import { createGuardrails } from 'otplib';
import { NodeCryptoPlugin } from '@otplib/plugin-crypto-node';
import { generateSync } from '@otplib/totp';
import { parse as parseOtpauth } from '@otplib/uri';
import { decodeBase32 } from '../core/base32';
import { UnprocessableError } from '../core/errors';

/**
 * TOTP (RFC 6238) seeds are stored as a canonical otpauth:// URI, sealed like any other value,
 * so `vault.get` of a totp_seed returns something every authenticator app can import.
 */
export type TotpAlgorithm = 'SHA1' | 'SHA256' | 'SHA512';

export interface TotpParams {
  secret: string;
  algorithm: TotpAlgorithm;
  digits: 6 | 8;
  period: number;
  issuer?: string;
  label: string;
}

export type TotpInput =
  | { otpauthUri: string }
  | { secret: string; algorithm?: TotpAlgorithm; digits?: 6 | 8; period?: number };

// Real issuers hand out 80-bit seeds (16 base32 characters), below otplib's 128-bit default.
export const MIN_SEED_BYTES = 10;
export const MAX_SEED_BYTES = 64;
export const MAX_PERIOD_SECONDS = 86_400;
const guardrails = createGuardrails({ MIN_SECRET_BYTES: MIN_SEED_BYTES, MAX_SECRET_BYTES: MAX_SEED_BYTES, MAX_PERIOD: MAX_PERIOD_SECONDS });
/**
 * Codes are made by otplib's TOTP package with Node's own HMAC and the seed's bytes, not by the
 * `otplib` facade with its default pure-JavaScript HMAC and a base32 string: 12.3 → 5.1 µs a code
 * on this machine, and vault.totp runs one for every call on the read thread.
 */
const nodeCrypto = new NodeCryptoPlugin();

export function normalizeTotp(input: TotpInput, label: string): TotpParams {
  if ('otpauthUri' in input) {
    let uri: ReturnType<typeof parseOtpauth>;
    try {
      uri = parseOtpauth(input.otpauthUri);
    } catch (err) {
      throw new UnprocessableError(`totp.otpauthUri is not a valid otpauth:// URI (otpauth://totp/LABEL?secret=…): ${uriProblem(err)}`);
    }
    if (uri.type !== 'totp') throw new UnprocessableError('totp.otpauthUri must be an otpauth://totp/ URI (HOTP is not supported)');
    return checked({
      secret: uri.params.secret,
      algorithm: (uri.params.algorithm?.toUpperCase() ?? 'SHA1') as TotpAlgorithm,
      digits: (uri.params.digits ?? 6) as 6 | 8,
      period: uri.params.period ?? 30,
      issuer: uri.params.issuer,
      label: uri.label || label,
    });
  }
  return checked({
    secret: input.secret,
    algorithm: input.algorithm ?? 'SHA1',
    digits: input.digits ?? 6,
    period: input.period ?? 30,
    label,
  });
}

/**
 * What was wrong with a URI, in words of our own: the parser's messages quote the URI or a parameter's
 * value, and the URI holds the seed (even `secre%74=` or a seed with spaces gets past any redaction).
 */
function uriProblem(err: unknown): string {
  const message = err instanceof Error ? err.message : '';
  const parameter = /^(?:Missing required parameter: |Invalid value for parameter ')([a-z]{1,20})\b/.exec(message)?.[1];
  if (err instanceof Error && err.name === 'MissingParameterError' && parameter) return `it has no ${parameter} parameter`;
  if (err instanceof Error && err.name === 'InvalidParameterError' && parameter) return `its ${parameter} parameter is not valid`;
  return 'it could not be parsed';
}

/** A seed's base32 as the vault keeps it: upper case, without white space, `-` or `=` padding. */
function seedSpelling(text: string): string {
  return text.replace(/[\s-]/g, '').replace(/=+$/, '').toUpperCase();
}

function checked(params: TotpParams): TotpParams {
  const secret = seedSpelling(params.secret);
  // Decoded as authenticator apps decode it: the bits past the last whole byte dropped (otplib's
  // strict decoder refused a 20-character secret, and one whose last character is not canonical).
  const bytes = secret ? decodeBase32(secret) : undefined;
  if (!bytes) throw new UnprocessableError('the TOTP secret is not valid base32 (letters A-Z and digits 2-7)');
  const length = bytes.length;
  bytes.fill(0); // only its length is needed here
  if (length < MIN_SEED_BYTES || length > MAX_SEED_BYTES) {
    throw new UnprocessableError(`the TOTP secret must decode to ${MIN_SEED_BYTES}–${MAX_SEED_BYTES} bytes, not ${length}`);
  }
  if (!['SHA1', 'SHA256', 'SHA512'].includes(params.algorithm)) {
    throw new UnprocessableError('the TOTP algorithm must be SHA1, SHA256 or SHA512');
  }
  if (params.digits !== 6 && params.digits !== 8) throw new UnprocessableError('TOTP digits must be 6 or 8');
  if (!Number.isInteger(params.period) || params.period < 1 || params.period > MAX_PERIOD_SECONDS) {
    throw new UnprocessableError(`the TOTP period must be a whole number of seconds from 1 to ${MAX_PERIOD_SECONDS}`);
  }
  return { ...params, secret };
}

/**
 * The stored (and read) form. Each value percent-encoded as in the label, a space as %20: the key
 * URI format's parsers (otplib's among them) decode with decodeURIComponent, which leaves a `+` (what
 * URLSearchParams writes for a space) as a plus: `Acme & Co` came back as `Acme+&+Co`.
 */
export function toOtpauthUri(p: TotpParams): string {
  const params: [string, string][] = [['secret', p.secret], ['algorithm', p.algorithm], ['digits', String(p.digits)], ['period', String(p.period)]];
  if (p.issuer) params.push(['issuer', p.issuer]);
  return `otpauth://totp/${encodeURIComponent(p.label)}?${params.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join('&')}`;
}

/**
 * The form a seed is stored in, checked to read back: the key URI's parser limits a label to 512
 * characters and a URI to 2,048, and percent-encoding a label or issuer (a letter outside ASCII is
 * 6 characters, `:` and `/` 3) could take one within them past them: stored (201), the seed then
 * made no code at all (every vault.totp a 422 about a URI the caller never gave).
 */
export function storedTotpUri(input: TotpInput, label: string): string {
  const uri = toOtpauthUri(normalizeTotp(input, label));
  try {
    parseOtpauth(uri);
  } catch {
    throw new UnprocessableError(
      'the TOTP label and issuer are too long: percent-encoded in the stored otpauth URI they pass its limits (a label of 512 characters, a URI of 2,048); shorten them',
    );
  }
  return uri;
}

/**
 * The seed a text stands for, as the vault keeps it (upper case, without white space, `-` or `=`
 * padding), if it is base32 of a seed's length (MIN_SEED_BYTES–MAX_SEED_BYTES): how one pasted from
 * an authenticator's setup screen (`jbsw y3dp …`) is recognised as the value it is.
 */
export function asSeed(text: string): string | undefined {
  const seed = seedSpelling(text);
  if (!/^[A-Z2-7]+$/.test(seed)) return undefined;
  const bytes = Math.floor((seed.length * 5) / 8);
  return bytes >= MIN_SEED_BYTES && bytes <= MAX_SEED_BYTES ? seed : undefined;
}

/**
 * The seed of a stored value that is an otpauth://totp URI (a totp_seed's, as storedTotpUri writes
 * it); undefined for any other value. What a TOTP version's keyed fingerprint is made of: the seed is
 * the secret (pasted, leaked, reported), the URI around it is Mailgent's own.
 */
export function storedSeedOf(value: string): string | undefined {
  const secret = /^otpauth:\/\/totp\/[^?]*\?(?:[^#]*&)?secret=([A-Za-z2-7]+)(?:[&#]|$)/.exec(value)?.[1];
  return secret === undefined ? undefined : asSeed(secret);
}

/** The seed a totp_seed store comes with (normalised as asSeed), if its input is well formed. */
export function inputSeedOf(input: TotpInput): string | undefined {
  if ('secret' in input) return typeof input.secret === 'string' ? asSeed(input.secret) : undefined;
  try {
    return asSeed(parseOtpauth(input.otpauthUri).params.secret);
  } catch {
    return undefined;
  }
}

export function parseStoredTotp(uri: string): TotpParams {
  return normalizeTotp({ otpauthUri: uri }, 'stored');
}

export interface TotpCode {
  code: string;
  period: number;
  digits: number;
  expiresInSeconds: number;
}

export function totpCode(p: TotpParams, nowMs: number): TotpCode {
  const epoch = Math.floor(nowMs / 1000);
  const seed = decodeBase32(p.secret);
  if (!seed) throw new UnprocessableError('the stored TOTP secret is not valid base32');
  try {
    const code = generateSync({
      secret: seed,
      algorithm: p.algorithm.toLowerCase() as 'sha1' | 'sha256' | 'sha512',
      digits: p.digits,
      period: p.period,
      epoch,
      guardrails,
      crypto: nodeCrypto,
    });
    return { code, period: p.period, digits: p.digits, expiresInSeconds: p.period - (epoch % p.period) };
  } finally {
    seed.fill(0);
  }
}
