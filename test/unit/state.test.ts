import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError } from '../../core/config';
import { adminTokenPath, ensureAdminToken } from '../../embedded/state';

const run = promisify(execFile);
const ROOT = path.resolve(import.meta.dirname, '../..');

/** What each process makes of DATA_DIR/<i> for 40 fresh directories: the master key id it ends up with, and the admin token. */
const SCRIPT = `
  import path from 'node:path';
  import { ensureAdminToken, ensureKeyringFile } from './embedded/state.ts';
  import { Keyring } from './vault/keyring.ts';
  const base = process.argv[1];
  const seen = [];
  for (let i = 0; i < 40; i++) {
    const dir = path.join(base, String(i));
    seen.push([Keyring.fromSetting(ensureKeyringFile(dir)).current.id, ensureAdminToken(dir).token]);
  }
  console.log(JSON.stringify(seen));
`;

describe('DATA_DIR state made by two processes at once (an API and a worker starting together)', () => {
  const base = mkdtempSync(path.join(os.tmpdir(), 'mailgent-state-'));
  afterAll(() => rmSync(base, { recursive: true, force: true }));

  it('both end up with the same master key and the same admin token', async () => {
    for (let i = 0; i < 40; i++) mkdirSync(path.join(base, String(i)));
    const [a, b] = await Promise.all(
      [0, 1].map(() => run(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', SCRIPT, base], { cwd: ROOT }).then((r) => JSON.parse(r.stdout))),
    );
    expect(a).toHaveLength(40);
    expect(b).toEqual(a);
  });
});

describe('the admin token file', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-token-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('is refused when edited into a token no request could present, or a weak one, never quoting it', () => {
    for (const kept of ['', 'short', `${'a'.repeat(20)} ${'b'.repeat(20)}`, 'é'.repeat(40)]) {
      writeFileSync(adminTokenPath(dir), `${kept}\n`, { mode: 0o600 });
      let refused: unknown;
      try {
        ensureAdminToken(dir);
      } catch (err) {
        refused = err;
      }
      expect(refused, JSON.stringify(kept.slice(0, 6))).toBeInstanceOf(ConfigError);
      expect((refused as Error).message).toContain('delete the file to have a new one made');
      if (kept) expect((refused as Error).message).not.toContain(kept.slice(0, 20));
    }
    rmSync(adminTokenPath(dir));
    const made = ensureAdminToken(dir);
    expect(made.created).toBe(true);
    expect(ensureAdminToken(dir)).toEqual({ token: made.token, created: false });
  });
});
