import { randomBytes } from 'node:crypto';
import { readFileSync, readlinkSync } from 'node:fs';
import { type FileHandle, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { UnprocessableError } from '../../core/errors';
import { breakStale, createLock, type LockState, readLock } from '../../core/lock-file';
import { startTimeOf, stillRunning } from '../../embedded/child';

/** A lock its holder has not touched for this long is stale, whoever holds it (a holder touches it every LOCK_TOUCH_MS). */
export const STALE_LOCK_MS = 30_000;
const LOCK_TOUCH_MS = 2_000;
/** How long a write waits for another process's lock before it fails (the step is retried). */
const LOCK_WAIT_MS = 60_000;

/**
 * Which processes a pid names: this host's boot and pid namespace. Workers in other containers
 * sharing the env files volume have pids of their own namespace, so their pid says nothing here:
 * their locks go stale by age only. A part that cannot be read (no /proc) is `-`, and then every lock goes stale by age only.
 */
const PID_SPACE = [os.hostname(), readOr(() => readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()), readOr(() => readlinkSync('/proc/self/ns/pid').replace(/\D/g, ''))]
  .map((part) => part.replace(/\s/g, '') || '-')
  .join('/');
/** Without the boot or the pid namespace (no /proc), a pid might be another container's on this host: such locks go stale by age only. */
const PID_SPACE_KNOWN = !PID_SPACE.split('/').includes('-');

/**
 * Who holds a lock, as its file says: the pid, the process's start time (to tell it from a later
 * process given the same pid; `-` where there is no /proc) and PID_SPACE. Never anything of the
 * file's content: a lock is read by whoever can list the directory.
 */
export function lockOwner(pid = process.pid): string {
  return `${pid} ${startTimeOf(pid) ?? '-'} ${PID_SPACE}`;
}

/**
 * One writer at a time for `file` across processes (workers of a rolling deploy's overlap, or
 * scaled workers sharing the env files volume), by a lock file beside it, `.<name>.lock`, created
 * with O_EXCL and holding `lockOwner() <random token>`. Without it, two processes rewriting
 * different keys of one file both read it, and the second rename drops the first's line.
 *
 * A process finding it taken waits (5 ms, doubling to 100 ms, for at most LOCK_WAIT_MS) and takes
 * it over when it is stale: its owner, in this pid space, is gone (or is a later process with its
 * pid), or it has not been touched for STALE_LOCK_MS (an owner in another container or on another
 * host, frozen, or one that died between creating it and writing its owner: read empty). Breaking
 * goes through `breakStale`, so that of two processes judging one lock stale only one removes it.
 * `fn` gets `stillMine`, to check just before it commits that its lock was not taken over meanwhile
 * (a holder paused past the stale bound). The lock is removed only while it still holds this
 * call's token, whatever `fn` does (a removal that fails leaves a lock that is stale once untouched
 * for STALE_LOCK_MS).
 */
export async function withFileLock<T>(file: string, fn: (stillMine: () => Promise<boolean>) => Promise<T>): Promise<T> {
  const name = path.basename(file);
  const lock = path.join(path.dirname(file), `.${name}.lock`);
  const token = randomBytes(8).toString('hex');
  const mine = `${lockOwner()} ${token}`;
  const fh = await acquire(lock, name, mine);
  // mtime is what another host judges staleness by; the handle still works once the lock was taken over.
  const touch = setInterval(() => void fh.utimes(new Date(), new Date()).catch(() => undefined), LOCK_TOUCH_MS);
  touch.unref();
  const stillMine = async () => (await readLock(lock, inTheWay(name)))?.content === mine;
  const release = async () => {
    clearInterval(touch);
    try {
      if (await stillMine()) await rm(lock, { force: true });
    } finally {
      await fh.close().catch(() => undefined);
    }
  };
  let result: T;
  try {
    result = await fn(stillMine);
  } catch (err) {
    await release().catch(() => undefined);
    throw err;
  }
  await release();
  return result;
}

async function acquire(lock: string, name: string, mine: string): Promise<FileHandle> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
    const fh = await createLock(lock, `${mine}\n`);
    if (fh) return fh;
    const held = await readLock(lock, inTheWay(name));
    if (held === undefined) continue; // released meanwhile
    if (isStale(held) && (await breakStale(lock, held, inTheWay(name)))) continue;
    if (Date.now() >= deadline) throw new Error(`env file ${name} stayed locked by another process (${holderOf(held)}) for ${LOCK_WAIT_MS / 1000} s`);
    // Jittered, so that waiters that met once do not keep meeting.
    await new Promise((r) => setTimeout(r, delay * (0.5 + Math.random())));
  }
}

function holderOf(held: LockState): string {
  const [pid, , space] = held.content.split(' ');
  return space ? `pid ${pid} on ${space.split('/')[0]}` : 'its lock is empty';
}

function isStale(held: LockState): boolean {
  if (Date.now() - held.mtimeMs > STALE_LOCK_MS) return true;
  const [pid, started, space, token] = held.content.split(' ');
  const owner = Number(pid);
  if (!PID_SPACE_KNOWN || space !== PID_SPACE || token === undefined || !Number.isInteger(owner) || owner <= 0) return false;
  // This process's own counts as running too: another thread of it may hold it.
  return !stillRunning(owner, started);
}

/** Something at the lock's name that is not a lock file: refused, and left for its owner to remove. */
function inTheWay(name: string) {
  return (file: string) => new UnprocessableError(`env file ${name} cannot be locked: ${path.basename(file)} beside it is not a lock file; remove it`);
}

function readOr(read: () => string): string {
  try {
    return read();
  } catch {
    return '';
  }
}
