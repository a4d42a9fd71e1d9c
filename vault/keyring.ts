import { createHash, randomBytes } from 'node:crypto';
import { closeSync, fchmodSync, fchownSync, fsyncSync, openSync, readdirSync, readFileSync, realpathSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import path from 'node:path';
import { syncPath } from '../core/fsync';
import { isAlive } from '../embedded/child';
import { KEY_BYTES } from './crypto';

/**
 * Master keys wrap the per-identity data keys; they never touch the database. A keyring holds
 * one current key (used to wrap) and any older keys still needed to unwrap until `rekey` runs.
 * Key ids are derived from the key itself, so a bare base64 key always has the same id.
 */
export interface MasterKey {
  id: string;
  key: Buffer;
}

interface KeyringFile {
  version: 1;
  current: string;
  keys: { id: string; key: string; createdAt: string }[];
}

// Checked by hand, not with zod: the API's read thread loads this module, and zod alone is ~10 MB there.
function isKeyringFile(doc: unknown): doc is KeyringFile {
  const d = doc as Partial<KeyringFile> | null;
  const isString = (v: unknown) => typeof v === 'string';
  return (
    typeof d === 'object' && d !== null && d.version === 1 && isString(d.current) && Array.isArray(d.keys) && d.keys.length > 0 &&
    d.keys.every((k) => typeof k === 'object' && k !== null && isString(k.id) && isString(k.key) && isString(k.createdAt))
  );
}

export function isInlineMasterKey(value: string): boolean {
  return /^[A-Za-z0-9+/]{43}=$/.test(value) && Buffer.from(value, 'base64').length === 32;
}

/**
 * An inline VAULT_MASTER_KEY: one base64 key, or several separated by commas, the current one (that
 * wraps new data keys) first and the others still able to unwrap (how an inline key is rotated).
 */
export function inlineMasterKeys(value: string): Buffer[] | undefined {
  const parts = value.split(',').map((p) => p.trim());
  if (!parts.every(isInlineMasterKey) || new Set(parts).size !== parts.length) return undefined;
  return parts.map((p) => Buffer.from(p, 'base64'));
}

export function masterKeyId(key: Buffer): string {
  return `mk_${createHash('sha256').update('mailgent/master-key-id\0').update(key).digest('hex').slice(0, 16)}`;
}

export function generateMasterKey(): Buffer {
  return randomBytes(KEY_BYTES);
}

/** What tells one version of the keyring file from the next, for an unwrap: its inode, mtime, ctime and size. */
function stamp(file: string): string {
  const { ino, mtimeMs, ctimeMs, size } = statSync(file);
  return `${ino}:${mtimeMs}:${ctimeMs}:${size}`;
}

export class Keyring {
  private keys = new Map<string, Buffer>();
  private currentId: string;
  /** The file's identity when it was read (inode and mtime: a rename always brings a new inode, even within the file system clock's tick). */
  private loaded = '';

  /** Private (and so never serialised or logged): an inline setting holds the keys themselves. */
  #setting?: string;

  /** The VAULT_MASTER_KEY setting this keyring was read from, if any (the API's read thread reads it again). */
  get setting(): string | undefined {
    return this.#setting;
  }

  /**
   * `file` is set when the keyring lives in a file that `rekey` may rewrite while the service runs:
   * a changed file is re-read before wrapping, and an unknown key id re-reads it once.
   */
  private constructor(keys: MasterKey[], currentId: string, readonly file?: string, loaded = '') {
    for (const k of keys) this.keys.set(k.id, k.key);
    this.currentId = currentId;
    this.loaded = loaded;
  }

  static fromKeys(keys: MasterKey[], currentId = keys[0]?.id): Keyring {
    if (!currentId || !keys.some((k) => k.id === currentId)) throw new Error('keyring has no current key');
    return new Keyring(keys, currentId);
  }

  /** VAULT_MASTER_KEY: base64 of 32 bytes (several, comma-separated, the current first), or the path of a keyring file (JSON, or one base64 key). */
  static fromSetting(setting: string): Keyring {
    const inline = inlineMasterKeys(setting);
    let keyring: Keyring;
    if (inline) keyring = Keyring.fromKeys(inline.map((key) => ({ id: masterKeyId(key), key })));
    else {
      // Stat first, then read (as reload does): a rekey's rename between the two then leaves an older
      // mtime with these contents, and the next `current` reads the file again. The other way round,
      // the new file's mtime went with the old contents, and the new current key was never seen.
      const loaded = stamp(setting);
      const { keys, current } = readKeyringFile(setting);
      keyring = new Keyring(keys, current, setting, loaded);
    }
    keyring.#setting = setting;
    return keyring;
  }

  /**
   * Read again from the file at every call (a wrap, which is rare: a new identity's or service's
   * key, a roll-over), not when its stamp changed: a rename can reuse the inode of a file replaced
   * a moment before, and on a file system with a coarse clock (1–2 s) the stamp then stays the same
   * (a rekey's last write took the inode of its first): a service that read the first went on
   * wrapping with the key the last one dropped.
   */
  get current(): MasterKey {
    if (this.file) this.reload();
    return { id: this.currentId, key: this.keys.get(this.currentId)! };
  }

  get ids(): string[] {
    return [...this.keys.keys()];
  }

  /**
   * The key with this id, re-reading the keyring file if it is not known (a rekey may have added it)
   * or if the file changed: a key a rekey dropped is forgotten at the next unwrap, not kept until a
   * restart by the processes that seldom wrap (workers, the API's read thread: they only unwrap).
   */
  find(id: string): Buffer | undefined {
    if (this.file && !this.keys.has(id)) this.reload();
    else if (this.file) {
      // A key held is not refused because the file cannot be read now (moved, its mode changed):
      // it is forgotten only when a file that can be read drops it.
      try {
        if (stamp(this.file) !== this.loaded) this.reload();
      } catch {
        // kept as it was
      }
    }
    return this.keys.get(id);
  }

  /**
   * The file as it is now: keys added by a rekey are learnt, and keys it dropped are forgotten (a
   * retired key, perhaps a compromised one, stayed in every running process's memory until it
   * restarted, and still unwrapped what it had wrapped). A forgotten key is zeroed a little later,
   * so an unwrap that already holds it finishes first; rekey drops a key only once nothing uses it.
   */
  private reload(): void {
    const file = this.file!;
    // Recorded once the read has succeeded: recorded before it, a read that failed once (EACCES,
    // EMFILE, a network file system's hiccup) left the new file's stamp with the old keys, and
    // `current` went on wrapping with the retired key for good, which a rekey would then drop.
    const loaded = stamp(file);
    const { keys, current } = readKeyringFile(file);
    const kept = new Set(keys.map((k) => k.id));
    for (const [id, key] of this.keys) {
      if (kept.has(id)) continue;
      this.keys.delete(id);
      setTimeout(() => key.fill(0), FORGOTTEN_KEY_ZERO_DELAY_MS).unref();
    }
    for (const k of keys) {
      if (!this.keys.get(k.id)?.equals(k.key)) this.keys.set(k.id, k.key);
      else k.key.fill(0); // a second copy of a key held already
    }
    this.currentId = current;
    this.loaded = loaded;
  }
}

/** How long a master key dropped from the keyring file stays in memory (unreachable) before it is zeroed. */
const FORGOTTEN_KEY_ZERO_DELAY_MS = 5_000;

/** A keyring file that cannot be used; `reason` says why without its path, contents or key ids (for a configuration error). */
export class KeyringFileError extends Error {
  constructor(
    message: string,
    readonly reason: string,
  ) {
    super(message);
  }
}

export function readKeyringFile(file: string): { keys: MasterKey[]; current: string } {
  const text = readFileSync(file, 'utf8').trim();
  if (isInlineMasterKey(text)) {
    const key = Buffer.from(text, 'base64');
    return { keys: [{ id: masterKeyId(key), key }], current: masterKeyId(key) };
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (!isKeyringFile(parsed)) throw new KeyringFileError(`keyring file ${file} is neither one base64 key nor a keyring JSON document`, 'is neither one base64 key nor a keyring JSON document');
  const keys = parsed.keys.map((k) => {
    const key = Buffer.from(k.key, 'base64');
    if (key.length !== KEY_BYTES || masterKeyId(key) !== k.id) {
      throw new KeyringFileError(`keyring file ${file}: key ${k.id} is not a 32-byte key matching its id`, 'holds a key that is not a 32-byte key matching its id');
    }
    return { id: k.id, key };
  });
  if (!keys.some((k) => k.id === parsed.current)) {
    throw new KeyringFileError(`keyring file ${file}: current key ${parsed.current} is not in the file`, 'names a current key it does not hold');
  }
  return { keys, current: parsed.current };
}

/**
 * Writes a keyring file atomically with mode 0600, and durably: the file and then its directory are
 * synced before this returns, because data keys wrapped under a key in it are committed next, and a
 * crash that kept those commits but lost the file would lose every secret they seal.
 *
 * A file already there is replaced where it really is (through a symbolic link, the link stays and
 * its target is rewritten), keeping its owner, group and mode (but for others' bits, dropped). Before, the link was replaced by a
 * file of its own (whoever read the target never saw the new key, and the dropped key stayed there),
 * and a keyring written by `sudo mailgent rekey` became root's, 0600: the service, running as its own
 * user, could no longer read it. Where the owner cannot be kept (rekey run as another user, not
 * root), nothing is written.
 */
export function writeKeyringFile(file: string, keys: MasterKey[], current: string, now = new Date()): void {
  let target = file;
  let was: { mode: number; uid: number; gid: number } | undefined;
  try {
    target = realpathSync(file);
    const st = statSync(target);
    was = { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const euid = process.geteuid?.();
  if (was && euid !== undefined && euid !== 0) {
    if (euid !== was.uid) {
      throw new KeyringFileError(
        `keyring file ${file} is owned by uid ${was.uid}; run this as that user (or root), so the file keeps its owner`,
        'is owned by another user than the one writing it',
      );
    }
    if (was.gid !== process.getegid?.() && !process.getgroups?.().includes(was.gid)) {
      throw new KeyringFileError(
        `keyring file ${file} belongs to group ${was.gid}, which this user is not in; run this as root, or as a member of that group, so the file keeps its group`,
        'belongs to a group the user writing it is not in',
      );
    }
  }
  file = target;
  const doc: KeyringFile = {
    version: 1,
    current,
    keys: keys.map((k) => ({ id: k.id, key: k.key.toString('base64'), createdAt: now.toISOString() })),
  };
  const tmp = `${file}.${process.pid}.tmp`;
  // A writer killed (SIGKILL, out of memory, power lost) between its fsync and its rename left its
  // temporary file: a whole copy of the keyring, with a key a rekey meant to drop, picked up by any
  // backup of the directory. Another process's is removed once its pid is not running.
  removeDeadWriters(file);
  // Made anew ('wx', 0600): one left by a process of the same pid that died before its rename kept
  // its own mode under 'w' (0644, say), and the keyring renamed into place had it.
  rmSync(tmp, { force: true });
  const fd = openSync(tmp, 'wx', 0o600);
  try {
    try {
      if (was) {
        if (euid === 0) fchownSync(fd, was.uid, was.gid);
        else if (process.getegid?.() !== was.gid) fchownSync(fd, -1, was.gid);
        // Its owner's and group's bits kept, never others' (nor set-id bits): a keyring left
        // world-readable is not kept so.
        fchmodSync(fd, was.mode & 0o770);
      }
      writeSync(fd, `${JSON.stringify(doc, null, 2)}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
  } catch (err) {
    // Not left beside it: the temporary file holds every master key.
    rmSync(tmp, { force: true });
    throw err;
  }
  syncPath(path.dirname(file));
}

/** Temporary files of `file` (`<file>.<pid>.tmp`) whose writer is not running: removed. */
function removeDeadWriters(file: string): void {
  const dir = path.dirname(file);
  const prefix = `${path.basename(file)}.`;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(prefix) || !name.endsWith('.tmp')) continue;
    const pid = Number(name.slice(prefix.length, -'.tmp'.length));
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid || isAlive(pid)) continue;
    rmSync(path.join(dir, name), { force: true });
  }
}
