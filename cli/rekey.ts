import { existsSync } from 'node:fs';
import type { Config } from '../core/config';
import { ConfigError, isInlineMasterKey } from '../core/config';
import type { Logger } from '../core/logger';
import { createPool, migrate } from '../db/pool';
import { connectEmbeddedPostgres } from '../embedded/postgres';
import { keyringPath } from '../embedded/state';
import { appendAudit } from '../vault/audit';
import { DataKeys } from '../vault/data-keys';
import { generateMasterKey, Keyring, masterKeyId, readKeyringFile, writeKeyringFile, type MasterKey } from '../vault/keyring';

export interface RekeyResult {
  newMasterKeyId: string;
  rewrapped: number;
  retiredMasterKeys: string[];
  /** Set when the old key came from VAULT_MASTER_KEY: the operator must switch it to the new key. */
  action?: string;
}

/**
 * Re-wraps every data key under a new master key. Secret rows are not touched: they are sealed by
 * data keys, which do not change. With a keyring file (the embedded default, or VAULT_MASTER_KEY
 * naming a file) the new key is generated and written there, and keys no longer used are dropped.
 * With an inline VAULT_MASTER_KEY the new key comes from NEW_VAULT_MASTER_KEY.
 */
export async function rekey(config: Config, logger: Logger, env: NodeJS.ProcessEnv = process.env): Promise<RekeyResult> {
  const setting = config.VAULT_MASTER_KEY ?? keyringPath(config.dataDir);
  if (!config.VAULT_MASTER_KEY && !existsSync(setting)) {
    throw new ConfigError([`no master key to rotate: VAULT_MASTER_KEY is not set and ${setting} does not exist`]);
  }
  const inline = isInlineMasterKey(setting);
  let keyring: Keyring;
  let newKey: MasterKey;
  if (inline) {
    const given = env.NEW_VAULT_MASTER_KEY;
    if (!given || !isInlineMasterKey(given)) {
      throw new ConfigError(['VAULT_MASTER_KEY is set inline: put the new key (base64 of 32 bytes) in NEW_VAULT_MASTER_KEY']);
    }
    const key = Buffer.from(given, 'base64');
    newKey = { id: masterKeyId(key), key };
    const old = Buffer.from(setting, 'base64');
    keyring = Keyring.fromKeys([newKey, { id: masterKeyId(old), key: old }], newKey.id);
  } else {
    const { keys } = readKeyringFile(setting);
    const key = generateMasterKey();
    newKey = { id: masterKeyId(key), key };
    // The new key is in the file before any data key uses it, so no crash can strand a data key.
    writeKeyringFile(setting, [newKey, ...keys], newKey.id);
    keyring = Keyring.fromSetting(setting);
  }

  const db = config.DATABASE_URL ? { url: config.DATABASE_URL, stop: async () => undefined } : await connectEmbeddedPostgres({ dataDir: config.dataDir, logger });
  try {
    await migrate(db.url, logger);
    const pool = createPool(db.url, 2, logger);
    try {
      const { rewrapped, masterKeysInUse } = await new DataKeys(pool, keyring).rewrapAll();
      let retiredMasterKeys: string[] = [];
      if (!inline) {
        const { keys } = readKeyringFile(setting);
        const kept = keys.filter((k) => k.id === newKey.id || masterKeysInUse.includes(k.id));
        retiredMasterKeys = keys.filter((k) => !kept.includes(k)).map((k) => k.id);
        writeKeyringFile(setting, kept, newKey.id);
      }
      await appendAudit(pool, {
        identityId: null,
        actor: 'admin',
        action: 'vault.rekey',
        outcome: 'ok',
        detail: { masterKeyId: newKey.id, rewrapped, retired: retiredMasterKeys },
      });
      return {
        newMasterKeyId: newKey.id,
        rewrapped,
        retiredMasterKeys,
        ...(inline ? { action: 'set VAULT_MASTER_KEY to the value of NEW_VAULT_MASTER_KEY and restart the service' } : {}),
      };
    } finally {
      await pool.end();
    }
  } finally {
    await db.stop();
  }
}
