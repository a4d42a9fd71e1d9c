import { existsSync, realpathSync } from 'node:fs';
import pg from 'pg';
import type { Config } from '../core/config';
import { ConfigError } from '../core/config';
import type { Logger } from '../core/logger';
import { createPool, migrate } from '../db/pool';
import { connectEmbeddedPostgres } from '../embedded/postgres';
import { keyringPath } from '../embedded/state';
import { appendAudit } from '../vault/audit';
import { DataKeys } from '../vault/data-keys';
import { inlineMasterKeys, generateMasterKey, Keyring, masterKeyId, readKeyringFile, writeKeyringFile, type MasterKey } from '../vault/keyring';

export interface RekeyResult {
  newMasterKeyId: string;
  rewrapped: number;
  /** Data keys retired, each identity given a new one (new versions are sealed under fresh key material). */
  renewed: number;
  retiredMasterKeys: string[];
  /** Set when the keys came from VAULT_MASTER_KEY: what the operator does next. */
  action?: string;
}

/** One rekey at a time per database: two would each prune the keyring of the key the other wraps with. */
const REKEY_LOCK = 4631800002;

/**
 * Re-wraps every data key under the current master key, then retires each identity's active data
 * key for a new one (DataKeys.renewActive): values stored from then on are sealed under key material
 * no copy of the database from before the rekey holds. Secret rows are not touched: stored versions
 * stay sealed by their data keys, re-wrapped.
 *
 * With a keyring file (the embedded default, or VAULT_MASTER_KEY naming a file) a new key is
 * generated and written there first; a running service picks it up, and keys no longer used are
 * dropped at the end. With an inline VAULT_MASTER_KEY the services must know the new key before
 * anything is wrapped with it, and keep the old one until nothing uses it: so they run with
 * `VAULT_MASTER_KEY=<new>,<old>` (they wrap with the new, unwrap with either), rekey re-wraps what
 * the old one still wraps, and then the old one can be dropped.
 */
export async function rekey(config: Config, logger: Logger, env: NodeJS.ProcessEnv = process.env): Promise<RekeyResult> {
  const setting = config.VAULT_MASTER_KEY ?? keyringPath(config.dataDir);
  if (!config.VAULT_MASTER_KEY && !existsSync(setting)) {
    throw new ConfigError([`no master key to rotate: VAULT_MASTER_KEY is not set and ${setting} does not exist`]);
  }
  const inline = inlineMasterKeys(setting);
  if (inline && inline.length === 1) {
    throw new ConfigError([
      'VAULT_MASTER_KEY holds one inline key, so there is nothing to re-wrap under. Rotating it: set VAULT_MASTER_KEY=<new key>,<this key> ' +
        '(a new base64 key first) on every API and worker and restart them, run rekey, then drop the old key from VAULT_MASTER_KEY' +
        (env.NEW_VAULT_MASTER_KEY ? ' (NEW_VAULT_MASTER_KEY is no longer read: a service that did not know the new key kept wrapping under the old one)' : ''),
    ]);
  }

  const db = config.DATABASE_URL ? { url: config.DATABASE_URL, stop: async () => undefined } : await connectEmbeddedPostgres({ dataDir: config.dataDir, logger });
  const lock = new pg.Client({ connectionString: db.url });
  try {
    await migrate(db.url, logger);
    await lock.connect();
    if (!(await lock.query('SELECT pg_try_advisory_lock($1) AS held', [REKEY_LOCK])).rows[0].held) {
      throw new Error('another rekey is running against this database; run this one again once it has finished');
    }
    let keyring: Keyring;
    let fileKeys: MasterKey[] = [];
    let file = setting;
    if (inline) {
      keyring = Keyring.fromSetting(setting);
    } else {
      const key = generateMasterKey();
      // Its real path, resolved once: every write of this rekey goes to the file it read, not to
      // wherever a symbolic link points by the last one (retargeted meanwhile by whoever can write
      // the link's directory, the re-wrap between them taking a while).
      file = realpathSync(setting);
      const before = readKeyringFile(file);
      fileKeys = [{ id: masterKeyId(key), key }, ...before.keys];
      // The new key is in the file (synced) before any data key uses it, so no crash can strand a
      // data key: first beside the old current key, and only once that file and its directory are
      // synced, made current. (Written current at once, the file was visible, and a service could
      // wrap under the new key and commit, before the directory's sync made the rename durable: a
      // crash then could bring back the file without it.)
      writeKeyringFile(file, fileKeys, before.current);
      writeKeyringFile(file, fileKeys, fileKeys[0]!.id);
      // Taken once the file is in place, not before: a service that read the old current key just
      // before the rename wraps with it inside a transaction begun before then, so begun before this
      // (one begun while the file was being synced included). Once those have ended, the re-wrap
      // below sees every such key. As text, not a Date: that would cut the microseconds, and a
      // transaction begun earlier in the same millisecond would not count as begun before it.
      const written = (await lock.query('SELECT clock_timestamp()::text AS at')).rows[0].at as string;
      keyring = Keyring.fromSetting(file);
      await transactionsEnded(lock, written);
    }
    const current = keyring.current;

    const pool = createPool(db.url, 2, logger);
    try {
      const dataKeys = new DataKeys(pool, keyring);
      const renewFrom = (await lock.query('SELECT clock_timestamp()::text AS at')).rows[0].at as string;
      const { rewrapped } = await dataKeys.rewrapAll();
      const renewed = await dataKeys.renewActive(renewFrom);
      // Counted after the renewal too (its new keys are wrapped under the current master key).
      const masterKeysInUse = await dataKeys.masterKeysInUse();
      const known = inline ? keyring.ids : fileKeys.map((k) => k.id);
      const unknown = masterKeysInUse.filter((id) => !known.includes(id));
      if (unknown.length) throw new Error(`master keys ${unknown.join(', ')} are still in use but not in the keyring; nothing was dropped`);
      const retiredMasterKeys = known.filter((id) => id !== current.id && !masterKeysInUse.includes(id));
      if (!inline) writeKeyringFile(file, fileKeys.filter((k) => !retiredMasterKeys.includes(k.id)), current.id);
      await appendAudit(pool, {
        identityId: null,
        actor: 'admin',
        action: 'vault.rekey',
        outcome: 'ok',
        detail: { masterKeyId: current.id, rewrapped, renewed, retired: retiredMasterKeys },
      });
      return {
        newMasterKeyId: current.id,
        rewrapped,
        renewed,
        retiredMasterKeys,
        ...(inline ? { action: inlineAction(current.id, retiredMasterKeys, masterKeysInUse) } : {}),
      };
    } finally {
      await pool.end();
    }
  } finally {
    await lock.end().catch(() => undefined);
    await db.stop();
  }
}

/**
 * What an operator with an inline keyring does next. Only keys nothing is wrapped by may go: one
 * still in use (a process not yet restarted with the new key first wrapped a data key under the old
 * one after the re-wrap passed it) must stay, or what it wraps can no longer be opened. Before, the
 * advice was to remove every other key whatever was still in use.
 */
export function inlineAction(currentId: string, retired: string[], inUse: string[]): string {
  const kept = inUse.filter((id) => id !== currentId);
  if (kept.length === 0) return `every key is now wrapped by ${currentId}: remove the others from VAULT_MASTER_KEY (keep the first) and restart`;
  return (
    `${kept.join(', ')} still wrap${kept.length === 1 ? 's' : ''} keys (a process still makes them under ${kept.length === 1 ? 'it' : 'them'}): keep ${kept.length === 1 ? 'it' : 'them'} in VAULT_MASTER_KEY, ` +
    `restart every API and worker with ${currentId} first, and run rekey again` +
    (retired.length ? `; ${retired.join(', ')} may be removed` : '')
  );
}

/**
 * Waits until no transaction begun before `at` (a timestamptz as text, to the microsecond) is open
 * on the database (a minute at most). Only client backends: a service's transaction, idle in it or
 * not, is one; autovacuum workers and other background processes never wrap a key, and a long
 * vacuum would otherwise make rekey fail with the new key already current.
 *
 * A session of another role is shown to a role without pg_read_all_stats (nor a member of its role)
 * with no transaction start (`<insufficient privilege>`): before, rekey waited for none of those.
 * Their transactions open now are waited for instead, by the virtual transaction id each holds a lock
 * on while it lasts (pg_locks shows every role's): conservative, as one begun after `at` counts too.
 * (Sessions without a role are background processes.)
 */
async function transactionsEnded(db: pg.Client, at: string): Promise<void> {
  const unseen = (
    await db.query(
      `SELECT l.virtualxid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'virtualxid' AND l.granted AND a.datname = current_database() AND a.pid <> pg_backend_pid()
          AND a.usesysid IS NOT NULL AND a.xact_start IS NULL AND a.query = '<insufficient privilege>'`,
    )
  ).rows.map((r) => r.virtualxid as string);
  for (const deadline = Date.now() + 60_000; ; ) {
    const { rows } = await db.query(
      `SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start < $1::timestamptz
       UNION ALL
       SELECT pid FROM pg_locks WHERE locktype = 'virtualxid' AND granted AND virtualxid = ANY($2::text[])`,
      [at, unseen],
    );
    if (rows.length === 0) return;
    if (Date.now() > deadline) {
      throw new Error(`transactions begun before the new key was written are still open (pids ${rows.map((r) => r.pid).join(', ')}); nothing was re-wrapped, run rekey again`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
