import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startEmbeddedTemporal, type EmbeddedTemporal } from '../../embedded/temporal';
import { startHarness, type Harness } from '../support/harness';
import { expectCleanRun } from '../support/leaks';
import { expectSettled, faultRow } from './checks';
import { rotatingKey, until, type RotatingKey } from './fixtures';

/**
 * The Temporal dev server is killed (SIGKILL: no chance to flush anything) mid-rotation and starts
 * again on the same SQLite file and port. The file is in WAL mode with synchronous=normal
 * (embedded/temporal.ts): what the server acknowledged must survive its process dying.
 * It is a server of this file's own: the run's shared one keeps serving the other files.
 */
describe('fault: the Temporal server restarts mid-rotation', () => {
  let temporal: EmbeddedTemporal | undefined;
  let h: Harness;
  let key: RotatingKey | undefined;
  const dataDir = path.join(inject('tmpDir'), `temporal-restart-${randomBytes(3).toString('hex')}`);
  const startTemporal = (port?: number) => startEmbeddedTemporal({ dataDir, namespace: 'default', cliPath: process.env.TEMPORAL_CLI_PATH, port });

  beforeAll(async () => {
    temporal = await startTemporal();
    h = await startHarness({ worker: true, temporalAddress: temporal.address });
  });
  afterAll(async () => {
    await key?.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
    await temporal?.stop();
  });

  it('the server is killed while the provider is creating the key; on the same file it finishes the run', { timeout: 180_000 }, async ({ task }) => {
    const row = faultRow(task, 'Temporal dev server killed (SIGKILL) and restarted mid-rotation');
    // WAL mode is what the embedded server runs with, and what this scenario relies on.
    expect(existsSync(path.join(dataDir, 'temporal.sqlite-wal'))).toBe(true);
    const agent = await h.createIdentity();
    key = await rotatingKey(h, agent, { label: 'temporal-restart', webhook: true });
    // The create is held at the provider while the server stops: the activity's answer has nowhere to go.
    key.provider.delayNext('create', 1, 3_000);
    const seen = key.provider.requests.length;
    const workflowId = await key.rotate();
    await until('the rotation\'s create at the provider', () => key!.provider.requests.slice(seen).some((r) => r.route === 'create'));
    const port = Number(temporal!.address.split(':').at(-1));
    const stoppedAt = Date.now();
    await temporal!.stop('SIGKILL');
    temporal = undefined;
    // Down for long enough that the held create returns and the worker's polls fail.
    await new Promise((r) => setTimeout(r, 5_000));
    temporal = await startTemporal(port);
    const downFor = Date.now() - stoppedAt;

    const { closedAt } = await expectSettled(h, key.expected(workflowId, 'rotated', { timeoutMs: 150_000 }));
    // The webhook consumer saw one pending version: the run went on from where it was.
    expect(new Set(key.receiver!.events.filter((e) => e.event.type === 'credential.pending').map((e) => e.event.version))).toEqual(new Set([2]));
    row.outcome = 'finished';
    row['server down'] = `${(downFor / 1000).toFixed(1)} s`;
    row['kill → closed'] = `${((closedAt - stoppedAt) / 1000).toFixed(1)} s`;
    row['provider creates/revokes'] = `${key.provider.creates - key.before.creates}/${key.provider.revokes - key.before.revokes}`;
  });
});
