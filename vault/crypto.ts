import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { IntegrityError } from '../core/errors';

/** AES-256-GCM with a fresh random 96-bit nonce. Sealed layout: nonce (12) ‖ ciphertext ‖ tag (16). */
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
export const KEY_BYTES = 32;

export function seal(key: Buffer, plaintext: Buffer, aad: string): Buffer {
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(Buffer.from(aad, 'utf8'));
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([nonce, body, cipher.getAuthTag()]);
}

/** Opens a sealed box or throws IntegrityError naming `what`; never returns unauthenticated bytes. */
export function open(key: Buffer, sealed: Buffer, aad: string, what: string): Buffer {
  if (sealed.length < NONCE_BYTES + TAG_BYTES) {
    throw new IntegrityError(`${what} is truncated`);
  }
  const nonce = sealed.subarray(0, NONCE_BYTES);
  const tag = sealed.subarray(sealed.length - TAG_BYTES);
  const body = sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES);
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, nonce);
    decipher.setAAD(Buffer.from(aad, 'utf8'));
    decipher.setAuthTag(tag);
    const head = decipher.update(body);
    // final() throws on a bad tag: the unauthenticated bytes in `head` are wiped, never returned.
    let tail: Buffer;
    try {
      tail = decipher.final();
    } catch (err) {
      head.fill(0);
      throw err;
    }
    const out = Buffer.concat([head, tail]);
    head.fill(0);
    tail.fill(0);
    return out;
  } catch {
    throw new IntegrityError(`${what} failed authentication: it was altered or does not belong to this record`);
  }
}

/** AAD of a secret version: binds the ciphertext to its identity, credential and version. */
export function versionAad(identityId: string, credentialId: string, version: number): string {
  return `mailgent/secret/v1:${identityId}:${credentialId}:${version}`;
}

/** AAD of a wrapped data key: binds it to its identity and its own id. */
export function dataKeyAad(identityId: string, dataKeyId: string): string {
  return `mailgent/data-key/v1:${identityId}:${dataKeyId}`;
}

/** AAD of a wrapped service key (e.g. the fingerprint key). */
export function serviceKeyAad(name: string): string {
  return `mailgent/service-key/v1:${name}`;
}
