import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { findTemporalCli } from '../../embedded/temporal-cli';

describe('the Temporal CLI build cache', () => {
  const saved = { PATH: process.env.PATH, MAILGENT_CACHE_DIR: process.env.MAILGENT_CACHE_DIR };
  const dirs: string[] = [];
  afterEach(() => {
    process.env.PATH = saved.PATH;
    if (saved.MAILGENT_CACHE_DIR === undefined) delete process.env.MAILGENT_CACHE_DIR;
    else process.env.MAILGENT_CACHE_DIR = saved.MAILGENT_CACHE_DIR;
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  /** A `go` that writes part of the binary where GOBIN says, then dies (a build killed half way) or finishes. */
  const fakeGo = (finishes: boolean) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-fake-go-'));
    dirs.push(dir);
    writeFileSync(
      path.join(dir, 'go'),
      `#!/bin/sh\nprintf '#!/bin/sh\\necho temporal version 1.5.1\\n' > "$GOBIN/temporal"\n/bin/chmod +x "$GOBIN/temporal"\n${finishes ? 'exit 0' : 'kill -9 $$'}\n`,
      { mode: 0o755 },
    );
    return dir;
  };

  it('a build killed half way leaves nothing the next start would take for the binary; a finished one is found in the cache', async () => {
    const cache = mkdtempSync(path.join(os.tmpdir(), 'mailgent-cli-cache-'));
    dirs.push(cache);
    process.env.MAILGENT_CACHE_DIR = cache;
    process.env.PATH = fakeGo(false);
    await expect(findTemporalCli({})).rejects.toThrow(/go install .* failed/);
    // Before, the half-written binary stayed at <cache>/bin/temporal and was used from then on.
    expect(existsSync(path.join(cache, 'bin', 'temporal'))).toBe(false);
    process.env.PATH = fakeGo(true);
    const built = await findTemporalCli({});
    expect(built).toBe(path.join(cache, 'bin', 'temporal'));
    expect(await findTemporalCli({})).toBe(built);
    expect(existsSync(path.join(cache, `bin.tmp-${process.pid}`))).toBe(false);
  });
});
