import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { WorkflowFailedError } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { temporal } from '@temporalio/proto';
import type { ActivityInterceptorsFactory } from '@temporalio/worker';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stableUuid } from '../activities/support';
import { reportLeak as reportLeakWith } from '../api/routes/leaks';
import { startHarness, type Harness } from './support/harness';
import { createActivities } from '../activities';
import { expectCleanRun } from './support/leaks';
import * as fixtures from './support/lifecycle-fixtures';
import { canLogin, holdTable, loginRoleWithAdmin, mailTo, waitFor, type Identity, type RotationReport } from './support/lifecycle-fixtures';
import type { ReceivedEvent } from './support/webhook-receiver';
import { WebhookReceiver } from './support/webhook-receiver';
import { TcpProxy } from './support/tcp-proxy';
import { ProviderServer } from './support/provider-server';
import { recipients } from './support/mail';

/**
 * Rotations that go wrong after the first step: a promote the vault refuses, an undo a dependent
 * refuses, a promoted event refused, a cancel or a leak that lands while a notice is being sent,
 * repeated restores, and a rollback of a single PostgreSQL role. Each ends where it must: undone or
 * rolled back, the credential marked, the owners (and, for leaks, the security desk) told.
 */

const tag = randomBytes(4).toString('hex');
const securityDesk = `sec-${tag}@example.com`;
const ENV_KEY = 'SERVICE_KEY';

describe('rotation failures', () => {
  let h: Harness;
  let owner: Identity;
  let signingKey: string;
  const receivers: WebhookReceiver[] = [];
  const roles: string[] = [];
  const proxies: TcpProxy[] = [];
  let n = 0;
  const unique = (what: string) => `${what}-${tag}-${++n}`;

  const store = (name: string, kind: string, value: string, extra: Record<string, unknown> = {}) => fixtures.storeValue(h, owner.token, name, kind, value, extra);
  /** A generated api key with one owner address; every value any test reads is registered for the leak checks. */
  const generatedKey = async (rotation: Record<string, unknown> = {}) => {
    const name = unique('key');
    const ownerMail = `${name}@example.com`;
    const id = await store(name, 'api_key', h.secret(`v1_${randomBytes(16).toString('hex')}`), {
      owners: [ownerMail],
      rotation: { provider: 'generated', settings: { length: 40 }, periodDays: 90, graceHours: 0, maxAttempts: 1, ...rotation },
    });
    return { name, id, ownerMail };
  };
  const read = async (id: string, version?: number) => {
    const res = await h.api('POST', '/v1/vault.get', { token: owner.token, body: { id, ...(version ? { version } : {}) } });
    if (res.status === 200) h.secret(res.body.value as string);
    return res.body;
  };
  const credentialRow = (id: string) => fixtures.credentialRow(h, owner.token, id);
  const revokedVersions = (id: string) => fixtures.revokedVersions(h, id);

  const receiver = async () => {
    const r = new WebhookReceiver(signingKey);
    receivers.push(r);
    await r.start();
    return r;
  };
  /** The receiver answers `status` to every event of the given types, 200 to the rest. */
  const refusing = (r: WebhookReceiver, refuse: Record<string, number>) => {
    r.onEvent = async ({ event }) => {
      r.failWith = refuse[event.type] ?? null;
    };
  };
  /** Holds the receiver's answer to credential.pending until release() (and runs `during` first). */
  const holdingPending = (r: WebhookReceiver) => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const before = r.onEvent;
    r.onEvent = async (received: ReceivedEvent) => {
      await before?.(received);
      if (received.event.type === 'credential.pending') await released;
    };
    return { release, reached: () => waitFor('the receiver to hold credential.pending', async () => r.events.length, (count) => count > 0) };
  };
  const webhook = (r: WebhookReceiver) => ({ type: 'webhook', settings: { url: r.url, signingKeyCredential: 'hook-signing-key', timeoutMs: 30_000 } });
  const setDependents = async (credentialId: string, dependents: unknown[]) => {
    const res = await h.api('PATCH', `/v1/credentials/${credentialId}`, { token: owner.token, body: { dependents } });
    expect(res.status, res.text).toBe(200);
  };
  const events = (r: WebhookReceiver) => r.events.map((e) => `${e.event.type} v${e.event.version}`).filter((e, i, all) => e !== all[i - 1]);

  const startRotation = (name: string) => fixtures.startRotation(h, owner.token, name);
  const report = (rotationId: string) => fixtures.rotationReport(h, owner.token, rotationId);
  const started = (rotationId: string) => waitFor(`rotation ${rotationId} to start its run`, () => report(rotationId), (r) => Boolean(r.credentials[0]?.runId));
  const waitForState = (rotationId: string, states: string[]) => waitFor(`rotation ${rotationId} to reach ${states.join(' or ')}`, () => report(rotationId), (r) => states.includes(r.state));
  /** The run's result, following continue-as-new; a failure is returned, not thrown. */
  const runResult = async (rotationId: string): Promise<unknown> => {
    const run = (await started(rotationId)).credentials[0]!;
    return h.client.workflow.getHandle(run.workflowId, run.runId!).result().catch((e: unknown) => e);
  };
  const expectRotationFailed = (failure: unknown, message: RegExp) => {
    expect(failure).toBeInstanceOf(WorkflowFailedError);
    const cause = (failure as WorkflowFailedError).cause;
    expect(cause).toBeInstanceOf(ApplicationFailure);
    expect((cause as ApplicationFailure).type).toBe('RotationFailed');
    expect((cause as ApplicationFailure).message).toMatch(message);
  };
  const stepState = (r: RotationReport, name: string) => r.credentials[0]!.progress!.steps.find((s) => s.name === name);
  const notices = (address: string, name: string) =>
    waitFor(`the notices of ${name}`, () => mailTo(address), (mails) => mails.length > 0).then((mails) => mails.filter((m) => m.mail.subject?.endsWith(name)));

  /**
   * Holds one notice of a run half-way: an open transaction owns its outbox row (the notice's id is
   * derived from the run, as the activity derives it), so the activity waits at its INSERT until
   * release() rolls the transaction back.
   */
  const holdNotice = async (runId: string, credentialId: string, outcome: string) => {
    const client = new pg.Client({ connectionString: h.databaseUrl });
    await client.connect();
    await client.query('BEGIN');
    await client.query(`INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body) VALUES ($1, $2, 'test.hold', '{}', 'hold', 'hold')`, [
      stableUuid(`${runId}:${credentialId}:notice:${outcome}`),
      owner.id,
    ]);
    return {
      reached: () =>
        waitFor(
          'the notice to wait for its outbox row',
          async () =>
            (
              await h.sql(
                `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO mail_outbox%'`,
              )
            ).rows[0].n as number,
          (count) => count > 0,
        ),
      release: async () => {
        await client.query('ROLLBACK');
        await client.end();
      },
    };
  };

  /**
   * A rotation of a new generated key (with a webhook dependent) whose 'rotated' notice is held
   * half-way (see holdNotice): the caller does what it tests, then calls hold.release().
   */
  const rotationWithNoticeHeld = async (rotation: Record<string, unknown> = {}) => {
    const key = await generatedKey(rotation);
    const r = await receiver();
    const pending = holdingPending(r);
    await setDependents(key.id, [webhook(r)]);
    const rotationId = await startRotation(key.name);
    await pending.reached();
    const runId = (await started(rotationId)).credentials[0]!.runId!;
    const hold = await holdNotice(runId, key.id, 'rotated');
    try {
      pending.release();
      await hold.reached();
    } catch (err) {
      await hold.release();
      throw err;
    }
    return { ...key, r, rotationId, runId, hold };
  };

  /**
   * Real activities held before they run: holdActivity(type, credentialId) makes the next call of that
   * activity for that credential wait until release(). (A worker's interceptor, installed for the file.)
   */
  const activityHolds = new Map<string, { reached: () => void; released: Promise<void> }>();
  const holdActivity = (type: string, credentialId: string) => {
    let reached!: () => void;
    let release!: () => void;
    const reachedP = new Promise<void>((resolve) => (reached = resolve));
    const released = new Promise<void>((resolve) => (release = resolve));
    activityHolds.set(`${type}:${credentialId}`, { reached, released });
    return { reached: () => reachedP, release };
  };
  const activityInterceptors: ActivityInterceptorsFactory[] = [
    (ctx) => ({
      inbound: {
        async execute(input, next) {
          const credentialId = (input.args[0] as { credentialId?: string } | undefined)?.credentialId;
          const key = `${ctx.info.activityType}:${credentialId}`;
          const held = activityHolds.get(key);
          if (held) {
            activityHolds.delete(key);
            held.reached();
            await held.released;
          }
          return next(input);
        },
      },
    }),
  ];

  beforeAll(async () => {
    h = await startHarness({ worker: true, securityNotify: [securityDesk], activityInterceptors });
    owner = await h.createIdentity(unique('owner'));
    signingKey = h.secret(`whsec_${randomBytes(24).toString('hex')}`);
    await store('hook-signing-key', 'generic', signingKey);
  });
  afterAll(async () => {
    try {
      // A failed test may leave a run in its grace period: end it, or the worker cannot shut down.
      for await (const wf of h.client.workflow.list({ query: `TaskQueue = '${h.taskQueue}' AND ExecutionStatus = 'Running'` })) {
        await h.client.workflow.getHandle(wf.workflowId).terminate('left running by a failed test').catch(() => undefined);
      }
      expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    } finally {
      for (const r of receivers) await r.stop();
      for (const proxy of proxies) await proxy.stop();
      for (const role of roles) await h.sql(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
      await h.close();
    }
  });

  it('a value stored while the rotation is pending makes promote refuse: the attempt is undone, the credential marked, the owners told', async () => {
    const { name, id, ownerMail } = await generatedKey();
    const r = await receiver();
    // While the dependent takes version 2, an agent stores version 3 by hand.
    r.onEvent = async ({ event }) => {
      if (event.type === 'credential.pending') await store(name, 'api_key', h.secret(`v3_${randomBytes(16).toString('hex')}`));
    };
    await setDependents(id, [webhook(r)]);

    const rotationId = await startRotation(name);
    expectRotationFailed(await runResult(rotationId), /^credential \S+ moved to version 3 while version 2 was pending$/);

    const failed = await waitForState(rotationId, ['failed']);
    expect(stepState(failed, 'promote')).toMatchObject({ state: 'failed' });
    expect(stepState(failed, 'compensate')).toMatchObject({ state: 'done' });
    expect(await credentialRow(id)).toMatchObject({ status: 'rotation_failed', version: 3, pendingVersion: null });
    expect(await revokedVersions(id)).toEqual([2]);
    // The dependent is put on the version that is current now (v3, stored by hand), not on v1: the
    // vault no longer hands out v1 as current, and a provider that keeps one value (a single
    // PostgreSQL role) is put back on v3 too.
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.restored v3']);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.subject).toBe(`[mailgent] Rotation FAILED for ${name}`);
    expect(notice!.mail.text).toContain('moved to version 3 while version 2 was pending');
    expect(notice!.mail.text).toContain('Version 3, stored while the rotation ran, is current. The credential is marked rotation_failed.');
    await read(id, 2);
  });

  it('a value stored while the attempt is pending, then an attempt that fails: its undo puts the dependent on the stored value, not the one the attempt began from', async () => {
    const { name, id } = await generatedKey({ maxAttempts: 1 });
    const r = await receiver();
    r.answerVersion = 1; // it never picks up the new value: verify fails
    let v3: string | undefined;
    r.onEvent = async ({ event }) => {
      if (event.type === 'credential.pending') v3 = await store(name, 'api_key', h.secret(`v3_${randomBytes(16).toString('hex')}`));
    };
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    expectRotationFailed(await runResult(rotationId), /reports version 1, not 2$/);
    // Before, the dependent went back to version 1 while version 3, stored by hand, is what the vault hands out.
    expect(events(r).filter((e) => !e.startsWith('credential.verify'))).toEqual(['credential.pending v2', 'credential.restored v3']);
    expect(await read(id)).toMatchObject({ version: 3, label: 'current' });
    expect(v3).toBeDefined();
    expect(await revokedVersions(id)).toEqual([2]);
    await read(id, 2);
  });

  it('an undo a dependent refuses does not stop the others: every undo runs, the credential is marked, the notice names what failed', async () => {
    const { name, id, ownerMail } = await generatedKey();
    const v1 = (await read(id)).value as string;
    const file = `${unique('service')}.env`;
    const original = `A=1\n${ENV_KEY}=${v1}\nB=2\n`;
    const dir = path.join(h.envFilesRoot, owner.id);
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, file), original);
    const r = await receiver();
    refusing(r, { 'credential.verify': 404, 'credential.restored': 400 });
    // The env file is undone after the webhook (undos run newest first).
    await setDependents(id, [{ type: 'env-file', settings: { file, key: ENV_KEY } }, webhook(r)]);

    const rotationId = await startRotation(name);
    expectRotationFailed(await runResult(rotationId), /answered 404 to credential\.verify$/);

    const failed = await waitForState(rotationId, ['failed']);
    expect(stepState(failed, 'verify')).toMatchObject({ state: 'failed' });
    expect(stepState(failed, 'compensate')).toMatchObject({ state: 'failed', error: expect.stringMatching(/^restore webhook 1: webhook .* answered 400 to credential\.restored$/) });
    expect(readFileSync(path.join(dir, file), 'utf8')).toBe(original);
    expect(await credentialRow(id)).toMatchObject({ status: 'rotation_failed', version: 1, pendingVersion: null });
    // The webhook's dependent may still be on version 2: the provider (keeping versions apart) leaves
    // it working. Before, it was revoked under that dependent. See PENDING_KEPT_UNDER_DEPENDENTS.
    expect(await revokedVersions(id)).toEqual([]);
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.restored v1']);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.subject).toBe(`[mailgent] Rotation FAILED for ${name}`);
    expect(notice!.mail.text).toMatch(/failed at step verify, and undoing it failed in part:\n- restore webhook 1: webhook http:\/\/127\.0\.0\.1:\d+ answered 400 to credential\.restored\n/);
    expect(notice!.mail.text).toContain(
      'Version 2, which the rotation made, was left working: the dependents above could not be put back and still use it. Once they are off it, revoke it at the provider, if it keeps one.',
    );
    // Recorded beside the notice, which may never go out.
    expect((await h.sql(`SELECT detail FROM audit_log WHERE credential_id = $1 AND action = 'rotation.discard_pending' AND detail ? 'kept'`, [id])).rows).toEqual([
      { detail: { version: 2, status: 'active', kept: true } },
    ]);
    await read(id, 2);
  });

  it('an env file whose directory is missing refuses the apply; its restore has nothing to put back, so the undo is done, not failed', async () => {
    const { name, id, ownerMail } = await generatedKey();
    mkdirSync(path.join(h.envFilesRoot, owner.id), { recursive: true });
    const file = `${unique('nowhere')}/service.env`;
    const r = await receiver();
    await setDependents(id, [webhook(r), { type: 'env-file', settings: { file, key: ENV_KEY } }]);

    const rotationId = await startRotation(name);
    expectRotationFailed(await runResult(rotationId), /its directory does not exist/);
    const failed = await waitForState(rotationId, ['failed']);
    expect(stepState(failed, 'apply_dependents')).toMatchObject({ state: 'failed' });
    // Before, the env file's restore was refused as its apply was: `restore env-file 1: … its directory does not exist`.
    expect(stepState(failed, 'compensate')).toMatchObject({ state: 'done' });
    expect(await credentialRow(id)).toMatchObject({ status: 'rotation_failed', version: 1, pendingVersion: null });
    expect(await revokedVersions(id)).toEqual([2]);
    expect(events(r)).toEqual(['credential.pending v2', 'credential.restored v1']);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.subject).toBe(`[mailgent] Rotation FAILED for ${name}`);
    expect(notice!.mail.text).toContain('its directory does not exist');
    expect(notice!.mail.text).not.toContain('undoing it failed');
  });

  it('an attempt whose pending version was reported leaked revokes it in its undo even where a dependent could not be put back: not kept live', async () => {
    const { name, id } = await generatedKey();
    const r = await receiver();
    const refuse: Record<string, number> = { 'credential.verify': 404, 'credential.restored': 400 };
    r.onEvent = async ({ event }) => {
      // The new value leaks while the dependent takes it.
      if (event.type === 'credential.pending') {
        const pending = await read(id, 2);
        const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { fingerprint: createHash('sha256').update(pending.value as string).digest('hex'), source: 'scan' } });
        expect(reported.status, reported.text).toBe(202);
      }
      r.failWith = refuse[event.type] ?? null;
    };
    await setDependents(id, [webhook(r)]);
    await startRotation(name);
    // Its restore refused, the undo would keep version 2 working for the dependent (PENDING_KEPT_UNDER_DEPENDENTS): leaked, it is revoked all the same.
    await waitFor('version 2 revoked', () => revokedVersions(id), (versions) => versions.includes(2), { timeoutMs: 20_000 });
    expect((await h.sql(`SELECT count(*)::int AS n FROM audit_log WHERE credential_id = $1 AND action = 'rotation.discard_pending' AND detail ? 'kept'`, [id])).rows[0].n).toBe(0);
    expect(events(r).slice(0, 3)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.restored v1']);
  });

  it('a dependent refusing credential.promoted does not undo a rotation that took effect: v1 revoked, the run and the batch succeed, the owners told', async () => {
    const { name, id, ownerMail } = await generatedKey();
    const r = await receiver();
    refusing(r, { 'credential.promoted': 400 });
    await setDependents(id, [webhook(r)]);

    const rotationId = await startRotation(name);
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    const done = await waitForState(rotationId, ['succeeded']);
    expect(done.credentials[0]).toMatchObject({ state: 'succeeded', outcome: 'rotated' });
    expect(stepState(done, 'revoke_previous')).toMatchObject({ state: 'done' });
    expect(await revokedVersions(id)).toEqual([1]);
    expect(await read(id)).toMatchObject({ version: 2, label: 'current' });
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2']);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.subject).toBe(`[mailgent] Rotated ${name}`);
    expect(notice!.mail.text).toMatch(/Not everything went through:\n- telling the dependents that version 2 is current failed: webhook .* answered 400 to credential\.promoted\n/);
  });

  it('a dependent refusing credential.promoted does not keep the ones after it from hearing it; every refusal is told', async () => {
    const { name, id, ownerMail } = await generatedKey();
    const [first, second, third] = [await receiver(), await receiver(), await receiver()];
    refusing(first, { 'credential.promoted': 400 });
    refusing(third, { 'credential.promoted': 400 });
    await setDependents(id, [webhook(first), webhook(second), webhook(third)]);

    const rotationId = await startRotation(name);
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    // Before, the first's refusal ended the step: the second never heard, the third was never tried.
    for (const r of [first, second, third]) expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2']);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.text).toMatch(
      /Not everything went through:\n- telling the dependents that version 2 is current failed: 2 dependents refused: webhook http:\/\/127\.0\.0\.1:\d+ answered 400 to credential\.promoted; webhook http:\/\/127\.0\.0\.1:\d+ answered 400 to credential\.promoted\n/,
    );
    expect(await revokedVersions(id)).toEqual([1]);
  });

  it('a retry of credential.promoted goes on from the dependent that failed, not from the first', async () => {
    const { name, id } = await generatedKey();
    const [first, second, third] = [await receiver(), await receiver(), await receiver()];
    // The second is down for its first credential.promoted (a 503: the step is retried).
    let promotedAtSecond = 0;
    second.onEvent = async ({ event }) => {
      second.failWith = event.type === 'credential.promoted' && ++promotedAtSecond === 1 ? 503 : null;
    };
    await setDependents(id, [webhook(first), webhook(second), webhook(third)]);

    const rotationId = await startRotation(name);
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    const promoted = (r: WebhookReceiver) => r.events.filter((e) => e.event.type === 'credential.promoted').length;
    // Before, the retry told the first again (same id, but a second delivery all the same).
    expect([promoted(first), promoted(second), promoted(third)]).toEqual([1, 2, 1]);
    const done = await waitForState(rotationId, ['succeeded']);
    expect(done.credentials[0]).toMatchObject({ state: 'succeeded', outcome: 'rotated' });
  });

  it('a dependent that keeps failing credential.promoted (a 503 every time) does not keep the ones after it from hearing it', async () => {
    const { name, id, ownerMail } = await generatedKey();
    const [first, second, third] = [await receiver(), await receiver(), await receiver()];
    refusing(second, { 'credential.promoted': 503 });
    await setDependents(id, [webhook(first), webhook(second), webhook(third)]);

    const rotationId = await startRotation(name);
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    const promoted = (r: WebhookReceiver) => r.events.filter((e) => e.event.type === 'credential.promoted').length;
    // Before, [1, 4, 0]: each attempt stopped at the second, and the third never heard.
    expect([promoted(first), promoted(third)]).toEqual([1, 1]);
    expect(promoted(second)).toBeGreaterThan(1);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.text).toMatch(/Not everything went through:\n- telling the dependents that version 2 is current failed: webhook .* answered 503 to credential\.promoted\n/);
    expect(await revokedVersions(id)).toEqual([1]);
  });

  it("a leak's rotation revokes the leaked value before it tells the dependents of the new one: a slow receiver of credential.promoted does not keep it working", async () => {
    const { name, id } = await generatedKey();
    const r = await receiver();
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    r.onEvent = async ({ event }) => {
      if (event.type === 'credential.promoted') await released;
    };
    await setDependents(id, [webhook(r)]);
    try {
      const leak = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, source: 'scan' } });
      expect(leak.status, leak.text).toBe(202);
      await waitFor('the receiver to hold credential.promoted', async () => events(r), (e) => e.includes('credential.promoted v2'));
      // Before, the revoke waited for the receiver's answer (four attempts, each up to its timeout).
      expect(await waitFor('the leaked version revoked while credential.promoted is held', () => revokedVersions(id), (v) => v.includes(1), { timeoutMs: 10_000 })).toEqual([1]);
    } finally {
      release();
    }
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2']);
  });

  it('a rollback puts the dependents back all at once: one failing for now (a 503) does not hold up the others', async () => {
    const { name, id } = await generatedKey({ graceHours: 1 });
    const v1 = (await read(id)).value as string;
    const file = `${unique('service')}.env`;
    const dir = path.join(h.envFilesRoot, owner.id);
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, file), `${ENV_KEY}=${v1}\n`);
    const r = await receiver();
    await setDependents(id, [webhook(r), { type: 'env-file', settings: { file, key: ENV_KEY } }]);
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    h.secret(readFileSync(path.join(dir, file), 'utf8').trim().slice(ENV_KEY.length + 1));
    refusing(r, { 'credential.restored': 503 });
    const rollback = h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    try {
      // Before, the env file waited for the webhook's restore, retried for up to an hour.
      await waitFor('the env file put back while the webhook still fails', async () => readFileSync(path.join(dir, file), 'utf8'), (text) => text === `${ENV_KEY}=${v1}\n`, { timeoutMs: 8_000 });
      expect(r.events.filter((e) => e.event.type === 'credential.restored').length).toBeGreaterThan(0);
    } finally {
      r.onEvent = undefined;
      r.failWith = null;
    }
    const answered = await rollback;
    expect(answered.status, answered.text).toBe(200);
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back', fromVersion: 1, toVersion: 2 });
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2', 'credential.restored v1']);
  });

  it('a notice that cannot be sent does not stop the rotation: it goes through grace and a rollback, each refused notice one of its problems', async () => {
    const name = unique('key');
    const ownerMail = `${name}@example.com`;
    // The stored value is the owner's own address (public, so not registered for the leak sweep): every
    // notice of this credential is addressed to a stored value, and the mail scan refuses it for good.
    const id = await store(name, 'api_key', ownerMail, {
      owners: [ownerMail],
      rotation: { provider: 'generated', settings: { length: 40 }, periodDays: 90, graceHours: 1, maxAttempts: 1 },
    });
    const rotationId = await startRotation(name);
    // Before, the refused grace notice failed the run here: no grace, nothing revoked, nothing rolled back.
    // (The notice goes out beside the grace period: its step settles just after the state says grace.)
    const inGrace = await waitFor(`rotation ${rotationId} in grace, its notice settled`, () => report(rotationId), (r) => r.state === 'failed' || (r.state === 'grace' && stepState(r, 'notify')?.state !== 'running'));
    expect(inGrace.state).toBe('grace');
    expect(stepState(inGrace, 'notify')).toMatchObject({ state: 'failed', error: expect.stringContaining('would carry a stored secret') });

    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([2]);
    // (Read without registering the value: it is an address, in the clear wherever the owners are.)
    expect((await h.api('POST', '/v1/vault.get', { token: owner.token, body: { id } })).body).toMatchObject({ version: 1, label: 'current', value: ownerMail });
    const final = await report(rotationId);
    expect(final.credentials[0]).toMatchObject({ state: 'rolled_back', outcome: 'rolled_back' });
    expect(final.credentials[0]!.progress!.steps.find((s) => s.name === 'notify')).toMatchObject({ state: 'failed' });
    // Neither notice went out, and neither was queued; nor did the notice saying one was withheld
    // (addressed to a stored value too). Each refusal is in the audit log.
    expect(await mailTo(ownerMail)).toEqual([]);
    expect((await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE $1 = ANY(recipients)`, [ownerMail])).rows[0].n).toBe(0);
    const rejected = (await h.sql(`SELECT detail FROM audit_log WHERE credential_id = $1 AND action = 'mail.send' AND outcome = 'rejected'`, [id])).rows;
    expect(rejected.filter((r) => !r.detail.withheld)).toHaveLength(2);
    expect(rejected.filter((r) => r.detail.withheld)).toHaveLength(2);
  });

  it('a rotation notice refused for carrying a stored value (a reason stored as a value after the check) is replaced by one from ids alone, and audited', async () => {
    const name = unique('key');
    const ownerMail = `${name}@example.com`;
    const id = await store(name, 'api_key', h.secret(`sk_${randomBytes(16).toString('hex')}`), {
      owners: [ownerMail],
      rotation: { provider: 'generated', settings: { length: 40 }, periodDays: 90, graceHours: 0, maxAttempts: 1 },
    });
    const reason = `change-ticket-${randomBytes(10).toString('hex')}`;
    const noticeHeld = holdActivity('sendRotationNotice', id);
    const started = await h.api('POST', '/v1/rotations', { token: owner.token, body: { credentials: [name], reason } });
    expect(started.status, started.text).toBe(202);
    await noticeHeld.reached();
    // The reason was no stored value when the rotation was requested; it is one now: stored as this
    // credential's value (a notice is searched for its own credential's values).
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: h.secret(reason) } });
    expect(stored.body).toMatchObject({ version: 3 });
    noticeHeld.release();
    expect(await runResult(started.body.rotationId)).toMatchObject({ state: 'succeeded', toVersion: 2 });

    // Before, the owners heard nothing of the rotation, and no audit row told of the refusal. Both
    // of its notices (rotated; superseded, v3 having replaced v2) print the reason: both withheld.
    const mails = await waitFor('the withheld notices', () => mailTo(ownerMail), (all) => all.length >= 2);
    expect(mails.map((m) => m.mail.subject).sort()).toEqual(['[mailgent] Rotation notice withheld (rotated)', '[mailgent] Rotation notice withheld (superseded)']);
    for (const m of mails) {
      expect(m.mail.text).toContain(`A rotation of credential ${id} ended a step with the outcome '`);
      expect(m.mail.text).toContain(`GET /v1/rotations/${started.body.rotationId}`);
      expect(m.mail.text).not.toContain(name);
    }
    const trail = (await h.sql(`SELECT outcome, detail FROM audit_log WHERE credential_id = $1 AND action = 'mail.send' ORDER BY seq`, [id])).rows;
    expect(trail.map((r) => [r.outcome, r.detail.outcome, Boolean(r.detail.withheld)])).toEqual([
      ['ok', 'rotated', true],
      ['rejected', 'rotated', false],
      ['ok', 'superseded', true],
      ['rejected', 'superseded', false],
    ]);
    const final = await report(started.body.rotationId);
    expect(final.credentials[0]!.progress!.steps.find((s) => s.name === 'notify')).toMatchObject({ state: 'failed' });
  });

  it('a value stored during grace makes a rollback refuse: nothing is restored or revoked early, grace ends as planned, and the owners hear the rotated value still works', async () => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 0.004 }); // 14.4 s
    const r = await receiver();
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const v3 = h.secret(`v3_${randomBytes(16).toString('hex')}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v3 } });
    expect(stored.body).toMatchObject({ version: 3 });

    // Before, the vault took v2 as previous for a rollback already done: the webhook went back to v1,
    // v2 was revoked, and the run ended rolled back with v3 current and nothing working as planned.
    const refused = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(refused.status, refused.text).toBe(409);
    expect(refused.body.detail).toContain('is at version 3, not the rotated 2: a value stored since is current');
    const again = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(again.status).toBe(409);
    expect(again.body.detail).toContain('a value stored since is current');
    expect((await report(rotationId)).state).toBe('grace');
    expect(await revokedVersions(id)).toEqual([]);
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2']);
    // A cancel now undoes nothing either (it would roll back, refused the same way): the run finishes.
    // Before, it was listed as cancelling, and the run ended rotated all the same.
    expect((await report(rotationId)).credentials[0]!.progress!.rollbackRefused).toContain('a value stored since is current');
    const cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
    expect(cancel.status, cancel.text).toBe(202);
    expect(cancel.body).toMatchObject({ cancelling: [], finishing: [id] });

    // The grace period runs out as planned: v1 is revoked, v3 stays current, the webhook was never sent back.
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    expect(await read(id)).toMatchObject({ version: 3, label: 'current', value: v3 });
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2']);
    const done = await report(rotationId);
    expect(done.credentials[0]).toMatchObject({ state: 'succeeded', outcome: 'rotated' });

    // v2 was made at the provider and given to the webhook, and nothing revokes it now: before, the
    // run ended there and no one heard of it. The owners get one notice saying so, after the grace one.
    const mails = await waitFor('the superseded notice', async () => (await mailTo(ownerMail)).filter((m) => m.mail.subject?.includes(name)), (all) => all.length >= 2);
    expect(mails.map((m) => m.mail.subject)).toEqual([`[mailgent] Rotated ${name}`, `[mailgent] ACTION NEEDED: the rotated value of ${name} was replaced; its dependents still have it`]);
    const text = mails[1]!.mail.text!;
    expect(text).toContain('made version 2, but version 3, stored while the rotation ran, is current now.');
    expect(text).toContain('Version 1 was revoked as planned.');
    expect(text).toContain('Version 2 was not revoked: the dependents were given it during the rotation');
    expect(text).toContain('- the rollback could not roll back: ');
  });

  it('a cancel while the grace notice is being sent rolls the rotation back', async () => {
    const { name, id, ownerMail, r, rotationId, runId, hold } = await rotationWithNoticeHeld({ graceHours: 1 });
    try {
      const cancelled = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
      expect(cancelled.status, cancelled.text).toBe(202);
      expect(cancelled.body.cancelling).toEqual([id]);
      const cancelRequested = temporal.api.enums.v1.EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED;
      await waitFor(
        'the cancel request in the history',
        async () => (await h.client.workflow.getHandle(`rotate:${id}`, runId).fetchHistory()).events?.map((e) => e.eventType) ?? [],
        (types) => types.includes(cancelRequested),
      );
    } finally {
      await hold.release();
    }

    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
    const final = await report(rotationId);
    expect(final.credentials[0]).toMatchObject({ state: 'rolled_back', outcome: 'rolled_back' });
    expect(await read(id)).toMatchObject({ version: 1, label: 'current' });
    expect(await revokedVersions(id)).toEqual([2]);
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2', 'credential.restored v1']);
    const subjects = (await notices(ownerMail, name)).map((m) => m.mail.subject).sort();
    expect(subjects).toEqual([`[mailgent] Rotated ${name}`, `[mailgent] Rotation rolled back for ${name}`]);
    await read(id, 2);
  });

  it('a cancel while the rotation is still being planned ends it cancelled, not failed: nothing made, the credential left as it was', async () => {
    const { name, id, ownerMail } = await generatedKey();
    // Planning reads the credential with its current version; an open transaction that holds
    // secret_versions exclusively keeps it (and anything else that reads versions) waiting.
    const lock = await holdTable(h, 'secret_versions');
    try {
      const rotationId = await startRotation(name);
      const runId = await waitFor(
        'the batch to start the run',
        async () => (await h.sql('SELECT run_id FROM rotation_runs WHERE rotation_id = $1 AND credential_id = $2', [rotationId, id])).rows[0]?.run_id as string | undefined,
        Boolean,
      );
      const handle = h.client.workflow.getHandle(`rotate:${id}`, runId!);
      const types = async () => (await handle.fetchHistory()).events?.map((e) => e.eventType) ?? [];
      const EventType = temporal.api.enums.v1.EventType;
      // (An activity with retries has its started event written when it ends: the database shows the wait.)
      await lock.waiting();
      const cancelled = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
      expect(cancelled.status, cancelled.text).toBe(202);
      expect(cancelled.body.cancelling).toEqual([id]);
      await waitFor('the cancel to reach the planning step', types, (t) => t.includes(EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED));
      await lock.release();

      expect(await handle.result()).toMatchObject({ state: 'cancelled', error: 'the rotation was cancelled' });
      const final = await report(rotationId);
      expect(final.state).toBe('cancelled');
      expect(final.credentials[0]).toMatchObject({ state: 'cancelled', outcome: 'cancelled' });
      expect(final.credentials[0]!.progress!.steps.filter((s) => s.state !== 'skipped').map((s) => `${s.name} ${s.state}`)).toEqual(['notify done']);
      // Nothing was made or marked: v1 is current, the credential as it was before the request.
      expect(await read(id)).toMatchObject({ version: 1, label: 'current' });
      expect((await h.sql('SELECT status, pending_version FROM credentials WHERE id = $1', [id])).rows).toEqual([{ status: 'active', pending_version: null }]);
      expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [id])).rows[0].n).toBe(1);
      const mails = await notices(ownerMail, name);
      expect(mails.map((m) => m.mail.subject)).toEqual([`[mailgent] Rotation cancelled for ${name}`]);
      expect(mails[0]!.mail.text).toContain(`was cancelled; nothing it made is left in place, and version 1 is still current.`);
    } finally {
      await lock.release();
    }
  });

  it('a leak reported while a requested rotation runs: the security desk gets the outcome, and on failure hears the leaked value still works', async () => {
    const leakDuring = async (refuseVerify: boolean) => {
      const { name, id, ownerMail } = await generatedKey({ graceHours: 1 });
      const r = await receiver();
      if (refuseVerify) refusing(r, { 'credential.verify': 404 });
      const pending = holdingPending(r);
      await setDependents(id, [webhook(r)]);
      const rotationId = await startRotation(name);
      await pending.reached();
      const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, source: 'scanner' } });
      expect(reported.status, reported.text).toBe(202);
      expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: id, action: 'rotating' })]);
      await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
      pending.release();
      const result = await runResult(rotationId);
      const desk = await waitFor(
        `the incident alert and the outcome notice of ${name} at the security desk`,
        async () => (await mailTo(securityDesk)).filter((m) => m.mail.subject?.endsWith(name)),
        (mails) => mails.length >= 2,
        { timeoutMs: 15_000, show: (mails) => mails.map((m) => m.mail.subject) },
      );
      expect((await notices(ownerMail, name)).filter((m) => !m.mail.subject?.includes('SECURITY'))).toHaveLength(1);
      expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
      await read(id, 2);
      return { name, id, result, outcome: desk.find((m) => !m.mail.subject?.includes('SECURITY'))! };
    };

    const rotated = await leakDuring(false);
    expect(rotated.result).toMatchObject({ state: 'succeeded', leakReported: true });
    expect(await revokedVersions(rotated.id)).toEqual([1]);
    expect(rotated.outcome.mail.subject).toBe(`[mailgent] Rotated ${rotated.name}`);
    expect(rotated.outcome.mail.text).toContain('was rotated because a leak was reported.\n\nVersion 2 is now current.\nVersion 1 has been revoked.');

    const failed = await leakDuring(true);
    expectRotationFailed(failed.result, /answered 404 to credential\.verify$/);
    expect(failed.outcome.mail.subject).toBe(`[mailgent] Rotation FAILED for ${failed.name}`);
    expect(failed.outcome.mail.text).toContain('the rotation did not replace it: the leaked value still works.');
  });

  /**
   * A rotation held at its dependent's credential.pending while `change` is made to its credential
   * (deleted, its policy taken away) and its current value (v1) is reported leaked; `then` runs
   * before the hold ends (a cancel, say). `failVerify`: the dependent never picks up the new value,
   * so the only attempt fails at verify. Ends with the run's result, its incident closed and only the
   * pending version (v2) discarded.
   */
  const changedThenLeaked = async (change: (id: string) => Promise<void>, then: (rotationId: string) => Promise<void>, failVerify = false) => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 1 });
    const r = await receiver();
    if (failVerify) r.answerVersion = 1;
    const pending = holdingPending(r);
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await pending.reached();
    await change(id);
    const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, source: 'scanner' } });
    expect(reported.status, reported.text).toBe(202);
    // Its rotation runs: it hears of the leak (neither change stops it).
    expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
    await then(rotationId);
    pending.release();
    const result = await h.client.workflow.getHandle(`rotate:${id}`).result().catch((e: unknown) => e);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    expect(await revokedVersions(id)).toEqual([2]); // the pending version, discarded: v1, the leaked one, still works
    await read(id, 2);
    return { name, id, ownerMail, result };
  };

  it('a leak heard by a rotation whose credential was deleted before promotion is told as one that is not rotated: the leaked value still works (revoke it, or restore and report again); a cancel then does not rotate it again', async () => {
    /** As changedThenLeaked, the credential deleted; with its runs' outcomes. */
    const deletedThenLeaked = async (then: (rotationId: string) => Promise<void>) => {
      const run = await changedThenLeaked(async (id) => expect((await h.api('DELETE', `/v1/credentials/${id}`, { token: owner.token })).status).toBe(200), then);
      // One run: no leak run after it, which would fail at its plan (a deleted credential is not rotated).
      const runs = (await h.sql(`SELECT outcome FROM run_outcomes WHERE credential_id = $1`, [run.id])).rows.map((row) => row.outcome);
      return { ...run, runs };
    };
    /** What a notice says of the leak: the credential deleted, so not rotated; the leaked value still works; what to do. */
    const expectToldNotRotated = (text: string, id: string) => {
      expect(text).toContain('A leak of this credential was reported, but the credential was deleted while it was being rotated');
      expect(text).toContain('The leaked value (version 1) still works where it was issued.');
      expect(text).toContain(`restore the credential (POST /v1/credentials/${id}/restore) and report the leak again to have it rotated`);
      // Before: "Rotate it again, or revoke it at the provider by hand" (a deleted credential is not rotated), or, cancelled, "being rotated again".
      expect(text).not.toContain('Rotate it again');
      expect(text).not.toContain('being rotated again');
    };

    // The run's next step refuses the deleted credential: the attempt is undone, and the run fails.
    const failed = await deletedThenLeaked(async () => undefined);
    expectRotationFailed(failed.result, /is deleted; it is not rotated$/);
    expect(failed.runs).toEqual(['failed']);
    const [failedNotice, ...moreFailed] = (await notices(failed.ownerMail, failed.name)).filter((m) => !m.mail.subject?.includes('SECURITY'));
    expect(moreFailed).toEqual([]);
    expect(failedNotice!.mail.subject).toBe(`[mailgent] Rotation FAILED for ${failed.name}`);
    expectToldNotRotated(failedNotice!.mail.text!, failed.id);
    // The failed run tells the leak as a cancelled one does (before, only its FAILED notice told it).
    const failedTold = await waitFor(
      `the leak of ${failed.name} told as not rotated`,
      async () => (await mailTo(failed.ownerMail)).filter((m) => m.mail.subject === `[mailgent] SECURITY: leak reported for ${failed.name} (deleted; not rotated)`),
      (mails) => mails.length > 0,
    );
    expect(failedTold).toHaveLength(1);
    expect(failedTold[0]!.mail.text).toContain('(version 1) was reported by scanner');
    expect(recipients(failedTold[0]!.mail)).toEqual(expect.arrayContaining([failed.ownerMail, securityDesk]));

    // Cancelled instead, the attempt undone: before, the run rotated again in leak mode (a cancel does
    // not stop the answer to a leak), and that run failed at its plan: a "Rotation FAILED" notice after
    // a cancelled one that said the credential was being rotated again.
    const cancelled = await deletedThenLeaked(async (rotationId) => {
      const res = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
      expect(res.status, res.text).toBe(202);
    });
    expect(cancelled.result).toMatchObject({ state: 'cancelled', leakReported: true });
    expect(cancelled.runs).toEqual(['cancelled']);
    const told = await waitFor(
      `the notices of ${cancelled.name}`,
      async () => (await mailTo(cancelled.ownerMail)).filter((m) => m.mail.subject?.includes(cancelled.name)),
      (mails) => mails.length >= 3,
      { show: (mails) => mails.map((m) => m.mail.subject) },
    );
    expect(told.map((m) => m.mail.subject).sort()).toEqual(
      [
        `[mailgent] Rotation cancelled for ${cancelled.name}`,
        `[mailgent] SECURITY: leak reported for ${cancelled.name}`,
        `[mailgent] SECURITY: leak reported for ${cancelled.name} (deleted; not rotated)`,
      ].sort(),
    );
    const cancelNotice = told.find((m) => m.mail.subject === `[mailgent] Rotation cancelled for ${cancelled.name}`)!;
    expectToldNotRotated(cancelNotice.mail.text!, cancelled.id);
    const unrotated = told.find((m) => m.mail.subject?.endsWith('(deleted; not rotated)'))!;
    expect(unrotated.mail.text).toContain(`(version 1) was reported by scanner`);
    expect(recipients(unrotated.mail)).toEqual(expect.arrayContaining([cancelled.ownerMail, securityDesk]));
  });

  /** The rotation emails queued for `address` (the outbox: every one a run queued is there once it has ended, delivered or not). */
  const queuedFor = async (address: string) =>
    (await h.sql(`SELECT subject, text_body FROM mail_outbox WHERE $1 = ANY(recipients) ORDER BY created_at`, [address])).rows as { subject: string; text_body: string }[];

  it('a replaced leaked version of a credential deleted during its rotation is revoked by the cancelled run, and nothing else is told: no leak email names a version nobody reported, and the notice does not say the revoked value still works', async () => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 1 });
    // Version 2 stored by hand: version 1 is replaced, and still live (a store revokes nothing at the provider).
    await store(name, 'api_key', h.secret(`v2_${randomBytes(16).toString('hex')}`));
    expect(await revokedVersions(id)).toEqual([]);
    const r = await receiver();
    const pending = holdingPending(r);
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await pending.reached();
    expect((await h.api('DELETE', `/v1/credentials/${id}`, { token: owner.token })).status).toBe(200);
    // Version 1, the replaced one, is reported leaked: the running rotation (from version 2) hears of it.
    const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, version: 1, source: 'scanner' } });
    expect(reported.status, reported.text).toBe(202);
    expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
    const cancelled = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
    expect(cancelled.status, cancelled.text).toBe(202);
    pending.release();

    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'cancelled', leakReported: true, fromVersion: 2, toVersion: 3 });
    expect((await h.sql(`SELECT outcome FROM run_outcomes WHERE credential_id = $1`, [id])).rows.map((row) => row.outcome)).toEqual(['cancelled']);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    // The leaked version 1 is revoked (replaced, it is the run's to revoke), and the pending version 3 discarded; version 2 is current, and was never reported.
    expect(await revokedVersions(id)).toEqual([1, 3]);

    // Before, the run asked again as it closed its incidents, found no leaked version left, and told
    // "the current one": a "(deleted; not rotated)" email of version 2, which nobody reported.
    const queued = await queuedFor(ownerMail);
    expect(queued.filter((m) => m.subject.includes('not rotated'))).toEqual([]);
    expect(queued.filter((m) => m.text_body.includes('(version 2)')).map((m) => m.subject)).toEqual([]);
    expect(queued.map((m) => m.subject).sort()).toEqual([`[mailgent] Rotation cancelled for ${name}`, `[mailgent] SECURITY: leak reported for ${name}`].sort());
    const told = await waitFor(
      `the notices of ${name}`,
      async () => (await mailTo(ownerMail)).filter((m) => m.mail.subject?.includes(name)),
      (mails) => mails.length >= 2,
      { show: (mails) => mails.map((m) => m.mail.subject) },
    );
    const notice = told.find((m) => m.mail.subject === `[mailgent] Rotation cancelled for ${name}`)!;
    expect(notice.mail.text).toContain('A leak of this credential was reported, but the credential was deleted while it was being rotated');
    expect(notice.mail.text).toContain('Version 1, reported leaked and replaced since, has been revoked at the provider.');
    // Before: "the leaked value was not replaced and still works where it was issued", of the value the run had just revoked.
    expect(notice.mail.text).not.toContain('still works');
    expect(notice.mail.text).not.toContain('Rotate it again');
    expect(notice.mail.text).not.toContain('being rotated again');
    await read(id, 3);
  });

  it('a leak heard by a rotation whose credential lost its rotation policy meanwhile: its cancel or failure notice says to set a policy and report again, or revoke it by hand, not to rotate it again', async () => {
    /** As changedThenLeaked, the credential's rotation policy taken away; with the three emails about it. */
    const unmanagedThenLeaked = async (then: (rotationId: string) => Promise<void>, failVerify = false) => {
      const unmanage = async (id: string) => {
        const patchedPolicy = await h.api('PATCH', `/v1/credentials/${id}`, { token: owner.token, body: { rotation: null } });
        expect(patchedPolicy.status, patchedPolicy.text).toBe(200);
      };
      const run = await changedThenLeaked(unmanage, then, failVerify);
      const told = await waitFor(
        `the notices of ${run.name}`,
        async () => (await mailTo(run.ownerMail)).filter((m) => m.mail.subject?.includes(run.name)),
        (mails) => mails.length >= 3,
        { show: (mails) => mails.map((m) => m.mail.subject) },
      );
      return { ...run, told };
    };
    const expectToldToSetPolicy = (text: string, id: string) => {
      expect(text).toContain('A leak of this credential was reported, but its rotation policy was taken away while it was being rotated');
      expect(text).toContain('The leaked value (version 1) still works where it was issued.');
      expect(text).toContain(`Set a rotation policy on it (PATCH /v1/credentials/${id}) and report the leak again to have it rotated, or revoke it there by hand`);
      // Before: "Rotate it again, or revoke it at the provider by hand" (nothing rotates a credential without a policy).
      expect(text).not.toContain('Rotate it again');
      expect(text).not.toContain('being rotated again');
    };

    const cancelled = await unmanagedThenLeaked(async (rotationId) => {
      const res = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
      expect(res.status, res.text).toBe(202);
    });
    expect(cancelled.result).toMatchObject({ state: 'cancelled', leakReported: true });
    expect(cancelled.told.map((m) => m.mail.subject).sort()).toEqual(
      [
        `[mailgent] Rotation cancelled for ${cancelled.name}`,
        `[mailgent] SECURITY: leak reported for ${cancelled.name}`,
        `[mailgent] SECURITY: leak reported for ${cancelled.name} (no rotation policy; not rotated)`,
      ].sort(),
    );
    expectToldToSetPolicy(cancelled.told.find((m) => m.mail.subject === `[mailgent] Rotation cancelled for ${cancelled.name}`)!.mail.text!, cancelled.id);

    const failed = await unmanagedThenLeaked(async () => undefined, true);
    expectRotationFailed(failed.result, /reports version 1, not 2$/);
    expect(failed.told.map((m) => m.mail.subject).sort()).toEqual(
      [
        `[mailgent] Rotation FAILED for ${failed.name}`,
        `[mailgent] SECURITY: leak reported for ${failed.name}`,
        `[mailgent] SECURITY: leak reported for ${failed.name} (no rotation policy; not rotated)`,
      ].sort(),
    );
    expectToldToSetPolicy(failed.told.find((m) => m.mail.subject === `[mailgent] Rotation FAILED for ${failed.name}`)!.mail.text!, failed.id);
  });

  it('a leak rotation started with its answer lost, then reported again while it runs, is recorded: its rotation reads as its run ends, not running for ever', async () => {
    const { name, id } = await generatedKey({ graceHours: 1 });
    const r = await receiver();
    const pending = holdingPending(r);
    await setDependents(id, [webhook(r)]);
    // The leak rotation's start reaches Temporal and its answer is lost: the report is a 503.
    const workflow = Object.create(h.client.workflow, {
      signalWithStart: {
        value: async (...args: Parameters<typeof h.client.workflow.signalWithStart>) => {
          await h.client.workflow.signalWithStart(...args);
          throw new Error('14 UNAVAILABLE: the connection was lost');
        },
      },
    });
    const deps = { pool: h.services.pool, vault: h.services.vault, secrets: h.services.secrets, client: Object.create(h.client, { workflow: { value: workflow } }), taskQueue: h.taskQueue, securityNotify: [securityDesk] };
    const caller = { identityId: owner.id, actor: `identity:${owner.id}`, requestId: randomUUID() };
    await expect(reportLeakWith(deps, caller, owner.id, { credential: name, source: 'scan' })).rejects.toMatchObject({ status: 503 });
    await pending.reached();
    const again = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, source: 'scan' } });
    expect(again.status, again.text).toBe(202);
    expect(again.body.results).toEqual([expect.objectContaining({ credentialId: id, action: 'joined', rotationId: expect.any(String) })]);
    pending.release();
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    // Before, the rotation the report named had no run recorded: it read 'running' for ever.
    const final = await report(again.body.results[0].rotationId as string);
    expect(final.state).toBe('succeeded');
    expect(final.credentials[0]).toMatchObject({ state: 'succeeded', outcome: 'rotated' });
    expect(await revokedVersions(id)).toEqual([1]);
    await read(id);
  });

  it('a rollback still running when the rotation is cancelled is answered as it ends (rolled back), not refused', async () => {
    const { name, id } = await generatedKey({ graceHours: 1 });
    const r = await receiver();
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const restoring = holdActivity('restoreDependent', id);
    const rollback = h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    await restoring.reached();
    const cancel = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
    expect(cancel.status, cancel.text).toBe(202);
    const EventType = temporal.api.enums.v1.EventType;
    await waitFor(
      'the cancel to reach the run',
      async () => (await h.client.workflow.getHandle(`rotate:${id}`).fetchHistory()).events?.map((e) => e.eventType) ?? [],
      (types) => types.includes(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED),
    );
    restoring.release();
    // Before, a 409 "nothing to roll back: Workflow cancelled", for a rollback that went on and was done.
    const answered = await rollback;
    expect(answered.status, answered.text).toBe(200);
    expect(answered.body.results).toEqual([expect.objectContaining({ credentialId: id, rolledBack: true })]);
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
    expect(await read(id)).toMatchObject({ version: 1, label: 'current' });
    expect(events(r)).toEqual(['credential.pending v2', 'credential.verify v2', 'credential.promoted v2', 'credential.restored v1']);
    await read(id, 2);
  });

  it('every restore of a run has an idempotency key of its own: after a failed attempt and again on a rollback', async () => {
    const { name, id } = await generatedKey({ graceHours: 1, maxAttempts: 2 });
    const r = await receiver();
    // Attempt 1 (version 2) is never picked up: verify fails until its retries run out.
    r.onEvent = async ({ event }) => {
      r.answerVersion = event.type === 'credential.verify' && event.version === 2 ? 1 : null;
    };
    await setDependents(id, [webhook(r)]);

    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back', attempt: 2 });

    const restores = r.events.filter((e) => e.event.type === 'credential.restored').map((e) => e.event);
    expect(restores.map((e) => e.version)).toEqual([1, 1]);
    expect(new Set(restores.map((e) => e.id)).size).toBe(2);
    expect(restores.map((e) => e.id)).toEqual([`${rotationId}:${id}:restore:0:1:from:2`, `${rotationId}:${id}:restore:0:1:from:3`]);
    await read(id, 2);
    await read(id, 3);
  }, 45_000);

  it('a refused rotation notice sent again (an attempt retried after it recorded the refusal) is refused again, not reported sent', async () => {
    const { id, ownerMail } = await generatedKey();
    const value = (await read(id)).value as string;
    const activities = createActivities(h.deps);
    const notice = { rotationId: randomUUID(), identityId: owner.id, credentialId: id, workflowId: `rotate:${id}`, outcome: 'failed' as const, mode: 'requested' as const, fromVersion: 1, error: `the provider answered: ${value}` };
    await expect(activities.sendRotationNotice(notice)).rejects.toThrow('would carry a stored secret');
    // Before, the retry found the refusal's outbox row, took the notice for queued, and answered it sent (abandoned).
    await expect(activities.sendRotationNotice(notice)).rejects.toThrow('would carry a stored secret');
    const withheld = await waitFor('the withheld notice', () => mailTo(ownerMail), (mails) => mails.length > 0);
    expect(withheld.map((m) => m.mail.subject)).toEqual(['[mailgent] Rotation notice withheld (failed)']);
    const trail = (await h.sql(`SELECT outcome, detail FROM audit_log WHERE credential_id = $1 AND action = 'mail.send' ORDER BY seq`, [id])).rows;
    expect(trail.map((r) => [r.outcome, Boolean(r.detail.withheld)])).toEqual([
      ['ok', true],
      ['rejected', false],
    ]);
  });

  it('a rollback whose dependent cannot be put back says the previous version is current again in the vault, not everywhere', async () => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 1 });
    const r = await receiver();
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    r.failWith = 400;
    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
    const notice = (await waitFor('the rollback notice', () => notices(ownerMail, name), (mails) => mails.some((m) => m.mail.subject?.startsWith('[mailgent] Rotation rolled back')))).find((m) =>
      m.mail.subject?.startsWith('[mailgent] Rotation rolled back'),
    )!;
    // Before, "version 1 is current again everywhere", above the dependent it was not restored at.
    expect(notice.mail.text).toContain('version 1 is current again in the vault, but not everywhere (see below)');
    expect(notice.mail.text).not.toContain('everywhere,');
    expect(notice.mail.text).toMatch(/Not everything went through:\n- .*answered 400/);
    // The dependent not put back still uses version 2: left working, not revoked under it (before,
    // revoked: the rollback broke the one dependent it could not spare).
    expect(await revokedVersions(id)).toEqual([]);
    expect(notice.mail.text).toContain('and version 2 was left working: the dependents below could not be put back and still use it. Once they are off it, revoke it at the provider, if it keeps one.');
    await read(id, 1);
    await read(id, 2);

    // Version 2, left working, is reported leaked: the leak's rotation (1 → 3) revokes it too. Before,
    // it lay between the version replaced and the one made, and the incident closed with it working.
    r.failWith = null;
    const leak = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, version: 2, source: 'scan' } });
    expect(leak.body.results, leak.text).toEqual([expect.objectContaining({ version: 2, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 3 });
    expect(await revokedVersions(id)).toEqual([1, 2]);
  });

  it('a rollback whose dependent cannot be put back leaves the abandoned key working at an http provider too, which keeps keys apart', async () => {
    const provider = await new ProviderServer().start();
    try {
      const admin = unique('provider-admin');
      await store(admin, 'api_key', h.secret(provider.adminToken));
      const name = unique('http-key');
      const ownerMail = `${name}@example.com`;
      const settings = { create: { url: `${provider.url}/keys` }, verify: { url: `${provider.url}/whoami`, waitSeconds: 0 }, revoke: { url: `${provider.url}/keys/{id}` }, auth: { credential: admin }, valuePath: 'secret', idPath: 'id' };
      const id = await store(name, 'api_key', h.secret(`v1_${randomBytes(16).toString('hex')}`), {
        owners: [ownerMail],
        rotation: { provider: 'http', settings, periodDays: 90, graceHours: 1, maxAttempts: 1 },
      });
      const r = await receiver();
      await setDependents(id, [webhook(r)]);
      const rotationId = await startRotation(name);
      await waitForState(rotationId, ['grace']);
      await read(id, 2);
      expect(provider.listKeys()).toEqual([expect.objectContaining({ active: true })]);
      r.failWith = 400;
      const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
      expect(rolledBack.status, rolledBack.text).toBe(200);
      expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
      // Before, the provider's discard revoked it: the dependent still on it broke.
      expect(provider.listKeys()).toEqual([expect.objectContaining({ active: true })]);
      expect(await revokedVersions(id)).toEqual([]);
      const notice = (await waitFor('the rollback notice', () => notices(ownerMail, name), (mails) => mails.some((m) => m.mail.subject?.startsWith('[mailgent] Rotation rolled back')))).find((m) =>
        m.mail.subject?.startsWith('[mailgent] Rotation rolled back'),
      )!;
      expect(notice.mail.text).toContain('and version 2 was left working: the dependents below could not be put back and still use it. Once they are off it, revoke it at the provider, if it keeps one.');
    } finally {
      await provider.stop();
    }
  });

  it('a leak reported while the final notice is being sent rotates the leaked value again and closes the incident', async () => {
    const { name, id, rotationId, hold } = await rotationWithNoticeHeld();
    try {
      // Version 2 is current now (version 1 revoked): the report names it.
      const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: name, source: 'scanner' } });
      expect(reported.status, reported.text).toBe(202);
      expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 2, action: 'rotating' })]);
      await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
    } finally {
      await hold.release();
    }

    const closed = await waitFor(
      'the incident to be closed',
      async () => (await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows,
      (rows) => rows.every((row) => row.status === 'closed'),
      { timeoutMs: 20_000 },
    );
    expect(closed).toEqual([{ status: 'closed' }]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    expect(await read(id)).toMatchObject({ version: 3, label: 'current' });
    expect(await revokedVersions(id)).toEqual([1, 2]);
    // The requested rotation's report follows its run to the one it continued as: before, it asked
    // the first run, closed while still 'running', and the batch read as running for ever.
    const final = await report(rotationId);
    expect(final.state).toBe('succeeded');
    expect(final.credentials[0]).toMatchObject({ state: 'succeeded', status: 'COMPLETED', progress: expect.objectContaining({ fromVersion: 2, toVersion: 3 }) });
    await read(id, 2);
  });

  // By fingerprint, or by name with the version (as MCP's report_leak sends a handle's): either names the version that leaked.
  for (const by of ['a fingerprint', 'name and version'] as const) {
    it(`a report by ${by} of the value a leak rotation just made, while its incident is open, is a new leak: the run rotates again`, async () => {
      const key = await generatedKey();
      const r = await receiver();
      const pending = holdingPending(r);
      await setDependents(key.id, [webhook(r)]);
      const first = await h.api('POST', '/v1/leaks', { token: owner.token, body: { credential: key.name, source: 'scanner' } });
      expect(first.body.results).toEqual([expect.objectContaining({ credentialId: key.id, version: 1, action: 'rotating' })]);
      await pending.reached();
      const runId = (await h.client.workflow.getHandle(`rotate:${key.id}`).describe()).runId;
      const hold = await holdNotice(runId, key.id, 'rotated:leak');
      try {
        pending.release();
        await hold.reached();
        // v2 is current and v1 revoked; the incident stays open until the final notice is out.
        const v2 = await read(key.id);
        expect(v2).toMatchObject({ version: 2, label: 'current' });
        const fingerprint = createHash('sha256').update(v2.value as string).digest('hex');
        const body = by === 'a fingerprint' ? { fingerprint, source: 'scanner' } : { credential: key.name, version: 2, source: 'scanner' };
        const second = await h.api('POST', '/v1/leaks', { token: owner.token, body });
        expect(second.status, second.text).toBe(202);
        // Before, it only joined the open incident, which the run then closed with v2 still live.
        expect(second.body.results).toEqual([expect.objectContaining({ credentialId: key.id, version: 2, action: 'joined' })]);
        // The same report again is the same signal: one more rotation, not two.
        expect((await h.api('POST', '/v1/leaks', { token: owner.token, body })).body.results[0].action).toBe('joined');
      } finally {
        await hold.release();
      }
      expect(await h.client.workflow.getHandle(`rotate:${key.id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
      expect(await read(key.id)).toMatchObject({ version: 3, label: 'current' });
      expect(await revokedVersions(key.id)).toEqual([1, 2]);
      const incidents = (await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [key.id])).rows;
      expect(incidents).toEqual([{ status: 'closed' }]);
    });
  }

  it('an attempt begun from a value stored after the rotation was planned is undone onto that value at the provider as at the dependents', async () => {
    const role = `mg_rf_planned_${tag}`;
    const adminName = unique('pg-admin');
    const v1 = await loginRoleWithAdmin(h, role, adminName, store);
    roles.push(role);
    const name = unique('app-db');
    const id = await store(name, 'password', v1, {
      rotation: { provider: 'postgres-role', settings: { adminCredential: adminName, role }, periodDays: 30, graceHours: 0, maxAttempts: 2 },
    });
    const r = await receiver();
    refusing(r, { 'credential.verify': 404 });
    const pending = holdingPending(r);
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await pending.reached();
    // While attempt 1 is pending, the owner sets a password of their own on the role and stores it (v3).
    const v3 = h.secret(randomBytes(18).toString('base64url'));
    await h.sql(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD ${pg.escapeLiteral(v3)}`);
    await store(name, 'password', v3);
    pending.release();

    // Attempt 2 begins from v3 (its pending version is v4), is refused at verify like attempt 1, and is undone.
    expectRotationFailed(await runResult(rotationId), /404/);
    expect(await read(id)).toMatchObject({ version: 3, value: v3 });
    expect(events(r).slice(-2)).toEqual(['credential.verify v4', 'credential.restored v3']);
    // Before, the role was put back on the password of the version the rotation had planned from (v1).
    expect(await canLogin(h, role, v3)).toBe(true);
    expect(await canLogin(h, role, v1)).toBe(false);
    await read(id, 2);
    await read(id, 4);
  });

  /**
   * A single-role postgres-role credential whose admin URL goes through a proxy (`proxy.down()` makes
   * the admin connection, and so the provider, unreachable); its id, name and version 1's password.
   */
  const singleRoleBehindProxy = async (role: string, rotation: Record<string, unknown> = {}) => {
    const db = new URL(h.databaseUrl);
    const proxy = await new TcpProxy({ host: db.hostname, port: Number(db.port) }).start();
    proxies.push(proxy);
    db.host = proxy.address;
    const adminName = unique('pg-admin');
    const v1 = await loginRoleWithAdmin(h, role, adminName, store);
    roles.push(role);
    await store(adminName, 'generic', h.secret(db.href));
    const name = unique('app-db');
    const ownerMail = `${name}@example.com`;
    const id = await store(name, 'password', v1, {
      owners: [ownerMail],
      rotation: { provider: 'postgres-role', settings: { adminCredential: adminName, role }, periodDays: 30, graceHours: 0, maxAttempts: 1, ...rotation },
    });
    return { proxy, role, name, id, ownerMail, v1 };
  };
  /** How the credential's run ended, once it did: within `timeoutMs`, or a failure naming what it still runs (each activity's attempt and last error). */
  const runEnd = async (id: string, timeoutMs = 30_000) => {
    const handle = h.client.workflow.getHandle(`rotate:${id}`);
    const codecs = [...(h.services.dataConverter.payloadCodecs ?? [])].reverse();
    // A failure's message travels encoded (the failure converter): decoded here for the test's report.
    const message = async (failure: temporal.api.failure.v1.IFailure | null | undefined) => {
      if (!failure?.encodedAttributes) return failure?.message;
      let payloads = [failure.encodedAttributes];
      for (const codec of codecs) payloads = await codec.decode(payloads);
      return (JSON.parse(Buffer.from(payloads[0]!.data!).toString('utf8')) as { message?: string }).message;
    };
    const probe = async () => {
      const d = await handle.describe();
      const pending = await Promise.all((d.raw.pendingActivities ?? []).map(async (a) => ({ activity: a.activityType?.name, attempt: a.attempt, lastFailure: await message(a.lastFailure) })));
      return { status: d.status.name, pending };
    };
    const described = await waitFor(`the run of ${id} to end`, probe, (d) => d.status !== 'RUNNING', { timeoutMs });
    return { status: described.status, result: await handle.result().catch((e: unknown) => e) };
  };
  /** The reads of the credential's values for a provider's discard (each is a value handed to the provider). */
  const discardReads = async (id: string) =>
    (await h.sql(`SELECT count(*)::int AS n FROM audit_log WHERE credential_id = $1 AND action = 'rotation.read' AND detail->>'purpose' = 'provider.discard'`, [id])).rows[0]
      .n as number;

  it('an attempt whose create was refused before it reached the provider (the credential deleted meanwhile) is undone without the provider: one unreachable then does not hold up the undo', async () => {
    const { proxy, role, name, id, ownerMail, v1 } = await singleRoleBehindProxy(`mg_rf_unsent_${tag}`);
    const creating = holdActivity('createPendingVersion', id);
    const rotationId = await startRotation(name);
    await creating.reached();
    // The credential is deleted before the create runs (which refuses it, sending nothing), and the admin connection is lost.
    expect((await h.api('DELETE', `/v1/credentials/${id}`, { token: owner.token })).status).toBe(200);
    await proxy.down();
    creating.release();

    // Before, the undo put the role "back" on version 1 through the admin connection it could not
    // reach: retried for the compensation's hour, then the attempt counted as half-undone.
    const end = await runEnd(id);
    expect(end.status).toBe('FAILED');
    expectRotationFailed(end.result, /is deleted; it is not rotated$/);
    const failed = await report(rotationId);
    expect(stepState(failed, 'create_pending')).toMatchObject({ state: 'failed' });
    expect(stepState(failed, 'compensate')).toMatchObject({ state: 'done' });
    // Nothing reached the provider, so nothing was asked of it: no value read for it, the role as it was.
    expect(await discardReads(id)).toBe(0);
    expect(await canLogin(h, role, v1)).toBe(true);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.text).toContain('it was undone and nothing changed');
  });

  it('an attempt a cancel refused before its create was sent is undone without the provider: one unreachable then does not make the cancel half-undone', async () => {
    const { proxy, role, name, id, ownerMail, v1 } = await singleRoleBehindProxy(`mg_rf_unsent2_${tag}`, { maxAttempts: 2 });
    const r = await receiver();
    r.answerVersion = 1; // it never picks up the new value: attempt 1 fails at verify (not for good), and is undone
    await setDependents(id, [webhook(r)]);
    const firstUndo = holdActivity('discardAttempt', id);
    const rotationId = await startRotation(name);
    await firstUndo.reached();
    // The cancel comes while attempt 1 is being undone: attempt 2's create is refused before it is sent.
    const cancelled = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
    expect(cancelled.status, cancelled.text).toBe(202);
    const cancelRequested = temporal.api.enums.v1.EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED;
    await waitFor('the cancel to reach the run', async () => (await h.client.workflow.getHandle(`rotate:${id}`).fetchHistory()).events!.some((e) => e.eventType === cancelRequested), Boolean);
    const secondUndo = holdActivity('discardAttempt', id);
    firstUndo.release();
    await secondUndo.reached();
    // Attempt 1's undo has put the role back on version 1; now the admin connection is lost.
    expect(await canLogin(h, role, v1)).toBe(true);
    await proxy.down();
    secondUndo.release();

    // Before, attempt 2's undo asked the unreachable provider to put the role on version 1 (where it
    // already was): retried for an hour, then the cancel ended half-undone, the credential rotation_failed.
    const end = await runEnd(id);
    expect(end.status).toBe('COMPLETED');
    expect(end.result).toMatchObject({ state: 'cancelled', attempt: 2 });
    expect(stepState(await report(rotationId), 'compensate')).toMatchObject({ state: 'done' });
    expect(await credentialRow(id)).toMatchObject({ status: 'active', version: 1, pendingVersion: null });
    expect(await discardReads(id)).toBe(2); // attempt 1's (its pending version and the current one): its create did reach the provider
    expect(await canLogin(h, role, v1)).toBe(true);
    const [notice, ...more] = await notices(ownerMail, name);
    expect(more).toEqual([]);
    expect(notice!.mail.subject).toBe(`[mailgent] Rotation cancelled for ${name}`);
    expect(notice!.mail.text).toContain('was cancelled and undone; version 1 is still current.');
    await read(id, 2);
  });

  /** A login role whose password a single-role postgres-role credential holds, rotated into its grace period: v2 now logs in. */
  const singleRoleInGrace = async (role: string) => {
    const adminName = unique('pg-admin');
    const v1 = await loginRoleWithAdmin(h, role, adminName, store);
    roles.push(role);
    const name = unique('app-db');
    const id = await store(name, 'password', v1, { rotation: { provider: 'postgres-role', settings: { adminCredential: adminName, role }, periodDays: 30, graceHours: 1 } });
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const v2 = (await read(id)).value as string;
    expect(await canLogin(h, role, v2)).toBe(true);
    return { name, id, rotationId, v1, v2 };
  };

  it('a rollback of a single PostgreSQL role puts the previous password back on the role', async () => {
    const role = `mg_rf_${tag}`;
    const { id, rotationId, v1, v2 } = await singleRoleInGrace(role);
    expect(await canLogin(h, role, v1)).toBe(false);

    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
    expect(await read(id)).toMatchObject({ version: 1, label: 'current', value: v1 });
    expect(await canLogin(h, role, v1)).toBe(true);
    expect(await canLogin(h, role, v2)).toBe(false);
    expect(await revokedVersions(id)).toEqual([2]);
  });

  it('a value stored while a rollback of a single PostgreSQL role forgets the rotated password is the one the role gets, not the rolled-back one', async () => {
    const role = `mg_rf3_${tag}`;
    const { name, id, rotationId, v1, v2 } = await singleRoleInGrace(role);
    const forgetting = holdActivity('revokeVersion', id);
    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    await forgetting.reached();
    // The rollback has answered (v1 current again in the vault); before its revoke of v2 runs, the owner stores v3.
    const v3 = h.secret(randomBytes(18).toString('base64url'));
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'password', value: v3 } });
    expect(stored.body).toMatchObject({ version: 3 });
    forgetting.release();
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
    // Before, the role was put back on v1 while the vault said v3 was current.
    expect(await read(id)).toMatchObject({ version: 3, label: 'current', value: v3 });
    expect(await canLogin(h, role, v3)).toBe(true);
    expect(await canLogin(h, role, v1)).toBe(false);
    expect(await canLogin(h, role, v2)).toBe(false);
  });

  /** Reports a leaked value by its SHA-256; the running rotation of the credential hears of it. */
  const reportLeak = async (value: string, credentialId: string) => {
    const fingerprint = createHash('sha256').update(value).digest('hex');
    const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { fingerprint, source: 'secret-scanner' } });
    expect(reported.status, reported.text).toBe(202);
    expect(reported.body.results).toEqual([expect.objectContaining({ credentialId, action: 'rotating' })]);
  };

  it('a single PostgreSQL role whose rotated password was replaced during grace, then reported leaked, is put on the stored one: the leaked password stops working', async () => {
    const role = `mg_rf2_${tag}`;
    const { name, id, rotationId, v2 } = await singleRoleInGrace(role);
    const v3 = h.secret(randomBytes(18).toString('base64url'));
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'password', value: v3 } });
    expect(stored.body).toMatchObject({ version: 3 });

    await reportLeak(v2, id);
    // Before, the run "revoked" v2 with the provider's revoke, which has nothing to do for a single
    // role: v2 stayed the role's password while the vault marked it revoked.
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await canLogin(h, role, v2)).toBe(false);
    expect(await canLogin(h, role, v3)).toBe(true);
    expect(await read(id)).toMatchObject({ version: 3, label: 'current', value: v3 });
    expect(await revokedVersions(id)).toEqual([1, 2]);
  });

  it('a leak of the replaced rotated version reported while its superseded notice is being sent is answered: revoked, and a second notice says so', async () => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 0.005 }); // 18 s: the store and the hold must be in place before it ends, on a loaded machine too
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const runId = (await started(rotationId)).credentials[0]!.runId!;
    const v2 = (await read(id)).value as string;
    const v3 = h.secret(`v3_${randomBytes(16).toString('hex')}`);
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v3 } })).body).toMatchObject({ version: 3 });
    const hold = await holdNotice(runId, id, 'superseded');
    try {
      await hold.reached();
      await reportLeak(v2, id);
    } finally {
      await hold.release();
    }
    // Before, the incident was closed by the notice that had gone out before the report: v2 stayed working.
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect(await read(id)).toMatchObject({ version: 3, label: 'current', value: v3 });
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    const mails = await waitFor('both superseded notices', async () => (await mailTo(ownerMail)).filter((m) => m.mail.subject?.includes('was replaced')), (all) => all.length >= 2);
    const texts = mails.map((m) => m.mail.text!);
    expect(texts.filter((t) => t.includes('Version 2 was not revoked'))).toHaveLength(1);
    expect(texts.filter((t) => t.includes('Version 2 was reported leaked and has been revoked.'))).toHaveLength(1);
  });

  it('a value stored and the rotated version reported leaked while the final notice waits: that version is revoked, and the stored value is not rotated', async () => {
    const { name, id, ownerMail } = await generatedKey();
    // The run is held at its first store (the credential's row locked) until its final notice is held in turn.
    const lock = new pg.Client({ connectionString: h.databaseUrl });
    await lock.connect();
    await lock.query('BEGIN');
    await lock.query('SELECT id FROM credentials WHERE id = $1 FOR NO KEY UPDATE', [id]);
    let hold: Awaited<ReturnType<typeof holdNotice>> | undefined;
    try {
      const rotationId = await startRotation(name);
      const runId = (await started(rotationId)).credentials[0]!.runId!;
      hold = await holdNotice(runId, id, 'rotated');
      await lock.query('ROLLBACK');
      await hold.reached();
      // Promoted, the previous version revoked, its notice (no grace) waiting: a value is stored, and the rotated one reported leaked.
      const promoted = await read(id);
      expect(promoted.version).toBe(2);
      const v2 = promoted.value as string;
      const v3 = h.secret(`v3_${randomBytes(16).toString('hex')}`);
      expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v3 } })).body).toMatchObject({ version: 3 });
      await reportLeak(v2, id);
      await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
      await hold.release();
      hold = undefined;
      // Before, the run rotated the stored value (v3, which did not leak) in leak mode, and the leaked v2 kept working.
      expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
      expect(await revokedVersions(id)).toEqual([1, 2]);
      expect(await read(id)).toMatchObject({ version: 3, label: 'current', value: v3 });
      expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
      const mails = await waitFor('the superseded notice', async () => (await mailTo(ownerMail)).filter((m) => m.mail.subject?.includes('was replaced')), (all) => all.length >= 1);
      expect(mails.map((m) => m.mail.text!).filter((t) => t.includes('Version 2 was reported leaked and has been revoked.'))).toHaveLength(1);
    } finally {
      await hold?.release();
      await lock.end().catch(() => undefined);
    }
  });

  it('a leak of a value stored during grace and replaced since is revoked by the leak rotation that follows', async () => {
    const { name, id } = await generatedKey({ graceHours: 0.005 });
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const values: string[] = [];
    for (const version of [3, 4]) {
      values.push(h.secret(`v${version}_${randomBytes(16).toString('hex')}`));
      expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: values.at(-1) } })).body).toMatchObject({ version });
    }
    await reportLeak(values[0]!, id);
    // The run revokes v1, tells the owners v2 was replaced, and continues as new to rotate v4 (the
    // leak may concern a newer value too); before, that run had forgotten v3, which kept working.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 4, toVersion: 5 });
    expect(await revokedVersions(id)).toEqual([1, 3, 4]);
    expect(await read(id)).toMatchObject({ version: 5, label: 'current' });
    await read(id, 2);
  });

  it('a leak of the replaced rotated version reported while the run closes its incidents is answered: revoked, not left working', async () => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 0.003 }); // 11 s: the store (a moment after grace begins) must be in before it ends, on a loaded machine too
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const v2 = (await read(id)).value as string;
    const v3 = h.secret(`v3_${randomBytes(16).toString('hex')}`);
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v3 } })).body).toMatchObject({ version: 3 });
    // Grace over, v1 revoked, the superseded notice out: the run's last step, closing incidents, is held while v2 is reported.
    const closing = holdActivity('closeLeakIncidents', id);
    await closing.reached();
    await reportLeak(v2, id);
    await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
    closing.release();
    // Before, the run ended there: the report was taken as answered by revoking v2, which nothing then did.
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect(await read(id)).toMatchObject({ version: 3, label: 'current', value: v3 });
    const mails = await waitFor('both superseded notices', async () => (await mailTo(ownerMail)).filter((m) => m.mail.subject?.includes('was replaced')), (all) => all.length >= 2);
    expect(mails.map((m) => m.mail.text!).filter((t) => t.includes('Version 2 was reported leaked and has been revoked.'))).toHaveLength(1);
  });

  it('a leak of an older value reported to a leak rotation that is then cancelled is not forgotten: the run after it revokes it', async () => {
    const { name, id } = await generatedKey({ graceHours: 0.005 });
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    // From the leak rotation on, a dependent: that run's pending value is held there, so it can be cancelled before promotion.
    const r = await receiver();
    await setDependents(id, [webhook(r)]);
    const pending = holdingPending(r);
    const values: string[] = [];
    for (const version of [3, 4]) {
      values.push(h.secret(`v${version}_${randomBytes(16).toString('hex')}`));
      expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: values.at(-1) } })).body).toMatchObject({ version });
    }
    // v4, the value now current, leaks: the run goes on as a leak rotation of it.
    await reportLeak(values[1]!, id);
    await pending.reached();
    expect(events(r)).toEqual(['credential.pending v5']);
    // Then v3, older, is reported to that run too, and the run is cancelled before it promotes.
    const older = await h.api('POST', '/v1/leaks', { token: owner.token, body: { fingerprint: createHash('sha256').update(values[0]!).digest('hex'), source: 'secret-scanner' } });
    expect(older.status, older.text).toBe(202);
    await waitFor('the run to hear of v3', () => h.client.workflow.getHandle(`rotate:${id}`).fetchHistory(), (history) => (history.events ?? []).filter((e) => e.workflowExecutionSignaledEventAttributes).length >= 1);
    await h.client.workflow.getHandle(`rotate:${id}`).cancel();
    pending.release();
    // The cancelled run (its attempt undone) leaves the leaks to the run after it, which rotates v4 and
    // revokes it with v3; before, the cancelled run dropped v3 (older than the version it had made).
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 4, toVersion: 6 });
    expect(await revokedVersions(id)).toEqual(expect.arrayContaining([1, 3, 4]));
    expect(await revokedVersions(id)).not.toContain(2);
    expect(await read(id)).toMatchObject({ version: 6, label: 'current' });
    await read(id, 2);
  });

  it('a leak of the previous version reported while a rollback runs is answered: the rolled-back credential is rotated again, in leak mode', async () => {
    const { name, id, ownerMail } = await generatedKey({ graceHours: 1 });
    const v1 = (await read(id)).value as string;
    const r = await receiver();
    await setDependents(id, [webhook(r)]);
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);

    // The rollback's restore is held at the receiver while the leak of version 1 (by its SHA-256) comes in.
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    r.onEvent = async ({ event }) => {
      if (event.type === 'credential.restored') await released;
    };
    const rollback = h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    await waitFor('the rollback to restore the dependent', async () => events(r), (seen) => seen.includes('credential.restored v1'));
    const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { fingerprint: createHash('sha256').update(v1).digest('hex'), source: 'scanner' } });
    expect(reported.status, reported.text).toBe(202);
    expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
    release();
    expect((await rollback).status).toBe(200);

    // Rolled back to version 1, the leaked one: it does not stay current.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 3 });
    expect(await read(id)).toMatchObject({ version: 3, label: 'current' });
    expect(await revokedVersions(id)).toEqual([1, 2]);
    const incidents = await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id]);
    expect(incidents.rows).toEqual([{ status: 'closed' }]);
    const subjects = (await notices(ownerMail, name)).map((m) => m.mail.subject);
    expect(subjects).toEqual(expect.arrayContaining([`[mailgent] Rotation rolled back for ${name}`]));
    await read(id, 2);
  });

  it('a leak reported while a rollback records its outcome is answered too: the credential is rotated again, in leak mode', async () => {
    const { name, id } = await generatedKey({ graceHours: 1 });
    const v1 = (await read(id)).value as string;
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    // The rollback is done (version 1 current again) and has decided not to rotate again; its outcome's record is held while version 1 is reported.
    const recording = holdActivity('recordOutcome', id);
    const rollback = h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    await recording.reached();
    await reportLeak(v1, id);
    await waitFor('the run to hear of the leak', () => report(rotationId), (rep) => Boolean(rep.credentials[0]?.progress?.leakReported));
    recording.release();
    expect((await rollback).status).toBe(200);
    // Before, the run ended rolled back and closed the incident: version 1, reported leaked, current and working.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 3 });
    expect(await read(id)).toMatchObject({ version: 3, label: 'current' });
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    await read(id, 2);
  });
});
