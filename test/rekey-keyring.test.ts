import fs, { chmodSync, mkdtempSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { syncBuiltinESMExports } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { generateMasterKey, Keyring, masterKeyId, readKeyringFile, writeKeyringFile, type MasterKey } from '../vault/keyring';

/**
 * A service's keyring file, rewritten by `rekey` while the service runs (vault/keyring.ts): the
 * service must come to wrap with the new current key, however the rename falls against its reads.
 */

// Called once, right after a read of the file (and before anything else looks at it), when a test sets it.
// node:fs's readFileSync is wrapped for this file's tests and its named export synced, so the keyring
// module's import sees the wrapper (a vi.mock would not reach a node:fs another test file loaded first
// in the same worker: the test files share their modules).
const race = { afterRead: undefined as undefined | (() => void), failNextRead: false };
const actualReadFileSync = fs.readFileSync;
beforeAll(() => {
  fs.readFileSync = ((...args: Parameters<typeof actualReadFileSync>) => {
    if (race.failNextRead) {
      race.failNextRead = false;
      throw Object.assign(new Error(`EACCES: permission denied, open '${String(args[0])}'`), { code: 'EACCES' });
    }
    const text = actualReadFileSync(...args);
    const hook = race.afterRead;
    race.afterRead = undefined;
    hook?.();
    return text;
  }) as typeof actualReadFileSync;
  syncBuiltinESMExports();
});
afterAll(() => {
  fs.readFileSync = actualReadFileSync;
  syncBuiltinESMExports();
});

const newKey = (): MasterKey => {
  const key = generateMasterKey();
  return { id: masterKeyId(key), key };
};

describe('a keyring file replaced while a service runs', () => {
  let dir: string;
  let file: string;
  // Explicit mtimes: two writes in the same tick of the file system's clock would get the same one.
  const write = (keys: MasterKey[], mtime: number) => {
    writeKeyringFile(file, keys, keys[0]!.id);
    utimesSync(file, mtime, mtime);
  };

  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'keyring-'));
    file = path.join(dir, 'keys.json');
  });
  afterEach(() => {
    race.afterRead = undefined;
    race.failNextRead = false;
    rmSync(dir, { recursive: true, force: true });
  });

  it('is picked up by `current`, the key a service wraps with', () => {
    const [a, b] = [newKey(), newKey()];
    write([a], 1_700_000_000);
    const ring = Keyring.fromSetting(file);
    expect(ring.current.id).toBe(a.id);
    write([b, a], 1_700_000_100);
    expect(ring.current.id).toBe(b.id);
    expect(ring.ids.sort()).toEqual([a.id, b.id].sort());
  });

  it('forgets a key the new file dropped at the next unwrap, in a process that never wraps: the key is zeroed', () => {
    const [a, b] = [newKey(), newKey()];
    write([b, a], 1_700_000_000);
    const ring = Keyring.fromSetting(file);
    const held = ring.find(a.id)!;
    expect(held.equals(a.key)).toBe(true);
    // rekey re-wrapped what `a` wrapped under `b`, and dropped `a`. This process only unwraps, with `b`.
    write([b], 1_700_000_100);
    expect(ring.find(b.id)?.equals(b.key)).toBe(true);
    // Before, only `current` and an unknown id read the file again: `a` stayed known, and in memory, until a restart.
    expect(ring.ids).toEqual([b.id]);
    expect(ring.find(a.id)).toBeUndefined();
    vi.useFakeTimers({ toFake: ['setTimeout'] });
    try {
      // The dropped key is zeroed a little later (an unwrap holding it finishes first).
      write([b, a], 1_700_000_200);
      ring.find(b.id);
      const again = ring.find(a.id)!;
      write([b], 1_700_000_300);
      ring.find(b.id);
      expect(again.equals(Buffer.alloc(32))).toBe(false);
      vi.runAllTimers();
      expect(again.equals(Buffer.alloc(32))).toBe(true);
    } finally {
      vi.useRealTimers();
    }
  });

  it('a key held still unwraps while the file cannot be read (moved away, say): only a readable file that drops it makes it forgotten', () => {
    const [a] = [newKey()];
    write([a], 1_700_000_000);
    const ring = Keyring.fromSetting(file);
    rmSync(file);
    expect(ring.find(a.id)?.equals(a.key)).toBe(true);
  });

  it('is picked up when it was renamed into place with the same mtime (a coarse file system clock): by its new inode', () => {
    const [a, b] = [newKey(), newKey()];
    write([a], 1_700_000_000);
    const ring = Keyring.fromSetting(file);
    expect(ring.current.id).toBe(a.id);
    write([b, a], 1_700_000_000);
    // Before, the mtime alone told versions apart: the new current key went unseen.
    expect(ring.current.id).toBe(b.id);
  });

  it('a wrap reads the file again even when its inode and mtime are those it read (a rename that reused the inode, on a coarse clock)', () => {
    const [a, b] = [newKey(), newKey()];
    writeKeyringFile(file, [a, b], a.id);
    utimesSync(file, 1_700_000_000, 1_700_000_000);
    const ring = Keyring.fromSetting(file);
    expect(ring.current.id).toBe(a.id);
    const { ino } = statSync(file);
    // The same inode and mtime, another current key (as a rekey's last write that took its first's inode).
    const doc = JSON.parse(fs.readFileSync(file, 'utf8'));
    fs.writeFileSync(file, JSON.stringify({ ...doc, current: b.id }, null, 2) + '\n');
    utimesSync(file, 1_700_000_000, 1_700_000_000);
    expect(statSync(file).ino).toBe(ino);
    // Before, told apart by inode and mtime alone: the service went on wrapping with the old key.
    expect(ring.current.id).toBe(b.id);
  });

  it('is written 0600 even over a temporary file a dead writer of the same pid left with another mode', () => {
    const [a] = [newKey()];
    const stale = `${file}.${process.pid}.tmp`;
    writeFileSync(stale, 'left behind');
    chmodSync(stale, 0o644);
    writeKeyringFile(file, [a], a.id);
    // Before, opening the stale file kept its 0644, and the keyring was renamed into place world-readable.
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(readKeyringFile(file).current).toBe(a.id);
  });

  it("removes a temporary file a killed writer of another pid left (a whole copy of the keyring), not a running writer's", () => {
    const [a] = [newKey()];
    // A pid that ran and has ended, and one running.
    const ended = spawnSync('true').pid!;
    const live = process.ppid;
    const dead = `${file}.${ended}.tmp`;
    const running = `${file}.${live}.tmp`;
    const other = path.join(dir, 'other.json.123.tmp');
    for (const f of [dead, running, other]) writeFileSync(f, 'a keyring copy');
    writeKeyringFile(file, [a], a.id);
    // Before, left for good: a backup of the directory kept the key a rekey had dropped.
    expect(fs.existsSync(dead)).toBe(false);
    expect(fs.existsSync(running)).toBe(true);
    expect(fs.existsSync(other)).toBe(true);
    expect(readKeyringFile(file).current).toBe(a.id);
  });

  it('written over a file through a symbolic link, rewrites the target and keeps its owner, group and mode', () => {
    const [a, b] = [newKey(), newKey()];
    const real = path.join(dir, `real-${process.pid}.json`);
    const link = path.join(dir, `link-${process.pid}.json`);
    writeKeyringFile(real, [a], a.id);
    chmodSync(real, 0o640);
    // As the service's own user would own it (the test runs as root here).
    if (process.geteuid?.() === 0) fs.chownSync(real, 4242, 4343);
    fs.symlinkSync(real, link);
    try {
      writeKeyringFile(link, [b, a], b.id);
      // Before, the link was replaced by a file of its own, root's and 0600; the target kept only the old key.
      expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
      expect(readKeyringFile(real).current).toBe(b.id);
      const st = statSync(real);
      expect(st.mode & 0o777).toBe(0o640);
      if (process.geteuid?.() === 0) expect([st.uid, st.gid]).toEqual([4242, 4343]);
      // Others' bits are not kept: a keyring left world-readable is not rewritten so.
      chmodSync(real, 0o644);
      writeKeyringFile(link, [b], b.id);
      expect(statSync(real).mode & 0o777).toBe(0o640);
      expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    } finally {
      rmSync(link, { force: true });
      rmSync(real, { force: true });
    }
  });

  it('written by another user than its owner (not root), is refused before anything is written: no file of the wrong owner, no temporary file', () => {
    // The suite runs as root here; the writer is a child process run as nobody.
    expect(process.geteuid?.()).toBe(0);
    const [a] = [newKey()];
    const shared = mkdtempSync(path.join(os.tmpdir(), 'keyring-shared-'));
    try {
      chmodSync(shared, 0o777);
      const owned = path.join(shared, 'keys.json');
      writeKeyringFile(owned, [a], a.id);
      fs.chownSync(owned, 4242, 4343);
      const before = fs.readFileSync(owned, 'utf8');
      const script = path.join(shared, 'write.mjs');
      writeFileSync(
        script,
        `const { writeKeyringFile, generateMasterKey, masterKeyId } = await import(${JSON.stringify(path.resolve('vault/keyring.ts'))});
         const k = generateMasterKey();
         try { writeKeyringFile(${JSON.stringify(owned)}, [{ id: masterKeyId(k), key: k }], masterKeyId(k)); console.log('written'); }
         catch (e) { console.log(e.constructor.name + ': ' + e.message); }`,
      );
      const child = spawnSync(process.execPath, ['--import', 'tsx', script], { uid: 65534, gid: 65534, env: { ...process.env, HOME: shared }, encoding: 'utf8' });
      // Before, the nobody-owned 0600 file took its place: the service, running as 4242, could no longer read it.
      expect(child.stdout.trim()).toBe(`KeyringFileError: keyring file ${owned} is owned by uid 4242; run this as that user (or root), so the file keeps its owner`);
      expect(fs.readFileSync(owned, 'utf8')).toBe(before);
      expect([statSync(owned).uid, statSync(owned).gid]).toEqual([4242, 4343]);
      expect(fs.readdirSync(shared).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    } finally {
      rmSync(shared, { recursive: true, force: true });
    }
  });

  it('is read again after a read of it failed: one failure does not leave the service wrapping with the old key', () => {
    const [a, b] = [newKey(), newKey()];
    write([a], 1_700_000_000);
    const ring = Keyring.fromSetting(file);
    write([b, a], 1_700_000_100);
    race.failNextRead = true;
    expect(() => ring.current).toThrow(/EACCES/);
    // Before, the new file's stamp was recorded ahead of the read that failed: `a` for good.
    expect(ring.current.id).toBe(b.id);
  });

  it('is picked up when it was renamed into place while the service was loading the old one', () => {
    const [a, b] = [newKey(), newKey()];
    write([a], 1_700_000_000);
    // rekey's rename lands after the service read the old file and before it looked at its mtime.
    race.afterRead = () => write([b, a], 1_700_000_100);
    const ring = Keyring.fromSetting(file);
    expect(race.afterRead).toBeUndefined();
    expect(ring.current.id).toBe(b.id);
    expect(ring.find(a.id)?.equals(a.key)).toBe(true);
  });
});
