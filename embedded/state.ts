import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
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
    const key = generateMasterKey();
    writeKeyringFile(file, [{ id: masterKeyId(key), key }], masterKeyId(key));
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
  writeFileSync(file, `${token}\n`, { mode: 0o600 });
  return { token, created: true };
}
