import { randomBytes } from 'node:crypto';
import { constants, copyFileSync, linkSync, rmSync } from 'node:fs';
import path from 'node:path';
import { syncPath } from './fsync';

/**
 * Writes a file aside (`write` gets the temporary path) and links it into place, which fails if
 * the file exists: of processes racing to make it, one wins whole and the others keep its file,
 * never an empty or half-written one. True if this call placed it. On a file system without hard
 * links it is copied into place instead (created only if absent, but visible before it is whole).
 * A write that fails part-way leaves nothing aside.
 */
export function placeOnce(file: string, write: (made: string) => void, opts: { durable?: boolean } = {}): boolean {
  const made = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.new`;
  try {
    write(made);
    // `durable`: what it holds on disk before its name is (written without a sync, a token could come back empty).
    if (opts.durable) syncPath(made);
    try {
      linkSync(made, file);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw err;
      copyFileSync(made, file, constants.COPYFILE_EXCL);
      if (opts.durable) syncPath(file);
    }
    // `durable` (a key or a secret): the new name made durable before the temporary one goes, or a
    // crash then (a power cut) could keep neither, or an empty copy, while what the file guards (the
    // data keys its master key wraps, in a database perhaps on another disk) was committed. (Not for
    // a lock file, made on every env-file write.)
    if (opts.durable) syncPath(path.dirname(file));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  } finally {
    rmSync(made, { force: true });
  }
}
