import { randomBytes } from 'node:crypto';
import { rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHarness, type Harness } from './support/harness';
import { expectCleanRun, findLeaks } from './support/leaks';

/** The leak check itself: what it looks for beyond the values a test registered, and where. */
describe('the leak check', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('finds a stored value no test registered (an old version too) in a worker process log; a value marked public is left out', async () => {
    const agent = await h.createIdentity();
    const store = async (value: string) => {
      const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'unregistered', kind: 'api_key', value } });
      expect(res.status, res.text).toBe(201);
    };
    const old = `sk_never_registered_${randomBytes(8).toString('hex')}`;
    await store(old);
    await store(`sk_current_${randomBytes(8).toString('hex')}`);
    const address = h.publicValue(`team-${randomBytes(4).toString('hex')}@example.com`);
    await store(address);
    expect(h.secrets).not.toContain(old);

    // What test/support/worker-process.ts keeps of a worker's output.
    const log = path.join(path.dirname(h.logFile), 'worker-4242.log');
    writeFileSync(log, `{"level":40,"msg":"provider answered 401: ${old}"}\n{"msg":"notice sent to ${address}"}\n`);
    try {
      expect(await findLeaks(h)).toEqual([`a secret (${old.length} chars, starting 'sk_…') appears in worker-4242.log`]);
    } finally {
      rmSync(log);
    }
    // Registered now, for the run's sweep too; the public one is not.
    expect(h.secrets).toContain(old);
    expect(h.secrets).not.toContain(address);
  });
});
