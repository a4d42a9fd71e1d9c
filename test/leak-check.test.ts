import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHarness, type Harness } from './support/harness';
import { expectCleanRun, findLeaks } from './support/leaks';
import { sweep } from './support/sweep';

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

  it("the SDK's logs (an activity's failure) go to the log of the harness whose worker ran it, which the check reads, while an earlier harness is open", async () => {
    // The SDK's logger is installed once per process, and files run one after another in a
    // process: before, every harness's SDK logs went to the first harness's log, ended with its file.
    const other = await startHarness({ worker: true });
    const workflowId = `rotate:${randomUUID()}`;
    try {
      const run = other.client.workflow.start('rotateCredential', {
        taskQueue: other.taskQueue,
        workflowId,
        args: [{ rotationId: randomUUID(), identityId: randomUUID(), credentialId: randomUUID() }],
      });
      await expect((await run).result()).rejects.toThrow();
    } finally {
      await other.close();
    }
    const logged = readFileSync(other.logFile, 'utf8');
    expect(logged).toContain(workflowId);
    expect(logged).toMatch(/Activity failed/);
    expect(readFileSync(h.logFile, 'utf8')).not.toContain(workflowId);
  });

  it('finds a value in the forms it takes in text: JSON-escaped, percent-encoded, upper-case hex, and base64 inside a longer blob at any offset', () => {
    const secret = 'sk_live/"quoted"+value 0123456789';
    const blob = (prefix: number) => Buffer.concat([randomBytes(prefix), Buffer.from(`{"key":"${secret}"}`), randomBytes(5)]);
    const places: [string, string][] = [
      ['json', JSON.stringify({ v: secret })],
      ['url', `https://example.com/?q=${encodeURIComponent(secret)}`],
      ['hex', Buffer.from(secret).toString('hex').toUpperCase()],
      ...[0, 1, 2, 3, 4, 5].map((prefix): [string, string] => [`base64 after ${prefix} bytes`, blob(prefix).toString('base64')]),
      ['base64url after 4 bytes', blob(4).toString('base64url')],
    ];
    for (const place of places) expect(sweep([secret], [place]).hits, place[0]).toHaveLength(1);
    expect(sweep([secret], [['nothing', Buffer.from('an unrelated text of some length').toString('base64')]]).hits).toEqual([]);
  });
});
