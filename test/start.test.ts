import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, symlinkSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../embedded/ports';
import { initdbSignal, startEmbeddedPostgres, withClient } from '../embedded/postgres';
import { startTimeOf } from '../embedded/child';
import { startEmbeddedTemporal } from '../embedded/temporal';

/**
 * `npm start` end to end: the real entry point with no configuration embeds PostgreSQL, Temporal
 * and the SMTP sink under DATA_DIR, serves the README's walk-through, stops everything on SIGTERM,
 * and finds its data again on the next start.
 */
const ROOT = path.resolve(import.meta.dirname, '..');

/** Every service this file starts, so a failing test still stops them (afterAll). */
const started: ChildProcess[] = [];

/** `detached`: in a process group of its own, as a terminal runs it (Ctrl-C signals the group). */
function start(
  env: Record<string, string>,
  opts: { detached?: boolean; command?: 'serve' | 'api' | 'worker' } = {},
): { proc: ChildProcess; output: () => string; errors: () => string; exited: Promise<number | null> } {
  const clean = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !['DATABASE_URL', 'TEMPORAL_ADDRESS', 'SMTP_URL', 'VAULT_MASTER_KEY', 'ADMIN_TOKEN', 'PORT'].includes(k)),
  );
  const proc = spawn(process.execPath, ['--import', 'tsx', 'cli/main.ts', opts.command ?? 'serve'], { cwd: ROOT, env: { ...clean, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: opts.detached });
  started.push(proc);
  let out = '';
  let err = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => ((out += d), (err += d)));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  return { proc, output: () => out, errors: () => err, exited };
}

/**
 * A database server that takes connections and answers none until `refuse()`, then refuses each as
 * PostgreSQL refuses a wrong password (an ErrorResponse, 28P01): a start-up that fails for its
 * own reason, at the moment the test chooses.
 */
async function refusingDatabase(): Promise<{ url: string; connected: () => boolean; refuse: () => void; close: () => void }> {
  const sockets = new Set<net.Socket>();
  let refuse!: () => void;
  const refused = new Promise<void>((resolve) => (refuse = resolve));
  const fields = Buffer.from('SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "mailgent"\0\0');
  const length = Buffer.alloc(4);
  length.writeInt32BE(fields.length + 4);
  const refusal = Buffer.concat([Buffer.from('E'), length, fields]);
  const server = net.createServer((socket) => {
    socket.on('error', () => undefined);
    // The start-up message read: the client waits for the answer.
    socket.once('data', () => {
      sockets.add(socket);
      void refused.then(() => socket.end(refusal));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `postgres://mailgent:pw@127.0.0.1:${port}/mailgent`,
    connected: () => sockets.size > 0,
    refuse,
    close: () => {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
}

/** Until the service at `url` is ready; `output` (the service's log so far) goes into the error if it never is. */
async function waitReady(url: string, timeoutMs = 120_000, output?: () => string, exited?: () => boolean): Promise<unknown> {
  const deadline = Date.now() + timeoutMs;
  let last: string;
  for (;;) {
    try {
      const res = await fetch(`${url}/readyz`);
      if (res.status === 200) return res.json();
      last = `${res.status} ${await res.text()}`;
    } catch (err) {
      last = (err as Error).message; // not listening yet
    }
    const ended = exited?.() ?? false;
    if (ended || Date.now() > deadline) {
      throw new Error(`service ${ended ? 'exited before it was' : 'did not become'} ready (last /readyz: ${last})${output ? `\nits output:\n${output().slice(-6_000)}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Processes whose command line mentions `dir` (the embedded servers run with their data there). */
function processesUsing(dir: string): string[] {
  return readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .flatMap((pid) => {
      try {
        const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
        return cmd.includes(dir) ? [cmd] : [];
      } catch {
        return [];
      }
    });
}

describe('npm start with the embedded defaults', () => {
  let dataDir: string;
  let port: number;
  let url: string;

  beforeAll(async () => {
    dataDir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-start-'));
    port = await freePort();
    url = `http://127.0.0.1:${port}`;
  });
  afterAll(async () => {
    for (const proc of started) {
      if (proc.exitCode !== null || proc.signalCode !== null) continue;
      proc.kill('SIGTERM');
      const stopped = await Promise.race([new Promise((r) => proc.once('exit', () => r(true))), new Promise((r) => setTimeout(() => r(false), 30_000))]);
      if (!stopped) proc.kill('SIGKILL');
    }
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('serves the walk-through, stops cleanly on SIGTERM, and keeps its data across a restart', { timeout: 300_000 }, async () => {
    const first = start({ DATA_DIR: dataDir, PORT: String(port) });
    try {
      expect(await waitReady(url)).toEqual({ status: 'ready', checks: { database: 'ok', temporal: 'ok', vault: 'ok' } });
    } catch (err) {
      first.proc.kill('SIGKILL');
      throw new Error(`${(err as Error).message}\n${first.output()}`, { cause: err });
    }
    expect(statSync(path.join(dataDir, 'admin-token')).mode & 0o777).toBe(0o600);
    expect(statSync(path.join(dataDir, 'master-keys.json')).mode & 0o777).toBe(0o600);
    const admin = readFileSync(path.join(dataDir, 'admin-token'), 'utf8').trim();
    const call = async (method: string, route: string, token: string, body?: unknown) => {
      const res = await fetch(url + route, {
        method,
        headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
        body: body ? JSON.stringify(body) : undefined,
      });
      return { status: res.status, body: (await res.json()) as any };
    };

    const identity = await call('POST', '/v1/identities', admin, { name: 'deploy-bot', email: 'ops@example.com' });
    expect(identity.status).toBe(201);
    const token = identity.body.token;
    expect((await call('POST', '/v1/vault.store', token, { name: 'stripe', kind: 'api_key', value: 'sk_test_walkthrough_1', rotation: { provider: 'generated', settings: { length: 40, prefix: 'sk_' }, periodDays: 90 } })).status).toBe(201);
    const rotation = await call('POST', '/v1/rotations', token, { credentials: ['stripe'], reason: 'walk-through' });
    expect(rotation.status).toBe(202);
    let report: any;
    for (let i = 0; i < 100; i++) {
      report = (await call('GET', `/v1/rotations/${rotation.body.rotationId}`, token)).body;
      if (report.state !== 'running') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    // Promoted; the previous version stays valid for the default 24-hour grace period.
    expect(report.state).toBe('grace');
    const rotated = (await call('POST', '/v1/vault.get', token, { name: 'stripe' })).body;
    expect(rotated.version).toBe(2);
    // The owners' notice goes out beside the grace period (a leak during an SMTP outage is not held up by it): it may land just after.
    let mails: string[] = [];
    for (let i = 0; i < 100 && mails.length === 0; i++) {
      mails = readdirSync(path.join(dataDir, 'mail')).filter((f) => f.endsWith('.eml'));
      if (mails.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    expect(mails).toHaveLength(1);
    expect(readFileSync(path.join(dataDir, 'mail', mails[0]!), 'utf8')).toContain('Subject: [mailgent] Rotated stripe');

    // The log never carries the admin token, the identity token or a value.
    for (const secret of [admin, token, 'sk_test_walkthrough_1', rotated.value]) expect(first.output()).not.toContain(secret);

    expect(processesUsing(dataDir).length).toBeGreaterThanOrEqual(2);
    first.proc.kill('SIGTERM');
    expect(await first.exited).toBe(0);
    expect(first.output()).toContain('"msg":"stopped"');
    expect(processesUsing(dataDir)).toEqual([]);

    const second = start({ DATA_DIR: dataDir, PORT: String(port) });
    try {
      await waitReady(url);
      expect((await call('POST', '/v1/vault.get', token, { name: 'stripe' })).body).toMatchObject({ version: 2, value: rotated.value });
      // Temporal kept the run in its SQLite file: it is still waiting out its grace period.
      const after = (await call('GET', `/v1/rotations/${rotation.body.rotationId}`, token)).body;
      expect(after.state).toBe('grace');
      expect(after.credentials[0].progress.steps.find((s: { name: string }) => s.name === 'grace').state).toBe('running');
      expect(existsAdminTokenPrinted(second.output())).toBe(false);
    } finally {
      second.proc.kill('SIGTERM');
      expect(await second.exited).toBe(0);
    }
    expect(processesUsing(dataDir)).toEqual([]);
  });

  it('npm start: Ctrl-C to its process group, or SIGTERM to npm alone, stops the service first and its servers after it', { timeout: 300_000 }, async () => {
    // As a terminal or a supervisor runs it: npm at the head of a process group of its own.
    const npmStart = () => {
      const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !['DATABASE_URL', 'TEMPORAL_ADDRESS', 'SMTP_URL', 'VAULT_MASTER_KEY', 'ADMIN_TOKEN', 'PORT'].includes(k)));
      const proc = spawn('npm', ['start', '--silent'], { cwd: ROOT, env: { ...clean, DATA_DIR: dataDir, PORT: String(port) }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      started.push(proc);
      let out = '';
      proc.stdout!.on('data', (d) => (out += d));
      proc.stderr!.on('data', (d) => (out += d));
      let ended = false;
      const exited = new Promise<void>((resolve) => proc.on('exit', () => ((ended = true), resolve())));
      return { proc, output: () => out, exited, ended: () => ended };
    };
    const gone = async (what: string) => {
      for (let i = 0; processesUsing(dataDir).length > 0; i++) {
        if (i > 300) throw new Error(`${what}: still running: ${processesUsing(dataDir).join('\n')}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const ways: [string, (pid: number) => void][] = [
      ['Ctrl-C', (pid) => process.kill(-pid, 'SIGINT')],
      ['SIGTERM to npm', (pid) => process.kill(pid, 'SIGTERM')],
    ];
    for (const [how, signal] of ways) {
      const run = npmStart();
      await waitReady(url, undefined, run.output, run.ended);
      signal(run.proc.pid!);
      await run.exited;
      await gone(how);
      const log = run.output();
      expect(log, how).toContain('"msg":"stopped"');
      // The servers were still up while the service drained: no connection of its own was cut under it.
      expect(log, how).not.toMatch(/database connection lost|idle database client failed|second SIG/);
    }
  });

  it('a signal during start-up stops it: nothing more starts, and what had started stops', { timeout: 120_000 }, async () => {
    const run = start({ DATA_DIR: dataDir, PORT: String(port) });
    for (let i = 0; !run.output().includes('embedded PostgreSQL ready'); i++) {
      if (i > 1200) throw new Error(`PostgreSQL did not start:\n${run.output()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    // Temporal is starting now.
    run.proc.kill('SIGTERM');
    const code = await run.exited;
    const log = run.output();
    expect(code, log).toBe(0);
    expect(log).toContain('SIGTERM during start-up');
    expect(log).toContain('"msg":"stopped"');
    expect(log).not.toMatch(/worker running|API listening/);
    expect(processesUsing(dataDir)).toEqual([]);
  });

  it('Ctrl-C while the worker is being bundled is an interruption, not a failed start: the bundler the signal also ended does not make it exit 1', { timeout: 120_000 }, async () => {
    // As a terminal runs it: a process group of its own, which Ctrl-C signals whole (the bundler's child too).
    const { proc, output, exited } = start({ DATA_DIR: dataDir, PORT: String(port) }, { detached: true });
    // The workflows' bundler, a child process of this service's own, is running (other files'
    // services may be bundling too: only a child of this one counts).
    const bundler = path.join(ROOT, 'worker', 'bundle.ts');
    const bundling = () =>
      readdirSync('/proc')
        .filter((p) => /^\d+$/.test(p))
        .some((pid) => {
          try {
            const parent = /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
            return Number(parent) === proc.pid && readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(bundler);
          } catch {
            return false;
          }
        });
    for (let i = 0; !bundling(); i++) {
      if (i > 2400 || proc.exitCode !== null) throw new Error(`the bundler never ran:\n${output()}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    process.kill(-proc.pid!, 'SIGINT');
    const code = await exited;
    // Before, the bundler's death was a failed start: exit 1, "bundling the workflows failed". Now an
    // interruption: a clean stop (0), or the exit at once of a second SIGINT during the stop (130:
    // seen once in CI, where the process got SIGINT twice; where the second came from is not traced).
    expect([0, 130], output()).toContain(code);
    expect(output()).not.toContain('bundling the workflows failed');
    expect(output()).not.toMatch(/worker running|API listening/);
    for (let i = 0; processesUsing(dataDir).length > 0; i++) {
      if (i > 100) throw new Error(`still running: ${processesUsing(dataDir).join('\n')}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  it('Ctrl-C while initdb makes the cluster (a first start) is an interruption, not a failed start: the initdb the signal also ended does not make it exit 1', { timeout: 120_000 }, async () => {
    const ownDir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-initdb-int-'));
    try {
      const { proc, output, exited } = start({ DATA_DIR: ownDir, PORT: String(await freePort()) }, { detached: true });
      const initdbRunning = () =>
        readdirSync('/proc')
          .filter((p) => /^\d+$/.test(p))
          .some((pid) => {
            try {
              const parent = /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
              return Number(parent) === proc.pid && readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('initdb');
            } catch {
              return false;
            }
          });
      // Its configuration files written: initdb is past the settings it probes with system() (which
      // ignores SIGINT meanwhile) and bootstrapping, where the signal ends it or the backend it runs.
      const bootstrapping = () => existsSync(path.join(ownDir, `postgres.initialising-${proc.pid}`, 'pg_hba.conf'));
      for (let i = 0; !(bootstrapping() && initdbRunning()); i++) {
        if (i > 6000 || proc.exitCode !== null) throw new Error(`initdb never bootstrapped:\n${output()}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      process.kill(-proc.pid!, 'SIGINT');
      const code = await exited;
      // initdb exits 1 (it caught the signal, or its backend died of it), having removed what it
      // made: the interruption, as the bundler's death is, not a start that failed for its own reason.
      expect([0, 130], output()).toContain(code);
      expect(output()).toMatch(/initdb was ended by (SIGINT|a signal) too: start-up interrupted/);
      expect(output()).not.toMatch(/init script failed|embedded PostgreSQL ready/);
      for (let i = 0; processesUsing(ownDir).length > 0; i++) {
        if (i > 100) throw new Error(`still running: ${processesUsing(ownDir).join('\n')}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      rmSync(ownDir, { recursive: true, force: true });
    }
  });

  it('initdb ended by the signal is told from initdb failing for its own reason', () => {
    const failed = (code: string, signal: string, stderr: string) => `Postgres init script failed (code: ${code}, signal: ${signal}). ERROR OUTPUT: ${stderr}`;
    expect(initdbSignal(failed('null', 'SIGINT', ''), '')).toBe('SIGINT');
    expect(initdbSignal(failed('null', 'SIGTERM', ''), '')).toBe('SIGTERM');
    expect(initdbSignal(failed('1', 'null', 'initdb: removing data directory "/d"'), 'running bootstrap script ... ok\nperforming post-bootstrap initialization ... caught signal\n')).toBe(true);
    expect(initdbSignal(failed('1', 'null', 'child process was terminated by signal 2: Interrupt\ninitdb: removing contents of data directory "/d"'), 'running bootstrap script ... ')).toBe(true);
    expect(initdbSignal(failed('1', 'null', 'child process was terminated by signal 15: Terminated'), '')).toBe(true);
    // Its own failures, and other signals (SIGKILL: not a stop the service asked for).
    expect(initdbSignal(failed('null', 'SIGKILL', ''), '')).toBe(false);
    expect(initdbSignal(failed('1', 'null', 'child process was terminated by signal 9: Killed'), '')).toBe(false);
    expect(initdbSignal(failed('1', 'null', 'initdb: error: could not create directory "/d": No space left on device'), 'creating directory /d ... ')).toBe(false);
    expect(initdbSignal(failed('1', 'null', 'FATAL:  could not create shared memory segment: caught signal'), '')).toBe(false);
  });

  for (const command of ['serve', 'api', 'worker'] as const) {
    it(`${command}: a start-up that fails for its own reason while it takes a signal (the database refuses it) exits 1 with its error on stderr, not 0 as a clean stop`, { timeout: 60_000 }, async () => {
      const db = await refusingDatabase();
      const ownDir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-refused-'));
      try {
        const external = {
          DATA_DIR: ownDir,
          PORT: String(await freePort()),
          DATABASE_URL: db.url,
          VAULT_MASTER_KEY: randomBytes(32).toString('base64'),
          TEMPORAL_ADDRESS: '127.0.0.1:1',
          SMTP_URL: 'smtp://127.0.0.1:1',
          ADMIN_TOKEN: randomBytes(24).toString('base64url'),
        };
        const run = start(external, { command });
        // Start-up is migrating: connected, waiting for the database's answer.
        for (let i = 0; !db.connected(); i++) {
          if (i > 1200 || run.proc.exitCode !== null) throw new Error(`the service never reached the database:\n${run.output()}`);
          await new Promise((r) => setTimeout(r, 25));
        }
        run.proc.kill('SIGTERM');
        for (let i = 0; !run.output().includes('SIGTERM during start-up'); i++) {
          if (i > 400 || run.proc.exitCode !== null) throw new Error(`the signal was not taken:\n${run.output()}`);
          await new Promise((r) => setTimeout(r, 25));
        }
        db.refuse();
        const code = await run.exited;
        // Before, any failure after a signal exited 0, the error said nowhere: a supervisor took
        // the failed start for the clean stop it asked for.
        expect(code, run.output()).toBe(1);
        expect(run.errors()).toBe('mailgent: password authentication failed for user "mailgent"\n');
        expect(run.output()).toContain('"msg":"stopped"');
        expect(run.output()).not.toMatch(/worker running|API listening/);
      } finally {
        db.close();
        rmSync(ownDir, { recursive: true, force: true });
      }
    });
  }

  it('an embedded server that dies stops the service with exit code 1, naming it; the next start brings it back', { timeout: 240_000 }, async () => {
    const ownDir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-died-'));
    const ownPort = await freePort();
    try {
      const run = start({ DATA_DIR: ownDir, PORT: String(ownPort) });
      await waitReady(`http://127.0.0.1:${ownPort}`);
      const postmaster = Number(readFileSync(path.join(ownDir, 'postgres', 'postmaster.pid'), 'utf8').split('\n')[0]);
      process.kill(postmaster, 'SIGKILL');
      // One SIGTERM while it stops (a supervisor's, say): the stop goes on. Before, it was taken for a
      // second signal: exit 130 at once, the drain and the other servers' stops skipped.
      for (const deadline = Date.now() + 30_000; !run.output().includes('shutting down') && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 5));
      expect(run.proc.kill('SIGTERM')).toBe(true);
      const code = await run.exited;
      const log = run.output();
      expect(code, log).toBe(1);
      expect(log).toContain('SIGTERM: already stopping; a second one exits at once');
      expect(log).not.toContain('second SIGTERM');
      expect(log).toContain('the embedded postgres server exited (code null); stopping, since nothing works without it: start again to restart it');
      expect(log).toContain('"msg":"stopped"');
      expect(processesUsing(ownDir)).toEqual([]);

      const again = start({ DATA_DIR: ownDir, PORT: String(ownPort) });
      expect(await waitReady(`http://127.0.0.1:${ownPort}`)).toMatchObject({ status: 'ready' });
      again.proc.kill('SIGTERM');
      expect(await again.exited, again.output()).toBe(0);
    } finally {
      rmSync(ownDir, { recursive: true, force: true });
    }
  });

  it('an embedded PostgreSQL whose database cannot be made is stopped again, not left running', { timeout: 120_000 }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-pg-nodb-'));
    try {
      // A name PostgreSQL refuses: the server is up, its database cannot be made.
      await expect(startEmbeddedPostgres({ dataDir: dir, database: '' })).rejects.toThrow(/zero-length/);
      // Before, its server kept running (and kept the failed start from exiting).
      expect(processesUsing(dir)).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const layout of ['no cluster directory yet', 'the cluster directory a link to an empty directory elsewhere (a volume, another disk)'] as const) {
    it(`a first start killed while initdb makes the cluster leaves nothing the next start trips on: it makes the cluster again (${layout})`, { timeout: 180_000 }, async () => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-pg-initdb-'));
      const elsewhere = mkdtempSync(path.join(os.tmpdir(), 'mailgent-pg-volume-'));
      const linked = layout !== 'no cluster directory yet';
      const clusterAt = linked ? path.join(elsewhere, 'pgdata') : path.join(dir, 'postgres');
      if (linked) {
        chmodSync(elsewhere, 0o711); // the postgres OS user (under root) passes through to it
        mkdirSync(clusterAt);
        symlinkSync(clusterAt, path.join(dir, 'postgres'));
      }
      // A first start in a process group of its own, killed (with initdb) once initdb has begun writing the cluster.
      const script = `const { startEmbeddedPostgres } = await import(${JSON.stringify(path.join(ROOT, 'embedded/postgres.ts'))}); await startEmbeddedPostgres({ dataDir: ${JSON.stringify(dir)} });`;
      const first = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT, detached: true, stdio: 'ignore' });
      const exited = new Promise((r) => first.once('exit', r));
      try {
        const begun = () => [clusterAt, ...readdirSync(dir).map((d) => path.join(dir, d))].some((d) => existsSync(path.join(d, 'PG_VERSION')));
        const deadline = Date.now() + 120_000;
        while (!begun() && first.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
        expect(begun(), 'initdb began').toBe(true);
        process.kill(-first.pid!, 'SIGKILL');
        await exited;
        // initdb (in the killed group) may outlive its parent by a moment.
        for (const until = Date.now() + 10_000; processesUsing(dir).length > 0 && Date.now() < until; ) await new Promise((r) => setTimeout(r, 50));
        expect(processesUsing(dir)).toEqual([]);

        // Before, the cut-short cluster had its PG_VERSION: it was taken for a made one, and
        // PostgreSQL would not start on it (and, made aside, one behind a link could not be put in place).
        // (The service's secrets in its environment stay out of the server's: a superuser session reads that.)
        const marker = `probe-${randomBytes(8).toString('hex')}`;
        process.env.MAILGENT_ENV_PROBE = marker;
        const pg = await startEmbeddedPostgres({ dataDir: dir }).finally(() => delete process.env.MAILGENT_ENV_PROBE);
        try {
          expect(await withClient(pg.url, async (c) => (await c.query('SELECT 1 AS one')).rows)).toEqual([{ one: 1 }]);
          // What a program the server runs (COPY … FROM PROGRAM, archive_command) inherits: its environment.
          const environ = await withClient(pg.url, async (c) => {
            await c.query('CREATE TEMP TABLE environ (line text)');
            await c.query(`COPY environ FROM PROGRAM 'env'`);
            return (await c.query(`SELECT string_agg(line, E'\\n') AS e FROM environ`)).rows[0].e as string;
          });
          expect(environ).toContain('LC_MESSAGES=C');
          expect(environ).not.toContain(marker);
        } finally {
          await pg.stop();
        }
        expect(existsSync(path.join(clusterAt, 'PG_VERSION'))).toBe(true);
        expect(lstatSync(path.join(dir, 'postgres')).isSymbolicLink()).toBe(linked);
        // What the cut-short start left (aside, or its mark) is gone.
        expect(readdirSync(dir).filter((d) => d.startsWith('postgres.'))).toEqual(['postgres.password']);
      } finally {
        if (first.exitCode === null && first.signalCode === null) process.kill(-first.pid!, 'SIGKILL');
        rmSync(dir, { recursive: true, force: true });
        rmSync(elsewhere, { recursive: true, force: true });
      }
    });
  }

  it('the mark of a cut-short in-place start empties only the directory that start made it in, not one linked there since', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-pg-mark-'));
    try {
      // A start that made the cluster in place elsewhere died (its mark left); since then the
      // cluster directory holds something else (a restored cluster, say: here a stand-in).
      mkdirSync(path.join(dir, 'postgres'));
      writeFileSync(path.join(dir, 'postgres', 'PG_VERSION'), '18\n');
      writeFileSync(path.join(dir, 'postgres', 'restored.txt'), 'kept');
      writeFileSync(path.join(dir, 'postgres.initialising-in-place'), JSON.stringify({ pid: 2 ** 22 + 1, at: path.join(dir, 'another-volume') }));
      // The stand-in is no cluster PostgreSQL can run: the start fails, with what was there untouched.
      await expect(startEmbeddedPostgres({ dataDir: dir })).rejects.toThrow('PostgreSQL exited during start-up');
      // Before, the directory was emptied (and a fresh cluster made in it).
      expect(readFileSync(path.join(dir, 'postgres', 'restored.txt'), 'utf8')).toBe('kept');
      expect(existsSync(path.join(dir, 'postgres.initialising-in-place'))).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a cluster directory that is not a cluster (no PG_VERSION, not empty) is named and left as it is, never initialised over or removed', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-pg-notcluster-'));
    try {
      mkdirSync(path.join(dir, 'postgres'));
      writeFileSync(path.join(dir, 'postgres', 'notes.txt'), 'kept');
      await expect(startEmbeddedPostgres({ dataDir: dir })).rejects.toThrow(`${path.join(dir, 'postgres')} is not an embedded PostgreSQL cluster (no PG_VERSION) and is not empty: move it away, or give DATABASE_URL`);
      expect(readFileSync(path.join(dir, 'postgres', 'notes.txt'), 'utf8')).toBe('kept');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("the embedded Temporal server gets none of the service's secrets in its environment", { timeout: 120_000 }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-temporal-env-'));
    const marker = `marker-${randomBytes(8).toString('hex')}`;
    const saved = { VAULT_MASTER_KEY: process.env.VAULT_MASTER_KEY, ADMIN_TOKEN: process.env.ADMIN_TOKEN };
    process.env.VAULT_MASTER_KEY = `${marker}-key`;
    process.env.ADMIN_TOKEN = `${marker}-token`;
    let temporal: Awaited<ReturnType<typeof startEmbeddedTemporal>> | undefined;
    try {
      temporal = await startEmbeddedTemporal({ dataDir: dir, namespace: 'default' });
      const dbFile = path.join(dir, 'temporal.sqlite');
      const pid = readdirSync('/proc').find((p) => /^\d+$/.test(p) && (() => {
        try {
          return readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').includes(dbFile);
        } catch {
          return false;
        }
      })());
      expect(pid, 'the dev server process').toBeDefined();
      const environ = readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
      // Before, the whole of the service's environment: an inline master key, the admin token, database and SMTP passwords.
      expect(environ.filter((e) => e.includes(marker))).toEqual([]);
      expect(environ.some((e) => e.startsWith('PATH='))).toBe(true);
    } finally {
      for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
      await temporal?.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('one embedded Temporal server per DATA_DIR: a live owner refuses a second; a dead owner’s lock, or one whose pid another process has since, is taken over', { timeout: 120_000 }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-temporal-lock-'));
    const owner = spawn('sleep', ['60']);
    const refused = `the embedded Temporal server of ${dir} is run by another Mailgent process (pid ${owner.pid}); give this one TEMPORAL_ADDRESS`;
    try {
      // A lock of the pid alone (as written before the start time was added), and one with the owner's start time.
      writeFileSync(path.join(dir, 'temporal.lock'), String(owner.pid));
      await expect(startEmbeddedTemporal({ dataDir: dir, namespace: 'default' })).rejects.toThrow(refused);
      writeFileSync(path.join(dir, 'temporal.lock'), `${owner.pid} ${startTimeOf(owner.pid!)}`);
      await expect(startEmbeddedTemporal({ dataDir: dir, namespace: 'default' })).rejects.toThrow(refused);
      expect(existsSync(path.join(dir, 'temporal.sqlite'))).toBe(false);
      // The lock of a process killed (or of a machine restarted), its pid since another process's: before, refused until removed by hand.
      writeFileSync(path.join(dir, 'temporal.lock'), `${owner.pid} ${Number(startTimeOf(owner.pid!)) - 1}`);
      const reused = await startEmbeddedTemporal({ dataDir: dir, namespace: 'default' });
      expect(readFileSync(path.join(dir, 'temporal.lock'), 'utf8')).toBe(`${process.pid} ${startTimeOf(process.pid)}`);
      await reused.stop();
      owner.kill('SIGKILL');
      await new Promise((r) => owner.once('exit', r));
      writeFileSync(path.join(dir, 'temporal.lock'), String(owner.pid));
      const temporal = await startEmbeddedTemporal({ dataDir: dir, namespace: 'default' });
      expect(readFileSync(path.join(dir, 'temporal.lock'), 'utf8')).toBe(`${process.pid} ${startTimeOf(process.pid)}`);
      await temporal.stop();
      expect(existsSync(path.join(dir, 'temporal.lock'))).toBe(false);
    } finally {
      owner.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('two starts at once on one DATA_DIR: a lock found empty (its writer between creating and writing it) is read again, not taken over; one that stays empty is stale; one process at a time breaks a stale lock; a stop removes only its own', { timeout: 120_000 }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-temporal-lock-'));
    const lock = path.join(dir, 'temporal.lock');
    const owner = spawn('sleep', ['60']);
    const held = `${owner.pid} ${startTimeOf(owner.pid!)}`;
    let writer: NodeJS.Timeout | undefined;
    try {
      // The other starter has created the lock and writes it 300 ms later: before, read empty, taken for stale and claimed too.
      writeFileSync(lock, '');
      writer = setTimeout(() => writeFileSync(lock, held), 300);
      await expect(startEmbeddedTemporal({ dataDir: dir, namespace: 'default' })).rejects.toThrow(`is run by another Mailgent process (pid ${owner.pid})`);
      expect(readFileSync(lock, 'utf8')).toBe(held);
      expect(existsSync(path.join(dir, 'temporal.sqlite'))).toBe(false);
      // Empty for good (its writer died between the two): stale after a second, and claimed.
      writeFileSync(lock, '');
      const temporal = await startEmbeddedTemporal({ dataDir: dir, namespace: 'default' });
      expect(readFileSync(lock, 'utf8')).toBe(`${process.pid} ${startTimeOf(process.pid)}`);
      await temporal.stop();
      // Nothing a claim writes beside the lock (the break of a stale one) is left.
      expect(readdirSync(dir).filter((f) => f.startsWith('temporal.lock'))).toEqual([]);

      // A stale lock another starter is breaking (its .break fresh) is left to it; a break of a process that died breaking it (older than 10 s) is removed.
      owner.kill('SIGKILL');
      await new Promise((r) => owner.once('exit', r));
      writeFileSync(lock, held);
      writeFileSync(`${lock}.break`, '1 other-breaker');
      await expect(startEmbeddedTemporal({ dataDir: dir, namespace: 'default' })).rejects.toThrow(`could not claim ${lock}: another process was taking over its stale lock`);
      expect(readFileSync(lock, 'utf8')).toBe(held);
      utimesSync(`${lock}.break`, new Date(Date.now() - 20_000), new Date(Date.now() - 20_000));
      const again = await startEmbeddedTemporal({ dataDir: dir, namespace: 'default' });
      expect(readFileSync(lock, 'utf8')).toBe(`${process.pid} ${startTimeOf(process.pid)}`);
      // A stop removes the lock only while it is its own: not one another process holds since.
      writeFileSync(lock, held);
      await again.stop();
      expect(readFileSync(lock, 'utf8')).toBe(held);
      expect(readdirSync(dir).filter((f) => f.startsWith('temporal.lock'))).toEqual(['temporal.lock']);
      // This process's pid with another start time (a process of an earlier boot): claimed again as this process's, not kept as it was.
      writeFileSync(lock, `${process.pid} ${Number(startTimeOf(process.pid)) - 1}`);
      const third = await startEmbeddedTemporal({ dataDir: dir, namespace: 'default' });
      expect(readFileSync(lock, 'utf8')).toBe(`${process.pid} ${startTimeOf(process.pid)}`);
      await third.stop();
      expect(existsSync(lock)).toBe(false);
    } finally {
      clearTimeout(writer);
      owner.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a bad setting stops the process with one message naming the variable', async () => {
    const run = start({ DATA_DIR: dataDir, PORT: 'eighty' });
    expect(await run.exited).toBe(2);
    expect(run.output()).toBe('Invalid configuration:\n  PORT: must be a whole number, in digits (got "eighty")\n');
    const secret = start({ DATA_DIR: dataDir, VAULT_MASTER_KEY: 'too-short-to-be-a-key' });
    expect(await secret.exited).toBe(2);
    expect(secret.output()).toBe('Invalid configuration:\n  VAULT_MASTER_KEY: must be base64 of exactly 32 bytes (or several, comma-separated, the current one first), or the path of an existing keyring file\n');
    // An external database with no master key named: before, each process (each container) made one
    // of its own in its DATA_DIR, and what the API stored no worker could open.
    const fresh = mkdtempSync(path.join(os.tmpdir(), 'mailgent-keyless-'));
    try {
      const keyless = start({ DATA_DIR: fresh, DATABASE_URL: 'postgres://mailgent:pw@127.0.0.1:1/mailgent' });
      expect(await keyless.exited).toBe(2);
      expect(keyless.output()).toBe(
        'Invalid configuration:\n  VAULT_MASTER_KEY: must be set when DATABASE_URL is: every process using that database must share one master key (a key generated into one DATA_DIR would be lost with it; one made there before can be named by its path, VAULT_MASTER_KEY=<DATA_DIR>/master-keys.json)\n',
      );
      expect(existsSync(path.join(fresh, 'master-keys.json'))).toBe(false);
      // One part alone cannot share a server it embeds with the other part: before, an API started
      // rotations on a Temporal server of its own that no worker polled (accepted, never run), and a
      // worker without SMTP_URL "sent" every notice into a directory of its own.
      const external = { DATA_DIR: fresh, VAULT_MASTER_KEY: randomBytes(32).toString('base64') };
      const api = start({ ...external, DATABASE_URL: 'postgres://mailgent:pw@127.0.0.1:1/mailgent', SMTP_URL: 'smtp://127.0.0.1:1' }, { command: 'api' });
      expect(await api.exited).toBe(2);
      expect(api.output()).toBe(
        'Invalid configuration:\n  TEMPORAL_ADDRESS: must be set for `mailgent api` and `mailgent worker` (one part alone): a Temporal server embedded in this process has no other part to run or start its work; `mailgent serve` runs both parts with embedded servers\n' +
          // Before, it generated one into DATA_DIR: in a container, a new admin token at every re-creation.
          '  ADMIN_TOKEN: must be set for `mailgent api` alone: a token generated into its DATA_DIR would be lost with it (a container re-created, another API process with a DATA_DIR of its own), and with it every admin script\n',
      );
      // Every problem at once (the master key too, which DATABASE_URL will need).
      const worker = start({ DATA_DIR: fresh, TEMPORAL_ADDRESS: '127.0.0.1:1' }, { command: 'worker' });
      expect(await worker.exited).toBe(2);
      expect(worker.output()).toBe(
        'Invalid configuration:\n' +
          '  DATABASE_URL: must be set for `mailgent api` and `mailgent worker` (one part alone): a database embedded in this process is out of the other part\'s reach\n' +
          '  VAULT_MASTER_KEY: must be set when DATABASE_URL is (as it must be here): every process using that database must share one master key (a key generated into one DATA_DIR would be lost with it; one made there before can be named by its path, VAULT_MASTER_KEY=<DATA_DIR>/master-keys.json)\n' +
          '  SMTP_URL: must be set for `mailgent worker` alone: the embedded SMTP sink would keep every notice in this worker\'s DATA_DIR, recorded as sent\n',
      );
      expect(readdirSync(fresh)).toEqual([]);
    } finally {
      rmSync(fresh, { recursive: true, force: true });
    }
  });
});

function existsAdminTokenPrinted(output: string): boolean {
  return /Admin token \(shown once/.test(output);
}
