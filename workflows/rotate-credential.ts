import {
  ApplicationFailure,
  CancellationScope,
  condition,
  continueAsNew,
  isCancellation,
  proxyActivities,
  setHandler,
  workflowInfo,
} from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { leakSignal, progressQuery, rollbackUpdate } from './definitions';
import { compensation, databaseStep, emailDelivery, externalCall } from './options';
import type { NoticeKind, RotationMode, RotationOutcome, RotationProgress, StepName } from './types';

type Activities = ReturnType<typeof createActivities>;
const external = proxyActivities<Activities>(externalCall);
const undo = proxyActivities<Activities>(compensation);
const db = proxyActivities<Activities>(databaseStep);
const mail = proxyActivities<Activities>(emailDelivery);

export interface RotateCredentialInput {
  rotationId: string;
  identityId: string;
  credentialId: string;
  mode?: RotationMode;
  /** Attempts made by earlier runs of this rotation (continue-as-new): keeps each attempt's idempotency key unique. */
  attemptsBefore?: number;
}

const STEPS: StepName[] = ['create_pending', 'apply_dependents', 'verify', 'compensate', 'promote', 'notify', 'grace', 'revoke_previous'];

/**
 * Rotates one credential: create pending → apply to dependents → verify → promote → grace →
 * revoke previous, with a notice for every outcome. A failure before promote undoes what was done
 * (dependents restored, pending discarded at the provider) and tries again with a new value, up to
 * the policy's maxAttempts; then the rotation fails and the owners are told. A leak signal skips
 * the grace period; a rollback update (during grace) makes the previous version current again;
 * cancelling compensates the same way.
 */
export async function rotateCredential(input: RotateCredentialInput): Promise<RotationProgress> {
  const ids = { rotationId: input.rotationId, identityId: input.identityId, credentialId: input.credentialId, workflowId: workflowInfo().workflowId };
  const progress: RotationProgress = {
    state: 'running',
    mode: input.mode ?? 'requested',
    attempt: input.attemptsBefore ?? 0,
    steps: STEPS.map((name) => ({ name, state: 'waiting' })),
  };
  let leak = progress.mode === 'leak';
  let rollbackRequested = false;
  let rolledBack: { current: number; abandoned: number } | undefined;
  setHandler(progressQuery, () => progress);
  const leakedVersions = new Set<number>();
  setHandler(leakSignal, ({ version }) => {
    leak = true;
    progress.leakReported = true;
    if (version !== undefined) leakedVersions.add(version);
  });
  setHandler(
    rollbackUpdate,
    async () => {
      rollbackRequested = true;
      await condition(() => rolledBack !== undefined || progress.state !== 'grace');
      if (!rolledBack) throw ApplicationFailure.create({ type: 'RollbackNotPossible', message: 'the rotation left its grace period before the rollback ran' });
      return rolledBack;
    },
    {
      validator: () => {
        // The state stays 'grace' until the rollback has finished: without this a second request would be answered as a success.
        if (rollbackRequested) throw new Error('a rollback was already requested; the previous version is current again');
        if (progress.state !== 'grace') throw new Error(`rollback is possible only during the grace period; the rotation is ${progress.state}`);
      },
    },
  );

  const step = async <T>(name: StepName, run: () => Promise<T>): Promise<T> => {
    const entry = progress.steps.find((s) => s.name === name)!;
    entry.state = 'running';
    entry.attempt = progress.attempt;
    delete entry.error;
    try {
      const result = await run();
      entry.state = 'done';
      return result;
    } catch (err) {
      entry.state = 'failed';
      entry.error = failureMessage(err);
      throw err;
    }
  };
  const skip = (...names: StepName[]) => names.forEach((n) => (progress.steps.find((s) => s.name === n)!.state = 'skipped'));
  const finish = async (outcome: RotationOutcome, notice: NoticeKind, error?: string) => {
    progress.error = error ?? progress.error;
    await CancellationScope.nonCancellable(async () => {
      await db.recordOutcome({ ...ids, outcome, fromVersion: progress.fromVersion, toVersion: progress.toVersion, error: progress.error });
      // An open leak incident would make later reports only join it: close it, so they rotate again.
      await db.closeLeakIncidents(ids);
      await step('notify', () =>
        mail.sendRotationNotice({
          ...ids,
          outcome: notice,
          mode: progress.mode,
          fromVersion: progress.fromVersion,
          toVersion: progress.toVersion,
          graceEndsAt: progress.graceEndsAt,
          error: progress.error,
          step: progress.steps.find((s) => s.state === 'failed')?.name,
        }),
      );
    });
    progress.state = outcome === 'rotated' ? 'succeeded' : outcome;
  };

  let plan: Awaited<ReturnType<typeof db.planRotation>>;
  try {
    plan = await db.planRotation(ids);
  } catch (err) {
    // Nothing was changed yet: record the failure, tell the owners, fail the run.
    progress.error = failureMessage(err);
    await db.markRotationState({ ...ids, status: 'rotation_failed' });
    skip('create_pending', 'apply_dependents', 'verify', 'compensate', 'promote', 'grace', 'revoke_previous');
    await finish('failed', 'failed');
    throw ApplicationFailure.create({ type: 'RotationFailed', message: progress.error, nonRetryable: true });
  }
  let pending: { version: number; basedOn: number } | undefined;

  // create → apply → verify, with a fresh value on every attempt.
  for (;;) {
    progress.attempt += 1;
    const undoStack: { what: string; run: () => Promise<unknown> }[] = [];
    const attempt = progress.attempt;
    try {
      undoStack.push({ what: 'discard attempt', run: () => undo.discardAttempt({ ...ids, attempt, current: plan.currentVersion }) });
      const staged = await step('create_pending', () => external.createPendingVersion({ ...ids, attempt }));
      pending = staged;
      progress.fromVersion = staged.basedOn;
      progress.toVersion = staged.version;
      if (plan.dependents.length === 0) skip('apply_dependents');
      else {
        await step('apply_dependents', async () => {
          for (const dependent of plan.dependents) {
            // Restore is pushed first: a dependent that failed half-way is put back too (restore is idempotent).
            undoStack.push({ what: `restore ${dependent.type}`, run: () => undo.restoreDependent({ ...ids, index: dependent.index, version: staged.basedOn }) });
            await external.applyDependent({ ...ids, index: dependent.index, version: staged.version });
          }
        });
      }
      await step('verify', async () => {
        await external.verifyVersion({ ...ids, version: staged.version });
        for (const dependent of plan.dependents) await external.verifyDependent({ ...ids, index: dependent.index, version: staged.version });
      });
      if (progress.steps.find((s) => s.name === 'compensate')!.state === 'waiting') skip('compensate');
      break;
    } catch (err) {
      progress.error = failureMessage(err);
      const cancelled = isCancellation(err);
      await CancellationScope.nonCancellable(() => step('compensate', () => runUndo(undoStack)));
      if (cancelled) {
        await CancellationScope.nonCancellable(() => db.markRotationState({ ...ids, status: 'active' }));
        await finish('cancelled', 'cancelled', 'the rotation was cancelled');
        return progress;
      }
      if (progress.attempt - (input.attemptsBefore ?? 0) >= plan.maxAttempts || isPermanent(err)) {
        await db.markRotationState({ ...ids, status: 'rotation_failed' });
        await finish('failed', 'failed');
        throw ApplicationFailure.create({ type: 'RotationFailed', message: progress.error, nonRetryable: true });
      }
    }
  }

  // From here on the new version is live: finish promotion even if a cancel arrives meanwhile.
  const promoted = await CancellationScope.nonCancellable(async () => {
    const result = await step('promote', () => db.promotePendingVersion({ ...ids, version: pending!.version }));
    await external.dependentsPromoted({ ...ids, version: pending!.version });
    await db.recordOutcome({ ...ids, outcome: 'rotated', fromVersion: progress.fromVersion, toVersion: progress.toVersion });
    return result;
  });

  if (leak || plan.graceSeconds === 0) {
    // No grace: the old value stops working now, then the owners hear about both.
    skip('grace');
    await revokePrevious();
    await closeOut();
    return progress;
  }

  progress.graceEndsAt = new Date(Date.parse(promoted.promotedAt) + plan.graceSeconds * 1000).toISOString();
  await step('notify', () =>
    mail.sendRotationNotice({ ...ids, outcome: 'rotated', mode: progress.mode, fromVersion: progress.fromVersion, toVersion: progress.toVersion, graceEndsAt: progress.graceEndsAt }),
  );
  progress.state = 'grace';
  let cancelled = false;
  await step('grace', async () => {
    try {
      await condition(() => leak || rollbackRequested, plan.graceSeconds * 1000);
    } catch (err) {
      if (!isCancellation(err)) throw err;
      cancelled = true;
    }
  });

  if (rollbackRequested || cancelled) {
    // The rotated version is abandoned: dependents go back, the vault points back, the provider forgets it.
    await CancellationScope.nonCancellable(async () => {
      for (const dependent of plan.dependents) await undo.restoreDependent({ ...ids, index: dependent.index, version: progress.fromVersion! });
      rolledBack = await db.rollbackVersion({ ...ids, version: progress.toVersion! });
      await undo.revokeVersion({ ...ids, version: progress.toVersion! });
    });
    skip('revoke_previous');
    await finish('rolled_back', 'rolled_back', cancelled ? 'the rotation was cancelled during its grace period' : 'rolled back on request');
    return progress;
  }

  progress.state = 'running';
  await revokePrevious();
  if (leak && progress.steps.find((s) => s.name === 'revoke_previous')!.state === 'done') {
    // The grace notice said the previous version keeps working until graceEndsAt, and the leak
    // alert promised a notice when the rotation is done: tell the owners (and security) it is revoked.
    await mail.sendRotationNotice({ ...ids, outcome: 'rotated', mode: 'leak', fromVersion: progress.fromVersion, toVersion: progress.toVersion });
  }
  await closeOut();
  return progress;

  async function revokePrevious(): Promise<void> {
    try {
      await CancellationScope.nonCancellable(() => step('revoke_previous', () => external.revokeVersion({ ...ids, version: progress.fromVersion! })));
    } catch (err) {
      // The new value is live and stays so; the owners must revoke the old one by hand.
      progress.error = failureMessage(err);
      await mail.sendRotationNotice({ ...ids, outcome: 'revoke_failed', mode: progress.mode, fromVersion: progress.fromVersion, toVersion: progress.toVersion, error: progress.error });
    }
  }

  async function closeOut(): Promise<void> {
    if (progress.toVersion !== undefined && leakedVersions.has(progress.toVersion)) {
      // The value this rotation made current was itself reported leaked: rotate again, in leak mode.
      await continueAsNew<typeof rotateCredential>({ ...input, mode: 'leak', attemptsBefore: progress.attempt });
    }
    await CancellationScope.nonCancellable(async () => {
      await db.closeLeakIncidents(ids);
      if (progress.steps.find((s) => s.name === 'notify')!.state === 'waiting') {
        await step('notify', () =>
          mail.sendRotationNotice({ ...ids, outcome: 'rotated', mode: progress.mode, fromVersion: progress.fromVersion, toVersion: progress.toVersion }),
        );
      }
    });
    progress.state = 'succeeded';
  }
}

async function runUndo(stack: { what: string; run: () => Promise<unknown> }[]): Promise<void> {
  for (const item of [...stack].reverse()) await item.run();
}

function isPermanent(err: unknown): boolean {
  let e = err as { nonRetryable?: boolean; cause?: unknown; type?: string } | undefined;
  while (e) {
    if (e.type === 'unprocessable' || e.type === 'not-found' || e.type === 'version-conflict') return true;
    e = e.cause as typeof e;
  }
  return false;
}

/** The innermost message of a failure chain (ActivityFailure → ApplicationFailure). */
function failureMessage(err: unknown): string {
  let e = err as { message?: string; cause?: unknown } | undefined;
  while (e?.cause) e = e.cause as typeof e;
  return e?.message ?? String(err);
}
