import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createApp } from '../api/app';
import { createLogger } from '../core/logger';
import { openServices } from '../core/services';
import { freePort } from '../embedded/ports';
import { generateMasterKey, Keyring, masterKeyId } from '../vault/keyring';
import { newToken } from '../vault/identities';
import { ReadThread } from '../vault/read-thread';
import { startHarness, type Harness } from './support/harness';

describe('health, readiness and metrics', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => h.close());

  it('/healthz and /readyz answer without a token', async () => {
    expect((await h.api('GET', '/healthz')).body).toEqual({ status: 'ok' });
    const ready = await h.api('GET', '/readyz');
    expect(ready.status).toBe(200);
    // The harness's API runs its vault calls in a thread (READ_THREAD on), as `npm start` does.
    expect(ready.body).toEqual({ status: 'ready', checks: { database: 'ok', temporal: 'ok', vault: 'ok' } });
  });

  it('/readyz is 503 when the vault thread cannot reach the database, the main pool still answering', async () => {
    const logged: string[] = [];
    const logger = createLogger({ level: 'warn', destination: { write: (line: string) => logged.push(line) } });
    // A thread of its own whose pool is refused: every primitive would fail while SELECT 1 on the
    // main pool, the only database check before, passes.
    const readThread = new ReadThread({ databaseUrl: `postgres://nobody:nothing@127.0.0.1:${await freePort()}/none`, poolSize: 1, keyringSetting: h.keyringFile });
    const app = createApp({ ...h.services, readThread, dependentTypes: h.deps.dependents, client: h.client, namespace: 'default', taskQueue: 'none', adminToken: newToken(), logger });
    const server = app.listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
      const res = await fetch(`${url}/readyz`);
      expect(res.status).toBe(503);
      const body = (await res.json()) as Record<string, unknown>;
      expect(body).toMatchObject({ status: 503, detail: 'not ready: the vault thread is unavailable' });
      expect(body.checks).toEqual({ database: 'ok', temporal: 'ok', vault: 'unavailable' });
      expect(JSON.stringify(body)).not.toContain('ECONNREFUSED');
      expect(logged.some((line) => line.includes('readiness check failed') && line.includes('"check":"vault"') && line.includes('ECONNREFUSED'))).toBe(true);
    } finally {
      server.close();
      await readThread.close();
    }
  });

  it('/readyz is 503 and says which dependency is down', async () => {
    const key = generateMasterKey();
    const services = openServices({
      databaseUrl: `postgres://nobody:nothing@127.0.0.1:${await freePort()}/none`,
      poolSize: 1,
      keyring: Keyring.fromKeys([{ id: masterKeyId(key), key }]),
      smtpUrl: 'smtp://127.0.0.1:1',
      mailFrom: 'x@localhost',
    });
    const logged: string[] = [];
    const logger = createLogger({ level: 'warn', destination: { write: (line: string) => logged.push(line) } });
    const app = createApp({ ...services, dependentTypes: h.deps.dependents, client: h.client, namespace: 'default', taskQueue: 'none', adminToken: newToken(), logger });
    const server = app.listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      const res = await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/readyz`);
      expect(res.status).toBe(503);
      expect(res.headers.get('content-type')).toContain('application/problem+json');
      const body = (await res.json()) as Record<string, unknown>;
      expect(body).toMatchObject({ type: 'https://mailgent.dev/problems/unavailable', status: 503, detail: 'not ready: the database is unavailable' });
      expect(body.checks).toEqual({ database: 'unavailable', temporal: 'ok' });
      // The route needs no token: the reason (the port refused, the user name) is for the log only.
      const text = JSON.stringify(body);
      for (const internal of ['ECONNREFUSED', 'nobody', 'nothing', '127.0.0.1']) expect(text).not.toContain(internal);
      expect(logged.some((line) => line.includes('readiness check failed') && line.includes('ECONNREFUSED'))).toBe(true);
      // A primitive with the database down is a 503 problem, not a 500.
      const stored = await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/vault.get`, {
        method: 'POST',
        headers: { authorization: `Bearer ${newToken()}`, 'content-type': 'application/json' },
        body: '{"name":"x"}',
      });
      expect(stored.status).toBe(503);
      expect(stored.headers.get('retry-after')).toBe('5');
    } finally {
      server.close();
      await services.close();
    }
  });

  it('/metrics counts requests by route pattern, not raw path', async () => {
    const agent = await h.createIdentity();
    await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'missing' } });
    await h.api('GET', `/v1/random-${Date.now()}`, { token: agent.token });
    const res = await h.api('GET', '/metrics');
    expect(res.status).toBe(200);
    expect(res.text).toMatch(/mailgent_http_requests_total\{method="POST",route="\/v1\/vault.get",status="404"\} 1/);
    expect(res.text).toMatch(/mailgent_http_requests_total\{method="GET",route="unmatched",status="404"\} 1/);
    expect(res.text).not.toContain('random-');
    expect(res.text).toContain('mailgent_process_resident_memory_bytes');
  });
});
