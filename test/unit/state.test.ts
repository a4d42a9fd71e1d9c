import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';

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
