import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * An expiry belongs to the value it was given for. A credential rotated because it expires gets a
 * new value whose expiry nobody knows (unless its provider says), so it is due again only at the end
 * of its rotation period; a rollback puts the old value and its expiry back. Against the real
 * worker, Temporal server and PostgreSQL (the schema's triggers keep next_rotation_at).
 */

const DAY_MS = 86_400_000;

describe('credential expiry across versions', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  const unique = (prefix: string) => `${prefix}-${randomUUID().slice(0, 8)}`;
  const secretValue = () => h.secret(`sk_${randomBytes(16).toString('hex')}`);
  const inDays = (days: number) => new Date(Date.now() + days * DAY_MS);

  const store = async (body: Record<string, unknown>) => {
    const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body });
    expect(res.status, res.text).toBe(201);
    return res.body as { id: string; version: number };
  };
  const row = async (id: string) =>
    (await h.sql('SELECT current_version, previous_version, expires_at, next_rotation_at, status FROM credentials WHERE id = $1', [id])).rows[0] as {
      current_version: number;
      previous_version: number | null;
      expires_at: Date | null;
      next_rotation_at: Date | null;
      status: string;
    };
  /** A version's creation plus `days`, counted as the schema counts it (calendar days in the server's time zone). */
  const periodEnd = async (id: string, version: number, days: number) =>
    (await h.sql('SELECT created_at + make_interval(days => $3) AS at FROM secret_versions WHERE credential_id = $1 AND version = $2', [id, version, days])).rows[0].at as Date;
  const daysBefore = async (at: Date, days: number) => (await h.sql('SELECT $1::timestamptz - make_interval(days => $2) AS at', [at, days])).rows[0].at as Date;
  const listed = async (id: string) => {
    const res = await h.api('GET', '/v1/credentials?limit=1000', { token: agent.token });
    return res.body.items.find((c: { id: string }) => c.id === id) as { version: number; expiresAt: string | null; nextRotationAt: string | null };
  };
  const sweep = async () => {
    const handle = await h.client.workflow.start('rotationSweep', { taskQueue: h.taskQueue, workflowId: unique('expiry-sweep'), args: [{}] });
    return (await handle.result()) as { total: number; rotated: number; failed: number };
  };

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('a credential rotated because it expires is not due again until its period ends: the next sweep leaves it alone', async () => {
    const expiresAt = inDays(3);
    const { id } = await store({
      name: unique('expiring'),
      kind: 'api_key',
      value: secretValue(),
      rotation: { provider: 'generated', periodDays: 30, graceHours: 0, expiryLeadDays: 7 },
      expiresAt: expiresAt.toISOString(),
    });
    // Due now: it expires within the 7-day lead.
    expect((await row(id)).next_rotation_at).toEqual(await daysBefore(expiresAt, 7));

    expect(await sweep()).toMatchObject({ total: 1, rotated: 1, failed: 0 });
    const rotated = await row(id);
    expect(rotated).toMatchObject({ current_version: 2, status: 'active', expires_at: null });
    // Due at the end of the new value's period, not at the old value's expiry.
    expect(rotated.next_rotation_at).toEqual(await periodEnd(id, 2, 30));
    expect(await listed(id)).toMatchObject({ version: 2, expiresAt: null, nextRotationAt: rotated.next_rotation_at!.toISOString() });
    // The old value keeps its expiry, for a rollback and for the record.
    expect((await h.sql('SELECT expires_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [id])).rows[0].expires_at).toEqual(expiresAt);
    // The promotion's audit row says where the expiry went.
    const promote = (await h.sql("SELECT detail FROM audit_log WHERE action = 'rotation.promote' AND credential_id = $1 AND outcome = 'ok'", [id])).rows;
    expect(promote.map((r) => r.detail.expiresAt)).toEqual([{ before: expiresAt.toISOString(), after: null }]);

    // The next daily sweep finds nothing due (before the fix it rotated the credential again, every day).
    expect(await sweep()).toMatchObject({ total: 0, rotated: 0 });
    expect((await row(id)).current_version).toBe(2);
  });

  it("a rollback puts the old value's expiry back; a promoted value's expiry is the one its provider gave, if any", async () => {
    const expiresAt = inDays(3);
    const { id } = await store({
      name: unique('rolled-back'),
      kind: 'api_key',
      value: secretValue(),
      rotation: { provider: 'generated', periodDays: 30, graceHours: 24, expiryLeadDays: 7 },
      expiresAt: expiresAt.toISOString(),
    });
    const caller = { identityId: agent.id, actor: 'test:expiry' };
    const rotations = h.deps.rotations;

    const staged = await rotations.stagePending(caller, id, `${id}:create:1`, { value: secretValue() });
    await rotations.promote(caller, id, staged.version);
    expect(await row(id)).toMatchObject({ current_version: 2, expires_at: null });
    expect((await row(id)).next_rotation_at).toEqual(await periodEnd(id, 2, 30));

    await rotations.rollback(caller, id, 2);
    const back = await row(id);
    expect(back).toMatchObject({ current_version: 1, previous_version: 2, expires_at: expiresAt });
    expect(back.next_rotation_at).toEqual(await daysBefore(expiresAt, 7));
    const rollback = (await h.sql("SELECT detail FROM audit_log WHERE action = 'rotation.rollback' AND credential_id = $1 AND outcome = 'ok'", [id])).rows;
    expect(rollback.map((r) => r.detail.expiresAt)).toEqual([{ before: null, after: expiresAt.toISOString() }]);

    // A provider that says when its new value expires: that expiry is the credential's once promoted.
    const providerExpiry = inDays(60);
    const next = await rotations.stagePending(caller, id, `${id}:create:2`, { value: secretValue(), expiresAt: providerExpiry.toISOString() });
    expect((await row(id)).expires_at, 'a pending value does not change the current expiry').toEqual(expiresAt);
    await rotations.promote(caller, id, next.version);
    const promoted = await row(id);
    expect(promoted).toMatchObject({ current_version: next.version, expires_at: providerExpiry });
    expect(promoted.next_rotation_at).toEqual(await periodEnd(id, next.version, 30));
  });

  it('a value stored by hand has the expiry given with it, none otherwise; PATCH sets the current value\'s', async () => {
    const name = unique('manual');
    const first = inDays(10);
    const { id } = await store({ name, kind: 'token', value: secretValue(), expiresAt: first.toISOString() });
    expect((await listed(id)).expiresAt).toBe(first.toISOString());

    // A renewed value without an expiry: the old value's expiry no longer applies (no reminder for it).
    await store({ name, kind: 'token', value: secretValue() });
    expect(await listed(id)).toMatchObject({ version: 2, expiresAt: null });

    const third = inDays(20);
    await store({ name, kind: 'token', value: secretValue(), expiresAt: third.toISOString() });
    expect(await listed(id)).toMatchObject({ version: 3, expiresAt: third.toISOString() });

    const patched = inDays(15);
    const res = await h.api('PATCH', `/v1/credentials/${name}`, { token: agent.token, body: { expiresAt: patched.toISOString() } });
    expect(res.status, res.text).toBe(200);
    expect(await listed(id)).toMatchObject({ version: 3, expiresAt: patched.toISOString() });
    // The versions that stopped being current keep theirs.
    const kept = (await h.sql('SELECT version, expires_at FROM secret_versions WHERE credential_id = $1 ORDER BY version', [id])).rows;
    expect(kept).toEqual([
      { version: 1, expires_at: first },
      { version: 2, expires_at: null },
      { version: 3, expires_at: null },
    ]);
  });
});
