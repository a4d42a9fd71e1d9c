import { randomBytes, randomUUID } from 'node:crypto';
import { WorkflowNotFoundError, type WorkflowHandle, type WorkflowHandleWithFirstExecutionRunId } from '@temporalio/client';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { batchActivities } from '../activities/batch';
import { expectCleanRun } from './support/leaks';
import { holdTable } from './support/lifecycle-fixtures';
import { startHarness, type Harness } from './support/harness';
import { waitForMail } from './support/mail';
import { WebhookReceiver } from './support/webhook-receiver';

/**
 * The agent's batch, end to end: "rotate every API key older than 90 days and email the team a
 * summary" is one POST /v1/rotations with a filter and `notify`.
 */
describe('batch rotation for agents', () => {
  let h: Harness;
  let agent: { id: string; token: string };

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('rotates only the api keys older than 90 days, in one batch workflow, and mails notify one summary', async () => {
    const team = `platform-${randomUUID().slice(0, 8)}@example.com`;
    const store = async (name: string, kind: string, ageDays: number) => {
      const res = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: { name, kind, value: h.secret(`${name}-original-value`), rotation: { provider: 'generated', graceHours: 0 } },
      });
      await h.sql(`UPDATE secret_versions SET created_at = now() - make_interval(days => $2) WHERE credential_id = $1`, [res.body.id, ageDays]);
      return res.body.id as string;
    };
    const oldA = await store('billing-key', 'api_key', 120);
    const oldB = await store('search-key', 'api_key', 95);
    const fresh = await store('maps-key', 'api_key', 10);
    const oldPassword = await store('db-password', 'password', 200);

    const started = await h.api('POST', '/v1/rotations', {
      token: agent.token,
      // The team twice (as when the identity's own email is in notify): one summary, each run in it once.
      body: { filter: { kind: 'api_key', olderThanDays: 90 }, notify: [team, team], reason: 'quarterly hygiene' },
    });
    expect(started.status).toBe(202);
    expect(started.body.workflowIds.sort()).toEqual([`rotate:${oldA}`, `rotate:${oldB}`].sort());
    const batch = await h.client.workflow.getHandle(started.body.batchWorkflowId).result();
    expect(batch).toEqual({ total: 2, rotated: 2, failed: 0 });

    const versions = async (id: string) => (await h.sql('SELECT current_version FROM credentials WHERE id = $1', [id])).rows[0].current_version;
    expect(await versions(oldA)).toBe(2);
    expect(await versions(oldB)).toBe(2);
    expect(await versions(fresh)).toBe(1);
    expect(await versions(oldPassword)).toBe(1);
    for (const name of ['billing-key', 'search-key']) {
      h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
    }

    const [summary, ...more] = await waitForMail(team, 1);
    expect(more).toEqual([]);
    expect(summary!.mail.subject).toBe('[mailgent] Rotation batch: 2 rotated, 0 failed');
    expect(summary!.mail.text).toContain('(quarterly hygiene)');
    expect(summary!.mail.text).toMatch(/- billing-key: version 1 → 2; next due \d{4}-/);
    expect(summary!.mail.text).toMatch(/- search-key: version 1 → 2; next due/);
    expect(summary!.mail.text).not.toContain('maps-key');
    expect(summary!.mail.text!.split('- billing-key:').length - 1).toBe(1);

    const report = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
    expect(report.body.state).toBe('succeeded');
    expect(report.body.credentials.map((c: { name: string; outcome: string }) => [c.name, c.outcome])).toEqual([
      ['billing-key', 'rotated'],
      ['search-key', 'rotated'],
    ]);
  });

  it('a batch with a failing member reports it in the summary and as partial', async () => {
    const team = `mixed-${randomUUID().slice(0, 8)}@example.com`;
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'ok-key', kind: 'token', value: h.secret('ok-key-original'), rotation: { provider: 'generated', graceHours: 0 } } });
    const seed = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'seed', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DP') } } });
    // A seed given a policy before vault.store refused one (a request names only credentials with one): it fails at its plan.
    await h.sql(`UPDATE credentials SET rotation = '{"provider": "generated", "settings": {}, "periodDays": 90}' WHERE id = $1`, [seed.body.id]);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['ok-key', 'seed'], notify: [team] } });
    expect(await h.client.workflow.getHandle(started.body.batchWorkflowId).result()).toEqual({ total: 2, rotated: 1, failed: 1 });
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'ok-key' } })).body.value);
    const [summary] = await waitForMail(team, 1);
    expect(summary!.mail.subject).toBe('[mailgent] Rotation batch: 1 rotated, 1 failed');
    expect(summary!.mail.text).toContain("- seed: failed — credential 'seed' is a totp_seed; a generated value would not be a TOTP seed");
    expect((await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state).toBe('partial');
  });

  it("at the deadline a batch's rows never started are dropped, unless the batch is cancelled: then they stay, counted as cancelled", async () => {
    const store = async (name: string) => {
      const res = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: { name, kind: 'api_key', value: h.secret(`${name}-original-${randomUUID()}`), rotation: { provider: 'generated', graceHours: 0 } },
      });
      expect(res.status, res.text).toBe(201);
      return res.body.id as string;
    };
    const tag = randomUUID().slice(0, 8);
    const batches = [] as { cancelled: boolean; rotationId: string; held: string; heldName: string; waiting: string[] }[];
    for (const cancelled of [false, true]) {
      const prefix = `${cancelled ? 'cancelled' : 'going'}-${tag}`;
      batches.push({
        cancelled,
        rotationId: randomUUID(),
        held: await store(`${prefix}-held`),
        heldName: `${prefix}-held`,
        waiting: [await store(`${prefix}-waiting-1`), await store(`${prefix}-waiting-2`)],
      });
    }
    // Each batch's one started run held at its store (its credential's row locked), as a stuck run would be: still going at the deadline.
    const lock = new pg.Client({ connectionString: h.databaseUrl });
    await lock.connect();
    const runs: WorkflowHandle[] = [];
    try {
      await lock.query('BEGIN');
      await lock.query('SELECT id FROM credentials WHERE id = ANY($1::uuid[]) FOR NO KEY UPDATE', [batches.map((b) => b.held)]);
      for (const b of batches) {
        await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [b.rotationId, agent.id, `rotation:${b.rotationId}`]);
        const run = await h.client.workflow.start('rotateCredential', {
          taskQueue: h.taskQueue,
          workflowId: `rotate:${b.held}`,
          args: [{ rotationId: b.rotationId, identityId: agent.id, credentialId: b.held, mode: 'requested' }],
          memo: { rotationId: b.rotationId },
        });
        runs.push(run);
        await h.sql(
          `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id, start_sent_at)
           SELECT $1, c, 'rotate:' || c, CASE WHEN c = $2 THEN $3 END, CASE WHEN c = $2 THEN now() END FROM unnest($4::uuid[]) AS c`,
          [b.rotationId, b.held, run.firstExecutionRunId, [b.held, ...b.waiting]],
        );
        // Marked cancelled as the cancel's first statement (or a batch whose start failed) marks it; its wait is past its deadline all the same.
        if (b.cancelled) await h.sql('UPDATE rotations SET cancelled_at = now() WHERE id = $1', [b.rotationId]);
      }
      const acts = batchActivities(h.deps);
      const until = new Date(Date.now() - 1000).toISOString();
      const [going, cancelled] = batches as [(typeof batches)[0], (typeof batches)[0]];

      // Not cancelled: the rows never started are left to a later batch (deleted); the held run is counted open.
      expect(await acts.awaitOutcomes({ rotationId: going.rotationId, until, pollMs: 50 })).toEqual({ total: 1, rotated: 0, failed: 0, open: 1 });
      expect((await h.sql('SELECT credential_id FROM rotation_runs WHERE rotation_id = $1', [going.rotationId])).rows).toEqual([{ credential_id: going.held }]);

      // Cancelled: they stay, and count as cancelled (failed in the totals). Between 0c4aeff and 22f58e6 the deadline deleted them.
      expect(await acts.awaitOutcomes({ rotationId: cancelled.rotationId, until, pollMs: 50 })).toEqual({ total: 3, rotated: 0, failed: 2, open: 1 });
      const report = await h.api('GET', `/v1/rotations/${cancelled.rotationId}`, { token: agent.token });
      expect(report.status, report.text).toBe(200);
      const byId = new Map((report.body.credentials as { credentialId: string; outcome: string | null; state: string }[]).map((c) => [c.credentialId, c]));
      expect(byId.size).toBe(3);
      for (const id of cancelled.waiting) expect(byId.get(id)).toMatchObject({ runId: null, outcome: 'cancelled', state: 'cancelled' });
      expect(byId.get(cancelled.held)).toMatchObject({ outcome: null, state: 'running' });
      for (const run of runs) expect((await run.describe()).status.name).toBe('RUNNING');
    } finally {
      await lock.query('ROLLBACK').catch(() => undefined);
      await lock.end();
    }
    // Let go, each finishes on its own (the cancel's second half, cancelling the runs, was not played here).
    for (const run of runs) expect(await run.result()).toMatchObject({ state: 'succeeded' });
    for (const b of batches) h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: b.heldName } })).body.value);
  });
});

/**
 * A batch keeps at most BATCH_MAX_OPEN_ROTATIONS rotations open and starts the rest as those finish:
 * a 1,000-credential batch no longer opens 1,000 workflows against a worker cache of 200.
 */
describe('batch rotation in waves', () => {
  const maxOpen = 2;
  let h: Harness;
  let agent: { id: string; token: string };
  let receiver: WebhookReceiver;

  beforeAll(async () => {
    h = await startHarness({ worker: true, maxOpenRotations: maxOpen });
    agent = await h.createIdentity();
    const signingKey = h.secret(`whsec_${randomBytes(24).toString('hex')}`);
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'hook-key', kind: 'token', value: signingKey } });
    receiver = new WebhookReceiver(signingKey);
    await receiver.start();
  });
  afterAll(async () => {
    await receiver.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  const storeAll = async (prefix: string, count: number) => {
    const names = Array.from({ length: count }, (_, i) => `${prefix}-${i}`);
    const ids: string[] = [];
    for (const name of names) {
      const res = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: {
          name,
          kind: 'api_key',
          value: h.secret(`${name}-original-${randomUUID()}`),
          rotation: { provider: 'generated', graceHours: 0 },
          dependents: [{ type: 'webhook', settings: { url: receiver.url, signingKeyCredential: 'hook-key' } }],
        },
      });
      expect(res.status, res.text).toBe(201);
      ids.push(res.body.id);
    }
    return { names, ids };
  };
  const runsOf = async (rotationId: string) =>
    (await h.sql('SELECT credential_id, workflow_id, run_id FROM rotation_runs WHERE rotation_id = $1', [rotationId])).rows as {
      credential_id: string;
      workflow_id: string;
      run_id: string | null;
    }[];

  it('never has more than maxOpen rotations in progress, and rotates every credential', async () => {
    const { names } = await storeAll('wave', 5);
    receiver.delayMs = 150;
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: names } });
    expect(started.status).toBe(202);
    const early = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
    expect(early.body.credentials.filter((c: { state: string }) => c.state === 'not_started').length).toBeGreaterThanOrEqual(5 - maxOpen);
    expect(early.body.state).toBe('running');

    expect(await h.client.workflow.getHandle(started.body.batchWorkflowId).result()).toEqual({ total: 5, rotated: 5, failed: 0 });
    receiver.delayMs = 0;
    // In progress: from the workflow's start until its outcome (promoted or failed); a promoted run's
    // grace period and notices go on without holding a place in the batch.
    const spans = await Promise.all(
      (await runsOf(started.body.rotationId)).map(async (run) => {
        const d = await h.client.workflow.getHandle(run.workflow_id, run.run_id!).describe();
        const outcome = (await h.sql('SELECT finished_at FROM run_outcomes WHERE run_id = $1', [run.run_id])).rows[0];
        return { start: d.startTime.getTime(), close: (outcome.finished_at as Date).getTime() };
      }),
    );
    const openAt = (t: number) => spans.filter((s) => s.start <= t && t < s.close).length;
    expect(Math.max(...spans.map((s) => openAt(s.start)))).toBe(maxOpen);
    for (const name of names) {
      const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } });
      expect(read.body.version).toBe(2);
      h.secret(read.body.value);
    }
  });

  it('a batch that ended, or never started, before starting its rotations reports them not started, and no longer reads as running', async () => {
    const { names } = await storeAll('ended', 4);
    // The first wave's rotations are held at their dependents' update, so none ends (and no next wave
    // starts) before the batch is stopped.
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending') await held;
    };
    let first: Awaited<ReturnType<typeof runsOf>>;
    let started: Awaited<ReturnType<Harness['api']>>;
    try {
      started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: names } });
      expect(started.status).toBe(202);
      // Its first wave open, the batch is stopped by an operator before the next.
      first = await runsOf(started.body.rotationId);
      for (const deadline = Date.now() + 30_000; first.filter((r) => r.run_id).length < maxOpen; first = await runsOf(started.body.rotationId)) {
        if (Date.now() > deadline) throw new Error(`the first wave did not start: ${JSON.stringify(first)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      await h.client.workflow.getHandle(started.body.batchWorkflowId).terminate('stopped by an operator');
    } finally {
      release();
      receiver.onEvent = undefined;
    }
    const rotationId = started.body.rotationId as string;
    const report = () => h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
    expect((await report()).body.state).toBe('running');
    const startedRuns = (await runsOf(rotationId)).filter((r) => r.run_id);
    expect(startedRuns).toHaveLength(maxOpen);
    for (const run of startedRuns) await h.client.workflow.getHandle(run.workflow_id, run.run_id!).result();
    // The batch's wait (an activity, which hears of the stop at its next heartbeat, up to 24 s on)
    // polls every second: it starts no next wave. Before, it did, as these runs' outcomes came in.
    await new Promise((r) => setTimeout(r, 3_000));
    const after = await runsOf(rotationId);
    expect(after.filter((r) => r.run_id)).toHaveLength(maxOpen);
    for (const run of after.filter((r) => !r.run_id)) await expect(h.client.workflow.getHandle(run.workflow_id).describe()).rejects.toThrow(WorkflowNotFoundError);
    const ended = await report();
    const states = ended.body.credentials.map((c: { state: string }) => c.state).sort();
    // Before, 'running' for ever: the ones left waited on a batch that was gone.
    expect(ended.body.state, JSON.stringify(ended.body)).toBe('partial');
    expect(states.filter((s: string) => s === 'not_started')).toHaveLength(names.length - startedRuns.length);
    expect(states.filter((s: string) => s !== 'not_started'), JSON.stringify(ended.body)).toEqual(startedRuns.map(() => 'succeeded'));

    // A start the last wave sent without recording it: reported as the run it made went.
    const sent = first.find((r) => r.run_id)!;
    await h.sql('UPDATE rotation_runs SET run_id = NULL, start_sent_at = now() WHERE rotation_id = $1 AND credential_id = $2', [rotationId, sent.credential_id]);
    expect((await report()).body.credentials.find((c: { credentialId: string }) => c.credentialId === sent.credential_id)).toMatchObject({
      runId: sent.run_id,
      state: 'succeeded',
      outcome: 'rotated',
    });

    // A rotation recorded by a request whose process died before it started the batch: for a minute
    // its batch may still be starting (running); after that, never started.
    const orphan = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [orphan, agent.id, `rotation:${orphan}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [orphan, sent.credential_id, sent.workflow_id]);
    expect((await h.api('GET', `/v1/rotations/${orphan}`, { token: agent.token })).body.state).toBe('running');
    await h.sql(`UPDATE rotations SET created_at = now() - interval '2 minutes' WHERE id = $1`, [orphan]);
    const never = await h.api('GET', `/v1/rotations/${orphan}`, { token: agent.token });
    expect(never.body).toMatchObject({ state: 'not_started', credentials: [{ credentialId: sent.credential_id, state: 'not_started', runId: null }] });
  });

  it('a wave run again after it started a rotation but before it recorded it joins that rotation, even once finished', async () => {
    const { names, ids } = await storeAll('restarted', 1);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: names } });
    expect(started.status).toBe(202);
    expect(await h.client.workflow.getHandle(started.body.batchWorkflowId).result()).toEqual({ total: 1, rotated: 1, failed: 0 });
    const [first] = await runsOf(started.body.rotationId);
    // The batch counts a rotation once its outcome is recorded; the run ends after its last notice.
    await h.client.workflow.getHandle(first!.workflow_id, first!.run_id!).result();
    expect((await h.client.workflow.getHandle(first!.workflow_id, first!.run_id!).describe()).status.name).toBe('COMPLETED');
    const hooksBefore = receiver.events.length;

    // What a wave killed between the start and its UPDATE leaves behind: a started run with no run_id.
    await h.sql('UPDATE rotation_runs SET run_id = NULL WHERE rotation_id = $1', [started.body.rotationId]);
    expect(await batchActivities(h.deps).startRotations({ rotationId: started.body.rotationId })).toEqual({ started: 1 });

    const [again] = await runsOf(started.body.rotationId);
    expect(again!.run_id).toBe(first!.run_id);
    expect((await h.sql('SELECT current_version FROM credentials WHERE id = $1', [ids[0]])).rows[0].current_version).toBe(2);
    const runs: string[] = [];
    for await (const wf of h.client.workflow.list({ query: `WorkflowId = '${first!.workflow_id}'` })) runs.push(wf.runId);
    expect(runs).toEqual([first!.run_id]);
    expect(receiver.events.length).toBe(hooksBefore);
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: names[0] } })).body.value);
  });

  it('a batch cancelled with one rotation in its grace period and one before promotion reads cancelled, not failed', async () => {
    const tag = randomUUID().slice(0, 8);
    const store = async (name: string, kind: string) => {
      const res = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: { name, kind, value: h.secret(`${name}-original-${randomUUID()}`), rotation: { provider: 'generated', graceHours: 1 } },
      });
      expect(res.status, res.text).toBe(201);
    };
    await store(`in-grace-${tag}`, 'api_key');
    await store(`held-${tag}`, 'password');
    // A generated password reads its identity's password policy first: a lock on that table holds its rotation before promotion.
    const lock = await holdTable(h, 'password_policies');
    let rotationId: string;
    try {
      const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [`in-grace-${tag}`, `held-${tag}`] } });
      expect(started.status, started.text).toBe(202);
      rotationId = started.body.rotationId as string;
      await lock.waiting();
      for (;;) {
        const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
        if (report.body.credentials.find((c: { name: string }) => c.name === `in-grace-${tag}`)?.state === 'grace') break;
        await new Promise((r) => setTimeout(r, 150));
      }
      const cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token });
      expect(cancel.status, cancel.text).toBe(202);
    } finally {
      await lock.release();
    }
    for (;;) {
      const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      // Settled: the run in grace reads 'grace' until its rollback has finished (the batch 'partial'
      // beside a run already cancelled, for that moment).
      const settled = report.body.credentials.every((c: { state: string }) => !['running', 'grace', 'not_started'].includes(c.state));
      if (report.body.state !== 'running' && settled) {
        expect(Object.fromEntries(report.body.credentials.map((c: { name: string; state: string }) => [c.name, c.state]))).toEqual({
          [`in-grace-${tag}`]: 'rolled_back',
          [`held-${tag}`]: 'cancelled',
        });
        // Before, 'failed': nothing took effect, and the two outcomes differ.
        expect(report.body.state).toBe('cancelled');
        break;
      }
      await new Promise((r) => setTimeout(r, 150));
    }
    for (const name of [`in-grace-${tag}`, `held-${tag}`]) h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
  });

  it('cancelling a batch whose wave started a rotation but died before recording it cancels that rotation too', async () => {
    const name = `unrecorded-${randomUUID().slice(0, 8)}`;
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name, kind: 'api_key', value: h.secret(`${name}-original-${randomUUID()}`), rotation: { provider: 'generated', graceHours: 1 } },
    });
    expect(stored.status, stored.text).toBe(201);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(started.status).toBe(202);
    const rotationId = started.body.rotationId as string;
    const run = await (async () => {
      for (;;) {
        const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
        if (report.body.state === 'grace') return (await runsOf(rotationId))[0]!;
        await new Promise((r) => setTimeout(r, 150));
      }
    })();
    // What a wave killed between the start and its UPDATE leaves behind: a running rotation, no
    // run_id. (The batch's own wait would send the start again and record it: it is stopped first.)
    await h.client.workflow.getHandle(started.body.batchWorkflowId).terminate('the test plays a wave that died');
    await h.sql('UPDATE rotation_runs SET run_id = NULL WHERE rotation_id = $1', [rotationId]);

    const cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token });
    expect(cancel.status, cancel.text).toBe(202);
    // Before, it was answered as never started, and went on to the end of its grace period.
    expect(cancel.body).toMatchObject({ cancelling: [stored.body.id], notStarted: [] });
    expect(await h.client.workflow.getHandle(run.workflow_id, run.run_id!).result()).toMatchObject({ state: 'rolled_back' });
    expect((await runsOf(rotationId))[0]!.run_id).toBe(run.run_id);
    const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
    expect(report.body.credentials[0]).toMatchObject({ outcome: 'rolled_back' });

    // A rotation of the credential that another batch started is not this batch's to cancel, even
    // when this one sent a start it did not record (its start may never have reached Temporal).
    const other = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(other.status).toBe(202);
    const running = await (async () => {
      for (;;) {
        if ((await h.api('GET', `/v1/rotations/${other.body.rotationId}`, { token: agent.token })).body.state === 'grace') return (await runsOf(other.body.rotationId))[0]!;
        await new Promise((r) => setTimeout(r, 150));
      }
    })();
    const stray = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [stray, agent.id, `rotation:${stray}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at) VALUES ($1, $2, $3, now())`, [stray, stored.body.id, running.workflow_id]);
    const strayCancel = await h.api('DELETE', `/v1/rotations/${stray}`, { token: agent.token });
    expect(strayCancel.body).toMatchObject({ cancelling: [], notStarted: [stored.body.id] });
    expect((await h.client.workflow.getHandle(running.workflow_id, running.run_id!).describe()).status.name).toBe('RUNNING');
    expect((await h.api('DELETE', `/v1/rotations/${other.body.rotationId}`, { token: agent.token })).body).toMatchObject({ cancelling: [stored.body.id] });
    await h.client.workflow.getHandle(running.workflow_id, running.run_id!).result();
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
  });

  it('a start a wave sent but did not record is sent again first, not after every credential more overdue', async () => {
    const { names, ids } = await storeAll('resent', 3);
    const [sent] = ids as [string, string, string];
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, agent.id, `rotation:${rotationId}`]);
    // What a wave killed after sending a start and before recording it leaves: its row marked sent (it
    // may be running), the others waiting. The one sent is the least overdue (a run that promoted moves it back).
    await h.sql(
      `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at)
       SELECT $1, c, 'rotate:' || c, CASE WHEN c = $2 THEN now() END FROM unnest($3::uuid[]) AS c`,
      [rotationId, sent, ids],
    );
    await h.sql(`UPDATE credentials SET next_rotation_at = now() + CASE WHEN id = $1 THEN interval '90 days' ELSE interval '-1 day' END WHERE id = ANY($2::uuid[])`, [sent, ids]);
    // Before, it was sent last: the two more overdue took both places (maxOpen is 2), and it waited behind them.
    expect(await batchActivities(h.deps).startRotations({ rotationId })).toEqual({ started: maxOpen });
    const runs = await runsOf(rotationId);
    const startedRuns = runs.filter((r) => r.run_id !== null);
    expect(startedRuns.map((r) => r.credential_id)).toContain(sent);
    expect(startedRuns).toHaveLength(maxOpen);
    for (const run of startedRuns) await h.client.workflow.getHandle(run.workflow_id, run.run_id!).result();
    const notStarted = runs.filter((r) => r.run_id === null).map((r) => r.credential_id);
    expect(notStarted).toHaveLength(1);
    await expect(h.client.workflow.getHandle(`rotate:${notStarted[0]}`).describe()).rejects.toThrow(/not found/i);
    for (const run of startedRuns) h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: names[ids.indexOf(run.credential_id)] } })).body.value);
  });

  it('cancelling the batch cancels the open rotations, and the waiting ones never start', async () => {
    const team = `waves-${randomUUID().slice(0, 8)}@example.com`;
    const { names, ids } = await storeAll('held', 4);
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending') await held;
    };
    try {
      const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: names, notify: [team] } });
      const pendingFor = () => new Set(receiver.events.filter((e) => e.event.type === 'credential.pending' && ids.includes(e.event.credentialId)).map((e) => e.event.credentialId));
      await waitFor(() => pendingFor().size === maxOpen);
      const running = [...pendingFor()].sort();

      const cancelled = await h.api('DELETE', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      expect(cancelled.status, cancelled.text).toBe(202);
      expect([...cancelled.body.cancelling].sort()).toEqual(running);
      expect([...cancelled.body.notStarted].sort()).toEqual(ids.filter((id) => !running.includes(id)).sort());
      release();

      expect(await h.client.workflow.getHandle(started.body.batchWorkflowId).result()).toEqual({ total: 4, rotated: 0, failed: 4 });
      const report = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      expect(report.body.state).toBe('cancelled');
      expect(report.body.credentials.map((c: { state: string; outcome: string }) => [c.state, c.outcome])).toEqual(names.map(() => ['cancelled', 'cancelled']));

      const runs = await runsOf(started.body.rotationId);
      for (const id of cancelled.body.notStarted as string[]) {
        expect(runs.find((r) => r.credential_id === id)!.run_id).toBeNull();
        await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toThrow(/not found/i);
      }
      for (const name of names) expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.version).toBe(1);
      const [summary] = await waitForMail(team, 1);
      expect(summary!.mail.subject).toBe('[mailgent] Rotation batch: 0 rotated, 4 failed');
      expect(summary!.mail.text!.split('the batch was cancelled before this rotation started').length - 1).toBe(4 - maxOpen);
    } finally {
      release();
      receiver.onEvent = undefined;
    }
  });

  it('a cancel that comes while a wave is starting stops the rest of that wave: those rotations never start, and count as cancelled', async () => {
    const { names, ids } = await storeAll('mid-wave', 3);
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, agent.id, `rotation:${rotationId}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) SELECT $1, c, 'rotate:' || c FROM unnest($2::uuid[]) AS c`, [rotationId, ids]);
    // The batch's wave, as the worker runs it, but on a pool that lets the test act between its statements:
    // the owner's cancel lands once the wave has read its rows and recorded its first rotation.
    let wave: string[] | undefined;
    let cancel: Awaited<ReturnType<Harness['api']>> | undefined;
    const pool = h.deps.pool;
    const query = async (text: string, params?: unknown[]) => {
      const result = await pool.query(text, params);
      if (wave === undefined && text.includes('ORDER BY r.start_sent_at IS NULL, r.due_at')) wave = result.rows.map((r) => r.credential_id as string);
      if (cancel === undefined && text.includes('SET run_id = $3 FROM rotations')) cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token });
      return result;
    };
    const deps = { ...h.deps, pool: new Proxy(pool, { get: (target, prop) => (prop === 'query' ? query : Reflect.get(target, prop)) }) };
    // Held at their first webhook, the rotations started are still running when the cancel comes.
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending') await held;
    };
    try {
      // Before, the wave started the second too (and cancelled it at once: { started: 2 }).
      expect(await batchActivities(deps).startRotations({ rotationId })).toEqual({ started: 1 });
      expect(wave).toHaveLength(maxOpen);
      const [first, second] = wave as [string, string];
      const third = ids.find((id) => !wave!.includes(id))!;
      expect(cancel?.status, cancel?.text).toBe(202);
      expect({ ...cancel!.body, notStarted: [...cancel!.body.notStarted].sort() }).toEqual({ rotationId, cancelling: [first], notStarted: [second, third].sort(), finishing: [] });

      const runs = await runsOf(rotationId);
      const runOf = (id: string) => runs.find((r) => r.credential_id === id)!;
      expect(runOf(first).run_id).not.toBeNull();
      for (const id of [second, third]) {
        expect(runOf(id).run_id).toBeNull();
        expect((await h.sql('SELECT start_sent_at FROM rotation_runs WHERE rotation_id = $1 AND credential_id = $2', [rotationId, id])).rows[0].start_sent_at).toBeNull();
        await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toThrow(/not found/i);
      }
      release();
      expect(await h.client.workflow.getHandle(runOf(first).workflow_id, runOf(first).run_id!).result()).toMatchObject({ state: 'cancelled' });
      // The batch's wait: nothing left to start, every row with its outcome.
      expect(await batchActivities(h.deps).awaitOutcomes({ rotationId, pollMs: 50 })).toEqual({ total: 3, rotated: 0, failed: 3 });
      const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      expect(report.body.state).toBe('cancelled');
      expect(report.body.credentials.map((c: { credentialId: string; state: string; outcome: string }) => [c.credentialId, c.state, c.outcome]).sort()).toEqual(
        ids.map((id) => [id, 'cancelled', 'cancelled']).sort(),
      );
      expect(receiver.events.filter((e) => e.event.type === 'credential.pending' && [second, third].includes(e.event.credentialId))).toEqual([]);
      for (const name of names) expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.version).toBe(1);
    } finally {
      release();
      receiver.onEvent = undefined;
    }
  });

  it("a batch's wait ends with totals that are its rows' own outcomes: rotated, failed, ended unreported, cancelled, and never started", async () => {
    const { names, ids } = await storeAll('mixed', 4);
    const [ok, terminated, cancelledRun, waiting] = ids as [string, string, string, string];
    const seedName = `mixed-seed-${randomUUID().slice(0, 8)}`;
    const seedRes = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: seedName, kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DP') } } });
    expect(seedRes.status, seedRes.text).toBe(201);
    const seed = seedRes.body.id as string;
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, agent.id, `rotation:${rotationId}`]);
    // The waves' order (most overdue when the runs were added, first): ok and the seed, then the two that are held, then the one left waiting.
    await h.sql(
      `UPDATE credentials SET next_rotation_at = now() - make_interval(days => CASE WHEN id = ANY($1::uuid[]) THEN 3 WHEN id = ANY($2::uuid[]) THEN 2 ELSE 1 END)
        WHERE id = ANY($3::uuid[])`,
      [[ok, seed], [terminated, cancelledRun], [...ids, seed]],
    );
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) SELECT $1, c, 'rotate:' || c FROM unnest($2::uuid[]) AS c`, [rotationId, [...ids, seed]]);
    const acts = batchActivities(h.deps);
    const outcomeOf = async (id: string) => (await h.sql('SELECT o.outcome FROM rotation_runs r JOIN run_outcomes o ON o.run_id = r.run_id WHERE r.rotation_id = $1 AND r.credential_id = $2', [rotationId, id])).rows[0]?.outcome as string | undefined;
    expect(await acts.startRotations({ rotationId })).toEqual({ started: maxOpen });
    // The first wave's runs, ended (the seed's fails: a generated value would not be a TOTP seed).
    expect(await h.client.workflow.getHandle(`rotate:${ok}`).result()).toMatchObject({ state: 'succeeded' });
    await expect(h.client.workflow.getHandle(`rotate:${seed}`).result()).rejects.toThrow();
    expect([await outcomeOf(ok), await outcomeOf(seed)]).toEqual(['rotated', 'failed']);

    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending') await held;
    };
    try {
      expect(await acts.startRotations({ rotationId })).toEqual({ started: maxOpen });
      await waitFor(() => new Set(receiver.events.filter((e) => e.event.type === 'credential.pending' && [terminated, cancelledRun].includes(e.event.credentialId)).map((e) => e.event.credentialId)).size === 2);
      // One run stopped by an operator (it reports no outcome), then the batch cancelled: the other run cancelled, the last never started.
      await h.client.workflow.getHandle(`rotate:${terminated}`).terminate('stopped by an operator');
      const cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token });
      expect(cancel.body).toMatchObject({ cancelling: [cancelledRun], notStarted: [waiting] });
      release();
      const totals = await acts.awaitOutcomes({ rotationId, pollMs: 50 });

      // Each row's outcome as the batch's report gives it.
      const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      const rows = report.body.credentials as { credentialId: string; outcome: string | null }[];
      const outcomes = Object.fromEntries(rows.map((r) => [r.credentialId, r.outcome]));
      expect(outcomes).toEqual({ [ok]: 'rotated', [seed]: 'failed', [terminated]: 'failed', [cancelledRun]: 'cancelled', [waiting]: 'cancelled' });
      // The terminated run's failure is the wait's own record of it (the run reported none).
      expect((await h.sql('SELECT o.error FROM rotation_runs r JOIN run_outcomes o ON o.run_id = r.run_id WHERE r.rotation_id = $1 AND r.credential_id = $2', [rotationId, terminated])).rows).toEqual([
        { error: 'the rotation ended as terminated without reporting an outcome' },
      ]);
      expect(totals).toEqual({
        total: rows.length,
        rotated: rows.filter((r) => r.outcome === 'rotated').length,
        failed: rows.filter((r) => r.outcome !== 'rotated').length,
      });
      expect(totals).toEqual({ total: 5, rotated: 1, failed: 4 });
    } finally {
      release();
      receiver.onEvent = undefined;
    }
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: names[0] } })).body.value);
  });
  /** A wave's start that reached Temporal, whose attempt died before recording the run: the row marked sent, no run_id. */
  const sentUnrecorded = async (ids: string[]) => {
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, agent.id, `rotation:${rotationId}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at) SELECT $1, c, 'rotate:' || c, now() FROM unnest($2::uuid[]) AS c`, [rotationId, ids]);
    const runs = new Map<string, WorkflowHandleWithFirstExecutionRunId>();
    for (const id of ids) {
      runs.set(
        id,
        await h.client.workflow.start('rotateCredential', {
          taskQueue: h.taskQueue,
          workflowId: `rotate:${id}`,
          args: [{ rotationId, identityId: agent.id, credentialId: id, mode: 'requested' }],
          memo: { rotationId },
        }),
      );
    }
    return { rotationId, runs };
  };

  it('cancelling a batch whose unrecorded rotation has already ended records that run: it rotated, and is reported so, not as cancelled before it started', async () => {
    const { names, ids } = await storeAll('ended-unrecorded', 1);
    const [id] = ids as [string];
    const { rotationId, runs } = await sentUnrecorded(ids);
    const run = runs.get(id)!;
    expect(await run.result()).toMatchObject({ state: 'succeeded' });
    expect((await h.sql('SELECT outcome FROM run_outcomes WHERE run_id = $1', [run.firstExecutionRunId])).rows).toEqual([{ outcome: 'rotated' }]);

    const cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token });
    expect(cancel.status, cancel.text).toBe(202);
    // Before, it was answered as not started (the route took over only a run still running), and read as cancelled.
    expect(cancel.body).toEqual({ rotationId, cancelling: [], notStarted: [], finishing: [] });
    expect((await runsOf(rotationId))[0]!.run_id).toBe(run.firstExecutionRunId);

    const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
    expect(report.status, report.text).toBe(200);
    expect(report.body.state).toBe('succeeded');
    expect(report.body.credentials).toHaveLength(1);
    expect(report.body.credentials[0]).toMatchObject({ credentialId: id, runId: run.firstExecutionRunId, outcome: 'rotated', state: 'succeeded' });
    // The batch's wait counts it by its outcome (before: { total: 1, rotated: 0, failed: 1 }, the credential at version 2).
    expect(await batchActivities(h.deps).awaitOutcomes({ rotationId, pollMs: 50 })).toEqual({ total: 1, rotated: 1, failed: 0 });
    const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: names[0] } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
  });

  it("a batch's unrecorded run that ended before another rotation of the credential began is still found: taken over, not started again", async () => {
    const { ids } = await storeAll('behind-newer', 1);
    const [id] = ids as [string];
    const { rotationId, runs } = await sentUnrecorded(ids);
    const run = runs.get(id)!;
    expect(await run.result()).toMatchObject({ state: 'succeeded' });
    // Then another's rotation of the same credential (a leak's, another batch's): now the workflow's newest run.
    const other = randomUUID();
    const newer = await h.client.workflow.start('rotateCredential', {
      taskQueue: h.taskQueue,
      workflowId: `rotate:${id}`,
      args: [{ rotationId: other, identityId: agent.id, credentialId: id, mode: 'requested' }],
      memo: { rotationId: other },
    });
    expect(await newer.result()).toMatchObject({ state: 'succeeded' });

    // The wave run again: before, it read the newest run only, took the start for unsent and sent it
    // again (a third rotation, the batch's second); it joins the batch's run instead.
    expect(await batchActivities(h.deps).startRotations({ rotationId })).toEqual({ started: 1 });
    expect((await runsOf(rotationId)).map((r) => r.run_id)).toEqual([run.firstExecutionRunId]);
    expect(await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token }).then((r) => r.body.credentials[0])).toMatchObject({ outcome: 'rotated' });
    const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { id } });
    expect(read.body.version).toBe(3);
    h.secret(read.body.value);
  });

  it("a wave that joined another's rotation of a credential and died before recording it records that run when run again, ended since: the credential is not rotated twice", async () => {
    const { ids } = await storeAll('joined-unrecorded', 1);
    const [id] = ids as [string];
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending' && received.event.credentialId === id) await held;
    };
    const other = randomUUID();
    let theirs: WorkflowHandleWithFirstExecutionRunId;
    const rotationId = randomUUID();
    try {
      // Another's rotation of the credential (a leak's, another batch's), running when the wave marks its start sent.
      theirs = await h.client.workflow.start('rotateCredential', {
        taskQueue: h.taskQueue,
        workflowId: `rotate:${id}`,
        args: [{ rotationId: other, identityId: agent.id, credentialId: id, mode: 'requested' }],
        memo: { rotationId: other },
      });
      await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, agent.id, `rotation:${rotationId}`]);
      await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at) VALUES ($1, $2, $3, now())`, [rotationId, id, `rotate:${id}`]);
      // The wave's start, as it sent it: joined (the server answers with their run), and the wave died before recording it.
      const joined = await h.client.workflow.start('rotateCredential', {
        taskQueue: h.taskQueue,
        workflowId: `rotate:${id}`,
        args: [{ rotationId, identityId: agent.id, credentialId: id, mode: 'requested' }],
        workflowIdConflictPolicy: 'USE_EXISTING',
        memo: { rotationId },
      });
      expect(joined.firstExecutionRunId).toBe(theirs.firstExecutionRunId);
    } finally {
      release();
      receiver.onEvent = undefined;
    }
    expect(await theirs.result()).toMatchObject({ state: 'succeeded' });

    // The wave run again: before, it found no run of the batch's, took the start for unsent and
    // sent it again, which made a run of its own (a second rotation: version 3).
    expect(await batchActivities(h.deps).startRotations({ rotationId })).toEqual({ started: 1 });
    expect((await runsOf(rotationId)).map((r) => r.run_id)).toEqual([theirs.firstExecutionRunId]);
    expect((await h.client.workflow.getHandle(`rotate:${id}`).describe()).runId).toBe(theirs.firstExecutionRunId);
    expect(await batchActivities(h.deps).awaitOutcomes({ rotationId, pollMs: 50 })).toEqual({ total: 1, rotated: 1, failed: 0 });
    const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { id } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
  });

  it('a start marked sent that joined nothing (no run of the credential open since the mark) is sent when the wave runs again', async () => {
    const { ids } = await storeAll('joined-nothing', 1);
    const [id] = ids as [string];
    // A rotation of the credential that ended before the wave marked its start sent, and the start never left.
    const before = await h.client.workflow.start('rotateCredential', {
      taskQueue: h.taskQueue,
      workflowId: `rotate:${id}`,
      args: [{ rotationId: randomUUID(), identityId: agent.id, credentialId: id, mode: 'requested' }],
    });
    expect(await before.result()).toMatchObject({ state: 'succeeded' });
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, agent.id, `rotation:${rotationId}`]);
    // Marked two seconds after that run closed (beyond the clock slack allowed).
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, start_sent_at) VALUES ($1, $2, $3, now() + interval '2 seconds')`, [rotationId, id, `rotate:${id}`]);

    expect(await batchActivities(h.deps).startRotations({ rotationId })).toEqual({ started: 1 });
    const [run] = await runsOf(rotationId);
    expect(run!.run_id).not.toBe(before.firstExecutionRunId);
    expect(await h.client.workflow.getHandle(`rotate:${id}`, run!.run_id!).result()).toMatchObject({ state: 'succeeded' });
    const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { id } });
    expect(read.body.version).toBe(3);
    h.secret(read.body.value);
  });

  it('at the deadline a run taken over from a start sent but unrecorded, ended since, is counted by how it ended, not as still rotating', async () => {
    const { names, ids } = await storeAll('ended-at-deadline', 2);
    const [completed, terminated] = ids as [string, string];
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending' && received.event.credentialId === terminated) await held;
    };
    try {
      const { rotationId, runs } = await sentUnrecorded(ids);
      expect(await runs.get(completed)!.result()).toMatchObject({ state: 'succeeded' });
      // The other stopped by an operator while it runs: it ends without reporting an outcome.
      await waitFor(() => receiver.events.some((e) => e.event.type === 'credential.pending' && e.event.credentialId === terminated));
      await runs.get(terminated)!.terminate('stopped by an operator');
      release();
      expect((await runs.get(terminated)!.describe()).status.name).toBe('TERMINATED');

      const until = new Date(Date.now() - 1000).toISOString();
      // Before, the terminated run was taken over after the wait had settled the runs it knew of: { total: 2, rotated: 1, failed: 0, open: 1 }.
      expect(await batchActivities(h.deps).awaitOutcomes({ rotationId, until, pollMs: 50 })).toEqual({ total: 2, rotated: 1, failed: 1 });
      const rows = await runsOf(rotationId);
      for (const id of ids) expect(rows.find((r) => r.credential_id === id)!.run_id).toBe(runs.get(id)!.firstExecutionRunId);
      expect((await h.sql('SELECT outcome, error FROM run_outcomes WHERE run_id = $1', [runs.get(terminated)!.firstExecutionRunId])).rows).toEqual([
        { outcome: 'failed', error: 'the rotation ended as terminated without reporting an outcome' },
      ]);
      const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      expect(Object.fromEntries((report.body.credentials as { credentialId: string; outcome: string }[]).map((c) => [c.credentialId, c.outcome]))).toEqual({
        [completed]: 'rotated',
        [terminated]: 'failed',
      });
    } finally {
      release();
      receiver.onEvent = undefined;
    }
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: names[0] } })).body.value);
  });

  it("a batch marked cancelled by a cancel that failed before it looked for a start sent but unrecorded: the batch's wait finds that run, cancels it and waits for it", async () => {
    const { names, ids } = await storeAll('cancel-half-done', 1);
    const [id] = ids as [string];
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    receiver.onEvent = async (received) => {
      if (received.event.type === 'credential.pending' && received.event.credentialId === id) await held;
    };
    try {
      const { rotationId, runs } = await sentUnrecorded(ids);
      const run = runs.get(id)!;
      await waitFor(() => receiver.events.some((e) => e.event.type === 'credential.pending' && e.event.credentialId === id));
      // The cancel's first statement only (Temporal unreachable after it: its answer a 503).
      await h.sql('UPDATE rotations SET cancelled_at = now() WHERE id = $1', [rotationId]);
      const waited = batchActivities(h.deps).awaitOutcomes({ rotationId, pollMs: 50 });
      // Before, the wait returned at once ({ total: 1, failed: 1 }: "cancelled before it started") and the run went on to rotate the credential.
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      release();
      expect(await waited).toEqual({ total: 1, rotated: 0, failed: 1 });
      expect(await run.result()).toMatchObject({ state: 'cancelled' });
      expect((await runsOf(rotationId))[0]!.run_id).toBe(run.firstExecutionRunId);
      const report = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      expect(report.body.credentials[0]).toMatchObject({ credentialId: id, runId: run.firstExecutionRunId, outcome: 'cancelled' });
      expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: names[0] } })).body.version).toBe(1);
    } finally {
      release();
      receiver.onEvent = undefined;
    }
  });
});

async function waitFor(ready: () => boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 50));
  }
}
