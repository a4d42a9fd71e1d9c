import { existsSync, linkSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { newToken } from '../vault/identities';
import { generateMasterKey, masterKeyId, writeKeyringFile } from '../vault/keyring';

/** Secrets the embedded mode generates once into DATA_DIR (mode 0600) and reuses on every start. */

export function ensureDataDir(dataDir: string): void {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
}

export function keyringPath(dataDir: string): string {
  return path.join(dataDir, 'master-keys.json');
}

export function ensureKeyringFile(dataDir: string): string {
  const file = keyringPath(dataDir);
  if (!existsSync(file)) {
    // Made aside, then linked into place, which fails if the file exists: an API and a worker
    // starting together on a fresh DATA_DIR agree on one key (a rename would let the last one win,
    // and whatever the first wrapped in between would be lost with its key).
    const key = generateMasterKey();
    const made = `${file}.${process.pid}.new`;
    writeKeyringFile(made, [{ id: masterKeyId(key), key }], masterKeyId(key));
    try {
      linkSync(made, file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    } finally {
      rmSync(made, { force: true });
    }
  }
  return file;
}

export function adminTokenPath(dataDir: string): string {
  return path.join(dataDir, 'admin-token');
}

export function ensureAdminToken(dataDir: string): { token: string; created: boolean } {
  const file = adminTokenPath(dataDir);
  if (existsSync(file)) return { token: readFileSync(file, 'utf8').trim(), created: false };
  const token = newToken();
  // Written aside and linked into place whole, as the keyring file is: another process starting on
  // this DATA_DIR at the same moment gets the same token, never a half-written file.
  const made = `${file}.${process.pid}.new`;
  writeFileSync(made, `${token}\n`, { mode: 0o600 });
  try {
    linkSync(made, file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return { token: readFileSync(file, 'utf8').trim(), created: false };
    throw err;
  } finally {
    rmSync(made, { force: true });
  }
  return { token, created: true };
}
