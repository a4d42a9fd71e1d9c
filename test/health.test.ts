import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createApp } from '../api/app';
import { createLogger } from '../core/logger';
import { openServices } from '../core/services';
import { freePort } from '../embedded/ports';
import { generateMasterKey, Keyring, masterKeyId } from '../vault/keyring';
import { newToken } from '../vault/identities';
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
    expect(ready.body).toEqual({ status: 'ready', checks: { database: 'ok', temporal: 'ok' } });
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
    const app = createApp({ ...services, dependentTypes: h.deps.dependents, client: h.client, namespace: 'default', taskQueue: 'none', adminToken: newToken(), logger: createLogger({ level: 'silent' }) });
    const server = app.listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      const res = await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/readyz`);
      expect(res.status).toBe(503);
      const body = (await res.json()) as { status: string; checks: { database: string; temporal: string } };
      expect(body.status).toBe('not_ready');
      expect(body.checks.temporal).toBe('ok');
      expect(body.checks.database).toMatch(/^unavailable: .*ECONNREFUSED/);
      expect(JSON.stringify(body)).not.toContain('nothing');
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
