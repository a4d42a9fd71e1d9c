import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import type {} from 'vitest';
import type { TestProject } from 'vitest/node';
import { migrate } from '../../db/pool';
import { runLeakSweep } from './sweep';
import { startEmbeddedPostgres } from '../../embedded/postgres';
import { startSmtpSink } from '../../embedded/smtp-sink';
import { startEmbeddedTemporal } from '../../embedded/temporal';
import { bundleWorkflows } from '../../worker/bundle';

/**
 * Starts the real servers once per test run — a Temporal dev server, an embedded PostgreSQL and
 * the SMTP sink — through the same code `npm start` uses, migrates a template database, and
 * bundles the workflows once. Every test file clones the template into a database of its own.
 * DATABASE_URL / TEMPORAL_ADDRESS point the tests at external servers instead.
 */
declare module 'vitest' {
  export interface ProvidedContext {
    temporalAddress: string;
    pgAdminUrl: string;
    templateDb: string;
    smtpUrl: string;
    mailDir: string;
    workflowBundlePath: string;
    tmpDir: string;
  }
}

export const TEMPLATE_DB = 'mailgent_template';

export default async function setup(project: TestProject) {
  const tmpDir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-test-'));
  // The embedded PostgreSQL runs as another OS user when we are root: let it pass through.
  chmodSync(tmpDir, 0o711);
  const stops: (() => Promise<void>)[] = [];
  const teardown = async () => {
    for (const stop of stops.reverse()) await stop().catch((err) => console.error('teardown:', err));
    rmSync(tmpDir, { recursive: true, force: true });
  };
  let temporalAddress = '';
  try {
    const started = await Promise.allSettled([
      process.env.DATABASE_URL
        ? { adminUrl: process.env.DATABASE_URL, stop: async () => undefined }
        : startEmbeddedPostgres({ dataDir: path.join(tmpDir, 'pg') }),
      process.env.TEMPORAL_ADDRESS
        ? { address: process.env.TEMPORAL_ADDRESS, stop: async () => undefined }
        : startEmbeddedTemporal({ dataDir: path.join(tmpDir, 'temporal'), namespace: 'default', cliPath: process.env.TEMPORAL_CLI_PATH }),
      startSmtpSink({ mailDir: path.join(tmpDir, 'mail') }),
      bundleWorkflows().then((code) => ({ code })),
    ] as const);
    // Whatever started must be stopped, even when something else failed to start.
    for (const s of started) if (s.status === 'fulfilled' && 'stop' in s.value) stops.push(s.value.stop);
    const failed = started.find((s) => s.status === 'rejected');
    if (failed) throw failed.reason;
    const [pgServer, temporal, smtp, bundle] = started.map((s) => (s as PromiseFulfilledResult<unknown>).value) as [
      { adminUrl: string },
      { address: string },
      { url: string; mailDir: string },
      { code: string },
    ];

    const admin = new pg.Client({ connectionString: pgServer.adminUrl });
    await admin.connect();
    await admin.query(`DROP DATABASE IF EXISTS ${TEMPLATE_DB}`);
    await admin.query(`CREATE DATABASE ${TEMPLATE_DB}`);
    await admin.end();
    await migrate(withDatabase(pgServer.adminUrl, TEMPLATE_DB));

    const workflowBundlePath = path.join(tmpDir, 'workflow-bundle.js');
    writeFileSync(workflowBundlePath, bundle.code);

    temporalAddress = temporal.address;
    project.provide('temporalAddress', temporal.address);
    project.provide('pgAdminUrl', pgServer.adminUrl);
    project.provide('templateDb', TEMPLATE_DB);
    project.provide('smtpUrl', smtp.url);
    project.provide('mailDir', smtp.mailDir);
    project.provide('workflowBundlePath', workflowBundlePath);
    project.provide('tmpDir', tmpDir);
  } catch (err) {
    await teardown();
    throw err;
  }
  // The run-wide leak sweep (test/support/sweep.ts) runs before the servers stop; any hit fails the run.
  return async () => {
    let swept: Awaited<ReturnType<typeof runLeakSweep>> | undefined;
    let failure: unknown;
    try {
      swept = await runLeakSweep(tmpDir, temporalAddress);
    } catch (err) {
      failure = err;
    }
    await teardown();
    if (!swept) {
      process.exitCode = 1;
      throw failure;
    }
    const mb = (swept.bytes / 1024 / 1024).toFixed(1);
    console.log(`leak sweep: ${swept.secrets} secrets, ${swept.places} places (${mb} MB, ${swept.workflows} workflow histories): ${swept.hits.length} hits`);
    if (swept.hits.length) {
      // Vitest reports an error thrown here but still exits 0: set the exit code ourselves.
      process.exitCode = 1;
      throw new Error(`the leak sweep found secrets:\n${swept.hits.join('\n')}`);
    }
  };
}

export function withDatabase(url: string, database: string): string {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}
