import { ApplicationFailure, defineQuery, proxyActivities, setHandler, workflowInfo } from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { databaseStep, emailDelivery, providerCall } from './options';
import type { RotationProgress, StepName } from './types';

type Activities = ReturnType<typeof createActivities>;
const provider = proxyActivities<Activities>(providerCall);
const db = proxyActivities<Activities>(databaseStep);
const mail = proxyActivities<Activities>(emailDelivery);

export const progressQuery = defineQuery<RotationProgress>('progress');

export interface RotateCredentialInput {
  rotationId: string;
  identityId: string;
  credentialId: string;
}

/**
 * Rotates one credential: create a pending version → promote it (the old one becomes previous)
 * → tell the owners. A failure before promote discards the pending version, marks the
 * credential rotation_failed, tells the owners, and fails the run.
 */
export async function rotateCredential(input: RotateCredentialInput): Promise<RotationProgress> {
  const ids = { ...input, workflowId: workflowInfo().workflowId };
  const progress: RotationProgress = {
    state: 'running',
    steps: (['create_pending', 'promote', 'compensate', 'notify'] as StepName[]).map((name) => ({ name, state: 'waiting' })),
  };
  setHandler(progressQuery, () => progress);

  const step = async <T>(name: StepName, run: () => Promise<T>): Promise<T> => {
    const entry = progress.steps.find((s) => s.name === name)!;
    entry.state = 'running';
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

  // The run reports its outcome only once the notice is out, so "succeeded" means finished.
  let outcome: 'succeeded' | 'failed';
  try {
    const pending = await step('create_pending', () => provider.createPendingVersion(ids));
    progress.fromVersion = pending.basedOn;
    progress.toVersion = pending.version;
    await step('promote', () => db.promotePendingVersion({ ...ids, version: pending.version }));
    progress.steps.find((s) => s.name === 'compensate')!.state = 'skipped';
    outcome = 'succeeded';
  } catch (err) {
    progress.error = failureMessage(err);
    await step('compensate', () => db.discardPendingVersion({ ...ids, version: progress.toVersion ?? null }));
    outcome = 'failed';
  }

  await step('notify', () =>
    mail.sendRotationNotice({
      ...ids,
      outcome: outcome === 'succeeded' ? 'rotated' : 'failed',
      fromVersion: progress.fromVersion,
      toVersion: progress.toVersion,
      error: progress.error,
    }),
  );
  progress.state = outcome;
  if (outcome === 'failed') {
    throw ApplicationFailure.create({ type: 'RotationFailed', message: progress.error ?? 'rotation failed', nonRetryable: true });
  }
  return progress;
}

/** The innermost message of a failure chain (ActivityFailure → ApplicationFailure). */
function failureMessage(err: unknown): string {
  let e = err as { message?: string; cause?: unknown } | undefined;
  while (e?.cause) e = e.cause as typeof e;
  return e?.message ?? String(err);
}
