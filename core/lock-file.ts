import { randomBytes } from 'node:crypto';
import { constants, writeFileSync } from 'node:fs';
import { type FileHandle, open, rm } from 'node:fs/promises';
import { placeOnce } from './place-once';

/**
 * The parts of a lock file that every lock here shares (the embedded Temporal server's
 * `DATA_DIR/temporal.lock`, an env file's `.<name>.lock`): created exclusively, read without
 * following a link or blocking, and a stale one broken by one process at a time. Who holds a lock,
 * and when it is stale, is each lock's own business.
 */

/** A lock as read: its inode and mtime tell it from a lock taken since with the same content. */
export interface LockState {
  ino: number;
  mtimeMs: number;
  content: string;
}

/** What a lock's reader says of something at its name that is not a lock file (refused, never removed). */
export type InTheWay = (file: string) => Error;

/** A `.break` older than this is of a process that died breaking a lock (it holds one for a few system calls). */
const BREAK_STALE_MS = 10_000;

/**
 * `file`, created holding `content` and left open, or undefined if it exists (a link at its name
 * counts as existing, and is not followed). It never exists empty: it is placed with placeOnce
 * (written aside, then linked into place; copied where there are no hard links), so a starter or a
 * writer beside it never reads it empty, takes it for one whose writer died, breaks it and takes it
 * too. The handle (kept for touching it) is opened on what is at the name then, and kept only if
 * that holds this content: one broken and taken by another meanwhile is theirs.
 */
export async function createLock(file: string, content: string): Promise<FileHandle | undefined> {
  if (!placeOnce(file, (made) => writeFileSync(made, content, { flag: 'wx', mode: 0o644 }))) return undefined;
  let fh: FileHandle;
  try {
    fh = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  if ((await fh.readFile('utf8')) === content) return fh;
  await fh.close();
  return undefined;
}

/**
 * A lock's state; undefined once it is gone. Opened without following a link and without blocking
 * (a FIFO put at its name must not hold a thread of libuv's pool); anything there but a small
 * regular file is in the way, and refused rather than removed.
 */
export async function readLock(file: string, inTheWay: InTheWay): Promise<LockState | undefined> {
  let fh: FileHandle;
  try {
    fh = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    if (code === 'ELOOP') throw inTheWay(file);
    throw err;
  }
  try {
    const stats = await fh.stat();
    if (!stats.isFile() || stats.size > 4096) throw inTheWay(file);
    const buf = Buffer.alloc(4096);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return { ino: stats.ino, mtimeMs: stats.mtimeMs, content: buf.subarray(0, bytesRead).toString('utf8').trim() };
  } finally {
    await fh.close();
  }
}

/**
 * Removes a lock judged stale, one process at a time: under `<lock>.break` (created exclusively),
 * the lock is read again and removed only if it is still the very one judged (same inode, content
 * and mtime: a holder that was only slow, or a lock taken since, is left). Without it, of two
 * processes that judged it stale the second could remove the lock the first took next. A process
 * finding the break taken leaves the lock to its breaker (a break older than BREAK_STALE_MS is of
 * one that died breaking it, and is removed). True when the lock is gone.
 */
export async function breakStale(lock: string, judged: LockState, inTheWay: InTheWay): Promise<boolean> {
  const breaker = `${lock}.break`;
  const me = `${process.pid} ${randomBytes(8).toString('hex')}`;
  const fh = await createLock(breaker, me);
  if (!fh) {
    const other = await readLock(breaker, inTheWay).catch(() => undefined);
    if (other && Date.now() - other.mtimeMs > BREAK_STALE_MS) await removeIfStill(breaker, other, inTheWay);
    return false;
  }
  await fh.close();
  try {
    return await removeIfStill(lock, judged, inTheWay);
  } finally {
    if ((await readLock(breaker, inTheWay).catch(() => undefined))?.content === me) await rm(breaker, { force: true });
  }
}

async function removeIfStill(file: string, judged: LockState, inTheWay: InTheWay): Promise<boolean> {
  const now = await readLock(file, inTheWay);
  if (now === undefined) return true;
  if (now.ino !== judged.ino || now.mtimeMs !== judged.mtimeMs || now.content !== judged.content) return false;
  await rm(file, { force: true });
  return true;
}
