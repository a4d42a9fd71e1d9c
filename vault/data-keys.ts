import { randomBytes, randomUUID } from 'node:crypto';
import type { Db, Pool } from '../db/pool';
import { withTransaction } from '../db/pool';
import { IntegrityError, KeyIntegrityError } from '../core/errors';
import { dataKeyAad, KEY_BYTES, open, seal, serviceKeyAad } from './crypto';
import type { Keyring } from './keyring';

/**
 * Per-identity data keys, wrapped by the master keyring. Unwrapped keys are cached briefly in
 * memory so a read costs one database round trip, not two; the cache holds keys, never values.
 */
const CACHE_TTL_MS = 5 * 60_000;
/** An expired key is zeroed this long after it leaves the cache, so a call already holding it finishes first. */
const ZERO_DELAY_MS = 60_000;

/**
 * GCM encryptions per data key before a new key takes over. With random 96-bit nonces NIST SP
 * 800-38D caps a key at 2^32 encryptions; 2^30 keeps the chance of a repeated nonce below 2^-37.
 */
export const DEFAULT_MAX_ENCRYPTIONS = 2 ** 30;

/** Data keys re-wrapped per transaction by rewrapAll: what a store may wait for while rekey runs. */
const REWRAP_CHUNK = 500;

/** The service key that keys each version's fingerprint (vault/secret-store.ts). */
export const FINGERPRINT_KEY = 'fingerprint';

/**
 * What shows a service key was made and used: its row missing then is no first use but a loss (a
 * database writer deleting it, a partial restore), and a new random key would be made in its place.
 * For the fingerprint key that failed open: every stored value's fingerprint stopped matching, so a
 * value pasted as a name was no longer withheld (written into 404s and audit rows as given) and a
 * leak report by its hash found nothing. It now fails closed (KeyIntegrityError), as a missing master
 * key does. (The payload codec's key needs no check: a new one cannot open the payloads sealed
 * before, which fail loudly as they are read.)
 */
const USED_SQL: Record<string, string> = {
  [FINGERPRINT_KEY]: 'SELECT EXISTS (SELECT 1 FROM secret_versions WHERE fingerprint IS NOT NULL) AS used',
};

/** A wrapped key's row, as data_keys holds it. */
type WrappedKeyRow = { id: string; master_key_id: string; wrapped: Buffer };

export interface DataKey {
  id: string;
  identityId: string;
  key: Buffer;
}

export class DataKeys {
  private byId = new Map<string, { key: DataKey; expires: number }>();
  private activeByIdentity = new Map<string, string>();
  private serviceKeys = new Map<string, Buffer>();

  /** Encryptions a key makes before the next one takes over; SecretStore counts them as it seals. */
  readonly maxEncryptions: number;
  private readonly cacheTtlMs: number;
  private readonly zeroDelayMs: number;
  /** The pending sweep of expired keys, while any key is cached. */
  private sweep: NodeJS.Timeout | undefined;

  constructor(
    private readonly pool: Pool,
    private readonly keyring: Keyring,
    opts: { maxEncryptions?: number; cacheTtlMs?: number; zeroDelayMs?: number } = {},
  ) {
    this.maxEncryptions = opts.maxEncryptions ?? DEFAULT_MAX_ENCRYPTIONS;
    this.cacheTtlMs = opts.cacheTtlMs ?? CACHE_TTL_MS;
    this.zeroDelayMs = opts.zeroDelayMs ?? ZERO_DELAY_MS;
  }

  /** Creates the first data key of a new identity, inside the caller's transaction. */
  async create(db: Db, identityId: string, encryptions = 0): Promise<string> {
    const id = randomUUID();
    const key = randomBytes(KEY_BYTES);
    const master = this.keyring.current;
    try {
      await db.query('INSERT INTO data_keys (id, identity_id, master_key_id, wrapped, encryptions) VALUES ($1, $2, $3, $4, $5)', [
        id,
        identityId,
        master.id,
        seal(master.key, key, dataKeyAad(identityId, id)),
        encryptions,
      ]);
    } finally {
      key.fill(0);
    }
    return id;
  }

  /**
   * Called when a seal under `keyId` was refused (the key reached its limit, was retired meanwhile,
   * or is not visible yet): retires it if it is still active and spent, and makes the identity's next
   * key, in the caller's transaction. Whoever retires a key makes its successor; the others wait on
   * its row and then find that successor as the active key.
   *
   * Only a spent key is retired. A successor is in this cache before the transaction that made it
   * commits, so another transaction can be handed it, see its seal refused (the row is not visible
   * to it yet) and come here once it is: retiring it then threw away a fresh key and made another.
   */
  async rollOver(db: Db, identityId: string, keyId: string): Promise<void> {
    this.activeByIdentity.delete(identityId);
    const retired = await db.query('UPDATE data_keys SET retired_at = now() WHERE id = $1 AND retired_at IS NULL AND encryptions >= $2', [
      keyId,
      this.maxEncryptions,
    ]);
    if (retired.rowCount) this.activeByIdentity.set(identityId, await this.create(db, identityId));
  }

  /** The key new versions of this identity are sealed with. */
  async active(db: Db, identityId: string): Promise<DataKey> {
    const cachedId = this.activeByIdentity.get(identityId);
    const cached = cachedId ? this.cached(cachedId) : undefined;
    if (cached) return cached;
    const row = await this.keyRow(
      db,
      `SELECT id, master_key_id, wrapped FROM data_keys
        WHERE identity_id = $1 AND retired_at IS NULL ORDER BY created_at DESC LIMIT 1`,
      [identityId],
    );
    if (!row) throw new KeyIntegrityError(`identity ${identityId} has no data key`);
    const key = this.unwrap(identityId, row);
    this.activeByIdentity.set(identityId, key.id);
    return key;
  }

  /** The key a stored version was sealed with; it must belong to the same identity. */
  async byKeyId(db: Db, identityId: string, dataKeyId: string): Promise<DataKey> {
    const cached = this.cached(dataKeyId);
    if (cached && cached.identityId === identityId) return cached;
    const row = await this.keyRow(db, 'SELECT id, master_key_id, wrapped FROM data_keys WHERE id = $1 AND identity_id = $2', [dataKeyId, identityId]);
    if (!row) throw new KeyIntegrityError(`data key ${dataKeyId} does not belong to identity ${identityId}`);
    return this.unwrap(identityId, row);
  }

  /**
   * A key's row, read a second time if the keyring does not hold the master key that wraps it: a
   * rekey can re-wrap the row after this read fetched it and drop the old master key from the file
   * before the unwrap (milliseconds apart), and the read then failed as if the key were lost (a 500
   * `integrity-failure` that a retry answered). Read again, the row names the new master key; a key
   * that is really lost fails the same way twice.
   */
  private async keyRow<R extends { master_key_id: string } = WrappedKeyRow>(db: Db, sql: string, params: unknown[]): Promise<R | undefined> {
    const first = (await db.query(sql, params)).rows[0] as R | undefined;
    if (!first || this.keyring.find(first.master_key_id)) return first;
    return (await db.query(sql, params)).rows[0] as R | undefined;
  }

  /**
   * A key of the service itself (not of an identity), created on first use. The fingerprint key
   * must outlive master-key rotation, so it is wrapped like a data key and re-wrapped by rekey.
   */
  async serviceKey(db: Db, name: string): Promise<Buffer> {
    const cached = this.serviceKeys.get(name);
    if (cached) return cached;
    let row = await this.keyRow<Omit<WrappedKeyRow, 'id'>>(db, 'SELECT master_key_id, wrapped FROM service_keys WHERE name = $1', [name]);
    if (!row) {
      const used = USED_SQL[name];
      if (used && (await db.query(used)).rows[0]?.used) {
        throw new KeyIntegrityError(`service key ${name} is missing from service_keys, but values were fingerprinted with it: restore its row from a backup`);
      }
      const fresh = randomBytes(KEY_BYTES);
      try {
        // The current master key is read inside the transaction that stores the key wrapped with it,
        // as create() reads it in its caller's: rekey waits for every transaction begun before it
        // wrote its new key, and re-wraps what they stored. Read before (a separate statement's
        // transaction), a key wrapped with the old master key could be stored after rekey's re-wrap
        // and check, and the old key dropped from the file: the service key unreadable for good.
        await withTransaction(this.pool, async (tx) => {
          const master = this.keyring.current;
          await tx.query('INSERT INTO service_keys (name, master_key_id, wrapped) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING', [
            name,
            master.id,
            seal(master.key, fresh, serviceKeyAad(name)),
          ]);
        });
      } finally {
        fresh.fill(0);
      }
      row = await this.keyRow<Omit<WrappedKeyRow, 'id'>>(this.pool, 'SELECT master_key_id, wrapped FROM service_keys WHERE name = $1', [name]);
      if (!row) throw new KeyIntegrityError(`service key ${name} was not stored`);
    }
    const master = this.keyring.find(row.master_key_id);
    if (!master) throw new KeyIntegrityError(`service key ${name} is wrapped by master key ${row.master_key_id}, which this keyring does not hold`);
    const key = openKey(master, row.wrapped, serviceKeyAad(name), `service key ${name}`);
    this.serviceKeys.set(name, key);
    return key;
  }

  /**
   * Loads (making it if none exists yet) each named service key into the cache, at start, where a
   * failure costs nothing. Looked up first inside a transaction, a key not yet cached takes a second
   * connection from the pool while the transaction holds one: the vault thread's three connections,
   * all held by stores running alone, then waited on each other until the connect timeout (503).
   */
  async warm(names: string[]): Promise<void> {
    for (const name of names) await this.serviceKey(this.pool, name).catch(() => undefined);
  }

  /**
   * Master keys that wrap a data or service key but are not in the keyring: checked at startup, so
   * a keyring that lost a key (a VAULT_MASTER_KEY switched before `rekey` ran) stops the service
   * with the key ids named, instead of failing reads one by one.
   */
  async missingMasterKeys(): Promise<{ id: string; wraps: number }[]> {
    const { rows } = await this.pool.query(
      `SELECT master_key_id AS id, count(*)::int AS wraps FROM (SELECT master_key_id FROM data_keys UNION ALL SELECT master_key_id FROM service_keys) k
        GROUP BY master_key_id ORDER BY master_key_id`,
    );
    return rows.filter((r) => !this.keyring.find(r.id));
  }

  /**
   * Re-wraps every data key not wrapped by the keyring's current master key. Secret rows are not
   * touched, nor the keys' encryption counts. Returns how many keys were re-wrapped and which master
   * key ids are still in use, counted once every key has been re-wrapped.
   *
   * In chunks of `chunkSize` keys, each its own transaction, taken in id order (a keyset on id): a
   * store waits for one chunk at most, not for the whole re-wrap, and the rows are locked in the
   * order a store batch locks its keys (vault/secret-store.ts), so the two never deadlock. FOR NO KEY
   * UPDATE, as the store takes it: the id does not change, so a version's insert (whose foreign key
   * shares the key's row) need not wait. A crash between chunks leaves some keys under the new master
   * key and the rest under the old, both still in the keyring: rekey drops a key only after this
   * returns and nothing uses it.
   */
  async rewrapAll(opts: { chunkSize?: number } = {}): Promise<{ rewrapped: number; masterKeysInUse: string[] }> {
    const chunkSize = opts.chunkSize ?? REWRAP_CHUNK;
    const current = this.keyring.current;
    let rewrapped = 0;
    await this.inChunks(chunkSize, async (tx, after) => {
      const { rows } = await tx.query(
        `SELECT id, identity_id, master_key_id, wrapped FROM data_keys
          WHERE master_key_id <> $1 AND ($2::uuid IS NULL OR id > $2::uuid)
          ORDER BY id LIMIT $3 FOR NO KEY UPDATE`,
        [current.id, after, chunkSize],
      );
      for (const row of rows) {
        // Opened, re-sealed and zeroed here, never cached: a keyring of 100,000 identities would
        // otherwise hold every one of their keys in this process until the cache's sweep.
        const key = this.openWrapped(row.identity_id, row);
        try {
          await tx.query('UPDATE data_keys SET master_key_id = $2, wrapped = $3 WHERE id = $1', [row.id, current.id, seal(current.key, key, dataKeyAad(row.identity_id, row.id))]);
        } finally {
          key.fill(0);
        }
      }
      rewrapped += rows.length;
      return rows;
    });
    await withTransaction(this.pool, async (tx) => {
      const services = await tx.query('SELECT name, master_key_id, wrapped FROM service_keys WHERE master_key_id <> $1 FOR UPDATE', [current.id]);
      for (const row of services.rows) {
        const master = this.keyring.find(row.master_key_id);
        if (!master) throw new KeyIntegrityError(`service key ${row.name} is wrapped by an unknown master key ${row.master_key_id}`);
        const key = openKey(master, row.wrapped, serviceKeyAad(row.name), `service key ${row.name}`);
        await tx.query('UPDATE service_keys SET master_key_id = $2, wrapped = $3 WHERE name = $1', [row.name, current.id, seal(current.key, key, serviceKeyAad(row.name))]);
        key.fill(0);
      }
    });
    return { rewrapped, masterKeysInUse: await this.masterKeysInUse() };
  }

  /** The master key ids that wrap a data or service key now. */
  async masterKeysInUse(): Promise<string[]> {
    const { rows } = await this.pool.query('SELECT master_key_id FROM data_keys UNION SELECT master_key_id FROM service_keys');
    return rows.map((r) => r.master_key_id as string);
  }

  /**
   * Retires every data key active before `before` (a timestamptz as text) and gives each identity a
   * new one, wrapped under the current master key: rekey's second step. Re-wrapped only, a data key
   * kept sealing new versions under the same key material (until its encryption limit: forever, in
   * practice), so whoever held a master key being rotated out after a compromise and a backup of its
   * day (its data keys wrapped under it) opened every value stored after the rekey too. Versions
   * already stored stay under their keys (retired keys still open them; their wrapping is the new
   * master key's after rewrapAll).
   *
   * In chunks, each its own transaction, in id order and locked as a store locks them (rewrapAll).
   * A store holding a retired key has its insert refused (INSERT_COUNTED counts only active keys) and
   * finds the new one (rollOver); a store batch falls back to storing each alone, as for a spent key.
   * Keys made since `before` (this method's own, a spent key's successor) are new already. Returns how
   * many keys were retired.
   */
  async renewActive(before: string, opts: { chunkSize?: number } = {}): Promise<number> {
    const chunkSize = opts.chunkSize ?? REWRAP_CHUNK;
    let renewed = 0;
    await this.inChunks(chunkSize, async (tx, after) => {
      const { rows } = await tx.query(
        `SELECT id, identity_id FROM data_keys
          WHERE retired_at IS NULL AND created_at < $1::timestamptz AND ($2::uuid IS NULL OR id > $2::uuid)
          ORDER BY id LIMIT $3 FOR NO KEY UPDATE`,
        [before, after, chunkSize],
      );
      if (rows.length > 0) {
        await tx.query('UPDATE data_keys SET retired_at = now() WHERE id = ANY($1::uuid[])', [rows.map((r) => r.id)]);
        for (const identityId of new Set(rows.map((r) => r.identity_id as string))) await this.create(tx, identityId);
      }
      renewed += rows.length;
      return rows;
    });
    return renewed;
  }

  /**
   * Runs `chunk` in transactions of its own over data keys in id order (a keyset: each gets the last
   * id of the one before, null first), until one returns fewer than `size` rows. A short chunk is the
   * last: LIMIT applies after the locking, so it counts only rows locked and still matching.
   */
  private async inChunks(size: number, chunk: (tx: Db, after: string | null) => Promise<{ id: string }[]>): Promise<void> {
    for (let after: string | null = null; ; ) {
      const rows = await withTransaction(this.pool, (tx) => chunk(tx, after));
      if (rows.length < size) return;
      after = rows[rows.length - 1]!.id;
    }
  }

  private cached(id: string): DataKey | undefined {
    const hit = this.byId.get(id);
    if (!hit) return undefined;
    if (hit.expires > Date.now()) return hit.key;
    this.forget(id);
    return undefined;
  }

  /** Drops a cached key and zeroes it a little later, so a call already holding it finishes first. */
  private forget(id: string): void {
    const hit = this.byId.get(id);
    if (!hit) return;
    this.byId.delete(id);
    setTimeout(() => hit.key.key.fill(0), this.zeroDelayMs).unref();
  }

  /**
   * Expired keys leave the cache (and are zeroed) on a timer too, not only when asked for again: the
   * key of an identity that is not used again would otherwise stay in memory for the process's life.
   * The timer runs only while a key is cached, and never holds the process open.
   */
  private scheduleSweep(): void {
    if (this.sweep || this.byId.size === 0) return;
    this.sweep = setTimeout(() => {
      this.sweep = undefined;
      const now = Date.now();
      for (const [id, hit] of this.byId) if (hit.expires <= now) this.forget(id);
      this.scheduleSweep();
    }, this.cacheTtlMs).unref();
  }

  /** A data key's bytes, opened with the master key that wraps it (not cached: the caller's to keep or zero). */
  private openWrapped(identityId: string, row: WrappedKeyRow): Buffer {
    const master = this.keyring.find(row.master_key_id);
    if (!master) {
      throw new KeyIntegrityError(
        `data key ${row.id} is wrapped by master key ${row.master_key_id}, which this keyring does not hold (was VAULT_MASTER_KEY rotated?)`,
      );
    }
    return openKey(master, row.wrapped, dataKeyAad(identityId, row.id), `data key ${row.id}`);
  }

  private unwrap(identityId: string, row: WrappedKeyRow): DataKey {
    // Cached already (read by byKeyId, now wanted as the active key, say): the same buffer, not a
    // second copy that would replace the first in the cache and leave it unzeroed.
    const live = this.cached(row.id);
    if (live && live.identityId === identityId) return live;
    const key: DataKey = { id: row.id, identityId, key: this.openWrapped(identityId, row) };
    this.forget(row.id);
    this.byId.set(row.id, { key, expires: Date.now() + this.cacheTtlMs });
    this.scheduleSweep();
    return key;
  }
}

/** Opens a wrapped key; a key that fails is a KeyIntegrityError (its ids are not for API callers). */
function openKey(...args: Parameters<typeof open>): ReturnType<typeof open> {
  try {
    return open(...args);
  } catch (err) {
    throw err instanceof IntegrityError ? new KeyIntegrityError(err.message) : err;
  }
}
