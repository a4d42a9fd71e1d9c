import { z } from 'zod';

function isPlainHttpUrl(text: string): boolean {
  try {
    const url = new URL(text.replaceAll('{id}', 'id'));
    return (url.protocol === 'http:' || url.protocol === 'https:') && !url.username && !url.password;
  } catch {
    return false;
  }
}

// Settings are not secret (they are shown with the credential's metadata): no credentials in URLs.
const httpUrl = z.string().max(2048).refine(isPlainHttpUrl, 'must be an http(s) URL without a user or password in it');
const headerName = z.string().regex(/^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$/, 'must be an HTTP header name');
/** Put before the secret in the header, e.g. `Bearer`; empty sends the bare secret (as in `X-Api-Key`). */
const scheme = z.string().max(32).regex(/^[A-Za-z0-9._~+/-]*$/, 'must be one word, like Bearer or Token, or empty');
const jsonPath = z.string().max(200).regex(/^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$/, 'must be a dotted path like data.secret');
const credentialName = z
  .string()
  .min(1)
  .max(200)
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$/, 'must be a credential name');

/** A provider's REST API for API keys: mint with an admin token, try the key, delete it by id. */
/** The longest a call to an HTTP provider may take (its `timeoutMs`): workflows/options.ts sizes the steps that make them by it. */
export const MAX_TIMEOUT_MS = 120_000;

/**
 * The longest `verify.waitSeconds`: how long verify keeps trying a new key that does not work yet.
 * With a last call at MAX_TIMEOUT_MS it fits an attempt of externalCall (10 minutes); a wait that
 * would not fit what is left of its attempt ends sooner (verify in index.ts).
 */
export const MAX_VERIFY_WAIT_SECONDS = 300;

export const httpSettings = z.strictObject({
  create: z.strictObject({
    url: httpUrl,
    method: z.enum(['POST', 'PUT', 'PATCH']).default('POST'),
    body: z
      .record(z.string(), z.unknown())
      .refine((b) => JSON.stringify(b).length <= 16_384, 'must be at most 16 KiB as JSON')
      .optional(),
  }),
  verify: z.strictObject({
    url: httpUrl,
    method: z.enum(['GET', 'HEAD', 'POST']).default('GET'),
    header: headerName.default('Authorization'),
    scheme: scheme.default('Bearer'),
    /** How long a new key may take to start working (some providers are eventually consistent): tried again until then. */
    waitSeconds: z.number().int().min(0).max(MAX_VERIFY_WAIT_SECONDS).default(30),
  }),
  revoke: z.strictObject({
    url: httpUrl.refine((u) => u.includes('{id}'), 'must contain {id}, where the key id goes'),
    method: z.enum(['DELETE', 'POST', 'PUT', 'PATCH']).default('DELETE'),
  }),
  auth: z.strictObject({
    credential: credentialName,
    header: headerName.default('Authorization'),
    scheme: scheme.default('Bearer'),
  }),
  valuePath: jsonPath,
  idPath: jsonPath,
  idempotencyHeader: headerName.default('Idempotency-Key'),
  timeoutMs: z.number().int().min(100).max(MAX_TIMEOUT_MS).default(10_000),
});

/**
 * A policy written now: its key's id is kept in the clear (and goes into the revoke URL and its
 * errors), so it must not be the value. (Only for a policy written: one stored before this rule is
 * still parsed by every step, so a run going on can revoke what it must; its creates are refused,
 * an id that holds the value being one.)
 */
export const newHttpSettings = httpSettings.refine((s) => s.idPath !== s.valuePath, {
  message: 'must not be valuePath: the id is kept unencrypted, so a key revoked by its value cannot be rotated by this provider',
  path: ['idPath'],
});

export type HttpSettings = z.infer<typeof httpSettings>;
