import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer as createHttpServer } from 'node:http';
import { createServer, type AddressInfo } from 'node:net';
import { Client, Connection, defaultGrpcRetryOptions, makeGrpcRetryInterceptor, WorkflowFailedError, WorkflowNotFoundError } from '@temporalio/client';
import { sendMail } from '../api/routes/mail';
import { rollbackRotation, rotationStatus, startRotation } from '../api/routes/rotations';
import { ApplicationFailure } from '@temporalio/common';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { keyed } from '../api/idempotency';
import { holdTable } from './support/lifecycle-fixtures';
import { createActivities } from '../activities';
import { decodedHistoryText, expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { waitForMail } from './support/mail';

/** Rotation through the real Temporal dev server, a real worker, PostgreSQL and the SMTP sink. */
describe('rotateCredential', () => {
  let h: Harness;
  let agent: { id: string; token: string };

  const waitForRotation = async (rotationId: string, token = agent.token) => {
    let last: unknown;
    for (let i = 0; i < 150; i++) {
      const res = await h.api('GET', `/v1/rotations/${rotationId}`, { token });
      if (res.body.state !== 'running') return res.body;
      last = res.body;
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(`rotation ${rotationId} did not finish: ${JSON.stringify(last)}`);
  };
  const history = async (workflowId: string) => decodedHistoryText(h, await h.client.workflow.getHandle(workflowId).fetchHistory());

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity('rotator', 'rotator-identity@example.com');
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('creates a pending version, promotes it (v1 kept as previous) and emails the owners once, without either value', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const v1 = h.secret('sk_live_original_value_0001');
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: {
        name: 'payments-key',
        kind: 'api_key',
        value: v1,
        owners: [owner],
        rotation: { provider: 'generated', settings: { length: 40, prefix: 'sk_' }, periodDays: 90, graceHours: 0 },
      },
    });
    const credentialId = stored.body.id;

    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['payments-key'], reason: 'quarterly' } });
    expect(started.status).toBe(202);
    expect(started.body.workflowIds).toEqual([`rotate:${credentialId}`]);
    expect(started.body.batchWorkflowId).toBe(`rotation:${started.body.rotationId}`);
    const report = await waitForRotation(started.body.rotationId);
    expect(report).toMatchObject({ state: 'succeeded', reason: 'quarterly' });
    expect(report.credentials[0]).toMatchObject({
      credentialId,
      name: 'payments-key',
      status: 'COMPLETED',
      progress: {
        state: 'succeeded',
        fromVersion: 1,
        toVersion: 2,
        steps: [
          { name: 'create_pending', state: 'done', attempt: 1 },
          { name: 'apply_dependents', state: 'skipped' },
          { name: 'verify', state: 'done' },
          { name: 'compensate', state: 'skipped' },
          { name: 'promote', state: 'done' },
          { name: 'notify', state: 'done' },
          { name: 'grace', state: 'skipped' },
          { name: 'revoke_previous', state: 'done' },
        ],
      },
    });

    const current = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'payments-key' } });
    expect(current.body).toMatchObject({ version: 2, label: 'current' });
    const v2 = h.secret(current.body.value as string);
    expect(v2).toMatch(/^sk_[A-Za-z0-9]{40}$/);
    const previous = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'payments-key', version: 1 } });
    expect(previous.body).toMatchObject({ label: 'previous', value: v1 });

    const mails = await waitForMail(owner);
    expect(mails).toHaveLength(1);
    const [notice] = mails;
    expect(notice!.mail.subject).toBe('[mailgent] Rotated payments-key');
    expect(notice!.mail.text).toContain('Version 2 is now current.\nVersion 1 has been revoked.');
    for (const value of [v1, v2]) {
      expect(notice!.raw).not.toContain(value);
      expect(notice!.raw).not.toContain(Buffer.from(value).toString('base64'));
    }

    const events = await history(`rotate:${credentialId}`);
    expect(events).toContain(credentialId);
    for (const value of [v1, v2]) {
      expect(events).not.toContain(value);
      expect(events).not.toContain(Buffer.from(value).toString('base64'));
    }

    const audit = (await h.sql('SELECT action, outcome, actor FROM audit_log WHERE credential_id = $1 ORDER BY seq', [credentialId])).rows;
    const workflowActor = `workflow:rotate:${credentialId}`;
    expect(audit.filter((a) => a.actor === workflowActor).map((a) => a.action)).toEqual([
      'rotation.read', // the current value, for the provider's create
      'rotation.create_pending',
      'rotation.read', // the pending value, for verify
      'rotation.promote',
      'rotation.read', // the previous value, for revoke
      'rotation.revoke',
      'mail.send',
    ]);
    expect(audit.every((a) => a.outcome === 'ok')).toBe(true);

    // The same credential can be rotated again once the first run is closed.
    const again = await h.api('POST', '/v1/rotations', { token: agent.token, body: { filter: { kind: 'api_key' } } });
    expect((await waitForRotation(again.body.rotationId)).state).toBe('succeeded');
    const third = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'payments-key' } });
    h.secret(third.body.value);
    expect(third.body).toMatchObject({ version: 3, label: 'current' });
    expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'payments-key', version: 1 } })).body.label).toBeNull();
  });

  it('a failing rotation compensates, marks the credential rotation_failed, tells the owners and fails the run', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'totp-login', kind: 'totp_seed', owners: [owner], totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP') } },
    });
    // A seed given a policy before vault.store and PATCH refused one (a request names only credentials with one): its plan fails.
    await h.sql(`UPDATE credentials SET rotation = '{"provider": "generated", "settings": {}, "periodDays": 90}' WHERE id = $1`, [stored.body.id]);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [stored.body.id] } });
    const report = await waitForRotation(started.body.rotationId);
    expect(report.state).toBe('failed');
    expect(report.credentials[0]).toMatchObject({
      status: 'FAILED',
      progress: {
        state: 'failed',
        error: "credential 'totp-login' is a totp_seed; a generated value would not be a TOTP seed",
        steps: [
          { name: 'create_pending', state: 'skipped' },
          { name: 'apply_dependents', state: 'skipped' },
          { name: 'verify', state: 'skipped' },
          { name: 'compensate', state: 'skipped' },
          { name: 'promote', state: 'skipped' },
          { name: 'notify', state: 'done' },
          { name: 'grace', state: 'skipped' },
          { name: 'revoke_previous', state: 'skipped' },
        ],
      },
    });

    const failure = await h.client.workflow.getHandle(`rotate:${stored.body.id}`).result().catch((e) => e);
    expect(failure).toBeInstanceOf(WorkflowFailedError);
    expect(failure.cause).toBeInstanceOf(ApplicationFailure);
    expect(failure.cause.type).toBe('RotationFailed');

    const list = await h.api('GET', '/v1/credentials', { token: agent.token });
    expect(list.body.items.find((c: { name: string }) => c.name === 'totp-login')).toMatchObject({ status: 'rotation_failed', version: 1, pendingVersion: null });
    const [notice] = await waitForMail(owner);
    expect(notice!.mail.subject).toBe('[mailgent] Rotation FAILED for totp-login');
    expect(notice!.mail.text).toContain('Error: credential \'totp-login\' is a totp_seed');
    // The seed still produces codes: nothing changed.
    expect((await h.api('POST', '/v1/vault.totp', { token: agent.token, body: { name: 'totp-login' } })).status).toBe(200);
  });

  it('two requests for one credential make one run and one new version', async () => {
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'shared', kind: 'token', value: h.secret('shared-token-value-1'), rotation: { provider: 'generated' } } });
    // Hold the credential's row lock so the first run cannot finish before the second request arrives.
    const lock = new pg.Client({ connectionString: h.databaseUrl });
    await lock.connect();
    await lock.query('BEGIN');
    await lock.query("SELECT 1 FROM credentials WHERE name = 'shared' FOR NO KEY UPDATE");
    const [a, b] = await Promise.all([
      h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['shared'] } }),
      h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['shared'] } }),
    ]);
    await lock.query('COMMIT');
    await lock.end();
    await waitForRotation(a.body.rotationId);
    await waitForRotation(b.body.rotationId);
    const runs = (await h.sql('SELECT DISTINCT run_id FROM rotation_runs r JOIN credentials c ON c.id = r.credential_id WHERE c.name = $1', ['shared'])).rows;
    expect(runs).toHaveLength(1);
    const current = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'shared' } });
    h.secret(current.body.value);
    expect(current.body.version).toBe(2);
  });

  it('an undo on a worker without the credential\'s provider is refused, as every other step is: the pending version stays, not taken as discarded', async () => {
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'undo-no-provider', kind: 'api_key', value: h.secret('undo-no-provider-v1'), rotation: { provider: 'generated', periodDays: 30 } },
    });
    expect(stored.status, stored.text).toBe(201);
    const rotationId = randomUUID();
    await h.sql('INSERT INTO rotations (id, identity_id) VALUES ($1, $2)', [rotationId, agent.id]);
    const ids = { rotationId, identityId: agent.id, credentialId: stored.body.id, workflowId: `rotate:${stored.body.id}` };
    const acts = createActivities(h.deps);
    await acts.planRotation(ids);
    const staged = await acts.createPendingVersion({ ...ids, attempt: 1 });
    const { generated: _gone, ...others } = h.deps.providers;
    // Before, the provider was passed over, and the pending version discarded as if undone there.
    await expect(createActivities({ ...h.deps, providers: others }).discardAttempt({ ...ids, attempt: 1, current: 1 })).rejects.toThrow(
      "rotation provider 'generated' is not installed on this worker",
    );
    expect((await h.sql('SELECT pending_version FROM credentials WHERE id = $1', [ids.credentialId])).rows[0].pending_version).toBe(staged.version);
    await acts.discardAttempt({ ...ids, attempt: 1, current: 1 });
    expect((await h.sql('SELECT pending_version FROM credentials WHERE id = $1', [ids.credentialId])).rows[0].pending_version).toBeNull();
  });

  it('every step is idempotent: a retried activity makes no second version and sends no second notice', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'retry-me', kind: 'password', owners: [owner], value: h.secret('retry-original-pass') } });
    const acts = createActivities(h.deps);
    const rotationId = randomUUID();
    await h.sql('INSERT INTO rotations (id, identity_id) VALUES ($1, $2)', [rotationId, agent.id]);
    const ids = { rotationId, identityId: agent.id, credentialId: stored.body.id, workflowId: `rotate:${stored.body.id}` };
    const first = await acts.createPendingVersion({ ...ids, attempt: 1 });
    const retried = await acts.createPendingVersion({ ...ids, attempt: 1 });
    expect(retried).toEqual(first);
    await acts.promotePendingVersion({ ...ids, version: first.version });
    expect(await acts.promotePendingVersion({ ...ids, version: first.version })).toMatchObject({ current: 2, previous: 1 });
    const notice = { ...ids, outcome: 'rotated' as const, mode: 'requested' as const, fromVersion: 1, toVersion: 2 };
    expect((await acts.sendRotationNotice(notice)).delivery).toBe('sent');
    expect((await acts.sendRotationNotice(notice)).delivery).toBe('already-sent');
    expect(await waitForMail(owner, 2, 2_000)).toHaveLength(1);
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'retry-me' } })).body.value);
    // A revoke retried after its commit: the version keeps the time of its revocation, and the repeat's row says replayed, not a second revocation.
    await acts.revokeVersion({ ...ids, version: 1 });
    const revokedAt = (await h.sql('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [stored.body.id])).rows[0].revoked_at;
    await acts.revokeVersion({ ...ids, version: 1 });
    expect((await h.sql('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [stored.body.id])).rows[0].revoked_at).toEqual(revokedAt);
    const rows = (await h.sql(`SELECT detail FROM audit_log WHERE credential_id = $1 AND action = 'rotation.revoke' ORDER BY seq`, [stored.body.id])).rows;
    expect(rows.map((r) => r.detail.replayed ?? false)).toEqual([false, true]);
  });

  it('a pending version left by an abandoned rotation does not block the next one', async () => {
    const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'stuck', kind: 'password', value: h.secret('stuck-original-pass'), rotation: { provider: 'generated' } } });
    const acts = createActivities(h.deps);
    const abandoned = { rotationId: randomUUID(), identityId: agent.id, credentialId: stored.body.id, workflowId: 'abandoned' };
    const pending = await acts.createPendingVersion({ ...abandoned, attempt: 1 });
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'stuck', version: pending.version } })).body.value);

    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['stuck'] } });
    // Without a policy the default grace period (24 hours) applies: promoted, previous still valid.
    expect((await waitForRotation(started.body.rotationId)).state).toBe('grace');
    const current = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'stuck' } });
    h.secret(current.body.value);
    expect(current.body).toMatchObject({ version: 3, label: 'current' });
    // The abandoned pending version can no longer be promoted over the newer one.
    await expect(acts.promotePendingVersion({ ...abandoned, version: pending.version })).rejects.toThrow(/is not pending/);
  });

  it('rejects an empty selection and unknown credentials before starting anything', async () => {
    const none = await h.api('POST', '/v1/rotations', { token: agent.token, body: { filter: { kind: 'service_account' } } });
    expect(none.status).toBe(422);
    const missing = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['payments-key', 'ghost'] } });
    expect(missing.status).toBe(404);
    expect(missing.body.detail).toBe('no credential named or with id: ghost');
    expect((await h.api('GET', '/v1/rotations/not-a-uuid', { token: agent.token })).status).toBe(404);
    // Shaped like a UUID to a loose check, but not one: still a 404, never the database's 500.
    expect((await h.api('GET', `/v1/rotations/${'-'.repeat(36)}`, { token: agent.token })).status).toBe(404);
    expect((await h.api('DELETE', `/v1/rotations/${'-'.repeat(36)}`, { token: agent.token })).status).toBe(404);
    const other = await h.createIdentity();
    const mine = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['payments-key'] } });
    expect((await h.api('GET', `/v1/rotations/${mine.body.rotationId}`, { token: other.token })).status).toBe(404);
    await waitForRotation(mine.body.rotationId);
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'payments-key' } })).body.value);
  });

  it('rotates only credentials with a rotation policy: one named without is a 422 and nothing starts; a filter passes over them', async () => {
    const asker = await h.createIdentity();
    const store = (name: string, extra: Record<string, unknown> = {}) =>
      h.api('POST', '/v1/vault.store', { token: asker.token, body: { name, kind: 'api_key', value: h.secret(`sk_live_${name}_value_0001`), ...extra } });
    const unmanaged = await store('issued-elsewhere');
    await store('managed-key', { rotation: { provider: 'generated', graceHours: 0 } });
    // Before: rotated with the generated provider's defaults, a random value in the issued key's place.
    const named = await h.api('POST', '/v1/rotations', { token: asker.token, body: { credentials: ['managed-key', 'issued-elsewhere'] } });
    expect(named.status, named.text).toBe(422);
    expect(named.body.detail).toBe(
      'no rotation policy: issued-elsewhere; a credential is rotated by its policy\'s provider, so give it one first (PATCH /v1/credentials/:ref with rotation)',
    );
    expect((await h.sql('SELECT count(*)::int AS n FROM rotations WHERE identity_id = $1', [asker.id])).rows[0].n).toBe(0);
    const byFilter = await h.api('POST', '/v1/rotations', { token: asker.token, body: { filter: { kind: 'api_key' } } });
    expect(byFilter.status, byFilter.text).toBe(202);
    expect(byFilter.body.workflowIds).toHaveLength(1);
    expect((await waitForRotation(byFilter.body.rotationId, asker.token)).credentials).toEqual([expect.objectContaining({ name: 'managed-key', state: 'succeeded' })]);
    const kept = await h.api('POST', '/v1/vault.get', { token: asker.token, body: { name: 'issued-elsewhere' } });
    expect(kept.body).toMatchObject({ id: unmanaged.body.id, version: 1, value: 'sk_live_issued-elsewhere_value_0001' });
    h.secret((await h.api('POST', '/v1/vault.get', { token: asker.token, body: { name: 'managed-key' } })).body.value);
    // Only credentials without one matched: said so.
    const seeds = await h.api('POST', '/v1/vault.store', { token: asker.token, body: { name: 'login-seed', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP') } } });
    expect(seeds.status).toBe(201);
    const seedFilter = await h.api('POST', '/v1/rotations', { token: asker.token, body: { filter: { kind: 'totp_seed' } } });
    expect(seedFilter.status).toBe(422);
    expect(seedFilter.body.detail).toBe('none of the 1 credentials the filter matches has a rotation policy; nothing to rotate');
    const seedNamed = await h.api('POST', '/v1/rotations', { token: asker.token, body: { credentials: ['login-seed'] } });
    expect(seedNamed.body.detail).toContain('a totp_seed takes none: enrol a new seed with its service');
  });

  it('a policy taken away between the request and the run\'s plan fails the run at its plan: no random value put in place', async () => {
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'policy-withdrawn', kind: 'api_key', value: h.secret('sk_live_policy_withdrawn_01'), rotation: { provider: 'generated', graceHours: 0 } },
    });
    const plans = await holdTable(h, 'rotation_plans');
    let started;
    try {
      started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['policy-withdrawn'] } });
      expect(started.status, started.text).toBe(202);
      await plans.waiting();
      expect((await h.api('PATCH', '/v1/credentials/policy-withdrawn', { token: agent.token, body: { rotation: null } })).status).toBe(200);
    } finally {
      await plans.release();
    }
    const report = await waitForRotation(started.body.rotationId);
    expect(report.state).toBe('failed');
    expect(report.credentials[0].progress.error).toBe("credential 'policy-withdrawn' has no rotation policy; it is not rotated (give it one, then rotate it)");
    expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'policy-withdrawn' } })).body).toMatchObject({ id: stored.body.id, version: 1, value: 'sk_live_policy_withdrawn_01' });
  });

  it("a run continued as new is reported by its successor's outcome when no worker answers: not the first run's", async () => {
    const name = 'continued-then-failed';
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name, kind: 'api_key', value: h.secret('sk_live_continued_failed_01'), rotation: { provider: 'generated', graceHours: 0.002 } } })).status).toBe(201);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(started.status, started.text).toBe(202);
    for (let i = 0; i < 100 && (await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state !== 'grace'; i++) await new Promise((r) => setTimeout(r, 100));
    // In grace (7.2 s), the new value reported leaked: the run goes on as a leak rotation once it
    // ends (continue-as-new), and that run fails: its policy, changed meanwhile, names a provider
    // that refuses it (403, one attempt). (A policy taken away instead is no longer rotated again:
    // the first run tells the leak as not rotated, UNROTATED_LEAKS_TOLD.)
    const leaked = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: name, source: 'continued-test' } });
    expect(leaked.status, leaked.text).toBe(202);
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
    const refusing = createHttpServer((_req, res) => res.writeHead(403, { 'content-type': 'application/json' }).end('{"error":"forbidden"}')).listen(0, '127.0.0.1');
    await once(refusing, 'listening');
    const at = `http://127.0.0.1:${(refusing.address() as AddressInfo).port}`;
    const refused = { provider: 'http', maxAttempts: 1, graceHours: 0.002, settings: { create: { url: `${at}/keys` }, verify: { url: `${at}/whoami` }, revoke: { url: `${at}/keys/{id}` }, auth: { credential: name }, valuePath: 'secret', idPath: 'id' } };
    const changed = await h.api('PATCH', `/v1/credentials/${name}`, { token: agent.token, body: { rotation: refused } });
    expect(changed.status, changed.text).toBe(200);
    onTestFinished(() => void refusing.close());
    const workflowId = started.body.workflowIds[0] as string;
    await expect(h.client.workflow.getHandle(workflowId).result()).rejects.toBeInstanceOf(WorkflowFailedError);
    const first = (await h.sql('SELECT run_id FROM rotation_runs WHERE rotation_id = $1', [started.body.rotationId])).rows[0].run_id as string;
    expect((await h.sql('SELECT outcome FROM run_outcomes WHERE run_id = $1', [first])).rows).toEqual([{ outcome: 'rotated' }]);

    // No worker answers the query: what the server and the outcomes say.
    const workflow = Object.create(h.client.workflow, {
      getHandle: {
        value: (id: string, runId?: string) =>
          Object.assign(Object.create(h.client.workflow.getHandle(id, runId)), { query: async () => Promise.reject(new Error('no worker answered')) }),
      },
    });
    const deps = { pool: h.services.pool, vault: h.services.vault, client: Object.create(h.client, { workflow: { value: workflow } }), taskQueue: h.taskQueue };
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    const report = await rotationStatus(deps, caller, started.body.rotationId);
    // Before: 'succeeded', from the first run's outcome, the rotation chain having failed.
    // (Its outcome stays the requested run's: rotated.)
    expect(report.credentials).toEqual([expect.objectContaining({ state: 'failed', outcome: 'rotated', status: 'FAILED', runId: expect.not.stringMatching(first) })]);
    expect(report.state).toBe('failed');
  });

  it('refuses a reason that carries any stored value of the caller (it goes into every notice), and starts nothing', async () => {
    const other = h.secret(`sk_other_${randomUUID()}`);
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'unrelated-key', kind: 'api_key', value: other } })).status).toBe(201);
    const rotated = { name: 'reason-key', kind: 'api_key', value: h.secret(`sk_reason_${randomUUID()}`), rotation: { provider: 'generated', periodDays: 90 } };
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: rotated })).status).toBe(201);
    const before = (await h.sql('SELECT count(*)::int AS n FROM rotations WHERE identity_id = $1', [agent.id])).rows[0].n;
    // The credential rotated is not the one whose value the reason carries: a notice of reason-key
    // is scanned only for reason-key's values, so the reason is checked when the rotation starts.
    const refused = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['reason-key'], reason: `leaked with ${other}` } });
    expect(refused.status).toBe(422);
    expect(refused.body.detail).toBe('reason must not contain a stored value: it is sent in the rotation notices');
    expect(refused.text).not.toContain(other);
    expect((await h.sql('SELECT count(*)::int AS n FROM rotations WHERE identity_id = $1', [agent.id])).rows[0].n).toBe(before);
    const audit = (await h.sql(`SELECT outcome FROM audit_log WHERE identity_id = $1 AND action = 'rotation.start' ORDER BY seq DESC LIMIT 1`, [agent.id])).rows;
    expect(audit).toEqual([{ outcome: 'rejected' }]);
  });

  it('a finished rotation whose run the server no longer keeps is reported from the outcome table', async () => {
    await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'purged-key', kind: 'api_key', value: h.secret('sk_live_purged_value_0001'), rotation: { provider: 'generated', settings: { length: 40 }, periodDays: 90, graceHours: 0 } },
    });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['purged-key'] } });
    const done = await waitForRotation(started.body.rotationId);
    expect(done.credentials[0]).toMatchObject({ state: 'succeeded', status: 'COMPLETED' });
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'purged-key' } })).body.value);
    // What the namespace's retention does to a closed run (the dev server's own deletion is not
    // immediate): the rows now name a run the server does not have.
    const { workflowId } = done.credentials[0];
    const purged = randomUUID();
    await h.sql('UPDATE run_outcomes SET run_id = $2 WHERE run_id = $1', [done.credentials[0].runId, purged]);
    await h.sql('UPDATE rotation_runs SET run_id = $2 WHERE rotation_id = $1', [started.body.rotationId, purged]);
    await expect(h.client.workflow.getHandle(workflowId, purged).describe()).rejects.toBeInstanceOf(WorkflowNotFoundError);
    const report = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
    expect(report.status).toBe(200);
    expect(report.body).toMatchObject({ state: 'succeeded' });
    expect(report.body.credentials[0]).toMatchObject({ state: 'succeeded', status: null, outcome: 'rotated' });
    const cancel = await h.api('DELETE', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
    expect(cancel.status).toBe(202);
    expect(cancel.body).toMatchObject({ cancelling: [], notStarted: [] });
  });

  it('a cancel of a rotation promoted without a grace period lists it as finishing, not cancelling: nothing of it is undone any more', async () => {
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'finishing-key', kind: 'api_key', value: h.secret('sk_live_finishing_value_0001'), rotation: { provider: 'generated', graceHours: 0 } },
    });
    expect(stored.status, stored.text).toBe(201);
    // The run is held after its promotion, at its notice (queued in the outbox).
    const lock = await holdTable(h, 'mail_outbox');
    let cancel: Awaited<ReturnType<Harness['api']>>;
    let rotationId: string;
    try {
      const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['finishing-key'] } });
      expect(started.status, started.text).toBe(202);
      rotationId = started.body.rotationId;
      await lock.waiting();
      // (Another wait on the outbox can come first: the run's own is the one after its outcome.)
      for (let i = 0; (await h.sql('SELECT 1 FROM run_outcomes WHERE credential_id = $1', [stored.body.id])).rowCount === 0; i++) {
        if (i === 150) throw new Error('the rotation did not promote within 30 s');
        await new Promise((r) => setTimeout(r, 200));
      }
      expect((await h.sql('SELECT outcome FROM run_outcomes WHERE credential_id = $1', [stored.body.id])).rows).toEqual([{ outcome: 'rotated' }]);
      cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token });
    } finally {
      await lock.release();
    }
    // Before, listed cancelling, and it ended rotated all the same.
    expect(cancel.body).toEqual({ rotationId, cancelling: [], notStarted: [], finishing: [stored.body.id] });
    const done = await waitForRotation(rotationId);
    expect(done.credentials[0]).toMatchObject({ state: 'succeeded', outcome: 'rotated' });
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'finishing-key' } })).body.value);
  });

  it('a rotation request repeated with its Idempotency-Key gets the first one\'s rotation: the credential rotated once; another request under the key is refused', async () => {
    const sender = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'keyed-key', kind: 'api_key', value: h.secret('sk_live_keyed_value_0001'), rotation: { provider: 'generated', graceHours: 0 } } });
    expect(stored.status, stored.text).toBe(201);
    const key = `rotate-${randomUUID()}`;
    const body = { credentials: ['keyed-key'], reason: 'quarterly' };
    const first = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(first.status, first.text).toBe(202);
    expect((await waitForRotation(first.body.rotationId, sender.token)).state).toBe('succeeded');
    // The answer was lost; the request is sent again, after the rotation ended. Before, a second batch rotated the credential again (version 3).
    const again = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(again.status, again.text).toBe(202);
    expect(again.body).toEqual({ ...first.body, repeated: true });
    const viaBody = await h.api('POST', '/v1/rotations', { token: sender.token, body: { ...body, idempotencyKey: key } });
    expect(viaBody.body).toEqual({ ...first.body, repeated: true });
    expect((await h.sql('SELECT count(*)::int AS n FROM rotations WHERE identity_id = $1', [sender.id])).rows[0].n).toBe(1);
    const read = await h.api('POST', '/v1/vault.get', { token: sender.token, body: { name: 'keyed-key' } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
    const trail = (await h.sql(`SELECT detail FROM audit_log WHERE identity_id = $1 AND action = 'rotation.start' ORDER BY seq`, [sender.id])).rows;
    expect(trail.map((r) => r.detail)).toEqual([
      { rotationId: first.body.rotationId, credentials: 1 },
      { rotationId: first.body.rotationId, repeated: true },
      { rotationId: first.body.rotationId, repeated: true },
    ]);
    const other = await h.api('POST', '/v1/rotations', { token: sender.token, body: { ...body, reason: 'another' }, headers: { 'idempotency-key': key } });
    expect(other.status, other.text).toBe(422);
    expect(other.body.type).toMatch(/idempotency-key-reused$/);
    expect((await h.sql('SELECT count(*)::int AS n FROM rotations WHERE identity_id = $1', [sender.id])).rows[0].n).toBe(1);
  });

  it('a repeat whose first request committed its rotation and died before starting the batch starts it: the rotation it answers with runs', async () => {
    const sender = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'orphan-key', kind: 'api_key', value: h.secret('sk_live_orphan_value_0001'), rotation: { provider: 'generated', graceHours: 0 } } });
    const key = `died-${randomUUID()}`;
    const body = { credentials: ['orphan-key'] };
    // What the first request committed (its rotation, its runs, its key) before its process died, the batch never started.
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', NULL, '{}', $3)`, [rotationId, sender.id, `rotation:${rotationId}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [rotationId, stored.body.id, `rotate:${stored.body.id}`]);
    const k = keyed('rotation.start', key, body)!;
    await h.sql(`INSERT INTO idempotency_keys (identity_id, action, key, target_id, request) VALUES ($1, $2, $3, $4, $5)`, [sender.id, k.action, k.key, rotationId, k.request]);
    const again = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(again.status, again.text).toBe(202);
    expect(again.body).toEqual({ rotationId, batchWorkflowId: `rotation:${rotationId}`, workflowIds: [`rotate:${stored.body.id}`], repeated: true });
    // Before, the answer named a rotation nothing would ever run: "running" for good.
    expect((await waitForRotation(rotationId, sender.token)).state).toBe('succeeded');
    // A second repeat does not run the ended batch again.
    const third = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(third.body.rotationId).toBe(rotationId);
    const runs = [];
    for await (const run of h.client.workflow.list({ query: `WorkflowId = "rotation:${rotationId}"` })) runs.push(run.runId);
    expect(runs).toHaveLength(1);
    const read = await h.api('POST', '/v1/vault.get', { token: sender.token, body: { name: 'orphan-key' } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
  });

  it("a repeat that took the batch's start over keeps the rotation when the first request's own start then fails: it runs once, and the first is told so", async () => {
    const sender = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'slow-start-key', kind: 'api_key', value: h.secret('sk_live_slow_start_value1'), rotation: { provider: 'generated', graceHours: 0 } } });
    const key = `slow-${randomUUID()}`;
    const body = { credentials: ['slow-start-key'] };
    let repeat: Awaited<ReturnType<Harness['api']>> | undefined;
    // The first request's start is slow: its client gives up and repeats (the repeat finds the rotation
    // committed, its batch not started, and starts it); then the first start fails.
    const slow = {
      workflow: {
        start: async () => {
          repeat = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
          throw new Error('deadline exceeded');
        },
      },
    } as unknown as Client;
    const caller = { identityId: sender.id, actor: `identity:${sender.id}`, requestId: 'req-slow-start' };
    const first = startRotation({ pool: h.services.pool, vault: h.services.vault, client: slow, taskQueue: h.taskQueue }, caller, { ...body, idempotencyKey: key });
    await expect(first).rejects.toMatchObject({ status: 503, message: expect.stringContaining('a repeat of this request with the same Idempotency-Key has taken it over') });
    expect(repeat!.status, repeat!.text).toBe(202);
    const rotationId = repeat!.body.rotationId as string;
    expect(repeat!.body.repeated).toBe(true);
    // Before, the failing first start marked the rotation cancelled and gave its key back: the repeat's 202 named a rotation that rotated nothing.
    expect((await waitForRotation(rotationId, sender.token)).state).toBe('succeeded');
    expect((await h.sql('SELECT count(*)::int AS n FROM rotations WHERE identity_id = $1', [sender.id])).rows[0].n).toBe(1);
    expect((await h.sql('SELECT count(*)::int AS n FROM idempotency_keys WHERE target_id = $1', [rotationId])).rows[0].n).toBe(1);
    const read = await h.api('POST', '/v1/vault.get', { token: sender.token, body: { name: 'slow-start-key' } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
  });

  it('a start whose answer was lost after the batch began rotating answers with the rotation: not cancelled, its key kept, nothing rotated twice', async () => {
    const sender = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'lost-start-key', kind: 'api_key', value: h.secret('sk_live_lost_start_value1'), rotation: { provider: 'generated', graceHours: 0 } } });
    const key = `lost-${randomUUID()}`;
    const body = { credentials: ['lost-start-key'] };
    // The server takes the start and the batch's first wave begins; the answer never comes back.
    const lost = {
      workflow: {
        start: async (...args: Parameters<Client['workflow']['start']>) => {
          await h.client.workflow.start(...args);
          for (const deadline = Date.now() + 30_000; ; ) {
            const { rows } = await h.sql('SELECT 1 FROM rotation_runs WHERE credential_id = $1 AND (run_id IS NOT NULL OR start_sent_at IS NOT NULL)', [stored.body.id]);
            if (rows.length > 0) break;
            if (Date.now() > deadline) throw new Error('the first wave never began');
            await new Promise((r) => setTimeout(r, 20));
          }
          throw new Error('deadline exceeded');
        },
      },
    } as unknown as Client;
    const caller = { identityId: sender.id, actor: `identity:${sender.id}`, requestId: 'req-lost-start' };
    // Before, a 503 (try again) that cancelled the rotation and gave its key back while its run went on.
    const first = await startRotation({ pool: h.services.pool, vault: h.services.vault, client: lost, taskQueue: h.taskQueue }, caller, { ...body, idempotencyKey: key });
    expect(first).toEqual({ rotationId: first.rotationId, batchWorkflowId: `rotation:${first.rotationId}`, workflowIds: [`rotate:${stored.body.id}`] });
    expect((await waitForRotation(first.rotationId, sender.token)).state).toBe('succeeded');
    expect((await h.sql('SELECT cancelled_at FROM rotations WHERE id = $1', [first.rotationId])).rows).toEqual([{ cancelled_at: null }]);
    const again = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(again.body).toEqual({ ...first, repeated: true });
    const read = await h.api('POST', '/v1/vault.get', { token: sender.token, body: { name: 'lost-start-key' } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
  });

  it("a failed start that waits on a repeat's take-over sees it (not the row as it was when it began): the 503 says the repeat took it over", async () => {
    const sender = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'racing-start-key', kind: 'api_key', value: h.secret('sk_live_racing_start_val1'), rotation: { provider: 'generated' } } });
    const other = new pg.Client({ connectionString: h.databaseUrl });
    await other.connect();
    try {
      // The start fails as a repeat is taking it over: the take-over holds the rotation's row, and commits a moment later.
      const racing = {
        workflow: {
          start: async (_type: string, options: { workflowId: string }) => {
            await other.query('BEGIN');
            await other.query('UPDATE rotations SET start_taken_over_at = now() WHERE id = $1', [options.workflowId.replace(/^rotation:/, '')]);
            setTimeout(() => void other.query('COMMIT'), 300);
            throw new Error('deadline exceeded');
          },
        },
      } as unknown as Client;
      const caller = { identityId: sender.id, actor: `identity:${sender.id}`, requestId: 'req-racing-start' };
      // Before, the statement read the take-over as it was when it began (none) and answered 202, the batch never started by this request.
      await expect(
        startRotation({ pool: h.services.pool, vault: h.services.vault, client: racing, taskQueue: h.taskQueue }, caller, { credentials: ['racing-start-key'], idempotencyKey: `racing-${randomUUID()}` }),
      ).rejects.toMatchObject({ status: 503, message: expect.stringContaining('a repeat of this request with the same Idempotency-Key has taken it over') });
    } finally {
      await other.end();
    }
  });

  it('a repeat of a request whose rotation its owner cancelled before the batch started answers with that rotation, and starts nothing', async () => {
    const sender = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'cancelled-first', kind: 'api_key', value: h.secret('sk_live_cancelled_first_1') } });
    const key = `cancelled-${randomUUID()}`;
    const body = { credentials: ['cancelled-first'] };
    const rotationId = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id, cancelled_at) VALUES ($1, $2, 'request', NULL, '{}', $3, now())`, [rotationId, sender.id, `rotation:${rotationId}`]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [rotationId, stored.body.id, `rotate:${stored.body.id}`]);
    const k = keyed('rotation.start', key, body)!;
    await h.sql(`INSERT INTO idempotency_keys (identity_id, action, key, target_id, request) VALUES ($1, $2, $3, $4, $5)`, [sender.id, k.action, k.key, rotationId, k.request]);
    const again = await h.api('POST', '/v1/rotations', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(again.body).toMatchObject({ rotationId, repeated: true });
    await expect(h.client.workflow.getHandle(`rotation:${rotationId}`).describe()).rejects.toBeInstanceOf(WorkflowNotFoundError);
    expect((await h.api('GET', `/v1/rotations/${rotationId}`, { token: sender.token })).body.state).toBe('cancelled');
  });

  it('when Temporal cannot take the batch, the request is a 503 and the rotation it recorded reads as never started', async () => {
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'stranded-key', kind: 'api_key', value: h.secret('sk_live_stranded_value_01'), rotation: { provider: 'generated' } } });
    const unreachable = await unreachableTemporal();
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: 'req-stranded' };
    const deps = { pool: h.services.pool, vault: h.services.vault, client: unreachable, taskQueue: h.taskQueue };
    const key = `stranded-${randomUUID()}`;
    await expect(startRotation(deps, caller, { credentials: ['stranded-key'], idempotencyKey: key })).rejects.toMatchObject({ status: 503 });
    const { id } = (await h.sql("SELECT id FROM rotations r WHERE identity_id = $1 AND EXISTS (SELECT 1 FROM rotation_runs x JOIN credentials c ON c.id = x.credential_id WHERE x.rotation_id = r.id AND c.name = 'stranded-key')", [agent.id])).rows[0];
    // Its key was given back with it: the request repeated (503: try again) makes a rotation, not the one never started.
    expect((await h.sql('SELECT count(*)::int AS n FROM idempotency_keys WHERE identity_id = $1 AND key = $2', [agent.id, key])).rows[0].n).toBe(0);
    const report = await h.api('GET', `/v1/rotations/${id}`, { token: agent.token });
    expect(report.body).toMatchObject({ state: 'cancelled', credentials: [{ name: 'stranded-key', state: 'cancelled', status: null }] });
    // The audit trail says so: the rotation recorded, then, naming it, never started (before: an ok row alone).
    const trail = (await h.sql("SELECT outcome, detail FROM audit_log WHERE request_id = 'req-stranded' AND action = 'rotation.start' ORDER BY seq")).rows;
    expect(trail).toEqual([
      { outcome: 'ok', detail: { rotationId: id, credentials: 1 } },
      { outcome: 'failed', detail: { rotationId: id, notStarted: true, error: 'unavailable', status: 503 } },
    ]);

    // A message whose delivery cannot be started is not queued at all: one failed row, nothing in the outbox.
    const mailCaller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: 'req-stranded-mail' };
    await expect(sendMail({ ...deps, vault: h.services.vault }, mailCaller, { to: ['team@example.com'], subject: 'hello', text: 'nothing secret' })).rejects.toMatchObject({ status: 503 });
    const mailTrail = (await h.sql("SELECT outcome, detail FROM audit_log WHERE request_id = 'req-stranded-mail' ORDER BY seq")).rows;
    expect(mailTrail).toEqual([{ outcome: 'failed', detail: { messageId: expect.any(String), notQueued: true, error: 'unavailable', status: 503 } }]);
    expect((await h.sql('SELECT status FROM mail_outbox WHERE id = $1', [mailTrail[0]!.detail.messageId])).rows).toEqual([]);
    await unreachable.connection.close().catch(() => undefined);
  });

  it('a promote retried after it committed and values were stored on top answers as done, not as a refusal that would undo it', async () => {
    const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'promoted-twice', kind: 'api_key', value: h.secret('sk_live_promoted_0001') } });
    const id = stored.body.id as string;
    const caller = { identityId: agent.id, actor: 'test:promote-retry' };
    const staged = await h.deps.rotations.stagePending(caller, id, `${id}:create:1`, { value: h.secret('sk_live_promoted_0002') });
    expect(await h.deps.rotations.promote(caller, id, staged.version)).toMatchObject({ current: 2, previous: 1 });
    // The worker died before the promote's answer reached Temporal; meanwhile values were stored, twice.
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'promoted-twice', kind: 'api_key', value: h.secret('sk_live_promoted_0003') } });
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'promoted-twice', kind: 'api_key', value: h.secret('sk_live_promoted_0004') } });
    // Before: "version 2 … is not pending", a permanent failure, and the workflow undid the rotation.
    expect(await h.deps.rotations.promote(caller, id, staged.version)).toMatchObject({ current: 2, previous: 1 });
    const row = (await h.sql('SELECT current_version, previous_version, pending_version FROM credentials WHERE id = $1', [id])).rows[0];
    expect(row).toEqual({ current_version: 4, previous_version: 3, pending_version: null });
    const audit = (await h.sql("SELECT detail FROM audit_log WHERE credential_id = $1 AND action = 'rotation.promote' ORDER BY seq", [id])).rows;
    expect(audit.map((r) => r.detail)).toEqual([expect.not.objectContaining({ replayed: true }), expect.objectContaining({ replayed: true, supersededBy: 4 })]);
    // A version that was never promoted is still refused.
    const other = await h.deps.rotations.stagePending(caller, id, `${id}:create:2`, { value: h.secret('sk_live_promoted_0005') });
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'promoted-twice', kind: 'api_key', value: h.secret('sk_live_promoted_0006') } });
    await expect(h.deps.rotations.promote(caller, id, other.version)).rejects.toThrow(/moved to version|not pending/);
  });

  it('when Temporal is out of reach, a rollback or a report is a 503 to try again, not a 409 saying there is nothing to roll back', async () => {
    await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'graceful-key', kind: 'api_key', value: h.secret('sk_live_graceful_value_01'), rotation: { provider: 'generated', settings: { length: 40 }, graceHours: 1 } },
    });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['graceful-key'] } });
    for (let i = 0; i < 100; i++) {
      if ((await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state === 'grace') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'graceful-key' } })).body.value);
    const unreachable = await unreachableTemporal();
    try {
      const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: 'req-unreachable' };
      const deps = { pool: h.services.pool, vault: h.services.vault, client: unreachable, taskQueue: h.taskQueue };
      await expect(rollbackRotation(deps, caller, started.body.rotationId)).rejects.toMatchObject({ status: 503 });
      await expect(rotationStatus(deps, caller, started.body.rotationId)).rejects.toMatchObject({ status: 503 });
    } finally {
      await unreachable.connection.close().catch(() => undefined);
    }
    // With Temporal there, the same rollback goes through.
    const rolled = await h.api('POST', `/v1/rotations/${started.body.rotationId}/rollback`, { token: agent.token });
    expect(rolled.status, rolled.text).toBe(200);
    expect(rolled.body.results).toEqual([expect.objectContaining({ rolledBack: true, current: 1, abandoned: 2 })]);
  });

  it('a run terminated in its grace period is reported by its outcome, not as in grace for good', async () => {
    await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'terminated-in-grace', kind: 'api_key', value: h.secret('sk_live_terminated_grace_01'), rotation: { provider: 'generated', settings: { length: 40 }, graceHours: 1 } },
    });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['terminated-in-grace'] } });
    expect(started.status, started.text).toBe(202);
    for (let i = 0; i < 100; i++) {
      if ((await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state === 'grace') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'terminated-in-grace' } })).body.value);
    await h.client.workflow.getHandle(started.body.workflowIds[0]).terminate('an operator stopped it');
    // Before: state 'grace' (the query's answer as the run closed), the rotation's too, for good.
    const after = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
    expect(after.body.credentials).toEqual([expect.objectContaining({ state: 'succeeded', status: 'TERMINATED', outcome: 'rotated' })]);
    expect(after.body.state).toBe('succeeded');
    // Its steps say where it stopped: promoted, the previous value never revoked.
    const steps = after.body.credentials[0].progress.steps as { name: string; state: string }[];
    expect(steps.find((s) => s.name === 'promote')?.state).toBe('done');
    expect(steps.find((s) => s.name === 'grace')?.state).not.toBe('done');
  });

  it('a rollback that reaches one run and loses Temporal before the next reports the one it rolled back, and the other as not reached', async () => {
    const names = ['grace-a', 'grace-b'];
    const ids: string[] = [];
    for (const name of names) {
      const res = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: { name, kind: 'api_key', value: h.secret(`sk_live_${name}_${randomUUID()}`), rotation: { provider: 'generated', settings: { length: 40 }, graceHours: 1 } },
      });
      ids.push(res.body.id);
    }
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: names } });
    for (let i = 0; i < 100; i++) {
      if ((await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state === 'grace') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    for (const name of names) h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
    // The update to grace-b's run fails as a lost connection does.
    const workflow = Object.create(h.client.workflow, {
      getHandle: {
        value: (workflowId: string, runId?: string) => {
          const handle = h.client.workflow.getHandle(workflowId, runId);
          if (workflowId !== `rotate:${ids[1]}`) return handle;
          return Object.create(handle, { executeUpdate: { value: async () => Promise.reject(new Error('14 UNAVAILABLE: the connection was lost')) } });
        },
      },
    });
    const client = Object.create(h.client, { workflow: { value: workflow } });
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    const deps = { pool: h.services.pool, vault: h.services.vault, client, taskQueue: h.taskQueue };
    // Before, a 503 that did not say grace-a was rolled back (and a retry answered it "already requested").
    const partial = await rollbackRotation(deps, caller, started.body.rotationId);
    expect(partial.results).toEqual([
      expect.objectContaining({ credentialId: ids[0], rolledBack: true, current: 1, abandoned: 2 }),
      { credentialId: ids[1], rolledBack: false, reason: expect.stringContaining('Temporal is unavailable') },
    ]);
    const rest = await h.api('POST', `/v1/rotations/${started.body.rotationId}/rollback`, { token: agent.token });
    expect(rest.status, rest.text).toBe(200);
    expect(rest.body.results).toEqual([
      expect.objectContaining({ credentialId: ids[0], rolledBack: false }),
      expect.objectContaining({ credentialId: ids[1], rolledBack: true, current: 1, abandoned: 2 }),
    ]);
  });

  /**
   * An eventually consistent key service (as cloud IAM is): a new key answers 401 at /whoami until
   * `worksAfterMs` after it was made. Stores the credential `name` (version 1 at key_v1) with an http
   * policy (maxAttempts 1, no grace) whose verify waits `waitSeconds`; every verify call is recorded.
   */
  const slowKeyService = async (name: string, worksAfterMs: number, waitSeconds: number) => {
    const adminToken = h.secret(`adm_${randomUUID()}`);
    const v1 = h.secret(`sk_${randomUUID()}`);
    const keys = new Map([['key_v1', { secret: v1, madeAt: 0, active: true, idempotencyKey: undefined as string | undefined }]]);
    const verifies: { id?: string; status: number; at: number }[] = [];
    const provider = createHttpServer((req, res) => {
      req.resume();
      const reply = (status: number, body: unknown) => void res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
      const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1];
      const path = new URL(req.url ?? '/', 'http://localhost').pathname;
      if (req.method === 'GET' && path === '/whoami') {
        const [id, key] = [...keys].find(([, k]) => k.secret === bearer && k.active) ?? [];
        const status = key && Date.now() - key.madeAt >= worksAfterMs ? 200 : 401;
        verifies.push({ id, status, at: Date.now() });
        return reply(status, status === 200 ? { id } : { error: 'unknown key' });
      }
      if (bearer !== adminToken) return reply(401, { error: 'admin token required' });
      const idempotencyKey = req.headers['idempotency-key'] as string;
      if (req.method === 'POST' && path === '/keys') {
        const made = [...keys].find(([, k]) => k.idempotencyKey === idempotencyKey);
        const [id, key] = made ?? [`key_${keys.size + 1}`, { secret: `sk_${randomUUID()}`, madeAt: Date.now(), active: true, idempotencyKey }];
        keys.set(id, key);
        return reply(201, { id, secret: key.secret });
      }
      const key = req.method === 'DELETE' ? keys.get(decodeURIComponent(path.replace(/^\/keys\//, ''))) : undefined;
      if (!key?.active) return reply(404, { error: 'no such key' });
      key.active = false;
      reply(200, { deleted: true });
    }).listen(0, '127.0.0.1');
    await once(provider, 'listening');
    onTestFinished(() => void provider.close());
    const at = `http://127.0.0.1:${(provider.address() as AddressInfo).port}`;
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: `${name}-admin`, kind: 'api_key', value: adminToken } })).status).toBe(201);
    const settings = { create: { url: `${at}/keys` }, verify: { url: `${at}/whoami`, waitSeconds }, revoke: { url: `${at}/keys/{id}` }, auth: { credential: `${name}-admin` }, valuePath: 'secret', idPath: 'id' };
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name, kind: 'api_key', value: v1, externalId: 'key_v1', rotation: { provider: 'http', maxAttempts: 1, graceHours: 0, settings } },
    });
    expect(stored.status, stored.text).toBe(201);
    return { keys, verifies, credentialId: stored.body.id as string };
  };

  it('an http provider whose new key works only ~9 s after it was made: verify keeps trying it for verify.waitSeconds (20), and the rotation succeeds', async () => {
    // The step's own attempts (externalCall: 4, 1 + 2 + 4 s apart) gave it ~7 s: the rotation failed.
    const { keys, verifies, credentialId } = await slowKeyService('slow-key', 9_000, 20);

    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['slow-key'] } });
    expect(started.status, started.text).toBe(202);
    const report = await waitForRotation(started.body.rotationId);
    expect(report).toMatchObject({ state: 'succeeded', credentials: [{ progress: { state: 'succeeded', attempt: 1, fromVersion: 1, toVersion: 2 } }] });
    const current = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'slow-key' } });
    expect(current.body).toMatchObject({ version: 2, label: 'current', value: h.secret(keys.get('key_2')!.secret) });
    expect(keys.get('key_v1')!.active).toBe(false); // revoked after the promote

    // Several calls with the new key, 401 until it worked; all in the verify step's first attempt (it heartbeat while it waited).
    const tries = verifies.filter((v) => v.id === 'key_2');
    expect(tries.length).toBeGreaterThanOrEqual(4);
    expect(tries.map((v) => v.status)).toEqual([...Array<number>(tries.length - 1).fill(401), 200]);
    expect(tries.at(-1)!.at - keys.get('key_2')!.madeAt).toBeGreaterThanOrEqual(9_000);
    expect(await verifyAttempts(credentialId)).toEqual([1]);
  }, 45_000);

  it("an http provider's key that never works fails the rotation's attempt about verify.waitSeconds after it was made: the verify step's later attempts call once each, not wait it all again", async () => {
    const { verifies, credentialId } = await slowKeyService('never-key', Infinity, 3);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['never-key'] } });
    expect(started.status, started.text).toBe(202);
    const report = await waitForRotation(started.body.rotationId);
    expect(report).toMatchObject({ state: 'failed', credentials: [{ progress: { state: 'failed', attempt: 1, toVersion: 2 } }] });
    // Its first attempt: calls 1 and 2 s apart for 3 s (3, or 4 when a timer fires a millisecond
    // early and leaves a last wait of 1 ms); then one for each of the step's 3 later attempts.
    // Before, each attempt waited the whole 3 s again: ~12 calls.
    const tries = verifies.filter((v) => v.id === 'key_2');
    expect(tries.map((v) => v.status)).toEqual(Array<number>(tries.length).fill(401));
    expect(tries.length).toBeGreaterThanOrEqual(4);
    expect(tries.length).toBeLessThanOrEqual(7);
    expect(await verifyAttempts(credentialId)).toEqual([4]);
  }, 45_000);

  /** The attempt numbers of the rotation's verify steps, as its history records them (a step's last attempt). */
  const verifyAttempts = async (credentialId: string) => {
    const history = (await h.client.workflow.getHandle(`rotate:${credentialId}`).fetchHistory()).events ?? [];
    const verifySteps = new Set(history.filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'verifyVersion').map((e) => String(e.eventId)));
    return history.filter((e) => verifySteps.has(String(e.activityTaskStartedEventAttributes?.scheduledEventId))).map((e) => e.activityTaskStartedEventAttributes!.attempt);
  };
});

/** A port nobody listens on (one just freed). */
function closedPort(): Promise<number> {
  return new Promise<number>((resolve) => {
    const server = createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** A Temporal client for a port nobody listens on, trying each call once (not the SDK's minutes of retries). */
async function unreachableTemporal(): Promise<Client> {
  const closed = await closedPort();
  const tryOnce = makeGrpcRetryInterceptor(defaultGrpcRetryOptions({ maxAttempts: 1 }));
  return new Client({ connection: Connection.lazy({ address: `127.0.0.1:${closed}`, connectTimeout: 1_000, interceptors: [tryOnce] }) });
}
