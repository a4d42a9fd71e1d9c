import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AppError } from '../core/errors';
import { verifyAuditChain } from '../vault/audit';
import { MAX_IN_FLIGHT } from '../vault/read-batch';
import { DataKeys } from '../vault/data-keys';
import { Grants } from '../vault/grants';
import { Keyring } from '../vault/keyring';
import { SecretStore } from '../vault/secret-store';
import type { Caller } from '../vault/types';
import { Vault } from '../vault/vault';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * Concurrent reads share one transaction (vault/read-batch.ts). Calls started in the same tick are
 * deterministic: the first MAX_IN_FLIGHT each start a batch alone, the rest queue and make the next.
 */
describe('group commit of audited reads', () => {
  let h: Harness;
  let alice: { id: string; token: string; name: string };
  let bob: { id: string; token: string; name: string };
  const ids: Record<string, string> = {};
  const as = (who: { id: string }): Caller => ({ identityId: who.id, actor: `identity:${who.id}`, requestId: randomUUID() });
  const settle = <T>(p: Promise<T>) => p.then((value) => ({ value }), (error: unknown) => ({ error: error as AppError }));
  const rowsOf = async (requestIds: string[]) =>
    (
      await h.sql(
        `SELECT request_id, action, outcome, credential_id, detail, xmin::text AS tx FROM audit_log WHERE request_id = ANY($1) ORDER BY seq`,
        [requestIds],
      )
    ).rows;

  beforeAll(async () => {
    h = await startHarness();
    alice = await h.createIdentity('alice', 'alice@example.com');
    bob = await h.createIdentity('bob');
    for (const body of [
      { name: 'shared', kind: 'api_key', value: h.secret('sk_shared_first_value') },
      { name: 'shared', kind: 'api_key', value: h.secret('sk_shared_second_value') },
      { name: 'login', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DP') } },
      { name: 'plain', kind: 'password', value: h.secret('plain-password-value') },
      { name: 'broken', kind: 'token', value: h.secret('broken-token-value') },
    ]) {
      const res = await h.api('POST', '/v1/vault.store', { token: alice.token, body });
      expect(res.status).toBe(201);
      ids[body.name] = res.body.id;
    }
    expect((await h.api('POST', '/v1/grants', { token: alice.token, body: { credential: ids.shared, grantee: bob.name } })).status).toBe(201);
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('forty mixed reads commit in MAX_IN_FLIGHT + 1 transactions; each gets its own answer and its own audit row', async () => {
    const vault = h.services.vault;
    const calls: { caller: Caller; run: (c: Caller) => Promise<unknown> }[] = [
      ...Array.from({ length: 10 }, () => ({ caller: as(alice), run: (c: Caller) => vault.get(c, { name: 'shared' }) })),
      ...Array.from({ length: 5 }, () => ({ caller: as(alice), run: (c: Caller) => vault.get(c, { id: ids.shared! }, 1) })),
      ...Array.from({ length: 5 }, () => ({ caller: as(alice), run: (c: Caller) => vault.totp(c, { name: 'login' }) })),
      ...Array.from({ length: 5 }, () => ({ caller: as(alice), run: (c: Caller) => vault.totp(c, { name: 'plain' }) })),
      ...Array.from({ length: 5 }, () => ({ caller: as(alice), run: (c: Caller) => vault.get(c, { name: 'missing' }) })),
      ...Array.from({ length: 5 }, () => ({ caller: as(bob), run: (c: Caller) => vault.get(c, { id: ids.shared! }) })),
      ...Array.from({ length: 5 }, () => ({ caller: as(bob), run: (c: Caller) => vault.get(c, { id: ids.plain! }) })),
    ];
    const results = await Promise.all(calls.map(({ caller, run }) => settle(run(caller))));

    const outcome = (r: (typeof results)[number]) => ('error' in r ? r.error.status : 'ok');
    expect(results.map(outcome)).toEqual([...Array(20).fill('ok'), ...Array(5).fill(422), ...Array(5).fill(404), ...Array(5).fill('ok'), ...Array(5).fill(404)]);
    for (const r of results.slice(0, 10)) expect(r).toMatchObject({ value: { version: 2, label: 'current', value: 'sk_shared_second_value' } });
    for (const r of results.slice(10, 15)) expect(r).toMatchObject({ value: { version: 1, label: 'previous', value: 'sk_shared_first_value' } });
    for (const r of results.slice(15, 20)) expect((r as { value: { code: string } }).value.code).toMatch(/^\d{6}$/);
    for (const r of results.slice(30, 35)) expect(r).toMatchObject({ value: { id: ids.shared, value: 'sk_shared_second_value' } });

    const inSeq = await rowsOf(calls.map((c) => c.caller.requestId!));
    expect(inSeq).toHaveLength(calls.length);
    const rows = calls.map((c) => inSeq.find((r) => r.request_id === c.caller.requestId)!);
    // One row per call, written in MAX_IN_FLIGHT + 1 transactions: the first calls each alone (their
    // batches race to commit), then all the others together, their rows consecutive and in call order.
    const alone = MAX_IN_FLIGHT;
    expect(alone).toBeGreaterThanOrEqual(1);
    expect(new Set(rows.map((r) => r.tx)).size).toBe(alone + 1);
    expect(rows.map((r) => r.tx)).toEqual([...rows.slice(0, alone).map((r) => r.tx), ...Array(40 - alone).fill(rows[alone].tx)]);
    const last = inSeq.filter((r) => r.tx === rows[alone].tx).map((r) => r.request_id);
    expect(last).toEqual(calls.slice(alone).map((c) => c.caller.requestId));
    expect(inSeq.map((r) => r.request_id).join(',')).toContain(last.join(','));
    expect(rows.map((r) => r.outcome)).toEqual([...Array(20).fill('ok'), ...Array(5).fill('rejected'), ...Array(5).fill('denied'), ...Array(5).fill('ok'), ...Array(5).fill('denied')]);
    expect(rows[10]).toMatchObject({ action: 'vault.get', credential_id: ids.shared, detail: { ref: ids.shared, requestedVersion: 1, version: 1 } });
    expect(rows[20]).toMatchObject({ action: 'vault.totp', credential_id: ids.plain, detail: { name: 'plain', version: 1, error: 'unprocessable', status: 422 } });
    expect(rows[25]).toMatchObject({ credential_id: null, detail: { name: 'missing', error: 'not-found' } });
    expect(rows[30]).toMatchObject({ credential_id: ids.shared, detail: { version: 2, grantedBy: alice.id } });
    expect(rows[39]).toMatchObject({ credential_id: null, detail: { ref: ids.plain, error: 'not-found' } });
    for (const r of rows) expect(JSON.stringify(r.detail)).not.toMatch(/sk_shared|plain-password|JBSWY3/);

    // Only successful reads count as reads: 'plain' was only asked for as a TOTP code (refused) and by a stranger.
    const stamped = await Promise.all(['login', 'plain', 'shared'].map(async (name) => ({ name, read: (await h.services.vault.describe(alice.id, ids[name]!)).lastAccessedAt !== null })));
    expect(stamped).toEqual([
      { name: 'login', read: true },
      { name: 'plain', read: false },
      { name: 'shared', read: true },
    ]);
    expect(await verifyAuditChain(h.services.pool)).toMatchObject({ ok: true });
  });

  it('a value that fails its integrity check fails alone; the reads batched with it succeed', async () => {
    await h.sql(`UPDATE secret_versions SET sealed = set_byte(sealed, 20, (get_byte(sealed, 20) + 1) % 256) WHERE credential_id = $1`, [ids.broken]);
    const vault = h.services.vault;
    const callers = Array.from({ length: 6 }, () => as(alice));
    const results = await Promise.all(callers.map((c, i) => settle(vault.get(c, { name: i % 2 ? 'broken' : 'shared' }))));
    expect(results.map((r) => ('error' in r ? r.error.status : 'ok'))).toEqual(['ok', 500, 'ok', 500, 'ok', 500]);
    for (const r of results.filter((r) => 'error' in r)) expect((r as { error: AppError }).error.message).not.toMatch(/broken-token-value/);
    const inSeq = await rowsOf(callers.map((c) => c.requestId!));
    const rows = callers.map((c) => inSeq.find((r) => r.request_id === c.requestId)!);
    expect(rows.map((r) => [r.outcome, r.detail.error ?? null])).toEqual([
      ['ok', null],
      ['failed', 'integrity-failure'],
      ['ok', null],
      ['failed', 'integrity-failure'],
      ['ok', null],
      ['failed', 'integrity-failure'],
    ]);
  });

  it("a batch whose check of its missed references fails hands out its found reads, and writes the missed ones' rows withheld, unchecked", async () => {
    // A vault of its own in this process (the harness's reads run in a thread), whose check fails as a reset connection would.
    const secrets = new SecretStore(new DataKeys(h.services.pool, Keyring.fromSetting(h.keyringFile)), () => new Date());
    secrets.readableAmong = async () => Promise.reject(new Error('the connection was reset'));
    const vault = new Vault(h.services.pool, secrets);
    const callers = Array.from({ length: 5 }, () => as(alice));
    const names = ['shared', 'no-such-credential', 'shared', 'sk_shared_first_value', 'shared'];
    const results = await Promise.all(callers.map((c, i) => settle(vault.get(c, { name: names[i]! }))));
    expect(results.map((r) => ('error' in r ? r.error.status : 'ok'))).toEqual(['ok', 404, 'ok', 404, 'ok']);
    for (const r of results.filter((r) => 'error' in r)) expect(JSON.stringify((r as { error: AppError }).error.message)).not.toMatch(/no-such-credential|sk_shared_first_value/);
    const inSeq = await rowsOf(callers.map((c) => c.requestId!));
    const rows = callers.map((c) => inSeq.find((r) => r.request_id === c.requestId)!);
    expect(rows.map((r) => r.outcome)).toEqual(['ok', 'denied', 'ok', 'denied', 'ok']);
    for (const i of [1, 3]) {
      expect(rows[i].detail).toMatchObject({ nameWithheld: 'unchecked' });
      expect(rows[i].detail).not.toHaveProperty('name');
    }
  });

  it('a statement that fails before its lookup has decided writes the reference withheld, unchecked: a read batch, a change, a store', async () => {
    // The database's own pool, but the lookups named fail as a statement timeout would (57014); the audit rows are written for real.
    const timedOut = () => Object.assign(new Error('canceling statement due to statement timeout'), { code: '57014' });
    let failing = /vault-read-batch|credential-lock-by-name|^SELECT id FROM credentials WHERE identity_id = \$1 AND name = \$2/;
    const textOf = (q: unknown) => (typeof q === 'string' ? q : `${(q as { name?: string }).name ?? ''} ${(q as { text?: string }).text ?? ''}`.trim());
    const wrap = <T extends { query: (...args: any[]) => any }>(db: T): T => {
      const wrapped = Object.create(db) as T;
      wrapped.query = ((q: unknown, ...rest: unknown[]) => (failing.test(textOf(q)) ? Promise.reject(timedOut()) : db.query(q, ...rest))) as T['query'];
      return wrapped;
    };
    const pool = wrap(h.services.pool);
    pool.connect = (async () => wrap(await h.services.pool.connect())) as typeof pool.connect;
    const secrets = new SecretStore(new DataKeys(pool, Keyring.fromSetting(h.keyringFile)), () => new Date());
    const vault = new Vault(pool, secrets);
    // A value alice stores, pasted where a name goes: never written as given while unchecked.
    const pasted = 'sk_shared_first_value';
    const callers = Array.from({ length: 4 }, () => as(alice));
    const results = await Promise.all([
      settle(vault.get(callers[0]!, { name: pasted })),
      settle(vault.get(callers[1]!, { id: ids.shared! })),
      settle(vault.remove(callers[2]!, { name: pasted })),
      settle(vault.store(callers[3]!, { name: pasted, kind: 'api_key', value: h.secret(`sk_unchecked_${randomUUID()}`), rotation: { provider: 'generated', settings: {}, periodDays: 90 } })),
    ]);
    expect(results.map((r) => ('error' in r ? (r.error as { code?: string }).code : 'ok'))).toEqual(['57014', '57014', '57014', '57014']);
    const rows = await rowsOf(callers.map((c) => c.requestId!));
    const byCall = callers.map((c) => rows.find((r) => r.request_id === c.requestId));
    expect(byCall.map((r) => [r?.action, r?.outcome])).toEqual([
      ['vault.get', 'failed'],
      ['vault.get', 'failed'],
      ['credential.delete', 'failed'],
      ['vault.store', 'failed'],
    ]);
    // Before, each was written as given: the pasted value in three permanent rows.
    expect(byCall.map((r) => [r!.detail.nameWithheld ?? r!.detail.refWithheld, r!.detail.name ?? r!.detail.ref])).toEqual([
      ['unchecked', undefined],
      ['unchecked', undefined],
      ['unchecked', undefined],
      ['unchecked', undefined],
    ]);
    expect(JSON.stringify(byCall)).not.toContain(pasted);
    // A change whose lookup found the credential, failing after, still names it (checked: one of the caller's).
    const caller = as(alice);
    failing = /^UPDATE credentials SET updated_at/;
    await expect(vault.update(caller, { name: 'plain' }, { tags: ['x'] })).rejects.toMatchObject({ code: '57014' });
    expect((await rowsOf([caller.requestId!]))[0]).toMatchObject({ action: 'credential.update', outcome: 'failed', credential_id: ids.plain, detail: { name: 'plain' } });

    // Grants, the same (before, the grantee and the grant id were written as given, and the credential not at all).
    const grants = new Grants(pool, secrets);
    const granting = [as(alice), as(alice), as(alice)];
    failing = /FROM credentials WHERE identity_id = \$1 AND deleted_at IS NULL/;
    await expect(grants.create(granting[0]!, { name: pasted }, pasted)).rejects.toMatchObject({ code: '57014' });
    failing = /FROM identities WHERE/;
    await expect(grants.create(granting[1]!, { name: 'plain' }, pasted)).rejects.toMatchObject({ code: '57014' });
    failing = /^UPDATE grants g SET revoked_at/;
    const uuidPasted = randomUUID();
    await expect(grants.revoke(granting[2]!, uuidPasted)).rejects.toMatchObject({ code: '57014' });
    const grantRows = await rowsOf(granting.map((c) => c.requestId!));
    expect(grantRows.map((r) => [r.action, r.outcome, r.credential_id, r.detail])).toEqual([
      ['grant.create', 'failed', null, expect.objectContaining({ nameWithheld: 'unchecked', granteeWithheld: 'unchecked' })],
      ['grant.create', 'failed', ids.plain, expect.objectContaining({ name: 'plain', granteeWithheld: 'unchecked' })],
      ['grant.revoke', 'failed', null, expect.objectContaining({ grantIdWithheld: 'unchecked' })],
    ]);
    expect(JSON.stringify(grantRows)).not.toContain(pasted);
    expect(JSON.stringify(grantRows)).not.toContain(uuidPasted);
  });

  it('a batch whose audit rows cannot be written hands out nothing: every call is a 503', async () => {
    await h.sql(`CREATE TRIGGER audit_refuse_batch BEFORE INSERT ON audit_log FOR EACH ROW WHEN (NEW.action = 'vault.get') EXECUTE FUNCTION audit_log_refuse()`);
    const lastRead = async () => (await h.services.vault.describe(alice.id, ids.shared!)).lastAccessedAt;
    const before = await lastRead();
    let results;
    try {
      const vault = h.services.vault;
      results = await Promise.all(Array.from({ length: 8 }, () => settle(vault.get(as(alice), { name: 'shared' }))));
    } finally {
      await h.sql('DROP TRIGGER IF EXISTS audit_refuse_batch ON audit_log');
    }
    expect(results.map((r) => ('error' in r ? r.error.status : 'ok'))).toEqual(Array(8).fill(503));
    for (const r of results) expect(JSON.stringify(r)).not.toMatch(/sk_shared/);
    expect(await lastRead()).toEqual(before);
    expect((await h.services.vault.get(as(alice), { name: 'shared' })).value).toBe('sk_shared_second_value');
  });

  it('a batch whose ok rows are refused audits each call\'s failure with the credential, version and owner its read found', async () => {
    // Only the ok rows are refused: the failure rows go in, and show in the credential's trail.
    await h.sql(`CREATE TRIGGER audit_refuse_ok BEFORE INSERT ON audit_log FOR EACH ROW WHEN (NEW.action = 'vault.get' AND NEW.outcome = 'ok') EXECUTE FUNCTION audit_log_refuse()`);
    const callers = [as(alice), as(bob)];
    let results;
    try {
      results = await Promise.all(callers.map((caller) => settle(h.services.vault.get(caller, { id: ids.shared! }))));
    } finally {
      await h.sql('DROP TRIGGER IF EXISTS audit_refuse_ok ON audit_log');
    }
    expect(results.map((r) => ('error' in r ? r.error.status : 'ok'))).toEqual([503, 503]);
    const rows = await rowsOf(callers.map((c) => c.requestId!));
    // Before, each row named neither the credential nor the version, and bob's not its owner.
    expect(rows.map((r) => [r.request_id, r.outcome, r.credential_id, r.detail.version, r.detail.grantedBy])).toEqual([
      [callers[0]!.requestId, 'failed', ids.shared, 2, undefined],
      [callers[1]!.requestId, 'failed', ids.shared, 2, alice.id],
    ]);
  });

  it('/metrics counts the batches and the calls they carried', async () => {
    const counts = async () => {
      const text = (await h.api('GET', '/metrics')).text;
      const value = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1]);
      return { batches: value('mailgent_vault_read_batches_total'), calls: value('mailgent_vault_read_batch_calls_total') };
    };
    const before = await counts();
    const reads = await Promise.all(Array.from({ length: 12 }, () => h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'shared' } })));
    expect(reads.map((r) => r.status)).toEqual(Array(12).fill(200));
    const after = await counts();
    expect(after.calls - before.calls).toBe(12);
    expect(after.batches - before.batches).toBeGreaterThanOrEqual(1);
    expect(after.batches - before.batches).toBeLessThanOrEqual(12);
  });

  it('the read statement is a function that runs on one generic plan, not planned anew for every batch', async () => {
    // As a prepared statement PostgreSQL planned the read for every batch (a custom plan always looked
    // cheaper), which cost more than running it; the migration's function keeps one generic plan.
    const { rows } = await h.sql(`SELECT p.proconfig, p.provolatile, l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.proname = 'vault_read_batch'`);
    expect(rows).toEqual([{ proconfig: ['plan_cache_mode=force_generic_plan'], provolatile: 's', lanname: 'plpgsql' }]);
    // Calls by name, by id, by version and for nothing come back in call order (row i for call i).
    const { rows: found } = await h.sql(`SELECT i, name, version FROM vault_read_batch($1, $2, $3, $4) ORDER BY i`, [
      [alice.id, alice.id, bob.id, alice.id],
      ['shared', null, null, 'missing'],
      [null, ids.plain, ids.shared, null],
      [null, null, 1, null],
    ]);
    expect(found).toEqual([
      { i: '1', name: 'shared', version: 2 },
      { i: '2', name: 'plain', version: 1 },
      { i: '3', name: 'shared', version: 1 },
    ]);
  });

  it('a reference the database cannot take is refused on its own and does not break the batch', async () => {
    const vault = h.services.vault;
    const results = await Promise.all([
      settle(vault.get(as(alice), { name: 'shared' })),
      settle(vault.get(as(alice), { id: 'not-a-uuid' })),
      settle(vault.get(as(alice), { name: 'nul\u0000name' })),
      settle(vault.get(as(alice), { name: 'shared' }, 0)),
      settle(vault.get(as(alice), { name: 'lone-\ud800-surrogate' })),
      settle(vault.get(as(alice), { name: 'paired-\ud83d\ude00-surrogates' })),
      settle(vault.get(as(alice), { name: 'shared' })),
    ]);
    // The well-formed emoji is storable, so it is looked up like any name (and not found).
    expect(results.map((r) => ('error' in r ? r.error.status : 'ok'))).toEqual(['ok', 422, 422, 422, 422, 404, 'ok']);
  });
});
