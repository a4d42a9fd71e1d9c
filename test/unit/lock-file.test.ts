import { mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { breakStale, createLock, readLock } from '../../core/lock-file';

const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-lock-file-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const inTheWay = (file: string) => new Error(`in the way: ${path.basename(file)}`);

describe('core/lock-file', () => {
  it('of creators racing, one wins, its handle the lock itself, with its whole content, and nothing is left beside it', async () => {
    for (let round = 0; round < 20; round++) {
      const lock = path.join(dir, `race-${round}.lock`);
      const made = await Promise.all(Array.from({ length: 4 }, (_, i) => createLock(lock, `creator-${i} ${'x'.repeat(64)}`)));
      const winners = made.filter((fh) => fh !== undefined);
      expect(winners).toHaveLength(1);
      expect((await winners[0]!.stat()).ino).toBe(statSync(lock).ino);
      await winners[0]!.close();
      expect((await readLock(lock, inTheWay))!.content).toBe(`creator-${made.indexOf(winners[0])} ${'x'.repeat(64)}`);
      expect(readdirSync(dir).filter((f) => f.startsWith(`race-${round}.lock`))).toEqual([`race-${round}.lock`]);
    }
  });

  it('a link or a directory at the lock’s name is in the way: refused, never followed nor removed', async () => {
    const target = path.join(dir, 'target');
    writeFileSync(target, 'not a lock');
    const link = path.join(dir, 'linked.lock');
    symlinkSync(target, link);
    expect(await createLock(link, 'me')).toBeUndefined();
    await expect(readLock(link, inTheWay)).rejects.toThrow('in the way: linked.lock');
    expect(readdirSync(dir)).toContain('linked.lock');
  });

  it('a stale lock is broken only while it is still the one judged, and a fresh break is left to its breaker', async () => {
    const lock = path.join(dir, 'stale.lock');
    writeFileSync(lock, 'dead 1');
    const judged = (await readLock(lock, inTheWay))!;
    // Taken again since (another content): left.
    writeFileSync(lock, 'alive 2');
    expect(await breakStale(lock, judged, inTheWay)).toBe(false);
    expect((await readLock(lock, inTheWay))!.content).toBe('alive 2');
    // Another process is breaking it: left to it.
    const now = (await readLock(lock, inTheWay))!;
    writeFileSync(`${lock}.break`, 'other breaker');
    expect(await breakStale(lock, now, inTheWay)).toBe(false);
    rmSync(`${lock}.break`);
    // Still the one judged: removed, and its break with it.
    expect(await breakStale(lock, now, inTheWay)).toBe(true);
    expect(readdirSync(dir).filter((f) => f.startsWith('stale.lock'))).toEqual([]);
  });
});
