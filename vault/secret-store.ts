import { createHash, createHmac } from 'node:crypto';
import type { Db } from '../db/pool';
import { open, seal, versionAad } from './crypto';
import type { DataKeys } from './data-keys';

/**
 * Sealing and opening secret versions: the one place a version row is written or decrypted.
 * Each version also gets a fingerprint, HMAC(service fingerprint key, SHA-256(value)), so a leaked
 * value reported by its SHA-256 is found by an index lookup without decrypting anything.
 */
export interface VersionRow {
  version: number;
  data_key_id: string;
  sealed: Buffer;
}

export class SecretStore {
  constructor(
    private readonly dataKeys: Pick<DataKeys, 'forSealing' | 'byKeyId' | 'serviceKey'>,
    private readonly clock: () => Date,
  ) {}

  async insert(
    tx: Db,
    ownerId: string,
    credentialId: string,
    version: number,
    value: string,
    extra: { rotationKey?: string; basedOn?: number; providerRef?: string | null } = {},
  ): Promise<Date> {
    const key = await this.dataKeys.forSealing(tx, ownerId);
    const plaintext = Buffer.from(value, 'utf8');
    const sealed = seal(key.key, plaintext, versionAad(ownerId, credentialId, version));
    const digest = createHash('sha256').update(plaintext).digest();
    plaintext.fill(0);
    const fingerprint = await this.fingerprintOfSha256(tx, digest);
    digest.fill(0);
    const createdAt = this.clock();
    await tx.query(
      `INSERT INTO secret_versions (credential_id, version, data_key_id, sealed, rotation_key, based_on, provider_ref, fingerprint, created_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
      [credentialId, version, key.id, sealed, extra.rotationKey ?? null, extra.basedOn ?? null, extra.providerRef ?? null, fingerprint, createdAt],
    );
    return createdAt;
  }

  /** Decrypts a version of a credential owned by `ownerId`; IntegrityError if it was altered or moved. */
  async open(tx: Db, ownerId: string, credentialId: string, name: string, row: VersionRow): Promise<string> {
    const key = await this.dataKeys.byKeyId(tx, ownerId, row.data_key_id);
    const plaintext = open(key.key, row.sealed, versionAad(ownerId, credentialId, row.version), `version ${row.version} of '${name}'`);
    // The string goes to the caller (JS strings cannot be wiped); the buffer holding it is wiped now.
    try {
      return plaintext.toString('utf8');
    } finally {
      plaintext.fill(0);
    }
  }

  async fingerprintOfSha256(db: Db, sha256: Buffer): Promise<Buffer> {
    return createHmac('sha256', await this.dataKeys.serviceKey(db, 'fingerprint')).update(sha256).digest();
  }
}
