import { createRequire } from 'node:module';
import type { ZodError } from 'zod';
import { UUID } from '../../core/ids';

// zod by require: its ~95 modules read by Node's CommonJS loader at once, not each sent through
// tsx's ESM hooks (a hop to their thread apiece: ~0.4 s of CPU at every command's start).
const { z } = createRequire(import.meta.url)('zod') as typeof import('zod');

/**
 * What the CLI reads of each API answer: the fields it prints or acts on, checked before a 2xx
 * counts as success (a gateway's `200 {"error":"login required"}` must not print `undefined` and
 * exit 0). Not api/responses.ts: those schemas are strict, for the OpenAPI document, so an API newer
 * than this CLI, adding a field or a rotation step, would fail every command. Here objects accept
 * fields they do not name, and Api.call hands on the API's document itself, unchanged (--json).
 */

const whole = z.number().int();
/** An id the CLI puts into a URL path: a UUID, nothing a stranger's answer could steer elsewhere. */
const uuid = z.string().regex(UUID);

export const identityCreated = z.object({ id: z.string(), name: z.string(), token: z.string().min(1) });

export const storedVersion = z.object({ id: z.string(), name: z.string(), version: whole });

export const secretRead = z.object({
  name: z.string(),
  kind: z.string(),
  version: whole,
  label: z.string().nullable(),
  value: z.string(),
  ageDays: whole,
});

export const totpCode = z.object({ code: z.string(), expiresInSeconds: whole });

export const leakResults = z.object({
  results: z.array(z.object({ credentialId: z.string(), version: whole, action: z.string(), workflowId: z.string().optional() })),
});

/** A broken chain names its first broken row: without it the answer cannot be told. */
export const chainReport = z
  .object({ ok: z.boolean(), rows: whole, firstBroken: z.object({ seq: whole, reason: z.string() }).optional(), head: z.object({ seq: whole, hash: z.string() }).optional() })
  .refine((r) => r.ok || r.firstBroken !== undefined, { path: ['firstBroken'] });

export const rotationStarted = z.object({ rotationId: uuid, batchWorkflowId: z.string(), workflowIds: z.array(z.string()) });

const runProgress = z.object({
  fromVersion: whole.optional(),
  toVersion: whole.optional(),
  error: z.string().optional(),
  graceEndsAt: z.string().optional(),
  steps: z.array(z.object({ name: z.string(), state: z.string(), error: z.string().optional() })).optional(),
});

export const rotationReport = z.object({
  rotationId: z.string(),
  state: z.string(),
  reason: z.string().nullable(),
  credentials: z.array(z.object({ credentialId: z.string(), name: z.string(), state: z.string(), progress: runProgress.nullable() })),
});

export const credentialPage = z.object({ items: z.array(z.object({ id: z.string(), version: whole })), nextCursor: z.string().nullable() });

/**
 * Where an answer differs from what was asked for, by field path (`credentials.0.name`), never by
 * value: the document came from whoever answered, and what it holds is not repeated.
 */
export function mismatchedFields(error: ZodError, most = 8): string {
  const paths = [...new Set(error.issues.map((i) => i.path.join('.') || 'the whole answer'))];
  return paths.length > most ? `${paths.slice(0, most).join(', ')} and ${paths.length - most} more` : paths.join(', ');
}
