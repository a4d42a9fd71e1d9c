import { randomBytes } from 'node:crypto';
import { expect } from 'vitest';
import type { Harness } from '../support/harness';
import { mintKey, type Identity } from '../support/lifecycle-fixtures';
import { ProviderServer } from '../support/provider-server';
import { WebhookReceiver } from '../support/webhook-receiver';
import type { Expected } from './checks';

/**
 * One fault scenario's world: a fresh key service (its counters are the scenario's alone), an API
 * key whose v1 it minted, an owner address of its own, and optionally a webhook consumer.
 */
export interface RotatingKey {
  name: string;
  id: string;
  owner: string;
  provider: ProviderServer;
  receiver?: WebhookReceiver;
  /** The provider's counters once v1 exists. */
  before: { creates: number; revokes: number };
  /** POST /v1/rotations for this key; returns its workflow id. */
  rotate(): Promise<string>;
  readCurrent(): Promise<{ version: number; value: string }>;
  /** The common end checks' expectations for this key. */
  expected(workflowId: string, outcome: Expected['outcome'], extra?: Partial<Expected>): Expected;
  stop(): Promise<void>;
}

export async function rotatingKey(
  h: Harness,
  agent: Identity,
  opts: { label: string; graceHours?: number; maxAttempts?: number; verifyWaitSeconds?: number; webhook?: boolean; signingKeyCredential?: string },
): Promise<RotatingKey> {
  const tag = randomBytes(3).toString('hex');
  const name = `${opts.label}-${tag}`;
  const owner = `${name}@example.com`;
  const store = async (body: Record<string, unknown>) => {
    const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body });
    expect(res.status, res.text).toBe(201);
    return res.body.id as string;
  };
  const provider = await new ProviderServer().start();
  await store({ name: `${name}-admin`, kind: 'token', value: h.secret(provider.adminToken) });
  let receiver: WebhookReceiver | undefined;
  const dependents = [];
  if (opts.webhook) {
    receiver = new WebhookReceiver(h.secret(`whsec_${randomBytes(16).toString('hex')}`));
    await receiver.start();
    await store({ name: `${name}-hook`, kind: 'generic', value: receiver.signingKey });
    dependents.push({ type: 'webhook', settings: { url: receiver.url, signingKeyCredential: `${name}-hook` } });
  }
  const v1 = await mintKey(h, provider);
  const id = await store({
    name,
    kind: 'api_key',
    value: v1.secret,
    externalId: v1.id,
    owners: [owner],
    rotation: {
      provider: 'http',
      graceHours: opts.graceHours ?? 0,
      maxAttempts: opts.maxAttempts ?? 3,
      settings: {
        create: { url: `${provider.url}/keys` },
        verify: { url: `${provider.url}/whoami`, ...(opts.verifyWaitSeconds !== undefined ? { waitSeconds: opts.verifyWaitSeconds } : {}) },
        revoke: { url: `${provider.url}/keys/{id}` },
        auth: { credential: `${name}-admin` },
        valuePath: 'secret',
        idPath: 'id',
      },
    },
    dependents,
  });
  const readCurrent = async () => {
    const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { id } });
    expect(res.status, res.text).toBe(200);
    h.secret(res.body.value);
    return { version: res.body.version as number, value: res.body.value as string };
  };
  const before = { creates: provider.creates, revokes: provider.revokes };
  return {
    name,
    id,
    owner,
    provider,
    receiver,
    before,
    async rotate() {
      const res = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [id], reason: `fault: ${opts.label}` } });
      expect(res.status, res.text).toBe(202);
      return res.body.workflowIds[0] as string;
    },
    readCurrent,
    expected: (workflowId, outcome, extra = {}) => ({
      workflowId,
      outcome,
      credentialId: id,
      currentVersion: outcome === 'rotated' ? 2 : 1,
      provider,
      before,
      creates: 1,
      revokes: 1,
      owner,
      notices: [outcome === 'rotated' ? `[mailgent] Rotated ${name}` : `[mailgent] Rotation FAILED for ${name}`],
      readCurrent,
      ...extra,
    }),
    async stop() {
      await receiver?.stop();
      await provider.stop();
    },
  };
}

/** Holds the first webhook event of `type` for `ms` (the dependent's call is in flight); the returned wait resolves when it arrived. */
export function holdEvent(receiver: WebhookReceiver, type: string, ms: number): () => Promise<void> {
  let held = false;
  receiver.onEvent = async ({ event }) => {
    if (held || event.type !== type) return;
    held = true;
    await new Promise((r) => setTimeout(r, ms));
  };
  return () => until(`the ${type} event at the webhook consumer`, () => held).then(() => undefined);
}

/** Polls `probe` until it returns something other than undefined/false. */
export async function until<T>(what: string, probe: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined && value !== false) return value as T;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
