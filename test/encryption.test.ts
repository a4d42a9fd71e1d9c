import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ApplicationFailure } from '@temporalio/common';
import { KEY_FAILED, permanentErrorsFail } from '../activities/support';
import { createApp } from '../api/app';
import { rekey } from '../cli/rekey';
import { KeyIntegrityError } from '../core/errors';
import { loadConfig } from '../core/config';
import { createLogger } from '../core/logger';
import { openServices } from '../core/services';
import { newToken } from '../vault/identities';
import { refingerprintSeeds } from '../vault/seed-fingerprints';
import { generateMasterKey, Keyring, readKeyringFile } from '../vault/keyring';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

const silent = createLogger({ level: 'silent' });

describe('envelope encryption at rest', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  const values: Record<string, string> = {};

  const store = async (name: string, value: string) => {
    values[name] = h.secret(value);
    const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name, kind: 'generic', value } });
    expect(res.status).toBe(201);
    return res.body.id as string;
  };
  const get = (name: string) => h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } });

  beforeAll(async () => {
    h = await startHarness();
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('stores no plaintext: the row holds a nonce, the ciphertext and the tag', async () => {
    const id = await store('plain-check', 'this-is-the-plaintext-value');
    const row = (await h.sql('SELECT sealed, data_key_id FROM secret_versions WHERE credential_id = $1', [id])).rows[0];
    expect(row.sealed.includes(Buffer.from('this-is-the-plaintext-value'))).toBe(false);
    expect(row.sealed.length).toBe(12 + 'this-is-the-plaintext-value'.length + 16);
    const dataKey = (await h.sql('SELECT identity_id, master_key_id, wrapped FROM data_keys WHERE id = $1', [row.data_key_id])).rows[0];
    expect(dataKey.identity_id).toBe(agent.id);
    expect(dataKey.wrapped.length).toBe(12 + 32 + 16);
  });

  it('a flipped ciphertext byte gives an integrity error, audited, with no value', async () => {
    const id = await store('flipped', 'value-that-will-be-tampered');
    await h.sql('UPDATE secret_versions SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1) WHERE credential_id = $1', [id]);
    const res = await get('flipped');
    expect(res.status).toBe(500);
    expect(res.body).toMatchObject({
      type: 'https://mailgent.dev/problems/integrity-failure',
      title: 'Stored data failed its integrity check',
      detail: "version 1 of 'flipped' failed authentication: it was altered or does not belong to this record",
    });
    const audit = (await h.sql("SELECT outcome, detail FROM audit_log WHERE credential_id = $1 AND action = 'vault.get'", [id])).rows;
    expect(audit).toEqual([{ outcome: 'failed', detail: { name: 'flipped', version: 1, error: 'integrity-failure', status: 500 } }]);
  });

  it('two ciphertexts swapped between rows both fail; swapped back, both read again', async () => {
    const a = await store('swap-a', 'swap-value-aaaaaaaa');
    const b = await store('swap-b', 'swap-value-bbbbbbbb');
    const swap = () =>
      h.sql(`UPDATE secret_versions v SET sealed = o.sealed
               FROM secret_versions o
              WHERE v.credential_id IN ($1, $2) AND o.credential_id IN ($1, $2) AND o.credential_id <> v.credential_id`, [a, b]);
    await swap();
    expect((await get('swap-a')).body.type).toBe('https://mailgent.dev/problems/integrity-failure');
    expect((await get('swap-b')).body.type).toBe('https://mailgent.dev/problems/integrity-failure');
    await swap();
    expect((await get('swap-a')).body.value).toBe('swap-value-aaaaaaaa');
  });

  it('a version moved to another version number fails (the AAD binds the version)', async () => {
    const id = await store('moved', 'moved-version-one');
    await store('moved', 'moved-version-two');
    await h.sql(`UPDATE secret_versions SET sealed = (SELECT sealed FROM secret_versions WHERE credential_id = $1 AND version = 1)
                  WHERE credential_id = $1 AND version = 2`, [id]);
    expect((await get('moved')).status).toBe(500);
  });

  it('a tampered wrapped data key fails for a process that has not cached it', async () => {
    await store('dk-check', 'data-key-check-value');
    await h.sql('UPDATE data_keys SET wrapped = set_byte(wrapped, 15, get_byte(wrapped, 15) # 1) WHERE identity_id = $1', [agent.id]);
    const fresh = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(h.keyringFile), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    const logged: string[] = [];
    const app = createApp({
      ...fresh,
      dependentTypes: h.deps.dependents,
      client: h.client,
      namespace: 'default',
      taskQueue: 'none',
      adminToken: newToken(),
      logger: createLogger({ level: 'error', destination: { write: (line: string) => logged.push(line) } }),
    });
    const server = app.listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      await expect(fresh.vault.get({ identityId: agent.id, actor: 'test' }, { name: 'dk-check' })).rejects.toThrow(/data key .* failed authentication/);
      // Over HTTP the caller learns that a key failed, not which (key ids, master key ids): those are in the log.
      const res = await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/vault.get`, {
        method: 'POST',
        headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'dk-check' }),
      });
      expect(res.status).toBe(500);
      const body = (await res.json()) as Record<string, unknown>;
      expect(body).toMatchObject({ type: 'https://mailgent.dev/problems/integrity-failure', detail: KeyIntegrityError.PUBLIC_DETAIL });
      const dataKeyId = (await h.sql('SELECT id FROM data_keys WHERE identity_id = $1', [agent.id])).rows[0].id as string;
      expect(JSON.stringify(body)).not.toContain(dataKeyId);
      expect(logged.some((line) => line.includes(`data key ${dataKeyId} failed authentication`))).toBe(true);
      // In a rotation's activity the same: the run's progress, outcome and notice get no key ids.
      const failure = await permanentErrorsFail(() => fresh.vault.get({ identityId: agent.id, actor: 'test' }, { name: 'dk-check' })).catch((e: unknown) => e);
      expect(failure).toBeInstanceOf(ApplicationFailure);
      expect(failure).toMatchObject({ type: 'integrity-failure', nonRetryable: true, message: KEY_FAILED });
    } finally {
      server.close();
      await fresh.close();
    }
    await h.sql('UPDATE data_keys SET wrapped = set_byte(wrapped, 15, get_byte(wrapped, 15) # 1) WHERE identity_id = $1', [agent.id]);
  });

  it('a fingerprint key deleted from the database fails closed: no new key is made in its place, no pasted value is written back', async () => {
    const value = 'fingerprinted-value-0f3c2a9d1e';
    await store('fp-check', value);
    const saved = (await h.sql(`SELECT name, master_key_id, wrapped FROM service_keys WHERE name = 'fingerprint'`)).rows[0];
    expect(saved).toBeDefined();
    await h.sql(`DELETE FROM service_keys WHERE name = 'fingerprint'`);
    const fresh = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(h.keyringFile), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      const auditBefore = (await h.sql('SELECT coalesce(max(seq), 0) AS s FROM audit_log')).rows[0].s as string;
      // Before, a new random key was made: the value pasted as a name no longer matched its fingerprint,
      // and the 404 (and its audit row) carried it as given.
      // A read fails closed: the name is withheld unchecked.
      const missed = (await fresh.vault.get({ identityId: agent.id, actor: 'test' }, { name: value }).catch((e: unknown) => e)) as Error;
      expect(missed).toMatchObject({ status: 404, refWithheld: true });
      expect(missed.message).not.toContain(value);
      await expect(fresh.vault.store({ identityId: agent.id, actor: 'test' }, { name: 'fp-after', kind: 'generic', value: h.secret('another-value-7b1e4c') })).rejects.toThrow(
        /service key fingerprint is missing/,
      );
      expect((await h.sql(`SELECT count(*)::int AS n FROM service_keys WHERE name = 'fingerprint'`)).rows[0].n).toBe(0);
      expect((await h.sql(`SELECT count(*)::int AS n FROM credentials WHERE name = 'fp-after'`)).rows[0].n).toBe(0);
      const written = (await h.sql(`SELECT a::text AS d, detail->>'nameWithheld' AS w FROM audit_log a WHERE seq > $1`, [auditBefore])).rows;
      expect(written.map((r) => r.w)).toContain('unchecked');
      expect(written.filter((r) => (r.d as string).includes(value))).toEqual([]);
    } finally {
      await fresh.close();
      await h.sql('INSERT INTO service_keys (name, master_key_id, wrapped) VALUES ($1, $2, $3)', [saved.name, saved.master_key_id, saved.wrapped]);
    }
    // Put back, the key is the one the values were fingerprinted with: the pasted value is withheld again.
    const res = await get(value);
    expect(res.status).toBe(404);
    expect(JSON.stringify(res.body)).not.toContain(value);
  });

  it('a fingerprint key lost with no backup is recovered as README says: fingerprints cleared and listed, a new key made as the services start, every version fingerprinted again', async () => {
    const value = 'recovered-fingerprint-value-7c1d0e';
    await store('fp-recovered', value);
    const savedKey = (await h.sql(`SELECT name, master_key_id, wrapped FROM service_keys WHERE name = 'fingerprint'`)).rows[0];
    const savedPrints = (await h.sql('SELECT credential_id, version, fingerprint FROM secret_versions')).rows;
    await h.sql(`DELETE FROM service_keys WHERE name = 'fingerprint'`);
    // README's recovery, with every service stopped.
    await h.sql(`UPDATE secret_versions SET fingerprint = NULL`);
    await h.sql(`INSERT INTO seed_fingerprints_pending (credential_id, version) SELECT credential_id, version FROM secret_versions ON CONFLICT DO NOTHING`);
    const fresh = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(h.keyringFile), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      // Every version that opens (two tests above left theirs tampered with, which keep none).
      const set = await refingerprintSeeds(fresh.pool, fresh.secrets);
      expect(set).toBeGreaterThan(0);
      expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions WHERE fingerprint IS NOT NULL')).rows[0].n).toBe(set);
      const missed = (await fresh.vault.get({ identityId: agent.id, actor: 'test' }, { name: value }).catch((e: unknown) => e)) as Error;
      expect(missed).toMatchObject({ status: 404, refWithheld: true });
      expect(missed.message).toContain('it is a value stored in the vault');
    } finally {
      await fresh.close();
      await h.sql(`DELETE FROM service_keys WHERE name = 'fingerprint'`);
      await h.sql('INSERT INTO service_keys (name, master_key_id, wrapped) VALUES ($1, $2, $3)', [savedKey.name, savedKey.master_key_id, savedKey.wrapped]);
      for (const r of savedPrints) await h.sql('UPDATE secret_versions SET fingerprint = $3 WHERE credential_id = $1 AND version = $2', [r.credential_id, r.version, r.fingerprint]);
    }
  });

  it('rekey re-wraps the data keys under a new master key without touching secret rows, and gives each identity a new data key for what it stores next', async () => {
    const other = await h.createIdentity();
    values['other-identity'] = h.secret('other-identity-value');
    await h.api('POST', '/v1/vault.store', { token: other.token, body: { name: 'other-identity', kind: 'generic', value: 'other-identity-value' } });
    const before = (await h.sql('SELECT credential_id, version, sealed FROM secret_versions ORDER BY 1, 2')).rows;
    const oldKeyId = readKeyringFile(h.keyringFile).current;
    const activeKeys = async () =>
      Object.fromEntries((await h.sql('SELECT identity_id, id FROM data_keys WHERE retired_at IS NULL AND identity_id = ANY($1::uuid[])', [[agent.id, other.id]])).rows.map((r) => [r.identity_id, r.id]));
    const oldActive = await activeKeys();
    expect(Object.keys(oldActive)).toHaveLength(2);
    // A copy of the data keys' rows as a backup of today holds them (wrapped under today's master key).
    const backup = (await h.sql('SELECT id FROM data_keys')).rows.map((r) => r.id as string);

    const config = loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl });
    const result = await rekey(config, silent);

    expect(result.rewrapped).toBe(2);
    // Before, each identity kept sealing new versions under the same key material: an old master key
    // with a backup of its day opened every value stored after the rekey.
    expect(result.renewed).toBe(2);
    const newActive = await activeKeys();
    expect(Object.keys(newActive).sort()).toEqual([agent.id, other.id].sort());
    for (const id of [agent.id, other.id]) expect(backup).not.toContain(newActive[id]);
    expect(result.retiredMasterKeys).toEqual([oldKeyId]);
    const file = readKeyringFile(h.keyringFile);
    expect(file.keys.map((k) => k.id)).toEqual([result.newMasterKeyId]);
    expect((await h.sql('SELECT DISTINCT master_key_id FROM data_keys')).rows).toEqual([{ master_key_id: result.newMasterKeyId }]);
    expect((await h.sql('SELECT credential_id, version, sealed FROM secret_versions ORDER BY 1, 2')).rows).toEqual(before);
    const stored = await h.api('POST', '/v1/vault.store', { token: other.token, body: { name: 'after-rekey', kind: 'generic', value: h.secret('after-rekey-value') } });
    expect(stored.status, stored.text).toBe(201);
    const sealedUnder = (await h.sql('SELECT v.data_key_id FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.name = $1 AND c.identity_id = $2', ['after-rekey', other.id])).rows;
    expect(sealedUnder).toEqual([{ data_key_id: newActive[other.id] }]);
    expect((await h.api('POST', '/v1/vault.get', { token: other.token, body: { name: 'after-rekey' } })).body.value).toBe('after-rekey-value');

    // The running service keeps reading (and a new identity gets a data key under the new master key)...
    expect((await get('swap-b')).body.value).toBe('swap-value-bbbbbbbb');
    const late = await h.createIdentity();
    expect((await h.sql('SELECT master_key_id FROM data_keys WHERE identity_id = $1', [late.id])).rows[0].master_key_id).toBe(result.newMasterKeyId);

    // ...and so does a restarted one, which only has the new key.
    const restarted = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(h.keyringFile), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      for (const name of ['plain-check', 'swap-a', 'swap-b', 'dk-check']) {
        expect((await restarted.vault.get({ identityId: agent.id, actor: 'test' }, { name })).value).toBe(values[name]);
      }
      expect((await restarted.vault.get({ identityId: other.id, actor: 'test' }, { name: 'other-identity' })).value).toBe('other-identity-value');
    } finally {
      await restarted.close();
    }
    const audit = (await h.sql("SELECT actor, detail FROM audit_log WHERE action = 'vault.rekey'")).rows;
    expect(audit).toEqual([{ actor: 'admin', detail: { masterKeyId: result.newMasterKeyId, rewrapped: 2, renewed: 2, retired: [oldKeyId] } }]);
  });

  it('one rekey at a time: a second is refused before it touches the keyring, and the keyring keeps every key in use', async () => {
    const config = loadConfig({ VAULT_MASTER_KEY: h.keyringFile, DATABASE_URL: h.databaseUrl });
    // A rekey in progress holds this lock from start to end (cli/rekey.ts).
    const running = new pg.Client({ connectionString: h.databaseUrl });
    await running.connect();
    const before = readFileSync(h.keyringFile, 'utf8');
    try {
      await running.query('SELECT pg_advisory_lock(4631800002)');
      await expect(rekey(config, silent)).rejects.toThrow('another rekey is running against this database; run this one again once it has finished');
      expect(readFileSync(h.keyringFile, 'utf8')).toBe(before);
    } finally {
      await running.end();
    }
    await rekey(config, silent);
    const file = readKeyringFile(h.keyringFile);
    const inUse = (await h.sql('SELECT DISTINCT master_key_id AS id FROM data_keys')).rows.map((r) => r.id);
    expect(inUse).toEqual([file.current]);
    expect(file.keys.map((k) => k.id)).toEqual([file.current]);
    expect((await get('swap-a')).body.value).toBe('swap-value-aaaaaaaa');
  });

  it('an inline VAULT_MASTER_KEY is rotated through a list: the services wrap with the first key, rekey re-wraps what the others wrap', async () => {
    const current = JSON.parse(readFileSync(h.keyringFile, 'utf8')).keys[0].key as string;
    const next = generateMasterKey().toString('base64');
    // One key alone: nothing to re-wrap under, and a key given only to rekey would leave running services wrapping with the old one.
    const alone = loadConfig({ VAULT_MASTER_KEY: current, DATABASE_URL: h.databaseUrl });
    await expect(rekey(alone, silent, { NEW_VAULT_MASTER_KEY: next })).rejects.toThrow(/set VAULT_MASTER_KEY=<new key>,<this key>.*NEW_VAULT_MASTER_KEY is no longer read/);

    // The services run with both keys, the new one first: a new identity's data key is wrapped by it at once.
    const both = `${next},${current}`;
    const running = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(both), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    const nextId = Keyring.fromSetting(next).current.id;
    const currentId = Keyring.fromSetting(current).current.id;
    try {
      const late = await running.identities.create({ name: `late-${Date.now()}` }, { actor: 'admin' });
      expect((await h.sql('SELECT master_key_id FROM data_keys WHERE identity_id = $1', [late.id])).rows[0].master_key_id).toBe(nextId);
      expect((await running.vault.get({ identityId: agent.id, actor: 'test' }, { name: 'swap-a' })).value).toBe('swap-value-aaaaaaaa');
    } finally {
      await running.close();
    }
    // Before rekey the new key alone cannot open what the old one wraps: a service started with it refuses to start.
    const onlyNext = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(next), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      expect(await onlyNext.dataKeys.missingMasterKeys()).toEqual([{ id: currentId, wraps: expect.any(Number) }]);
    } finally {
      await onlyNext.close();
    }

    const result = await rekey(loadConfig({ VAULT_MASTER_KEY: both, DATABASE_URL: h.databaseUrl }), silent);
    expect(result).toMatchObject({ newMasterKeyId: nextId, retiredMasterKeys: [currentId], action: expect.stringMatching(/remove the others from VAULT_MASTER_KEY/) });
    expect(result.rewrapped).toBeGreaterThanOrEqual(3);
    const restarted = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(next), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      expect(await restarted.dataKeys.missingMasterKeys()).toEqual([]);
      expect((await restarted.vault.get({ identityId: agent.id, actor: 'test' }, { name: 'swap-a' })).value).toBe('swap-value-aaaaaaaa');
    } finally {
      await restarted.close();
    }
  });
});
