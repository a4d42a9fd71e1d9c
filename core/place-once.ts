import { randomBytes } from 'node:crypto';
import { constants, copyFileSync, linkSync, rmSync } from 'node:fs';

/**
 * Writes a file aside (`write` gets the temporary path) and links it into place, which fails if
 * the file exists: of processes racing to make it, one wins whole and the others keep its file,
 * never an empty or half-written one. True if this call placed it. On a file system without hard
 * links it is copied into place instead (created only if absent, but visible before it is whole).
 * A write that fails part-way leaves nothing aside.
 */
export function placeOnce(file: string, write: (made: string) => void): boolean {
  const made = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.new`;
  try {
    write(made);
    try {
      linkSync(made, file);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw err;
      copyFileSync(made, file, constants.COPYFILE_EXCL);
    }
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  } finally {
    rmSync(made, { force: true });
  }
}
