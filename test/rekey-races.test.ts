import { randomBytes, randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { rekey } from '../cli/rekey';
import { loadConfig } from '../core/config';
import { createLogger } from '../core/logger';
import { openServices } from '../core/services';
import { createPool } from '../db/pool';
import { dataKeyAad, open, seal } from '../vault/crypto';
import { DataKeys } from '../vault/data-keys';
import { generateMasterKey, Keyring, masterKeyId, readKeyringFile, writeKeyringFile, type MasterKey } from '../vault/keyring';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * Key rotation against concurrent work: what rekey waits for before it re-wraps, and how the
 * re-wrap shares the data keys' rows with stores (cli/rekey.ts, DataKeys.rewrapAll).
 */

// Called inside writeKeyringFile, before the real write (so before its rename), when a test sets it.
const hooks = vi.hoisted(() => ({ beforeWrite: undefined as undefined | (() => void), writes: [] as { ids: string[]; current: string }[] }));
vi.mock('../vault/keyring', async (importOriginal) => {
  const actual = await importOriginal<typeof import('../vault/keyring')>();
  return {
    ...actual,
    writeKeyringFile: (...args: Parameters<typeof actual.writeKeyringFile>) => {
      const hook = hooks.beforeWrite;
      hooks.beforeWrite = undefined;
      hook?.();
      hooks.writes.push({ ids: args[1].map((k) => k.id), current: args[2] });
      actual.writeKeyringFile(...args);
    },
  };
});

const silent = createLogger({ level: 'silent' });
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Ids that sort after any random one (and each other in `n` order): the last rows a re-wrap takes, in id order. */
const highId = (n: number) => `ffffffff-ffff-4fff-bfff-${n.toString(16).padStart(12, '0')}`;
const lowId = (n: number) => `00000000-0000-4000-8000-${n.toString(16).padStart(12, '0')}`;

describe('rekey against concurrent work', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  const values: Record<string, string> = {};

  const store = async (who: { token: string }, name: string, value: string) => {
    values[name] = h.secret(value);
    return h.api('POST', '/v1/vault.store', { token: who.token, body: { name, kind: 'generic', value } });
  };
  const fileKeys = () => {
    const { keys, current } = readKeyringFile(h.keyringFile);
    return { keys, current: keys.find((k) => k.id === current)! };
  };
  /** What rekey does first: a new current key in the file, the old ones kept. */
  const addCurrentKey = () => {
    const before = fileKeys();
    const key = generateMasterKey();
    const next = { id: masterKeyId(key), key };
    writeKeyringFile(h.keyringFile, [next, ...before.keys], next.id);
    return { next, old: before.current, keyring: Keyring.fromSetting(h.keyringFile) };
  };
  /** Retired data keys of `identityId` wrapped by `master`, with 7 encryptions counted each; returns the keys themselves. */
  const addDataKeys = async (identityId: string, master: MasterKey, ids: string[]) => {
    const plain = ids.map(() => randomBytes(32));
    await h.sql(
      `INSERT INTO data_keys (id, identity_id, master_key_id, wrapped, retired_at, encryptions)
       SELECT id, $2, $3, w, now(), 7 FROM unnest($1::uuid[], $4::bytea[]) WITH ORDINALITY AS t(id, w, n) ORDER BY n`,
      [ids, identityId, master.id, ids.map((id, i) => seal(master.key, plain[i]!, dataKeyAad(identityId, id)))],
    );
    return new Map(ids.map((id, i) => [id, plain[i]!]));
  };
  /** The backend of a statement (matched by `pattern`, a LIKE parameter, so this query never matches itself) once it waits on a row lock. */
  const waitingOnLock = async (pattern: string): Promise<number> => {
    for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(20)) {
      const { rows } = await h.sql("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1 AND pid <> pg_backend_pid()", [pattern]);
      if (rows[0]) return rows[0].pid as number;
    }
    throw new Error(`no statement like ${pattern} came to wait on a lock`);
  };
  const restartedReadsEverything = async () => {
    const restarted = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(h.keyringFile), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      expect(await restarted.dataKeys.missingMasterKeys()).toEqual([]);
      for (const [name, value] of Object.entries(values)) {
        const owner = (await h.sql('SELECT identity_id FROM credentials WHERE name = $1', [name])).rows[0].identity_id as string;
        expect((await restarted.vault.get({ identityId: owner, actor: 'test' }, { name })).value).toBe(value);
      }
    } finally {
      await restarted.close();
    }
  };

  /**
   * Starts rekey; answers ({run}: an object, so its run is not awaited with it) once it has finished, or once it is seen waiting for transactions
   * begun before its new key was written: it asked twice whether they are still open.
   */
  const rekeyFinishedOrWaiting = async () => {
    const run = rekey(loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl }), silent);
    const settled = run.then(
      () => 'rekey finished',
      () => 'rekey failed',
    );
    const polls = new Set<string>();
    for (const deadline = Date.now() + 10_000; polls.size < 2 && Date.now() < deadline; ) {
      const { rows } = await h.sql('SELECT query_start::text AS at FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()', ['%xact_start < $1::timestamptz%']);
      for (const r of rows) polls.add(r.at);
      if ((await Promise.race([settled, sleep(20)])) !== undefined) break;
    }
    return { run };
  };

  beforeAll(async () => {
    h = await startHarness();
    agent = await h.createIdentity();
    expect((await store(agent, 'before-any-rekey', 'value-before-any-rekey')).status).toBe(201);
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('the re-wrap locks data keys in id order, as a store batch does: the two wait on each other, never deadlock', async () => {
    const { next, old, keyring } = addCurrentKey();
    // The key with the highest id goes in first, so a scan of the table (not in id order) meets it first.
    await addDataKeys(agent.id, old, [highId(1)]);
    await addDataKeys(agent.id, old, [lowId(1)]);
    const pool = createPool(h.databaseUrl, 2);
    const batch = new pg.Client({ connectionString: h.databaseUrl });
    await batch.connect();
    try {
      // A store batch holds the lowest key (it locks its keys in id order: vault/secret-store.ts)...
      await batch.query('BEGIN');
      await batch.query('SELECT id FROM data_keys WHERE id = $1 FOR NO KEY UPDATE', [lowId(1)]);
      const rekeying = new DataKeys(pool, keyring);
      const rewrap = rekeying.rewrapAll();
      rewrap.catch(() => undefined);
      await waitingOnLock('%FROM data_keys%');
      // ...and goes on to the highest: the re-wrap, waiting for the lowest, holds none after it.
      await batch.query("SET LOCAL lock_timeout = '5s'");
      await expect(batch.query('SELECT id FROM data_keys WHERE id = $1 FOR NO KEY UPDATE', [highId(1)])).resolves.toMatchObject({ rowCount: 1 });
      await batch.query('COMMIT');
      const { rewrapped, masterKeysInUse } = await rewrap;
      expect(rewrapped).toBeGreaterThanOrEqual(3);
      expect(masterKeysInUse).toEqual([next.id]);
      // The keys it opened were zeroed and dropped, not kept in its cache (every identity's key, in a large vault).
      expect((rekeying as unknown as { byId: Map<string, unknown> }).byId.size).toBe(0);
    } finally {
      await batch.end();
      await pool.end();
    }
  });

  it('re-wraps in chunks, each committed: a store waits for one chunk at most, and a crash between chunks leaves everything readable', async () => {
    const other = await h.createIdentity();
    expect((await store(other, 'other-before-chunks', 'other-value-before-chunks')).status).toBe(201);
    const held = fileKeys().keys.map((k) => k.id);
    const { next, old, keyring } = addCurrentKey();
    const ids = Array.from({ length: 25 }, (_, i) => highId(100 + i));
    await addDataKeys(agent.id, old, ids);
    const toRewrap = (await h.sql('SELECT count(*)::int AS n FROM data_keys WHERE master_key_id <> $1', [next.id])).rows[0].n as number;
    const lastChunk = toRewrap % 10 || 10;
    const pool = createPool(h.databaseUrl, 2);
    const batch = new pg.Client({ connectionString: h.databaseUrl });
    await batch.connect();
    try {
      // A store holds the key with the highest id: the re-wrap's last chunk waits for it.
      await batch.query('BEGIN');
      await batch.query('SELECT id FROM data_keys WHERE id = $1 FOR NO KEY UPDATE', [ids.at(-1)]);
      const rewrap = new DataKeys(pool, keyring).rewrapAll({ chunkSize: 10 });
      rewrap.catch(() => undefined);
      const rewrapPid = await waitingOnLock('%FROM data_keys%');

      // Every chunk before it is committed, and its keys free: a store under one of them goes through.
      expect((await h.sql('SELECT count(*)::int AS n FROM data_keys WHERE master_key_id = $1', [next.id])).rows[0].n).toBe(toRewrap - lastChunk);
      const stored = await Promise.race([store(other, 'other-during-rewrap', 'other-value-during-rewrap'), sleep(5_000).then(() => 'still waiting')]);
      expect(stored).toMatchObject({ status: 201 });

      // The re-wrap dies there (its connection ends, as in a crash): what it committed stays, the rest is rolled back.
      await h.sql('SELECT pg_terminate_backend($1)', [rewrapPid]);
      await expect(rewrap).rejects.toThrow();
      await batch.query('ROLLBACK');
      const byMaster = (await h.sql('SELECT master_key_id AS id, count(*)::int AS n FROM data_keys GROUP BY 1')).rows;
      expect(Object.fromEntries(byMaster.map((r) => [r.id, r.n]))).toEqual({ [old.id]: lastChunk, [next.id]: toRewrap - lastChunk });
      // The keyring file still holds both keys: a restarted service reads everything.
      expect(readKeyringFile(h.keyringFile).keys.map((k) => k.id)).toEqual([next.id, ...held]);
      await restartedReadsEverything();
    } finally {
      await batch.end();
      await pool.end();
    }

    // Run again, rekey finishes the job and drops both keys it no longer needs.
    const result = await rekey(loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl }), silent);
    expect(result.retiredMasterKeys.sort()).toEqual([next.id, ...held].sort());
    expect(readKeyringFile(h.keyringFile).keys.map((k) => k.id)).toEqual([result.newMasterKeyId]);
    await restartedReadsEverything();
  });

  it('rekey re-wraps more keys than one chunk holds, chunk by chunk in id order, leaving the keys and their counts as they were (the active ones retired for new ones)', async () => {
    const { current: old } = fileKeys();
    const ids = Array.from({ length: 1100 }, () => randomUUID());
    const plain = await addDataKeys(agent.id, old, ids);
    const before = new Map((await h.sql('SELECT id, encryptions, retired_at, created_at FROM data_keys')).rows.map((r) => [r.id as string, r]));

    const result = await rekey(loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl }), silent);

    expect(result.rewrapped).toBe(before.size);
    expect(result.retiredMasterKeys).toEqual([old.id]);
    const { keys, current } = fileKeys();
    expect(keys.map((k) => k.id)).toEqual([current.id]);
    const all = (await h.sql('SELECT id, identity_id, master_key_id, wrapped, encryptions, retired_at, created_at, xmin::text AS tx FROM data_keys ORDER BY id')).rows;
    // The keys active before (each identity's) are retired, and each identity has a new one.
    const renewed = new Set([...before].filter(([, r]) => r.retired_at === null).map(([id]) => id));
    expect(renewed.size).toBeGreaterThan(0);
    expect(result.renewed).toBe(renewed.size);
    const made = all.filter((r) => !before.has(r.id));
    expect(made).toHaveLength(renewed.size);
    for (const row of made) expect({ retired: row.retired_at !== null, master: row.master_key_id }).toEqual({ retired: false, master: current.id });
    const after = all.filter((r) => before.has(r.id));
    expect(after).toHaveLength(before.size);
    for (const row of after) {
      expect(row.master_key_id).toBe(current.id);
      const { encryptions, retired_at, created_at } = before.get(row.id)!;
      expect({ encryptions: row.encryptions, created_at: row.created_at }).toEqual({ encryptions, created_at });
      if (renewed.has(row.id)) expect(row.retired_at).not.toBeNull();
      else expect(row.retired_at).toEqual(retired_at);
      const key = plain.get(row.id);
      if (key) expect(open(current.key, row.wrapped, dataKeyAad(row.identity_id, row.id), 'data key').equals(key)).toBe(true);
    }
    // One transaction per 500 keys, each over a run of ids (the renewed ones were written again after).
    const chunks = [after.slice(0, 500), after.slice(500, 1000), after.slice(1000)].map((c) => new Set(c.filter((r) => !renewed.has(r.id)).map((r) => r.tx as string)));
    expect(chunks.map((c) => c.size)).toEqual([1, 1, 1]);
    expect(new Set(chunks.flatMap((c) => [...c])).size).toBe(3);
    await restartedReadsEverything();
  });

  it('rekey run as a role that cannot see other roles\' transactions waits for theirs all the same', async () => {
    const tag = randomBytes(4).toString('hex');
    const [rekeyer, other] = [`mg_rekeyer_${tag}`, `mg_other_${tag}`];
    const [rekeyerPw, otherPw] = [h.secret(randomBytes(12).toString('hex')), h.secret(randomBytes(12).toString('hex'))];
    const owner = decodeURIComponent(new URL(h.databaseUrl).username);
    // A role with the owner's privileges on the tables (not a superuser, not pg_read_all_stats), and a
    // service's session under another role in a transaction (one that wrapped under the old key, say):
    // to the first, pg_stat_activity shows that session without its transaction's start.
    await h.sql(`CREATE ROLE ${rekeyer} LOGIN PASSWORD '${rekeyerPw}' IN ROLE ${pg.escapeIdentifier(owner)}`);
    await h.sql(`CREATE ROLE ${other} LOGIN PASSWORD '${otherPw}'`);
    const as = (role: string, password: string) => {
      const url = new URL(h.databaseUrl);
      url.username = role;
      url.password = password;
      return url.href;
    };
    const service = new pg.Client({ connectionString: as(other, otherPw) });
    await service.connect();
    try {
      const { current: old } = fileKeys();
      await service.query('BEGIN');
      await service.query('SELECT 1');
      let settled = false;
      const run = rekey(loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: as(rekeyer, rekeyerPw) }), silent).finally(() => (settled = true));
      run.catch(() => undefined);
      // Given 3 s (a rekey with nothing to wait for takes well under one here), it is still waiting.
      await Promise.race([run.catch(() => undefined), sleep(3_000)]);
      // Before, it saw no transaction of that session and went on: re-wrapped and dropped the old key while it was open.
      expect(settled).toBe(false);
      await service.query('COMMIT');
      const result = await run;
      expect(result.retiredMasterKeys).toEqual([old.id]);
      await restartedReadsEverything();
    } finally {
      await service.end();
      await h.sql(`DROP ROLE ${rekeyer}`);
      await h.sql(`DROP ROLE ${other}`);
    }
  });

  it('rekey writes its new key beside the old current one, synced, before it makes it current', async () => {
    const { current: old } = fileKeys();
    hooks.writes = [];
    const result = await rekey(loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl }), silent);
    const created = result.newMasterKeyId;
    // Before, the first write made it current at once: visible to the services before its directory was synced.
    expect(hooks.writes.slice(0, 2)).toEqual([
      { ids: [created, old.id], current: old.id },
      { ids: [created, old.id], current: created },
    ]);
    expect(hooks.writes.at(-1)).toEqual({ ids: [created], current: created });
    await restartedReadsEverything();
  });

  it('rekey waits for a transaction begun before the new key was written, even while the write was being synced', async () => {
    const { current: old } = fileKeys();
    // A service's transaction: it read the current key just before rekey renamed the new file into
    // place, and wraps a new data key with it (Identities.create, DataKeys.rollOver). It runs in a
    // thread of its own, so it can begin while rekey is inside writeKeyringFile.
    const late = await h.createIdentity();
    const id = randomUUID();
    const wrapped = seal(old.key, randomBytes(32), dataKeyAad(late.id, id));
    const signal = new Int32Array(new SharedArrayBuffer(4));
    const service = new Worker(
      `const { parentPort, workerData } = require('node:worker_threads');
       const pg = require(workerData.pg);
       const signal = workerData.signal;
       const client = new pg.Client({ connectionString: workerData.url });
       const connected = client.connect();
       parentPort.on('message', async (msg) => {
         try {
           if (msg === 'begin') {
             await connected;
             await client.query('BEGIN');
             await client.query("INSERT INTO data_keys (id, identity_id, master_key_id, wrapped) VALUES ($1, $2, $3, $4)",
               [workerData.id, workerData.identityId, workerData.masterKeyId, Buffer.from(workerData.wrapped)]);
             Atomics.store(signal, 0, 1);
           } else {
             await client.query('COMMIT');
             await client.end();
             parentPort.postMessage('committed');
           }
         } catch (err) {
           Atomics.store(signal, 0, 2);
           parentPort.postMessage(String(err));
         }
         Atomics.notify(signal, 0);
       });`,
      { eval: true, workerData: { pg: createRequire(import.meta.url).resolve('pg'), signal, url: h.databaseUrl, id, identityId: late.id, masterKeyId: old.id, wrapped } },
    );
    const ended = new Promise((resolve) => service.once('message', resolve));
    try {
      hooks.beforeWrite = () => {
        service.postMessage('begin');
        Atomics.wait(signal, 0, 0, 10_000);
        if (signal[0] !== 1) throw new Error('the service transaction did not begin');
      };
      // The service commits once rekey has finished (it did not wait), or once rekey is seen waiting.
      const { run } = await rekeyFinishedOrWaiting();
      service.postMessage('commit');
      expect(await ended).toBe('committed');
      const result = await run;

      // The key that transaction wrapped was re-wrapped, so dropping the old master key lost nothing.
      expect(result.retiredMasterKeys).toEqual([old.id]);
      expect((await h.sql('SELECT master_key_id FROM data_keys WHERE id = $1', [id])).rows[0].master_key_id).toBe(result.newMasterKeyId);
      expect(readKeyringFile(h.keyringFile).keys.map((k) => k.id)).toEqual([result.newMasterKeyId]);
      await restartedReadsEverything();
    } finally {
      hooks.beforeWrite = undefined;
      await service.terminate();
    }
  });

  it('a service key made for the first time while rekey runs is wrapped under a master key rekey keeps, or re-wrapped', async () => {
    // A service's first use of a service key (a fresh deployment's first store or workflow): it wraps
    // a new key under the current master key and inserts it, held here just before the INSERT is sent.
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let reached!: () => void;
    const atInsert = new Promise<void>((resolve) => (reached = resolve));
    const held = <T extends { query: (...args: never[]) => unknown }>(target: T): T =>
      new Proxy(target, {
        get(obj, prop, receiver) {
          const value = Reflect.get(obj, prop, receiver);
          if (prop === 'query') {
            return async (...args: unknown[]) => {
              if (typeof args[0] === 'string' && args[0].startsWith('INSERT INTO service_keys')) {
                reached();
                await released;
              }
              return (value as (...a: unknown[]) => unknown).apply(obj, args);
            };
          }
          if (prop === 'connect') return async () => held(await (value as () => Promise<pg.PoolClient>).call(obj));
          return typeof value === 'function' ? value.bind(obj) : value;
        },
      });
    const pool = createPool(h.databaseUrl, 2, silent);
    const name = `rekey-race-${randomUUID().slice(0, 8)}`;
    try {
      const service = new DataKeys(held(pool), Keyring.fromSetting(h.keyringFile));
      const made = service.serviceKey(pool, name);
      await atInsert;
      // The insert goes on once rekey has finished (it did not wait for it), or once rekey is seen waiting.
      const { run } = await rekeyFinishedOrWaiting();
      release();
      await made;
      const result = await run;
      // Before, rekey finished without it, dropped the old master key, and then the key was stored wrapped under it.
      expect((await h.sql('SELECT master_key_id FROM service_keys WHERE name = $1', [name])).rows[0].master_key_id).toBe(result.newMasterKeyId);
      await restartedReadsEverything();
    } finally {
      release();
      await pool.end();
      await h.sql('DELETE FROM service_keys WHERE name = $1', [name]);
    }
  });

  it('rekey does not wait for an autovacuum worker, however long it runs', async () => {
    // Autovacuum looks at each database every second, and vacuums this table slowly: its worker
    // keeps a transaction open throughout.
    await h.sql('ALTER SYSTEM SET autovacuum_naptime = 1');
    await h.sql('SELECT pg_reload_conf()');
    try {
      await h.sql(`CREATE TABLE slow_vacuum (n int) WITH (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
                     autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1, autovacuum_analyze_threshold = 1000000000)`);
      await h.sql('INSERT INTO slow_vacuum SELECT generate_series(1, 100000)');
      await h.sql('DELETE FROM slow_vacuum');
      const vacuum = async () =>
        (
          await h.sql(
            `SELECT pid, xact_start FROM pg_stat_activity
              WHERE datname = current_database() AND backend_type = 'autovacuum worker' AND query LIKE $1 AND xact_start IS NOT NULL`,
            ['%VACUUM public.slow_vacuum%'],
          )
        ).rows[0] as { pid: number; xact_start: Date } | undefined;
      let worker = await vacuum();
      for (const deadline = Date.now() + 30_000; !worker && Date.now() < deadline; await sleep(100)) worker = await vacuum();
      expect(worker).toBeDefined();
      await sleep(200);
      expect(await vacuum()).toEqual(worker);

      const started = Date.now();
      const result = await rekey(loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl }), silent);
      expect(Date.now() - started).toBeLessThan(10_000);
      expect(result.retiredMasterKeys).toHaveLength(1);
      // The same vacuum ran throughout.
      expect(await vacuum()).toEqual(worker);
      await h.sql('SELECT pg_terminate_backend($1)', [worker!.pid]);
    } finally {
      await h.sql('DROP TABLE IF EXISTS slow_vacuum');
      await h.sql('ALTER SYSTEM RESET autovacuum_naptime');
      await h.sql('SELECT pg_reload_conf()');
    }
    await restartedReadsEverything();
  }, 120_000);

  it('a read that fetched a key row just before rekey re-wrapped it, and unwraps it once the old master key left the file, reads the row again', async () => {
    const { next, old } = addCurrentKey();
    const id = randomUUID();
    const plain = await addDataKeys(agent.id, old, [id]);
    const pool = createPool(h.databaseUrl, 2);
    try {
      // Between the read's fetch of the row and its unwrap, rekey runs to its end: every key
      // re-wrapped under the new master key, the old one dropped from the file.
      let rekeyBetween: (() => Promise<void>) | undefined = async () => {
        const { masterKeysInUse } = await new DataKeys(pool, Keyring.fromSetting(h.keyringFile)).rewrapAll();
        expect(masterKeysInUse).toEqual([next.id]);
        writeKeyringFile(h.keyringFile, [next], next.id);
      };
      const fetches: string[] = [];
      const db = {
        query: async (sql: string, params: unknown[]) => {
          const result = await pool.query(sql, params);
          fetches.push(result.rows[0]?.master_key_id);
          const step = rekeyBetween;
          rekeyBetween = undefined;
          await step?.();
          return result;
        },
      } as unknown as pg.Pool;
      const reader = new DataKeys(pool, Keyring.fromSetting(h.keyringFile));
      const key = await reader.byKeyId(db, agent.id, id);
      expect(key.key.equals(plain.get(id)!)).toBe(true);
      expect(fetches).toEqual([old.id, next.id]);
      // A key whose master key is really gone still fails, after the same one re-read.
      await h.sql('UPDATE data_keys SET master_key_id = $2 WHERE id = $1', [id, old.id]);
      fetches.length = 0;
      await expect(new DataKeys(pool, Keyring.fromSetting(h.keyringFile)).byKeyId(db, agent.id, id)).rejects.toThrow(/which this keyring does not hold/);
      expect(fetches).toEqual([old.id, old.id]);
      await h.sql('DELETE FROM data_keys WHERE id = $1', [id]);
    } finally {
      await pool.end();
    }
    await restartedReadsEverything();
  });
});
