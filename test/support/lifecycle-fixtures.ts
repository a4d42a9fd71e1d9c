import { randomBytes, randomUUID } from 'node:crypto';
import pg from 'pg';
import { expect } from 'vitest';
import type { RotationProgress } from '../../workflows/types';
import type { Harness } from './harness';
import { readMailbox, recipients, type StoredMail } from './mail';
import type { ProviderServer } from './provider-server';
import { WebhookReceiver } from './webhook-receiver';

/** Fixtures for test/lifecycle.test.ts and test/rotation-failures.test.ts: real keys, real consumers, bounded waits. */

export interface Identity {
  id: string;
  token: string;
  name: string;
}

/**
 * Polls `probe` until `done` holds, for at most `timeoutMs`; a timeout names what was awaited and
 * the last value seen, so a failure says where the run got stuck.
 */
export async function waitFor<T>(
  what: string,
  probe: () => Promise<T>,
  done: (value: T) => boolean,
  { timeoutMs = 30_000, show = (value: T): unknown => value }: { timeoutMs?: number; show?: (value: T) => unknown } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (done(value)) return value;
    if (Date.now() > deadline) throw new Error(`waited ${timeoutMs} ms for ${what}; last seen: ${JSON.stringify(show(value))}`);
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
}

/**
 * Holds `table` exclusively in an open transaction of its own, so whatever reads it waits there: a
 * step held at the database. `waiting()` resolves once something waits for the lock; `release()`
 * rolls the transaction back (once; later calls do nothing).
 */
export async function holdTable(h: Harness, table: string): Promise<{ waiting(): Promise<unknown>; release(): Promise<void> }> {
  const client = new pg.Client({ connectionString: h.databaseUrl });
  await client.connect();
  let held = true;
  const release = async () => {
    if (!held) return;
    held = false;
    await client.query('ROLLBACK').catch(() => undefined);
    await client.end();
  };
  try {
    await client.query('BEGIN');
    await client.query(`LOCK TABLE ${pg.escapeIdentifier(table)} IN ACCESS EXCLUSIVE MODE`);
  } catch (err) {
    await release();
    throw err;
  }
  const waiters = async () =>
    (
      await h.sql(
        `SELECT count(*)::int AS n FROM pg_locks
          WHERE NOT granted AND relation = $1::regclass AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
        [table],
      )
    ).rows[0].n as number;
  return { waiting: () => waitFor(`something to wait for the lock on ${table}`, waiters, (n) => n > 0), release };
}

/** GET /v1/rotations/:id, as these tests read it. */
export interface RotationReport {
  rotationId: string;
  state: string;
  credentials: { credentialId: string; workflowId: string; runId: string | null; state: string; status: string | null; outcome: string | null; progress: RotationProgress | null }[];
}

/** Stores a value through the API and returns the credential's id; anything but a 201 throws. */
export async function storeValue(h: Harness, token: string, name: string, kind: string, value: string, extra: Record<string, unknown> = {}): Promise<string> {
  const res = await h.api('POST', '/v1/vault.store', { token, body: { name, kind, value, ...extra } });
  if (res.status !== 201) throw new Error(`storing ${name} failed: ${res.status} ${res.text}`);
  return res.body.id as string;
}

/** The credential's row in the owner's list (GET /v1/credentials). */
export async function credentialRow(h: Harness, token: string, id: string): Promise<any> {
  const list = await h.api('GET', '/v1/credentials?limit=1000', { token });
  return list.body.items.find((c: { id: string }) => c.id === id);
}

/** The versions of a credential marked revoked, in order. */
export async function revokedVersions(h: Harness, id: string): Promise<number[]> {
  return (await h.sql('SELECT version FROM secret_versions WHERE credential_id = $1 AND revoked_at IS NOT NULL ORDER BY version', [id])).rows.map((r) => r.version);
}

/** POST /v1/rotations for one credential (by name or id), expecting a 202. Returns the rotation id. */
export async function startRotation(h: Harness, token: string, credential: string): Promise<string> {
  const res = await h.api('POST', '/v1/rotations', { token, body: { credentials: [credential] } });
  expect(res.status, res.text).toBe(202);
  return res.body.rotationId as string;
}

export async function rotationReport(h: Harness, token: string, rotationId: string): Promise<RotationReport> {
  return (await h.api('GET', `/v1/rotations/${rotationId}`, { token })).body;
}

/** Mints a key at the provider server the way an operator would, with its admin token. */
export async function mintKey(h: Harness, server: ProviderServer): Promise<{ id: string; secret: string }> {
  const res = await fetch(`${server.url}/keys`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'idempotency-key': `fixture:${randomUUID()}` },
  });
  if (res.status !== 201) throw new Error(`minting a fixture key failed: ${res.status}`);
  const key = (await res.json()) as { id: string; secret: string };
  h.secret(key.secret);
  return key;
}

/** The status /whoami answers for a key: 200 while it works, 401 once revoked. */
export async function whoami(server: ProviderServer, secret: string): Promise<number> {
  const res = await fetch(`${server.url}/whoami`, { headers: { authorization: `Bearer ${secret}` } });
  await res.body?.cancel();
  return res.status;
}

/**
 * What a postgres-role rotation needs: a login role on the harness's cluster with a random password
 * (returned: version 1 of the credential), and the admin URL stored as a credential named
 * `adminName`. The password and the URL are registered as secrets for the leak checks.
 */
export async function loginRoleWithAdmin(
  h: Harness,
  role: string,
  adminName: string,
  store: (name: string, kind: string, value: string) => Promise<unknown>,
): Promise<string> {
  const v1 = h.secret(randomBytes(18).toString('base64url'));
  await h.sql(`CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN PASSWORD ${pg.escapeLiteral(v1)}`);
  h.secret(h.databaseUrl);
  const adminPassword = decodeURIComponent(new URL(h.databaseUrl).password);
  if (adminPassword) h.secret(adminPassword);
  await store(adminName, 'generic', h.databaseUrl);
  return v1;
}

/** Logs in as `role` with `password` on the harness's cluster; false on a wrong password. */
export async function canLogin(h: Harness, role: string, password: string): Promise<boolean> {
  const url = new URL(h.databaseUrl);
  url.username = role;
  url.password = encodeURIComponent(password);
  const client = new pg.Client({ connectionString: url.href });
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.query('SELECT 1');
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === '28P01') return false;
    throw err;
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Every message the SMTP sink holds for `address` (the sink is shared by all test files). */
export async function mailTo(address: string): Promise<StoredMail[]> {
  return (await readMailbox()).filter((m) => recipients(m.mail).includes(address));
}

export interface ConsumerRead {
  event: string;
  version: number;
  status: number;
  label?: string;
}

/**
 * A webhook consumer as a real one would behave: on credential.pending or credential.restored it
 * reads that version itself with its own identity (POST /v1/vault.get by id), starts "running" it,
 * and reports it when asked to verify. It starts out running `runs`.
 */
export function consumer(h: Harness, signingKey: string, reader: Identity, runs: number) {
  const receiver = new WebhookReceiver(signingKey);
  receiver.answerVersion = runs;
  const reads: ConsumerRead[] = [];
  const values = new Map<number, string>();
  receiver.onEvent = async ({ event }) => {
    if (event.type !== 'credential.pending' && event.type !== 'credential.restored') return;
    const res = await h.api('POST', '/v1/vault.get', { token: reader.token, body: { id: event.credentialId, version: event.version } });
    reads.push({ event: event.type, version: event.version, status: res.status, label: res.body?.label });
    if (res.status !== 200) return;
    values.set(res.body.version, h.secret(res.body.value as string));
    receiver.answerVersion = res.body.version;
  };
  return { receiver, reads, values };
}
