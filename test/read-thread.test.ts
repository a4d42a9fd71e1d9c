import { randomUUID } from 'node:crypto';
import { copyFileSync, writeFileSync } from 'node:fs';
import type { Worker } from 'node:worker_threads';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NotFoundError, UnavailableError, UnprocessableError } from '../core/errors';
import { openServices, type Services } from '../core/services';
import { isAudited } from '../vault/audit';
import { Keyring } from '../vault/keyring';
import { ReadThread } from '../vault/read-thread';
import type { TotpCode } from '../vault/totp';
import type { Caller, SecretRead, StoredVersion } from '../vault/types';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { TcpProxy } from './support/tcp-proxy';

/**
 * The API's audited reads run in a worker thread (vault/read-thread.ts); the harness's API runs it
 * as `npm start` does. These tests hold a read at its audit append (a lock on audit_log) to kill
 * the thread or close it with the read in flight.
 */
describe('the vault read thread', () => {
  let h: Harness;
  let agent: { id: string; token: string; name: string };
  let value: string;
  const as = (): Caller => ({ identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() });
  const rowsOf = async (requestId: string) =>
    (await h.sql('SELECT action, outcome, detail FROM audit_log WHERE request_id = $1 ORDER BY seq', [requestId])).rows;
  const thread = (services: Services) => services.readThread as unknown as { worker?: Worker };

  /** Holds every statement on `table` that conflicts with `mode` until release() is called. */
  const holdTable = async (table: string, mode: string) => {
    const client = new pg.Client({ connectionString: h.databaseUrl });
    await client.connect();
    await client.query('BEGIN');
    await client.query(`LOCK TABLE ${table} IN ${mode} MODE`);
    /** Statements of this database waiting for the lock now. */
    const waiters = async (): Promise<number> =>
      (
        await h.sql(
          `SELECT count(*)::int AS n FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
            WHERE c.relname = $1 AND NOT l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
          [table],
        )
      ).rows[0].n;
    return {
      waiters,
      /** Resolves once `n` statements wait for the lock. */
      async waiting(n = 1) {
        for (let i = 0; i < 200; i++) {
          if ((await waiters()) >= n) return;
          await new Promise((r) => setTimeout(r, 25));
        }
        throw new Error(`no ${n} statement(s) waiting on ${table} after 5 s`);
      },
      async release() {
        await client.query('ROLLBACK');
        await client.end();
      },
    };
  };

  /** Holds every audit append of this database until release() is called. */
  const holdAuditLog = () => holdTable('audit_log', 'SHARE ROW EXCLUSIVE');

  /** Sends a call, kills the thread while the call's batch waits at its audit append, and returns the answer. */
  const killedAtAuditAppend = async (route: string, body: unknown, requestId: string) => {
    const hold = await holdAuditLog();
    const pending = h.api('POST', route, { token: agent.token, body, headers: { 'x-request-id': requestId } });
    await hold.waiting();
    const dying = thread(h.services).worker!;
    await dying.terminate();
    // The API's own failure row waits on the same lock, beside the thread's orphaned append.
    await hold.waiting(2);
    await hold.release();
    return { res: await pending, dying };
  };

  beforeAll(async () => {
    h = await startHarness();
    agent = await h.createIdentity();
    value = h.secret(`sk_thread_${randomUUID()}`);
    for (const body of [
      { name: 'read-me', kind: 'api_key', value },
      { name: 'login', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP') } },
    ]) {
      expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body })).status).toBe(201);
    }
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it("answers the API's reads, each audited once, and none runs on the main thread", async () => {
    const mainBatches = (h.services.vault as unknown as { reads: { stats: { calls: number } } }).reads.stats;
    const before = h.services.vault.readBatchStats();
    const ask = async (route: string, body: unknown) => {
      const requestId = randomUUID();
      const res = await h.api('POST', route, { token: agent.token, body, headers: { 'x-request-id': requestId } });
      return { res, rows: await rowsOf(requestId) };
    };

    const got = await ask('/v1/vault.get', { name: 'read-me' });
    expect(got.res.status).toBe(200);
    expect(got.res.body).toMatchObject({ name: 'read-me', version: 1, value });
    expect(got.rows).toEqual([{ action: 'vault.get', outcome: 'ok', detail: { name: 'read-me', version: 1 } }]);

    const code = await ask('/v1/vault.totp', { name: 'login' });
    expect(code.res.status).toBe(200);
    expect(code.res.body.code).toMatch(/^\d{6}$/);
    expect(code.rows).toMatchObject([{ action: 'vault.totp', outcome: 'ok' }]);

    // Errors keep their problem type, and the thread's audit row is the only one (the API sees the mark).
    const missing = await ask('/v1/vault.get', { name: 'no-such-thing' });
    expect(missing.res.status).toBe(404);
    expect(missing.res.body).toMatchObject({ type: 'https://mailgent.dev/problems/not-found', detail: "no credential with name 'no-such-thing'" });
    expect(missing.rows).toEqual([{ action: 'vault.get', outcome: 'denied', detail: { name: 'no-such-thing', error: 'not-found', status: 404 } }]);

    const wrongKind = await ask('/v1/vault.totp', { name: 'read-me' });
    expect(wrongKind.res.status).toBe(422);
    expect(wrongKind.rows).toHaveLength(1);

    const direct = await h.services.vault.get(as(), { name: 'no-such-thing' }).catch((err: unknown) => err);
    expect(direct).toBeInstanceOf(NotFoundError);
    expect(isAudited(direct)).toBe(true);

    expect(h.services.vault.readBatchStats().calls - before.calls).toBe(5);
    expect(mainBatches.calls).toBe(0);
  });

  it("answers the API's stores too: each batch commits in the thread, a refusal keeps its class, fields and audited mark", async () => {
    const mainStores = (h.services.vault as unknown as { writes: { stats: { calls: number } } }).writes.stats;
    const before = h.services.vault.storeBatchStats();
    const requestId = randomUUID();
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'stored-in-thread', kind: 'api_key', value: h.secret(`sk_thread_store_${randomUUID()}`) },
      headers: { 'x-request-id': requestId },
    });
    expect(stored.status).toBe(201);
    expect(stored.body).toMatchObject({ name: 'stored-in-thread', version: 1 });
    expect(await rowsOf(requestId)).toEqual([{ action: 'vault.store', outcome: 'ok', detail: { name: 'stored-in-thread', version: 1 } }]);

    const conflictId = randomUUID();
    const conflict = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'stored-in-thread', kind: 'api_key', value: h.secret(`sk_thread_late_${randomUUID()}`), expectedVersion: 5 },
      headers: { 'x-request-id': conflictId },
    });
    expect(conflict.status).toBe(409);
    expect(conflict.body).toMatchObject({ type: 'https://mailgent.dev/problems/version-conflict', currentVersion: 1 });
    expect(await rowsOf(conflictId)).toEqual([{ action: 'vault.store', outcome: 'conflict', detail: { name: 'stored-in-thread', error: 'version-conflict', status: 409 } }]);

    const direct = await h.services.vault.store(as(), { name: 'stored-in-thread', kind: 'token', value: h.secret(`kind-change-${randomUUID()}`) }).catch((err: unknown) => err);
    expect(direct).toBeInstanceOf(UnprocessableError);
    expect(isAudited(direct)).toBe(true);

    expect(h.services.vault.storeBatchStats().calls - before.calls).toBe(3);
    expect(mainStores.calls).toBe(0);
  });

  it('a thread that dies fails its reads with a 503 and no value, the API audits them, and the next read starts a new thread', async () => {
    const requestId = randomUUID();
    const statsBefore = h.services.vault.readBatchStats();
    const { res, dying } = await killedAtAuditAppend('/v1/vault.get', { name: 'read-me' }, requestId);
    expect(res.status).toBe(503);
    expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/unavailable', detail: 'the vault read could not finish; try again' });
    expect(res.text).not.toContain(value);
    // The API wrote the failure. The dead thread's append had been sent before it died, and may commit
    // too: then the value left the database but never reached the caller, a log that over-reports.
    // Whether it commits depends on whether PostgreSQL finishes the statement's implicit transaction
    // before it notices the connection is gone, and the two appends take the chain lock in either
    // order once the table lock is released (all of these have been seen here).
    const rows = await rowsOf(requestId);
    const failedRow = { action: 'vault.get', outcome: 'failed', detail: { error: 'unavailable', status: 503 } };
    const orphanRow = { action: 'vault.get', outcome: 'ok', detail: { name: 'read-me', version: 1 } };
    expect(rows.filter((r) => r.outcome === 'failed')).toEqual([failedRow]);
    expect(rows.filter((r) => r.outcome !== 'failed')).toEqual(rows.length === 2 ? [orphanRow] : []);

    const again = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'read-me' } });
    expect(again.status).toBe(200);
    expect(again.body.value).toBe(value);
    expect(thread(h.services).worker).not.toBe(dying);
    // The dead thread's counts are kept.
    expect(h.services.vault.readBatchStats().calls).toBeGreaterThan(statsBefore.calls);
  });

  it('a thread that dies under a store batch fails it with a 503 that says it may have been committed; this one was not (no COMMIT was sent)', async () => {
    const requestId = randomUUID();
    const storedValue = h.secret(`sk_dying_store_${randomUUID()}`);
    const { res, dying } = await killedAtAuditAppend('/v1/vault.store', { name: 'dying-store', kind: 'api_key', value: storedValue }, requestId);
    expect(res.status).toBe(503);
    expect(res.body.detail).toMatch(/^the store could not be confirmed: it may have been committed before the vault thread stopped/);
    expect(res.body.unconfirmed).toBe(true);
    expect(res.text).not.toContain(storedValue);
    // The batch's transaction never got its COMMIT: PostgreSQL rolled it back when the connection went.
    expect((await h.sql(`SELECT count(*)::int AS n FROM credentials WHERE identity_id = $1 AND name = 'dying-store'`, [agent.id])).rows[0].n).toBe(0);
    expect(await rowsOf(requestId)).toEqual([{ action: 'vault.store', outcome: 'failed', detail: { error: 'unavailable', status: 503 } }]);

    const again = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'dying-store', kind: 'api_key', value: storedValue } });
    expect(again.status).toBe(201);
    expect(again.body.version).toBe(1);
    expect(thread(h.services).worker).not.toBe(dying);
  });

  it('a call that cannot cross to the thread, or that the thread cannot run, fails alone', async () => {
    await h.services.ready();
    const worker = thread(h.services).worker;
    expect(worker).toBeDefined();
    const good = h.services.vault.get(as(), { name: 'read-me' });
    const unclonable = h.services.vault.get(as(), { name: 'read-me' }, undefined, { hook: () => value } as never).catch((err: unknown) => err);
    const malformed = h.services.vault.get(as(), null as never).catch((err: unknown) => err);
    const alsoGood = h.services.vault.totp(as(), { name: 'login' });
    expect((await good).value).toBe(value);
    expect((await alsoGood).code).toMatch(/^\d{6}$/);
    expect(await unclonable).toBeInstanceOf(TypeError);
    expect((await unclonable as Error).message).toBe('the read request holds a value that cannot be passed to the vault thread');
    expect(await malformed).toMatchObject({ name: 'TypeError' });
    expect(thread(h.services).worker).toBe(worker);
  });

  it('close lets a read already made finish with its value, then refuses new ones', async () => {
    const services = openServices({
      databaseUrl: h.databaseUrl,
      poolSize: 2,
      keyring: Keyring.fromSetting(h.keyringFile),
      smtpUrl: 'smtp://unused',
      mailFrom: 'x@localhost',
      readThread: true,
    });
    await services.ready();
    const hold = await holdAuditLog();
    const reading = services.vault.get(as(), { name: 'read-me' });
    await hold.waiting();
    let closed = false;
    const first = services.readThread!.close();
    expect(services.readThread!.close()).toBe(first);
    const closing = services.close().then(() => (closed = true));
    await new Promise((r) => setTimeout(r, 200));
    expect(closed).toBe(false);
    await hold.release();
    expect((await reading).value).toBe(value);
    await closing;
    const late = await services.vault.get(as(), { name: 'read-me' }).catch((err: unknown) => err);
    expect(late).toBeInstanceOf(UnavailableError);
    expect((late as Error).message).toBe('the service is shutting down');
  });

  it('a thread that cannot start says why, and reads fail with a 503 until it can', async () => {
    const file = `${h.keyringFile}.copy`;
    copyFileSync(h.keyringFile, file);
    const services = openServices({ databaseUrl: h.databaseUrl, poolSize: 1, keyring: Keyring.fromSetting(file), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost', readThread: true });
    try {
      writeFileSync(file, 'not a keyring');
      await expect(services.ready()).rejects.toThrow(`keyring file ${file} is neither one base64 key nor a keyring JSON document`);
      const read = await services.vault.get(as(), { name: 'read-me' }).catch((err: unknown) => err);
      expect(read).toBeInstanceOf(UnavailableError);
      expect((read as Error).message).toBe('the vault thread is restarting; try again shortly');
      // A call that starts a thread that then fails never ran: a store says so, not that it may have been committed.
      await new Promise((r) => setTimeout(r, 1_100));
      const store = await services.vault.store(as(), { name: 'never-stored', kind: 'api_key', value: h.secret(`sk_never_${randomUUID()}`) }).catch((err: unknown) => err);
      expect(store).toBeInstanceOf(UnavailableError);
      expect((store as Error).message).toBe('the vault store could not start; try again');

      copyFileSync(h.keyringFile, file);
      await new Promise((r) => setTimeout(r, 1_100));
      expect((await services.vault.get(as(), { name: 'read-me' })).value).toBe(value);
    } finally {
      await services.close();
    }
  });

  it('a new thread runs no call before its service keys are loaded: calls that arrive first wait for the warm-up, then are all answered', async () => {
    // The thread's warm-up reads the fingerprint key from service_keys: a lock on the table holds it
    // there. A read needs no service key, so a read the thread ran before its warm-up would be
    // answered meanwhile; a store would wait on the same lock beside it.
    const hold = await holdTable('service_keys', 'ACCESS EXCLUSIVE');
    let held = true;
    const rt = new ReadThread({ databaseUrl: h.databaseUrl, poolSize: 3, keyringSetting: h.keyringFile });
    const events: string[] = [];
    const seen = <T>(name: string, p: Promise<T>): Promise<T> =>
      p.then(
        (v) => (events.push(name), v),
        (err: unknown) => {
          events.push(`${name} failed`);
          throw err;
        },
      );
    try {
      const ready = seen('ready', rt.start());
      const [getCaller, totpCaller, storeCaller] = [as(), as(), as()];
      const storedValue = h.secret(`sk_held_store_${randomUUID()}`);
      const got = seen('get', rt.call<SecretRead>('get', getCaller, { name: 'read-me' }));
      const code = seen('totp', rt.call<TotpCode>('totp', totpCaller, { name: 'login' }));
      const stored = seen('store', rt.store(storeCaller, { name: 'held-store', kind: 'api_key', value: storedValue }));
      await hold.waiting();
      await new Promise((r) => setTimeout(r, 750));
      // Nothing answered, the thread not ready, and its warm-up the one statement it has sent.
      expect(events).toEqual([]);
      expect(await hold.waiters()).toBe(1);
      expect(await rowsOf(getCaller.requestId!)).toEqual([]);

      await hold.release();
      held = false;
      expect((await got).value).toBe(value);
      expect((await code).code).toMatch(/^\d{6}$/);
      expect(await stored).toMatchObject({ name: 'held-store', version: 1 });
      await ready;
      expect(events[0]).toBe('ready');
      expect([...events].sort()).toEqual(['get', 'ready', 'store', 'totp']);
      expect(await rowsOf(getCaller.requestId!)).toEqual([{ action: 'vault.get', outcome: 'ok', detail: { name: 'read-me', version: 1 } }]);
      expect(await rowsOf(totpCaller.requestId!)).toMatchObject([{ action: 'vault.totp', outcome: 'ok' }]);
      expect(await rowsOf(storeCaller.requestId!)).toEqual([{ action: 'vault.store', outcome: 'ok', detail: { name: 'held-store', version: 1 } }]);
    } finally {
      if (held) await hold.release();
      await rt.close();
    }
  });

  it('a thread that stops before it is ready ran nothing: a store sent to it is not committed, and fails with a plain 503 to try again, not an unconfirmed one', async () => {
    // The thread's first connection (its warm-up's) is held at the network while the next ones pass:
    // a call the thread ran before its warm-up would have a connection of its own to run on.
    const db = new URL(h.databaseUrl);
    const proxy = await new TcpProxy({ host: db.hostname, port: Number(db.port) }).start();
    db.host = proxy.address;
    proxy.hold();
    const rt = new ReadThread({ databaseUrl: db.toString(), poolSize: 3, keyringSetting: h.keyringFile });
    try {
      const starting = rt.start().then(
        () => 'ready',
        (err: unknown) => err,
      );
      for (let i = 0; proxy.accepted < 1; i++) {
        if (i > 400) throw new Error('the thread opened no connection in 10 s');
        await new Promise((r) => setTimeout(r, 25));
      }
      proxy.admit();
      const [storeCaller, getCaller] = [as(), as()];
      const storedValue = h.secret(`sk_before_ready_${randomUUID()}`);
      const settled: string[] = [];
      const storing = rt.store(storeCaller, { name: 'before-ready', kind: 'api_key', value: storedValue }).then(
        (v: StoredVersion) => v,
        (err: unknown) => err,
      ).finally(() => settled.push('store'));
      const reading = rt.call<SecretRead>('get', getCaller, { name: 'read-me' }).then(
        (v) => v,
        (err: unknown) => err,
      ).finally(() => settled.push('get'));
      await new Promise((r) => setTimeout(r, 1_000));
      // Held, not run: no answer, and no connection but the warm-up's.
      expect(settled).toEqual([]);
      expect(proxy.accepted).toBe(1);

      const dying = (rt as unknown as { worker?: Worker }).worker!;
      await dying.terminate();
      expect(await starting).toMatchObject({ message: 'the vault thread exited with code 1 before it was ready' });
      const store = await storing;
      expect(store).toBeInstanceOf(UnavailableError);
      expect((store as UnavailableError).message).toBe('the vault store could not start; try again');
      expect((store as UnavailableError).extra).toEqual({});
      const read = await reading;
      expect(read).toBeInstanceOf(UnavailableError);
      expect((read as UnavailableError).message).toBe('the vault read could not start; try again');
      // And it is true: nothing was stored, nothing read, nothing audited.
      expect((await h.sql(`SELECT count(*)::int AS n FROM credentials WHERE identity_id = $1 AND name = 'before-ready'`, [agent.id])).rows[0].n).toBe(0);
      expect(await rowsOf(storeCaller.requestId!)).toEqual([]);
      expect(await rowsOf(getCaller.requestId!)).toEqual([]);
    } finally {
      await rt.close();
      await proxy.stop();
    }
  });
});
