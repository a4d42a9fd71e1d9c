import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startChild, waitUntilReady } from '../../embedded/child';
import { freePort, withFreshPorts } from '../../embedded/ports';

const listen = (port: number) =>
  new Promise<net.Server>((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });

describe('freePort', () => {
  it('picks a port below the range the kernel gives outgoing connections (where it says which), and one that can be listened on', async () => {
    const range = '/proc/sys/net/ipv4/ip_local_port_range';
    const low = existsSync(range) ? Number(readFileSync(range, 'utf8').trim().split(/\s+/)[0]) : undefined;
    const ports = await Promise.all(Array.from({ length: 20 }, () => freePort()));
    for (const port of ports) {
      expect(port).toBeGreaterThanOrEqual(low === undefined ? 1 : 20_000);
      expect(port).toBeLessThan(low ?? 65_536);
    }
    (await listen(ports[0]!)).close();
  });
});

describe('withFreshPorts', () => {
  const servers: net.Server[] = [];
  afterAll(() => servers.forEach((s) => s.close()));

  it('starts again on new ports when the port it was given was taken in between', async () => {
    const taken = await listen(0);
    servers.push(taken);
    const takenPort = (taken.address() as net.AddressInfo).port;
    const tried: number[] = [];
    const server = await withFreshPorts(async () => {
      const port = tried.length === 0 ? takenPort : await freePort();
      tried.push(port);
      return listen(port);
    });
    servers.push(server);
    expect(tried).toHaveLength(2);
    expect(tried[0]).toBe(takenPort);
    expect((server.address() as net.AddressInfo).port).toBe(tried[1]);
  });

  it('gives up with the clash after three tries, and does not retry any other failure', async () => {
    const taken = await listen(0);
    servers.push(taken);
    const port = (taken.address() as net.AddressInfo).port;
    let calls = 0;
    await expect(withFreshPorts(() => (calls++, listen(port)))).rejects.toThrow(/EADDRINUSE: address already in use/);
    expect(calls).toBe(3);
    calls = 0;
    await expect(withFreshPorts(async () => (calls++, Promise.reject(new Error('initdb failed'))))).rejects.toThrow('initdb failed');
    expect(calls).toBe(1);
  });

  it('a server that says it is still starting (PostgreSQL replaying its WAL) is waited for past the timeout; one that does not answer is not', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'ports-'));
    const child = startChild('/bin/sh', ['-c', 'sleep 30'], { logFile: path.join(dir, 'server.log') });
    try {
      const startingUntil = Date.now() + 1_500;
      const recovering = async () => {
        if (Date.now() < startingUntil) throw Object.assign(new Error('the database system is starting up'), { code: '57P03' });
      };
      const patience = { starting: (err: unknown) => (err as { code?: string }).code === '57P03', maxMs: 10_000 };
      // Before: killed at the timeout (500 ms here, a minute in the service), the recovery begun again at the next start.
      await waitUntilReady(child, 'the test server', recovering, 500, patience);
      expect(Date.now()).toBeGreaterThanOrEqual(startingUntil);
      expect(child.isRunning()).toBe(true);
      // Silent (no answer at all), it is not waited for past its timeout, patience or not.
      const silent = await waitUntilReady(child, 'the test server', () => Promise.reject(new Error('connect ECONNREFUSED')), 500, patience).catch((e: Error) => e);
      expect((silent as Error).message).toMatch(/^the test server was not ready after \d+s \(connect ECONNREFUSED\)/);
    } finally {
      await child.stop('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a server that exits during start-up is reported with its last log lines, which a clash is recognised by', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'ports-'));
    try {
      const child = startChild('/bin/sh', ['-c', 'echo starting; sleep 0.2; echo "listen tcp 127.0.0.1:1: bind: address already in use" >&2; exit 1'], {
        logFile: path.join(dir, 'server.log'),
      });
      const error = await waitUntilReady(child, 'the test server', () => Promise.reject(new Error('not yet')), 10_000).catch((e: Error) => e);
      expect((error as Error).message).toMatch(/^the test server exited during start-up/);
      expect((error as Error).message).toContain('bind: address already in use');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
