import { z } from 'zod';
import { KINDS } from '../vault/types';

/**
 * Response schemas of the HTTP API, for the OpenAPI document. Objects are strict, so a field the
 * code sends but the document does not name fails test/openapi.test.ts.
 */
const uuid = z.uuid();
const time = z.iso.datetime();
const kind = z.enum(KINDS);
const json = z.record(z.string(), z.unknown());

/** RFC 9457 problem details (api/problem.ts); extension members such as currentVersion are allowed. */
export const problemSchema = z.looseObject({
  type: z.url(),
  title: z.string(),
  status: z.number().int().min(400).max(599),
  detail: z.string(),
  instance: z.string().optional(),
  requestId: z.string().optional(),
  errors: z.array(z.strictObject({ path: z.string(), message: z.string() })).optional(),
});

export const identityCreated = z.strictObject({
  id: uuid,
  name: z.string(),
  email: z.string().nullable(),
  token: z.string().describe('shown once; only its hash is stored'),
});

export const identityBody = z.strictObject({ id: uuid, name: z.string(), email: z.string().nullable() });
export const identitySettings = z.strictObject({
  id: uuid,
  name: z.string(),
  email: z.string().nullable(),
  mcpMasking: z.boolean(),
  allowUnmaskedRead: z.boolean(),
});

export const storedVersion = z.strictObject({ id: uuid, name: z.string(), version: z.number().int(), createdAt: time });

export const secretRead = z.strictObject({
  id: uuid,
  name: z.string(),
  kind,
  version: z.number().int(),
  label: z.enum(['current', 'previous', 'pending']).nullable(),
  value: z.string(),
  createdAt: time,
  ageDays: z.number().int(),
});

export const totpCode = z.strictObject({ code: z.string(), period: z.number().int(), digits: z.number().int(), expiresInSeconds: z.number().int() });

export const credentialMeta = z.strictObject({
  id: uuid,
  identityId: uuid,
  name: z.string(),
  kind,
  version: z.number().int(),
  previousVersion: z.number().int().nullable(),
  pendingVersion: z.number().int().nullable(),
  ageDays: z.number().int(),
  createdAt: time,
  versionCreatedAt: time,
  metadata: json,
  owners: z.array(z.string()),
  service: z.string().nullable(),
  tags: z.array(z.string()),
  policy: json.nullable().describe('the rotation policy'),
  dependents: z.array(z.strictObject({ type: z.string(), settings: json })),
  notify: z.array(z.string()),
  nextRotationAt: time.nullable(),
  expiresAt: time.nullable(),
  lastAccessedAt: time.nullable(),
  deletedAt: time.nullable(),
  status: z.string(),
});

export const credentialList = z.strictObject({ items: z.array(credentialMeta), nextCursor: z.string().nullable() });

export const credentialDeleted = z.union([
  z.strictObject({ id: uuid, deletedAt: time }),
  z.strictObject({ id: uuid, destroyedVersions: z.number().int() }),
]);

/** A repeat of a request by its Idempotency-Key is answered with the first's message and its status now. */
export const mailQueued = z.strictObject({ messageId: uuid, status: z.enum(['queued', 'sent', 'abandoned']), repeated: z.literal(true).optional() });

const grant = z.strictObject({
  id: uuid,
  credentialId: uuid,
  credentialName: z.string(),
  ownerId: uuid,
  granteeId: uuid,
  granteeName: z.string(),
  createdAt: time,
});
export const grantCreated = grant;
export const grantList = z.strictObject({ given: z.array(grant), received: z.array(grant) });
export const grantRevoked = z.strictObject({ id: uuid, revokedAt: time });

/** A repeat of a request by its Idempotency-Key is answered with the first's rotation (`repeated`). */
export const rotationStarted = z.strictObject({ rotationId: uuid, batchWorkflowId: z.string(), workflowIds: z.array(z.string()), repeated: z.literal(true).optional() });

const stepProgress = z.strictObject({
  name: z.enum(['create_pending', 'apply_dependents', 'verify', 'promote', 'grace', 'revoke_previous', 'compensate', 'notify']),
  state: z.enum(['waiting', 'running', 'done', 'failed', 'skipped']),
  attempt: z.number().int().optional(),
  error: z.string().optional(),
});
const rotationState = z.enum(['running', 'grace', 'succeeded', 'rotated', 'failed', 'cancelled', 'rolled_back', 'not_due']);
const rotationProgress = z.strictObject({
  state: rotationState,
  mode: z.enum(['requested', 'scheduled', 'leak']),
  attempt: z.number().int(),
  steps: z.array(stepProgress),
  fromVersion: z.number().int().optional(),
  toVersion: z.number().int().optional(),
  graceEndsAt: time.optional(),
  leakReported: z.boolean().optional(),
  rollbackRefused: z.string().optional().describe('why a rollback (or a cancel in grace) was refused: a value stored since is current; the grace period runs out as planned, and a cancel undoes nothing any more'),
  error: z.string().optional(),
});

export const rotationReport = z.strictObject({
  rotationId: uuid,
  state: z.string().describe('running, grace, succeeded, partial, failed (or every credential’s common outcome); not_started when its batch ended before starting any, or was never started (a minute after the request)'),
  reason: z.string().nullable(),
  createdAt: time,
  credentials: z.array(
    z.strictObject({
      credentialId: uuid,
      name: z.string(),
      workflowId: z.string(),
      runId: z.string().nullable(),
      outcome: z.string().nullable(),
      state: z.string().describe('not_started (waiting its turn: a batch keeps a bounded number of rotations open; for good once its batch has ended without starting it), running, grace, succeeded, failed, cancelled, rolled_back'),
      status: z.string().nullable().describe('the Temporal workflow status (null before the run starts, or once the server no longer keeps the run)'),
      progress: rotationProgress.nullable(),
    }),
  ),
});

export const rotationCancelling = z.strictObject({
  rotationId: uuid,
  cancelling: z.array(uuid).describe('credentials whose rotation was running: undone before promotion, rolled back in its grace period'),
  notStarted: z.array(uuid).describe('credentials whose rotation was still waiting its turn in the batch: it will not start'),
  finishing: z.array(uuid).describe('credentials whose rotation had promoted the new value and was past its grace period (or had none): not undone, it finishes'),
});

export const rotationRolledBack = z.strictObject({
  rotationId: uuid,
  results: z.array(
    z.union([
      z.strictObject({ credentialId: uuid, rolledBack: z.literal(true), current: z.number().int(), abandoned: z.number().int() }),
      z.strictObject({ credentialId: uuid, rolledBack: z.literal(false), reason: z.string() }),
    ]),
  ),
});

export const leakResults = z.strictObject({
  results: z.array(
    z.union([
      // already-revoked: nothing to do; deleted: a soft-deleted credential's, not rotated, its leak told to the security contacts and owners;
      // no-policy: a credential without a rotation policy (a TOTP seed, say), not rotated, told the same.
      z.strictObject({ credentialId: uuid, version: z.number().int(), action: z.enum(['already-revoked', 'deleted', 'no-policy']) }),
      z.strictObject({
        credentialId: uuid,
        version: z.number().int(),
        incidentId: uuid,
        workflowId: z.string(),
        /** The incident's leak rotation, to follow with GET /v1/rotations/:id (an incident opened before it was recorded has none). */
        rotationId: uuid.optional(),
        action: z.enum(['joined', 'rotating']),
      }),
    ]),
  ),
  /** A repeat of an earlier report by its Idempotency-Key: that report's answer, nothing done again. */
  repeated: z.literal(true).optional(),
});

export const passwordPolicyBody = z.strictObject({
  maxAgeDays: z.number().int(),
  length: z.number().int(),
  lowercase: z.boolean(),
  uppercase: z.boolean(),
  digits: z.boolean(),
  symbols: z.boolean(),
  escalateAfterDays: z.number().int(),
});

const serviceAccount = z.strictObject({
  id: uuid,
  identityId: uuid,
  name: z.string(),
  owners: z.array(z.string()),
  service: z.string().nullable(),
  dependents: z.array(z.strictObject({ type: z.string(), settings: json })),
  ageDays: z.number().int(),
  lastReadAt: time.nullable(),
  nextRotationAt: time.nullable(),
});
export const serviceAccounts = z.strictObject({ items: z.array(serviceAccount) });
export const orphanReport = z.strictObject({ days: z.number().int(), items: z.array(serviceAccount) });

const auditRow = z.strictObject({
  seq: z.number().int(),
  at: time,
  identityId: uuid.nullable(),
  actor: z.string(),
  action: z.string(),
  credentialId: uuid.nullable(),
  outcome: z.enum(['ok', 'denied', 'rejected', 'conflict', 'failed']),
  requestId: z.string().nullable(),
  detail: json,
});
export const auditList = z.strictObject({ items: z.array(auditRow), nextCursor: z.number().int().nullable() });
export const chainReport = z.strictObject({
  ok: z.boolean(),
  rows: z.number().int(),
  firstBroken: z.strictObject({ seq: z.number().int(), reason: z.string() }).optional(),
  head: z.strictObject({ seq: z.number().int(), hash: z.string() }).optional(),
});

export const health = z.strictObject({ status: z.literal('ok') });
export const readiness = z.strictObject({
  status: z.literal('ready'),
  checks: z.strictObject({ database: z.literal('ok'), temporal: z.literal('ok'), vault: z.literal('ok').optional() }),
});
