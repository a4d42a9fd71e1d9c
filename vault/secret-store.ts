import { createHash, createHmac } from 'node:crypto';
import type { Db } from '../db/pool';
import { open, seal, versionAad } from './crypto';
import { type DataKeys, FINGERPRINT_KEY } from './data-keys';
import { KeyIntegrityError } from '../core/errors';
import { type AuditEntry, auditInsertSql, auditValues } from './audit';
import { asSeed, storedSeedOf } from './totp';

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

// The version goes in only if its key counted the encryption: active, and still under its limit.
const INSERT_COUNTED = `
  WITH counted AS (
    UPDATE data_keys SET encryptions = encryptions + 1 WHERE id = $3 AND retired_at IS NULL AND encryptions < $10 RETURNING id
  )
  INSERT INTO secret_versions (credential_id, version, data_key_id, sealed, rotation_key, based_on, provider_ref, fingerprint, created_at)
  SELECT $1, $2, counted.id, $4, $5, $6, $7, $8, $9 FROM counted`;

// A batch's versions (vault/store-batch.ts), each key counting all its encryptions at once: every
// version goes in, or (a key refused, at its limit or retired) fewer rows than asked, and the caller
// rolls back and stores each alone, where a refused count rolls the key over. The keys' rows are
// locked in id order, so batches of several identities never deadlock on them. The batch's audit
// rows (parameters 9-15) go in the same statement: a data-modifying WITH that the insert does not
// read runs after it, so the data keys' rows are locked before the chain lock is taken.
const INSERT_COUNTED_MANY = `
  WITH audit AS (${auditInsertSql(9)}), wanted AS (
    SELECT key_id, count(*)::int AS n FROM unnest($3::uuid[]) AS key_id GROUP BY key_id
  ), locked AS (
    SELECT d.id FROM data_keys d WHERE d.id IN (SELECT key_id FROM wanted) ORDER BY d.id FOR NO KEY UPDATE
  ), counted AS (
    UPDATE data_keys d SET encryptions = d.encryptions + w.n FROM wanted w, locked l
     WHERE d.id = w.key_id AND l.id = d.id AND d.retired_at IS NULL AND d.encryptions + w.n <= $8 RETURNING d.id
  )
  INSERT INTO secret_versions (credential_id, version, data_key_id, sealed, provider_ref, fingerprint, created_at)
  SELECT v.credential_id, v.version, v.key_id, v.sealed, v.provider_ref, v.fingerprint, $7
    FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::bytea[], $5::text[], $6::bytea[])
         AS v(credential_id, version, key_id, sealed, provider_ref, fingerprint)
   WHERE v.key_id IN (SELECT id FROM counted)`;

export interface NewVersion {
  ownerId: string;
  credentialId: string;
  version: number;
  value: string;
  providerRef?: string | null;
}

/**
 * What a version's keyed fingerprint is made of: the value, or, for a TOTP seed's otpauth URI, the
 * seed alone (storedSeedOf): what is pasted where a name goes, or leaked and reported by its SHA-256.
 */
function fingerprinted(value: string, plaintext: Buffer): Buffer {
  const seed = value.startsWith('otpauth://') ? storedSeedOf(value) : undefined;
  return seed === undefined ? plaintext : Buffer.from(seed, 'utf8');
}

/** The service key of the keyed fingerprints of stored values (see DataKeys.warm). */
export { FINGERPRINT_KEY } from './data-keys';

export class SecretStore {
  constructor(
    private readonly dataKeys: Pick<DataKeys, 'active' | 'rollOver' | 'maxEncryptions' | 'byKeyId' | 'serviceKey'>,
    private readonly clock: () => Date,
  ) {}

  /**
   * Seals `value` with the identity's active data key and inserts the version. The insert counts the
   * encryption on the key in the same statement, and only while the key is under its limit (see
   * DataKeys): a rolled-back insert uncounts with it, and the key's row is locked no earlier than
   * the statement before the audit row. A refused count retires the key and seals again under the next.
   */
  async insert(
    tx: Db,
    ownerId: string,
    credentialId: string,
    version: number,
    value: string,
    extra: { rotationKey?: string; basedOn?: number; providerRef?: string | null } = {},
  ): Promise<Date> {
    const plaintext = Buffer.from(value, 'utf8');
    try {
      const fingerprint = await this.fingerprintOfValue(tx, value, plaintext);
      for (let attempt = 0; attempt < 5; attempt++) {
        const key = await this.dataKeys.active(tx, ownerId);
        const sealed = seal(key.key, plaintext, versionAad(ownerId, credentialId, version));
        const createdAt = this.clock();
        const { rowCount } = await tx.query({
          name: 'secret-version-insert',
          text: INSERT_COUNTED,
          values: [credentialId, version, key.id, sealed, extra.rotationKey ?? null, extra.basedOn ?? null, extra.providerRef ?? null, fingerprint, createdAt, this.dataKeys.maxEncryptions],
        });
        if (rowCount) return createdAt;
        await this.dataKeys.rollOver(tx, ownerId, key.id);
      }
      throw new KeyIntegrityError(`could not find an active data key for identity ${ownerId}`);
    } finally {
      plaintext.fill(0);
    }
  }

  /**
   * Seals and inserts many versions in one statement (a store batch's), appending `audit`'s rows in
   * the same statement. Returns their creation time, or undefined when a data key refused its count
   * (see INSERT_COUNTED_MANY; the audit rows were appended all the same): the caller rolls back.
   */
  async insertMany(tx: Db, versions: NewVersion[], audit: AuditEntry[]): Promise<Date | undefined> {
    const plaintexts = versions.map((v) => Buffer.from(v.value, 'utf8'));
    try {
      const keyIds: string[] = [];
      const sealed: Buffer[] = [];
      const fingerprints: Buffer[] = [];
      for (const [i, v] of versions.entries()) {
        const plaintext = plaintexts[i]!;
        fingerprints.push(await this.fingerprintOfValue(tx, v.value, plaintext));
        const key = await this.dataKeys.active(tx, v.ownerId);
        keyIds.push(key.id);
        sealed.push(seal(key.key, plaintext, versionAad(v.ownerId, v.credentialId, v.version)));
      }
      const createdAt = this.clock();
      const { rowCount } = await tx.query({
        name: 'secret-version-insert-many',
        text: INSERT_COUNTED_MANY,
        values: [
          versions.map((v) => v.credentialId),
          versions.map((v) => v.version),
          keyIds,
          sealed,
          versions.map((v) => v.providerRef ?? null),
          fingerprints,
          createdAt,
          this.dataKeys.maxEncryptions,
          ...auditValues(audit),
        ],
      });
      return rowCount === versions.length ? createdAt : undefined;
    } finally {
      for (const p of plaintexts) p.fill(0);
    }
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

  /**
   * For each (reader, text) asked: whether the text is a value the reader can read (a version,
   * still kept, of one of its own credentials, deleted ones too, or of one granted to it, stored
   * before the grant ended if it was revoked since: a revoked grant does not make the grantee forget
   * a value it read, as mail.send's scan holds, Vault.readableValues), found by fingerprint in one
   * statement (the fingerprint index), nothing decrypted. Only values the reader can or could read:
   * asked about every identity's, the answer would tell it that some identity stores a text it
   * guessed (vault/withheld.ts).
   */
  async readableAmong(db: Db, asked: { readerId: string; text: string }[]): Promise<boolean[]> {
    if (asked.length === 0) return [];
    // Each text, and one that is a TOTP seed's base32 in another spelling (lower case, in groups:
    // as an authenticator shows a setup key) as the vault keeps it: a seed version's fingerprint is
    // its seed's (storedSeedOf).
    const readers: string[] = [];
    const fingerprints: Buffer[] = [];
    const of: number[] = [];
    for (const [i, { readerId, text }] of asked.entries()) {
      // (An otpauth URI, as vault.get answers a seed, by the seed in it: as its version is fingerprinted.)
      const seed = text.startsWith('otpauth://') ? storedSeedOf(text) : asSeed(text);
      for (const form of seed === undefined || seed === text ? [text] : [text, seed]) {
        const plaintext = Buffer.from(form, 'utf8');
        try {
          fingerprints.push(await this.fingerprintOf(db, plaintext));
        } finally {
          plaintext.fill(0);
        }
        readers.push(readerId);
        of.push(i + 1);
      }
    }
    const { rows } = await db.query<{ i: string }>({
      name: 'secret-versions-readable-among-forms',
      text: `SELECT DISTINCT t.i FROM unnest($1::uuid[], $2::bytea[], $3::int[]) AS t(reader, fingerprint, i)
              WHERE EXISTS (SELECT 1 FROM secret_versions v JOIN credentials c ON c.id = v.credential_id
                             WHERE v.fingerprint IS NOT NULL AND v.fingerprint = t.fingerprint
                               AND (c.identity_id = t.reader
                                    OR EXISTS (SELECT 1 FROM grants g WHERE g.credential_id = c.id AND g.grantee_id = t.reader
                                                AND v.created_at <= coalesce(g.revoked_at, 'infinity'::timestamptz))))`,
      values: [readers, fingerprints, of],
    });
    const hit = new Set(rows.map((r) => Number(r.i) - 1));
    return asked.map((_, i) => hit.has(i));
  }

  /** The keyed fingerprint a version of `value` is stored with (vault/seed-fingerprints.ts sets it again for seeds stored before it was of the seed). */
  async versionFingerprint(db: Db, value: string): Promise<Buffer> {
    const plaintext = Buffer.from(value, 'utf8');
    try {
      return await this.fingerprintOfValue(db, value, plaintext);
    } finally {
      plaintext.fill(0);
    }
  }

  /** A version's fingerprint: of its value, or of a TOTP seed's base32 alone (fingerprinted; that copy wiped once used). */
  private async fingerprintOfValue(db: Db, value: string, plaintext: Buffer): Promise<Buffer> {
    const form = fingerprinted(value, plaintext);
    try {
      return await this.fingerprintOf(db, form);
    } finally {
      if (form !== plaintext) form.fill(0);
    }
  }

  /** The fingerprint of a value: its SHA-256 (wiped once used), keyed. */
  private async fingerprintOf(db: Db, plaintext: Buffer): Promise<Buffer> {
    const digest = createHash('sha256').update(plaintext).digest();
    try {
      return await this.fingerprintOfSha256(db, digest);
    } finally {
      digest.fill(0);
    }
  }

  async fingerprintOfSha256(db: Db, sha256: Buffer): Promise<Buffer> {
    return createHmac('sha256', await this.dataKeys.serviceKey(db, FINGERPRINT_KEY)).update(sha256).digest();
  }
}
