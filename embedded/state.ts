import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { ADMIN_TOKEN_CHARS, ConfigError } from '../core/config';
import { newToken } from '../vault/identities';
import { generateMasterKey, masterKeyId, writeKeyringFile } from '../vault/keyring';
import { placeOnce } from '../core/place-once';

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
    // Placed once: an API and a worker starting together on a fresh DATA_DIR agree on one key (a
    // rename would let the last one win, and whatever the first wrapped meanwhile would be lost).
    const key = generateMasterKey();
    placeOnce(file, (made) => writeKeyringFile(made, [{ id: masterKeyId(key), key }], masterKeyId(key)), { durable: true });
  }
  return file;
}

export function adminTokenPath(dataDir: string): string {
  return path.join(dataDir, 'admin-token');
}

export function ensureAdminToken(dataDir: string): { token: string; created: boolean } {
  const file = adminTokenPath(dataDir);
  if (existsSync(file)) return { token: readAdminToken(file), created: false };
  const token = newToken();
  // Placed whole, as the keyring file is: another process starting on this DATA_DIR at the same
  // moment gets the same token, never a half-written file.
  if (placeOnce(file, (made) => writeFileSync(made, `${token}\n`, { mode: 0o600 }), { durable: true })) return { token, created: true };
  return { token: readAdminToken(file), created: false };
}

/**
 * The token kept in the file, held to ADMIN_TOKEN's rules: an edited or emptied file started a
 * service with a weak admin token, or one no request could present. Never quoted.
 */
function readAdminToken(file: string): string {
  const token = readFileSync(file, 'utf8').trim();
  if (token.length < 32 || token.length > 512 || !ADMIN_TOKEN_CHARS.test(token)) {
    throw new ConfigError([`${file}: the admin token in it must be 32 to 512 printable ASCII characters without spaces; delete the file to have a new one made`]);
  }
  return token;
}
