import { randomUUID } from 'node:crypto';
import { Router } from 'express';
import type { Client } from '@temporalio/client';
import { NotFoundError, UnavailableError, UnprocessableError } from '../../core/errors';
import { withTransaction, type Pool } from '../../db/pool';
import { appendAudit } from '../../vault/audit';
import type { Kind, Vault } from '../../vault/vault';
import { progressQuery, rotateCredential } from '../../workflows';
import type { RotationProgress } from '../../workflows/types';
import { endpoint, type AuthDeps } from '../endpoint';
import { rotationsStart } from '../schemas';

/** Starts rotations (one workflow per credential, id rotate:<credentialId>) and reports their progress. */
export function rotationRoutes(auth: AuthDeps, deps: { pool: Pool; vault: Vault; client: Client; taskQueue: string }): Router {
  const router = Router();

  router.post(
    '/v1/rotations',
    ...endpoint(auth, { who: 'identity', action: 'rotation.start', body: rotationsStart }, async ({ body, caller }) => {
      const credentialIds = await selectCredentials(deps.vault, caller.identityId, body);
      const rotationId = randomUUID();
      await withTransaction(deps.pool, async (tx) => {
        await tx.query('INSERT INTO rotations (id, identity_id, reason, notify) VALUES ($1, $2, $3, $4)', [
          rotationId,
          caller.identityId,
          body.reason ?? null,
          body.notify ?? [],
        ]);
        await tx.query(
          `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id)
           SELECT $1, c, 'rotate:' || c FROM unnest($2::uuid[]) AS c`,
          [rotationId, credentialIds],
        );
        await appendAudit(tx, { ...caller, action: 'rotation.start', outcome: 'ok', detail: { rotationId, credentials: credentialIds.length } });
      });
      const workflowIds: string[] = [];
      try {
        for (const credentialId of credentialIds) {
          const workflowId = `rotate:${credentialId}`;
          // One rotation per credential at a time: a request for one already rotating joins that run.
          const handle = await deps.client.workflow.start(rotateCredential, {
            taskQueue: deps.taskQueue,
            workflowId,
            args: [{ rotationId, identityId: caller.identityId, credentialId }],
            workflowIdConflictPolicy: 'USE_EXISTING',
          });
          await deps.pool.query('UPDATE rotation_runs SET run_id = $3 WHERE rotation_id = $1 AND credential_id = $2', [
            rotationId,
            credentialId,
            handle.firstExecutionRunId,
          ]);
          workflowIds.push(workflowId);
        }
      } catch (err) {
        if (err instanceof Error && /ECONNREFUSED|UNAVAILABLE|deadline|Connection/i.test(err.message)) {
          throw new UnavailableError(`Temporal is unavailable; ${workflowIds.length} of ${credentialIds.length} rotations were started (rotation ${rotationId})`);
        }
        throw err;
      }
      return { status: 202, body: { rotationId, workflowIds } };
    }),
  );

  router.get(
    '/v1/rotations/:id',
    ...endpoint(auth, { who: 'identity' }, async ({ req, caller }) => {
      const id = String(req.params.id);
      const rotation = /^[0-9a-f-]{36}$/i.test(id)
        ? (await deps.pool.query('SELECT * FROM rotations WHERE id = $1 AND identity_id = $2', [id, caller.identityId])).rows[0]
        : undefined;
      if (!rotation) throw new NotFoundError(`no rotation with id ${id}`);
      const { rows: runs } = await deps.pool.query(
        `SELECT r.credential_id, r.workflow_id, r.run_id, c.name FROM rotation_runs r JOIN credentials c ON c.id = r.credential_id
          WHERE r.rotation_id = $1 ORDER BY c.name`,
        [id],
      );
      const credentials = await Promise.all(runs.map((run) => describeRun(deps.client, run)));
      const states = credentials.map((c) => c.state);
      const state = states.some((s) => s === 'running' || s === 'not_started')
        ? 'running'
        : states.every((s) => s === 'succeeded')
          ? 'succeeded'
          : 'failed';
      return {
        body: { rotationId: id, state, reason: rotation.reason, createdAt: rotation.created_at.toISOString(), credentials },
      };
    }),
  );

  return router;
}

async function selectCredentials(
  vault: Vault,
  identityId: string,
  body: { credentials?: string[]; filter?: { kind?: Kind; olderThanDays?: number } },
): Promise<string[]> {
  if (body.credentials) {
    const { found, missing } = await vault.resolve(identityId, [...new Set(body.credentials)]);
    if (missing.length) throw new NotFoundError(`no credential named or with id: ${missing.join(', ')}`);
    return [...new Set(found.values())];
  }
  const ids: string[] = [];
  for (let after: string | undefined; ; ) {
    const page = await vault.list(identityId, { ...body.filter, after, limit: 1000 });
    ids.push(...page.map((c) => c.id));
    if (page.length < 1000) break;
    after = page.at(-1)!.name;
  }
  if (ids.length === 0) throw new UnprocessableError('no credential matches the filter; nothing to rotate');
  return ids;
}

async function describeRun(client: Client, run: { credential_id: string; workflow_id: string; run_id: string | null; name: string }) {
  const base = { credentialId: run.credential_id, name: run.name, workflowId: run.workflow_id, runId: run.run_id };
  if (!run.run_id) return { ...base, state: 'not_started' as const, progress: null };
  const handle = client.workflow.getHandle(run.workflow_id, run.run_id);
  let progress: RotationProgress | null = null;
  try {
    progress = await client.connection.withDeadline(Date.now() + 5_000, () => handle.query(progressQuery));
  } catch {
    // No worker to answer the query right now: report what the server knows.
  }
  const status = (await handle.describe()).status.name;
  const state = progress?.state ?? (status === 'RUNNING' ? 'running' : status === 'COMPLETED' ? 'succeeded' : 'failed');
  return { ...base, state, status, progress };
}
