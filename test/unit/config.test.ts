import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../core/config';

function problems(env: Record<string, string>): string[] {
  try {
    loadConfig(env);
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
  });

  it('uses external servers when their addresses are set', () => {
    const c = loadConfig({ DATABASE_URL: 'postgres://u:p@db:5432/m', TEMPORAL_ADDRESS: 'temporal:7233', SMTP_URL: 'smtp://mail:1025' });
    expect(c.embedded).toEqual({ postgres: false, temporal: false, smtp: false });
  });

  it('names each bad variable and what is wrong with it', () => {
    expect(problems({ PORT: 'abc' })).toEqual(['PORT: must be a number (got "abc")']);
    expect(problems({ PORT: '70000' })[0]).toMatch(/^PORT: must be between 1 and 65535/);
    expect(problems({ TEMPORAL_ADDRESS: 'nohostport' })[0]).toMatch(/^TEMPORAL_ADDRESS: must be host:port/);
    expect(problems({ MAIL_FROM: 'not-an-email' })[0]).toMatch(/^MAIL_FROM: must be an email address/);
    expect(loadConfig({ MAIL_FROM: 'ops@localhost' }).MAIL_FROM).toBe('ops@localhost');
    expect(problems({ SECURITY_NOTIFY: 'a@example.com, nope' })[0]).toMatch(/^SECURITY_NOTIFY/);
    expect(problems({ PORT: 'x', LOG_LEVEL: 'loud' })).toHaveLength(2);
  });

  it('never repeats the value of a secret variable', () => {
    const bad = 'c2hvcnQ=';
    const [message] = problems({ VAULT_MASTER_KEY: bad });
    expect(message).toMatch(/^VAULT_MASTER_KEY: must be base64 of exactly 32 bytes/);
    expect(message).not.toContain(bad);
    const [tokenMessage] = problems({ ADMIN_TOKEN: 'short-token' });
    expect(tokenMessage).toMatch(/^ADMIN_TOKEN: must be at least 32 characters/);
    expect(tokenMessage).not.toContain('short-token');
    const [urlMessage] = problems({ DATABASE_URL: 'mysql://root:hunter2@db/x' });
    expect(urlMessage).not.toContain('hunter2');
  });

  it('accepts a 32-byte base64 master key', () => {
    expect(loadConfig({ VAULT_MASTER_KEY: randomBytes(32).toString('base64') }).VAULT_MASTER_KEY).toBeDefined();
  });
});
