import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { describe, expect, inject, it } from 'vitest';
import { ConfigError, loadConfig } from '../../core/config';
import { checkWorkflowBundle } from '../../worker/bundle';

function problems(env: Record<string, string>, parts?: ('api' | 'worker')[]): string[] {
  try {
    loadConfig(env, parts);
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  return [];
}

describe('configuration', () => {
  it('has the documented defaults and embeds every server when none is named', () => {
    const c = loadConfig({});
    expect(c.PORT).toBe(8080);
    expect(c.dataDir).toBe(path.resolve('.data'));
    expect(c.TEMPORAL_NAMESPACE).toBe('default');
    expect(c.TASK_QUEUE).toBe('mailgent');
    expect(c.MAIL_FROM).toBe('mailgent@localhost');
    expect(c.embedded).toEqual({ postgres: true, temporal: true, smtp: true });
    expect(c.READ_THREAD).toBe(true);
  });

  it('READ_THREAD takes on/off (or true/false, 1/0) and nothing else', () => {
    expect(loadConfig({ READ_THREAD: 'off' }).READ_THREAD).toBe(false);
    expect(loadConfig({ READ_THREAD: '0' }).READ_THREAD).toBe(false);
    expect(loadConfig({ READ_THREAD: 'on' }).READ_THREAD).toBe(true);
    expect(problems({ READ_THREAD: 'yes please' })).toEqual(['READ_THREAD: must be on or off (got "yes please")']);
  });

  it('WORKFLOW_BUNDLE is checked by the worker only: there, and built from this checkout\'s workflows; MAIL_RETENTION_DAYS is whole days (30 by default)', () => {
    expect(loadConfig({}).WORKFLOW_BUNDLE).toBeUndefined();
    // The API beside a worker shares its settings, not its files: the configuration does not look.
    expect(loadConfig({ WORKFLOW_BUNDLE: 'no/such/bundle.js' }).WORKFLOW_BUNDLE).toBe('no/such/bundle.js');
    const refusal = (file: string) => {
      try {
        checkWorkflowBundle(file);
      } catch (err) {
        return err instanceof ConfigError ? err.problems : [String(err)];
      }
      return [];
    };
    expect(refusal(inject('workflowBundlePath'))).toEqual([]);
    expect(refusal('no/such/bundle.js')).toEqual(['WORKFLOW_BUNDLE: cannot read no/such/bundle.js (ENOENT); build it with npm run bundle -- <path>']);
    // One built from other workflows (before an upgrade), or not a bundle at all.
    const stale = path.join(mkdtempSync(path.join(tmpdir(), 'mailgent-bundle-test-')), 'workflows.js');
    writeFileSync(stale, readFileSync(inject('workflowBundlePath'), 'utf8').replace(/^(\/\/ mailgent workflows )[0-9a-f]{8}/, '$100000000'));
    expect(refusal(stale)).toEqual([`WORKFLOW_BUNDLE: ${stale} was not built from this checkout's workflows; build it again with npm run bundle -- <path>`]);
    expect(refusal('package.json')).toHaveLength(1);
    expect(loadConfig({}).MAIL_RETENTION_DAYS).toBe(30);
    expect(loadConfig({ MAIL_RETENTION_DAYS: '0' }).MAIL_RETENTION_DAYS).toBe(0);
    expect(problems({ MAIL_RETENTION_DAYS: '-1' })).toHaveLength(1);
  });

  it('uses external servers when their addresses are set', () => {
    const c = loadConfig({ DATABASE_URL: 'postgres://u:p@db:5432/m', TEMPORAL_ADDRESS: 'temporal:7233', SMTP_URL: 'smtp://mail:1025' });
    expect(c.embedded).toEqual({ postgres: false, temporal: false, smtp: false });
  });

  it('names each bad variable and what is wrong with it', () => {
    expect(problems({ PORT: 'abc' })).toEqual(['PORT: must be a whole number, in digits (got "abc")']);
    // Before, Number() took each of these: 0x50 as 80, 1e3 as 1000, ' 80 ' as 80.
    for (const odd of ['0x50', '1e3', ' 80 ', '80.0']) expect(problems({ PORT: odd }), odd).toEqual([`PORT: must be a whole number, in digits (got ${JSON.stringify(odd)})`]);
    expect(problems({ DATABASE_POOL_SIZE: 'abc' })).toEqual(['DATABASE_POOL_SIZE: must be a whole number, in digits (got "abc")']);
    expect(problems({ SHUTDOWN_GRACE_SECONDS: '5000' })).toEqual(['SHUTDOWN_GRACE_SECONDS: must be between 0 and 3600 (got "5000")']);
    expect(loadConfig({ DATABASE_POOL_SIZE: '25', PORT: '9090' })).toMatchObject({ DATABASE_POOL_SIZE: 25, PORT: 9090 });
    for (const bad of ['temporal:99999', 'temporal:0', 'nohostport']) {
      expect(problems({ TEMPORAL_ADDRESS: bad }), bad).toEqual([`TEMPORAL_ADDRESS: must be host:port with a port between 1 and 65535, e.g. localhost:7233 (got ${JSON.stringify(bad)})`]);
    }
    expect(problems({ HOST: 'not a host!!' })).toEqual(['HOST: must be a host name or an IP address (got "not a host!!")']);
    for (const good of ['0.0.0.0', '::', 'api.internal', 'localhost']) expect(loadConfig({ HOST: good }).HOST).toBe(good);
    // A list names the entry that is wrong, once.
    expect(problems({ OUTBOUND_ALLOW: '10.0.0.0/8, not a host!, 192.168.1.5' })).toHaveLength(1);
    expect(problems({ OUTBOUND_ALLOW: '10.0.0.0/8, not a host!, 192.168.1.5' })[0]).toMatch(/^OUTBOUND_ALLOW: .* \(got "not a host!"\)$/);
    expect(problems({ CODEC_CORS_ORIGINS: 'http://ok:8233, foo' })).toEqual([
      'CODEC_CORS_ORIGINS: must be origins such as http://localhost:8233, comma-separated (got "foo")',
    ]);
    expect(problems({ PORT: '70000' })[0]).toMatch(/^PORT: must be between 1 and 65535/);
    expect(problems({ TEMPORAL_ADDRESS: 'nohostport' })[0]).toMatch(/^TEMPORAL_ADDRESS: must be host:port/);
    expect(problems({ MAIL_FROM: 'not-an-email' })[0]).toMatch(/^MAIL_FROM: must be an email address/);
    expect(loadConfig({ MAIL_FROM: 'ops@localhost' }).MAIL_FROM).toBe('ops@localhost');
    expect(problems({ SECURITY_NOTIFY: 'a@example.com, nope' })[0]).toMatch(/^SECURITY_NOTIFY/);
    expect(problems({ PORT: 'x', LOG_LEVEL: 'loud' })).toHaveLength(2);
  });

  it("names a bad value and what the part to run needs unset, at once (before, the part's needs only at the next start)", () => {
    const named = (list: string[]) => list.map((p) => p.split(':')[0]);
    expect(named(problems({ ADMIN_TOKEN: 'short' }, ['api']))).toEqual(['ADMIN_TOKEN', 'DATABASE_URL', 'VAULT_MASTER_KEY', 'TEMPORAL_ADDRESS']);
    expect(problems({ ADMIN_TOKEN: 'short' }, ['api'])[0]).toMatch(/^ADMIN_TOKEN: must be at least 32 characters/);
    expect(named(problems({ PORT: 'x' }, ['worker']))).toEqual(['PORT', 'DATABASE_URL', 'VAULT_MASTER_KEY', 'TEMPORAL_ADDRESS', 'SMTP_URL']);
    // serve (both parts) needs none of them; a command that runs no part (migrate, rekey) is not asked.
    expect(named(problems({ PORT: 'x' }, ['api', 'worker']))).toEqual(['PORT']);
    expect(named(problems({ ADMIN_TOKEN: 'short' }))).toEqual(['ADMIN_TOKEN']);
    expect(named(problems({ DATABASE_URL: 'postgres://u:p@127.0.0.1:1/db' }, ['api', 'worker']))).toEqual(['VAULT_MASTER_KEY']);
  });

  it('checks cron schedules field by field, so a bad one stops the start with the variable named', () => {
    // As the Temporal server's schedule parser judges them (checked against the dev server).
    expect(problems({ SWEEP_CRON: '99 * * * *' })[0]).toMatch(/^SWEEP_CRON: the minute field '99' must be within 0–59 \(minute hour day-of-month month day-of-week/);
    expect(problems({ ORPHAN_REPORT_CRON: '0 6 * * 8' })[0]).toMatch(/^ORPHAN_REPORT_CRON: the day of week field '8' must be within 0–7/);
    expect(problems({ SWEEP_CRON: '0 6 1 * ?' })[0]).toMatch(/the day of week field '\?' is not understood/);
    expect(problems({ SWEEP_CRON: '0 25 * * *' })[0]).toMatch(/the hour field '25' must be within 0–23/);
    expect(problems({ SWEEP_CRON: '*/0 * * * *' })[0]).toMatch(/has a step of 0/);
    expect(problems({ SWEEP_CRON: '0 0 0 * *' })[0]).toMatch(/the day of month field '0' must be within 1–31/);
    expect(problems({ SWEEP_CRON: '0 * * * * *' })[0]).toMatch(/must be a five-field cron expression/);
    for (const ok of ['0 * * * *', '*/15 2-4 * * MON-FRI', '0 6 1,15 JAN,jul *', '5 3 * * sun', '0 6 * * 7', '0 0 31 12 6']) {
      expect(problems({ SWEEP_CRON: ok }), ok).toEqual([]);
    }
  });

  it('never repeats the value of a secret variable', () => {
    const bad = 'c2hvcnQ=';
    const [message] = problems({ VAULT_MASTER_KEY: bad });
    expect(message).toMatch(/^VAULT_MASTER_KEY: must be base64 of exactly 32 bytes/);
    expect(message).not.toContain(bad);
    const [tokenMessage] = problems({ ADMIN_TOKEN: 'short-token' });
    expect(tokenMessage).toMatch(/^ADMIN_TOKEN: must be at least 32 characters/);
    expect(tokenMessage).not.toContain('short-token');
    // A token no request could present (what Authorization: Bearer <token> can carry): refused at
    // start, not a service whose every admin call is a 401. Never repeated either.
    for (const [token, message] of [
      [`${'a'.repeat(20)} ${'b'.repeat(20)}`, /^ADMIN_TOKEN: must be printable ASCII without spaces/],
      [`${'c'.repeat(40)}\r`, /^ADMIN_TOKEN: must be printable ASCII without spaces/],
      ['é'.repeat(32), /^ADMIN_TOKEN: must be printable ASCII without spaces/],
      ['d'.repeat(513), /^ADMIN_TOKEN: must be at most 512 characters/],
    ] as const) {
      const [refused] = problems({ ADMIN_TOKEN: token });
      expect(refused, JSON.stringify(token.slice(0, 8))).toMatch(message);
      expect(refused).not.toContain(token.trim().slice(0, 20));
    }
    expect(problems({ ADMIN_TOKEN: 'e'.repeat(512) })).toEqual([]);
    const [urlMessage] = problems({ DATABASE_URL: 'mysql://root:hunter2@db/x' });
    expect(urlMessage).not.toContain('hunter2');
  });

  it('accepts a 32-byte base64 master key', () => {
    expect(loadConfig({ VAULT_MASTER_KEY: randomBytes(32).toString('base64') }).VAULT_MASTER_KEY).toBeDefined();
  });
});
