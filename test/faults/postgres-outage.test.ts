import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startHarness, type ApiResponse, type Harness } from '../support/harness';
import { expectCleanRun } from '../support/leaks';
import { TcpProxy } from '../support/tcp-proxy';
import { expectSettled, faultRow } from './checks';
import { rotatingKey, until, type RotatingKey } from './fixtures';

const OUTAGE_MS = 15_000;

interface Read {
  at: number;
  ms: number;
  res: ApiResponse;
}

/**
 * PostgreSQL becomes unreachable for 15 s for this file's API and worker (a TCP proxy between them
 * and the run's shared server cuts every connection and refuses new ones), while a rotation is in
 * flight and an agent keeps reading. Reads must fail closed — a 503 problem, fast — and no value
 * may ever leave without its audit row committed; afterwards everything carries on.
 */
describe('fault: PostgreSQL unreachable for 15 s', () => {
  let proxy: TcpProxy;
  let h: Harness;
  let key: RotatingKey | undefined;

  beforeAll(async () => {
    const pgUrl = new URL(inject('pgAdminUrl'));
    proxy = await new TcpProxy({ host: pgUrl.hostname, port: Number(pgUrl.port) }).start();
    h = await startHarness({ worker: true, databaseHost: proxy.address });
  });
  afterAll(async () => {
    await proxy.up().catch(() => undefined);
    await key?.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
    await proxy.stop();
  });

  it('mid-rotation and during vault.get: 503 problems, never a value without its audit row; then the rotation finishes', { timeout: 120_000 }, async ({ task }) => {
    const row = faultRow(task, 'PostgreSQL unreachable 15 s (mid-rotation, during vault.get)');
    const agent = await h.createIdentity();
    key = await rotatingKey(h, agent, { label: 'pg-outage', webhook: true });
    const reads: Read[] = [];
    let reading = true;
    const reader = async () => {
      while (reading) {
        const at = Date.now();
        const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { id: key!.id } });
        reads.push({ at, ms: Date.now() - at, res });
        if (res.status === 200) h.secret(res.body.value);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const readers = [reader(), reader()];

    // The provider holds the create, so the outage begins with the step in flight.
    key.provider.delayNext('create', 1, 2_000);
    const seen = key.provider.requests.length;
    const workflowId = await key.rotate();
    await until('the rotation\'s create at the provider', () => key!.provider.requests.slice(seen).some((r) => r.route === 'create'));
    const downAt = Date.now();
    await proxy.down();
    await new Promise((r) => setTimeout(r, OUTAGE_MS));
    await proxy.up();
    const upAt = Date.now();
    const recovered = await until('a read to succeed again', () => reads.find((r) => r.at > upAt && r.res.status === 200), 30_000);
    reading = false;
    await Promise.all(readers);

    // During the outage: every read answered, quickly, with a 503 problem and nothing else.
    const during = reads.filter((r) => r.at > downAt + 100 && r.at + r.ms < upAt);
    expect(during.length).toBeGreaterThan(10);
    for (const r of during) {
      expect(r.res.status, r.res.text).toBe(503);
      expect(r.res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(r.res.body).toMatchObject({ type: 'https://mailgent.dev/problems/unavailable', status: 503 });
      expect(r.res.headers.get('retry-after')).toBeTruthy();
      expect(r.ms).toBeLessThan(10_000);
    }
    // No 500s and no hangs at the edges either.
    expect(reads.filter((r) => ![200, 503].includes(r.res.status)).map((r) => `${r.res.status} ${r.res.text}`)).toEqual([]);
    // Every value that was returned has its audit row: a read that could not be audited returned nothing.
    const served = reads.filter((r) => r.res.status === 200).map((r) => r.res.headers.get('x-request-id'));
    const audited = await h.sql<{ request_id: string }>("SELECT request_id FROM audit_log WHERE action = 'vault.get' AND outcome = 'ok' AND request_id = ANY($1)", [served]);
    expect(new Set(audited.rows.map((r) => r.request_id))).toEqual(new Set(served));

    const { closedAt } = await expectSettled(h, key.expected(workflowId, 'rotated'));
    row.outcome = 'finished';
    row['reads 200/503'] = `${reads.filter((r) => r.res.status === 200).length}/${reads.filter((r) => r.res.status === 503).length}`;
    row['slowest 503'] = `${Math.max(...during.map((r) => r.ms))} ms`;
    row['up → first read'] = `${((recovered.at + recovered.ms - upAt) / 1000).toFixed(1)} s`;
    row['up → rotation closed'] = `${((closedAt - upAt) / 1000).toFixed(1)} s`;
    row['provider creates/revokes'] = `${key.provider.creates - key.before.creates}/${key.provider.revokes - key.before.revokes}`;
  });
  it('PostgreSQL stops answering, its connections open: vault.get answers 503 within its statement timeout, never a value, then recovers', { timeout: 120_000 }, async ({ task }) => {
    const row = faultRow(task, 'PostgreSQL stops answering, connections open (during vault.get)');
    const agent = await h.createIdentity();
    const value = h.secret('sk_stalled_db_value_0001');
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'stalled-read', kind: 'api_key', value } })).status).toBe(201);
    expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'stalled-read' } })).status).toBe(200);
    // A token never used yet: its lookup is the API's own statement, not the vault thread's (the
    // agent's token is remembered for 5 s, then looked up again too).
    const newcomer = await h.createIdentity();
    proxy.stall();
    const at = Date.now();
    const timed = async (go: () => Promise<ApiResponse>) => {
      const res = await go();
      return { res, ms: Date.now() - at };
    };
    // Before, the read waited as long as the database did not answer: forever (this test's timeout);
    // and before the API's own pool had a statement timeout, so did the newcomer's request (its token's
    // lookup) and the metadata list (the API's statement, behind the agent's remembered token).
    const [read, unknownToken, list] = await Promise.all([
      timed(() => h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'stalled-read' } })),
      timed(() => h.api('POST', '/v1/vault.get', { token: newcomer.token, body: { name: 'stalled-read' } })),
      timed(() => h.api('GET', '/v1/credentials', { token: agent.token })),
    ]);
    for (const { res } of [read, unknownToken, list]) {
      expect(res.status, res.text).toBe(503);
      expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/unavailable', status: 503 });
      expect(res.text).not.toContain(value);
    }
    const ms = read.ms;
    // The vault's statement timeout (10 s), the failure row's try on a new connection (5 s), the answer's wait for its row (3 s).
    expect(ms).toBeLessThan(30_000);
    // The API's statement timeout (15 s; the server does not answer, so the client's, not the server's).
    expect(unknownToken.ms).toBeLessThan(25_000);
    expect(list.ms).toBeLessThan(25_000);
    await proxy.down();
    await proxy.up();
    proxy.release();
    const back = await until('a read to succeed again', async () => {
      const r = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'stalled-read' } });
      return r.status === 200 ? r : undefined;
    }, 30_000);
    expect(back.body.value).toBe(value);
    row.outcome = 'failed closed';
    row['stall → 503'] = `${(ms / 1000).toFixed(1)} s (unknown token ${(unknownToken.ms / 1000).toFixed(1)} s, list ${(list.ms / 1000).toFixed(1)} s)`;
  });
});
