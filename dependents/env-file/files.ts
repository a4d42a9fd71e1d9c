import { randomBytes } from 'node:crypto';
import { constants, existsSync, type Stats } from 'node:fs';
import { type FileHandle, lstat, open, readdir, realpath, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { UnprocessableError } from '../../core/errors';
import { withFileLock } from './lock';

/** Whether a held directory can be named by its descriptor (Linux's /proc/self/fd). */
const PINNED = existsSync('/proc/self/fd');

/**
 * A refusal because the file, a directory on its way or its key's line is not there: the file then
 * holds no version of the credential, and a restore has nothing to put back (EnvFileAbsent).
 */
export class EnvFileAbsent extends UnprocessableError {}

/** A checked env file whose directory is held open (withEnvFile). */
export interface EnvFile {
  /** The file through its held directory (/proc/self/fd/<n>/<name>; its checked path where there is no /proc). */
  path: string;
  /** Its real path when checked: one queue of rewrites per file. */
  key: string;
  dir: FileHandle;
}

/**
 * The worker writes files on behalf of API callers, so a settings path may only name a regular
 * file inside the root, reached without any symbolic link (a link could lead anywhere later).
 * The directories on its way are opened one by one, each refusing a symbolic link, and the file's
 * own directory is held open while `fn` runs: every open, write and rename after the check goes
 * through that held directory, never through its path again. (Through the path, whoever can write
 * in the identity's directory could swap a directory on the way for a link to another identity's
 * between the check and the write, and have the value written there.) Every open of the file
 * itself refuses a symbolic link too.
 */
export async function withEnvFile<T>(root: string, file: string, fn: (f: EnvFile) => Promise<T>): Promise<T> {
  const refuse = (why: string) => new UnprocessableError(`env file '${file}' is refused: ${why}`);
  const absent = (why: string) => new EnvFileAbsent(`env file '${file}' is refused: ${why}`);
  if (file.includes('\0') || path.isAbsolute(file)) throw refuse('it must be a path relative to the env files root');
  const realRoot = await realpath(root);
  const target = path.resolve(realRoot, file);
  const relative = path.relative(realRoot, target);
  if (relative === '' || relative === '..' || relative.startsWith(`..${path.sep}`)) throw refuse('it is outside the env files root');
  let dir = await open(realRoot, constants.O_RDONLY | constants.O_DIRECTORY);
  let dirPath = realRoot;
  try {
    for (const part of path.relative(realRoot, path.dirname(target)).split(path.sep).filter(Boolean)) {
      const next = await open(path.join(PINNED ? `/proc/self/fd/${dir.fd}` : dirPath, part), constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW).catch(
        async (err: NodeJS.ErrnoException) => {
          if (err.code === 'ENOENT') throw absent('its directory does not exist');
          if (err.code === 'ELOOP' || err.code === 'ENOTDIR') {
            throw (await lstat(path.join(dirPath, part)).then((st) => st.isSymbolicLink(), () => false)) ? refuse('a symbolic link is on its way') : absent('its directory does not exist');
          }
          throw err;
        },
      );
      await dir.close();
      dir = next;
      dirPath = path.join(dirPath, part);
    }
    const held = path.join(PINNED ? `/proc/self/fd/${dir.fd}` : dirPath, path.basename(target));
    const stats = await lstat(held).catch((err: NodeJS.ErrnoException) => {
      throw err.code === 'ENOENT' ? absent('it does not exist') : err;
    });
    checkRegular(stats, refuse);
    return await fn({ path: held, key: target, dir });
  } finally {
    await dir.close();
  }
}

/** An env file larger than this is refused, not read: a rotation reads it whole, and more than once. */
export const MAX_ENV_FILE_BYTES = 1024 * 1024;

/**
 * The file's content, opened without following a link and without blocking (a FIFO swapped in
 * after the check would otherwise hold a thread of libuv's pool for good: every DNS lookup of the
 * worker waits on that pool), then refused unless it is a regular file of at most 1 MiB.
 */
export async function readNoFollow(file: string): Promise<{ content: Buffer; stats: Stats }> {
  const fh = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    const stats = await fh.stat();
    const refuse = (why: string) => new UnprocessableError(`env file ${path.basename(file)} is refused: ${why}`);
    checkRegular(stats, refuse);
    const tooLarge = (size: number) => refuse(`it is larger than 1 MiB (${size} bytes)`);
    if (stats.size > MAX_ENV_FILE_BYTES) throw tooLarge(stats.size);
    // Read to its end, but no further than the limit: it may have grown since the stat.
    const chunks: Buffer[] = [];
    let total = 0;
    for (;;) {
      const chunk = Buffer.alloc(64 * 1024);
      const { bytesRead } = await fh.read(chunk, 0, chunk.length, total);
      if (bytesRead === 0) break;
      chunks.push(chunk.subarray(0, bytesRead));
      total += bytesRead;
      if (total > MAX_ENV_FILE_BYTES) throw tooLarge(Math.max(total, (await fh.stat()).size));
    }
    return { content: Buffer.concat(chunks, total), stats };
  } finally {
    await fh.close();
  }
}

/**
 * Read, edit, and atomically replace `file`: a temp file in the same directory with the same mode
 * (and owner) is written, fsynced and renamed over it, so a reader sees the old or the new file,
 * never half of one. Calls for one file are serialized in this process, and across processes by a
 * lock file beside it (withFileLock; taken through the held directory, like every other open):
 * before, another worker's rewrite of another key could land between our check and our rename,
 * and ours dropped its line. A change by a writer that takes no lock (a person, a worker of a
 * version before the lock) between our read and our rename still makes us start over.
 */
export async function rewriteFile(envFile: EnvFile, edit: (content: Buffer) => Buffer): Promise<void> {
  const file = envFile.path;
  await serialized(envFile.key, async () => {
    await removeLeftovers(file);
    // Nothing to change (a retry, a restore of the value in place) takes no lock: it waits for no
    // other process, and needs no more than reading, as before the lock.
    const { content } = await readNoFollow(file);
    if (edit(content).equals(content)) return;
    await withFileLock(file, (stillMine) => rewriteLocked(envFile, edit, stillMine));
  });
}

async function rewriteLocked(envFile: EnvFile, edit: (content: Buffer) => Buffer, stillMine: () => Promise<boolean>): Promise<void> {
  const file = envFile.path;
  for (let attempt = 0; attempt < 5; attempt++) {
    const { content, stats } = await readNoFollow(file);
    const next = edit(content);
    if (next.equals(content)) return;
    const temp = await writeTemp(file, next, stats);
    try {
      const now = await readNoFollow(file);
      if (now.stats.ino !== stats.ino || !now.content.equals(content)) continue;
      if (!(await stillMine())) {
        throw new Error(`env file ${path.basename(file)} was not written: its lock was taken over as stale while this write held it`);
      }
      await rename(temp, file);
    } finally {
      await rm(temp, { force: true });
    }
    await envFile.dir.sync();
    return;
  }
  throw new Error(`env file ${path.basename(file)} kept changing while it was being written`);
}

/** How old a temp file of this file must be before a write takes it for a leftover (see removeLeftovers). */
export const LEFTOVER_AGE_MS = 10_000;

/**
 * Temp files of `file` that a worker killed between writing one and renaming it left behind: each
 * holds a whole file, the value it was writing included, and nothing else ever removes it. A write
 * removes those older than 10 s (a retry after a worker's death comes later than that: the
 * heartbeat timeout); a younger one may be another process's write in progress, whose rename it
 * would break.
 */
async function removeLeftovers(file: string): Promise<void> {
  const dir = path.dirname(file);
  const base = path.basename(file).replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const temp = new RegExp(`^\\.${base}\\.[0-9a-f]{12}\\.tmp$`);
  // Best effort: a directory the worker may write but not list, or a leftover it may not remove
  // (another user's, in a sticky directory), must not stop the write itself.
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    if (!temp.test(name)) continue;
    const stats = await lstat(path.join(dir, name)).catch(() => undefined);
    if (stats?.isFile() && Date.now() - stats.mtimeMs > LEFTOVER_AGE_MS) await rm(path.join(dir, name), { force: true }).catch(() => undefined);
  }
}

async function writeTemp(file: string, content: Buffer, stats: Stats): Promise<string> {
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(6).toString('hex')}.tmp`);
  const fh = await open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  try {
    const mine = await fh.stat();
    // chown before chmod: changing the owner clears set-id bits.
    if (mine.uid !== stats.uid || mine.gid !== stats.gid) {
      await fh.chown(stats.uid, stats.gid).catch((err: NodeJS.ErrnoException) => {
        throw err.code === 'EPERM'
          ? new UnprocessableError(`env file ${path.basename(file)} belongs to another user; the worker must run as its owner or as root to keep it so`)
          : err;
      });
    }
    await fh.chmod(stats.mode & 0o7777);
    await fh.writeFile(content);
    await fh.sync();
    await fh.close();
    return temp;
  } catch (err) {
    await fh.close().catch(() => undefined);
    await rm(temp, { force: true });
    throw err;
  }
}

function checkRegular(stats: Stats, refuse: (why: string) => Error): void {
  if (stats.isSymbolicLink()) throw refuse('it is a symbolic link');
  if (!stats.isFile()) throw refuse('it is not a regular file');
  // Renaming over one name of a hard-linked file would silently split it from its other names.
  if (stats.nlink > 1) throw refuse('it has other hard links');
}

const queues = new Map<string, Promise<unknown>>();

async function serialized<T>(key: string, fn: () => Promise<T>): Promise<T> {
  const run = (queues.get(key) ?? Promise.resolve()).then(fn, fn);
  const settled = run.catch(() => undefined);
  queues.set(key, settled);
  try {
    return await run;
  } finally {
    if (queues.get(key) === settled) queues.delete(key);
  }
}
