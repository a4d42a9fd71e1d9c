import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { createPool } from '../db/pool';
import { firstSeqAt } from '../vault/audit';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

describe('audit log', () => {
  let h: Harness;
  let agent: { id: string; token: string };

  const rowsFor = async (requestId: string) =>
    (await h.sql('SELECT identity_id, actor, action, credential_id, outcome, detail FROM audit_log WHERE request_id = $1 ORDER BY seq', [requestId])).rows;

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity('auditor-agent', 'agent@example.com');
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('writes one row per primitive call, with identity, action, credential, outcome and request id', async () => {
    const call = (route: string, body: unknown, requestId: string) =>
      h.api('POST', route, { token: agent.token, body, headers: { 'x-request-id': requestId } });
    const stored = await call('/v1/vault.store', { name: 'seed', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DP') } }, 'req-store');
    await call('/v1/vault.get', { name: 'seed' }, 'req-get');
    await call('/v1/vault.totp', { name: 'seed' }, 'req-totp');
    const mail = await call('/v1/mail.send', { to: ['someone@example.com'], subject: 'hello', text: 'no secrets here' }, 'req-mail');
    expect(mail.status).toBe(202);
    const actor = `identity:${agent.id}`;
    const id = stored.body.id;
    expect(await rowsFor('req-store')).toEqual([{ identity_id: agent.id, actor, action: 'vault.store', credential_id: id, outcome: 'ok', detail: { name: 'seed', version: 1 } }]);
    expect(await rowsFor('req-get')).toEqual([{ identity_id: agent.id, actor, action: 'vault.get', credential_id: id, outcome: 'ok', detail: { name: 'seed', version: 1 } }]);
    expect(await rowsFor('req-totp')).toEqual([{ identity_id: agent.id, actor, action: 'vault.totp', credential_id: id, outcome: 'ok', detail: { name: 'seed', version: 1 } }]);
    expect(await rowsFor('req-mail')).toEqual([
      { identity_id: agent.id, actor, action: 'mail.send', credential_id: null, outcome: 'ok', detail: { messageId: mail.body.messageId, recipients: 1 } },
    ]);
  });

  it('writes a row for every denied, rejected and failed call too', async () => {
    await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'missing' }, headers: { 'x-request-id': 'req-404' } });
    await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'x', extra: 1 }, headers: { 'x-request-id': 'req-400' } });
    await h.api('POST', '/v1/vault.get', { body: { name: 'seed' }, headers: { 'x-request-id': 'req-401' } });
    await h.api('POST', '/v1/vault.store', { token: agent.token, raw: '{"name":', headers: { 'content-type': 'application/json', 'x-request-id': 'req-json' } });
    await h.api('POST', '/v1/identities', { token: agent.token, body: { name: 'nope' }, headers: { 'x-request-id': 'req-403' } });
    expect(await rowsFor('req-404')).toMatchObject([{ action: 'vault.get', outcome: 'denied', detail: { name: 'missing', error: 'not-found', status: 404 } }]);
    expect(await rowsFor('req-400')).toMatchObject([{ identity_id: agent.id, action: 'vault.get', outcome: 'rejected', detail: { error: 'validation-failed', status: 400 } }]);
    expect(await rowsFor('req-401')).toEqual([{ identity_id: null, actor: 'anonymous', action: 'vault.get', credential_id: null, outcome: 'denied', detail: { error: 'unauthorized', status: 401 } }]);
    expect(await rowsFor('req-json')).toMatchObject([{ identity_id: agent.id, action: 'vault.store', outcome: 'rejected', detail: { error: 'malformed-json' } }]);
    expect(await rowsFor('req-403')).toMatchObject([{ identity_id: agent.id, action: 'identity.create', outcome: 'denied', detail: { error: 'forbidden' } }]);
    // The admin token on an identity's route: the admin's refusal (it was written as anonymous's).
    await h.api('POST', '/v1/vault.get', { token: h.adminToken, body: { name: 'seed' }, headers: { 'x-request-id': 'req-admin-403' } });
    expect(await rowsFor('req-admin-403')).toMatchObject([{ identity_id: null, actor: 'admin', action: 'vault.get', outcome: 'denied', detail: { error: 'forbidden', status: 403 } }]);
    // Routes that only read metadata write no row when they succeed, but a denied call is still written.
    await h.api('GET', '/v1/credentials', { token: 'not-a-token', headers: { 'x-request-id': 'req-list-401' } });
    await h.api('GET', '/v1/whoami', { headers: { 'x-request-id': 'req-whoami-401' } });
    await h.api('GET', '/v1/credentials', { token: agent.token, headers: { 'x-request-id': 'req-list-ok' } });
    expect(await rowsFor('req-list-401')).toEqual([{ identity_id: null, actor: 'anonymous', action: 'credential.list', credential_id: null, outcome: 'denied', detail: { error: 'unauthorized', status: 401 } }]);
    expect(await rowsFor('req-whoami-401')).toMatchObject([{ action: 'identity.whoami', outcome: 'denied' }]);
    expect(await rowsFor('req-list-ok')).toEqual([]);
  });

  it('a read that cannot be audited fails and returns no secret', async () => {
    const lastRead = async () => (await h.api('GET', '/v1/credentials', { token: agent.token })).body.items.find((c: { name: string }) => c.name === 'guarded').lastAccessedAt;
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'guarded', kind: 'password', value: h.secret('guarded-password-value') } });
    await h.sql(`CREATE TRIGGER audit_refuse_get BEFORE INSERT ON audit_log FOR EACH ROW
                 WHEN (NEW.action = 'vault.get') EXECUTE FUNCTION audit_log_refuse()`);
    try {
      const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'guarded' } });
      expect(res.status).toBe(503);
      expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/audit-unavailable', status: 503 });
      expect(res.body.value).toBeUndefined();
      expect(res.text).not.toContain('guarded-password-value');
      // Not recorded as read.
      expect(await lastRead()).toBeNull();
    } finally {
      await h.sql('DROP TRIGGER audit_refuse_get ON audit_log');
    }
    expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'guarded' } })).status).toBe(200);
    const read = await lastRead();
    const row = (await h.sql("SELECT max(at) AS at FROM audit_log WHERE action = 'vault.get' AND outcome = 'ok' AND credential_id = (SELECT id FROM credentials WHERE name = 'guarded')")).rows[0];
    expect(read).toBe(row.at.toISOString());
  });

  it('lists an identity\'s own events only, filtered by credential and time', async () => {
    const other = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: other.token, body: { name: 'seed', kind: 'generic', value: h.secret('other-seed-value') } });
    const mine = await h.api('GET', '/v1/audit?limit=1000', { token: agent.token });
    expect(mine.status).toBe(200);
    expect(mine.body.items.length).toBeGreaterThan(5);
    expect(mine.body.items.every((e: { identityId: string }) => e.identityId === agent.id)).toBe(true);
    const seed = await h.api('GET', '/v1/audit?credential=seed', { token: agent.token });
    expect(seed.body.items.map((e: { action: string }) => e.action)).toEqual(['vault.store', 'vault.get', 'vault.totp']);
    // The trail outlives the credential: still there by name and by id once it is deleted, and once destroyed.
    const gone = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'short-lived', kind: 'generic', value: h.secret('short-lived-value') } });
    await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'short-lived' } });
    expect((await h.api('DELETE', '/v1/credentials/short-lived', { token: agent.token })).status).toBe(200);
    const trail = async (ref: string) => (await h.api('GET', `/v1/audit?credential=${ref}`, { token: agent.token })).body.items.map((e: { action: string }) => e.action);
    expect(await trail('short-lived')).toEqual(['vault.store', 'vault.get', 'credential.delete']);
    expect((await h.api('DELETE', `/v1/credentials/${gone.body.id}?destroy=true`, { token: agent.token })).status).toBe(200);
    expect(await trail(gone.body.id)).toEqual(['vault.store', 'vault.get', 'credential.delete', 'credential.destroy']);
    // A new credential under the name is the one the name means now; the old trail stays reachable by id.
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'short-lived', kind: 'generic', value: h.secret('short-lived-value-2') } });
    expect(await trail('short-lived')).toEqual(['vault.store']);
    // Another identity's credential, deleted or not, is never named this way.
    expect((await h.api('GET', `/v1/audit?credential=${gone.body.id}`, { token: other.token })).body.items).toEqual([]);
    const future = await h.api('GET', `/v1/audit?since=${new Date(Date.now() + 60_000).toISOString()}`, { token: agent.token });
    expect(future.body.items).toEqual([]);
    const page = await h.api('GET', '/v1/audit?limit=2', { token: agent.token });
    const next = await h.api('GET', `/v1/audit?limit=2&after=${page.body.nextCursor}`, { token: agent.token });
    expect(next.body.items[0].seq).toBeGreaterThan(page.body.items[1].seq);
    const all = await h.api('GET', '/v1/audit?limit=1000', { token: h.adminToken });
    expect(new Set(all.body.items.map((e: { identityId: string }) => e.identityId)).size).toBeGreaterThan(1);
    // The admin names any identity's credential, by name too (before, a name found nothing); a name
    // several identities use is refused, not answered for one of them.
    const byAdmin = async (ref: string) => h.api('GET', `/v1/audit?credential=${ref}`, { token: h.adminToken });
    expect((await byAdmin('short-lived')).body.items.map((e: { action: string; identityId: string }) => [e.action, e.identityId])).toEqual([['vault.store', agent.id]]);
    expect((await byAdmin(gone.body.id)).body.items).toHaveLength(4);
    const ambiguous = await byAdmin('seed');
    expect(ambiguous.status, ambiguous.text).toBe(422);
    expect(ambiguous.body.detail).toBe("'seed' names credentials of several identities; give the credential's id");
    // A name another identity's credential had, destroyed since (its name free again), does not make
    // the live one's ambiguous: before, a 422 here, while a leak report by the name found the live one.
    const [a, b] = [await h.createIdentity(), await h.createIdentity()];
    for (const [who, value] of [[a, 'reused-name-value-a1'], [b, 'reused-name-value-b1']] as const) {
      if (who === b) expect((await h.api('DELETE', '/v1/credentials/reused-name?destroy=true', { token: a.token })).status).toBe(200);
      expect((await h.api('POST', '/v1/vault.store', { token: who.token, body: { name: 'reused-name', kind: 'generic', value: h.secret(value) } })).status).toBe(201);
    }
    const reused = await byAdmin('reused-name');
    expect(reused.status, reused.text).toBe(200);
    expect(reused.body.items.map((e: { action: string; identityId: string }) => [e.action, e.identityId])).toEqual([['vault.store', b.id]]);
  });

  it('?credential= takes an id or a name of a credential\'s form: anything else is a 400 whose row says only that, never the text given', async () => {
    const other = await h.createIdentity();
    const theirs = await h.api('POST', '/v1/vault.store', { token: other.token, body: { name: 'theirs', kind: 'generic', value: h.secret('their-value-0001') } });
    // What a caller may put there: a value pasted by mistake, control characters (a forged line in
    // whatever prints the log), a space, too long, a name vault.store refuses.
    // (Not h.secret: the harness records an error's route, query string and all, where the leak sweep looks.)
    const pasted = 'sk_live=51HxQpasted$value';
    const invalid = [pasted, 'line\r\n{"forged":"row"}', 'a\u0001b\u007f', 'has space', 'x'.repeat(201), '-starts-with-a-dash', 'mailgent://credentials/x@1'];
    for (const [i, bad] of invalid.entries()) {
      const requestId = `req-audit-bad-ref-${i}`;
      const res = await h.api('GET', `/v1/audit?credential=${encodeURIComponent(bad)}`, { token: agent.token, headers: { 'x-request-id': requestId } });
      expect(res.status, `${JSON.stringify(bad)}: ${res.text}`).toBe(400);
      expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/validation-failed', status: 400, errors: [{ path: 'credential', message: expect.stringMatching(/^must be a credential id \(UUID\) or name: /) }] });
      expect(res.text).not.toContain(bad);
      // Before, a 200 and a denied row holding the text as given: { credential: <it>, error: 'not-found' }.
      expect(await rowsFor(requestId)).toEqual([{ identity_id: agent.id, actor: `identity:${agent.id}`, action: 'audit.list', credential_id: null, outcome: 'rejected', detail: { error: 'validation-failed', status: 400 } }]);
    }
    for (const bad of invalid) {
      const { rows } = await h.sql('SELECT count(*)::int AS n FROM audit_log WHERE strpos(detail::text, $1) > 0 OR strpos(detail::text, $2) > 0', [bad, JSON.stringify(bad).slice(1, -1)]);
      expect(rows[0].n, JSON.stringify(bad)).toBe(0);
    }
    // An id (in either case) or a name of a credential's form is what a denied try is written with.
    const tries: [string, string][] = [
      ['no-such-name', 'no-such-name'],
      ['theirs', 'theirs'],
      [theirs.body.id, theirs.body.id],
      [theirs.body.id.toUpperCase(), theirs.body.id.toUpperCase()],
      ['Mixed.Name_1:a/b@c+d', 'Mixed.Name_1:a/b@c+d'],
    ];
    for (const [i, [ref, recorded]] of tries.entries()) {
      const requestId = `req-audit-denied-ref-${i}`;
      const res = await h.api('GET', `/v1/audit?credential=${encodeURIComponent(ref)}`, { token: agent.token, headers: { 'x-request-id': requestId } });
      expect(res.status, res.text).toBe(200);
      expect(res.body.items).toEqual([]);
      expect(await rowsFor(requestId)).toEqual([{ identity_id: agent.id, actor: `identity:${agent.id}`, action: 'audit.list', credential_id: null, outcome: 'denied', detail: { credential: recorded, error: 'not-found' } }]);
    }
    // The admin's malformed reference is refused alike.
    const admin = await h.api('GET', `/v1/audit?credential=${encodeURIComponent('a b')}`, { token: h.adminToken });
    expect(admin.status, admin.text).toBe(400);
  });

  it('?since= answers from the first row at that time on, found by its place in the log (no row before it read), paging as without it', async () => {
    // Rows a few milliseconds apart, a rolled-back one's seq among them (a gap).
    for (let i = 0; i < 12; i++) {
      await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: `since-${i}`, kind: 'generic', value: h.secret(`since-value-${i}-0001`) } });
      if (i === 5) {
        await h.sql(`BEGIN; INSERT INTO audit_log (identity_id, actor, action, outcome) VALUES ('${agent.id}', 'test', 'test.gap', 'ok'); ROLLBACK`);
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    const stamped = (await h.sql('SELECT seq, at FROM audit_log ORDER BY seq')).rows.map((r) => ({ seq: Number(r.seq), at: r.at as Date }));
    const max = stamped.at(-1)!.seq;
    const expected = (at: Date) => stamped.find((r) => r.at >= at)?.seq ?? max + 1;
    const times = [new Date(0), ...stamped.map((r) => r.at), ...stamped.map((r) => new Date(r.at.getTime() + 1)), new Date(Date.now() + 60_000)];
    // Where the rows at that time or later begin: the first of them is the first row from there (a gap's seq may come first).
    for (const at of times) {
      const from = await firstSeqAt(h.services.pool, at);
      expect(stamped.find((r) => r.seq >= from)?.seq ?? max + 1, at.toISOString()).toBe(expected(at));
    }

    // Through the API: the agent's rows at that time or later, in pages.
    const since = stamped[Math.floor(stamped.length / 2)]!.at;
    const want = (await h.sql('SELECT seq FROM audit_log WHERE identity_id = $1 AND at >= $2 ORDER BY seq', [agent.id, since])).rows.map((r) => Number(r.seq));
    expect(want.length).toBeGreaterThan(3);
    const got: number[] = [];
    for (let cursor: string | undefined, pages = 0; pages < 50; pages++) {
      const res = await h.api('GET', `/v1/audit?since=${since.toISOString()}&limit=3${cursor ? `&after=${cursor}` : ''}`, { token: agent.token });
      expect(res.status, res.text).toBe(200);
      got.push(...res.body.items.map((e: { seq: number }) => e.seq));
      cursor = res.body.nextCursor ?? undefined;
      if (!cursor) break;
    }
    expect(got).toEqual(want);
  });

  it('is append-only: the service\'s own connection cannot update, delete or truncate it', async () => {
    for (const statement of ["UPDATE audit_log SET outcome = 'ok'", 'DELETE FROM audit_log', 'TRUNCATE audit_log']) {
      await expect(h.services.pool.query(statement)).rejects.toThrow(/audit_log is append-only/);
    }
  });

  it('chains a transaction\'s rows over several statements, past a rolled-back savepoint, while others wait', async () => {
    const insert = (c: pg.PoolClient, tag: string, n = 1) =>
      c.query(`INSERT INTO audit_log (actor, action, outcome, request_id)
                 SELECT 'test', 'chain.test', 'ok', $1 || '-' || i FROM generate_series(1, $2::int) AS i`, [tag, n]);
    const links = async () =>
      (await h.sql<{ request_id: string; linked: boolean }>(
        `SELECT request_id, prev_hash = lag(hash) OVER (ORDER BY seq) AS linked FROM audit_log ORDER BY seq`,
      )).rows.filter((r) => r.request_id?.startsWith('chain-'));
    const [first, second] = [await h.services.pool.connect(), await h.services.pool.connect()];
    try {
      await first.query('BEGIN');
      await insert(first, 'chain-a');
      await insert(first, 'chain-b', 3);
      await first.query('SAVEPOINT s');
      await insert(first, 'chain-undone', 2);
      await first.query('ROLLBACK TO SAVEPOINT s');
      await insert(first, 'chain-c');
      // Only the transaction's first row asked for the chain lock; the lock is held all the same.
      let waited = true;
      const other = insert(second, 'chain-other').then(() => (waited = false));
      await new Promise((r) => setTimeout(r, 300));
      expect(waited).toBe(true);
      await first.query('COMMIT');
      await other;
      // A new transaction on the same connection starts from the table's head, not its last one.
      await insert(first, 'chain-d');
    } finally {
      // If an expectation failed inside the transaction, end it (and free the waiting insert).
      await first.query('ROLLBACK').catch(() => undefined);
      first.release();
      second.release();
    }
    expect(await links()).toEqual(
      ['chain-a-1', 'chain-b-1', 'chain-b-2', 'chain-b-3', 'chain-c-1', 'chain-other-1', 'chain-d-1'].map((request_id) => ({ request_id, linked: true })),
    );
    const total = Number((await h.sql('SELECT count(*) FROM audit_log')).rows[0].count);
    expect((await h.api('GET', '/v1/audit/verify', { token: h.adminToken })).body).toMatchObject({ ok: true, rows: total });
  });

  it('a REPEATABLE READ transaction cannot append (its snapshot would hide the head: a fork), and the service asks for READ COMMITTED whatever the default', async () => {
    const insert = (c: pg.PoolClient, tag: string) => c.query(`INSERT INTO audit_log (actor, action, outcome, request_id) VALUES ('test', 'chain.test', 'ok', $1)`, [tag]);
    const [first, second] = [await h.services.pool.connect(), await h.services.pool.connect()];
    try {
      await first.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await first.query('SELECT 1'); // its snapshot, before another session appends
      await insert(second, 'rr-other');
      // Before, chained to the head its snapshot showed: a broken link on a history nobody touched.
      await expect(insert(first, 'rr-stale')).rejects.toThrow(/audit rows are appended in READ COMMITTED transactions only \(this one is repeatable read\)/);
    } finally {
      await first.query('ROLLBACK').catch(() => undefined);
      first.release();
      second.release();
    }
    // A database whose default is REPEATABLE READ: the service's connections are READ COMMITTED all the same.
    const database = new URL(h.databaseUrl).pathname.slice(1);
    await h.sql(`ALTER DATABASE "${database}" SET default_transaction_isolation = 'repeatable read'`);
    const pool = createPool(h.databaseUrl, 1);
    try {
      expect((await pool.query('SHOW transaction_isolation')).rows[0].transaction_isolation).toBe('read committed');
    } finally {
      await pool.end();
      await h.sql(`ALTER DATABASE "${database}" RESET default_transaction_isolation`);
    }
    const total = Number((await h.sql('SELECT count(*) FROM audit_log')).rows[0].count);
    expect((await h.api('GET', '/v1/audit/verify', { token: h.adminToken })).body).toMatchObject({ ok: true, rows: total });
  });

  it('verify walks the chain; an edited row is named, and so is the row after a deleted one', async () => {
    const ok = await h.api('GET', '/v1/audit/verify', { token: h.adminToken });
    expect(ok.status).toBe(200);
    const total = Number((await h.sql('SELECT count(*) FROM audit_log')).rows[0].count);
    const newest = (await h.sql('SELECT seq, encode(hash, $1) AS hash FROM audit_log ORDER BY seq DESC LIMIT 1', ['hex'])).rows[0];
    expect(ok.body).toEqual({ ok: true, rows: total, head: { seq: Number(newest.seq), hash: newest.hash } });
    expect((await h.api('GET', '/v1/audit/verify', { token: agent.token })).status).toBe(403);

    const target = Number((await h.sql("SELECT seq FROM audit_log WHERE request_id = 'req-get'")).rows[0].seq);
    // A superuser can switch triggers off for its session; the chain still tells.
    await h.sql(`DO $$ BEGIN
                   SET LOCAL session_replication_role = replica;
                   UPDATE audit_log SET outcome = 'denied' WHERE seq = ${target};
                 END $$`);
    const edited = await h.api('GET', '/v1/audit/verify', { token: h.adminToken });
    expect(edited.body).toEqual({ ok: false, rows: expect.any(Number), firstBroken: { seq: target, reason: 'hash mismatch: the row was edited after it was written' } });

    await h.sql(`DO $$ BEGIN
                   SET LOCAL session_replication_role = replica;
                   UPDATE audit_log SET outcome = 'ok' WHERE seq = ${target};
                 END $$`);
    expect((await h.api('GET', '/v1/audit/verify', { token: h.adminToken })).body.ok).toBe(true);

    const victim = Number((await h.sql("SELECT seq FROM audit_log WHERE request_id = 'req-totp'")).rows[0].seq);
    const after = Number((await h.sql('SELECT min(seq) AS s FROM audit_log WHERE seq > $1', [victim])).rows[0].s);
    await h.sql(`DO $$ BEGIN
                   SET LOCAL session_replication_role = replica;
                   DELETE FROM audit_log WHERE seq = ${victim};
                 END $$`);
    const deleted = await h.api('GET', '/v1/audit/verify', { token: h.adminToken });
    expect(deleted.body.firstBroken).toEqual({ seq: after, reason: 'chain link broken: the row before it was removed, inserted or rewritten' });
  });

  it("a rewrite with recomputed hashes passes a plain verify, but not one against a head recorded earlier", async () => {
    /** What the table's owner can do: triggers off, rows changed, every hash from `from` on recomputed. */
    const rechain = (from: number) =>
      h.sql(`DO $$ DECLARE r record; prev bytea := coalesce((SELECT hash FROM audit_log WHERE seq < ${from} ORDER BY seq DESC LIMIT 1), '\\x${'00'.repeat(32)}'::bytea);
             BEGIN
               SET LOCAL session_replication_role = replica;
               FOR r IN SELECT seq FROM audit_log WHERE seq >= ${from} ORDER BY seq LOOP
                 UPDATE audit_log a SET prev_hash = prev, hash = sha256(prev || audit_payload(a)) WHERE seq = r.seq RETURNING hash INTO prev;
               END LOOP;
             END $$`);
    await rechain(0); // (the test before left a row removed)
    await h.api('GET', '/v1/whoami', { token: agent.token });
    const recorded = await h.api('GET', '/v1/audit/verify', { token: h.adminToken });
    expect(recorded.body.ok).toBe(true);
    const head = recorded.body.head as { seq: number; hash: string };
    const against = (at: { seq: number; hash: string }) => h.api('GET', `/v1/audit/verify?head=${at.seq}:${at.hash}`, { token: h.adminToken });
    expect((await against(head)).body).toMatchObject({ ok: true, head });

    // An earlier row turned from denied to ok, and the chain recomputed: a plain verify cannot tell.
    const target = Number((await h.sql("SELECT seq FROM audit_log WHERE request_id = 'req-get'")).rows[0].seq);
    await h.sql(`DO $$ BEGIN SET LOCAL session_replication_role = replica; UPDATE audit_log SET actor = 'someone-else' WHERE seq = ${target}; END $$`);
    await rechain(target);
    expect((await h.api('GET', '/v1/audit/verify', { token: h.adminToken })).body.ok).toBe(true);
    expect((await against(head)).body).toMatchObject({
      ok: false,
      firstBroken: { seq: head.seq, reason: 'not the recorded head: the log was rewritten up to here, its hashes recomputed' },
    });

    // Cut back past the recorded head: gone.
    await h.sql(`DO $$ BEGIN SET LOCAL session_replication_role = replica; DELETE FROM audit_log WHERE seq >= ${head.seq}; END $$`);
    expect((await h.api('GET', '/v1/audit/verify', { token: h.adminToken })).body.ok).toBe(true);
    expect((await against(head)).body).toMatchObject({ ok: false, firstBroken: { seq: head.seq, reason: 'the recorded head is gone: the log was cut back past it' } });

    const malformed = await h.api('GET', '/v1/audit/verify?head=12', { token: h.adminToken });
    expect(malformed.status).toBe(400);
    expect(malformed.body.errors).toEqual([{ path: 'head', message: 'must be <seq>:<hash>, as an earlier verify answered (head.seq and head.hash)' }]);
    // A head no verify could have answered (seq 0, or past what a number holds exactly) is a 400, not a log reported cut back.
    for (const seq of ['0', '000', '9007199254740993']) {
      const impossible = await h.api('GET', `/v1/audit/verify?head=${seq}:${head.hash}`, { token: h.adminToken });
      expect(impossible.status, seq).toBe(400);
      expect(impossible.body.errors).toEqual([{ path: 'head', message: "head's seq must be 1 to 9007199254740991, as an earlier verify answered it" }]);
    }
  });

  it("verify computes each row's hash itself: a table owner who edits a row and replaces audit_payload to hand back its old bytes is found", async () => {
    await h.api('GET', '/v1/whoami', { token: agent.token });
    const recorded = await h.api('GET', '/v1/audit/verify', { token: h.adminToken });
    expect(recorded.body.ok).toBe(true);
    const head = recorded.body.head as { seq: number; hash: string };
    const target = Number((await h.sql("SELECT max(seq) AS seq FROM audit_log WHERE action = 'vault.store'")).rows[0].seq);
    const original = (await h.sql('SELECT actor, audit_payload(a) AS payload FROM audit_log a WHERE seq = $1', [target])).rows[0] as { actor: string; payload: Buffer };
    const payloadSql = `convert_to(jsonb_build_array(a.seq, floor(extract(epoch FROM a.at) * 1000000)::bigint, a.identity_id, a.actor, a.action,
                          a.credential_id, a.outcome, a.request_id, a.detail)::text, 'UTF8')`;
    try {
      // The row made another's, its hash kept; the function every hash was computed with made to hand back the old bytes for it.
      await h.sql(`DO $$ BEGIN SET LOCAL session_replication_role = replica; UPDATE audit_log SET actor = 'someone-else' WHERE seq = ${target}; END $$`);
      await h.sql(`CREATE OR REPLACE FUNCTION audit_payload(a audit_log) RETURNS bytea LANGUAGE sql STABLE AS $$
                     SELECT CASE WHEN a.seq = ${target} THEN '\\x${original.payload.toString('hex')}'::bytea ELSE ${payloadSql} END $$`);
      // Before, { ok: true } against the recorded head too.
      const verified = await h.api('GET', `/v1/audit/verify?head=${head.seq}:${head.hash}`, { token: h.adminToken });
      expect(verified.body).toMatchObject({ ok: false, firstBroken: { seq: target, reason: 'hash mismatch: the row was edited after it was written' } });
    } finally {
      await h.sql(`CREATE OR REPLACE FUNCTION audit_payload(a audit_log) RETURNS bytea LANGUAGE sql STABLE AS $$ SELECT ${payloadSql} $$`);
      await h.sql(`DO $$ BEGIN SET LOCAL session_replication_role = replica; UPDATE audit_log SET actor = '${original.actor}' WHERE seq = ${target}; END $$`);
    }
    expect((await h.api('GET', `/v1/audit/verify?head=${head.seq}:${head.hash}`, { token: h.adminToken })).body.ok).toBe(true);
  });
});
