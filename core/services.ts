import type { Logger } from './logger';
import { createPool, type Pool } from '../db/pool';
import { createMailer, type Mailer } from '../mail/mailer';
import { DataKeys } from '../vault/data-keys';
import { Identities } from '../vault/identities';
import type { Keyring } from '../vault/keyring';
import { Vault } from '../vault/vault';

/** The domain services both the API and the worker use, built once per process from one pool. */
export interface Services {
  pool: Pool;
  dataKeys: DataKeys;
  vault: Vault;
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
  const pool = createPool(opts.databaseUrl, opts.poolSize, opts.logger);
  const dataKeys = new DataKeys(pool, opts.keyring);
  const mailer = createMailer(opts.smtpUrl, opts.mailFrom);
  return {
    pool,
    dataKeys,
    vault: new Vault(pool, dataKeys, opts.clock),
    identities: new Identities(pool, dataKeys),
    mailer,
    async close() {
      mailer.close();
      await pool.end();
    },
  };
}
