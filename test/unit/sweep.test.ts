import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { recordPlace, registerSecrets, registeredSecrets, runFiles, sweep } from '../support/sweep';

/** The run-wide leak sweep can fail: planted values are found in every form and every kind of place. */
describe('leak sweep', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sweep-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const secret = 'sk_live_planted_0123456789';

  it('finds a value raw, base64 (padded, unpadded, URL-safe) and hex', () => {
    const b64 = Buffer.from(secret).toString('base64');
    for (const form of [secret, b64, b64.replace(/=+$/, ''), Buffer.from(secret).toString('base64url'), Buffer.from(secret).toString('hex')]) {
      expect(sweep([secret], [['somewhere', `before ${form} after`]]).hits).toHaveLength(1);
    }
    expect(sweep([secret], [['clean', 'nothing to see here']]).hits).toEqual([]);
  });

  it('copes with thousands of secrets and very long ones', () => {
    const many = Array.from({ length: 3000 }, (_, i) => `value-${i}-${'x'.repeat(i % 40)}`);
    const huge = 'y'.repeat(100_000);
    expect(sweep([...many, huge], [['clean', 'nothing']]).hits).toEqual([]);
    const { hits } = sweep([...many, huge], [['a', `..${many[2999]}..`], ['b', Buffer.from(huge).toString('hex')]]);
    expect(hits).toHaveLength(2);
  });

  it('names the place and never repeats the value', () => {
    const { hits } = sweep([secret, 'other-secret-value'], [['the audit rows', `{"detail":"${secret}"}`], ['a log', 'fine']]);
    expect(hits).toHaveLength(1);
    expect(hits[0]).toContain('the audit rows');
    expect(hits[0]).not.toContain(secret);
  });

  it("reads what harnesses registered and left, every log and email (the servers' own logs too), and no server data file", () => {
    registerSecrets(dir, 'aaaa', [secret]);
    recordPlace(dir, 'aaaa', 'http-errors', 'POST /v1/x -> 400 {"detail":"fine"}');
    mkdirSync(path.join(dir, 'harness-aaaa'), { recursive: true });
    writeFileSync(path.join(dir, 'harness-aaaa', 'worker.log'), `a child process logged ${secret}`);
    mkdirSync(path.join(dir, 'mail'), { recursive: true });
    writeFileSync(path.join(dir, 'mail', '1.eml'), 'Subject: ok\r\n\r\nno value here');
    mkdirSync(path.join(dir, 'pg', 'base'), { recursive: true });
    // PostgreSQL's log (a failed statement is logged): read; before, the whole directory was skipped.
    writeFileSync(path.join(dir, 'pg', 'server.log'), `ERROR: ... ${secret}`);
    writeFileSync(path.join(dir, 'pg', 'base', '16384'), secret);
    writeFileSync(path.join(dir, 'harness-aaaa', 'value.txt'), secret);

    expect(registeredSecrets(dir)).toEqual([secret]);
    const files = [...runFiles(dir)].map(([where]) => where).sort();
    expect(files).toEqual([path.join('harness-aaaa', 'worker.log'), path.join('leak-sweep', 'aaaa.http-errors.txt'), path.join('mail', '1.eml'), path.join('pg', 'server.log')]);
    const { hits } = sweep(registeredSecrets(dir), runFiles(dir));
    expect(hits).toEqual([expect.stringContaining(path.join('harness-aaaa', 'worker.log')), expect.stringContaining(path.join('pg', 'server.log'))]);
  });
});
