import { createHash, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { refingerprintSeeds } from '../vault/seed-fingerprints';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { base32 } from './support/base32';

// RFC 6238 Appendix B: the seeds are ASCII "1234567890" repeated to 20, 32 and 64 bytes.
const SEEDS = {
  SHA1: '12345678901234567890',
  SHA256: '12345678901234567890123456789012',
  SHA512: '1234567890123456789012345678901234567890123456789012345678901234',
} as const;

const VECTORS: [number, string, string, string][] = [
  [59, '94287082', '46119246', '90693936'],
  [1111111109, '07081804', '68084774', '25091201'],
  [1111111111, '14050471', '67062674', '99943326'],
  [1234567890, '89005924', '91819424', '93441116'],
  [2000000000, '69279037', '90698825', '38618901'],
  [20000000000, '65353130', '77737706', '47863826'],
];


describe('vault.totp over HTTP, clock pinned (RFC 6238 Appendix B)', () => {
  let h: Harness;
  let token: string;
  let now = new Date(59_000);

  beforeAll(async () => {
    h = await startHarness({ clock: () => now });
    ({ token } = await h.createIdentity());
    for (const [algorithm, seed] of Object.entries(SEEDS)) {
      const res = await h.api('POST', '/v1/vault.store', {
        token,
        body: { name: `rfc-${algorithm}`, kind: 'totp_seed', totp: { secret: h.secret(base32(seed)), algorithm, digits: 8, period: 30 } },
      });
      expect(res.status).toBe(201);
    }
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it.each(VECTORS)('at T=%i the codes are SHA1 %s, SHA256 %s, SHA512 %s', async (t, sha1, sha256, sha512) => {
    now = new Date(t * 1000);
    for (const [algorithm, expected] of [['SHA1', sha1], ['SHA256', sha256], ['SHA512', sha512]] as const) {
      const res = await h.api('POST', '/v1/vault.totp', { token, body: { name: `rfc-${algorithm}` } });
      expect(res.status).toBe(200);
      expect(res.body).toEqual({ code: expected, period: 30, digits: 8, expiresInSeconds: 30 - (t % 30) });
    }
  });

  it('imports an otpauth:// URI and produces the same codes', async () => {
    now = new Date(1111111109_000);
    const uri = `otpauth://totp/Example:alice@example.com?secret=${base32(SEEDS.SHA256)}&issuer=Example&algorithm=SHA256&digits=8&period=30`;
    const stored = await h.api('POST', '/v1/vault.store', { token, body: { name: 'imported', kind: 'totp_seed', totp: { otpauthUri: h.secret(uri) } } });
    expect(stored.status).toBe(201);
    const res = await h.api('POST', '/v1/vault.totp', { token, body: { id: stored.body.id } });
    expect(res.body.code).toBe('68084774');

    const read = await h.api('POST', '/v1/vault.get', { token, body: { name: 'imported' } });
    expect(read.body.value).toMatch(/^otpauth:\/\/totp\/Example%3Aalice%40example\.com\?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZA/);
  });

  it('refuses a URI whose label and issuer, percent-encoded as stored, would pass the URI limits: nothing stored that makes no code', async () => {
    const secret = base32(SEEDS.SHA1);
    const cases = [`otpauth://totp/${'é'.repeat(300)}?secret=${secret}`, `otpauth://totp/${'é'.repeat(100)}?secret=${secret}&issuer=${'é'.repeat(400)}`];
    for (const [i, uri] of cases.entries()) {
      const name = `long-label-${i}`;
      const stored = await h.api('POST', '/v1/vault.store', { token, body: { name, kind: 'totp_seed', totp: { otpauthUri: h.secret(uri) } } });
      // Before: 201, and every vault.totp of it a 422 ("totp.otpauthUri is not a valid otpauth:// URI … could not be parsed").
      expect(stored.status, stored.text).toBe(422);
      expect(stored.body.detail).toMatch(/^the TOTP label and issuer are too long/);
      expect((await h.api('POST', '/v1/vault.totp', { token, body: { name } })).status).toBe(404);
    }
    // At the limit once encoded, it is stored, and makes codes.
    const fits = await h.api('POST', '/v1/vault.store', { token, body: { name: 'long-label-fits', kind: 'totp_seed', totp: { otpauthUri: h.secret(`otpauth://totp/${'é'.repeat(85)}?secret=${secret}`) } } });
    expect(fits.status, fits.text).toBe(201);
    expect((await h.api('POST', '/v1/vault.totp', { token, body: { name: 'long-label-fits' } })).status).toBe(200);
  });

  it('supports 6 digits and any period', async () => {
    now = new Date(59_000);
    await h.api('POST', '/v1/vault.store', { token, body: { name: 'six', kind: 'totp_seed', totp: { secret: base32(SEEDS.SHA1), period: 60 } } });
    const res = await h.api('POST', '/v1/vault.totp', { token, body: { name: 'six' } });
    // Counter 0 of the SHA1 seed: RFC 4226 Appendix D gives 755224.
    expect(res.body).toEqual({ code: '755224', period: 60, digits: 6, expiresInSeconds: 1 });
  });

  it('refuses a credential that is not a TOTP seed, and another identity\'s seed', async () => {
    await h.api('POST', '/v1/vault.store', { token, body: { name: 'plain', kind: 'password', value: h.secret('pa55word-not-totp') } });
    const res = await h.api('POST', '/v1/vault.totp', { token, body: { name: 'plain' } });
    expect(res.status).toBe(422);
    expect(res.body.detail).toBe("credential 'plain' is a password, not a totp_seed");
    await h.api('POST', '/v1/vault.store', { token, body: { name: 'plain-key', kind: 'api_key', value: h.secret('sk_plain_key_not_totp') } });
    expect((await h.api('POST', '/v1/vault.totp', { token, body: { name: 'plain-key' } })).body.detail).toBe("credential 'plain-key' is an api_key, not a totp_seed");

    const other = await h.createIdentity();
    const denied = await h.api('POST', '/v1/vault.totp', { token: other.token, body: { name: 'rfc-SHA1' } });
    expect(denied.status).toBe(404);
  });

  it("a seed pasted where a name goes, in any spelling, is withheld as any stored value is; a seed is not its own credential's name", async () => {
    const seed = h.secret('KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU');
    const stored = await h.api('POST', '/v1/vault.store', { token, body: { name: 'pasted-2fa', kind: 'totp_seed', totp: { secret: `${seed.slice(0, 16)} ${seed.slice(16)}` } } });
    expect(stored.status, stored.text).toBe(201);
    // The seed as an authenticator shows it, in upper and lower case: stored as the otpauth URI, it
    // was never matched (the URI is no name), and each was written into the 404 and its audit row.
    for (const [i, pasted] of [seed, seed.toLowerCase()].entries()) {
      const requestId = `pasted-seed-${i}-${Date.now()}`;
      const res = await h.api('POST', '/v1/vault.totp', { token, body: { name: pasted }, headers: { 'x-request-id': requestId } });
      expect(res.status).toBe(404);
      expect(res.text.toUpperCase()).not.toContain(seed);
      const { rows } = await h.sql("SELECT detail FROM audit_log WHERE request_id = $1 AND action = 'vault.totp'", [requestId]);
      expect(rows).toEqual([{ detail: expect.objectContaining({ nameWithheld: 'stored-value' }) }]);
      expect(JSON.stringify(rows).toUpperCase()).not.toContain(seed);
    }
    // A seed named after itself: before, stored, then listed, audited and mailed under its name.
    const own = h.secret('MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U');
    for (const totp of [{ secret: own.toLowerCase() }, { otpauthUri: `otpauth://totp/x?secret=${own}` }]) {
      const self = await h.api('POST', '/v1/vault.store', { token, body: { name: own, kind: 'totp_seed', totp } });
      expect(self.status, self.text).toBe(422);
      expect(self.body.detail).toMatch(/^the name given is the value being stored/);
    }
    expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE upper(name) = $1", [own])).rows[0].n).toBe(0);
  });

  it('a store refused for its seed does not write a name that is a stored value into its audit row', async () => {
    const holder = await h.createIdentity();
    const value = h.secret('sk_live_seedRefusalName0123456789');
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'k1', kind: 'api_key', value } })).status).toBe(201);
    // A seed that passes the schema but is no base32: before, refused before the name was checked, the value written as the row's name.
    const requestId = `seed-refusal-${Date.now()}`;
    const res = await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: value, kind: 'totp_seed', totp: { secret: '1111111111111111' } }, headers: { 'x-request-id': requestId } });
    expect(res.status).toBe(422);
    expect(res.text).not.toContain(value);
    const { rows } = await h.sql("SELECT detail FROM audit_log WHERE request_id = $1 AND action = 'vault.store'", [requestId]);
    expect(rows).toEqual([{ detail: expect.objectContaining({ nameWithheld: 'stored-value' }) }]);
    expect(JSON.stringify(rows)).not.toContain(value);
  });

  it("a seed stored before its fingerprint was of the seed is fingerprinted again as the services start: found as a pasted seed from then on", async () => {
    const holder = await h.createIdentity();
    const seed = h.secret('ONSWG4TFOQQHGZLFMQQGC3TEEBWW64TF');
    const stored = await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'legacy-2fa', kind: 'totp_seed', totp: { secret: seed } } });
    expect(stored.status, stored.text).toBe(201);
    // As such a version is: fingerprinted as its otpauth URI, and listed by the migration.
    const uri = (await h.api('POST', '/v1/vault.get', { token: holder.token, body: { name: 'legacy-2fa' } })).body.value as string;
    const { pool, secrets } = h.services;
    const uriFingerprint = await secrets.fingerprintOfSha256(pool, createHash('sha256').update(uri).digest());
    await h.sql('UPDATE secret_versions SET fingerprint = $2 WHERE credential_id = $1', [stored.body.id, uriFingerprint]);
    await h.sql('INSERT INTO seed_fingerprints_pending (credential_id, version) VALUES ($1, 1), ($2, 1)', [stored.body.id, randomUUID()]);
    const pasted = () => secrets.readableAmong(pool, [{ readerId: holder.id, text: seed.toLowerCase() }]);
    expect(await pasted()).toEqual([false]);

    // One set (the other listed version is gone: a credential destroyed since), the list emptied; then a no-op.
    expect(await refingerprintSeeds(pool, secrets)).toBe(1);
    expect(await pasted()).toEqual([true]);
    // The otpauth URI vault.get answers is found too (by the seed in it), as it was before the seed's fingerprint.
    expect(await secrets.readableAmong(pool, [{ readerId: holder.id, text: uri }])).toEqual([true]);
    expect((await h.sql('SELECT count(*)::int AS n FROM seed_fingerprints_pending')).rows[0].n).toBe(0);
    expect(await refingerprintSeeds(pool, secrets)).toBe(0);
  });
});
