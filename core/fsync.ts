import { closeSync, fsyncSync, openSync } from 'node:fs';

/** fsync of a file or a directory by its path (a directory's: the names in it made durable). */
export function syncPath(p: string): void {
  const fd = openSync(p, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
