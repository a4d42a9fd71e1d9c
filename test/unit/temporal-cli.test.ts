import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { startEmbeddedTemporal } from '../../embedded/temporal';
import { cacheDir, findTemporalCli } from '../../embedded/temporal-cli';

describe('the Temporal CLI build cache', () => {
  const saved = { PATH: process.env.PATH, MAILGENT_CACHE_DIR: process.env.MAILGENT_CACHE_DIR, TMPDIR: process.env.TMPDIR };
  const dirs: string[] = [];
  afterEach(() => {
    process.env.PATH = saved.PATH;
    if (saved.MAILGENT_CACHE_DIR === undefined) delete process.env.MAILGENT_CACHE_DIR;
    else process.env.MAILGENT_CACHE_DIR = saved.MAILGENT_CACHE_DIR;
    if (saved.TMPDIR === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = saved.TMPDIR;
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  it('a cache variable set empty counts as unset, as .ci/run reads it: the cache is never a path relative to the working directory', () => {
    const xdg = process.env.XDG_CACHE_HOME;
    try {
      process.env.MAILGENT_CACHE_DIR = '';
      process.env.XDG_CACHE_HOME = '';
      // Before, `mailgent` under the working directory: CI built the CLI into ~/.cache, the suite then built it again there.
      expect(cacheDir()).toBe(path.join(os.homedir(), '.cache', 'mailgent'));
      process.env.XDG_CACHE_HOME = '/var/cache/x';
      expect(cacheDir()).toBe('/var/cache/x/mailgent');
    } finally {
      if (xdg === undefined) delete process.env.XDG_CACHE_HOME;
      else process.env.XDG_CACHE_HOME = xdg;
    }
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

  it("go install gets Go's environment, not the service's secrets", async () => {
    const cache = mkdtempSync(path.join(os.tmpdir(), 'mailgent-cli-cache-'));
    const fake = mkdtempSync(path.join(os.tmpdir(), 'mailgent-fake-go-'));
    dirs.push(cache, fake);
    // A go that writes down what it was given, then builds.
    writeFileSync(path.join(fake, 'go'), `#!/bin/sh\n/usr/bin/env > "${fake}/env"\nprintf '#!/bin/sh\\n' > "$GOBIN/temporal"\n/bin/chmod +x "$GOBIN/temporal"\n`, { mode: 0o755 });
    process.env.MAILGENT_CACHE_DIR = cache;
    process.env.PATH = fake;
    const given = {
      VAULT_MASTER_KEY: `base64:${Buffer.alloc(32, 7).toString('base64')}`,
      ADMIN_TOKEN: 'admin-token-that-stays-home',
      DATABASE_URL: 'postgres://mailgent:db-password-that-stays-home@db/mailgent',
      SMTP_URL: 'smtp://u:smtp-password-that-stays-home@mail',
      GOPROXY: 'https://proxy.example/go',
      GOFLAGS: '-mod=mod',
      https_proxy: 'http://proxy.example:3128',
      // git's configuration given in the environment (CI's insteadOf rules, certificates).
      GIT_CONFIG_COUNT: '1',
      GIT_CONFIG_KEY_0: 'url.https://proxy.example/.insteadOf',
      GIT_CONFIG_VALUE_0: 'https://github.com/',
      // Not Go's, though its name begins with GO.
      GOOGLE_APPLICATION_CREDENTIALS: '/secrets/gcp-key-that-stays-home.json',
    };
    const before = Object.fromEntries(Object.keys(given).map((k) => [k, process.env[k]]));
    Object.assign(process.env, given);
    try {
      expect(await findTemporalCli({})).toBe(path.join(cache, 'bin', 'temporal'));
    } finally {
      for (const [k, v] of Object.entries(before)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
    const env = Object.fromEntries(readFileSync(path.join(fake, 'env'), 'utf8').trim().split('\n').map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
    expect(env).toMatchObject({
      PATH: fake,
      GOPROXY: given.GOPROXY,
      GOFLAGS: '-mod=mod -buildvcs=false',
      https_proxy: given.https_proxy,
      GIT_CONFIG_COUNT: '1',
      GIT_CONFIG_KEY_0: given.GIT_CONFIG_KEY_0,
      GIT_CONFIG_VALUE_0: given.GIT_CONFIG_VALUE_0,
    });
    expect(env.GOBIN).toMatch(/bin\.tmp-\d+$/);
    for (const name of ['VAULT_MASTER_KEY', 'ADMIN_TOKEN', 'DATABASE_URL', 'SMTP_URL', 'GOOGLE_APPLICATION_CREDENTIALS']) expect(env[name], name).toBeUndefined();
    const text = readFileSync(path.join(fake, 'env'), 'utf8');
    for (const secret of ['stays-home', given.VAULT_MASTER_KEY]) expect(text).not.toContain(secret);
  });

  it('a build Ctrl-C ended (go dying of the signal, or go saying its compiler did) is start-up interrupted, not a failed build nor a reason to download the server', async () => {
    const cache = mkdtempSync(path.join(os.tmpdir(), 'mailgent-cli-cache-'));
    const data = mkdtempSync(path.join(os.tmpdir(), 'mailgent-temporal-data-'));
    dirs.push(cache, data);
    process.env.MAILGENT_CACHE_DIR = cache;
    const goThat = (body: string) => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-fake-go-'));
      dirs.push(dir);
      writeFileSync(path.join(dir, 'go'), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
      return dir;
    };
    process.env.PATH = goThat('kill -TERM $$');
    await expect(findTemporalCli({})).rejects.toMatchObject({ name: 'HelperInterrupted', signal: 'SIGTERM', message: 'go install was ended by SIGTERM' });
    // go catches SIGINT, and exits once the compilers it runs have died of it.
    process.env.PATH = goThat("echo 'go.temporal.io/server/common: /usr/lib/go/pkg/tool/linux_amd64/compile: signal: interrupt' >&2; exit 1");
    await expect(findTemporalCli({})).rejects.toMatchObject({ name: 'HelperInterrupted', signal: 'SIGINT' });
    // Not followed by the SDK's download of the server (which would start one after the Ctrl-C).
    await expect(startEmbeddedTemporal({ dataDir: data, namespace: 'default' })).rejects.toMatchObject({ name: 'HelperInterrupted' });
    expect(existsSync(path.join(data, 'temporal.sqlite'))).toBe(false);
    // Any other failure is a failed build, as before.
    process.env.PATH = goThat("echo 'no route to proxy.golang.org' >&2; exit 1");
    await expect(findTemporalCli({})).rejects.toThrow(/go install .* failed: no route to proxy.golang.org/);
  });

  it('with no CLI and no Go, the SDK downloads the server into the cache (made 0700), never running a file planted in the shared temporary directory', async () => {
    const made = (prefix: string) => {
      const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
      dirs.push(dir);
      return dir;
    };
    const cache = made('mailgent-cli-cache-');
    const shared = made('mailgent-shared-tmp-');
    const data = made('mailgent-temporal-data-');
    process.env.MAILGENT_CACHE_DIR = cache;
    process.env.PATH = made('mailgent-empty-path-');
    process.env.TMPDIR = shared;
    // Another user's file at the name (and age) the SDK's download is cached under in the temporary directory.
    const version = JSON.parse(readFileSync(path.join(path.dirname(createRequire(import.meta.url).resolve('@temporalio/testing')), '..', 'package.json'), 'utf8')).version as string;
    const ran = path.join(shared, 'planted-file-ran');
    writeFileSync(path.join(shared, `temporal-sdk-typescript-${version}`), `#!/bin/sh\necho "$@" > ${ran}\nexit 1\n`, { mode: 0o755 });

    // This machine reaches no download server: the start fails, saying what to do.
    await expect(startEmbeddedTemporal({ dataDir: data, namespace: 'default' })).rejects.toThrow(/No Temporal server could be started\. Set TEMPORAL_ADDRESS/);
    // Before, the planted file was run (with `server start-dev …`), as this process's user.
    expect(existsSync(ran)).toBe(false);
    expect(statSync(path.join(cache, 'sdk-download')).mode & 0o777).toBe(0o700);

    // A cache inside a directory another user can change (no sticky bit): they could swap the
    // download directory for one of theirs after the check. Refused before any download.
    const open = made('mailgent-open-parent-');
    chmodSync(open, 0o777);
    process.env.MAILGENT_CACHE_DIR = path.join(open, 'cache');
    await expect(startEmbeddedTemporal({ dataDir: made('mailgent-temporal-data-'), namespace: 'default' })).rejects.toThrow(
      new RegExp(`The SDK download failed: ${open}/cache/sdk-download is inside ${open}, which another user can change`),
    );
  }, 30_000);
});
