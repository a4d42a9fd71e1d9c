import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { WorkflowFailedError } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createActivities } from '../activities';
import { checkPolicy } from '../providers';
import { checkPassword } from '../vault/password-policy';
import { verifyWebhookSignature } from '../dependents/webhook';
import { startHarness, type Harness } from './support/harness';
import { expectCleanRun } from './support/leaks';
import * as fixtures from './support/lifecycle-fixtures';
import { canLogin, consumer, loginRoleWithAdmin, mailTo, mintKey, waitFor, whoami, type Identity } from './support/lifecycle-fixtures';
import type { StoredMail } from './support/mail';
import { ProviderServer } from './support/provider-server';
import { WebhookReceiver } from './support/webhook-receiver';

/**
 * The whole credential lifecycle end to end: the API starts a rotation on the real Temporal dev
 * server, this file's worker runs it against the real HTTP key service, PostgreSQL, env files and
 * webhook receivers, and the SMTP sink collects the notices. Every path is checked where it lands:
 * the vault, the provider, the dependents, the mailbox and the audit log.
 */

const tag = randomBytes(4).toString('hex');
const securityDesk = `sec-${tag}@example.com`;
const ENV_KEY = 'PAYMENTS_KEY';

describe('credential lifecycle', () => {
  let h: Harness;
  let owner: Identity;
  let signingKey: string;
  const servers: { stop(): Promise<void> }[] = [];
  const roles: string[] = [];
  let n = 0;
  const unique = (what: string) => `${what}-${tag}-${++n}`;

  const store = (name: string, kind: string, value: string, extra: Record<string, unknown> = {}, token = owner.token) => fixtures.storeValue(h, token, name, kind, value, extra);
  const read = async (ref: { name: string } | { id: string }, version?: number, token = owner.token) => {
    const res = await h.api('POST', '/v1/vault.get', { token, body: { ...ref, ...(version ? { version } : {}) } });
    if (res.status === 200) h.secret(res.body.value as string);
    return res;
  };
  const credentialRow = (id: string) => fixtures.credentialRow(h, owner.token, id);
  const revokedVersions = (id: string) => fixtures.revokedVersions(h, id);

  /**
   * A key service of the test's own (its counters and injected faults are the test's alone), its
   * admin token in the vault, and an API key whose v1 it minted. The http policy points at it;
   * graceHours is 0 unless the test needs a grace period.
   */
  const apiKeyAt = async (name: string, extra: { owners?: string[]; rotation?: Record<string, unknown> } = {}) => {
    const provider = await new ProviderServer().start();
    servers.push(provider);
    const adminCredential = unique('api-admin');
    await store(adminCredential, 'token', h.secret(provider.adminToken));
    const rotation = {
      provider: 'http',
      settings: {
        create: { url: `${provider.url}/keys`, body: { scopes: ['payments:write'] } },
        verify: { url: `${provider.url}/whoami` },
        revoke: { url: `${provider.url}/keys/{id}` },
        auth: { credential: adminCredential },
        valuePath: 'secret',
        idPath: 'id',
      },
      periodDays: 30,
      graceHours: 0,
      maxAttempts: 2,
      ...extra.rotation,
    };
    const v1 = await mintKey(h, provider);
    // externalId: the provider's id of the hand-stored v1, so the rotation can revoke it there.
    const id = await store(name, 'api_key', v1.secret, { owners: extra.owners ?? [], rotation, externalId: v1.id });
    return { provider, id, v1: v1.secret, v1Id: v1.id };
  };

  /** A dotenv file under the worker's env files root, in several styles, holding KEY=v1. */
  const envFile = (v1: string) => {
    const file = `${unique('service')}.env`;
    const original = Buffer.concat([
      Buffer.from('# payments service, staging\r\nexport APP_ENV=staging\n'),
      Buffer.from(`${ENV_KEY}=${v1}\n`),
      Buffer.from("DB_HOST = db.internal # primary\nGREETING='hello world'\n"),
      Buffer.from('CITY=caf\xe9\n', 'latin1'),
      Buffer.from('LAST=1'),
    ]);
    // The owner's own directory under the root: env-file paths are relative to it.
    const dir = path.join(h.envFilesRoot, owner.id);
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, file), original, { mode: 0o640 });
    return { file, original, read: () => readFileSync(path.join(dir, file)) };
  };
  /** The file as it must be with `value` in the key line and every other byte as it was. */
  const withValue = (original: Buffer, from: string, to: string) => {
    const lines = original.toString('latin1').split(/(?<=\n)/);
    expect(lines.filter((l) => l === `${ENV_KEY}=${from}\n`)).toHaveLength(1);
    return Buffer.from(lines.map((l) => (l === `${ENV_KEY}=${from}\n` ? `${ENV_KEY}=${to}\n` : l)).join(''), 'latin1');
  };

  const webhook = (receiver: WebhookReceiver, extra: Record<string, unknown> = {}) => ({
    type: 'webhook',
    settings: { url: receiver.url, signingKeyCredential: 'hook-signing-key', ...extra },
  });
  const setDependents = async (credentialId: string, dependents: unknown[]) => {
    const res = await h.api('PATCH', `/v1/credentials/${credentialId}`, { token: owner.token, body: { dependents } });
    expect(res.status, res.text).toBe(200);
  };
  const envDependent = (file: string) => ({ type: 'env-file', settings: { file, key: ENV_KEY } });
  const startConsumer = async (credentialId: string, runs = 1) => {
    const reader = await h.createIdentity(unique('consumer'));
    const granted = await h.api('POST', '/v1/grants', { token: owner.token, body: { credential: credentialId, grantee: reader.name } });
    expect(granted.status, granted.text).toBe(201);
    const c = consumer(h, signingKey, reader, runs);
    servers.push(c.receiver);
    await c.receiver.start();
    return { ...c, reader };
  };

  const startRotation = (credential: string) => fixtures.startRotation(h, owner.token, credential);
  const report = (rotationId: string) => fixtures.rotationReport(h, owner.token, rotationId);
  const waitForState = (rotationId: string, states: string[], timeoutMs = 30_000) =>
    waitFor(`rotation ${rotationId} to reach ${states.join(' or ')}`, () => report(rotationId), (r) => states.includes(r.state), { timeoutMs });
  /** The run's final answer (the batch starts it a moment after the request); every notice of a run is in the sink once it has closed. */
  const runResult = async (rotationId: string) => {
    const started = await waitFor(`rotation ${rotationId} to start its run`, () => report(rotationId), (r) => Boolean(r.credentials[0]?.runId));
    const run = started.credentials[0]!;
    return h.client.workflow.getHandle(run.workflowId, run.runId!).result();
  };
  /** Cancels a rotation of one credential (DELETE, 202) and waits for its run: the report, the run cancelled. */
  const cancelled = async (rotationId: string, credentialId: string) => {
    const res = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
    expect(res.status, res.text).toBe(202);
    expect(res.body.cancelling).toEqual([credentialId]);
    await runResult(rotationId);
    const final = await report(rotationId);
    expect(final.credentials[0]).toMatchObject({ state: 'cancelled', outcome: 'cancelled' });
    return final;
  };
  const expectNoValues = (texts: string[], values: string[]) => {
    for (const text of texts) {
      for (const value of values) {
        expect(text).not.toContain(value);
        expect(text).not.toContain(Buffer.from(value).toString('base64'));
      }
    }
  };
  const noticesFor = async (address: string, values: string[]): Promise<StoredMail[]> => {
    const mails = await mailTo(address);
    expectNoValues(
      mails.map((m) => m.raw + (m.mail.text ?? '')),
      values,
    );
    return mails;
  };

  /** Waits a little for this file's workflows to close, then terminates the rest; returns their ids. */
  const closeLeftoverRuns = async (): Promise<string[]> => {
    const open = async () => {
      const ids: string[] = [];
      for await (const wf of h.client.workflow.list({ query: `TaskQueue = '${h.taskQueue}' AND ExecutionStatus = 'Running'` })) ids.push(wf.workflowId);
      return ids.sort();
    };
    const left = await waitFor('every workflow of this file to close', open, (ids) => ids.length === 0, { timeoutMs: 15_000 }).catch(() => open());
    // Rotations first: a batch waiting for one notices it has ended and finishes its activity.
    for (const id of [...left].sort((a, b) => Number(b.startsWith('rotate:')) - Number(a.startsWith('rotate:')))) {
      await h.client.workflow.getHandle(id).terminate('left running by a failed test').catch(() => undefined);
    }
    return left;
  };

  beforeAll(async () => {
    h = await startHarness({ worker: true, securityNotify: [securityDesk] });
    owner = await h.createIdentity(unique('owner'));
    signingKey = h.secret(`whsec_${randomBytes(24).toString('hex')}`);
    await store('hook-signing-key', 'generic', signingKey);
  });
  afterAll(async () => {
    try {
      // Every run a test started has closed; one left behind (a failed test's grace timer) is ended
      // here, or the worker could not shut down while its batch waits for it.
      const leftovers = await closeLeftoverRuns();
      expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
      expect(leftovers).toEqual([]);
    } finally {
      for (const server of servers) await server.stop();
      for (const role of roles) await h.sql(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
      await h.close();
    }
  });

  it('http provider + env file + webhook consumer: v2 everywhere, v1 revoked at the provider, one notice, every step audited', async () => {
    const name = unique('payments-api');
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail] });
    const { provider } = credential;
    const v1Value = credential.v1;
    const env = envFile(v1Value);
    const original = env.read();
    const c = await startConsumer(credential.id);
    await setDependents(credential.id, [envDependent(env.file), webhook(c.receiver)]);
    const mintedBefore = provider.creates;
    const revokedBefore = provider.revokes;

    const rotationId = await startRotation(name);
    await runResult(rotationId);
    const done = await waitForState(rotationId, ['succeeded']);
    expect(done.credentials[0]!.progress).toMatchObject({
      state: 'succeeded',
      attempt: 1,
      fromVersion: 1,
      toVersion: 2,
      steps: [
        { name: 'create_pending', state: 'done', attempt: 1 },
        { name: 'apply_dependents', state: 'done' },
        { name: 'verify', state: 'done' },
        { name: 'compensate', state: 'skipped' },
        { name: 'promote', state: 'done' },
        { name: 'notify', state: 'done' },
        { name: 'grace', state: 'skipped' },
        { name: 'revoke_previous', state: 'done' },
      ],
    });

    // The vault: v2 current, v1 previous and revoked.
    const current = await read({ name });
    expect(current.body).toMatchObject({ id: credential.id, version: 2, label: 'current' });
    const v2 = current.body.value as string;
    expect(v2).toMatch(/^sk_[0-9a-f]{40}$/);
    expect((await read({ name }, 1)).body).toMatchObject({ version: 1, label: 'previous', value: v1Value });
    expect(await revokedVersions(credential.id)).toEqual([1]);
    expect(await credentialRow(credential.id)).toMatchObject({ status: 'active', version: 2, previousVersion: 1, pendingVersion: null });

    // The env file: only the key line changed.
    expect(env.read().equals(withValue(original, v1Value, v2))).toBe(true);

    // The consumer: signed events with ids and versions only; it read v2 itself, with its own identity.
    expect(c.receiver.rejected).toEqual([]);
    expect(c.receiver.events.map((e) => [e.event.type, e.event.version])).toEqual([
      ['credential.pending', 2],
      ['credential.verify', 2],
      ['credential.promoted', 2],
    ]);
    for (const { event, raw, headers } of c.receiver.events) {
      expect(event.credentialId).toBe(credential.id);
      expect(verifyWebhookSignature(headers['mailgent-signature'] as string, raw, signingKey)).toBe(true);
      expectNoValues([raw], [v1Value, v2, signingKey, provider.adminToken]);
    }
    expect(c.reads).toEqual([{ event: 'credential.pending', version: 2, status: 200, label: 'pending' }]);
    expect(c.values.get(2)).toBe(v2);

    // The provider: one key minted under the rotation's idempotency key, the old one deleted.
    expect(provider.creates - mintedBefore).toBe(1);
    expect(provider.revokes - revokedBefore).toBe(1);
    const minted = provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${rotationId}:`));
    expect(minted).toEqual([{ id: expect.stringMatching(/^key_/), active: true, idempotencyKey: `${rotationId}:${credential.id}:create:1` }]);
    expect(provider.listKeys().find((k) => k.id === credential.v1Id)).toMatchObject({ active: false });
    expect(await whoami(provider, v1Value)).toBe(401);
    expect(await whoami(provider, v2)).toBe(200);

    // One notice to the owners, without either value.
    const notices = await noticesFor(ownerMail, [v1Value, v2]);
    expect(notices).toHaveLength(1);
    expect(notices[0]!.mail.subject).toBe(`[mailgent] Rotated ${name}`);
    expect(notices[0]!.mail.text).toContain('Version 2 is now current.\nVersion 1 has been revoked.');

    // The audit log: one row per step of the run, each value read named with its purpose.
    const audit = (await h.sql('SELECT action, outcome, actor, detail FROM audit_log WHERE credential_id = $1 ORDER BY seq', [credential.id])).rows;
    const steps = audit
      .filter((a) => a.actor === `workflow:rotate:${credential.id}`)
      .map((a) =>
        a.action === 'rotation.read' ? `read v${a.detail.version} for ${a.detail.purpose}` : a.action === 'mail.send' ? `mail ${a.detail.outcome}` : `${a.action} v${a.detail.version}`,
      );
    expect(steps).toEqual([
      'read v1 for provider.create',
      'rotation.create_pending v2',
      'read v2 for dependent.0.apply',
      'read v2 for dependent.1.apply',
      'read v2 for provider.verify',
      'read v2 for dependent.0.verify',
      'read v2 for dependent.1.verify',
      'rotation.promote v2',
      'read v2 for dependent.1.promoted',
      'read v1 for provider.revoke',
      'rotation.revoke v1',
      'mail rotated',
    ]);
    expect(audit.every((a) => a.outcome === 'ok')).toBe(true);
    const consumerReads = audit.filter((a) => a.actor === `identity:${c.reader.id}`);
    expect(consumerReads.map((a) => [a.action, a.detail.version, a.detail.grantedBy])).toEqual([['vault.get', 2, owner.id]]);
    expect(audit.filter((a) => a.actor === `identity:${owner.id}`).map((a) => a.action)).toEqual(
      expect.arrayContaining(['vault.store', 'grant.create', 'credential.update']),
    );
  });

  it('a dependent that never picks up the new value fails the rotation after maxAttempts, each attempt with a new key, all undone', async () => {
    const name = unique('billing-api');
    const ownerMail = `${name}@example.com`;
    const receiver = new WebhookReceiver(signingKey);
    receiver.answerVersion = 1; // it keeps running v1 whatever it is told
    servers.push(receiver);
    await receiver.start();
    const credential = await apiKeyAt(name, { owners: [ownerMail], rotation: { maxAttempts: 2 } });
    const { provider } = credential;
    const env = envFile(credential.v1);
    await setDependents(credential.id, [envDependent(env.file), webhook(receiver)]);
    const before = env.read();
    const mintedBefore = provider.creates;

    const rotationId = await startRotation(name);
    const failure = await runResult(rotationId).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(failure).toBeInstanceOf(WorkflowFailedError);
    const cause = (failure as WorkflowFailedError).cause;
    expect(cause).toBeInstanceOf(ApplicationFailure);
    expect((cause as ApplicationFailure).type).toBe('RotationFailed');
    const origin = new URL(receiver.url).origin;
    expect((cause as ApplicationFailure).message).toBe(`webhook ${origin} reports version 1, not 3`);

    const failed = await waitForState(rotationId, ['failed']);
    expect(failed.credentials[0]).toMatchObject({ state: 'failed', status: 'FAILED', outcome: 'failed' });
    expect(failed.credentials[0]!.progress).toMatchObject({ attempt: 2, error: `webhook ${origin} reports version 1, not 3` });
    expect(failed.credentials[0]!.progress!.steps.find((s) => s.name === 'verify')).toMatchObject({ state: 'failed', attempt: 2 });
    expect(failed.credentials[0]!.progress!.steps.find((s) => s.name === 'compensate')).toMatchObject({ state: 'done', attempt: 2 });
    expect(failed.credentials[0]!.progress!.steps.find((s) => s.name === 'promote')).toMatchObject({ state: 'waiting' });

    // The env file is byte for byte what it was.
    expect(env.read().equals(before)).toBe(true);

    // Two attempts, two different keys, both deleted again; v1 still works.
    const minted = provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${rotationId}:`));
    expect(provider.creates - mintedBefore).toBe(2);
    expect(minted.map((k) => [k.idempotencyKey, k.active])).toEqual([
      [`${rotationId}:${credential.id}:create:1`, false],
      [`${rotationId}:${credential.id}:create:2`, false],
    ]);
    expect(new Set(minted.map((k) => k.id)).size).toBe(2);
    const attempt1 = (await read({ name }, 2)).body;
    const attempt2 = (await read({ name }, 3)).body;
    expect(attempt1).toMatchObject({ version: 2, label: null });
    expect(attempt2).toMatchObject({ version: 3, label: null });
    expect(new Set([credential.v1, attempt1.value, attempt2.value]).size).toBe(3);
    expect(await whoami(provider, attempt1.value)).toBe(401);
    expect(await whoami(provider, attempt2.value)).toBe(401);
    expect(await whoami(provider, credential.v1)).toBe(200);
    expect(await revokedVersions(credential.id)).toEqual([2, 3]);

    // The vault: v1 current, nothing pending, the credential marked.
    expect((await read({ name })).body).toMatchObject({ version: 1, label: 'current', value: credential.v1 });
    expect(await credentialRow(credential.id)).toMatchObject({ status: 'rotation_failed', version: 1, pendingVersion: null });

    // The receiver was told each pending version, asked about it (the retries of verify in a row
    // count once), and told to go back to v1; never that anything was promoted. No value in any event.
    const seen = receiver.events.map((e) => `${e.event.type} v${e.event.version}`).filter((e, i, all) => e !== all[i - 1]);
    expect(seen).toEqual([
      'credential.pending v2',
      'credential.verify v2',
      'credential.restored v1',
      'credential.pending v3',
      'credential.verify v3',
      'credential.restored v1',
    ]);
    expectNoValues(
      receiver.events.map((e) => e.raw),
      [credential.v1, attempt1.value, attempt2.value, signingKey],
    );

    // The owners hear which step failed and why, and nothing secret.
    const notices = await noticesFor(ownerMail, [credential.v1, attempt1.value, attempt2.value]);
    expect(notices).toHaveLength(1);
    expect(notices[0]!.mail.subject).toBe(`[mailgent] Rotation FAILED for ${name}`);
    expect(notices[0]!.mail.text).toContain(`failed at step verify; it was undone and nothing changed.`);
    expect(notices[0]!.mail.text).toContain(`Error: webhook ${origin} reports version 1, not 3`);
    expect(notices[0]!.mail.text).toContain('Version 1 is still current. The credential is marked rotation_failed.');
  }, 90_000);

  it('a transient provider failure is retried within the same attempt; the lost answer of a create mints no second key', async () => {
    const name = unique('search-api');
    const credential = await apiKeyAt(name);
    const { provider } = credential;
    const mintedBefore = provider.creates;
    provider.failNext('create', 1, 503); // refused before doing anything
    provider.failNext('create', 1, 502, { afterEffect: true }); // the key is minted, the answer lost

    const rotationId = await startRotation(name);
    await runResult(rotationId);
    const done = await waitForState(rotationId, ['succeeded']);
    expect(done.credentials[0]!.progress).toMatchObject({ attempt: 1, state: 'succeeded' });
    expect(done.credentials[0]!.progress!.steps.find((s) => s.name === 'compensate')).toMatchObject({ state: 'skipped' });

    const creates = provider.requests.filter((r) => r.route === 'create' && r.idempotencyKey?.startsWith(`${rotationId}:`));
    expect(creates.map((r) => [r.status, r.idempotencyKey])).toEqual([
      [503, `${rotationId}:${credential.id}:create:1`],
      [502, `${rotationId}:${credential.id}:create:1`],
      [201, `${rotationId}:${credential.id}:create:1`],
    ]);
    expect(provider.creates - mintedBefore).toBe(1);
    const v2 = (await read({ name })).body;
    expect(v2).toMatchObject({ version: 2, label: 'current' });
    expect(await whoami(provider, v2.value)).toBe(200);
    expect(await whoami(provider, credential.v1)).toBe(401);
  });

  it('with a grace period v1 keeps working until the timer ends, then it is revoked; the one notice says until when', async () => {
    const name = unique('grace-api');
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail], rotation: { graceHours: 0.002 } }); // 7.2 s: room to check both values work
    const { provider } = credential;
    const rotationId = await startRotation(name);
    const grace = await waitForState(rotationId, ['grace']);
    const graceEndsAt = grace.credentials[0]!.progress!.graceEndsAt!;
    const v2 = (await read({ name })).body.value as string;
    expect(await whoami(provider, credential.v1)).toBe(200);
    expect(await whoami(provider, v2)).toBe(200);

    await runResult(rotationId);
    const done = await report(rotationId);
    expect(done.state).toBe('succeeded');
    expect(done.credentials[0]!.progress!.steps.find((s) => s.name === 'grace')).toMatchObject({ state: 'done' });
    expect(await whoami(provider, credential.v1)).toBe(401);
    expect(await whoami(provider, v2)).toBe(200);
    const revokedAt = (await h.sql('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [credential.id])).rows[0]!.revoked_at as Date;
    expect(revokedAt.getTime()).toBeGreaterThanOrEqual(Date.parse(graceEndsAt));

    const notices = await noticesFor(ownerMail, [credential.v1, v2]);
    expect(notices).toHaveLength(1);
    expect(notices[0]!.mail.text).toContain(`Version 2 is now current.\nVersion 1 keeps working until ${graceEndsAt}, then it is revoked.`);
  });

  it('a policy changed during the grace period applies from the next rotation: this one still revokes v1 at its provider', async () => {
    const name = unique('replanned-api');
    const credential = await apiKeyAt(name, { rotation: { graceHours: 0.002 } }); // 7.2 s
    const { provider } = credential;
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    // Taken out of rotation while in grace: the run began with the http provider and ends with it.
    const patched = await h.api('PATCH', `/v1/credentials/${credential.id}`, { token: owner.token, body: { rotation: null } });
    expect(patched.status, patched.text).toBe(200);
    expect(patched.body.policy).toBeNull();

    await runResult(rotationId);
    expect((await report(rotationId)).state).toBe('succeeded');
    // Before, the revoke read the policy afresh, fell back to the default provider (whose revoke does
    // nothing) and recorded v1 revoked while it still worked at the provider.
    expect(await whoami(provider, credential.v1)).toBe(401);
    expect(await revokedVersions(credential.id)).toEqual([1]);
    expect(provider.revokes).toBe(1);
    expect((await h.sql('SELECT rotation, dependents FROM rotation_plans WHERE credential_id = $1', [credential.id])).rows).toEqual([
      { rotation: expect.objectContaining({ provider: 'http' }), dependents: [] },
    ]);
    h.secret((await read({ name })).body.value as string);
  });

  it('a leak reported during the grace period revokes the previous version at once and alerts the security desk', async () => {
    const name = unique('ledger-api');
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail], rotation: { graceHours: 1 } });
    const { provider } = credential;
    const rotationId = await startRotation(name);
    const grace = await waitForState(rotationId, ['grace']);
    const graceEndsAt = Date.parse(grace.credentials[0]!.progress!.graceEndsAt!);
    expect(graceEndsAt - Date.now()).toBeGreaterThan(55 * 60_000);
    const v2 = (await read({ name })).body.value as string;
    // During grace both values work.
    expect(await whoami(provider, credential.v1)).toBe(200);
    expect(await whoami(provider, v2)).toBe(200);

    // The scanner found the old value: reported by its SHA-256, it names version 1, which only needs revoking.
    const fingerprint = createHash('sha256').update(credential.v1).digest('hex');
    const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { fingerprint, source: 'secret-scanner' } });
    expect(reported.status, reported.text).toBe(202);
    expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: credential.id, action: 'rotating', workflowId: `rotate:${credential.id}` })]);

    const done = await waitForState(rotationId, ['succeeded'], 20_000);
    expect(done.credentials[0]!.progress).toMatchObject({ leakReported: true, state: 'succeeded' });
    expect(done.credentials[0]!.progress!.steps.find((s) => s.name === 'revoke_previous')).toMatchObject({ state: 'done' });
    expect(Date.now()).toBeLessThan(graceEndsAt);
    expect(await whoami(provider, credential.v1)).toBe(401);
    expect(await whoami(provider, v2)).toBe(200);
    expect(provider.listKeys().find((k) => k.id === credential.v1Id)).toMatchObject({ active: false });
    expect(await revokedVersions(credential.id)).toEqual([1]);
    expect((await read({ name })).body).toMatchObject({ version: 2, label: 'current' });
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [credential.id])).rows).toEqual([{ status: 'closed' }]);

    // The security desk gets the incident alert; the owners get it too, and then the notice it
    // promises, which corrects the grace notice: version 1 is revoked already.
    await runResult(rotationId);
    const security = await waitFor(
      'the incident alert and the leak notice at the security desk',
      async () => (await noticesFor(securityDesk, [credential.v1, v2])).filter((m) => m.mail.subject?.endsWith(name)),
      (mails) => mails.length >= 2,
      { show: (mails) => mails.map((m) => m.mail.subject) },
    );
    const alert = security.find((m) => m.mail.subject === `[mailgent] SECURITY: leak reported for ${name}`);
    expect(alert?.mail.text).toContain(`(version 1) was reported by secret-scanner`);
    expect(alert?.mail.text).toContain('You will get a notice when the rotation has finished.');
    const notices = await noticesFor(ownerMail, [credential.v1, v2]);
    expect(notices.map((m) => m.mail.subject).sort()).toEqual([`[mailgent] Rotated ${name}`, `[mailgent] Rotated ${name}`, `[mailgent] SECURITY: leak reported for ${name}`]);
    const [graceNotice, leakNotice] = notices.filter((m) => m.mail.subject === `[mailgent] Rotated ${name}`).sort((a, b) => a.file.localeCompare(b.file));
    expect(graceNotice!.mail.text).toContain(`Version 1 keeps working until ${grace.credentials[0]!.progress!.graceEndsAt}, then it is revoked.`);
    expect(leakNotice!.mail.text).toContain('was rotated because a leak was reported.\n\nVersion 2 is now current.\nVersion 1 has been revoked.');
    expect(security.map((m) => m.mail.subject).sort()).toEqual([`[mailgent] Rotated ${name}`, `[mailgent] SECURITY: leak reported for ${name}`]);
  });

  it('a rollback during the grace period puts v1 back everywhere and revokes the rotated key; a second rollback is refused', async () => {
    const name = unique('orders-api');
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail], rotation: { graceHours: 1 } });
    const { provider } = credential;
    const env = envFile(credential.v1);
    const c = await startConsumer(credential.id);
    await setDependents(credential.id, [envDependent(env.file), webhook(c.receiver)]);
    const revokedBefore = provider.revokes;

    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const v2 = (await read({ name })).body.value as string;
    expect(env.read().equals(withValue(env.original, credential.v1, v2))).toBe(true);

    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    expect(rolledBack.body.results).toEqual([{ credentialId: credential.id, rolledBack: true, current: 1, abandoned: 2 }]);
    // A second request, while the first is still finishing and after, has nothing left to roll back.
    const again = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(again.status, again.text).toBe(409);
    expect(again.body.detail).toMatch(/^nothing to roll back: /);

    await runResult(rotationId);
    const final = await report(rotationId);
    expect(final.credentials[0]).toMatchObject({ state: 'rolled_back', outcome: 'rolled_back' });
    // Once the run has ended, the reason is said in the service's words, not Temporal's ("workflow execution already completed").
    const ended = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(ended.status).toBe(409);
    expect(ended.body.detail).toBe('nothing to roll back: the rotation has ended');

    expect((await read({ name })).body).toMatchObject({ version: 1, label: 'current', value: credential.v1 });
    expect(await credentialRow(credential.id)).toMatchObject({ status: 'active', version: 1 });
    expect(env.read().equals(env.original)).toBe(true);
    expect(await whoami(provider, v2)).toBe(401);
    expect(await whoami(provider, credential.v1)).toBe(200);
    expect(provider.revokes - revokedBefore).toBe(1);
    expect(await revokedVersions(credential.id)).toEqual([2]);
    // The consumer was told to go back and read v1 again itself.
    expect(c.receiver.events.map((e) => `${e.event.type} v${e.event.version}`)).toContain('credential.restored v1');
    // (The vault flips back first, then the dependents are restored: the consumer reads v1 as current again.)
    expect(c.reads.at(-1)).toMatchObject({ event: 'credential.restored', version: 1, status: 200 });
    expect(c.values.get(1)).toBe(credential.v1);

    const notices = await noticesFor(ownerMail, [credential.v1, v2]);
    expect(notices.map((m) => m.mail.subject)).toEqual(expect.arrayContaining([`[mailgent] Rotated ${name}`, `[mailgent] Rotation rolled back for ${name}`]));
    expect(notices).toHaveLength(2);
    const rolledNotice = notices.find((m) => m.mail.subject?.includes('rolled back'))!;
    expect(rolledNotice.mail.text).toContain('version 1 is current again everywhere');
    expect(rolledNotice.mail.text).toContain('version 2 was revoked');
    // The rotation as a whole was rolled back, not failed.
    expect(final.state).toBe('rolled_back');
  });

  it('a replaced version of a credential whose policy was taken away before the run planned is not marked revoked: no provider says where it was issued', async () => {
    const name = unique('no-policy-revoke');
    const credential = await apiKeyAt(name);
    await store(name, 'api_key', h.secret(`sk_v2_${randomBytes(12).toString('hex')}`));
    const unmanaged = await h.api('PATCH', `/v1/credentials/${credential.id}`, { token: owner.token, body: { rotation: null } });
    expect(unmanaged.status, unmanaged.text).toBe(200);
    const activities = createActivities(h.deps);
    const ids = { rotationId: randomUUID(), identityId: owner.id, credentialId: credential.id, workflowId: `rotate:${credential.id}` };
    // The run plans (its plan records no policy) and is refused; a revoke of version 1 follows (a leak run answering a leak of it).
    await expect(activities.planRotation(ids)).rejects.toThrow(/no rotation policy/);
    // Before, the default provider's revoke (which does nothing) ran and version 1 was marked revoked while it still worked at the provider.
    await expect(activities.revokeVersion({ ...ids, version: 1 })).rejects.toThrow(`version 1 of credential '${name}' cannot be revoked here: the credential has no rotation policy to say where it was issued; revoke it there by hand`);
    expect(await revokedVersions(credential.id)).toEqual([]);
    expect(credential.provider.requests.filter((r) => r.route === 'revoke')).toEqual([]);
  });

  it('a cancel during a failed attempt\'s undo ends the run there: the next attempt, refused before it reached the provider, makes no key to discard (nor does it later)', async () => {
    const name = unique('undo-cancel');
    const receiver = new WebhookReceiver(signingKey);
    receiver.answerVersion = 1; // verify fails: attempt 1 is undone, and a second would follow
    servers.push(receiver);
    await receiver.start();
    const credential = await apiKeyAt(name, { rotation: { maxAttempts: 2 } });
    const { provider } = credential;
    await setDependents(credential.id, [webhook(receiver)]);
    const mintedBefore = provider.creates;
    // Attempt 1's discard is slow at the provider: the cancel comes while it runs.
    provider.delayNext('revoke', 1, 2_000);
    const rotationId = await startRotation(name);
    await waitFor('attempt 1\'s discard at the provider', async () => provider.requests.filter((r) => r.route === 'revoke').length, (n) => n > 0);
    const res = await h.api('DELETE', `/v1/rotations/${rotationId}`, { token: owner.token });
    expect(res.status, res.text).toBe(202);
    expect(await runResult(rotationId)).toMatchObject({ state: 'cancelled', attempt: 2 });

    // Before, attempt 2's undo asked the provider to create under its key (to find what a lost create
    // had made), so the provider minted a key nobody had asked for, and then revoked it.
    const minted = provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${rotationId}:`));
    expect(minted.map((k) => [k.idempotencyKey, k.active])).toEqual([[`${rotationId}:${credential.id}:create:1`, false]]);
    expect(provider.creates - mintedBefore).toBe(1);
    expect((await read({ name })).body).toMatchObject({ version: 1, value: credential.v1 });

    // A create that did reach the provider, its answer lost, is still found by its undo and revoked.
    const activities = createActivities(h.deps);
    const ids = { rotationId: randomUUID(), identityId: owner.id, credentialId: credential.id, workflowId: `rotate:${credential.id}` };
    provider.failNext('create', 1, 502, { afterEffect: true });
    await expect(activities.createPendingVersion({ ...ids, attempt: 1 })).rejects.toThrow(/answered 502/);
    const lost = provider.listKeys().filter((k) => k.idempotencyKey === `${ids.rotationId}:${credential.id}:create:1`);
    expect(lost.map((k) => k.active)).toEqual([true]);
    await activities.discardAttempt({ ...ids, attempt: 1, current: 1 });
    expect(provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${ids.rotationId}:`)).map((k) => [k.id, k.active])).toEqual([[lost[0]!.id, false]]);
    // One whose create was never sent is not looked for: no request under its key. And a create of
    // that attempt still running (late: its undo came first) sends nothing when it gets that far,
    // where it would have made a key that nothing revokes.
    await activities.discardAttempt({ ...ids, attempt: 2, current: 1 });
    await expect(activities.createPendingVersion({ ...ids, attempt: 2 })).rejects.toThrow('attempt 2 was undone before its create was sent; nothing was sent to the provider');
    expect(provider.requests.filter((r) => r.idempotencyKey === `${ids.rotationId}:${credential.id}:create:2`)).toEqual([]);
    expect(provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${ids.rotationId}:`))).toHaveLength(1);
  });

  /**
   * An API key (see apiKeyAt, one owner address) rotated into its grace period: `before` sets up
   * the key service first (a fault to inject). Returns the rotation's id and the new value, v2.
   */
  const apiKeyInGrace = async (prefix: string, graceHours: number, before?: (provider: ProviderServer) => void) => {
    const name = unique(prefix);
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail], rotation: { graceHours } });
    before?.(credential.provider);
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const v2 = (await read({ name })).body.value as string;
    return { name, ownerMail, credential, provider: credential.provider, rotationId, v2 };
  };

  it('a rollback whose provider refuses to revoke the abandoned version still ends rolled back, and its notice says that version may still work', async () => {
    const { name, ownerMail, credential, provider, rotationId, v2 } = await apiKeyInGrace('refused-revoke', 1);

    provider.failNext('revoke', 1, 403);
    const rolledBack = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: owner.token });
    expect(rolledBack.status, rolledBack.text).toBe(200);
    // Before, the run failed here: no notice, its outcome still 'rotated'.
    expect(await runResult(rotationId)).toMatchObject({ state: 'rolled_back' });
    const final = await report(rotationId);
    expect(final.credentials[0]).toMatchObject({ state: 'rolled_back', outcome: 'rolled_back' });
    expect((await read({ name })).body).toMatchObject({ version: 1, label: 'current', value: credential.v1 });
    // The provider kept it: the notice must not say it was revoked.
    expect(await whoami(provider, v2)).toBe(200);
    expect(await revokedVersions(credential.id)).toEqual([]);
    const notices = await noticesFor(ownerMail, [credential.v1, v2]);
    const rolledNotice = notices.find((m) => m.mail.subject === `[mailgent] Rotation rolled back for ${name}`);
    expect(rolledNotice?.mail.text).toContain('version 2 could not be revoked at the provider and may still work there');
    expect(rolledNotice?.mail.text).toContain('revoking version 2 at the provider: ');
    expect(rolledNotice?.mail.text).toContain('answered 403');
    expect(rolledNotice?.mail.text).not.toContain('version 2 was revoked');
  });

  it('cancelling while a dependent is being updated undoes everything: env file, pending key, vault; v1 stays current', async () => {
    const name = unique('mailer-api');
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail] });
    const { provider } = credential;
    const env = envFile(credential.v1);
    const c = await startConsumer(credential.id);
    // The consumer is slow to take the pending version: it holds the request until released.
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const fetchAndRun = c.receiver.onEvent!;
    c.receiver.onEvent = async (received) => {
      await fetchAndRun(received);
      if (received.event.type === 'credential.pending') await held;
    };
    await setDependents(credential.id, [envDependent(env.file), webhook(c.receiver, { timeoutMs: 30_000 })]);
    const mintedBefore = provider.creates;

    try {
      const rotationId = await startRotation(name);
      await waitFor('the consumer to be holding credential.pending', async () => c.receiver.events.length, (count) => count > 0);
      const applying = await report(rotationId);
      expect(applying.credentials[0]!.progress!.steps.find((s) => s.name === 'apply_dependents')).toMatchObject({ state: 'running' });
      const v2 = (await read({ name }, 2)).body;
      expect(v2).toMatchObject({ label: 'pending' });
      expect(env.read().equals(withValue(env.original, credential.v1, v2.value))).toBe(true);

      const final = await cancelled(rotationId, credential.id);
      expect(final.credentials[0]!.progress!.steps.find((s) => s.name === 'compensate')).toMatchObject({ state: 'done' });
      expect(final.credentials[0]!.progress!.steps.find((s) => s.name === 'promote')).toMatchObject({ state: 'waiting' });

      expect(env.read().equals(env.original)).toBe(true);
      expect(provider.creates - mintedBefore).toBe(1);
      expect(provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${rotationId}:`))).toEqual([
        { id: expect.stringMatching(/^key_/), active: false, idempotencyKey: `${rotationId}:${credential.id}:create:1` },
      ]);
      expect(await whoami(provider, v2.value)).toBe(401);
      expect(await whoami(provider, credential.v1)).toBe(200);
      expect((await read({ name })).body).toMatchObject({ version: 1, label: 'current', value: credential.v1 });
      expect(await credentialRow(credential.id)).toMatchObject({ status: 'active', version: 1, pendingVersion: null });
      expect(c.receiver.events.map((e) => `${e.event.type} v${e.event.version}`)).toEqual(['credential.pending v2', 'credential.restored v1']);

      const notices = await noticesFor(ownerMail, [credential.v1, v2.value]);
      expect(notices.map((m) => m.mail.subject)).toEqual([`[mailgent] Rotation cancelled for ${name}`]);
      expect(notices[0]!.mail.text).toContain('was cancelled and undone; version 1 is still current.');
      // The rotation as a whole was cancelled, not failed.
      expect(final.state).toBe('cancelled');
    } finally {
      release();
    }
  });

  it('cancelling while the provider is still creating the key: the undo waits for that call, and nothing it made survives', async () => {
    const name = unique('slow-api');
    const credential = await apiKeyAt(name);
    const { provider } = credential;
    // The provider takes 4 s to answer the create, and makes the key whatever the caller does meanwhile.
    provider.delayNext('create', 1, 4_000);
    const rotationId = await startRotation(name);
    // The rotation's own create (its key names the rotation): the fixture's v1 was minted by a create too,
    // answered at once, and counted here the cancel could beat the rotation's create to the provider
    // on a loaded machine (nothing made, nothing to wait for).
    const ours = () => provider.requests.filter((r) => r.route === 'create' && r.idempotencyKey?.startsWith(`${rotationId}:`));
    await waitFor('the create to reach the provider', async () => ours().length, (n) => n > 0);
    await waitFor('the run to be recorded', () => report(rotationId), (r) => Boolean(r.credentials[0]?.runId));
    await cancelled(rotationId, credential.id);
    // Let the slow create answer (to nobody, now) and anything that could follow it land.
    await waitFor('the slow create to be answered', async () => ours().filter((r) => r.status === 0).length, (n) => n === 0);
    await new Promise((r) => setTimeout(r, 1_000));

    // Before, the undo ran beside the create: it revoked the key, then the create's late answer was
    // staged as a pending version v2 that no rotation would ever promote or discard.
    expect(await credentialRow(credential.id)).toMatchObject({ status: 'active', version: 1, pendingVersion: null });
    expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [credential.id])).rows[0].n).toBe(1);
    const made = provider.listKeys().filter((k) => k.idempotencyKey?.startsWith(`${rotationId}:`));
    expect(made.length).toBeGreaterThan(0);
    expect(made.filter((k) => k.active)).toEqual([]);
    expect(await whoami(provider, credential.v1)).toBe(200);
    expect((await read({ name })).body).toMatchObject({ version: 1, label: 'current', value: credential.v1 });
  });

  it('a revoke the provider refuses: the action-needed notice, and a rotated notice that does not claim the old value was revoked', async () => {
    const name = unique('unrevokable');
    const ownerMail = `${name}@example.com`;
    const credential = await apiKeyAt(name, { owners: [ownerMail] });
    credential.provider.failNext('revoke', 1, 400);
    const rotationId = await startRotation(name);
    await runResult(rotationId);
    const done = await waitForState(rotationId, ['succeeded']);
    expect(done.credentials[0]!.progress!.steps.find((s) => s.name === 'revoke_previous')).toMatchObject({ state: 'failed' });
    expect(await whoami(credential.provider, credential.v1)).toBe(200);
    const v2 = (await read({ name })).body.value as string;

    const notices = await waitFor('both notices', () => noticesFor(ownerMail, [credential.v1, v2]), (mails) => mails.length >= 2);
    expect(notices.map((m) => m.mail.subject).sort()).toEqual([`[mailgent] ACTION NEEDED: the old value of ${name} is still valid`, `[mailgent] Rotated ${name}`]);
    const rotated = notices.find((m) => m.mail.subject === `[mailgent] Rotated ${name}`)!;
    // Before, it said "Version 1 has been revoked." beside the notice saying it had not been.
    expect(rotated.mail.text).toContain('Version 1 could not be revoked at the provider and still works: revoke it there by hand.');
    expect(rotated.mail.text).not.toContain('has been revoked');
  });

  /** Stores a value of the test's own over a credential in its grace period: version 3, current at once. */
  const storeDuringGrace = async (name: string) => {
    const v3 = h.secret(`v3_${randomBytes(16).toString('hex')}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v3 } });
    expect(stored.status, stored.text).toBe(201);
    expect(stored.body).toMatchObject({ version: 3 });
    return v3;
  };

  it('a value stored while the provider mints the new key makes promote refuse: the stored value stays current, the minted key is deleted', async () => {
    const name = unique('stored-while-minting');
    const { provider, id, v1 } = await apiKeyAt(name);
    const minting = provider.holdNext('create');
    const rotationId = await startRotation(name);
    await minting.reached;
    const v2 = h.secret(`sk_by_hand_${randomBytes(16).toString('hex')}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v2 } });
    expect(stored.body).toMatchObject({ version: 2 });
    minting.release();

    // Before, the pending version was recorded as based on version 2 (current when it was staged, not
    // when the create read version 1): it was promoted over the stored value, which was to be revoked.
    const failure = await runResult(rotationId).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(failure).toBeInstanceOf(WorkflowFailedError);
    expect(((failure as WorkflowFailedError).cause as ApplicationFailure).message).toMatch(/^credential \S+ moved to version 2 while version 3 was pending$/);
    expect((await read({ name })).body).toMatchObject({ version: 2, label: 'current', value: v2 });
    expect(await revokedVersions(id)).toEqual([3]);
    expect(provider.listKeys().filter((k) => k.active)).toHaveLength(1);
    expect(await whoami(provider, v1)).toBe(200);
    h.secret((await read({ id }, 3)).body.value as string);
  });

  it('a value stored while the provider mints, then an attempt that fails: its undo puts the dependents on the stored value', async () => {
    const name = unique('stored-then-failed');
    const receiver = new WebhookReceiver(signingKey);
    receiver.answerVersion = 1; // it never picks up the new value: verify fails
    servers.push(receiver);
    await receiver.start();
    const { provider, id } = await apiKeyAt(name, { rotation: { maxAttempts: 1 } });
    await setDependents(id, [webhook(receiver)]);
    const minting = provider.holdNext('create');
    const rotationId = await startRotation(name);
    await minting.reached;
    const v2 = h.secret(`sk_by_hand_${randomBytes(16).toString('hex')}`);
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value: v2 } })).body).toMatchObject({ version: 2 });
    minting.release();
    const failure = await runResult(rotationId).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(failure).toBeInstanceOf(WorkflowFailedError);
    // The dependent goes back to what is current (the stored value), not to the version the create was given.
    const events = receiver.events.map((e) => `${e.event.type} v${e.event.version}`);
    expect(events.filter((e) => !e.startsWith('credential.verify'))).toEqual(['credential.pending v3', 'credential.restored v2']);
    expect((await read({ name })).body).toMatchObject({ version: 2, label: 'current', value: v2 });
    expect(await revokedVersions(id)).toEqual([3]);
    h.secret((await read({ id }, 3)).body.value as string);
  });

  it('a value stored during grace, then a revoke the provider refuses: the superseded notice says both, and the rotated key still works for its dependents', async () => {
    // An 18 s grace period: the store must land within it on a loaded machine too.
    const { name, ownerMail, credential, provider, rotationId, v2 } = await apiKeyInGrace('replaced-unrevokable', 0.005, (p) => p.failNext('revoke', 1, 400));
    const v3 = await storeDuringGrace(name);

    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await whoami(provider, credential.v1)).toBe(200);
    expect(await whoami(provider, v2)).toBe(200);
    expect((await read({ name })).body).toMatchObject({ version: 3, label: 'current' });
    // Before, the run learned what was current only from a revoke that went through: this one
    // failed, and no one heard that v2, which the dependents have, was replaced.
    const notices = await waitFor('three notices', () => noticesFor(ownerMail, [credential.v1, v2, v3]), (mails) => mails.length >= 3);
    expect(notices.map((m) => m.mail.subject).sort()).toEqual([
      `[mailgent] ACTION NEEDED: the old value of ${name} is still valid`,
      `[mailgent] ACTION NEEDED: the rotated value of ${name} was replaced; its dependents still have it`,
      `[mailgent] Rotated ${name}`,
    ]);
    const superseded = notices.find((m) => m.mail.subject?.includes('was replaced'))!.mail.text!;
    expect(superseded).toContain('made version 2, but version 3, stored while the rotation ran, is current now.');
    expect(superseded).toContain('Version 1 could not be revoked at the provider and still works: revoke it there by hand.');
    expect(superseded).toContain('Version 2 was not revoked: the dependents were given it during the rotation');
  });

  it('the rotated key reported leaked after a value was stored during grace is revoked at once; the stored value is left as it is', async () => {
    const { name, ownerMail, credential, provider, rotationId, v2 } = await apiKeyInGrace('replaced-leaked', 1);
    const v3 = await storeDuringGrace(name);

    // The scanner found v2 (the previous version now, still live): the run in grace hears of it.
    const fingerprint = createHash('sha256').update(v2).digest('hex');
    const reported = await h.api('POST', '/v1/leaks', { token: owner.token, body: { fingerprint, source: 'secret-scanner' } });
    expect(reported.status, reported.text).toBe(202);
    expect(reported.body.results).toEqual([expect.objectContaining({ credentialId: credential.id, action: 'rotating', workflowId: `rotate:${credential.id}` })]);

    // Before, the run rotated again, in leak mode: v3 (not leaked) was replaced and revoked, and the
    // leaked v2 was left working at the provider, no longer any version's previous one.
    expect(await runResult(rotationId)).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await whoami(provider, credential.v1)).toBe(401);
    expect(await whoami(provider, v2)).toBe(401);
    expect(await revokedVersions(credential.id)).toEqual([1, 2]);
    expect((await read({ name })).body).toMatchObject({ version: 3, label: 'current', value: v3 });
    expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [credential.id])).rows[0].n).toBe(3);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [credential.id])).rows).toEqual([{ status: 'closed' }]);

    const mails = await waitFor(
      'the superseded notice at the security desk',
      async () => (await noticesFor(securityDesk, [credential.v1, v2, v3])).filter((m) => m.mail.subject?.includes(name)),
      (all) => all.some((m) => m.mail.subject?.includes('was replaced')),
      { show: (all) => all.map((m) => m.mail.subject) },
    );
    const superseded = mails.find((m) => m.mail.subject?.includes('was replaced'))!.mail.text!;
    expect(superseded).toContain('Version 1 was revoked as planned.');
    expect(superseded).toContain('Version 2 was reported leaked and has been revoked. The dependents were given it during the rotation: move them to the current version.');
    const leakNotice = mails.find((m) => m.mail.subject === `[mailgent] Rotated ${name}`)!.mail.text!;
    expect(leakNotice).toContain('Version 2 was made, but version 3, stored while the rotation ran, is current');
    expect((await noticesFor(ownerMail, [credential.v1, v2, v3])).filter((m) => m.mail.subject?.includes('was replaced'))).toHaveLength(1);
  });

  it('postgres-role through the workflow: afterwards only the new password logs in', async () => {
    const role = `mg_life_${tag}`;
    const adminName = unique('pg-admin');
    const v1 = await loginRoleWithAdmin(h, role, adminName, store);
    roles.push(role);
    const name = unique('app-db');
    const id = await store(name, 'password', v1, {
      rotation: { provider: 'postgres-role', settings: { adminCredential: adminName, role }, periodDays: 30, graceHours: 0 },
    });
    expect(await canLogin(h, role, v1)).toBe(true);

    const rotationId = await startRotation(name);
    await runResult(rotationId);
    const done = await waitForState(rotationId, ['succeeded']);
    expect(done.credentials[0]!.progress).toMatchObject({ fromVersion: 1, toVersion: 2, attempt: 1 });

    const v2 = (await read({ name })).body;
    expect(v2).toMatchObject({ version: 2, label: 'current', value: expect.stringMatching(/^[A-Za-z0-9]{32}$/) });
    expect(await canLogin(h, role, v1)).toBe(false);
    expect(await canLogin(h, role, v2.value)).toBe(true);
    expect(await revokedVersions(id)).toEqual([1]);
  });

  it("a managed password follows its identity's password policy with both providers that make passwords", async () => {
    const holder = await h.createIdentity(unique('policy-holder'));
    const storeAs = (name: string, kind: string, value: string, extra: Record<string, unknown> = {}) => store(name, kind, value, extra, holder.token);
    const role = `mg_pol_${tag}`;
    const adminName = unique('pg-admin');
    // Stored before the policy (it refuses these version 1 values: shorter, no symbol).
    const v1 = await loginRoleWithAdmin(h, role, adminName, storeAs);
    roles.push(role);
    const pgName = unique('policy-db');
    await storeAs(pgName, 'password', v1, { rotation: { provider: 'postgres-role', settings: { adminCredential: adminName, role }, graceHours: 0 } });
    // A symbol set of letters gives no symbol: before, the policy's symbols were "met" with these.
    const genName = unique('policy-generated');
    await storeAs(genName, 'password', h.secret(`Aa1-${randomBytes(8).toString('hex')}`), { rotation: { provider: 'generated', settings: { symbols: false, symbolSet: 'xyz' }, graceHours: 0 } });
    const policy = { maxAgeDays: 90, length: 40, lowercase: true, uppercase: true, digits: true, symbols: true, escalateAfterDays: 7 };
    expect((await h.api('PUT', '/v1/password-policy', { token: holder.token, body: policy })).status).toBe(200);

    const started = await h.api('POST', '/v1/rotations', { token: holder.token, body: { credentials: [pgName, genName] } });
    expect(started.status, started.text).toBe(202);
    const done = await waitFor('both rotations', () => fixtures.rotationReport(h, holder.token, started.body.rotationId), (r) => ['succeeded', 'failed', 'partial'].includes(r.state));
    expect(done.state).toBe('succeeded');
    for (const name of [pgName, genName]) {
      const { value, version } = (await read({ name }, undefined, holder.token)).body;
      expect(version).toBe(2);
      // Before: postgres-role's 32 letters and digits; generated's symbols drawn from 'xyz'.
      expect(() => checkPassword(value, policy)).not.toThrow();
    }
    const rotated = (await read({ name: pgName }, undefined, holder.token)).body.value;
    expect(await canLogin(h, role, rotated)).toBe(true);
    expect(await canLogin(h, role, v1)).toBe(false);
  });

  it('a totp_seed with an http provider is refused at its plan: nothing is asked of the provider, nothing stored that is no seed', async () => {
    const provider = await new ProviderServer().start();
    servers.push(provider);
    const adminCredential = unique('api-admin');
    await store(adminCredential, 'token', h.secret(provider.adminToken));
    const name = unique('totp-http');
    const rotation = {
      provider: 'http',
      settings: { create: { url: `${provider.url}/keys` }, verify: { url: `${provider.url}/whoami` }, revoke: { url: `${provider.url}/keys/{id}` }, auth: { credential: adminCredential }, valuePath: 'secret', idPath: 'id' },
      periodDays: 90,
      graceHours: 0,
    };
    const totp = { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP') };
    // vault.store refuses a seed with a policy; a seed stored before it did keeps its policy, and the plan refuses that.
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'totp_seed', totp, rotation } })).status).toBe(422);
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'totp_seed', totp } });
    expect(stored.status, stored.text).toBe(201);
    await h.sql('UPDATE credentials SET rotation = $2 WHERE id = $1', [stored.body.id, JSON.stringify(checkPolicy(rotation))]);
    const ids = { rotationId: randomUUID(), identityId: owner.id, credentialId: stored.body.id, workflowId: `rotate:${stored.body.id}` };
    // Before, the plan passed: the provider's API key was stored as the seed's next version, vault.totp then refused it.
    await expect(createActivities(h.deps).planRotation(ids)).rejects.toThrow(
      `credential '${name}' is a totp_seed; provider 'http' makes no TOTP seeds (enrol a new seed with its service and store it with vault.store)`,
    );
    expect(provider.creates).toBe(0);
    expect((await h.api('POST', '/v1/vault.totp', { token: owner.token, body: { name } })).status).toBe(200);
  });

  it("an attempt undone before its create staged puts a single role back on the vault's current value, not the one the rotation planned with; one whose create was never sent leaves it alone", async () => {
    const role = `mg_undo_${tag}`;
    const adminName = unique('pg-admin');
    const v1 = await loginRoleWithAdmin(h, role, adminName, store);
    roles.push(role);
    const name = unique('undo-db');
    const id = await store(name, 'password', v1, {
      rotation: { provider: 'postgres-role', settings: { adminCredential: adminName, role }, periodDays: 30, graceHours: 0 },
    });
    // Planned at version 1; then, between two attempts, the owner stores v2 and moves the role onto it.
    const activities = createActivities(h.deps);
    const ids = { rotationId: randomUUID(), identityId: owner.id, credentialId: id, workflowId: `rotate:${id}` };
    expect(await activities.planRotation(ids)).toMatchObject({ currentVersion: 1, provider: 'postgres-role' });
    const v2 = h.secret(`pw_${randomBytes(12).toString('hex')}`);
    await store(name, 'password', v2);
    await h.sql(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD '${v2}'`);
    expect(await canLogin(h, role, v2)).toBe(true);

    // Attempt 2's create was sent (it read the current value for the provider) and set a password on
    // the role, its answer lost before it staged anything: the workflow knows only version 1.
    const caller = { identityId: owner.id, actor: `workflow:${ids.workflowId}`, requestId: ids.rotationId };
    await h.deps.rotations.read(caller, id, 2, 'provider.create', { rotationKey: `${ids.rotationId}:${id}:create:2` });
    const lost = h.secret(`pw_${randomBytes(12).toString('hex')}`);
    await h.sql(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD '${lost}'`);
    await activities.discardAttempt({ ...ids, attempt: 2, current: 1 });
    // Before, the role was set back to v1's password while the vault said v2 was current.
    expect(await canLogin(h, role, v2)).toBe(true);
    expect(await canLogin(h, role, v1)).toBe(false);
    expect(await canLogin(h, role, lost)).toBe(false);
    expect((await read({ name })).body).toMatchObject({ version: 2, label: 'current' });

    // Attempt 3's create was never sent: nothing reached the role, and its undo neither reads a value for it nor sets one.
    const discardReads = async () =>
      (await h.sql(`SELECT count(*)::int AS n FROM audit_log WHERE credential_id = $1 AND action = 'rotation.read' AND detail->>'purpose' = 'provider.discard'`, [id])).rows[0].n;
    const readsBefore = await discardReads();
    await activities.discardAttempt({ ...ids, attempt: 3, current: 1 });
    expect(await discardReads()).toBe(readsBefore);
    expect(await canLogin(h, role, v2)).toBe(true);
  });

  it('a credential whose rotation runs is not destroyed (409, nothing deleted, audited): the run still revokes the replaced value; once it ended, destroy works', async () => {
    const name = unique('destroy-in-grace');
    const credential = await apiKeyAt(name, { rotation: { graceHours: 0.002 } }); // 7.2 s
    const rotationId = await startRotation(name);
    await waitForState(rotationId, ['grace']);
    const v2 = (await read({ name })).body.value as string;

    const refused = await h.api('DELETE', `/v1/credentials/${credential.id}?destroy=true`, { token: owner.token });
    // Before, every version was deleted: the run's revoke of v1 failed (not found), and v1 kept working at the provider.
    expect(refused.status, refused.text).toBe(409);
    expect(refused.body).toMatchObject({ type: expect.stringMatching(/conflict$/), detail: expect.stringContaining(`the credential is being rotated (workflow rotate:${credential.id})`) });
    expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [credential.id])).rows[0].n).toBe(2);
    const audited = (await h.sql(`SELECT outcome FROM audit_log WHERE credential_id = $1 AND action = 'credential.destroy'`, [credential.id])).rows;
    expect(audited).toEqual([{ outcome: expect.not.stringMatching(/^ok$/) }]);

    await runResult(rotationId);
    expect(await whoami(credential.provider, credential.v1)).toBe(401);
    expect(await whoami(credential.provider, v2)).toBe(200);
    const destroyed = await h.api('DELETE', `/v1/credentials/${credential.id}?destroy=true`, { token: owner.token });
    expect(destroyed.status, destroyed.text).toBe(200);
    expect(destroyed.body).toEqual({ id: credential.id, destroyedVersions: 2 });
  });

  it("a rotation whose provider create reads the value while a destroy is being checked makes that destroy a 409: nothing destroyed", async () => {
    const name = unique('destroy-race');
    const value = h.secret(`tok_${randomBytes(16).toString('hex')}`);
    const id = await store(name, 'token', value);
    const caller = { identityId: owner.id, actor: 'workflow:test' };
    // The check (Temporal: no rotation running) answered; then a rotation began, and its create read the value for the provider.
    const destroy = h.services.vault.destroy(caller, { id }, { check: async () => void (await h.deps.rotations.read(caller, id, 1, 'provider.create', { rotationKey: `${id}:create:1` })) });
    // Before, every version was deleted: the key the provider made could be neither staged nor revoked.
    await expect(destroy).rejects.toThrow(`a rotation of the credential began while the destroy was being checked (workflow rotate:${id}): nothing was destroyed`);
    expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE credential_id = $1', [id])).rows[0].n).toBe(1);
    expect((await h.sql(`SELECT outcome FROM audit_log WHERE credential_id = $1 AND action = 'credential.destroy'`, [id])).rows).toEqual([{ outcome: 'conflict' }]);
    // Without a rotation begun meanwhile, the same destroy goes through.
    expect(await h.services.vault.destroy(caller, { id }, { check: async () => undefined })).toEqual({ id, destroyedVersions: 1 });
  });

  it("a rotation's read of a credential a destroy holds waits for it, then finds nothing: no value goes to a provider for a credential being destroyed", async () => {
    const name = unique('destroy-held');
    const id = await store(name, 'token', h.secret(`tok_${randomBytes(16).toString('hex')}`));
    const caller = { identityId: owner.id, actor: 'workflow:test' };
    const destroyer = new pg.Client({ connectionString: h.databaseUrl });
    await destroyer.connect();
    try {
      // A destroy, as Vault.destroy makes it: the row locked, then its versions deleted.
      await destroyer.query('BEGIN');
      await destroyer.query('SELECT 1 FROM credentials WHERE id = $1 FOR UPDATE', [id]);
      let settled = false;
      const reading = h.deps.rotations.read(caller, id, 1, 'provider.create', { rotationKey: `${id}:create:1` }).finally(() => (settled = true));
      reading.catch(() => undefined);
      await new Promise((resolve) => setTimeout(resolve, 300));
      // Before, the read took no lock: it had the value before the destroy committed.
      expect(settled).toBe(false);
      await destroyer.query('DELETE FROM secret_versions WHERE credential_id = $1', [id]);
      await destroyer.query('UPDATE credentials SET destroyed_at = now(), deleted_at = now() WHERE id = $1', [id]);
      await destroyer.query('COMMIT');
      await expect(reading).rejects.toThrow(`version 1 of credential ${id} does not exist`);
    } finally {
      await destroyer.end();
    }
  });

  it('a grantee reads by id only, never changes the credential, and loses access the moment the grant is revoked', async () => {
    const name = unique('shared-token');
    const value = h.secret(`tok_${randomBytes(16).toString('hex')}`);
    const id = await store(name, 'token', value);
    const reader = await h.createIdentity(unique('reader'));
    const third = await h.createIdentity(unique('third'));
    const granted = await h.api('POST', '/v1/grants', { token: owner.token, body: { credential: name, grantee: reader.name } });
    expect(granted.status, granted.text).toBe(201);
    expect(granted.body).toMatchObject({ credentialId: id, granteeId: reader.id, ownerId: owner.id });
    const grantId = granted.body.id as string;

    expect((await read({ id }, undefined, reader.token)).body).toMatchObject({ id, version: 1, value });
    expect((await read({ name }, undefined, reader.token)).status).toBe(404);

    // Reading is all a grant allows.
    const as = (method: string, route: string, body?: unknown) => h.api(method, route, { token: reader.token, body });
    expect((await as('PATCH', `/v1/credentials/${id}`, { owners: ['intruder@example.com'] })).status).toBe(404);
    expect((await as('DELETE', `/v1/credentials/${id}`)).status).toBe(404);
    expect((await as('DELETE', `/v1/credentials/${id}?destroy=true`)).status).toBe(404);
    expect((await as('POST', '/v1/rotations', { credentials: [id] })).status).toBe(404);
    expect((await as('POST', '/v1/grants', { credential: id, grantee: third.name })).status).toBe(404);
    expect((await as('DELETE', `/v1/grants/${grantId}`)).status).toBe(404);
    // Storing under the owner's name makes the reader's own credential; the owner's is untouched.
    const own = await store(name, 'token', h.secret(`tok_${randomBytes(16).toString('hex')}`), {}, reader.token);
    expect(own).not.toBe(id);
    expect((await read({ name })).body).toMatchObject({ id, version: 1, value });
    expect(await credentialRow(id)).toMatchObject({ version: 1, owners: [], status: 'active' });

    const revoked = await h.api('DELETE', `/v1/grants/${grantId}`, { token: owner.token });
    expect(revoked.status, revoked.text).toBe(200);
    expect(revoked.body).toMatchObject({ id: grantId });
    expect((await read({ id }, undefined, reader.token)).status).toBe(404);
    expect((await read({ id }, 1, reader.token)).status).toBe(404);
    expect((await h.api('GET', '/v1/grants', { token: reader.token })).body.received).toEqual([]);
    expect((await h.api('DELETE', `/v1/grants/${grantId}`, { token: owner.token })).status).toBe(404);

    const reads = (await h.sql(`SELECT outcome, detail FROM audit_log WHERE actor = $1 AND action = 'vault.get' ORDER BY seq`, [`identity:${reader.id}`])).rows;
    expect(reads.map((r) => r.outcome)).toEqual(['ok', 'denied', 'denied', 'denied']);
    expect(reads[0]!.detail).toMatchObject({ grantedBy: owner.id, version: 1 });
  });
});
