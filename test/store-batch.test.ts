import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AppError } from '../core/errors';
import { verifyAuditChain } from '../vault/audit';
import pg, { type Pool } from 'pg';
import { createPool } from '../db/pool';
import { DataKeys } from '../vault/data-keys';
import { Keyring } from '../vault/keyring';
import { SecretStore } from '../vault/secret-store';
import type { Caller } from '../vault/types';
import { Vault } from '../vault/vault';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * Concurrent stores share one transaction (vault/store-batch.ts). Calls started in the same tick are
 * deterministic: the first starts a batch alone, the others queue and make the next, a name at most
 * once per batch.
 */
describe('group commit of stores', () => {
  let h: Harness;
  let alice: { id: string; token: string; name: string };
  const as = (who: { id: string }): Caller => ({ identityId: who.id, actor: `identity:${who.id}`, requestId: randomUUID() });
  const settle = <T>(p: Promise<T>) => p.then((value) => ({ value }), (error: unknown) => ({ error: error as AppError }));
  const outcome = (r: { value: unknown } | { error: AppError }) => ('error' in r ? r.error.status : 'ok');
  const rowsOf = async (requestIds: string[]) => {
    const { rows } = await h.sql(
      `SELECT request_id, outcome, credential_id, detail, xmin::text AS tx FROM audit_log WHERE request_id = ANY($1) ORDER BY seq`,
      [requestIds],
    );
    return { inSeq: rows, byCall: requestIds.map((id) => rows.find((r) => r.request_id === id)!) };
  };
  // Lets a finished batch release the batcher, so the next calls start from an idle one.
  const idle = () => new Promise((resolve) => setImmediate(resolve));
  /**
   * Fails every COMMIT that stored a version of a credential named like `pattern`: a check PostgreSQL
   * runs only at COMMIT (a deferred constraint trigger). Returns how to remove it.
   */
  const failAtCommit = async (pattern: string) => {
    await h.sql(`CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF EXISTS (SELECT 1 FROM credentials WHERE id = NEW.credential_id AND name LIKE '${pattern}') THEN
          RAISE EXCEPTION 'refused at commit';
        END IF;
        RETURN NULL;
      END $$`);
    await h.sql(`CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON secret_versions DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION fail_at_commit()`);
    return async () => {
      await h.sql('DROP TRIGGER fail_at_commit ON secret_versions');
      await h.sql('DROP FUNCTION fail_at_commit()');
    };
  };
  const currentVersion = async (identityId: string, name: string) =>
    (await h.sql('SELECT current_version FROM credentials WHERE identity_id = $1 AND name = $2 AND destroyed_at IS NULL', [identityId, name])).rows[0]?.current_version;

  beforeAll(async () => {
    h = await startHarness();
    alice = await h.createIdentity('alice-sb');
    const vault = h.services.vault;
    for (let i = 0; i < 10; i++) await vault.store(as(alice), { name: `existing-${i}`, kind: 'api_key', value: h.secret(`sk_existing_${i}_v1`) });
    await vault.store(as(alice), { name: 'a-password', kind: 'password', value: h.secret('a-password-value-v1') });
    await vault.store(as(alice), { name: 'gone', kind: 'api_key', value: h.secret('sk_gone_value_v1') });
    await vault.remove(as(alice), { name: 'gone' });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('a new name that is a value the caller stores (or the value it comes with) is refused inside the batch, its name withheld: the rest of the batch commits as it would have, no fallback', async () => {
    const vault = h.services.vault;
    const secret = h.secret(`sk_live_51H${randomUUID().replace(/-/g, '')}`);
    await vault.store(as(alice), { name: 'batch-secret-holder', kind: 'api_key', value: secret });
    const older = h.secret(`sk_older_${randomUUID()}`);
    await vault.store(as(alice), { name: 'batch-existing', kind: 'api_key', value: older });
    const same = h.secret(`sk_same_${randomUUID()}`);
    await idle();
    const before = vault.storeBatchStats();
    const calls = [
      { name: `batch-fresh-a-${randomUUID()}`, kind: 'api_key' as const, value: h.secret(`sk_fresh_a_${randomUUID()}`) },
      { name: `batch-fresh-b-${randomUUID()}`, kind: 'api_key' as const, value: h.secret(`sk_fresh_b_${randomUUID()}`) },
      { name: secret, kind: 'api_key' as const, value: h.secret(`sk_other_${randomUUID()}`) },
      { name: 'batch-existing', kind: 'api_key' as const, value: h.secret(`sk_newer_${randomUUID()}`) },
      { name: same, kind: 'api_key' as const, value: same },
      // (An older version of a credential's is a value it stores too; with expectedVersion for a credential there is not.)
      { name: older, kind: 'api_key' as const, value: h.secret(`sk_other_${randomUUID()}`), expectedVersion: 2 },
    ];
    const callers = calls.map(() => as(alice));
    const results = await Promise.all(calls.map((input, i) => settle(vault.store(callers[i]!, input))));
    expect(results.map(outcome)).toEqual(['ok', 'ok', 422, 'ok', 422, 422]);
    for (const i of [2, 4, 5]) expect(JSON.stringify((results[i] as { error: AppError }).error.message)).not.toContain(calls[i]!.name);
    // The first call alone, the rest in one batch: nothing fell back to storing alone.
    expect(vault.storeBatchStats()).toEqual({ batches: before.batches + 2, calls: before.calls + calls.length, fallbacks: before.fallbacks });
    const { byCall } = await rowsOf(callers.map((c) => c.requestId!));
    expect(byCall.slice(2).every((r) => r.tx === byCall[1].tx)).toBe(true);
    for (const i of [2, 4, 5]) expect(byCall[i]).toMatchObject({ outcome: 'rejected', credential_id: null, detail: { nameWithheld: 'stored-value', error: 'unprocessable', status: 422 } });
    expect((await h.sql('SELECT count(*)::int AS n FROM credentials WHERE name = ANY($1)', [[secret, same, older]])).rows[0].n).toBe(0);
    expect(await currentVersion(alice.id, calls[0]!.name)).toBe(1);
    expect(await currentVersion(alice.id, 'batch-existing')).toBe(2);
  });

  it('thirty mixed stores commit in two transactions; each gets its own answer and its own audit row, refusals write nothing', async () => {
    const vault = h.services.vault;
    const before = vault.storeBatchStats();
    const calls = [
      ...Array.from({ length: 10 }, (_, i) => ({ name: `fresh-${i}`, kind: 'api_key' as const, value: h.secret(`sk_fresh_${i}_${randomUUID()}`) })),
      ...Array.from({ length: 10 }, (_, i) => ({ name: `existing-${i}`, kind: 'api_key' as const, value: h.secret(`sk_existing_${i}_v2_${randomUUID()}`), expectedVersion: i < 5 ? 1 : undefined })),
      { name: 'existing-x', kind: 'api_key' as const, value: h.secret(`sk_absent_${randomUUID()}`), expectedVersion: 3 },
      { name: 'a-password', kind: 'api_key' as const, value: h.secret(`sk_kind_change_${randomUUID()}`) },
      { name: 'gone', kind: 'api_key' as const, value: h.secret(`sk_deleted_${randomUUID()}`) },
      ...Array.from({ length: 7 }, (_, i) => ({ name: `stale-${i}`, kind: 'token' as const, value: h.secret(`stale-token-${i}-${randomUUID()}`), expectedVersion: 0 })),
    ];
    // The stale-* names exist at version 1 already, so expectedVersion 0 is out of date for them.
    for (let i = 0; i < 7; i++) await vault.store(as(alice), { name: `stale-${i}`, kind: 'token', value: h.secret(`stale-token-${i}-first`) });
    await idle();
    const afterSetup = vault.storeBatchStats();
    const callers = calls.map(() => as(alice));
    const results = await Promise.all(calls.map((input, i) => settle(vault.store(callers[i]!, input))));

    expect(results.map(outcome)).toEqual([...Array(20).fill('ok'), 409, 422, 409, ...Array(7).fill(409)]);
    for (const [i, r] of results.slice(0, 10).entries()) expect(r).toMatchObject({ value: { name: `fresh-${i}`, version: 1 } });
    for (const [i, r] of results.slice(10, 20).entries()) expect(r).toMatchObject({ value: { name: `existing-${i}`, version: 2 } });
    expect((results[20] as { error: AppError }).error.message).toBe("credential 'existing-x' does not exist yet; expectedVersion must be 0 or absent");
    expect((results[21] as { error: AppError }).error.message).toBe("credential 'a-password' is a password; its kind cannot change to api_key");
    expect((results[22] as { error: AppError }).error.message).toMatch(/'gone' is deleted/);
    expect((results[23] as { error: AppError }).error.message).toBe("credential 'stale-0' is at version 1, not 0");
    expect(vault.storeBatchStats()).toEqual({ batches: afterSetup.batches + 2, calls: afterSetup.calls + calls.length, fallbacks: before.fallbacks });

    // One audit row per call, in two transactions: the first call alone, then every other one together.
    const { inSeq, byCall } = await rowsOf(callers.map((c) => c.requestId!));
    expect(inSeq).toHaveLength(calls.length);
    expect(new Set(byCall.map((r) => r.tx)).size).toBe(2);
    expect(byCall.slice(1).every((r) => r.tx === byCall[1].tx)).toBe(true);
    expect(byCall.map((r) => r.outcome)).toEqual([...Array(20).fill('ok'), 'conflict', 'rejected', 'conflict', ...Array(7).fill('conflict')]);
    expect(byCall[0].detail).toMatchObject({ name: 'fresh-0', version: 1 });
    expect(byCall[21].detail).toMatchObject({ name: 'a-password', error: 'unprocessable' });
    expect(byCall[20].credential_id).toBeNull();
    expect(byCall[21].credential_id).not.toBeNull();

    // Refused calls changed nothing; stored ones read back as stored.
    expect(await currentVersion(alice.id, 'a-password')).toBe(1);
    expect(await currentVersion(alice.id, 'existing-x')).toBeUndefined();
    for (let i = 0; i < 7; i++) expect(await currentVersion(alice.id, `stale-${i}`)).toBe(1);
    for (const [i, input] of calls.slice(0, 20).entries()) {
      const read = await vault.get(as(alice), { name: input.name });
      expect({ i, version: read.version, value: read.value }).toEqual({ i, version: input.name.startsWith('fresh') ? 1 : 2, value: input.value });
    }
    expect((await verifyAuditChain(h.services.pool)).ok).toBe(true);
  });

  it('one name stored many times at once gets consecutive versions, one batch each; with expectedVersion exactly one wins', async () => {
    const vault = h.services.vault;
    await idle();
    const values = Array.from({ length: 6 }, (_, i) => h.secret(`sk_same_name_${i}_${randomUUID()}`));
    const callers = values.map(() => as(alice));
    const stored = await Promise.all(values.map((value, i) => vault.store(callers[i]!, { name: 'same-name', kind: 'api_key', value })));
    expect(stored.map((s) => s.version)).toEqual([1, 2, 3, 4, 5, 6]);
    const { byCall } = await rowsOf(callers.map((c) => c.requestId!));
    expect(new Set(byCall.map((r) => r.tx)).size).toBe(6);
    for (const [i, value] of values.entries()) expect((await vault.get(as(alice), { name: 'same-name' }, i + 1)).value).toBe(value);

    const racers = Array.from({ length: 12 }, (_, i) => vault.store(as(alice), { name: 'same-name', kind: 'api_key', value: h.secret(`sk_racer_${i}_${randomUUID()}`), expectedVersion: 6 }));
    const raced = await Promise.all(racers.map(settle));
    expect(raced.filter((r) => outcome(r) === 'ok')).toHaveLength(1);
    expect(raced.filter((r) => outcome(r) === 409)).toHaveLength(11);
    expect(await currentVersion(alice.id, 'same-name')).toBe(7);
  });

  it('a batch that rolls back (its data key at its limit) stores every call alone: all stored once, the key rolled over once', async () => {
    // A second vault on the same database with a tiny limit (the service's default is 2^30).
    const dataKeys = new DataKeys(h.services.pool, Keyring.fromSetting(h.keyringFile), { maxEncryptions: 4 });
    const vault = new Vault(h.services.pool, new SecretStore(dataKeys, () => new Date()));
    const carol = await h.createIdentity('carol-sb');
    await vault.store(as(carol), { name: 'first', kind: 'generic', value: h.secret('carol-first-value') });
    await idle();
    // Five at once: one alone (the key's second encryption), then four together, which would make 2 + 4 > 4.
    const inputs = Array.from({ length: 5 }, (_, i) => ({ name: `burst-${i}`, kind: 'generic' as const, value: h.secret(`carol-burst-${i}-${randomUUID()}`) }));
    const callers = inputs.map(() => as(carol));
    const results = await Promise.all(inputs.map((input, i) => vault.store(callers[i]!, input)));
    expect(results.map((r) => r.version)).toEqual([1, 1, 1, 1, 1]);
    expect(vault.storeBatchStats()).toMatchObject({ batches: 3, calls: 6, fallbacks: 1 });

    const keys = await h.sql('SELECT id, encryptions, retired_at IS NOT NULL AS retired FROM data_keys WHERE identity_id = $1 ORDER BY created_at', [carol.id]);
    // 1 (first) + 1 (alone) + 2 of the four alone under the first key; the other 2 under its successor.
    expect(keys.rows.map((k) => [Number(k.encryptions), k.retired])).toEqual([
      [4, true],
      [2, false],
    ]);
    const { inSeq } = await rowsOf(callers.map((c) => c.requestId!));
    expect(inSeq.map((r) => r.outcome)).toEqual(Array(5).fill('ok'));
    for (const input of inputs) expect((await vault.get(as(carol), { name: input.name })).value).toBe(input.value);
    const versions = await h.sql('SELECT count(*)::int AS n FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.identity_id = $1', [carol.id]);
    expect(versions.rows[0].n).toBe(6);
  });

  it('a store whose COMMIT fails, in a batch or alone, is not stored again: every call gets a 503 that says it may have been committed, and its own failure row', async () => {
    // A COMMIT that stored one of this test's names fails.
    const removeCheck = await failAtCommit('commit-fails-%');
    try {
      const vault = h.services.vault;
      await idle();
      const before = vault.storeBatchStats();
      const callers = [as(alice), as(alice), as(alice)];
      const results = await Promise.all(
        callers.map((caller, i) => settle(vault.store(caller, { name: `commit-fails-${i}`, kind: 'api_key', value: h.secret(`sk_commit_fails_${i}_${randomUUID()}`) }))),
      );
      for (const r of results) {
        expect(r).toMatchObject({ error: { status: 503, extra: { unconfirmed: true } } });
        expect((r as { error: AppError }).error.message).toMatch(/^the store could not be confirmed: it may have been committed/);
      }
      // Two batches (the first call alone, then the other two), neither stored again alone.
      expect(vault.storeBatchStats()).toEqual({ ...before, batches: before.batches + 2, calls: before.calls + 3 });
      const { inSeq } = await rowsOf(callers.map((c) => c.requestId!));
      expect(inSeq.map((r) => [r.outcome, r.detail.error])).toEqual(Array(3).fill(['failed', 'unavailable']));
      // Each names the credential and version it would have stored, as a single store's row does
      // (before, a batch's rows named neither: the attempt was missing from the credential's trail).
      for (const r of inSeq) expect(r).toMatchObject({ credential_id: expect.stringMatching(/^[0-9a-f-]{36}$/), detail: { version: 1, unconfirmed: true } });
      expect((await h.sql(`SELECT count(*)::int AS n FROM credentials WHERE identity_id = $1 AND name LIKE 'commit-fails-%'`, [alice.id])).rows[0].n).toBe(0);

      // A store that sets policy commits alone: its failed COMMIT is answered the same way (before: a
      // 500, or "try again shortly" when the connection dropped, which could store it twice).
      const alone = as(alice);
      const failed = await settle(vault.store(alone, { name: 'commit-fails-alone', kind: 'api_key', value: h.secret(`sk_commit_fails_alone_${randomUUID()}`), owners: ['o@example.com'] }));
      expect(failed).toMatchObject({ error: { status: 503, extra: { unconfirmed: true } } });
      expect((failed as { error: AppError }).error.message).toMatch(/^the store could not be confirmed: it may have been committed/);
      const { inSeq: aloneRows } = await rowsOf([alone.requestId!]);
      expect(aloneRows.map((r) => [r.outcome, r.detail.error, r.detail.unconfirmed])).toEqual([['failed', 'unavailable', true]]);
    } finally {
      await removeCheck();
    }
  });

  it('a batch whose COMMIT fails answers only the calls that would have stored as unconfirmed; those it refused (which stored nothing) get a plain 503', async () => {
    const removeCheck = await failAtCommit('commit-fails-beside-%');
    const pastedName = h.secret(`sk_beside_named_${randomUUID().replaceAll('-', '')}`);
    try {
      const vault = h.services.vault;
      await idle();
      const before = vault.storeBatchStats();
      const existing = await currentVersion(alice.id, 'existing-0');
      // The first call makes a batch alone; the other five make the next, one of them stored and four refused.
      const calls = [
        { name: 'commit-fails-beside-0', kind: 'api_key' as const, value: h.secret(`sk_beside_0_${randomUUID()}`) },
        { name: 'commit-fails-beside-1', kind: 'api_key' as const, value: h.secret(`sk_beside_1_${randomUUID()}`) },
        { name: 'a-password', kind: 'api_key' as const, value: h.secret(`sk_beside_kind_${randomUUID()}`) },
        { name: 'gone', kind: 'api_key' as const, value: h.secret(`sk_beside_deleted_${randomUUID()}`) },
        { name: `never-${randomUUID()}`, kind: 'api_key' as const, value: h.secret(`sk_beside_absent_${randomUUID()}`), expectedVersion: 2 },
        { name: 'existing-0', kind: 'api_key' as const, value: h.secret(`sk_beside_stale_${randomUUID()}`), expectedVersion: 99 },
        // A new name that is the value it comes with: refused inside the batch, its name withheld.
        { name: pastedName, kind: 'api_key' as const, value: pastedName },
      ];
      const callers = calls.map(() => as(alice));
      const results = await Promise.all(calls.map((input, i) => settle(vault.store(callers[i]!, input))));
      expect(vault.storeBatchStats()).toEqual({ ...before, batches: before.batches + 2, calls: before.calls + calls.length });

      for (const r of results.slice(0, 2)) {
        expect(r).toMatchObject({ error: { status: 503, slug: 'unavailable', extra: { unconfirmed: true } } });
        expect((r as { error: AppError }).error.message).toMatch(/^the store could not be confirmed: it may have been committed/);
      }
      // Before: each of these was told it "may have been committed" too, though it could never store anything.
      for (const r of results.slice(2)) {
        expect(r).toMatchObject({ error: { status: 503, slug: 'unavailable' } });
        expect((r as { error: AppError }).error.extra.unconfirmed).toBeUndefined();
        expect((r as { error: AppError }).error.message).toMatch(/^the store could not be answered .*it stored nothing: try again shortly$/);
      }
      const { byCall } = await rowsOf(callers.map((c) => c.requestId!));
      expect(byCall.map((r) => [r.outcome, r.detail.error, r.detail.unconfirmed ?? false])).toEqual([
        ['failed', 'unavailable', true],
        ['failed', 'unavailable', true],
        ...Array(5).fill(['failed', 'unavailable', false]),
      ]);
      // Before, the failure row of the call refused for its name carried the name as given.
      expect(byCall.at(-1)!.detail).toMatchObject({ nameWithheld: 'stored-value' });
      expect(JSON.stringify(byCall)).not.toContain(pastedName);
      expect((await h.sql(`SELECT count(*)::int AS n FROM credentials WHERE identity_id = $1 AND name LIKE 'commit-fails-beside-%'`, [alice.id])).rows[0].n).toBe(0);
      expect(await currentVersion(alice.id, 'existing-0')).toBe(existing);
    } finally {
      await removeCheck();
    }
  });

  it('two processes storing the same names of two identities in opposite orders never deadlock: no batch rolls back', async () => {
    // Two vaults on one database, each with a pool of its own, as two API processes: each batches on its own.
    const pools = [createPool(h.databaseUrl, 2), createPool(h.databaseUrl, 2)];
    const vaultOf = (pool: Pool) => new Vault(pool, new SecretStore(new DataKeys(pool, Keyring.fromSetting(h.keyringFile)), () => new Date()));
    const [one, two] = pools.map(vaultOf) as [Vault, Vault];
    const people = [await h.createIdentity('dave-sb'), await h.createIdentity('erin-sb')];
    const names = people.flatMap((who) => Array.from({ length: 12 }, (_, i) => ({ who, name: `shared-${i}` })));
    const storeAll = (vault: Vault, order: typeof names) =>
      order.map(({ who, name }) => vault.store(as(who), { name, kind: 'generic', value: h.secret(`${name}-${randomUUID()}`) }));
    await Promise.all(storeAll(one, names));
    await idle();

    // Both batches are made to meet: a third party holds one row in the middle while they start, so
    // each locks what it can and waits there. One takes the names first to last, the other last to
    // first; unsorted, each would then hold rows the other needs next (a deadlock, one rolled back).
    const holder = new pg.Client({ connectionString: h.databaseUrl });
    await holder.connect();
    await holder.query('BEGIN');
    await holder.query(`SELECT 1 FROM credentials WHERE identity_id = $1 AND name = 'shared-5' FOR UPDATE`, [people[0]!.id]);
    const all = Promise.all([...storeAll(one, names), ...storeAll(two, [...names].reverse())]);
    for (let i = 0; i < 200; i++) {
      const { rows } = await h.sql(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()`);
      if (rows[0].n >= 2) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    await holder.query('ROLLBACK');
    await holder.end();
    await all;
    await Promise.all(pools.map((p) => p.end()));

    expect(one.storeBatchStats().fallbacks + two.storeBatchStats().fallbacks).toBe(0);
    expect(one.storeBatchStats().calls + two.storeBatchStats().calls).toBe(names.length * 3);
    for (const who of people) {
      const { rows } = await h.sql('SELECT DISTINCT current_version FROM credentials WHERE identity_id = $1', [who.id]);
      expect(rows).toEqual([{ current_version: 3 }]);
    }
  });

  it('a batch locks its data key before it takes the audit chain lock (the order two statements took them in)', async () => {
    // Held by someone else, the chain lock stops the batch at its audit rows: by then, and only then,
    // the data key's row must be locked. The other way round, a batch holding the chain lock could
    // wait for a key that a store holding it waits to chain (a deadlock).
    const vault = h.services.vault;
    const frank = await h.createIdentity('frank-sb');
    await vault.store(as(frank), { name: 'first', kind: 'api_key', value: h.secret(`sk_first_${randomUUID()}`) });
    await idle();
    const keyId = (await h.sql('SELECT id FROM data_keys WHERE identity_id = $1 AND retired_at IS NULL', [frank.id])).rows[0].id;
    const chain = new pg.Client({ connectionString: h.databaseUrl });
    await chain.connect();
    await chain.query('SELECT pg_advisory_lock(4631800001)');
    try {
      const stored = Promise.all([
        vault.store(as(frank), { name: 'first', kind: 'api_key', value: h.secret(`sk_first_v2_${randomUUID()}`) }),
        vault.store(as(frank), { name: 'second', kind: 'api_key', value: h.secret(`sk_second_${randomUUID()}`) }),
      ]);
      let waiting = 0;
      for (let i = 0; i < 200 && waiting === 0; i++) {
        await new Promise((r) => setTimeout(r, 25));
        const { rows } = await h.sql(`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`);
        waiting = rows[0].n;
      }
      expect(waiting).toBe(1);
      const probe = await settle(h.sql('SELECT 1 FROM data_keys WHERE id = $1 FOR NO KEY UPDATE NOWAIT', [keyId]));
      expect('error' in probe && (probe.error as unknown as { code: string }).code).toBe('55P03'); // lock_not_available
      await chain.query('SELECT pg_advisory_unlock(4631800001)');
      expect((await stored).map((r) => r.version)).toEqual([2, 1]);
    } finally {
      await chain.end();
    }
  });

  it('a store that sets policy commits alone, beside a batch', async () => {
    const vault = h.services.vault;
    const callers = [as(alice), as(alice), as(alice), as(alice)];
    const inputs = [
      { name: 'plain-1', kind: 'api_key' as const, value: h.secret(`sk_plain_1_${randomUUID()}`) },
      { name: 'plain-2', kind: 'api_key' as const, value: h.secret(`sk_plain_2_${randomUUID()}`) },
      { name: 'owned', kind: 'api_key' as const, value: h.secret(`sk_owned_${randomUUID()}`), owners: ['ops@example.com'], tags: ['billing'] },
      { name: 'plain-3', kind: 'api_key' as const, value: h.secret(`sk_plain_3_${randomUUID()}`) },
    ];
    await idle();
    const before = vault.storeBatchStats();
    await Promise.all(inputs.map((input, i) => vault.store(callers[i]!, input)));
    expect(vault.storeBatchStats().calls - before.calls).toBe(3);
    const { byCall } = await rowsOf(callers.map((c) => c.requestId!));
    expect(byCall[1].tx).toBe(byCall[3].tx);
    expect(byCall[2].tx).not.toBe(byCall[1].tx);
    expect((await h.sql(`SELECT owners, tags FROM credentials WHERE identity_id = $1 AND name = 'owned'`, [alice.id])).rows[0]).toEqual({ owners: ['ops@example.com'], tags: ['billing'] });
  });
});
