import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { scheduleId } from '../worker/schedules';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { mintKey } from './support/lifecycle-fixtures';
import { ProviderServer } from './support/provider-server';
import { waitForMail } from './support/mail';
import { WebhookReceiver } from './support/webhook-receiver';
import { startWorkerProcess as startWorker, type WorkerProcess } from './support/worker-process';

async function until<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined && value !== false) return value as T;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('a worker killed mid-rotation', () => {
  let h: Harness;
  let provider: ProviderServer;
  let receiver: WebhookReceiver;
  const workers: WorkerProcess[] = [];

  beforeAll(async () => {
    h = await startHarness({ worker: false });
    provider = await new ProviderServer().start();
    receiver = new WebhookReceiver(h.secret(`whsec_${randomBytes(16).toString('hex')}`));
    await receiver.start();
  });
  afterAll(async () => {
    for (const w of workers) await w.kill();
    for (const id of [scheduleId('rotation-sweep', h.taskQueue), scheduleId('orphan-report', h.taskQueue)]) {
      await h.client.schedule.getHandle(id).delete().catch(() => undefined);
    }
    await receiver.stop();
    await provider.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('SIGKILL during the dependents step: a new worker finishes the rotation and the provider minted exactly one key', { timeout: 180_000 }, async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const agent = await h.createIdentity();
    const store = (body: Record<string, unknown>) => h.api('POST', '/v1/vault.store', { token: agent.token, body });
    expect((await store({ name: 'provider-admin', kind: 'token', value: h.secret(provider.adminToken) })).status).toBe(201);
    expect((await store({ name: 'webhook-key', kind: 'generic', value: receiver.signingKey })).status).toBe(201);
    // Version 1 is a real key at the provider, so revoking it later is observable there.
    const v1 = await mintKey(h, provider);
    const stored = await store({
      name: 'payments-api',
      kind: 'api_key',
      value: v1.secret,
      externalId: v1.id,
      owners: [owner],
      rotation: {
        provider: 'http',
        graceHours: 0,
        settings: {
          create: { url: `${provider.url}/keys` },
          verify: { url: `${provider.url}/whoami` },
          revoke: { url: `${provider.url}/keys/{id}` },
          auth: { credential: 'provider-admin' },
          valuePath: 'secret',
          idPath: 'id',
        },
      },
      dependents: [{ type: 'webhook', settings: { url: receiver.url, signingKeyCredential: 'webhook-key' } }],
    });
    expect(stored.status).toBe(201);
    const createsBefore = provider.creates;

    // The dependent answers slowly, so the worker is busy inside the apply step when it dies.
    receiver.delayMs = 5_000;
    const firstWorker = startWorker(h.workerEnv());
    workers.push(firstWorker);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['payments-api'] } });
    expect(started.status).toBe(202);
    await until('the pending event at the dependent', () => {
      if (firstWorker.proc.exitCode !== null) throw new Error(`the worker exited early:\n${firstWorker.output()}`);
      return receiver.events.find((e) => e.event.type === 'credential.pending');
    }).catch(async (err) => {
      const state = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      throw new Error(`${(err as Error).message}\nrotation: ${state.text}\nworker output:\n${firstWorker.output()}`, { cause: err });
    });
    firstWorker.proc.kill('SIGKILL');
    expect(await firstWorker.exited).toBeNull();

    receiver.delayMs = 0;
    const secondWorker = startWorker(h.workerEnv());
    workers.push(secondWorker);
    const report = await until(
      'the rotation to finish after the restart',
      async () => {
        const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
        return ['succeeded', 'failed'].includes(r.body.state) ? r.body : undefined;
      },
      120_000,
    ).catch((err) => {
      throw new Error(`${(err as Error).message}\nworker output:\n${secondWorker.output()}`, { cause: err });
    });
    expect(report.state).toBe('succeeded');

    // Exactly one new key: the create step had completed before the kill and was not run again.
    expect(provider.creates - createsBefore).toBe(1);
    const current = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'payments-api' } });
    h.secret(current.body.value);
    expect(current.body.version).toBe(2);
    expect(provider.isActive(current.body.value)).toBe(true);
    expect(provider.isActive(v1.secret)).toBe(false);
    // The interrupted apply was delivered again (same idempotency key), then verify and promoted.
    const types = receiver.events.map((e) => e.event.type);
    expect(types.filter((t) => t === 'credential.pending').length).toBeGreaterThanOrEqual(2);
    expect(new Set(receiver.events.filter((e) => e.event.type === 'credential.pending').map((e) => e.event.id)).size).toBe(1);
    expect(types).toContain('credential.verify');
    expect(types).toContain('credential.promoted');
    const notices = await waitForMail(owner, 1);
    expect(notices.map((m) => m.mail.subject)).toEqual(['[mailgent] Rotated payments-api']);
    for (const secret of [v1.secret, current.body.value]) expect(notices[0]!.raw).not.toContain(secret);
  });
});
