import { WorkflowFailedError } from '@temporalio/client';
import { expect } from 'vitest';
import type { RotationProgress } from '../../workflows/types';
import type { Harness } from '../support/harness';
import { findLeaks } from '../support/leaks';
import { readMailbox, recipients } from '../support/mail';
import type { ProviderServer } from '../support/provider-server';
import { until } from './fixtures';

/**
 * The checks every fault scenario ends with, written once: the rotation finished or was
 * compensated, the provider saw exactly the creates and revokes it should, each outcome was told
 * once, the audit chain verifies, and no secret is anywhere it must not be.
 */

/** One row of the fault summary (test/faults/last-run.md), carried to the reporter in the test's meta. */
export interface FaultRow {
  scenario: string;
  figures: Record<string, string | number>;
}

declare module '@vitest/runner' {
  interface TaskMeta {
    fault?: FaultRow;
  }
}

/** Starts this test's summary row; fill the returned figures as the scenario learns them. */
export function faultRow(task: { meta: { fault?: FaultRow } }, scenario: string): FaultRow['figures'] {
  task.meta.fault = { scenario, figures: {} };
  return task.meta.fault.figures;
}

export type Outcome = 'rotated' | 'failed';

export interface Expected {
  workflowId: string;
  /** rotated = finished (the new value is current); failed = compensated (nothing changed). */
  outcome: Outcome;
  credentialId: string;
  /** The version that must be current afterwards. */
  currentVersion: number;
  provider: ProviderServer;
  /** The provider's counters before the rotation started. */
  before: { creates: number; revokes: number };
  creates: number;
  revokes: number;
  /** Who gets the notices, and the subjects expected, once each. */
  owner: string;
  notices: string[];
  /** A sink the scenario started itself; the run's shared sink otherwise. */
  mailDir?: string;
  /** Reads the current value as the owner (to check it is the one live key at the provider). */
  readCurrent: () => Promise<{ version: number; value: string }>;
  timeoutMs?: number;
}

/** Waits for the run to close: its progress when it succeeded, the failure when it failed. */
export async function settle(h: Harness, workflowId: string, timeoutMs = 120_000): Promise<{ progress?: RotationProgress; error?: unknown }> {
  const handle = h.client.workflow.getHandle(workflowId);
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(async () => {
      const status = await handle.describe().then((d) => d.status.name, (err: Error) => err.message);
      reject(new Error(`${workflowId} did not close within ${timeoutMs} ms (status ${status})`));
    }, timeoutMs);
  });
  try {
    // A rotation requested through the API starts a moment later (its batch starts it).
    const started = until(`${workflowId} to start`, () => handle.describe().then(() => true, () => false), timeoutMs);
    return await Promise.race([started.then(() => handle.result()).then((progress: RotationProgress) => ({ progress }), (error: unknown) => ({ error })), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Runs the common end checks; returns when (Date.now()) the run was seen closed. */
export async function expectSettled(h: Harness, e: Expected): Promise<{ closedAt: number }> {
  const { progress, error } = await settle(h, e.workflowId, e.timeoutMs);
  const closedAt = Date.now();
  if (e.outcome === 'rotated') {
    expect(error, 'the rotation finished').toBeUndefined();
    expect(progress!.state).toBe('succeeded');
  } else {
    expect(error).toBeInstanceOf(WorkflowFailedError);
    expect((error as WorkflowFailedError).cause).toMatchObject({ type: 'RotationFailed' });
  }
  const outcome = await h.sql('SELECT outcome FROM run_outcomes WHERE workflow_id = $1 ORDER BY finished_at DESC LIMIT 1', [e.workflowId]);
  expect(outcome.rows[0]?.outcome).toBe(e.outcome);
  if (e.outcome === 'failed') {
    // Compensated: nothing pending is left behind.
    const row = await h.sql('SELECT pending_version FROM credentials WHERE id = $1', [e.credentialId]);
    expect(row.rows[0].pending_version).toBeNull();
  }

  // The provider minted and revoked exactly what it should, and the vault's current value is its one live key.
  expect({ creates: e.provider.creates - e.before.creates, revokes: e.provider.revokes - e.before.revokes }).toEqual({ creates: e.creates, revokes: e.revokes });
  const current = await e.readCurrent();
  expect(current.version).toBe(e.currentVersion);
  expect(e.provider.isActive(current.value)).toBe(true);
  expect(e.provider.listKeys().filter((k) => k.active)).toHaveLength(1);

  // One notice per outcome: a duplicate (a retried send, a replayed step) would show here.
  const mails = (await readMailbox(e.mailDir)).filter((m) => recipients(m.mail).includes(e.owner));
  expect(mails.map((m) => m.mail.subject).sort()).toEqual([...e.notices].sort());
  expect(new Set(mails.map((m) => m.mail.messageId)).size).toBe(mails.length);

  await expectAuditAndNoLeaks(h);
  return { closedAt };
}

/** The audit chain verifies and no registered secret appears in logs, audit rows, mail or histories. */
export async function expectAuditAndNoLeaks(h: Harness, extraMailDirs: string[] = []): Promise<void> {
  const verify = await h.api('GET', '/v1/audit/verify', { token: h.adminToken });
  expect(verify.status, verify.text).toBe(200);
  expect(verify.body.ok, verify.text).toBe(true);
  expect(await findLeaks(h)).toEqual([]);
  for (const dir of extraMailDirs) {
    for (const m of await readMailbox(dir)) for (const s of h.secrets) expect(m.raw).not.toContain(s);
  }
}
