import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { WorkflowNotFoundError, type ScheduleHandle, type WorkflowHandle } from '@temporalio/client';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createActivities } from '../activities';
import { REFUSED_NOTICE } from '../activities/notices';
import { passwordNoticeIds } from '../activities/policies';
import { planNodes } from '../bench/sweep';
import { recordBatchRun } from '../db/run-outcome';
import { ConfigError } from '../core/config';
import { queueMail } from '../mail/outbox';
import { checkPolicy } from '../providers';
import { ensureSchedules, ORPHAN_SCHEDULE_ID, scheduleId, SWEEP_SCHEDULE_ID } from '../worker/schedules';
import { expectCleanRun } from './support/leaks';
import { holdTable, waitFor } from './support/lifecycle-fixtures';
import { startHarness, type Harness } from './support/harness';
import { readMailbox, recipients, type StoredMail } from './support/mail';

/**
 * The scheduled side, end to end against the real Temporal server, worker, PostgreSQL and SMTP
 * sink: the sweep (started by its Schedule or directly), rotation windows, the indexed selection,
 * continue-as-new, expiry reminders, password policies, the service-account report and retention.
 * Credentials are aged by backdating their current version; the triggers recompute next_rotation_at.
 */

/** The sweep's page query, copied from activities/batch.ts (selectDue); the index test checks the copy is current. */
const SELECT_DUE_SQL = `SELECT id, to_char(next_rotation_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS at, rotation->'window' AS window FROM credentials
          WHERE deleted_at IS NULL AND next_rotation_at IS NOT NULL AND next_rotation_at <= $1
            AND ($2::timestamptz IS NULL OR (next_rotation_at, id) > ($2::timestamptz, $3::uuid))
            AND NOT (status = 'rotation_failed' AND updated_at > $1::timestamptz - make_interval(hours => $5))
            AND NOT EXISTS (SELECT 1 FROM run_outcomes o WHERE o.credential_id = credentials.id AND o.outcome <> 'rotated'
                              AND o.finished_at > $1::timestamptz - make_interval(hours => $5))
          ORDER BY next_rotation_at, id
          LIMIT $4`;

const SUMMARY_SUBJECT = '[mailgent] Scheduled rotation';
const ROTATE_NOW = { provider: 'generated', periodDays: 30, graceHours: 0 };

type SweepResult = { sweepId: string; total: number; rotated: number; failed: number };
type HistoryEvents = NonNullable<Awaited<ReturnType<WorkflowHandle['fetchHistory']>>['events']>;

describe('scheduled sweep', () => {
  let h: Harness;
  const security = `sec-${randomUUID().slice(0, 8)}@example.com`;
  let schedulesMade = false;

  const unique = (prefix: string) => `${prefix}-${randomUUID().slice(0, 8)}`;
  const address = (prefix: string) => `${unique(prefix)}@example.com`;
  const secretValue = (prefix = 'v') => h.secret(`${prefix}_${randomBytes(12).toString('hex')}`);

  let identities: string[] = [];
  const identity = async (email?: string) => {
    const created = await h.createIdentity(unique('sweeper'), email);
    identities.push(created.id);
    return created;
  };

  const store = async (token: string, body: { name: string; kind: string; value?: string } & Record<string, unknown>): Promise<string> => {
    if (body.value) h.secret(body.value);
    const res = await h.api('POST', '/v1/vault.store', { token, body });
    if (res.status !== 201) throw new Error(`storing '${body.name}' failed: ${res.status} ${res.text}`);
    return res.body.id as string;
  };
  const read = async (token: string, name: string) => {
    const res = await h.api('POST', '/v1/vault.get', { token, body: { name } });
    if (res.status !== 200) throw new Error(`reading '${name}' failed: ${res.status} ${res.text}`);
    h.secret(res.body.value as string);
    return res.body as { id: string; version: number; value: string };
  };
  const listed = async (token: string) => {
    const res = await h.api('GET', '/v1/credentials', { token });
    expect(res.status).toBe(200);
    return res.body.items as { id: string; name: string; version: number; nextRotationAt: string | null; status: string }[];
  };

  /** Gives a stored totp_seed a rotation policy, as one stored before vault.store refused that has. */
  const seedWithPolicy = async (id: string, policy: typeof ROTATE_NOW) => {
    const { rowCount } = await h.sql('UPDATE credentials SET rotation = $2 WHERE id = $1 AND kind = $3', [id, JSON.stringify(checkPolicy({ settings: {}, ...policy })), 'totp_seed']);
    expect(rowCount).toBe(1);
    return id;
  };
  /** A message in the outbox queued `daysAgo` (sent then, unless `status` says otherwise, after one attempt); its id. */
  const settledMail = async (m: { daysAgo: number; status?: 'sent' | 'abandoned' | 'queued'; refused?: string[]; lastError?: string; html?: string; attempts?: number }) => {
    const id = randomUUID();
    const status = m.status ?? 'sent';
    await h.sql(
      `INSERT INTO mail_outbox (id, purpose, recipients, subject, text_body, html_body, status, attempts, refused, last_error, created_at, sent_at)
       VALUES ($1, 'rotation.notice', '{ops@example.com}', 'the subject', 'the body', $2, $3, $4, $5, $6,
               now() - make_interval(days => $7), CASE WHEN $3 = 'sent' THEN now() - make_interval(days => $7) END)`,
      [id, m.html ?? null, status, m.attempts ?? 1, m.refused ?? [], m.lastError ?? null, m.daysAgo],
    );
    return id;
  };
  /** Whether each message's recipients, subject and bodies were erased. */
  const erasedOf = async (ids: string[]) => {
    const { rows: found } = await h.sql(`SELECT id, erased_at IS NOT NULL AND subject = '' AND recipients = '{}' AS erased FROM mail_outbox WHERE id = ANY($1::uuid[])`, [ids]);
    return ids.map((id) => found.find((r) => r.id === id)?.erased);
  };
  /** Soft-deletes a credential over the API, then dates the delete 40 days back: past a 30-day retention. */
  const deletedLongAgo = async (token: string, name: string, id: string) => {
    expect((await h.api('DELETE', `/v1/credentials/${name}`, { token })).status).toBe(200);
    await h.sql(`UPDATE credentials SET deleted_at = now() - interval '40 days' WHERE id = $1`, [id]);
  };
  /** Backdates the current version of each credential by `days`; the triggers move next_rotation_at. */
  const age = async (ids: string[], days: number) => {
    const { rowCount } = await h.sql(
      `UPDATE secret_versions v SET created_at = now() - make_interval(days => $2)
         FROM credentials c WHERE c.id = v.credential_id AND v.version = c.current_version AND c.id = ANY($1::uuid[])`,
      [ids, days],
    );
    expect(rowCount).toBe(ids.length);
  };
  const rows = async (ids: string[]) => {
    const { rows: found } = await h.sql(
      'SELECT id, name, current_version, status, next_rotation_at, deleted_at, destroyed_at FROM credentials WHERE id = ANY($1::uuid[])',
      [ids],
    );
    return new Map(found.map((r) => [r.name as string, r]));
  };
  const versions = async (ids: string[]) => Object.fromEntries([...(await rows(ids))].map(([name, r]) => [name, r.current_version as number]));

  const mailTo = async (to: string, subjectPrefix = ''): Promise<StoredMail[]> =>
    (await readMailbox()).filter((m) => recipients(m.mail).includes(to) && (m.mail.subject ?? '').startsWith(subjectPrefix));

  /** Every run of a workflow, following continue-as-new from the first run, with its history. */
  const runChain = async (workflowId: string, firstRunId: string) => {
    const runs: { runId: string; events: HistoryEvents }[] = [];
    for (let runId: string | undefined = firstRunId; runId; ) {
      const events: HistoryEvents = (await h.client.workflow.getHandle(workflowId, runId).fetchHistory()).events ?? [];
      runs.push({ runId, events });
      runId = events.at(-1)?.workflowExecutionContinuedAsNewEventAttributes?.newExecutionRunId ?? undefined;
    }
    return runs;
  };

  /** Until every queued message has been delivered: a sweep hands its notices to delivery workflows of their own. */
  const delivered = () =>
    waitFor(
      'the queued notices to be delivered',
      async () => (await h.sql("SELECT count(*)::int AS n FROM mail_outbox WHERE status = 'queued'")).rows[0].n as number,
      (n) => n === 0,
    );

  /** The workflow's result (following continue-as-new) once its notices are delivered, or a clear failure after `ms`; a run that overstays is terminated. */
  const finish = async <T>(what: string, workflowId: string, firstRunId: string, ms = 45_000): Promise<T> => {
    const handle = h.client.workflow.getHandle(workflowId, firstRunId);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), ms)));
    try {
      const outcome = await Promise.race([handle.result() as Promise<T>, timedOut]);
      if (outcome !== 'timeout') {
        await delivered();
        return outcome;
      }
    } finally {
      clearTimeout(timer);
    }
    const runs = await runChain(workflowId, firstRunId);
    await h.client.workflow.getHandle(workflowId).terminate(`${what} overran the test's limit`);
    throw new Error(`${what} (${workflowId}) did not finish within ${ms} ms; it had made ${runs.length} runs (${runs.map((r) => r.events.length).join(', ')} events)`);
  };

  const sweep = async (args: Record<string, unknown> = {}, ms?: number) => {
    const workflowId = unique('sweep-test');
    const handle = await h.client.workflow.start('rotationSweep', { taskQueue: h.taskQueue, workflowId, args: [args] });
    const result = await finish<SweepResult>('the sweep', workflowId, handle.firstExecutionRunId, ms);
    return { ...result, workflowId, firstRunId: handle.firstExecutionRunId };
  };
  const sweptIds = async (sweepId: string) =>
    (await h.sql('SELECT credential_id FROM rotation_runs WHERE rotation_id = $1', [sweepId])).rows.map((r) => r.credential_id as string).sort();

  /** The service's schedules on this file's task queue, made once (the first test that needs them). */
  const schedules = async () => {
    const made = {
      sweep: h.client.schedule.getHandle(scheduleId(SWEEP_SCHEDULE_ID, h.taskQueue)),
      orphans: h.client.schedule.getHandle(scheduleId(ORPHAN_SCHEDULE_ID, h.taskQueue)),
    };
    if (!schedulesMade) {
      await ensureSchedules(h.client, { taskQueue: h.taskQueue, sweepCron: '0 3 * * *', orphanCron: '0 6 * * 1', orphanDays: 30, retentionDays: 30, mailRetentionDays: 7 });
      schedulesMade = true;
      const { info } = await made.sweep.describe();
      expect(info.nextActionTimes[0]?.toISOString(), 'the sweep runs daily at 03:00 UTC').toMatch(/T03:00:00\.000Z$/);
      const next = (await made.orphans.describe()).info.nextActionTimes[0];
      expect([next?.getUTCDay(), next?.toISOString().slice(11)], 'the orphan report runs on Mondays at 06:00 UTC').toEqual([1, '06:00:00.000Z']);
      // Paused, so that the wall clock cannot start a run in the middle of a test; a trigger still runs at once.
      await made.sweep.pause('paused by test/sweep.test.ts');
      await made.orphans.pause('paused by test/sweep.test.ts');
    }
    return made;
  };
  /**
   * Triggers the schedule now and returns the workflow it started. Actions are told apart by run id:
   * the schedule names its workflows to the second, so two triggers within a second share a workflow id.
   */
  const trigger = async (schedule: ScheduleHandle) => {
    const before = new Set((await schedule.describe()).info.recentActions.map((a) => a.action.workflow.firstExecutionRunId));
    await schedule.trigger();
    const deadline = Date.now() + 20_000;
    for (;;) {
      const { info } = await schedule.describe();
      const started = info.recentActions.find((a) => !before.has(a.action.workflow.firstExecutionRunId));
      if (started) return started.action.workflow;
      if (Date.now() > deadline) {
        const { numActionsTaken, numActionsSkippedOverlap, numActionsMissedCatchupWindow, runningActions, recentActions } = info;
        throw new Error(
          `schedule ${schedule.scheduleId} started no workflow within 20 s of the trigger: ${JSON.stringify({ numActionsTaken, numActionsSkippedOverlap, numActionsMissedCatchupWindow, runningActions, recentActions })}`,
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  };

  beforeAll(async () => {
    h = await startHarness({ worker: true, securityNotify: [security] });
  });
  // Every sweep spans the whole database: what a test leaves behind (a failed or deferred rotation, an
  // over-age password) is soft-deleted after it, so that the next test's sweep sees only its own credentials.
  afterEach(async () => {
    await h.sql('UPDATE credentials SET deleted_at = now() WHERE identity_id = ANY($1::uuid[]) AND deleted_at IS NULL', [identities]);
    identities = [];
  });
  afterAll(async () => {
    if (schedulesMade) {
      await h.client.schedule.getHandle(scheduleId(SWEEP_SCHEDULE_ID, h.taskQueue)).delete();
      await h.client.schedule.getHandle(scheduleId(ORPHAN_SCHEDULE_ID, h.taskQueue)).delete();
    }
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('a cron the Temporal server refuses stops start-up with the setting named', async () => {
    const refused = await ensureSchedules(h.client, { taskQueue: `${h.taskQueue}-badcron`, sweepCron: '0 6 1 * ?', orphanCron: '0 6 * * 1', orphanDays: 30, retentionDays: 30 }).catch((e) => e);
    expect(refused).toBeInstanceOf(ConfigError);
    expect(refused.problems).toEqual([expect.stringMatching(/^SWEEP_CRON: the Temporal server refused it: .*DayOfWeek/)]);
  });

  it('the rotation-sweep schedule, triggered on demand, rotates only due credentials and mails one summary per team address', async () => {
    const { sweep: schedule } = await schedules();
    const described = await schedule.describe();
    expect(described.action).toMatchObject({ type: 'startWorkflow', workflowType: 'rotationSweep', taskQueue: h.taskQueue, args: [{ retentionDays: 30, mailRetentionDays: 7 }] });
    expect(described.policies.overlap).toBe('SKIP');

    const teamA = address('team-a');
    const teamB = address('team-b');
    const agentEmail = address('sweep-agent');
    const agent = await identity(agentEmail);
    const policy = { ...ROTATE_NOW, settings: { length: 40, prefix: 'sk_' } };
    const ids = {
      dueA1: await store(agent.token, { name: 'due-a1', kind: 'api_key', value: secretValue('sk'), owners: [teamA], rotation: policy }),
      dueA2: await store(agent.token, { name: 'due-a2', kind: 'api_key', value: secretValue('sk'), owners: [teamA], rotation: policy }),
      dueB: await store(agent.token, { name: 'due-b', kind: 'token', value: secretValue('tok'), owners: [teamB], rotation: policy }),
      // Due, but a generated value cannot be a TOTP seed: this rotation fails. (A seed with a policy
      // is refused now; one stored before that was refused still has its policy.)
      failingB: await seedWithPolicy(
        await store(agent.token, { name: 'due-b-totp', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXQ') }, owners: [teamB] }),
        ROTATE_NOW,
      ),
      notDue: await store(agent.token, { name: 'fresh-a', kind: 'api_key', value: secretValue('sk'), owners: [teamA], rotation: policy }),
      noPolicy: await store(agent.token, { name: 'manual-a', kind: 'api_key', value: secretValue('sk'), owners: [teamA] }),
      deleted: await store(agent.token, { name: 'deleted-a', kind: 'api_key', value: secretValue('sk'), owners: [teamA], rotation: policy }),
    };
    await age([ids.dueA1, ids.dueA2, ids.dueB, ids.failingB, ids.deleted], 45);
    await age([ids.noPolicy], 400);
    expect((await h.api('DELETE', '/v1/credentials/deleted-a', { token: agent.token })).status).toBe(200);
    const all = Object.values(ids);
    const due = [ids.dueA1, ids.dueA2, ids.dueB, ids.failingB];
    const before = await rows(all);
    expect([...before.values()].filter((r) => r.next_rotation_at && r.next_rotation_at < new Date()).map((r) => r.name).sort()).toEqual(
      ['deleted-a', 'due-a1', 'due-a2', 'due-b', 'due-b-totp'],
    );

    // Mail sent 8 days ago and 6 days ago: the schedule's MAIL_RETENTION_DAYS (7) reaches the sweep's retention.
    const oldMail = [await settledMail({ daysAgo: 8 }), await settledMail({ daysAgo: 6 })];

    const run = await trigger(schedule);
    expect(run.workflowId.startsWith(scheduleId(SWEEP_SCHEDULE_ID, h.taskQueue))).toBe(true);
    const result = await finish<SweepResult>('the scheduled sweep', run.workflowId, run.firstExecutionRunId);
    expect(await erasedOf(oldMail)).toEqual([true, false]);
    expect(result).toMatchObject({ total: 4, rotated: 3, failed: 1 });
    expect(await sweptIds(result.sweepId)).toEqual([...due].sort());
    expect(await versions(all)).toEqual({ 'due-a1': 2, 'due-a2': 2, 'due-b': 2, 'due-b-totp': 1, 'fresh-a': 1, 'manual-a': 1, 'deleted-a': 1 });
    expect((await rows([ids.failingB])).get('due-b-totp')!.status).toBe('rotation_failed');
    const rotatedValues = [await read(agent.token, 'due-a1'), await read(agent.token, 'due-a2'), await read(agent.token, 'due-b')].map((r) => r.value);

    // One summary per address, once the sweep is over (the sink stores a message before SMTP acknowledges it).
    const next = Object.fromEntries((await listed(agent.token)).map((c) => [c.name, c.nextRotationAt]));
    const [forA, ...moreA] = await mailTo(teamA, SUMMARY_SUBJECT);
    const [forB, ...moreB] = await mailTo(teamB, SUMMARY_SUBJECT);
    const [forAgent, ...moreAgent] = await mailTo(agentEmail, SUMMARY_SUBJECT);
    expect([moreA, moreB, moreAgent]).toEqual([[], [], []]);
    expect(recipients(forA!.mail)).toEqual([teamA]);
    expect(forA!.mail.subject).toBe('[mailgent] Scheduled rotation: 2 rotated, 0 failed');
    expect(forA!.mail.text).toContain(`Rotated (2):\n  - due-a1: version 1 → 2; next due ${next['due-a1']}\n  - due-a2: version 1 → 2; next due ${next['due-a2']}\n`);
    expect(forA!.mail.text).toContain('Failed or not rotated (0):\n  (none)');
    expect(forB!.mail.subject).toBe('[mailgent] Scheduled rotation: 1 rotated, 1 failed');
    expect(forB!.mail.text).toContain(`Rotated (1):\n  - due-b: version 1 → 2; next due ${next['due-b']}\n`);
    expect(forB!.mail.text).toContain(
      `Failed or not rotated (1):\n  - due-b-totp: failed — credential 'due-b-totp' is a totp_seed; a generated value would not be a TOTP seed; next due ${next['due-b-totp']}\n`,
    );
    expect(Date.parse(next['due-a1']!)).toBeGreaterThan(Date.now() + 29 * 86_400_000);
    expect(Date.parse(next['due-b-totp']!)).toBeLessThan(Date.now());
    expect(forAgent!.mail.subject).toBe('[mailgent] Scheduled rotation: 3 rotated, 1 failed');
    for (const mail of [forA!, forB!, forAgent!]) {
      for (const name of ['fresh-a', 'manual-a', 'deleted-a']) expect(mail.mail.text).not.toContain(name);
      for (const value of [...h.secrets, ...rotatedValues]) expect(mail.raw).not.toContain(value);
    }
  });

  it('a due credential whose rotation window is closed is deferred; one whose window is open is rotated', async () => {
    const timezone = 'Asia/Kolkata';
    const hour = Number(
      new Intl.DateTimeFormat('en-US', { timeZone: timezone, hour: 'numeric', hourCycle: 'h23' }).formatToParts(new Date()).find((p) => p.type === 'hour')!.value,
    );
    const everyDay = [0, 1, 2, 3, 4, 5, 6];
    // Open from an hour ago to two hours ahead; closed from three to five hours ahead (both may wrap midnight).
    const open = { days: everyDay, startHour: (hour + 23) % 24, endHour: (hour + 2) % 24, timezone };
    const closed = { days: everyDay, startHour: (hour + 3) % 24, endHour: (hour + 5) % 24, timezone };
    const agent = await identity();
    const openId = await store(agent.token, { name: 'window-open', kind: 'api_key', value: secretValue(), rotation: { ...ROTATE_NOW, window: open } });
    const closedId = await store(agent.token, { name: 'window-closed', kind: 'api_key', value: secretValue(), rotation: { ...ROTATE_NOW, window: closed } });
    await age([openId, closedId], 45);

    const first = await sweep();
    expect(first).toMatchObject({ total: 1, rotated: 1, failed: 0 });
    expect(await sweptIds(first.sweepId)).toEqual([openId]);
    expect(await versions([openId, closedId])).toEqual({ 'window-open': 2, 'window-closed': 1 });
    // Deferred, not dropped: still due, and rotated by the first sweep that finds its window open.
    expect((await rows([closedId])).get('window-closed')!.next_rotation_at.getTime()).toBeLessThan(Date.now());
    const reopened = await h.api('PATCH', '/v1/credentials/window-closed', { token: agent.token, body: { rotation: { ...ROTATE_NOW, window: open } } });
    expect(reopened.status).toBe(200);
    const second = await sweep();
    expect(await sweptIds(second.sweepId)).toEqual([closedId]);
    expect(await versions([openId, closedId])).toEqual({ 'window-open': 2, 'window-closed': 2 });
    await read(agent.token, 'window-open');
    await read(agent.token, 'window-closed');
  });

  it('a due credential whose rotation failed is tried again a day after the failure, not by every hourly sweep', async () => {
    const agent = await identity();
    const id = await store(agent.token, { name: 'failed-lately', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW });
    await age([id], 45);
    // What a failed run leaves: the credential marked, still due.
    await h.sql(`UPDATE credentials SET status = 'rotation_failed', updated_at = now() - interval '1 hour' WHERE id = $1`, [id]);
    // Before, every sweep started it again: keys made at the provider and a failure notice each hour.
    const soon = await sweep();
    expect(await sweptIds(soon.sweepId)).not.toContain(id);
    // The next day's sweep of the same hour tries it, though it runs minutes less than 24 hours after
    // the failure (a failure at 10:03 in a daily 10:00-11:00 window): before, held until 10:03, the
    // window had closed before the next sweep, and it was tried every other day.
    await h.sql(`UPDATE credentials SET updated_at = now() - interval '23 hours 50 minutes' WHERE id = $1`, [id]);
    const later = await sweep();
    expect(await sweptIds(later.sweepId)).toContain(id);
    expect(await versions([id])).toEqual({ 'failed-lately': 2 });
    expect((await h.sql('SELECT status FROM credentials WHERE id = $1', [id])).rows[0].status).toBe('active');
    await read(agent.token, 'failed-lately');
  });

  it('a due credential whose rotation was rolled back, cancelled or ended unreported waits a day too: the next hourly sweep does not rotate it again', async () => {
    const agent = await identity();
    const ids = [
      await store(agent.token, { name: 'rolled-back-lately', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'cancelled-lately', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'ended-lately', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
    ];
    await age(ids, 45);
    // What a rolled-back and a cancelled run leave: the credential active and still due, the run's outcome recorded;
    // and what a run terminated after it staged its value leaves: the credential still `rotating`, the outcome its
    // batch recorded for it, failed.
    await h.sql(`UPDATE credentials SET status = 'rotating', updated_at = now() - interval '2 hours' WHERE id = $1`, [ids[2]]);
    for (const [i, outcome] of (['rolled_back', 'cancelled', 'failed'] as const).entries()) {
      await h.sql(`INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome, finished_at) VALUES ($1, $2, $3, $4, now() - interval '1 hour')`, [
        `test-run-${randomUUID()}`,
        `rotate:${ids[i]}`,
        ids[i],
        outcome,
      ]);
    }
    // Before, the next sweep rotated both again: a rollback undone an hour later.
    const soon = await sweep();
    expect((await sweptIds(soon.sweepId)).filter((id) => ids.includes(id))).toEqual([]);
    await h.sql(`UPDATE run_outcomes SET finished_at = now() - interval '25 hours' WHERE credential_id = ANY($1::uuid[])`, [ids]);
    const later = await sweep();
    expect((await sweptIds(later.sweepId)).filter((id) => ids.includes(id))).toEqual([...ids].sort());
    expect(await versions(ids)).toEqual({ 'rolled-back-lately': 2, 'cancelled-lately': 2, 'ended-lately': 2 });
    for (const name of ['rolled-back-lately', 'cancelled-lately', 'ended-lately']) await read(agent.token, name);
  });

  it('an address two identities list gets a summary from each: one identity\'s stored value there withholds its own summary, not the other\'s', async () => {
    const shared = address('shared-team');
    const [a, b] = [await identity(), await identity()];
    const policy = { ...ROTATE_NOW, settings: { length: 32 } };
    const ofA = await store(a.token, { name: unique('shared-a'), kind: 'api_key', value: secretValue('sk'), owners: [shared], rotation: policy });
    // B keeps the address itself as a value (a login, say), and lists it as an owner: any mail to it
    // from B would carry that value. (Stored past `store`, which would register it as a secret the
    // leak checks look for: it is the address A's summary is rightly sent to.)
    const nameB = unique('shared-b');
    const storedB = await h.api('POST', '/v1/vault.store', { token: b.token, body: { name: nameB, kind: 'generic', value: h.publicValue(shared), owners: [shared], rotation: policy } });
    expect(storedB.status).toBe(201);
    await age([ofA, storedB.body.id], 45);

    const result = await sweep();
    expect(await sweptIds(result.sweepId)).toEqual(expect.arrayContaining([ofA, storedB.body.id]));
    // Before, both identities' runs went into one summary to the address, refused whole for B's value: A's team heard nothing.
    const summaries = await waitFor('A\'s summary to the shared address', () => mailTo(shared, SUMMARY_SUBJECT), (m) => m.length >= 1);
    expect(summaries).toHaveLength(1);
    expect(summaries[0]!.mail.text).toContain(`Rotated (1):\n  - ${(await h.sql('SELECT name FROM credentials WHERE id = $1', [ofA])).rows[0].name}: version 1 → 2`);
    expect(summaries[0]!.mail.text).not.toContain(nameB);
    // B's summary is refused, and audited as B's.
    const refusedB = await h.sql(
      `SELECT identity_id FROM audit_log WHERE action = 'mail.send' AND outcome = 'rejected' AND detail->>'purpose' = 'rotation.summary' AND request_id = $1`,
      [result.sweepId],
    );
    expect(refusedB.rows).toEqual([{ identity_id: b.id }]);
  });

  it('a team address spelled in two cases gets one summary of both its rotations', async () => {
    const team = address('Case-Team');
    const agent = await identity();
    const policy = { ...ROTATE_NOW, settings: { length: 32 } };
    const upper = await store(agent.token, { name: unique('case-upper'), kind: 'api_key', value: secretValue('sk'), owners: [team], rotation: policy });
    const lower = await store(agent.token, { name: unique('case-lower'), kind: 'api_key', value: secretValue('sk'), owners: [team.toLowerCase()], rotation: policy });
    await age([upper, lower], 45);
    const result = await sweep();
    expect(await sweptIds(result.sweepId)).toEqual(expect.arrayContaining([upper, lower]));
    const { rows } = await h.sql("SELECT recipients, subject FROM mail_outbox WHERE purpose = 'rotation.summary' AND lower(recipients[1]) = lower($1)", [team]);
    // Before, two summaries, each "1 rotated".
    expect(rows.map((r) => ({ to: (r.recipients as string[]).map((a) => a.toLowerCase()), subject: r.subject }))).toEqual([
      { to: [team.toLowerCase()], subject: '[mailgent] Scheduled rotation: 2 rotated, 0 failed' },
    ]);
  });

  it('a sweep waits for its rotations only so long: one still running then is left to finish on its own, and the summary says so', async () => {
    const team = address('held-team');
    const agent = await identity();
    const id = await store(agent.token, { name: 'held-rotation', kind: 'api_key', value: secretValue(), owners: [team], rotation: ROTATE_NOW });
    await age([id], 45);
    // The credential's row held: its rotation waits to store the new value, as a stuck run would.
    const lock = new pg.Client({ connectionString: h.databaseUrl });
    await lock.connect();
    try {
      await lock.query('BEGIN');
      // (NO KEY UPDATE: the sweep's rows that refer to it still go in; the rotation's FOR UPDATE waits.)
      await lock.query('SELECT id FROM credentials WHERE id = $1 FOR NO KEY UPDATE', [id]);
      // Before, the sweep waited for the run however long it took, and the schedule skipped every sweep meanwhile.
      const result = await sweep({ waitSeconds: 2 });
      expect(result).toMatchObject({ open: 1 });
      expect(await sweptIds(result.sweepId)).toEqual([id]);
      const summary = await waitFor('the summary', async () => (await mailTo(team, SUMMARY_SUBJECT))[0], (m) => m !== undefined);
      expect(summary!.mail.text).toContain('Still rotating when the sweep stopped waiting (1); each sends its own notice when it ends:\n  - held-rotation');
      expect(summary!.mail.text).toContain('Failed or not rotated (0):');
    } finally {
      await lock.query('ROLLBACK').catch(() => undefined);
      await lock.end();
    }
    // Let go, it finishes on its own.
    await h.client.workflow.getHandle(`rotate:${id}`).result();
    expect(await versions([id])).toEqual({ 'held-rotation': 2 });
    await read(agent.token, 'held-rotation');
  });

  it('when a sweep stops waiting, a run that ended unrecorded counts as failed, one running though its start went unrecorded is followed, the rest is left', async () => {
    const agent = await identity();
    const [ended, unrecorded, waiting, others] = (await Promise.all(
      ['ended-unrecorded', 'started-unrecorded', 'never-started', 'rotated-by-another'].map((name) =>
        store(agent.token, { name, kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      ),
    )) as [string, string, string, string];
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, workflow_id) VALUES ($1, NULL, 'sweep', 'test', $2)`, [rotationId, `sweep-${rotationId}`]);
    // As a wave starts them: the batch's id in the memo.
    const start = (credentialId: string, by = rotationId) =>
      h.client.workflow.start('rotateCredential', {
        taskQueue: h.taskQueue,
        workflowId: `rotate:${credentialId}`,
        args: [{ rotationId: by, identityId: agent.id, credentialId }],
        memo: { rotationId: by },
      });
    // Ended without an outcome (terminated a moment before the deadline).
    const gone = await start(ended);
    await gone.terminate('stopped by an operator');
    // Running, held at its store, but its wave died before recording the run; and one running,
    // held too, that another batch started (this sweep's wave sent its start, which joined that run).
    const lock = new pg.Client({ connectionString: h.databaseUrl });
    await lock.connect();
    try {
      await lock.query('BEGIN');
      await lock.query('SELECT id FROM credentials WHERE id = ANY($1::uuid[]) FOR NO KEY UPDATE', [[unrecorded, others]]);
      const held = await start(unrecorded);
      const theirs = await start(others, randomUUID());
      await h.sql(
        `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id, start_sent_at)
         VALUES ($1, $2, $3, $4, now()), ($1, $5, $6, NULL, now()), ($1, $7, $8, NULL, NULL), ($1, $9, $10, NULL, now())`,
        [rotationId, ended, `rotate:${ended}`, gone.firstExecutionRunId, unrecorded, `rotate:${unrecorded}`, waiting, `rotate:${waiting}`, others, `rotate:${others}`],
      );
      const result = await createActivities(h.deps).awaitOutcomes({ rotationId, until: new Date(Date.now() - 1000).toISOString() });
      // Before the fix: the ended run counted as still rotating, the running one's row deleted (untracked);
      // later, the other batch's run was taken as this sweep's too.
      expect(result).toEqual({ total: 2, rotated: 0, failed: 1, open: 1 });
      expect((await theirs.describe()).status.name).toBe('RUNNING');
      const runs = (await h.sql('SELECT credential_id, run_id FROM rotation_runs WHERE rotation_id = $1 ORDER BY credential_id', [rotationId])).rows;
      expect(runs).toEqual(
        [
          { credential_id: ended, run_id: gone.firstExecutionRunId },
          { credential_id: unrecorded, run_id: held.firstExecutionRunId },
        ].sort((a, b) => a.credential_id.localeCompare(b.credential_id)),
      );
    } finally {
      await lock.query('ROLLBACK').catch(() => undefined);
      await lock.end();
    }
    await h.client.workflow.getHandle(`rotate:${unrecorded}`).result();
    await h.client.workflow.getHandle(`rotate:${others}`).result();
    await read(agent.token, 'started-unrecorded');
    await read(agent.token, 'rotated-by-another');
  });

  it('when a sweep stops waiting, a run of its own that went unrecorded and has already ended is counted, not dropped', async () => {
    const agent = await identity();
    const id = await store(agent.token, { name: 'ended-before-deadline', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW });
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, workflow_id) VALUES ($1, NULL, 'sweep', 'test', $2)`, [rotationId, `sweep-${rotationId}`]);
    // The wave sent the start (the batch in its memo) and died before recording it; the run finished since.
    const run = await h.client.workflow.start('rotateCredential', {
      taskQueue: h.taskQueue,
      workflowId: `rotate:${id}`,
      args: [{ rotationId, identityId: agent.id, credentialId: id }],
      memo: { rotationId },
    });
    await run.result();
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at) VALUES ($1, $2, $3, now())`, [rotationId, id, `rotate:${id}`]);
    // Before, only a running one was adopted: this one's row was deleted, and the summary left out a rotation that happened.
    expect(await createActivities(h.deps).awaitOutcomes({ rotationId, until: new Date(Date.now() - 1000).toISOString() })).toEqual({ total: 1, rotated: 1, failed: 0 });
    expect((await h.sql('SELECT run_id FROM rotation_runs WHERE rotation_id = $1', [rotationId])).rows).toEqual([{ run_id: run.firstExecutionRunId }]);
    await read(agent.token, 'ended-before-deadline');
  });

  it('a start marked sent that never reached the server is checked again by the retry: one whose policy was removed meanwhile is not rotated', async () => {
    const agent = await identity();
    const [unmanaged, due] = [await store(agent.token, { name: 'lost-start-unmanaged', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'lost-start-due', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW })];
    await age([unmanaged, due], 40);
    const acts = createActivities(h.deps);
    const { sweepId } = await acts.beginSweep({ workflowId: `test-sweep-${randomUUID()}`, asOf: new Date().toISOString() });
    // The wave marked both starts sent and died before they left (or the server never had them):
    // no run of either exists. Then the owner takes one out of rotation.
    await h.sql(
      `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at) VALUES ($1, $2, $3, now()), ($1, $4, $5, now())`,
      [sweepId, unmanaged, `rotate:${unmanaged}`, due, `rotate:${due}`],
    );
    const patched = await h.api('PATCH', '/v1/credentials/lost-start-unmanaged', { token: agent.token, body: { rotation: null } });
    expect(patched.status).toBe(200);
    // Before, a start marked sent was sent again unchecked: the unmanaged one rotated (to a generated value).
    expect(await acts.startRotations({ rotationId: sweepId })).toEqual({ started: 1 });
    expect(await sweptIds(sweepId)).toEqual([due]);
    await expect(h.client.workflow.getHandle(`rotate:${unmanaged}`).describe()).rejects.toThrow(/not found/i);
    await h.client.workflow.getHandle(`rotate:${due}`).result();
    expect(await versions([unmanaged, due])).toEqual({ 'lost-start-unmanaged': 1, 'lost-start-due': 2 });
    await read(agent.token, 'lost-start-due');
  });

  it('a later wave of a sweep defers a credential whose window closed after it was selected; it stays due', async () => {
    const agent = await identity();
    const hour = new Date().getUTCHours();
    const everyDay = [0, 1, 2, 3, 4, 5, 6];
    const id = await store(agent.token, {
      name: 'wave-window',
      kind: 'api_key',
      value: secretValue(),
      rotation: { ...ROTATE_NOW, window: { days: everyDay, startHour: (hour + 23) % 24, endHour: (hour + 2) % 24, timezone: 'UTC' } },
    });
    await age([id], 40);
    // Selected while its window was open (the run row a sweep's selectDue writes), then the window closes before its wave starts.
    const acts = createActivities(h.deps);
    const { sweepId } = await acts.beginSweep({ workflowId: `test-sweep-${randomUUID()}`, asOf: new Date().toISOString() });
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [sweepId, id, `rotate:${id}`]);
    // The window moves, in the database alone: a PATCH would also mark the credential changed since
    // the sweep began, which drops it on its own, and the window's check would go untested.
    const { rowCount } = await h.sql(`UPDATE credentials SET rotation = jsonb_set(rotation, '{window}', $2::jsonb) WHERE id = $1`, [
      id,
      JSON.stringify({ days: everyDay, startHour: (hour + 3) % 24, endHour: (hour + 5) % 24, timezone: 'UTC' }),
    ]);
    expect(rowCount).toBe(1);
    expect((await h.sql('SELECT updated_at < (SELECT created_at FROM rotations WHERE id = $2) AS before FROM credentials WHERE id = $1', [id, sweepId])).rows[0].before).toBe(true);
    expect(await acts.startRotations({ rotationId: sweepId })).toEqual({ started: 0 });
    expect(await sweptIds(sweepId)).toEqual([]);
    expect(await versions([id])).toEqual({ 'wave-window': 1 });
    expect((await rows([id])).get('wave-window')!.next_rotation_at.getTime()).toBeLessThan(Date.now());
    await read(agent.token, 'wave-window');
  });

  it('a later wave of a sweep drops a credential changed since it was selected (rotated, deleted, failed or its policy changed): none is rotated twice', async () => {
    const agent = await identity();
    const names = ['wave-rotated', 'wave-deleted', 'wave-failed', 'wave-rolled-back', 'wave-unmanaged', 'wave-not-due', 'wave-due'];
    const ids: string[] = [];
    for (const name of names) ids.push(await store(agent.token, { name, kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }));
    await age(ids, 40);
    // Selected as due (the run rows a sweep's selectDue writes), then, before their wave starts:
    const acts = createActivities(h.deps);
    const { sweepId } = await acts.beginSweep({ workflowId: `test-sweep-${randomUUID()}`, asOf: new Date().toISOString() });
    for (const id of ids) await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [sweepId, id, `rotate:${id}`]);
    // one rotated by someone else (a new value, so not due for 30 days), one deleted, one whose rotation has just failed.
    await store(agent.token, { name: 'wave-rotated', kind: 'api_key', value: secretValue() });
    expect((await h.api('DELETE', '/v1/credentials/wave-deleted', { token: agent.token })).status).toBe(200);
    await h.sql(`UPDATE credentials SET status = 'rotation_failed', updated_at = now() WHERE id = $1`, [ids[2]]);
    // and one whose rotation (another batch's) ended since, rolled back: the credential as it was, but not to be rotated again now.
    await h.sql(`INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome) VALUES ($1, $2, $3, 'rolled_back')`, [`test-run-${randomUUID()}`, `rotate:${ids[3]}`, ids[3]]);
    // Its owners took one out of Mailgent's rotation (rotated without a policy, it would get a generated value in place
    // of the real key), and gave another a longer period, so it is not due yet.
    expect((await h.api('PATCH', '/v1/credentials/wave-unmanaged', { token: agent.token, body: { rotation: null } })).status).toBe(200);
    expect((await h.api('PATCH', '/v1/credentials/wave-not-due', { token: agent.token, body: { rotation: { ...ROTATE_NOW, periodDays: 365 } } })).status).toBe(200);

    // Before, the wave started all of them: a second rotation of the one just rotated, one of a deleted credential, one without a policy.
    expect(await acts.startRotations({ rotationId: sweepId })).toEqual({ started: 1 });
    expect(await sweptIds(sweepId)).toEqual([ids[6]!]);
    const run = (await h.sql('SELECT workflow_id, run_id FROM rotation_runs WHERE rotation_id = $1', [sweepId])).rows[0];
    await h.client.workflow.getHandle(run.workflow_id, run.run_id).result();
    expect(await versions(ids)).toEqual({
      'wave-rotated': 2,
      'wave-deleted': 1,
      'wave-failed': 1,
      'wave-rolled-back': 1,
      'wave-unmanaged': 1,
      'wave-not-due': 1,
      'wave-due': 2,
    });
    for (const name of ['wave-rotated', 'wave-due']) await read(agent.token, name);
  });

  it('a credential due again while its last rotation is in its grace period is left to that run: not reported rotated again by the next sweep', async () => {
    const owner = address('grace-owner');
    const agent = await identity(owner);
    const id = await store(agent.token, { name: 'due-in-grace', kind: 'api_key', value: secretValue(), owners: [owner], rotation: { provider: 'generated', periodDays: 30, graceHours: 240 } });
    await age([id], 45);
    const first = await sweep();
    expect(await sweptIds(first.sweepId)).toContain(id);
    expect(await versions([id])).toEqual({ 'due-in-grace': 2 });
    // In its grace period, the period shortened to a day (applies from the next rotation), and version 2 made two days ago: due again.
    const patched = await h.api('PATCH', '/v1/credentials/due-in-grace', { token: agent.token, body: { rotation: { provider: 'generated', periodDays: 1, graceHours: 0 } } });
    expect(patched.status, patched.text).toBe(200);
    await age([id], 2);
    const grace = h.client.workflow.getHandle(`rotate:${id}`);
    expect((await grace.describe()).status.name).toBe('RUNNING');
    const summaries = async () => (await mailTo(owner, '[mailgent] Scheduled rotation')).length;
    const told = await summaries();
    for (let i = 0; i < 2; i++) {
      const again = await sweep();
      // Before: each joined the run in its grace period and counted it as its own, rotated, in its summary.
      expect(await sweptIds(again.sweepId)).not.toContain(id);
    }
    expect(await summaries()).toBe(told);
    expect(await versions([id])).toEqual({ 'due-in-grace': 2 });
    expect((await grace.describe()).status.name).toBe('RUNNING');
    // Its grace over, the next sweep rotates it.
    await grace.terminate('the test ends its grace period');
    const after = await sweep();
    expect(await sweptIds(after.sweepId)).toContain(id);
    expect(await versions([id])).toEqual({ 'due-in-grace': 3 });
    await read(agent.token, 'due-in-grace');
  });

  it('runs a sweep joined that an earlier batch started and that never end do not take its open places: it starts the others', async () => {
    const agent = await identity();
    const [stuckA, stuckB, healthy] = [
      await store(agent.token, { name: 'stuck-a', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'stuck-b', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'stuck-healthy', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
    ];
    await age([stuckA], 50);
    await age([stuckB], 49);
    await age([healthy], 40);
    // An earlier batch's runs of two of them that never progress (as after a deploy that broke their replay): nobody polls their queue.
    const earlier = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, workflow_id, created_at) VALUES ($1, $2, 'request', 'test', $3, now() - interval '2 hours')`, [
      earlier,
      agent.id,
      `batch-${earlier}`,
    ]);
    const stuck = [];
    for (const credentialId of [stuckA, stuckB]) {
      const run = await h.client.workflow.start('rotateCredential', {
        taskQueue: `${h.taskQueue}-nobody`,
        workflowId: `rotate:${credentialId}`,
        args: [{ rotationId: earlier, identityId: agent.id, credentialId, mode: 'requested' }],
        memo: { rotationId: earlier },
      });
      await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id, start_sent_at) VALUES ($1, $2, $3, $4, now() - interval '2 hours')`, [
        earlier,
        credentialId,
        `rotate:${credentialId}`,
        run.firstExecutionRunId,
      ]);
      stuck.push(run);
    }
    try {
      // A sweep that may keep two rotations open, with the three due (most overdue first: the stuck ones).
      const acts = createActivities({ ...h.deps, maxOpenRotations: 2 });
      const { sweepId } = await acts.beginSweep({ workflowId: `test-sweep-${randomUUID()}`, asOf: new Date().toISOString() });
      for (const id of [stuckA, stuckB, healthy]) await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [sweepId, id, `rotate:${id}`]);
      const totals = await acts.awaitOutcomes({ rotationId: sweepId, pollMs: 50, until: new Date(Date.now() + 8_000).toISOString() });
      // Before: the two joined runs filled its places, the healthy one was never started, and so every sweep after it.
      expect(totals).toEqual({ total: 3, rotated: 1, failed: 0, open: 2 });
      const recorded = (await h.sql('SELECT credential_id, run_id FROM rotation_runs WHERE rotation_id = $1', [sweepId])).rows;
      expect(Object.fromEntries(recorded.map((r) => [r.credential_id, r.run_id]))).toEqual({
        [stuckA]: stuck[0]!.firstExecutionRunId,
        [stuckB]: stuck[1]!.firstExecutionRunId,
        [healthy]: expect.any(String),
      });
      expect(await versions([stuckA, stuckB, healthy])).toEqual({ 'stuck-a': 1, 'stuck-b': 1, 'stuck-healthy': 2 });
      await read(agent.token, 'stuck-healthy');
    } finally {
      for (const run of stuck) await run.terminate('the test ends it').catch(() => undefined);
    }
  });

  it("a sweep's run whose credential changed after its wave's check (another's rotation ended in between) does nothing: no second rotation, no notice, out of the sweep", async () => {
    const agent = await identity(address('owner'));
    const [changed, unchanged, reported] = [
      await store(agent.token, { name: 'run-changed', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'run-unchanged', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
      await store(agent.token, { name: 'run-reported', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }),
    ];
    await age([changed, unchanged, reported], 40);
    const acts = createActivities(h.deps);
    const { sweepId } = await acts.beginSweep({ workflowId: `test-sweep-${randomUUID()}`, asOf: new Date().toISOString() });
    for (const id of [changed, unchanged, reported]) await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [sweepId, id, `rotate:${id}`]);
    // The wave's check passed; then another's rotation of one ended (its new value current since the
    // sweep began), and the wave's start found nothing running to join. Started as the wave starts them:
    await store(agent.token, { name: 'run-changed', kind: 'api_key', value: secretValue() });
    const start = async (credentialId: string) => {
      await h.sql('UPDATE rotation_runs SET start_sent_at = now() WHERE rotation_id = $1 AND credential_id = $2', [sweepId, credentialId]);
      const run = await h.client.workflow.start('rotateCredential', {
        taskQueue: h.taskQueue,
        workflowId: `rotate:${credentialId}`,
        args: [{ rotationId: sweepId, identityId: agent.id, credentialId, mode: 'scheduled' }],
        memo: { rotationId: sweepId },
      });
      await recordBatchRun(h.deps.pool, sweepId, credentialId, run.firstExecutionRunId);
      return run;
    };
    const runs = [await start(changed), await start(unchanged)];
    const results = await Promise.all(runs.map((run) => run.result()));
    // Before, the changed one was rotated a second time (version 3), and its owners told so again.
    expect(results.map((r) => r.state)).toEqual(['not_due', 'succeeded']);
    expect(results[0].error).toMatch(/'run-changed' changed since the sweep selected it/);
    expect(await versions([changed, unchanged])).toEqual({ 'run-changed': 2, 'run-unchanged': 2 });
    // Out of the sweep, as the wave would have left it: not waited for, counted or summarised; nothing planned, read for a provider or told.
    expect(await sweptIds(sweepId)).toEqual([reported, unchanged].sort());
    const planned = await h.sql('SELECT credential_id FROM rotation_plans WHERE rotation_id = $1', [sweepId]);
    expect(planned.rows.map((r) => r.credential_id)).toEqual([unchanged]);
    const providerReads = await h.sql(`SELECT count(*)::int AS n FROM audit_log WHERE credential_id = $1 AND action = 'rotation.read'`, [changed]);
    expect(providerReads.rows[0].n).toBe(0);
    const notices = async () => (await h.sql(`SELECT subject FROM mail_outbox WHERE purpose = 'rotation.notice' AND subject LIKE '%run-%changed' ORDER BY created_at`)).rows.map((r) => r.subject);
    expect(await notices()).toEqual(['[mailgent] Rotated run-unchanged']);
    // An agent's batch that joined the run before its plan (recorded after the plan looked) starts its rotation again: it asked for one.
    const joined = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, workflow_id) VALUES ($1, $2, 'request', 'test', $3)`, [joined, agent.id, `batch-${joined}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id, start_sent_at) VALUES ($1, $2, $3, $4, now())`, [
      joined,
      changed,
      `rotate:${changed}`,
      runs[0]!.firstExecutionRunId,
    ]);
    expect(await acts.awaitOutcomes({ rotationId: joined, pollMs: 20 })).toEqual({ total: 1, rotated: 1, failed: 0 });
    const again = (await h.sql('SELECT run_id FROM rotation_runs WHERE rotation_id = $1', [joined])).rows[0].run_id;
    expect(again).not.toBe(runs[0]!.firstExecutionRunId);
    expect(await h.client.workflow.getHandle(`rotate:${changed}`, again).result()).toMatchObject({ state: 'succeeded', mode: 'requested', fromVersion: 2, toVersion: 3 });
    // No outcome for the run that did nothing (one would hold the credential out of sweeps for a day).
    expect((await h.sql('SELECT count(*)::int AS n FROM run_outcomes WHERE run_id = $1', [runs[0]!.firstExecutionRunId])).rows[0].n).toBe(0);
    // A credential with a leak incident open is rotated all the same: the report is on its way to the run, which answers it.
    await h.sql(`UPDATE credentials SET updated_at = now() WHERE id = $1`, [reported]);
    const incident = randomUUID();
    await h.sql(`INSERT INTO leak_incidents (id, credential_id, identity_id, version, source) VALUES ($1, $2, $3, 1, 'test-scan')`, [incident, reported, agent.id]);
    try {
      const ids = { rotationId: sweepId, identityId: agent.id, credentialId: reported, workflowId: `rotate:${reported}` };
      expect(await acts.planRotation({ ...ids, sinceSweep: true })).toMatchObject({ credentialName: 'run-reported', currentVersion: 1 });
      expect(await sweptIds(sweepId)).toEqual([reported, unchanged].sort());
      await h.sql(`UPDATE leak_incidents SET status = 'closed', closed_at = now() WHERE id = $1`, [incident]);
      expect(await acts.planRotation({ ...ids, sinceSweep: true })).toEqual({ notDue: expect.stringMatching(/'run-reported' changed since/) });
      expect(await sweptIds(sweepId)).toEqual([unchanged]);
      // Asked again (a retry whose first answer was lost with its worker), it answers the same, its row gone by then.
      expect(await acts.planRotation({ ...ids, sinceSweep: true })).toEqual({ notDue: expect.stringMatching(/'run-reported' changed since/) });
    } finally {
      await h.sql(`UPDATE leak_incidents SET status = 'closed', closed_at = coalesce(closed_at, now()) WHERE id = $1`, [incident]);
    }
    for (const name of ['run-changed', 'run-unchanged']) await read(agent.token, name);
  });

  it("the rotation id a sweep's notices give lets each owner follow, roll back and cancel the runs of its own credentials, and no one else's", async () => {
    const [alice, bob, carol] = [await identity(), await identity(), await identity()];
    const inGrace = { ...ROTATE_NOW, graceHours: 1 };
    const ids = {
      alice: await store(alice.token, { name: 'owned-by-alice', kind: 'api_key', value: secretValue(), rotation: inGrace }),
      bob: await store(bob.token, { name: 'owned-by-bob', kind: 'api_key', value: secretValue(), rotation: inGrace }),
      bobLater: await store(bob.token, { name: 'owned-by-bob-later', kind: 'api_key', value: secretValue(), rotation: inGrace }),
      bobMarked: await store(bob.token, { name: 'owned-by-bob-marked', kind: 'api_key', value: secretValue(), rotation: inGrace }),
    };
    await age(Object.values(ids), 40);
    // Selected by a sweep; its first wave starts two, the third waits its turn.
    const acts = createActivities(h.deps);
    const { sweepId } = await acts.beginSweep({ workflowId: `test-sweep-${randomUUID()}`, asOf: new Date().toISOString() });
    // As selectDue and the password policy's pass select (a second selection of a credential finds its row).
    const select = (id: string) =>
      h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`, [sweepId, id, `rotate:${id}`]);
    await select(ids.alice);
    await select(ids.bob);
    expect(await acts.startRotations({ rotationId: sweepId })).toEqual({ started: 2 });
    await select(ids.bobLater);
    // One a wave marked five minutes ago and died before sending (its retry would send it).
    await select(ids.bobMarked);
    await h.sql(`UPDATE rotation_runs SET start_sent_at = now() - interval '5 minutes' WHERE rotation_id = $1 AND credential_id = $2`, [sweepId, ids.bobMarked]);
    const view = (who: { token: string }) => h.api('GET', `/v1/rotations/${sweepId}`, { token: who.token });
    const aliceView = await waitFor('alice\'s run in its grace period', () => view(alice), (r) => r.status === 200 && r.body.state === 'grace');
    expect(aliceView.body.credentials.map((c: { name: string }) => c.name)).toEqual(['owned-by-alice']);
    const bobView = await waitFor('bob\'s run in its grace period', () => view(bob), (r) => r.body.credentials?.[0]?.state === 'grace');
    expect(bobView.body.credentials.map((c: { name: string; state: string }) => [c.name, c.state])).toEqual([
      ['owned-by-bob', 'grace'],
      ['owned-by-bob-later', 'not_started'],
      ['owned-by-bob-marked', 'not_started'],
    ]);
    // Before, all three were a 404 to every identity, the owners included.
    for (const [method, path] of [['GET', ''], ['POST', '/rollback'], ['DELETE', '']] as const) {
      expect((await h.api(method, `/v1/rotations/${sweepId}${path}`, { token: carol.token })).status).toBe(404);
    }

    const rolledBack = await h.api('POST', `/v1/rotations/${sweepId}/rollback`, { token: alice.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    expect(rolledBack.body.results).toEqual([{ credentialId: ids.alice, rolledBack: true, current: 1, abandoned: 2 }]);
    const cancel = await h.api('DELETE', `/v1/rotations/${sweepId}`, { token: bob.token });
    expect(cancel.status, cancel.text).toBe(202);
    expect(cancel.body).toEqual({ rotationId: sweepId, cancelling: [ids.bob], notStarted: [ids.bobLater, ids.bobMarked], finishing: [] });
    // Asked again (its answer lost, say): the same answer, nothing lost from it.
    const again = await h.api('DELETE', `/v1/rotations/${sweepId}`, { token: bob.token });
    expect(again.body).toMatchObject({ notStarted: [ids.bobLater, ids.bobMarked] });

    // Each ends rolled back; the sweep itself is not cancelled, and its next wave starts nothing of
    // bob's: not the one waiting, not the one marked (its retry), not one selected again (the
    // password policy's pass, a retried page). Before, the marked one was started by the wave's retry,
    // and one selected again was put back and started.
    for (const id of [ids.alice, ids.bob]) {
      const { run_id } = (await h.sql('SELECT run_id FROM rotation_runs WHERE rotation_id = $1 AND credential_id = $2', [sweepId, id])).rows[0];
      await h.client.workflow.getHandle(`rotate:${id}`, run_id).result();
    }
    expect((await h.sql('SELECT cancelled_at FROM rotations WHERE id = $1', [sweepId])).rows[0].cancelled_at).toBeNull();
    await select(ids.bobLater);
    expect(await acts.startRotations({ rotationId: sweepId })).toEqual({ started: 0 });
    const started = (await h.sql('SELECT credential_id FROM rotation_runs WHERE rotation_id = $1 AND run_id IS NOT NULL', [sweepId])).rows.map((r) => r.credential_id);
    expect(started.sort()).toEqual([ids.alice, ids.bob].sort());
    expect(await versions(Object.values(ids))).toEqual({ 'owned-by-alice': 1, 'owned-by-bob': 1, 'owned-by-bob-later': 1, 'owned-by-bob-marked': 1 });
    expect((await view(alice)).body.credentials).toMatchObject([{ name: 'owned-by-alice', state: 'rolled_back' }]);
    expect((await view(bob)).body.credentials.map((c: { name: string; state: string }) => [c.name, c.state])).toEqual([
      ['owned-by-bob', 'rolled_back'],
      ['owned-by-bob-later', 'cancelled'],
      ['owned-by-bob-marked', 'cancelled'],
    ]);
    // The sweep's wait counts them done (cancelled), not waiting: it ends.
    expect(await acts.awaitOutcomes({ rotationId: sweepId, until: new Date(Date.now() + 60_000).toISOString(), pollMs: 50 })).toEqual({
      total: 4,
      rotated: 0,
      failed: 4,
    });
    const audited = await h.sql(`SELECT detail FROM audit_log WHERE action = 'rotation.cancel' AND identity_id = $1`, [bob.id]);
    expect(audited.rows.map((r) => r.detail)[0]).toEqual(expect.objectContaining({ rotationId: sweepId, cancelled: 1, notStarted: 2, ownCredentialsOnly: true }));
  });

  it('a sweep that ended without starting a run of it (failed, terminated, gone) leaves the run not_started, not running for ever', async () => {
    const owner = await identity();
    const id = await store(owner.token, { name: 'never-started', kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW });
    const { sweepId } = await createActivities(h.deps).beginSweep({ workflowId: `test-sweep-gone-${randomUUID()}`, asOf: new Date().toISOString() });
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [sweepId, id, `rotate:${id}`]);
    // Its workflow is not on the server (never ran here), and the sweep was recorded more than a minute ago.
    await h.sql(`UPDATE rotations SET created_at = now() - interval '2 minutes' WHERE id = $1`, [sweepId]);
    const res = await h.api('GET', `/v1/rotations/${sweepId}`, { token: owner.token });
    expect(res.status, res.text).toBe(200);
    expect(res.body.state).toBe('not_started');
    expect(res.body.credentials).toMatchObject([{ name: 'never-started', state: 'not_started', runId: null }]);
  });

  it("the sweep's selection reads credentials through credentials_due, never a sequential scan", async () => {
    const source = readFileSync(new URL('../activities/batch.ts', import.meta.url), 'utf8');
    const squash = (s: string) => s.replace(/\s+/g, ' ').trim();
    expect(squash(source), 'SELECT_DUE_SQL must stay a copy of the query in selectDue').toContain(squash(SELECT_DUE_SQL));

    const agent = await identity();
    const seedId = await store(agent.token, { name: 'bulk-seed', kind: 'api_key', value: secretValue() });
    const { data_key_id: dataKeyId } = (await h.sql('SELECT data_key_id FROM secret_versions WHERE credential_id = $1', [seedId])).rows[0];
    const bulk = `SELECT id FROM credentials WHERE identity_id = $1 AND name LIKE 'bulk-%' AND name <> 'bulk-seed'`;
    try {
      await h.sql(
        `INSERT INTO credentials (id, identity_id, name, kind, current_version, rotation)
         SELECT gen_random_uuid(), $1, 'bulk-' || g, 'api_key', 1, '{"provider":"generated","settings":{},"periodDays":90}'::jsonb
           FROM generate_series(1, 5000) AS g`,
        [agent.id],
      );
      // Versions of every age within the 90-day period, and every fiftieth past it: 2% due.
      await h.sql(
        `INSERT INTO secret_versions (credential_id, version, data_key_id, sealed, created_at)
         SELECT c.id, 1, $2, '\\x00'::bytea,
                now() - make_interval(days => (CASE WHEN n % 50 = 0 THEN 91 + n % 30 ELSE n % 90 END)::int, secs => n::double precision)
           FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM (${bulk}) b) c`,
        [agent.id, dataKeyId],
      );
      const counts = (await h.sql(
        `SELECT count(*)::int AS total, count(*) FILTER (WHERE next_rotation_at <= now())::int AS due FROM credentials WHERE id IN (${bulk})`,
        [agent.id],
      )).rows[0];
      expect(counts).toEqual({ total: 5000, due: 100 });
      // Four past rotations each, as a vault that has run a year has: the selection's look for a
      // recent failure, cancel or rollback goes through an index, not a scan of them all.
      await h.sql(
        `INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome, finished_at)
         SELECT 'bulk-' || c.id || '-' || k, 'rotate:' || c.id, c.id, 'rotated', now() - make_interval(days => k * 90)
           FROM (${bulk}) c, generate_series(1, 4) AS k`,
        [agent.id],
      );
      await h.sql('ANALYZE credentials');
      await h.sql('ANALYZE run_outcomes');

      const planOf = async (params: unknown[]) => {
        const plan = (await h.sql(`EXPLAIN (FORMAT JSON) ${SELECT_DUE_SQL}`, params)).rows[0]['QUERY PLAN'][0].Plan;
        const nodes: { type: string; relation?: string; index?: string }[] = planNodes(plan).map((n) => ({ type: n['Node Type'], relation: n['Relation Name'], index: n['Index Name'] }));
        return { nodes, text: nodes.map((n) => [n.type, n.relation ?? n.index].filter(Boolean).join(' on ')).join(' > ') };
      };
      const asOf = new Date().toISOString();

      // A daily sweep's page holds every due credential: the index finds them, only they are sorted.
      const daily = await planOf([asOf, null, null, 500, 24]);
      expect(daily.nodes.some((n) => n.index === 'credentials_due'), daily.text).toBe(true);
      expect(daily.nodes.some((n) => n.index?.startsWith('run_outcomes_')), daily.text).toBe(true);
      expect(daily.nodes.filter((n) => n.type === 'Seq Scan'), daily.text).toEqual([]);

      // A backlog larger than a page is walked in index order, page after page, without a sort.
      const firstPage = (await h.sql(SELECT_DUE_SQL, [asOf, null, null, 25, 24])).rows;
      const last = firstPage.at(-1)!;
      const secondPage = (await h.sql(SELECT_DUE_SQL, [asOf, last.at, last.id, 25, 24])).rows;
      expect(secondPage).toHaveLength(25);
      expect(secondPage.filter((r) => firstPage.some((f) => f.id === r.id)), 'the cursor page repeats rows of the first page').toEqual([]);
      for (const params of [
        [asOf, null, null, 25, 24],
        [asOf, last.at, last.id, 25, 24],
      ]) {
        const { nodes, text } = await planOf(params);
        expect(nodes.some((n) => ['Index Scan', 'Index Only Scan'].includes(n.type) && n.index === 'credentials_due'), text).toBe(true);
        expect(nodes.filter((n) => n.type === 'Sort' || n.type === 'Seq Scan' || n.type.startsWith('Bitmap')), text).toEqual([]);
      }
    } finally {
      // Fixture rows with dummy ciphertexts must not reach a later sweep.
      await h.sql(`DELETE FROM secret_versions WHERE credential_id IN (${bulk})`, [agent.id]);
      await h.sql(`DELETE FROM run_outcomes WHERE credential_id IN (${bulk})`, [agent.id]);
      await h.sql(`DELETE FROM credentials WHERE id IN (${bulk})`, [agent.id]);
    }
  });

  it('a sweep over many pages continues as new, rotates every due credential once, and keeps each run history small', async () => {
    const agent = await identity();
    const count = 60;
    const ids: string[] = [];
    for (let i = 0; i < count; i++) {
      ids.push(await store(agent.token, { name: `paged-${String(i).padStart(2, '0')}`, kind: 'api_key', value: secretValue(), rotation: ROTATE_NOW }));
    }
    // One statement: every credential falls due at the same instant, as after a bulk import.
    await age(ids, 45);

    // 60 rotations: ~30 s alone, more with the rest of the suite on the same two cores.
    const result = await sweep({ pageSize: 2 }, 150_000);
    expect(result).toMatchObject({ total: count, rotated: count, failed: 0 });
    expect(Object.values(await versions(ids))).toEqual(Array(count).fill(2));
    const runs = await runChain(result.workflowId, result.firstRunId);
    // 30 full pages of 2, then an empty one: 25 pages in the first run, 6 in the second.
    expect(runs).toHaveLength(2);
    expect(runs[0]!.events.at(-1)?.workflowExecutionContinuedAsNewEventAttributes, 'the first run ends with WORKFLOW_EXECUTION_CONTINUED_AS_NEW').toBeTruthy();
    expect(runs[1]!.events.at(-1)?.workflowExecutionCompletedEventAttributes, 'the last run completes').toBeTruthy();
    const selectDueCalls = runs.map((r) => r.events.filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'selectDue').length);
    expect(selectDueCalls).toEqual([25, 6]);
    for (const r of runs) expect(r.events.length).toBeLessThan(400);
    for (const name of Object.keys(await versions(ids))) await read(agent.token, name);
  }, 240_000);

  it('expiry reminders go out 14 and 3 days ahead for credentials without a rotation policy, each once', async () => {
    const agent = await identity();
    const [in10, in2, in20] = [address('exp-10'), address('exp-2'), address('exp-20')];
    const inDays = (days: number) => new Date(Date.now() + days * 86_400_000).toISOString();
    await store(agent.token, { name: 'expires-10', kind: 'token', value: secretValue(), owners: [in10], expiresAt: inDays(10) });
    await store(agent.token, { name: 'expires-2', kind: 'token', value: secretValue(), owners: [in2], expiresAt: inDays(2) });
    await store(agent.token, { name: 'expires-20', kind: 'token', value: secretValue(), owners: [in20], expiresAt: inDays(20) });

    await sweep();
    const [ten, ...moreTen] = await mailTo(in10);
    const [two, ...moreTwo] = await mailTo(in2);
    expect([moreTen, moreTwo, await mailTo(in20)]).toEqual([[], [], []]);
    // The 14- and 3-day reminders, each saying how long is really left.
    expect(ten!.mail.subject).toBe('[mailgent] expires-10 expires in 10 days');
    expect(two!.mail.subject).toBe('[mailgent] expires-2 expires in 2 days');
    expect(two!.mail.text).toContain("The token credential 'expires-2' expires at ");
    expect(two!.mail.text).toContain('has no rotation policy');

    await sweep();
    expect((await mailTo(in10)).length + (await mailTo(in2)).length + (await mailTo(in20)).length).toBe(2);
    const outbox = await h.sql("SELECT count(*)::int AS n FROM mail_outbox WHERE identity_id = $1 AND purpose = 'expiry.reminder'", [agent.id]);
    expect(outbox.rows[0].n).toBe(2);
  });

  it('a scheduled notice that would carry a stored value is skipped, its refusal audited, and the rest go out: the sweep is not held', async () => {
    const agent = await identity();
    const [leaky, fine] = [address('exp-leaky'), address('exp-fine')];
    const inDays = (days: number) => new Date(Date.now() + days * 86_400_000).toISOString();
    const leakyName = unique('id-valued');
    const id = await store(agent.token, { name: leakyName, kind: 'token', value: secretValue(), owners: [leaky], expiresAt: inDays(2) });
    // Its value is its own id, which every notice about it prints. (Public text on purpose, so not
    // registered for the leak sweep: it is in every audit row and history that names the credential.)
    const again = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: leakyName, kind: 'token', value: h.publicValue(id), expiresAt: inDays(2) } });
    expect(again.status, again.text).toBe(201);
    const fineName = unique('plain');
    await store(agent.token, { name: fineName, kind: 'token', value: secretValue(), owners: [fine], expiresAt: inDays(2) });

    // Before, the refusal failed the activity, which the sweep retried (for a day, for ever for a
    // password policy's reminder), holding every sweep after it.
    const acts = createActivities(h.deps);
    await acts.sendExpiryReminders({ asOf: new Date().toISOString() });
    // The next sweep's pass finds it refused already: not scanned, audited or refused again.
    await acts.sendExpiryReminders({ asOf: new Date().toISOString() });
    const [reminder] = await waitFor('the other reminder', () => mailTo(fine), (mails) => mails.length > 0);
    expect(reminder!.mail.subject).toBe(`[mailgent] ${fineName} expires in 2 days`);
    expect(await mailTo(leaky)).toEqual([]);
    const refused = (await h.sql("SELECT outcome, detail FROM audit_log WHERE credential_id = $1 AND action = 'mail.send'", [id])).rows;
    expect(refused).toEqual([{ outcome: 'rejected', detail: { messageId: expect.any(String), purpose: 'expiry.reminder', error: 'secret-in-message' } }]);
    expect((await h.sql('SELECT count(*)::int AS n FROM mail_outbox WHERE $1 = ANY(recipients)', [leaky])).rows[0].n).toBe(0);
    const outbox = (await h.sql('SELECT status, recipients, subject, text_body FROM mail_outbox WHERE id = $1', [refused[0].detail.messageId])).rows;
    expect(outbox).toEqual([{ status: 'abandoned', recipients: [], subject: '(refused)', text_body: '(refused)' }]);
  });

  it('retention destroys only what is still deleted when it gets to it: a credential restored meanwhile is kept', async () => {
    const agent = await identity();
    const id = await store(agent.token, { name: 'restored-in-time', kind: 'api_key', value: secretValue() });
    await deletedLongAgo(agent.token, 'restored-in-time', id);
    // Listed by the retention pass as deleted 40 days ago, then restored before its turn.
    expect((await h.api('POST', '/v1/credentials/restored-in-time/restore', { token: agent.token })).status).toBe(200);
    const cutoff = new Date(Date.now() - 30 * 86_400_000);
    await expect(h.deps.vault.destroy({ identityId: agent.id, actor: 'schedule:retention' }, { id }, { deletedBefore: cutoff })).rejects.toMatchObject({ status: 404 });
    expect((await rows([id])).get('restored-in-time')).toMatchObject({ deleted_at: null, destroyed_at: null });
    await read(agent.token, 'restored-in-time');
  });

  it('retention keeps a deleted credential whose rotation still runs (in its grace period), and destroys it once that run has ended', async () => {
    const agent = await identity();
    const name = unique('deleted-in-grace');
    const id = await store(agent.token, { name, kind: 'api_key', value: secretValue(), rotation: { provider: 'generated', periodDays: 30, graceHours: 1 } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(started.status, started.text).toBe(202);
    await waitFor('the grace period', async () => (await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state, (state) => state === 'grace');
    await deletedLongAgo(agent.token, name, id);
    const purge = () => createActivities(h.deps).purgeDeleted({ asOf: new Date().toISOString(), retentionDays: 30 });
    // Before, it was destroyed here: at the grace period's end the revoke of version 1 found nothing.
    await purge();
    expect((await h.sql('SELECT destroyed_at FROM credentials WHERE id = $1', [id])).rows[0].destroyed_at).toBeNull();
    expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [id])).rows[0].n).toBe(2);
    await h.client.workflow.getHandle(`rotate:${id}`).terminate('the test ends the run (its grace period is an hour)');
    await purge();
    expect((await h.sql('SELECT destroyed_at FROM credentials WHERE id = $1', [id])).rows[0].destroyed_at).not.toBeNull();
  });

  it('retention reads past a page of deleted credentials it keeps (their rotations running): those after them are destroyed', async () => {
    const agent = await identity();
    const name = unique('behind-kept');
    const id = await store(agent.token, { name, kind: 'api_key', value: secretValue() });
    await deletedLongAgo(agent.token, name, id);
    await h.sql(`UPDATE credentials SET deleted_at = now() - interval '35 days' WHERE id = $1`, [id]);
    // A thousand deleted before it, each with a rotation still running (Temporal says so).
    const kept = (
      await h.sql(
        `INSERT INTO credentials (id, identity_id, name, kind, current_version, deleted_at)
         SELECT gen_random_uuid(), $1, 'kept-' || g, 'generic', 1, now() - interval '40 days' FROM generate_series(1, 1000) g RETURNING id`,
        [agent.id],
      )
    ).rows.map((r) => r.id as string);
    const running = new Set(kept.map((k) => `rotate:${k}`));
    const temporal = {
      ...h.deps.temporal!,
      client: {
        workflow: {
          getHandle: (workflowId: string) => ({
            describe: async () => {
              if (running.has(workflowId)) return { status: { name: 'RUNNING' } };
              throw new WorkflowNotFoundError('no run', workflowId, undefined);
            },
          }),
        },
      },
    } as unknown as NonNullable<typeof h.deps.temporal>;
    try {
      // Before, { destroyed: 0, left: true } sweep after sweep: the same thousand read, and kept.
      expect(await createActivities({ ...h.deps, temporal }).purgeDeleted({ asOf: new Date().toISOString(), retentionDays: 30 })).toMatchObject({ destroyed: 1, left: false });
      expect((await h.sql('SELECT destroyed_at FROM credentials WHERE id = $1', [id])).rows[0].destroyed_at).not.toBeNull();
      expect((await h.sql('SELECT count(*)::int AS n FROM credentials WHERE id = ANY($1::uuid[]) AND destroyed_at IS NULL', [kept])).rows[0].n).toBe(1000);
    } finally {
      await h.sql('DELETE FROM credentials WHERE id = ANY($1::uuid[])', [kept]);
    }
  });

  it('retention keeps a deleted credential whose rotation began while its destroy asked whether one runs (the create read under the row lock)', async () => {
    const agent = await identity();
    const name = unique('deleted-racing');
    const id = await store(agent.token, { name, kind: 'api_key', value: secretValue() });
    await deletedLongAgo(agent.token, name, id);
    const caller = { identityId: agent.id, actor: 'workflow:test' };
    // Temporal answers "not running" twice (the quiet look, then the destroy's check); as the second
    // answer comes, a rotation begins and its create reads the value for the provider.
    let asked = 0;
    const temporal = {
      ...h.deps.temporal!,
      client: {
        workflow: {
          getHandle: () => ({
            describe: async () => {
              if (++asked === 2) await h.deps.rotations.read(caller, id, 1, 'provider.create', { rotationKey: `${id}:create:1` });
              throw new WorkflowNotFoundError('no run', `rotate:${id}`, undefined);
            },
          }),
        },
      },
    } as unknown as NonNullable<typeof h.deps.temporal>;
    expect(await createActivities({ ...h.deps, temporal }).purgeDeleted({ asOf: new Date().toISOString(), retentionDays: 30 })).toMatchObject({ destroyed: 0, left: false });
    expect(asked).toBe(2);
    // Before, it was destroyed: the key that rotation's provider made could be neither staged nor revoked.
    expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [id])).rows[0].n).toBe(1);
    expect((await h.sql('SELECT destroyed_at FROM credentials WHERE id = $1', [id])).rows[0].destroyed_at).toBeNull();
  });

  it("retention works within a time budget, leaving the rest to the next sweep's, and deletes every identity's expired Idempotency-Keys", async () => {
    const agent = await identity();
    const ids: string[] = [];
    for (const [i, days] of [40, 39, 38].entries()) {
      const name = unique(`budgeted-${i}`);
      ids.push(await store(agent.token, { name, kind: 'api_key', value: secretValue() }));
      expect((await h.api('DELETE', `/v1/credentials/${name}`, { token: agent.token })).status).toBe(200);
      await h.sql(`UPDATE credentials SET deleted_at = now() - make_interval(days => $2) WHERE id = $1`, [ids[i], days]);
    }
    // An identity that keyed requests a day ago and none since: nothing of its own purges its keys.
    const quiet = await identity();
    for (const [key, hours] of [['old-1', 25], ['old-2', 30], ['fresh', 1]] as const) {
      await h.sql(`INSERT INTO idempotency_keys (identity_id, action, key, target_id, request, created_at) VALUES ($1, 'mail.send', $2, $3, $4, now() - make_interval(hours => $5))`, [
        quiet.id, key, randomUUID(), randomBytes(32), hours,
      ]);
    }
    const destroyed = async () => (await h.sql('SELECT count(*)::int AS n FROM credentials WHERE id = ANY($1::uuid[]) AND destroyed_at IS NOT NULL', [ids])).rows[0].n as number;
    const asOf = new Date().toISOString();
    // Out of time at once: nothing destroyed, and it says there is more.
    expect(await createActivities(h.deps).purgeDeleted({ asOf, retentionDays: 30, budgetMs: 0 })).toMatchObject({ destroyed: 0, left: true });
    expect(await destroyed()).toBe(0);
    // Before, only a keyed request of the same identity deleted its expired keys.
    expect((await h.sql('SELECT key FROM idempotency_keys WHERE identity_id = $1', [quiet.id])).rows).toEqual([{ key: 'fresh' }]);
    expect(await createActivities(h.deps).purgeDeleted({ asOf, retentionDays: 30 })).toMatchObject({ left: false });
    expect(await destroyed()).toBe(3);
  });

  it("retention destroys credentials past it before it purges expired Idempotency-Keys: a slow purge (a backlog) does not leave them for ever", async () => {
    const agent = await identity();
    const name = unique('before-keys');
    const id = await store(agent.token, { name, kind: 'api_key', value: secretValue() });
    await deletedLongAgo(agent.token, name, id);
    // The purge of keys held up past the budget (as a backlog of pages would take it), the lock released at 1.5 s.
    const keys = await holdTable(h, 'idempotency_keys');
    const released = new Promise((r) => setTimeout(r, 1_500)).then(() => keys.release());
    let result;
    try {
      result = await createActivities(h.deps).purgeDeleted({ asOf: new Date().toISOString(), retentionDays: 30, budgetMs: 500 });
    } finally {
      await released;
    }
    // Before: the keys first, the budget spent on them, and the destroy left to a sweep whose keys let it.
    expect(result).toMatchObject({ destroyed: 1 });
    expect((await h.sql('SELECT destroyed_at IS NOT NULL AS destroyed FROM credentials WHERE id = $1', [id])).rows).toEqual([{ destroyed: true }]);
  });

  it('retention erases what settled mail said and to whom past MAIL_RETENTION_DAYS, keeping the row that stops a notice going twice', async () => {
    const asOf = new Date().toISOString();
    const sent = await settledMail({ daysAgo: 40, refused: ['gone@example.com'], lastError: '550 5.1.1 <gone@example.com>: user unknown', html: '<p>old body</p>' });
    const abandoned = await settledMail({ daysAgo: 40, status: 'abandoned', lastError: 'undelivered: 550 5.1.1 <ops@example.com>: mailbox full' });
    const refusedNotice = await settledMail({ daysAgo: 40, status: 'abandoned', lastError: REFUSED_NOTICE, attempts: 0 });
    const stillQueued = await settledMail({ daysAgo: 40, status: 'queued', lastError: '421 try later' });
    const recent = await settledMail({ daysAgo: 20 });
    const kept = { recipients: ['ops@example.com'], subject: 'the subject', text_body: 'the body', erased_at: null };
    // The default, 30 days (a sweep scheduled before the setting passes none).
    expect((await createActivities(h.deps).purgeDeleted({ asOf, retentionDays: 30 })).erased).toBeGreaterThanOrEqual(3);
    const row = async (id: string) =>
      (await h.sql('SELECT recipients, refused, subject, text_body, html_body, last_error, status, attempts, sent_at IS NOT NULL AS sent, erased_at FROM mail_outbox WHERE id = $1', [id])).rows[0];
    const erased = { recipients: [], refused: [], subject: '', text_body: '', html_body: null, erased_at: expect.any(Date) };
    // Before, every message's recipients, subject and bodies were kept for good.
    expect(await row(sent)).toMatchObject({ ...erased, last_error: null, status: 'sent', attempts: 1, sent: true });
    expect(await row(abandoned)).toMatchObject({ ...erased, last_error: null, status: 'abandoned' });
    // The record an escalation reads (its reminder refused) stays.
    expect(await row(refusedNotice)).toMatchObject({ ...erased, last_error: REFUSED_NOTICE, status: 'abandoned' });
    expect(await row(stillQueued)).toMatchObject({ ...kept, last_error: '421 try later', status: 'queued' });
    expect(await row(recent)).toMatchObject(kept);
    // The id is still taken: the notice it was is not queued again.
    expect(await queueMail(h.deps.pool, { id: sent, identityId: null, purpose: 'rotation.notice', to: ['ops@example.com'], subject: 'again', text: 'again' })).toBe(false);
    expect(await row(sent)).toMatchObject(erased);
    // A shorter retention reaches the recent one; each is erased once.
    const firstErased = (await row(sent)).erased_at;
    await createActivities(h.deps).purgeDeleted({ asOf, retentionDays: 30, mailRetentionDays: 10 });
    expect(await row(recent)).toMatchObject({ ...erased, status: 'sent' });
    expect((await row(sent)).erased_at).toEqual(firstErased);
    // (No delivery was started for the queued one: settled, so later tests' waits for delivery end.)
    await h.sql(`UPDATE mail_outbox SET status = 'abandoned' WHERE id = $1`, [stillQueued]);
  });

  /**
   * One pass of the password policy's step, as a sweep runs it: its answer, the parameters of every
   * query it sent (`askedOf` a credential: those that are one of its notices' ids), and how many
   * outbox rows it added.
   */
  async function passwordPolicyPass() {
    const asked: unknown[] = [];
    const pool = Object.create(h.deps.pool) as pg.Pool;
    pool.query = ((text: string, params?: unknown[]) => {
      asked.push(...(params ?? []));
      return h.deps.pool.query(text, params);
    }) as typeof pool.query;
    const outbox = async () => (await h.sql('SELECT count(*)::int AS n FROM mail_outbox')).rows[0].n as number;
    const before = await outbox();
    const result = await createActivities({ ...h.deps, pool }).enforcePasswordPolicies({ sweepId: randomUUID(), asOf: new Date().toISOString() });
    return {
      result,
      queued: (await outbox()) - before,
      askedOf: (credentialId: string, version = 1) => asked.filter((p) => Object.values(passwordNoticeIds({ id: credentialId, current_version: version })).includes(p as string)),
    };
  }

  it('password policy: weak passwords are refused, managed ones rotated past the maximum age, unmanaged ones reminded and escalated once', async () => {
    const agent = await identity();
    const put = await h.api('PUT', '/v1/password-policy', { token: agent.token, body: { maxAgeDays: 30, length: 20, symbols: true, escalateAfterDays: 5 } });
    expect(put.status).toBe(200);
    const got = await h.api('GET', '/v1/password-policy', { token: agent.token });
    expect(got.body).toEqual({ maxAgeDays: 30, length: 20, lowercase: true, uppercase: true, digits: true, symbols: true, escalateAfterDays: 5 });

    const weak = h.secret('weakpassword1234');
    const refused = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'weak', kind: 'password', value: weak } });
    expect(refused.status).toBe(422);
    expect(refused.body.detail).toBe("the password does not meet this identity's password policy: it needs at least 20 characters, an upper-case letter, a symbol");
    expect(refused.text).not.toContain(weak);
    expect((await h.sql('SELECT count(*)::int AS n FROM credentials WHERE identity_id = $1', [agent.id])).rows[0].n).toBe(0);

    const strong = (tag: string) => h.secret(`Str0ng!${tag}-${randomBytes(8).toString('hex')}`);
    const [managedOwner, owner32, owner40] = [address('pw-managed'), address('pw-32'), address('pw-40')];
    const managed = await store(agent.token, {
      name: 'db-admin',
      kind: 'password',
      value: strong('Managed'),
      owners: [managedOwner],
      rotation: { provider: 'generated', periodDays: 90, graceHours: 0 },
    });
    // Managed too, but its rotation window is closed now: the policy waits for the window like the period does.
    const hour = new Date().getUTCHours();
    const windowed = await store(agent.token, {
      name: 'db-windowed',
      kind: 'password',
      value: strong('Windowed'),
      rotation: { provider: 'generated', periodDays: 90, graceHours: 0, window: { days: [0, 1, 2, 3, 4, 5, 6], startHour: (hour + 3) % 24, endHour: (hour + 5) % 24, timezone: 'UTC' } },
    });
    const old32 = await store(agent.token, { name: 'legacy-32', kind: 'password', value: strong('Legacy'), owners: [owner32] });
    const old40 = await store(agent.token, { name: 'legacy-40', kind: 'password', value: strong('Ancient'), owners: [owner40] });
    // 31 days: past the policy's 30, well inside the rotation period of 90.
    await age([managed, windowed], 31);
    await age([old32], 32);
    await age([old40], 40);

    const first = await sweep();
    expect(await sweptIds(first.sweepId)).toEqual([managed]);
    expect(first).toMatchObject({ total: 1, rotated: 1, failed: 0 });
    const rotated = await read(agent.token, 'db-admin');
    expect(rotated.version).toBe(2);
    expect(rotated.value.length).toBeGreaterThanOrEqual(20);
    expect(rotated.value).toMatch(/[^A-Za-z0-9]/);
    expect(rotated.value).toMatch(/[a-z]/);
    expect(rotated.value).toMatch(/[A-Z]/);
    expect(rotated.value).toMatch(/[0-9]/);

    const reminder = (name: string) => `[mailgent] Password ${name} is past its maximum age`;
    const escalation = '[mailgent] ESCALATION: password legacy-40 is 10 days overdue';
    const check = async (escalated: boolean) => {
      const to32 = await mailTo(owner32);
      const to40 = await mailTo(owner40);
      const toSecurity = await mailTo(security);
      expect(to32.map((m) => m.mail.subject)).toEqual([reminder('legacy-32')]);
      expect(to32[0]!.mail.text).toContain("The password 'legacy-32' is 32 days old; the password policy allows 30.");
      expect(to40.map((m) => m.mail.subject).sort()).toEqual(escalated ? [escalation, reminder('legacy-40')] : [reminder('legacy-40')]);
      expect(toSecurity.map((m) => m.mail.subject)).toEqual(escalated ? [escalation] : []);
      if (escalated) {
        expect(recipients(toSecurity[0]!.mail).sort()).toEqual([owner40, security].sort());
        expect(toSecurity[0]!.mail.text).toMatch(/The owners were told on \d{4}-\d\d-\d\d, 6 days ago, and it is still unchanged\./);
      }
      expect((await mailTo(managedOwner, '[mailgent] Password')).length).toBe(0);
    };
    // Overdue by more than the escalation period already, but the owners are told first and get that long to act.
    await check(false);

    const second = await sweep();
    expect(await sweptIds(second.sweepId)).toEqual([]);
    await check(false);
    // Six days after the owners were told (the policy gives them 5), it is still unchanged: the security contacts hear of it, once.
    await h.sql(
      `UPDATE mail_outbox SET sent_at = sent_at - interval '6 days' WHERE purpose = 'password.reminder' AND identity_id = $1 AND subject LIKE '%legacy-40%'`,
      [agent.id],
    );
    await sweep();
    await check(true);
    await sweep();
    await check(true);
    expect(await versions([managed, windowed, old32, old40])).toEqual({ 'db-admin': 2, 'db-windowed': 1, 'legacy-32': 1, 'legacy-40': 1 });

    // Both of legacy-40's notices are out: a sweep has nothing left to do for it and asks nothing of
    // its own about it (before, ~6 queries every sweep for as long as it stayed unchanged). legacy-32,
    // its escalation not due yet, is still looked at as before.
    const pass = await passwordPolicyPass();
    expect(pass.result).toEqual({ rotating: 0, reminded: 0, escalated: 0 });
    expect(pass.askedOf(old40)).toEqual([]);
    expect(pass.askedOf(old32).length).toBeGreaterThan(0);
    expect(pass.queued).toBe(0);
  });

  it('password policy: owners who could not be reminded (no address, or the reminder refused) do not stop the escalation', async () => {
    const agent = await identity();
    expect((await h.api('PUT', '/v1/password-policy', { token: agent.token, body: { maxAgeDays: 30, length: 8, symbols: false, escalateAfterDays: 5 } })).status).toBe(200);
    // No owners, no notify list, an identity without email: nobody to remind.
    const unowned = await store(agent.token, { name: `unowned-${randomUUID().slice(0, 6)}`, kind: 'password', value: h.secret(`Pw0rd${randomBytes(8).toString('hex')}`) });
    // Its reminder goes to its notify list too, where (by mistake) its own value was put: refused for
    // carrying it. (Its escalation goes to the owners and security, and does not carry it.)
    const named = `refused-${randomUUID().slice(0, 6)}`;
    const mistaken = `Pw0-${randomBytes(6).toString('hex')}@example.com`;
    const refused = await store(agent.token, { name: named, kind: 'password', value: mistaken, owners: [address('pw-refused')], notify: [mistaken] });
    // One whose owner's address is its value: the reminder and the escalation (which goes to the
    // owners) are both refused for carrying it; security gets the escalation withheld, ids alone.
    const ownedBy = `Pw1-${randomBytes(6).toString('hex')}@example.com`;
    const selfOwned = await store(agent.token, { name: `self-owned-${randomUUID().slice(0, 6)}`, kind: 'password', value: ownedBy, owners: [ownedBy] });
    await age([unowned, refused, selfOwned], 33); // 3 days overdue: within the 5 days

    await sweep();
    const refusals = await h.sql(`SELECT status FROM mail_outbox WHERE identity_id = $1 AND purpose = 'password.reminder'`, [agent.id]);
    expect(refusals.rows).toEqual([{ status: 'abandoned' }, { status: 'abandoned' }]);
    expect((await mailTo(security)).filter((m) => m.mail.subject?.includes(named) || m.mail.text?.includes(unowned))).toEqual([]);

    // Six days later, still unchanged: before, neither ever reached the security contacts.
    await age([unowned, refused, selfOwned], 39);
    await h.sql(`UPDATE mail_outbox SET created_at = created_at - interval '6 days' WHERE identity_id = $1 AND purpose = 'password.reminder'`, [agent.id]);
    await sweep();
    const escalations = await waitFor(
      'both escalations at the security desk',
      async () => (await mailTo(security)).filter((m) => m.mail.subject?.startsWith('[mailgent] ESCALATION') && (m.mail.text?.includes(unowned) || m.mail.text?.includes(refused))),
      (mails) => mails.length >= 2,
    );
    const about = (id: string) => escalations.find((m) => m.mail.text?.includes(`Credential id: ${id}`))!.mail.text!;
    expect(about(unowned)).toMatch(/The owners could not be told: the credential has no owners or notify addresses, and its identity no email \(overdue since \d{4}-\d\d-\d\d, 9 days ago\)/);
    expect(about(refused)).toMatch(/The owners could not be told: their reminder was refused on \d{4}-\d\d-\d\d, 6 days ago, for carrying a stored value/);
    // Before, its escalation was refused as its reminder was, and nobody was ever told.
    const withheld = await waitFor(
      'the withheld escalation at the security desk',
      async () => (await mailTo(security)).filter((m) => m.mail.text?.includes(`Credential id: ${selfOwned}`)),
      (mails) => mails.length >= 1,
    );
    expect(withheld.map((m) => m.mail.subject)).toEqual(['[mailgent] ESCALATION: a password is 9 days overdue (notice withheld)']);
    expect(withheld[0]!.mail.text).toMatch(/Its escalation was withheld/);
    expect(withheld[0]!.mail.text).toMatch(/their reminder was refused on \d{4}-\d\d-\d\d, 6 days ago, for carrying a stored value\.\n/);
    expect(JSON.stringify(withheld)).not.toContain(ownedBy);
    // The escalation itself refused (and audited so), once; the withheld one beside it.
    expect((await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE identity_id = $1 AND purpose = 'password.escalation' AND status = 'abandoned'`, [agent.id])).rows[0].n).toBe(1);
    await sweep();
    expect((await mailTo(security)).filter((m) => m.mail.subject?.startsWith('[mailgent] ESCALATION') && (m.mail.text?.includes(unowned) || m.mail.text?.includes(refused)))).toHaveLength(2);
    expect((await mailTo(security)).filter((m) => m.mail.text?.includes(`Credential id: ${selfOwned}`))).toHaveLength(1);
    // Every notice settled (refused, or sent: the withheld escalation in place of a refused one), a
    // sweep asks nothing more of those two; the one whose owners had no address is looked at (its
    // reminder has no row to say it was tried), as before.
    await waitFor(
      'the escalations marked sent',
      async () => (await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE identity_id = $1 AND purpose = 'password.escalation' AND status = 'sent'`, [agent.id])).rows[0].n,
      (n) => n === 3,
    );
    const pass = await passwordPolicyPass();
    expect(pass.result).toEqual({ rotating: 0, reminded: 0, escalated: 0 });
    expect([pass.askedOf(refused), pass.askedOf(selfOwned)]).toEqual([[], []]);
    expect(pass.askedOf(unowned).length).toBeGreaterThan(0);
    expect(pass.queued).toBe(0);
  });

  it('password policy: one password whose notice fails for good does not hold the step (retried for ever before): the others are told, it is tried again next time', async () => {
    const agent = await identity();
    expect((await h.api('PUT', '/v1/password-policy', { token: agent.token, body: { maxAgeDays: 30, length: 8, symbols: false, escalateAfterDays: 5 } })).status).toBe(200);
    const [broken, fine] = [`broken-${randomUUID().slice(0, 6)}`, `fine-${randomUUID().slice(0, 6)}`];
    const brokenId = await store(agent.token, { name: broken, kind: 'password', value: h.secret(`Pw0rd${randomBytes(8).toString('hex')}`), owners: [address('pw-broken')] });
    const fineId = await store(agent.token, { name: fine, kind: 'password', value: h.secret(`Pw0rd${randomBytes(8).toString('hex')}`), owners: [address('pw-fine')] });
    await age([brokenId, fineId], 33);
    // The outbox refuses the one password's reminder, for good (a stand-in for a bug, or a row it cannot take).
    const trigger = `refuse_${randomBytes(4).toString('hex')}`;
    await h.sql(`CREATE FUNCTION ${trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN IF NEW.subject LIKE '%${broken}%' THEN RAISE EXCEPTION 'the outbox refuses this row'; END IF; RETURN NEW; END $$`);
    await h.sql(`CREATE TRIGGER ${trigger} BEFORE INSERT ON mail_outbox FOR EACH ROW EXECUTE FUNCTION ${trigger}()`);
    const sweepRun = async () => {
      const sweepId = randomUUID();
      await h.sql('INSERT INTO rotations (id, identity_id) VALUES ($1, $2)', [sweepId, agent.id]);
      return sweepId;
    };
    const reminders = async (name: string) =>
      (await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE identity_id = $1 AND purpose = 'password.reminder' AND subject LIKE $2`, [agent.id, `%${name}%`])).rows[0].n;
    try {
      const result = await createActivities(h.deps).enforcePasswordPolicies({ sweepId: await sweepRun(), asOf: new Date().toISOString() });
      // Before, the step failed (and was retried without end, holding the sweep and every one after it).
      expect(result).toMatchObject({ failed: 1 });
      expect(await reminders(fine)).toBe(1);
      expect(await reminders(broken)).toBe(0);
    } finally {
      await h.sql(`DROP TRIGGER ${trigger} ON mail_outbox`);
      await h.sql(`DROP FUNCTION ${trigger}()`);
    }
    // Once the outbox takes it, the next pass tells it.
    const again = await createActivities(h.deps).enforcePasswordPolicies({ sweepId: await sweepRun(), asOf: new Date().toISOString() });
    expect(again.failed).toBeUndefined();
    expect(await reminders(broken)).toBe(1);
  });

  it('service accounts: inventory with last read from the audit log, orphans by API, and the weekly report by schedule', async () => {
    const { orphans: schedule } = await schedules();
    const agentEmail = address('sa-agent');
    const agent = await identity(agentEmail);
    const owner = address('sa-owner');
    const otherOwner = address('sa-other-owner');
    const orphan = await store(agent.token, { name: 'sa-orphan', kind: 'service_account', value: secretValue(), owners: [owner], service: 'billing' });
    const readOne = await store(agent.token, { name: 'sa-read', kind: 'service_account', value: secretValue(), owners: [owner] });
    const withDependent = await store(agent.token, {
      name: 'sa-dependent',
      kind: 'service_account',
      value: secretValue(),
      owners: [owner],
      dependents: [{ type: 'env-file', settings: { file: 'sa.env', key: 'SA_TOKEN' } }],
    });
    await store(agent.token, { name: 'sa-new', kind: 'service_account', value: secretValue(), owners: [owner] });
    // Never read, but its value replaced every month (rotated, or stored again): a young value, an old account.
    // (Owners listed twice, and the identity's own address among them, in other case: one report each.)
    const rotated = await store(agent.token, {
      name: 'sa-rotated',
      kind: 'service_account',
      value: secretValue(),
      owners: [owner, otherOwner, otherOwner.toUpperCase(), agentEmail.toUpperCase()],
    });
    await store(agent.token, { name: 'not-an-account', kind: 'api_key', value: secretValue() });
    await age([orphan, readOne, withDependent], 40);
    await age([rotated], 10);
    await h.sql(`UPDATE credentials SET created_at = now() - interval '40 days' WHERE id = ANY($1::uuid[])`, [[orphan, readOne, withDependent, rotated]]);

    const inventory = async () => {
      const res = await h.api('GET', '/v1/service-accounts', { token: agent.token });
      expect(res.status).toBe(200);
      return Object.fromEntries((res.body.items as { name: string }[]).map((i) => [i.name, i])) as Record<string, any>;
    };
    const beforeRead = await inventory();
    expect(Object.keys(beforeRead)).toEqual(['sa-dependent', 'sa-new', 'sa-orphan', 'sa-read', 'sa-rotated']);
    expect(beforeRead['sa-rotated']).toMatchObject({ ageDays: 10, lastReadAt: null });
    expect(beforeRead['sa-orphan']).toMatchObject({ id: orphan, owners: [owner], service: 'billing', dependents: [], ageDays: 40, lastReadAt: null });
    expect(beforeRead['sa-dependent']).toMatchObject({ dependents: [{ type: 'env-file', settings: { file: 'sa.env', key: 'SA_TOKEN' } }], ageDays: 40 });
    expect(beforeRead['sa-read']).toMatchObject({ ageDays: 40, lastReadAt: null });
    expect(beforeRead['sa-new']).toMatchObject({ ageDays: 0, lastReadAt: null });

    await read(agent.token, 'sa-read');
    const { at } = (await h.sql("SELECT max(at) AS at FROM audit_log WHERE credential_id = $1 AND action = 'vault.get' AND outcome = 'ok'", [readOne])).rows[0];
    expect((await inventory())['sa-read'].lastReadAt).toBe(at.toISOString());

    const orphans = await h.api('GET', '/v1/reports/orphans?days=30', { token: agent.token });
    expect(orphans.status).toBe(200);
    expect(orphans.body.days).toBe(30);
    // Before, sa-rotated was not: its never-read age counted from its current value (10 days).
    expect(orphans.body.items.map((i: { name: string }) => i.name)).toEqual(['sa-orphan', 'sa-rotated']);
    const stranger = await identity();
    expect((await h.api('GET', '/v1/service-accounts', { token: stranger.token })).body.items).toEqual([]);
    expect((await h.api('GET', '/v1/reports/orphans?days=30', { token: stranger.token })).body.items).toEqual([]);

    const run = await trigger(schedule);
    // The identity's address gets the whole list (once, though it owns an account too); each owner the accounts it
    // owns: before, one email to all of them, every owner seeing every account.
    expect(await finish('the orphan report', run.workflowId, run.firstExecutionRunId)).toEqual({ sent: 3 });
    const listed = async (to: string) => {
      const [report, ...more] = await mailTo(to);
      expect(more, to).toEqual([]);
      expect(recipients(report!.mail), to).toEqual([to]);
      for (const name of ['sa-read', 'sa-dependent', 'sa-new', 'not-an-account']) expect(report!.mail.text).not.toContain(name);
      return [report!.mail.subject, (report!.mail.text ?? '').split('\n').filter((l) => l.startsWith('  - '))];
    };
    const both = ['  - sa-orphan (age 40 days, last read never)', '  - sa-rotated (age 10 days, last read never)'];
    expect(await listed(agentEmail)).toEqual(['[mailgent] 2 service accounts look orphaned', both]);
    expect(await listed(owner)).toEqual(['[mailgent] 2 service accounts look orphaned', both]);
    expect(await listed(otherOwner)).toEqual(['[mailgent] 1 service account looks orphaned', [both[1]]]);
    // The report is weekly: triggering again in the same week sends nothing new.
    const again = await trigger(schedule);
    expect(await finish('the second orphan report', again.workflowId, again.firstExecutionRunId)).toEqual({ sent: 0 });
    for (const to of [agentEmail, owner, otherOwner]) expect(await mailTo(to)).toHaveLength(1);
  });

  it('soft delete hides and restore brings back; the sweep destroys what stayed deleted past retention; ?destroy=true destroys at once', async () => {
    const agent = await identity();
    const value = secretValue();
    const id = await store(agent.token, { name: 'retired', kind: 'api_key', value });
    const names = async () => (await listed(agent.token)).map((c) => c.name);

    expect((await h.api('DELETE', '/v1/credentials/retired', { token: agent.token })).body).toMatchObject({ id });
    expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'retired' } })).status).toBe(404);
    expect(await names()).not.toContain('retired');
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'retired', kind: 'api_key', value: secretValue() } })).status).toBe(409);
    expect((await h.api('POST', '/v1/credentials/retired/restore', { token: agent.token })).status).toBe(200);
    expect(await read(agent.token, 'retired')).toMatchObject({ id, version: 1, value });
    expect(await names()).toContain('retired');

    expect((await h.api('DELETE', `/v1/credentials/${id}`, { token: agent.token })).status).toBe(200);
    await h.sql("UPDATE credentials SET deleted_at = now() - interval '31 days' WHERE id = $1", [id]);
    const recent = await store(agent.token, { name: 'recently-deleted', kind: 'api_key', value: secretValue() });
    expect((await h.api('DELETE', '/v1/credentials/recently-deleted', { token: agent.token })).status).toBe(200);
    await h.sql("UPDATE credentials SET deleted_at = now() - interval '29 days' WHERE id = $1", [recent]);
    // Rotation plans: one older than any run can use (ROTATION_PLAN_DAYS), one a run may still use.
    const plans = [`rotate:${recent}:old-plan`, `rotate:${recent}:young-plan`];
    await h.sql(
      `INSERT INTO rotation_plans (workflow_id, rotation_id, credential_id, rotation, dependents, planned_at)
       VALUES ($1, 'r', $3, NULL, '[]', now() - interval '46 days'), ($2, 'r', $3, NULL, '[]', now() - interval '44 days')`,
      [...plans, recent],
    );

    await sweep();
    expect((await h.sql('SELECT workflow_id FROM rotation_plans WHERE workflow_id = ANY($1)', [plans])).rows).toEqual([{ workflow_id: plans[1] }]);
    const after = await rows([id, recent]);
    expect(after.get('retired')!.destroyed_at).toBeInstanceOf(Date);
    expect(after.get('recently-deleted')!.destroyed_at).toBeNull();
    const versionsLeft = async (credentialId: string) => (await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [credentialId])).rows[0].n;
    expect(await versionsLeft(id)).toBe(0);
    expect(await versionsLeft(recent)).toBe(1);
    const audit = (await h.sql("SELECT actor, outcome FROM audit_log WHERE credential_id = $1 AND action = 'credential.destroy'", [id])).rows;
    expect(audit).toEqual([{ actor: 'schedule:retention', outcome: 'ok' }]);
    expect((await h.api('POST', '/v1/credentials/retired/restore', { token: agent.token })).status).toBe(404);
    const reused = await store(agent.token, { name: 'retired', kind: 'api_key', value: secretValue() });
    expect(reused).not.toBe(id);
    expect((await read(agent.token, 'retired')).version).toBe(1);

    const doomed = await store(agent.token, { name: 'doomed', kind: 'api_key', value: secretValue() });
    await store(agent.token, { name: 'doomed', kind: 'api_key', value: secretValue() });
    const destroyed = await h.api('DELETE', '/v1/credentials/doomed?destroy=true', { token: agent.token });
    expect(destroyed.status).toBe(200);
    expect(destroyed.body).toEqual({ id: doomed, destroyedVersions: 2 });
    expect(await versionsLeft(doomed)).toBe(0);
    expect((await rows([doomed])).get('doomed')!.destroyed_at).toBeInstanceOf(Date);
    expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'doomed' } })).status).toBe(404);
  });
});
