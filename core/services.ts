import type { DataConverter } from '@temporalio/common';
import type { Logger } from './logger';
import { createPool, type Pool } from '../db/pool';
import { createMailer, type Mailer } from '../mail/mailer';
import { DataKeys } from '../vault/data-keys';
import { Grants } from '../vault/grants';
import { Identities } from '../vault/identities';
import { dataConverter, EncryptionCodec } from '../vault/payload-codec';
import type { Keyring } from '../vault/keyring';
import { ReadThread } from '../vault/read-thread';
import { RotationVault } from '../vault/rotation-vault';
import { FINGERPRINT_KEY, SecretStore } from '../vault/secret-store';
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
  /** The thread vault.get, vault.totp and vault.store run in, when asked for (`readThread`). */
  readThread?: ReadThread;
  /** Resolves once the read thread (if any) has started; rejects with its error if it cannot. */
  ready(): Promise<void>;
  close(): Promise<void>;
}

/**
 * Connections the vault thread's own pool keeps: a read batch and a store batch can each hold one
 * while a store that runs alone (one that sets policy, or the calls of a batch that rolled back)
 * takes the third; more wait for a free one.
 */
const READ_THREAD_POOL_SIZE = 3;

/**
 * How long a statement of the services' pool may go unanswered (db/pool.ts): a token's lookup, a
 * metadata read, a rotation's bookkeeping. Without it a database that stops answering with its
 * connections open held every request past the token cache (5 s) for as long as it did not answer:
 * not the 503 the vault's own calls give (its thread's pool: 10 s). Long enough for the longest
 * statement either process issues (a sweep's page, an audit verification's 5,000 rows).
 */
export const SERVICES_QUERY_TIMEOUT_MS = 15_000;

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
  /**
   * Run vault.get, vault.totp and vault.store in a worker thread with its own pool (vault/read-thread.ts; the
   * API turns it on, READ_THREAD). It reads the wall clock, so it cannot go with `clock`, and it
   * reads the keyring from its setting, so the keyring must come from Keyring.fromSetting.
   */
  readThread?: boolean;
}): Services {
  if (opts.readThread && opts.clock) throw new Error('the read thread reads the wall clock; it cannot be used with a clock of its own');
  if (opts.readThread && !opts.keyring.setting) throw new Error('the read thread needs a keyring read from its setting (Keyring.fromSetting)');
  const clock = opts.clock ?? (() => new Date());
  const pool = createPool(opts.databaseUrl, opts.poolSize, opts.logger, { queryTimeoutMs: SERVICES_QUERY_TIMEOUT_MS });
  const dataKeys = new DataKeys(pool, opts.keyring, { maxEncryptions: opts.maxEncryptionsPerKey });
  const secrets = new SecretStore(dataKeys, clock);
  const mailer = createMailer(opts.smtpUrl, opts.mailFrom);
  const thread = opts.readThread
    ? new ReadThread(
        { databaseUrl: opts.databaseUrl, poolSize: READ_THREAD_POOL_SIZE, keyringSetting: opts.keyring.setting!, maxEncryptionsPerKey: opts.maxEncryptionsPerKey },
        opts.logger,
      )
    : undefined;
  return {
    pool,
    dataKeys,
    vault: new Vault(pool, secrets, clock, thread),
    rotations: new RotationVault(pool, secrets, clock),
    grants: new Grants(pool, secrets),
    secrets,
    identities: new Identities(pool, dataKeys),
    mailer,
    dataConverter: dataConverter(EncryptionCodec.fromDataKeys(dataKeys, pool)),
    readThread: thread,
    async ready() {
      await dataKeys.warm([FINGERPRINT_KEY]);
      await thread?.start();
    },
    async close() {
      mailer.close();
      await thread?.close();
      await pool.end();
    },
  };
}
