import { once } from 'node:events';
import { mkdirSync } from 'node:fs';
import type { Server } from 'node:http';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection } from '@temporalio/worker';
import { createApp } from '../api/app';
import { closeGracefully, listen } from '../api/server';
import { createDependents } from '../dependents';
import type { Logger } from '../core/logger';
import { ConfigError, partProblems, type Config } from '../core/config';
import { HelperInterrupted } from '../core/helper-interrupted';
import { allowOutbound } from '../core/outbound';
import { openServices } from '../core/services';
import { migrate } from '../db/pool';
import { startEmbeddedPostgres } from '../embedded/postgres';
import { startSmtpSink } from '../embedded/smtp-sink';
import { adminTokenPath, ensureAdminToken, ensureDataDir, ensureKeyringFile } from '../embedded/state';
import { startEmbeddedTemporal } from '../embedded/temporal';
import { Keyring } from '../vault/keyring';
import { refingerprintSeeds } from '../vault/seed-fingerprints';
import { checkWorkflowBundle } from '../worker/bundle';
import { activityDeps } from '../worker/deps';
import { ensureSchedules } from '../worker/schedules';
import { createWorker, installTemporalLogging } from '../worker/worker';

type Part = 'api' | 'worker';

/**
 * Runs the service: the servers it must embed (those without an external address), then the
 * worker and/or the API. Stops everything in reverse order on SIGINT/SIGTERM.
 */
export async function serve(config: Config, logger: Logger, parts: Part[] = ['api', 'worker']): Promise<void> {
  const problems = partProblems(config, parts);
  if (problems.length > 0) throw new ConfigError(problems);
  // A prebuilt bundle is the worker's: checked before anything starts (there, readable, and built from these workflows).
  if (parts.includes('worker') && config.WORKFLOW_BUNDLE) checkWorkflowBundle(config.WORKFLOW_BUNDLE);
  const closers: { name: string; close: () => Promise<unknown> }[] = [];
  let starting = true;
  /** Set when start-up is to stop at the next checkpoint: the exit code, 0 for a signal, 1 when an embedded server died. */
  let stopCode: number | undefined;
  /**
   * A signal during start-up is taken at the next safe point, once what was just started can be
   * closed with the rest: start-up ends there and everything started so far stops in order.
   */
  const checkpoint = () => {
    if (stopCode !== undefined) throw new StartupInterrupted();
  };
  const onClose = (name: string, close: () => Promise<unknown>) => {
    closers.unshift({ name, close });
    checkpoint();
  };
  let stopping = false;
  const graceMs = config.SHUTDOWN_GRACE_SECONDS * 1000;

  const stop = async (code: number) => {
    if (stopping) return;
    stopping = true;
    logger.info('shutting down');
    const failed = await closeAll(closers, logger);
    logger.info('stopped');
    // A part that did not stop cleanly (the worker's drain given up with activities still running,
    // say) is a failure: the exit code says so to whoever supervises the process (it was 0).
    process.exitCode = failed ? Math.max(code, 1) : code;
  };
  /**
   * An embedded server that exits on its own (killed, crashed, out of disk) is not restarted: every
   * request and activity would fail until then, so the service stops with exit code 1 and says
   * why, and the next start starts the server again on the same data.
   */
  const serverDied = (name: string, code: number | null) => {
    if (stopping) return;
    logger.fatal(
      { server: name, exitCode: code, log: path.join(config.dataDir, 'logs', `${name}.log`) },
      `the embedded ${name} server exited (code ${code}); stopping, since nothing works without it: start again to restart it`,
    );
    // During start-up it stops at the next checkpoint, as a signal would, but exits 1.
    if (starting) {
      stopCode = 1;
      return;
    }
    void stop(1);
  };
  // Ctrl-C under `npm start` arrives twice at once (the terminal signals the process group, and
  // npm passes its own copy on): only a signal a moment after the first means "exit now". A first
  // signal while the service is already stopping (a server died, the worker stopped) lets that
  // stop go on: it was taken for a second one, and the process exited 130 at once, its drain and
  // PostgreSQL's orderly stop skipped.
  let firstSignalAt = 0;
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      if (firstSignalAt && Date.now() - firstSignalAt < 1_000) return;
      if (firstSignalAt) {
        logger.warn(`second ${signal}: exiting now`);
        process.exit(130);
      }
      firstSignalAt = Date.now();
      if (stopping || (starting && stopCode !== undefined)) {
        logger.info(`${signal}: already stopping; a second one exits at once`);
        return;
      }
      if (starting) {
        stopCode = 0;
        logger.info(`${signal} during start-up: stopping once what is starting now can be stopped`);
        return;
      }
      void stop(0);
    });
  }

  try {
    installTemporalLogging(logger);
    ensureDataDir(config.dataDir);
    const databaseUrl = config.DATABASE_URL ?? (await embed(onClose, 'postgres', startEmbeddedPostgres({ dataDir: config.dataDir, logger }), serverDied)).url;
    const temporalAddress =
      config.TEMPORAL_ADDRESS ??
      (await embed(onClose, 'temporal', startEmbeddedTemporal({ dataDir: config.dataDir, namespace: config.TEMPORAL_NAMESPACE, cliPath: config.TEMPORAL_CLI_PATH, logger }), serverDied))
        .address;
    const smtpUrl =
      config.SMTP_URL ?? (parts.includes('worker') ? (await embed(onClose, 'smtp', startSmtpSink({ mailDir: path.join(config.dataDir, 'mail'), logger }), serverDied)).url : 'smtp://unused');

    await migrate(databaseUrl, logger);
    checkpoint();
    const keyring = Keyring.fromSetting(config.VAULT_MASTER_KEY ?? ensureKeyringFile(config.dataDir));
    const services = openServices({
      databaseUrl,
      poolSize: config.DATABASE_POOL_SIZE,
      keyring,
      smtpUrl,
      mailFrom: config.MAIL_FROM,
      logger,
      maxEncryptionsPerKey: config.DATA_KEY_MAX_ENCRYPTIONS,
      readThread: parts.includes('api') && config.READ_THREAD,
    });
    onClose('services', () => services.close());
    await services.ready();
    checkpoint();
    // A keyring missing a key still in use would fail every read under it, one by one: refuse to start instead.
    const missing = await services.dataKeys.missingMasterKeys();
    if (missing.length) {
      throw new ConfigError(
        missing.map(
          (m) =>
            `VAULT_MASTER_KEY: master key ${m.id} wraps ${m.wraps} data or service key(s) but is not in the keyring, so what it wraps cannot be opened; ` +
            'put it back (an inline VAULT_MASTER_KEY takes several keys, comma-separated, the current one first) and run `mailgent rekey` before removing it',
        ),
      );
    }

    // TOTP seed versions stored before a seed's fingerprint was of its seed: set again, once (a no-op after).
    const refingerprinted = await refingerprintSeeds(services.pool, services.secrets, logger);
    if (refingerprinted > 0) logger.info({ versions: refingerprinted }, 'fingerprinted the seeds of TOTP versions stored before their fingerprint was of the seed');
    checkpoint();

    const clientConnection = await Connection.connect({ address: temporalAddress });
    onClose('temporal client', () => clientConnection.close());
    const client = new Client({ connection: clientConnection, namespace: config.TEMPORAL_NAMESPACE, dataConverter: services.dataConverter });

    if (parts.includes('worker')) {
      const connection = await NativeConnection.connect({ address: temporalAddress });
      onClose('worker connection', () => connection.close());
      mkdirSync(config.envFilesRoot, { recursive: true, mode: 0o700 });
      allowOutbound(config.OUTBOUND_ALLOW);
      const deps = activityDeps(services, { envFilesRoot: config.envFilesRoot, client, taskQueue: config.TASK_QUEUE, securityNotify: config.SECURITY_NOTIFY, maxOpenRotations: config.BATCH_MAX_OPEN_ROTATIONS });
      const worker = await createWorker({
        connection,
        namespace: config.TEMPORAL_NAMESPACE,
        taskQueue: config.TASK_QUEUE,
        deps,
        dataConverter: services.dataConverter,
        shutdownGraceMs: graceMs,
        maxCachedWorkflows: config.WORKER_CACHED_WORKFLOWS,
        ...(config.WORKFLOW_BUNDLE ? { workflowBundle: { codePath: config.WORKFLOW_BUNDLE } } : {}),
      });
      const running = worker.run();
      // Polling stops at once; running activities get the grace period to finish, then are cancelled.
      onClose('worker', async () => {
        if (worker.getState() === 'RUNNING') worker.shutdown();
        await running;
      });
      // Only stop() shuts the worker down: one that stops by itself (or fails) leaves nothing to run
      // rotations. During start-up that stops at the next checkpoint, as a dead embedded server does.
      const workerGone = (err?: unknown) => {
        if (stopping) return;
        if (err) logger.fatal({ err }, 'worker failed');
        else logger.fatal('the worker stopped on its own; stopping');
        if (starting) stopCode = 1;
        else void stop(1);
      };
      running.then(() => workerGone(), (err) => workerGone(err ?? new Error('the worker failed')));
      await ensureSchedules(client, {
        taskQueue: config.TASK_QUEUE,
        sweepCron: config.SWEEP_CRON,
        orphanCron: config.ORPHAN_REPORT_CRON,
        orphanDays: config.ORPHAN_DAYS,
        retentionDays: config.DELETE_RETENTION_DAYS,
        mailRetentionDays: config.MAIL_RETENTION_DAYS,
        logger,
      });
      checkpoint();
      logger.info({ taskQueue: config.TASK_QUEUE }, 'worker running');
    }

    if (parts.includes('api')) {
      const adminToken = config.ADMIN_TOKEN ?? announceAdminToken(config.dataDir, logger);
      const app = createApp({
        ...services,
        dependentTypes: createDependents({ envFilesRoot: config.envFilesRoot }),
        securityNotify: config.SECURITY_NOTIFY,
        orphanDays: config.ORPHAN_DAYS,
        client,
        namespace: config.TEMPORAL_NAMESPACE,
        taskQueue: config.TASK_QUEUE,
        adminToken,
        codecCorsOrigins: config.CODEC_CORS_ORIGINS,
        logger,
        authFailures: { maxFailures: config.AUTH_FAILURE_LIMIT, windowMs: config.AUTH_FAILURE_WINDOW_SECONDS * 1000 },
      });
      const server: Server = listen(app, config.PORT, config.HOST);
      await once(server, 'listening');
      // Stop taking connections and close idle keep-alive sockets; in-flight requests get the grace
      // period to finish (their connections close after the response), then are cut.
      onClose('http', () =>
        closeGracefully(server, graceMs, () => logger.warn({ graceSeconds: config.SHUTDOWN_GRACE_SECONDS }, 'in-flight requests did not finish in time; closing their connections')),
      );
      logger.info({ port: config.PORT, host: config.HOST }, 'API listening');
    }
    checkpoint();
    starting = false;
  } catch (err) {
    starting = false;
    if (err instanceof StartupInterrupted) return stop(stopCode ?? 0);
    // A signal during start-up also reaches the helpers start-up runs in the same process group
    // (the workflows' bundler, initdb, under npm start's Ctrl-C): one that signal ended is the
    // interruption, not a start that failed (exit 1).
    if (stopCode === 0 && err instanceof HelperInterrupted) {
      logger.info(`${err.message} too: start-up interrupted`);
      return stop(0);
    }
    // Any other failure is start-up's own, signal or not (the database refused the connection, a
    // migration failed): it exits 1 (2 for a configuration error), its error on stderr. Before,
    // every failure after a signal (or after an embedded server died) exited as the stop did, 0
    // for a signal, and said nothing of the error.
    await stop(1);
    throw err;
  }
}

class StartupInterrupted extends Error {}

/** Stops each part in turn, every one even after a failure; whether any failed (each is logged). */
export async function closeAll(closers: { name: string; close: () => Promise<unknown> }[], logger: Pick<Logger, 'error'>): Promise<boolean> {
  let failed = false;
  for (const { name, close } of closers) {
    await close().catch((err) => {
      failed = true;
      logger.error({ err, part: name }, 'failed to stop cleanly');
    });
  }
  return failed;
}

async function embed<T extends { stop(): Promise<void>; exited?: Promise<number | null> }>(
  onClose: (name: string, close: () => Promise<unknown>) => void,
  name: string,
  starting: Promise<T>,
  died: (name: string, code: number | null) => void,
): Promise<T> {
  const started = await starting;
  void started.exited?.then((code) => died(name, code));
  onClose(name, () => started.stop());
  return started;
}

/** The generated admin token is printed once, when it is created, and only to a terminal. */
function announceAdminToken(dataDir: string, logger: Logger): string {
  const { token, created } = ensureAdminToken(dataDir);
  const file = adminTokenPath(dataDir);
  if (created && process.stdout.isTTY) {
    process.stdout.write(`\nAdmin token (shown once; also kept in ${file}, mode 0600):\n  ${token}\n\n`);
  } else if (created) {
    logger.info({ file }, 'generated the admin token; read it from the file');
  }
  return token;
}
