import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../embedded/ports';
import { newToken } from '../vault/identities';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * Graceful shutdown of the real entry point (`cli/main.ts serve` against this run's servers): on
 * SIGTERM it stops accepting connections at once, lets a request already in flight finish, drains
 * the worker, closes its pools and exits 0.
 */
const ROOT = path.resolve(import.meta.dirname, '..');

describe('graceful shutdown', () => {
  let h: Harness;
  let proc: ChildProcess | undefined;
  let lock: pg.Client | undefined;

  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await lock?.end().catch(() => undefined);
    if (proc && proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGKILL');
      await new Promise((r) => proc!.once('exit', r));
    }
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('SIGUSR2 (a shutdown signal of the Temporal SDK\'s own) does not leave the API serving with no worker: the process ends', { timeout: 120_000 }, async () => {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const usr2 = spawn(process.execPath, ['--import', 'tsx', 'cli/main.ts', 'serve'], {
      cwd: ROOT,
      env: { ...process.env, ...h.workerEnv(), PORT: String(port), HOST: '127.0.0.1', ADMIN_TOKEN: h.secret(newToken()), LOG_LEVEL: 'warn' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    usr2.stdout!.on('data', (d) => (output += d));
    usr2.stderr!.on('data', (d) => (output += d));
    const exited = new Promise<NodeJS.Signals | number | null>((resolve) => usr2.once('exit', (code, signal) => resolve(signal ?? code)));
    try {
      for (let ready = false; !ready; ) {
        if (usr2.exitCode !== null) throw new Error(`the service exited early:\n${output}`);
        ready = await fetch(`${url}/readyz`).then((r) => r.status === 200, () => false);
        if (!ready) await new Promise((r) => setTimeout(r, 250));
      }
      usr2.kill('SIGUSR2');
      // Before, the SDK shut the worker down and the API went on answering, its rotations never run.
      let timer: NodeJS.Timeout | undefined;
      const ended = await Promise.race([exited, new Promise((r) => (timer = setTimeout(() => r('still running after 20 s'), 20_000)))]);
      clearTimeout(timer);
      expect(ended, output).toBe('SIGUSR2');
    } finally {
      if (usr2.exitCode === null && usr2.signalCode === null) usr2.kill('SIGKILL');
      await exited;
    }
  });

  it('SIGTERM: new connections are refused, the in-flight request completes, exit code 0', { timeout: 240_000 }, async () => {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const admin = h.secret(newToken());
    proc = spawn(process.execPath, ['--import', 'tsx', 'cli/main.ts', 'serve'], {
      cwd: ROOT,
      env: { ...process.env, ...h.workerEnv(), PORT: String(port), HOST: '127.0.0.1', ADMIN_TOKEN: admin, SHUTDOWN_GRACE_SECONDS: '30', LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    proc.stdout!.on('data', (d) => (output += d));
    proc.stderr!.on('data', (d) => (output += d));
    const exited = new Promise<number | null>((resolve) => proc!.once('exit', (code) => resolve(code)));

    for (let ready = false; !ready; ) {
      if (proc.exitCode !== null) throw new Error(`the service exited early:\n${output}`);
      ready = await fetch(`${url}/readyz`).then((r) => r.status === 200, () => false);
      if (!ready) await new Promise((r) => setTimeout(r, 250));
    }
    const call = (route: string, token: string, body: unknown) =>
      fetch(url + route, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const identity = (await (await call('/v1/identities', admin, { name: 'shutdown-agent' })).json()) as { token: string };
    h.secret(identity.token);
    expect((await call('/v1/vault.store', identity.token, { name: 'slow', kind: 'generic', value: h.secret('slow-value-1') })).status).toBe(201);

    // Hold the credential's row lock, so the next store of it waits in the database: a slow request.
    lock = new pg.Client({ connectionString: h.databaseUrl });
    await lock.connect();
    await lock.query('BEGIN');
    await lock.query("SELECT id FROM credentials WHERE name = 'slow' FOR UPDATE");
    const slow = call('/v1/vault.store', identity.token, { name: 'slow', kind: 'generic', value: h.secret('slow-value-2') });
    for (let waiting = 0; waiting === 0; ) {
      await new Promise((r) => setTimeout(r, 100));
      waiting = (await h.sql(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)).rows[0].n;
    }

    proc.kill('SIGTERM');
    // The listener closes at once: a new connection is refused while the slow request is still running.
    let refused = false;
    for (let i = 0; i < 50 && !refused; i++) {
      refused = await fetch(`${url}/healthz`).then(
        () => false,
        (err: Error & { cause?: { code?: string } }) => err.cause?.code === 'ECONNREFUSED',
      );
      if (!refused) await new Promise((r) => setTimeout(r, 100));
    }
    expect(refused).toBe(true);
    expect(proc.exitCode).toBeNull();

    await lock.query('COMMIT');
    const answer = await slow;
    expect(answer.status).toBe(201);
    expect(((await answer.json()) as { version: number }).version).toBe(2);
    const stoppedAt = Date.now();
    expect(await exited).toBe(0);
    // It did not sit out the 30-second grace period: the drained connection closed with its response.
    expect(Date.now() - stoppedAt).toBeLessThan(20_000);
    expect(output).toContain('"msg":"stopped"');
    expect(output).not.toContain('did not finish in time');
    expect((await h.sql("SELECT v.version FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.name = 'slow' ORDER BY v.version")).rows.map((r) => r.version)).toEqual([1, 2]);
  });
});
