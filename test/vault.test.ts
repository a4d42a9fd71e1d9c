import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { Pool } from '../db/pool';
import { hashToken, Identities } from '../vault/identities';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

describe('vault.store / vault.get over HTTP', () => {
  let h: Harness;
  let alice: { id: string; token: string };
  let bob: { id: string; token: string };

  beforeAll(async () => {
    h = await startHarness();
    alice = await h.createIdentity('alice', 'alice@example.com');
    bob = await h.createIdentity('bob');
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('stores versions; the newest is current, the one before is previous, and every version stays readable', async () => {
    const v1 = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'stripe', kind: 'api_key', value: h.secret('sk_live_version_one') } });
    expect(v1.status).toBe(201);
    expect(v1.body).toMatchObject({ name: 'stripe', version: 1 });
    const v2 = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'stripe', kind: 'api_key', value: h.secret('sk_live_version_two') } });
    expect(v2.body).toMatchObject({ id: v1.body.id, version: 2 });

    const current = await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'stripe' } });
    expect(current.status).toBe(200);
    expect(current.body).toMatchObject({ id: v1.body.id, kind: 'api_key', version: 2, label: 'current', value: 'sk_live_version_two', ageDays: 0 });
    expect(current.headers.get('cache-control')).toBe('no-store');

    const first = await h.api('POST', '/v1/vault.get', { token: alice.token, body: { id: v1.body.id, version: 1 } });
    expect(first.body).toMatchObject({ version: 1, label: 'previous', value: 'sk_live_version_one' });

    const none = await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'stripe', version: 9 } });
    expect(none.status).toBe(404);
  });

  it('check-and-set: a stale expectedVersion is a 409 and stores nothing', async () => {
    await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'db', kind: 'password', value: h.secret('first-password'), expectedVersion: 0 } });
    const ok = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'db', kind: 'password', value: h.secret('second-password'), expectedVersion: 1 } });
    expect(ok.status).toBe(201);
    const stale = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'db', kind: 'password', value: h.secret('lost-update-password'), expectedVersion: 1 } });
    expect(stale.status).toBe(409);
    expect(stale.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(stale.body).toMatchObject({ type: 'https://mailgent.dev/problems/version-conflict', status: 409, currentVersion: 2 });
    const exists = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'db', kind: 'password', value: h.secret('again-password'), expectedVersion: 0 } });
    expect(exists.status).toBe(409);
    const versions = await h.sql('SELECT count(*)::int AS n FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.name = $1', ['db']);
    expect(versions.rows[0].n).toBe(2);
  });

  it('parallel stores without expectedVersion: every one lands, each with its own version', async () => {
    await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'crowd', kind: 'token', value: h.secret('crowd-start-value') } });
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) => h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'crowd', kind: 'token', value: h.secret(`crowd-value-${i}-xyz`) } })),
    );
    expect(results.map((r) => r.status)).toEqual(Array(20).fill(201));
    expect(results.map((r) => r.body.version).sort((a, b) => a - b)).toEqual(Array.from({ length: 20 }, (_, i) => i + 2));
    const current = await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'crowd' } });
    expect(current.body.version).toBe(21);
    expect(current.body.value).toBe(`crowd-value-${results.findIndex((r) => r.body.version === 21)}-xyz`);
  });

  it('parallel stores with the same expectedVersion: exactly one wins', async () => {
    await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'race', kind: 'token', value: h.secret('race-start-value') } });
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'race', kind: 'token', value: h.secret(`race-value-${i}-xyz`), expectedVersion: 1 } }),
      ),
    );
    expect(results.map((r) => r.status).sort()).toEqual([201, ...Array(9).fill(409)]);
  });

  it("another identity's credential answers 404, by name and by id, for every primitive", async () => {
    const mine = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'private', kind: 'generic', value: h.secret('alice-private-value') } });
    for (const body of [{ name: 'private' }, { id: mine.body.id }]) {
      const get = await h.api('POST', '/v1/vault.get', { token: bob.token, body });
      expect(get.status).toBe(404);
      expect(get.text).not.toContain('alice-private-value');
      expect((await h.api('POST', '/v1/vault.totp', { token: bob.token, body })).status).toBe(404);
    }
    // Bob storing the same name makes his own credential; Alice's is untouched.
    const bobs = await h.api('POST', '/v1/vault.store', { token: bob.token, body: { name: 'private', kind: 'generic', value: h.secret('bob-own-value') } });
    expect(bobs.body.id).not.toBe(mine.body.id);
    expect((await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'private' } })).body.value).toBe('alice-private-value');
    const list = await h.api('GET', '/v1/credentials', { token: bob.token });
    expect(list.body.items.map((c: { name: string }) => c.name)).toEqual(['private']);
    const rotation = await h.api('POST', '/v1/rotations', { token: bob.token, body: { credentials: [mine.body.id] } });
    expect(rotation.status).toBe(404);
  });

  it('a missing, malformed or wrong token is a 401 with a Bearer challenge; a valid token on the wrong kind of route is a 403', async () => {
    for (const authorization of [undefined, 'Basic Zm9vOmJhcg==', 'Bearer', 'Bearer mgt_wrong']) {
      const res = await h.api('POST', '/v1/vault.get', { headers: authorization ? { authorization } : {}, body: { name: 'stripe' } });
      expect(res.status).toBe(401);
      expect(res.headers.get('www-authenticate')).toBe('Bearer realm="mailgent"');
      expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/unauthorized', status: 401 });
    }
    const asAdmin = await h.api('POST', '/v1/vault.get', { token: h.adminToken, body: { name: 'stripe' } });
    expect(asAdmin.status).toBe(403);
    expect(asAdmin.body).toMatchObject({ type: 'https://mailgent.dev/problems/forbidden', detail: 'this route needs an identity’s token; the admin token acts for no identity' });
    const res = await h.api('POST', '/v1/identities', { token: alice.token, body: { name: 'sneaky' } });
    expect(res.status).toBe(403);
    expect((await h.sql("SELECT count(*)::int AS n FROM identities WHERE name = 'sneaky'")).rows[0].n).toBe(0);
  });

  it('identities are created by the admin, with a token shown once and stored only as a hash', async () => {
    const res = await h.api('POST', '/v1/identities', { token: h.adminToken, body: { name: 'carol', email: 'carol@example.com' } });
    expect(res.status).toBe(201);
    expect(res.body.token).toMatch(/^mgt_[A-Za-z0-9_-]{43}$/);
    h.secret(res.body.token);
    const row = (await h.sql('SELECT * FROM identities WHERE id = $1', [res.body.id])).rows[0];
    expect(JSON.stringify(row)).not.toContain(res.body.token);
    expect(row.token_hash).toHaveLength(32);
    const dup = await h.api('POST', '/v1/identities', { token: h.adminToken, body: { name: 'carol' } });
    expect(dup.status).toBe(409);
  });

  it('the admin issues an identity a new token (by name or id) in place of its old one, which stops working at once', async () => {
    const made = await h.api('POST', '/v1/identities', { token: h.adminToken, body: { name: 'dave' } });
    const first = h.secret(made.body.token as string);
    const stored = await h.api('POST', '/v1/vault.store', { token: first, body: { name: 'dave-key', kind: 'api_key', value: h.secret('sk_dave_value_00000001') } });
    expect(stored.status).toBe(201);
    expect((await h.api('GET', '/v1/whoami', { token: first })).status).toBe(200);
    // Before, no route: a token lost or leaked could be neither replaced nor revoked.
    const byName = await h.api('POST', '/v1/identities/dave/token', { token: h.adminToken });
    expect(byName.status, byName.text).toBe(201);
    expect(byName.body).toEqual({ id: made.body.id, name: 'dave', email: null, token: expect.stringMatching(/^mgt_[A-Za-z0-9_-]{43}$/) });
    const second = h.secret(byName.body.token as string);
    expect(second).not.toBe(first);
    // Remembered a moment ago by this process, the old token is forgotten at once.
    expect((await h.api('GET', '/v1/whoami', { token: first })).status).toBe(401);
    expect((await h.api('POST', '/v1/vault.get', { token: second, body: { name: 'dave-key' } })).body.value).toBe('sk_dave_value_00000001');
    const byId = await h.api('POST', `/v1/identities/${made.body.id}/token`, { token: h.adminToken });
    expect(byId.status).toBe(201);
    const third = h.secret(byId.body.token as string);
    expect((await h.api('GET', '/v1/whoami', { token: second })).status).toBe(401);
    expect((await h.api('GET', '/v1/whoami', { token: third })).body).toEqual({ id: made.body.id, name: 'dave', email: null });
    // The admin's only: an identity's token is a 403 (its own included), an unknown identity a 404.
    expect((await h.api('POST', '/v1/identities/dave/token', { token: third })).status).toBe(403);
    expect((await h.api('POST', '/v1/identities/nobody-here/token', { token: h.adminToken })).status).toBe(404);
    const trail = (await h.sql(`SELECT actor, outcome, detail FROM audit_log WHERE identity_id = $1 AND action = 'identity.token' AND outcome = 'ok' ORDER BY seq`, [made.body.id])).rows;
    expect(trail).toEqual([
      { actor: 'admin', outcome: 'ok', detail: {} },
      { actor: 'admin', outcome: 'ok', detail: {} },
    ]);
  });

  it("two re-issues of one identity's token at once: one is answered with the token that works, the other a 409 (not a token that never worked)", async () => {
    const made = await h.api('POST', '/v1/identities', { token: h.adminToken, body: { name: 'fay' } });
    h.secret(made.body.token as string);
    // The identity's row held, so both re-issues have read the token they replace before either writes.
    const holder = new pg.Client({ connectionString: h.databaseUrl });
    await holder.connect();
    let answers: Awaited<ReturnType<Harness['api']>>[];
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM identities WHERE id = $1 FOR UPDATE', [made.body.id]);
      const both = Promise.all([0, 1].map(() => h.api('POST', '/v1/identities/fay/token', { token: h.adminToken })));
      for (const until = Date.now() + 10_000; ; ) {
        const waiting = `SELECT count(*)::int AS n FROM pg_stat_activity
                          WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'UPDATE identities SET token_hash%'`;
        const { n } = (await h.sql(waiting)).rows[0];
        if (n >= 2) break;
        if (Date.now() > until) throw new Error('the two re-issues never waited on the row');
        await new Promise((r) => setTimeout(r, 20));
      }
      await holder.query('ROLLBACK');
      answers = await both;
    } finally {
      await holder.end();
    }
    // Before: two 201s, and the token of the one that committed first a 401 from the start.
    expect(answers.map((a) => a.status).sort()).toEqual([201, 409]);
    const issued = answers.find((a) => a.status === 201)!;
    const refused = answers.find((a) => a.status === 409)!;
    expect(refused.body.detail).toBe("another request re-issued this identity's token at the same moment: the token it was answered with is the one that works (re-issue again for another)");
    expect((await h.api('GET', '/v1/whoami', { token: h.secret(issued.body.token as string) })).status).toBe(200);
  });

  it("a lookup of a token under way while the token is re-issued is not remembered: the old token does not come back for the cache's 5 s", async () => {
    const made = await h.api('POST', '/v1/identities', { token: h.adminToken, body: { name: 'erin' } });
    const old = h.secret(made.body.token as string);
    // The lookup reads the old token's row, then is held until the re-issue has committed and cleared the cache.
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let held = false;
    const pool = {
      query: async (sql: string, params?: unknown[]) => {
        const res = await h.services.pool.query(sql, params);
        if (!held && sql.startsWith('SELECT id, name, email, token_hash')) {
          held = true;
          await gate;
        }
        return res;
      },
      connect: () => h.services.pool.connect(),
    } as unknown as Pool;
    const identities = new Identities(pool, h.services.dataKeys);
    const lookup = identities.authenticate(hashToken(old));
    await vi.waitFor(() => expect(held).toBe(true));
    h.secret((await identities.reissueToken({ id: made.body.id }, { actor: 'admin' })).token);
    release();
    expect(await lookup).toMatchObject({ id: made.body.id });
    // Before, that lookup put the old token in the cache after the re-issue had cleared it: it worked on.
    expect(await identities.authenticate(hashToken(old))).toBeUndefined();
  });

  it('lists metadata only, with ages, policies and filters', async () => {
    const carol = await h.createIdentity();
    const body = (name: string, kind: string, extra = {}) => ({ token: carol.token, body: { name, kind, value: h.secret(`value-of-${name}-123`), ...extra } });
    await h.api('POST', '/v1/vault.store', body('old-key', 'api_key', { rotation: { provider: 'generated', periodDays: 30 }, owners: ['team@example.com'] }));
    await h.api('POST', '/v1/vault.store', body('new-key', 'api_key'));
    await h.api('POST', '/v1/vault.store', body('a-password', 'password', { metadata: { service: 'billing' } }));
    await h.sql(`UPDATE secret_versions SET created_at = now() - interval '100 days'
                  WHERE credential_id = (SELECT id FROM credentials WHERE name = 'old-key' AND identity_id = $1)`, [carol.id]);

    const all = await h.api('GET', '/v1/credentials', { token: carol.token });
    expect(all.status).toBe(200);
    expect(all.text).not.toContain('value-of-');
    const old = all.body.items.find((c: { name: string }) => c.name === 'old-key');
    expect(old).toMatchObject({ kind: 'api_key', version: 1, ageDays: 100, owners: ['team@example.com'], status: 'active' });
    expect(old.policy).toMatchObject({ provider: 'generated', periodDays: 30, settings: { length: 32 } });
    expect(new Date(old.nextRotationAt).getTime()).toBeLessThan(Date.now());

    const names = async (query: string) =>
      (await h.api('GET', `/v1/credentials?${query}`, { token: carol.token })).body.items.map((c: { name: string }) => c.name);
    expect(await names('kind=api_key')).toEqual(['new-key', 'old-key']);
    expect(await names('olderThanDays=90')).toEqual(['old-key']);
    expect(await names('dueWithinDays=0')).toEqual(['old-key']);
    expect(await names('limit=1')).toEqual(['a-password']);
    expect(await names('limit=5&after=a-password')).toEqual(['new-key', 'old-key']);
    expect((await h.api('GET', '/v1/credentials?kind=nope', { token: carol.token })).status).toBe(400);
  });
});
