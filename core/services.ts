import type { Logger } from './logger';
import { createPool, type Pool } from '../db/pool';
import { createMailer, type Mailer } from '../mail/mailer';
import { DataKeys } from '../vault/data-keys';
import { Grants } from '../vault/grants';
import { Identities } from '../vault/identities';
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
}): Services {
  const clock = opts.clock ?? (() => new Date());
  const pool = createPool(opts.databaseUrl, opts.poolSize, opts.logger);
  const dataKeys = new DataKeys(pool, opts.keyring);
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
    async close() {
      mailer.close();
      await pool.end();
    },
  };
}
