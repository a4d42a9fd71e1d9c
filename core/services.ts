import type { DataConverter } from '@temporalio/common';
import type { Logger } from './logger';
import { createPool, type Pool } from '../db/pool';
import { createMailer, type Mailer } from '../mail/mailer';
import { DataKeys } from '../vault/data-keys';
import { Grants } from '../vault/grants';
import { Identities } from '../vault/identities';
import { dataConverter, EncryptionCodec } from '../vault/payload-codec';
import type { Keyring } from '../vault/keyring';
import { RotationVault } from '../vault/rotation-vault';
import { SecretStore } from '../vault/secret-store';
import { Vault } from '../vault/vault';

/** The domain services both the API and the worker use, built once per process from one pool. */
export interface Services {
  pool: Pool;
  dataKeys: DataKeys;
  vault: Vault;
  rotations: RotationVault;
  grants: Grants;
  secrets: SecretStore;
  identities: Identities;
  mailer: Mailer;
  /** Encrypts every Temporal payload; every client, worker and replayer of this deployment uses it. */
  dataConverter: DataConverter;
  close(): Promise<void>;
}

export function openServices(opts: {
  databaseUrl: string;
  poolSize: number;
  keyring: Keyring;
  smtpUrl: string;
  mailFrom: string;
  logger?: Logger;
  clock?: () => Date;
  /** GCM encryptions per data key before a new one takes over (DATA_KEY_MAX_ENCRYPTIONS). */
  maxEncryptionsPerKey?: number;
}): Services {
  const clock = opts.clock ?? (() => new Date());
  const pool = createPool(opts.databaseUrl, opts.poolSize, opts.logger);
  const dataKeys = new DataKeys(pool, opts.keyring, { maxEncryptions: opts.maxEncryptionsPerKey });
  const secrets = new SecretStore(dataKeys, clock);
  const mailer = createMailer(opts.smtpUrl, opts.mailFrom);
  return {
    pool,
    dataKeys,
    vault: new Vault(pool, secrets, clock),
    rotations: new RotationVault(pool, secrets, clock),
    grants: new Grants(pool),
    secrets,
    identities: new Identities(pool, dataKeys),
    mailer,
    dataConverter: dataConverter(EncryptionCodec.fromDataKeys(dataKeys, pool)),
    async close() {
      mailer.close();
      await pool.end();
    },
  };
}
