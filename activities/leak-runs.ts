import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { UnavailableError } from '../core/errors';
import { withTransaction, type Pool } from '../db/pool';
import { startDelivery } from '../mail/outbox';
import { leakSignal } from '../workflows/definitions';
import type { rotateCredential } from '../workflows/rotate-credential';
import type { ActivityDeps } from './index';
import { heartbeat, incidentMailId, stableUuid } from './support';

/** The workflow that rotates a credential (one at a time). */
export const rotationWorkflowId = (credentialId: string) => `rotate:${credentialId}`;

/** The leak of another version than its incident's, as the run hears it: one id per incident and version, so a repeated report is one signal. */
export const versionLeakId = (incidentId: string, version: number) => stableUuid(`${incidentId}:version:${version}`);

/**
 * Starts the credential's rotation in leak mode for an incident (or, one running, signals it) and
 * records the run on the incident's rotation. Safe to repeat: a run hears an incident once.
 * `leftOver`: a version an earlier incident left live, for this run to revoke too. `onlyRunning`:
 * for a credential that is not rotated (deleted, or without a rotation policy) but whose rotation
 * was running when the report looked: that run is signalled, and none is started: false when it
 * has ended since (a leak run started for it would fail at its first step, its emails saying
 * rotating, then failed).
 */
export async function startLeakRun(
  deps: { pool: Pool; client: Client; taskQueue: string },
  t: { credentialId: string; identityId: string },
  rotationId: string,
  incidentId: string,
  version: number,
  leftOver?: number,
  onlyRunning = false,
): Promise<boolean> {
  const signaledRunId = onlyRunning ? await signalRunning(deps.client, t.credentialId, incidentId, version, leftOver) : await signalOrStart(deps, t, rotationId, incidentId, version, leftOver);
  if (signaledRunId === undefined) return false;
  await deps.pool.query('UPDATE rotation_runs SET run_id = $2 WHERE rotation_id = $1 AND run_id IS NULL', [rotationId, signaledRunId]);
  return true;
}

/** Signals the credential's rotation in leak mode, starting it if none runs; the run signalled. */
async function signalOrStart(
  deps: { client: Client; taskQueue: string },
  t: { credentialId: string; identityId: string },
  rotationId: string,
  incidentId: string,
  version: number,
  leftOver?: number,
): Promise<string> {
  try {
    const handle = await deps.client.workflow.signalWithStart<typeof rotateCredential, [{ incidentId: string; version?: number }]>('rotateCredential', {
      taskQueue: deps.taskQueue,
      workflowId: rotationWorkflowId(t.credentialId),
      args: [{ rotationId, identityId: t.identityId, credentialId: t.credentialId, mode: 'leak', ...(leftOver !== undefined ? { leakedVersions: [leftOver] } : {}) }],
      signal: leakSignal,
      signalArgs: [{ incidentId, version }],
    });
    // A run already going took the signal, not the input: it hears the left-over version as a report of its own.
    if (leftOver !== undefined) await handle.signal(leakSignal, { incidentId: versionLeakId(incidentId, leftOver), version: leftOver });
    return handle.signaledRunId;
  } catch {
    throw new UnavailableError('the leak rotation could not be started (Temporal is unavailable); report again shortly');
  }
}

/** Signals the credential's rotation if a run of it is going, by that run's id; undefined when none is (or it ended meanwhile). */
async function signalRunning(client: Client, credentialId: string, incidentId: string, version: number, leftOver?: number): Promise<string | undefined> {
  try {
    const running = await client.workflow.getHandle(rotationWorkflowId(credentialId)).describe();
    if (running.status.name !== 'RUNNING') return undefined;
    // That run, by its id: one ended meanwhile is not found (nor a later one signalled in its stead).
    const run = client.workflow.getHandle(running.workflowId, running.runId);
    await run.signal(leakSignal, { incidentId, version });
    if (leftOver !== undefined) await run.signal(leakSignal, { incidentId: versionLeakId(incidentId, leftOver), version: leftOver });
    return running.runId;
  } catch (err) {
    if (err instanceof WorkflowNotFoundError) return undefined;
    throw new UnavailableError('the leak could not be passed to the running rotation (Temporal is unavailable); report again shortly');
  }
}

/**
 * An open incident whose run is not running, and whose run was never recorded as started, is left
 * over (its starter died) only once it is older than this: a run is started within moments of its
 * incident's commit. One whose run was started is left over as soon as no run is running.
 */
export const STALE_INCIDENT_SECONDS = 60;

/** Incidents a sweep starts at most (the next sweep starts the rest). */
const RESUMED_PER_SWEEP = 200;

export function leakActivities(deps: ActivityDeps) {
  return {
    /**
     * Open leak incidents whose rotation was never started: their report's process died (or lost
     * Temporal) between the incident's commit and the start, and its reporter, told nothing or told
     * to report again, never did. Nothing else would start them (a later report of the credential
     * would), and the leaked value would stay live with nobody told. The sweep starts each one's
     * leak rotation as its report would have (a run going meanwhile is signalled instead) and hands
     * its incident email over. Only incidents older than STALE_INCIDENT_SECONDS: a younger one's
     * report may still be starting it.
     */
    async resumeLeakIncidents(input: { asOf: string }): Promise<{ started: number }> {
      if (!deps.temporal) throw new Error('no Temporal client here for starting leak rotations');
      const temporal = deps.temporal;
      const { rows } = await deps.pool.query(
        `SELECT i.id, i.credential_id, i.identity_id, i.version, i.rotation_id
           FROM leak_incidents i JOIN rotation_runs r ON r.rotation_id = i.rotation_id AND r.credential_id = i.credential_id
          WHERE i.status = 'open' AND r.run_id IS NULL AND i.opened_at < $1::timestamptz - make_interval(secs => $2)
          ORDER BY i.opened_at LIMIT ${RESUMED_PER_SWEEP}`,
        [input.asOf, STALE_INCIDENT_SECONDS],
      );
      let started = 0;
      for (const row of rows) {
        heartbeat();
        // Under the incident's row lock, checked again: a report replacing it meanwhile (closing it in
        // the transaction that opens its successor, its email abandoned there) waits for this, or this
        // finds it closed and leaves it.
        await withTransaction(deps.pool, async (tx) => {
          const still = await tx.query(
            `SELECT 1 FROM leak_incidents i JOIN rotation_runs r ON r.rotation_id = i.rotation_id AND r.credential_id = i.credential_id
              WHERE i.id = $1 AND i.status = 'open' AND r.run_id IS NULL FOR UPDATE OF i SKIP LOCKED`,
            [row.id],
          );
          if (still.rowCount === 0) return;
          await startLeakRun({ pool: deps.pool, ...temporal }, { credentialId: row.credential_id, identityId: row.identity_id }, row.rotation_id, row.id, row.version);
          await startDelivery(deps.pool, temporal, incidentMailId(row.id));
          started += 1;
        });
      }
      return { started };
    },
  };
}
