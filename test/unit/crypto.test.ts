import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { IntegrityError } from '../../core/errors';
import { open, seal, versionAad } from '../../vault/crypto';
import { generateMasterKey, Keyring, masterKeyId, readKeyringFile, writeKeyringFile } from '../../vault/keyring';

describe('AES-256-GCM sealing', () => {
  const key = randomBytes(32);
  const aad = versionAad('identity-a', 'credential-1', 1);

  it('round-trips and uses a fresh nonce every time', () => {
    const a = seal(key, Buffer.from('s3cr3t-value'), aad);
    const b = seal(key, Buffer.from('s3cr3t-value'), aad);
    expect(a.subarray(0, 12).equals(b.subarray(0, 12))).toBe(false);
    expect(a.includes(Buffer.from('s3cr3t-value'))).toBe(false);
    expect(open(key, a, aad, 'test').toString()).toBe('s3cr3t-value');
  });

  it('refuses a flipped bit anywhere: nonce, body or tag', () => {
    const sealed = seal(key, Buffer.from('s3cr3t-value'), aad);
    for (const index of [0, 12, sealed.length - 1]) {
      const tampered = Buffer.from(sealed);
      tampered[index]! ^= 0x01;
      expect(() => open(key, tampered, aad, 'version 1')).toThrow(IntegrityError);
    }
  });

  it('refuses a ciphertext moved to another identity, credential or version', () => {
    const sealed = seal(key, Buffer.from('s3cr3t-value'), aad);
    for (const other of [versionAad('identity-b', 'credential-1', 1), versionAad('identity-a', 'credential-2', 1), versionAad('identity-a', 'credential-1', 2)]) {
      expect(() => open(key, sealed, other, 'moved')).toThrow(/altered or does not belong/);
    }
  });

  it('refuses a wrong key and a truncated box', () => {
    const sealed = seal(key, Buffer.from('x'), aad);
    expect(() => open(randomBytes(32), sealed, aad, 'x')).toThrow(IntegrityError);
    expect(() => open(key, sealed.subarray(0, 20), aad, 'x')).toThrow(/truncated/);
  });
});

describe('master keyring', () => {
  it('derives stable key ids and reads an inline base64 key', () => {
    const key = generateMasterKey();
    const ring = Keyring.fromSetting(key.toString('base64'));
    expect(ring.current.id).toBe(masterKeyId(key));
    expect(ring.current.key.equals(key)).toBe(true);
  });

  it('writes keyring files with mode 0600 and rejects a key that does not match its id', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'keyring-'));
    const file = path.join(dir, 'keys.json');
    const a = generateMasterKey();
    const b = generateMasterKey();
    writeKeyringFile(file, [{ id: masterKeyId(a), key: a }, { id: masterKeyId(b), key: b }], masterKeyId(b));
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const read = readKeyringFile(file);
    expect(read.current).toBe(masterKeyId(b));
    expect(read.keys.map((k) => k.id)).toEqual([masterKeyId(a), masterKeyId(b)]);

    const doc = JSON.parse(readFileSync(file, 'utf8'));
    doc.keys[0].key = generateMasterKey().toString('base64');
    const bad = path.join(dir, 'bad.json');
    writeFileSync(bad, JSON.stringify(doc));
    expect(() => readKeyringFile(bad)).toThrow(/not a 32-byte key matching its id/);
  });

  it('picks up a rewritten keyring file without a restart', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'keyring-'));
    const file = path.join(dir, 'keys.json');
    const a = generateMasterKey();
    writeKeyringFile(file, [{ id: masterKeyId(a), key: a }], masterKeyId(a));
    const ring = Keyring.fromSetting(file);
    const b = generateMasterKey();
    writeKeyringFile(file, [{ id: masterKeyId(b), key: b }, { id: masterKeyId(a), key: a }], masterKeyId(b));
    expect(ring.find(masterKeyId(b))?.equals(b)).toBe(true);
    expect(ring.current.id).toBe(masterKeyId(b));
    // Rekey drops the old key from the file: the running process forgets it too (before, it kept it until restarted).
    const held = ring.find(masterKeyId(a))!;
    writeKeyringFile(file, [{ id: masterKeyId(b), key: b }], masterKeyId(b));
    expect(ring.current.id).toBe(masterKeyId(b));
    expect(ring.find(masterKeyId(a))).toBeUndefined();
    expect(ring.ids).toEqual([masterKeyId(b)]);
    // Zeroed a little later, not under a caller that already holds it.
    expect(held.equals(a)).toBe(true);
  });
});
