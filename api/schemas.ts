import { z } from 'zod';
import { isUuid } from '../core/ids';
import { KINDS } from '../vault/vault';
import { MAX_PERIOD_SECONDS } from '../vault/totp';
import { DEFAULT_GRACE_HOURS } from '../vault/types';

/**
 * Request schemas of the HTTP API. Objects are strict: an unknown field is an error, not ignored.
 * Messages never include the offending value.
 */
export const MAX_VALUE_BYTES = 64 * 1024;
export const MAX_REQUEST_BYTES = 256 * 1024;
/** Versions are PostgreSQL `int`s. */
const MAX_VERSION = 2_147_483_647;

const credentialName = z
  .string()
  .min(1)
  .max(200)
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$/, 'must start with a letter or digit and use only letters, digits and . _ : / @ + -')
  // A path segment of that form names a credential by id (refOf), so a name like it could never be reached by path.
  .refine((n) => !isUuid(n), 'must not have the form of a UUID (that names a credential by id)')
  // An MCP handle (mailgent://credentials/<id>@<version>) names a credential by id in rotate_credentials
  // and report_leak: a credential named like one would be two credentials to the tools.
  .refine((n) => !/^mailgent:/i.test(n), 'must not start with mailgent: (that is a handle, which names a credential by id)');
// Any 8-4-4-4-12 hex string (core/ids.ts), not only RFC 9562 UUIDs: a name of that form is refused as
// a name, so it must be taken as an id (a 404 if there is none), as it is in a path.
const credentialId = z.guid('must be a credential id (UUID)');
/**
 * A credential named by its id or by its name in one string (a path's `:ref`, a grant's
 * `credential`, the audit trail's `?credential=`, which outlives its credential): an id's form, or a
 * name of the form vault.store takes. Anything else names no credential there could ever have been:
 * a 400 (as a malformed name is to vault.get), never looked up, and never written into the audit log
 * (it was, verbatim: control characters, a line break forging a line of whatever prints the log, a
 * value pasted by mistake when it was not name-shaped; a name-shaped one is a name, recorded as
 * vault.get records the names it is given).
 */
export const credentialRef = z.string().superRefine((s, ctx) => {
  if (isUuid(s)) return;
  const asName = credentialName.safeParse(s);
  if (!asName.success) ctx.addIssue({ code: 'custom', message: `must be a credential id (UUID) or name: ${asName.error.issues[0]!.message}` });
});
/**
 * An RFC 3339 date-time PostgreSQL can store: from the year 1 (UTC) on, with an offset of at most
 * 15 hours. `0000-…` is valid ISO 8601 (1 BC) and `+16:00` a valid RFC 3339 offset, but neither is a
 * timestamptz input: each would otherwise fail as a 500 after validation. Nor past the year 9999
 * (UTC): `9999-12-31T23:59:59-15:00` is stored, but answered as `+010000-…`, which is not RFC 3339.
 */
const dateTime = z.iso
  .datetime({ offset: true })
  .refine((s) => Number(/([+-])(\d{2}):?\d{2}$/.exec(s)?.[2] ?? 0) <= 15, 'must have a UTC offset of at most 15 hours')
  .refine((s) => new Date(s).getUTCFullYear() >= 1, 'must be a date-time from the year 1 (UTC) onwards')
  // `!(… > 9999)`: a string that is no date-time at all (NaN) has its error already.
  .refine((s) => !(new Date(s).getUTCFullYear() > 9999), 'must be a date-time before the year 10000 (UTC)');
const email = z.email('must be an email address').max(254);
const kind = z.enum(KINDS);
/**
 * A whole number given in the query string: plain decimal digits, given once. (z.coerce.number() took
 * `` as 0, `0x10` as 16 and `1e2` as 100, and a repeated parameter as NaN.) A JSON number passes to
 * `checks` as it is: MCP's list_credentials takes its arguments with this schema. The checks, and any
 * default, go in `checks`: so the OpenAPI document still shows the parameter as the integer it is.
 */
function queryInt(checks: z.ZodType<number, number | undefined>) {
  return z.preprocess((v, ctx) => {
    if (v === undefined || typeof v === 'number') return v; // absent: `checks` gives its default, if any
    if (typeof v === 'string' && /^\d+$/.test(v)) return Number(v);
    ctx.addIssue({ code: 'custom', input: v, message: Array.isArray(v) ? 'was given more than once' : 'must be a whole number' });
    return v;
  }, checks);
}
const days = queryInt(z.number().int().min(0).max(36500));

/** What an identity's name may be (identityCreate's rule, its length too). */
export const IDENTITY_NAME = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$/;

export const identityCreate = z.strictObject({
  name: z
    .string()
    .min(1)
    .max(100)
    .regex(/^[A-Za-z0-9][A-Za-z0-9._@-]*$/, 'must use only letters, digits and . _ @ -')
    // A grant names its grantee by name or id: a name like another identity's id would be ambiguous.
    .refine((n) => !isUuid(n), 'must not have the form of a UUID (that names an identity by id)'),
  email: email.optional(),
});

/** The admin's switches for how an identity's MCP calls treat values (PATCH /v1/identities/:id). */
export const identityUpdate = z
  .strictObject({ mcpMasking: z.boolean().optional(), allowUnmaskedRead: z.boolean().optional() })
  .refine((b) => Object.keys(b).length > 0, 'give at least one field to change');

const totp = z.union([
  z.strictObject({ otpauthUri: z.string().min(1).max(2048).startsWith('otpauth://', 'must be an otpauth:// URI') }),
  z.strictObject({
    secret: z.string().min(16, 'must be at least 16 base32 characters (a seed of 10 bytes or more)').max(200),
    algorithm: z.enum(['SHA1', 'SHA256', 'SHA512']).optional(),
    digits: z.union([z.literal(6), z.literal(8)]).optional(),
    period: z.number().int().min(1).max(MAX_PERIOD_SECONDS).optional(),
  }),
]);

export const rotationPolicy = z.strictObject({
  provider: z.string().min(1).max(64),
  settings: z.record(z.string(), z.unknown()).default({}),
  periodDays: z.number().int().min(1).max(3650).default(90),
  graceHours: z.number().min(0).max(720).optional(),
  maxAttempts: z.number().int().min(1).max(10).optional(),
  expiryLeadDays: z.number().int().min(0).max(365).optional(),
  window: z
    .strictObject({
      days: z.array(z.number().int().min(0).max(6)).min(1).max(7),
      startHour: z.number().int().min(0).max(23),
      endHour: z.number().int().min(0).max(24),
      timezone: z.string().refine(isTimeZone, 'must be an IANA time zone such as Europe/Berlin'),
    })
    // [startHour, endHour) in local hours, wrapping past midnight when endHour < startHour: equal hours would be a window that never opens.
    .refine((w) => w.startHour !== w.endHour % 24 || w.endHour === 24, { message: 'must be open for at least an hour: startHour and endHour differ (0 and 24 for all day)', path: ['endHour'] })
    .optional(),
})
  // A credential due again while its rotation's grace period runs would be counted by every hourly
  // sweep meanwhile as rotated (the sweep joins the run in grace), and rotated only after it.
  .refine((p) => (p.graceHours ?? DEFAULT_GRACE_HOURS) < p.periodDays * 24, {
    message: `must be shorter than the rotation period (periodDays × 24 hours; ${DEFAULT_GRACE_HOURS} when not given)`,
    path: ['graceHours'],
  });

const dependents = z.array(z.strictObject({ type: z.string().min(1).max(64), settings: z.record(z.string(), z.unknown()).default({}) })).max(20);

/** The policy fields a credential carries besides its value (vault.store and PATCH /v1/credentials/:ref). */
const policyFields = {
  metadata: z
    .record(z.string().min(1).max(64), z.union([z.string().max(1024), z.number(), z.boolean(), z.null()]))
    .refine((m) => Object.keys(m).length <= 50, 'may have at most 50 keys')
    .optional(),
  owners: z.array(email).max(20).optional(),
  service: z.string().min(1).max(200).nullable().optional(),
  tags: z.array(z.string().min(1).max(64)).max(20).optional(),
  rotation: rotationPolicy.nullable().optional(),
  dependents: dependents.optional(),
  notify: z.array(email).max(20).optional(),
  expiresAt: dateTime.nullable().optional(),
};

export const credentialUpdate = z.strictObject(policyFields).refine((b) => Object.keys(b).length > 0, 'give at least one field to change');

function isTimeZone(tz: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: tz });
    return true;
  } catch {
    return false;
  }
}

export const vaultStore = z
  .strictObject({
    name: credentialName,
    kind,
    value: z
      .string()
      .min(1)
      .refine((v) => Buffer.byteLength(v, 'utf8') <= MAX_VALUE_BYTES, `must be at most ${MAX_VALUE_BYTES} bytes`)
      .optional(),
    totp: totp.optional(),
    ...policyFields,
    expectedVersion: z.number().int().min(0).max(MAX_VERSION).optional(),
    /** The provider's own id for this value (e.g. an API key id), so a rotation can revoke it later. Never secret. */
    externalId: z.string().min(1).max(500).optional(),
  })
  .superRefine((body, ctx) => {
    if (body.kind === 'totp_seed') {
      if (!body.totp) ctx.addIssue({ code: 'custom', path: ['totp'], message: 'is required when kind is totp_seed' });
      if (body.value !== undefined) ctx.addIssue({ code: 'custom', path: ['value'], message: 'is not allowed when kind is totp_seed (use totp)' });
    } else {
      if (body.value === undefined) ctx.addIssue({ code: 'custom', path: ['value'], message: 'is required' });
      if (body.totp) ctx.addIssue({ code: 'custom', path: ['totp'], message: 'is only allowed when kind is totp_seed' });
    }
    // The provider's id is kept unencrypted beside the sealed value, and goes into revoke URLs: never the value.
    if (body.externalId !== undefined && body.value && body.externalId.includes(body.value)) {
      ctx.addIssue({ code: 'custom', path: ['externalId'], message: 'holds the value being stored: it is kept unencrypted, so give the provider\'s id of the value, not the value' });
    }
  });

const oneRef = <T extends { name?: string; id?: string }>(body: T, ctx: z.RefinementCtx) => {
  if ((body.name === undefined) === (body.id === undefined)) {
    ctx.addIssue({ code: 'custom', path: ['name'], message: 'give exactly one of name or id' });
  }
};

export const vaultGet = z
  .strictObject({ name: credentialName.optional(), id: credentialId.optional(), version: z.number().int().min(1).max(MAX_VERSION).optional() })
  .superRefine(oneRef);

export const vaultTotp = z.strictObject({ name: credentialName.optional(), id: credentialId.optional() }).superRefine(oneRef);

/** An Idempotency-Key: 1–255 visible ASCII characters (a UUID, say). */
export const idempotencyKey = z
  .string()
  .min(1, 'must not be empty')
  .max(255, 'must be at most 255 characters')
  .regex(/^[\x21-\x7e]+$/, 'must be visible ASCII characters (no spaces)');

export const mailSend = z.strictObject({
  to: z.array(email).min(1).max(50),
  subject: z
    .string()
    .min(1)
    .max(998)
    .refine((s) => !/[\r\n]/.test(s), 'must be one line'),
  text: z.string().min(1).max(100_000),
  html: z.string().min(1).max(200_000).optional(),
  /** The Idempotency-Key header's value, for clients that cannot send headers (MCP): a repeat gets the first request's message. */
  idempotencyKey: idempotencyKey.optional(),
});

/** DELETE /v1/credentials/:ref: `?destroy=true` deletes every version's ciphertext now. */
export const credentialDeleteQuery = z.strictObject({ destroy: z.enum(['true', 'false']).optional() });

export const credentialsQuery = z.strictObject({
  kind: kind.optional(),
  olderThanDays: days.optional(),
  dueWithinDays: days.optional(),
  // The last name of the page before, as nextCursor gave it: any name a credential has, a name from
  // before a rule refused it (`mailgent:…`, a UUID's form) too. Checked as a new name, such a cursor
  // was a 400, and the pages after it could not be reached.
  after: z.string().min(1).max(200).optional(),
  limit: queryInt(z.number().int().min(1).max(1000).default(100)),
});

export const rotationsStart = z
  .strictObject({
    credentials: z.array(z.string().min(1).max(200)).min(1).max(1000).optional(),
    filter: z.strictObject({ kind: kind.optional(), olderThanDays: z.number().int().min(0).max(36500).optional() }).optional(),
    reason: z.string().max(500).optional(),
    notify: z.array(email).max(20).optional(),
    /** The Idempotency-Key header's value, for clients that cannot send headers (MCP): a repeat gets the first request's rotation. */
    idempotencyKey: idempotencyKey.optional(),
  })
  .superRefine((body, ctx) => {
    if ((body.credentials === undefined) === (body.filter === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['credentials'], message: 'give exactly one of credentials or filter' });
    }
  });

/** `?head=<seq>:<hash>`: a head an earlier verify answered, to check the log against. */
export const chainQuery = z.strictObject({
  head: z
    .string()
    .regex(/^\d{1,18}:[0-9a-fA-F]{64}$/, 'must be <seq>:<hash>, as an earlier verify answered (head.seq and head.hash)')
    // A seq no row can have (they start at 1; past 2^53 the number is not exact) is a mistake to
    // answer as one, not a head reported gone: a false alarm of tampering.
    .refine((s) => {
      const seq = Number(s.split(':')[0]);
      return seq >= 1 && Number.isSafeInteger(seq);
    }, `head's seq must be 1 to ${Number.MAX_SAFE_INTEGER}, as an earlier verify answered it`)
    .transform((s) => ({ seq: Number(s.split(':')[0]), hash: s.split(':')[1]!.toLowerCase() }))
    .optional(),
});

export const auditQuery = z.strictObject({
  credential: credentialRef.optional(),
  since: dateTime.optional(),
  after: queryInt(z.number().int().min(0)).optional(),
  limit: queryInt(z.number().int().min(1).max(1000).default(100)),
});

/**
 * An identity named by its id or its name (a grant's grantee): an id's form, or a name of the form
 * identityCreate takes. Anything else names no identity there could be: a 400 that does not repeat
 * it, never looked up nor written into the audit log (before, a line break, a bidi override or any
 * text pasted there was repeated in the 404 and written into the row as given), as GET
 * /v1/identities/:ref refuses it.
 */
export const identityRef = z
  .string()
  .refine((s) => isUuid(s) || IDENTITY_NAME.test(s), "must be an identity's id (UUID) or name (1-100 letters, digits and . _ @ -, starting with a letter or digit)");

export const grantCreate = z.strictObject({
  credential: credentialRef,
  grantee: identityRef,
});

export const leakReport = z
  .strictObject({
    credential: z.string().min(1).max(200).optional(),
    /** The version of `credential` that leaked (an older one a stored value replaced may still work); the current one if absent. */
    version: z.number().int().min(1).max(2_147_483_647).optional(),
    fingerprint: z.string().regex(/^[0-9a-fA-F]{64}$/, 'must be the SHA-256 of the leaked value, as 64 hex digits').optional(),
    source: z.string().min(1).max(200),
    details: z.string().max(2000).optional(),
    /** The Idempotency-Key header's value, for clients that cannot send headers (MCP): a repeat gets the first report's answer. */
    idempotencyKey: idempotencyKey.optional(),
  })
  .superRefine((body, ctx) => {
    if ((body.credential === undefined) === (body.fingerprint === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['credential'], message: 'give exactly one of credential or fingerprint' });
    }
    if (body.version !== undefined && body.credential === undefined) {
      ctx.addIssue({ code: 'custom', path: ['version'], message: 'a version goes with a credential (a fingerprint names its version itself)' });
    }
  });

export const passwordPolicy = z.strictObject({
  maxAgeDays: z.number().int().min(1).max(3650),
  length: z.number().int().min(8).max(256).default(16),
  lowercase: z.boolean().default(true),
  uppercase: z.boolean().default(true),
  digits: z.boolean().default(true),
  symbols: z.boolean().default(false),
  escalateAfterDays: z.number().int().min(0).max(365).default(7),
});

export const orphansQuery = z.strictObject({ days: queryInt(z.number().int().min(1).max(3650)).optional() });
