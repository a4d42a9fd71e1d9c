import { afterEach, describe, expect, it, vi } from 'vitest';
import { Progress, table } from '../../cli/client/render';

describe('CLI rendering', () => {
  const tty = process.stderr.isTTY;
  afterEach(() => {
    process.stderr.isTTY = tty;
    vi.restoreAllMocks();
  });
  const captureStderr = () => {
    const written: string[] = [];
    vi.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => {
      written.push(String(chunk));
      return true;
    });
    return written;
  };

  it('aligns table columns to the widest cell, without trailing spaces', () => {
    expect(table(['A', 'LONGER', 'LAST'], [['wide cell', 'x', 'end'], ['y', 'z', '']])).toBe('A          LONGER  LAST\nwide cell  x       end\ny          z');
  });

  it('on a terminal redraws one bar line in place and ends it with a newline', () => {
    process.stderr.isTTY = true;
    const written = captureStderr();
    const progress = new Progress(4);
    progress.update([], 0);
    progress.update([{ key: 'a', line: 'a: succeeded' }, { key: 'b', line: 'b: failed' }], 1);
    progress.end();
    expect(written).toEqual([
      `\r\x1b[2K[${'-'.repeat(30)}] 0/4 done`,
      `\r\x1b[2K[${'#'.repeat(15)}${'-'.repeat(15)}] 2/4 done, 1 failed`,
      '\n',
    ]);
  });

  it("ends the bar's line once, however often it is ended (a Ctrl-C, then the follow's own end)", () => {
    process.stderr.isTTY = true;
    const written = captureStderr();
    const progress = new Progress(1);
    progress.update([], 0);
    progress.end();
    progress.end();
    expect(written).toEqual([`\r\x1b[2K[${'-'.repeat(30)}] 0/1 done`, '\n']);
  });

  it('elsewhere prints each finished item once, as a plain line', () => {
    process.stderr.isTTY = false;
    const written = captureStderr();
    const progress = new Progress(2);
    progress.update([{ key: 'a', line: 'a: succeeded' }], 0);
    progress.update([{ key: 'a', line: 'a: succeeded' }, { key: 'b', line: 'b: failed' }], 1);
    progress.end();
    expect(written).toEqual(['[1/2] a: succeeded\n', '[2/2] b: failed\n']);
  });
});
