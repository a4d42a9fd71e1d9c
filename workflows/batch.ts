import { continueAsNew, patched, proxyActivities, workflowInfo } from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { batchStep, databaseStep, emailDelivery, waitsQueue } from './options';
import { BATCH_WAITS_APART, SWEEP_RESUMES_LEAKS } from './patches';

type Activities = ReturnType<typeof createActivities>;
const batch = proxyActivities<Activities>(batchStep);
const db = proxyActivities<Activities>(databaseStep);
const mail = proxyActivities<Activities>(emailDelivery);

/** Where the wait for a batch's outcomes runs: on a task queue of its own (BATCH_WAITS_APART), or the rotations' in a run recorded before. */
function outcomes(): Pick<Activities, 'awaitOutcomes'> {
  return patched(BATCH_WAITS_APART) ? proxyActivities<Activities>({ ...batchStep, taskQueue: waitsQueue(workflowInfo().taskQueue) }) : batch;
}

/** An agent's batch (POST /v1/rotations): start every rotation, wait for the outcomes, send the summary. */
export async function rotateBatch(input: { rotationId: string }): Promise<{ total: number; rotated: number; failed: number }> {
  await batch.startRotations(input);
  const outcome = await outcomes().awaitOutcomes(input);
  await mail.sendBatchSummaries(input);
  return outcome;
}

export interface SweepInput {
  /** Set by the first run; carried through continue-as-new. */
  sweepId?: string;
  asOf?: string;
  after?: { at: string; id: string };
  pageSize?: number;
  retentionDays?: number;
  /** MAIL_RETENTION_DAYS: settled mail older than this loses its recipients, subject and bodies (default 30). */
  mailRetentionDays?: number;
  /** How long after its (last) run started the sweep stops waiting for its rotations' outcomes and sends its summaries (default 45 minutes). */
  waitSeconds?: number;
}

/**
 * A sweep stops waiting for its rotations this long after its (last) run started: one that never
 * ends must not hold every later sweep (the schedule skips a sweep while one runs, and the next
 * sweep joins the same stuck run). Under the default hourly schedule's hour, so no sweep is skipped.
 */
const SWEEP_WAIT_SECONDS = 45 * 60;

/** Pages per run before continuing as new: keeps each run's history small at 100,000 credentials. */
const PAGES_PER_RUN = 25;

/**
 * The scheduled sweep: leak incidents whose rotation never started are started; due credentials (age ≥ periodDays, or expiring within the lead time) are
 * selected page by page with one index scan each, their rotations started in bounded batches; then
 * the password policies, expiry reminders and retention run, and each team gets one summary.
 */
export async function rotationSweep(input: SweepInput = {}): Promise<{ sweepId: string; total: number; rotated: number; failed: number; open?: number }> {
  const asOf = input.asOf ?? workflowInfo().startTime.toISOString();
  const pageSize = input.pageSize ?? 500;
  // Leaks first: an incident whose report died before starting its rotation has waited since.
  if (!input.sweepId && patched(SWEEP_RESUMES_LEAKS)) await batch.resumeLeakIncidents({ asOf });
  const sweepId = input.sweepId ?? (await db.beginSweep({ workflowId: workflowInfo().workflowId, asOf })).sweepId;
  let after = input.after;
  for (let page = 0; page < PAGES_PER_RUN; page++) {
    const selected = await db.selectDue({ sweepId, asOf, after, limit: pageSize });
    if (selected.selected > 0) await batch.startRotations({ rotationId: sweepId });
    after = selected.next;
    if (!after) break;
  }
  if (after) await continueAsNew<typeof rotationSweep>({ ...input, sweepId, asOf, after, pageSize });

  await batch.enforcePasswordPolicies({ sweepId, asOf });
  await batch.startRotations({ rotationId: sweepId });
  // (Only the activity's input changes with `until`, not the commands the workflow issues: replay is unaffected.)
  const until = new Date(workflowInfo().runStartTime.getTime() + (input.waitSeconds ?? SWEEP_WAIT_SECONDS) * 1000).toISOString();
  const outcome = await outcomes().awaitOutcomes({ rotationId: sweepId, until });
  await mail.sendBatchSummaries({ rotationId: sweepId });
  await mail.sendExpiryReminders({ asOf });
  await db.purgeDeleted({ asOf, retentionDays: input.retentionDays ?? 30, mailRetentionDays: input.mailRetentionDays ?? 30 });
  return { sweepId, ...outcome };
}

/** The weekly report of service accounts nobody seems to use. */
export async function orphanReport(input: { days?: number } = {}): Promise<{ sent: number }> {
  return mail.sendOrphanReports({ asOf: workflowInfo().startTime.toISOString(), days: input.days ?? 30 });
}
