import { execFile } from 'node:child_process';
import { accessSync, constants, mkdirSync, renameSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { HelperInterrupted, isStopSignal } from '../core/helper-interrupted';
import type { Logger } from '../core/logger';
import { envNamed } from './child';

/**
 * Finds the Temporal CLI (whose `server start-dev` is the embedded Temporal), in this order:
 * TEMPORAL_CLI_PATH, `temporal` on PATH, a cached build, a fresh `go install` into the cache.
 * v1.5.1 is pinned: later tags carry a `replace` directive that `go install` refuses.
 * Returns undefined when none of these routes exists; the caller then tries the SDK's download.
 */
export const TEMPORAL_CLI_MODULE = 'github.com/temporalio/cli/cmd/temporal@v1.5.1';

/** As `.ci/run` finds it: a variable set empty counts as unset (before, an empty one made a path relative to the working directory). */
export function cacheDir(): string {
  return process.env.MAILGENT_CACHE_DIR || path.join(process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'mailgent');
}

export async function findTemporalCli(opts: { configured?: string; logger?: Logger; build?: boolean }): Promise<string | undefined> {
  if (opts.configured) return opts.configured;
  const onPath = which('temporal');
  if (onPath) return onPath;
  const bin = path.join(cacheDir(), 'bin');
  const cached = path.join(bin, 'temporal');
  if (isExecutable(cached)) return cached;
  const go = which('go');
  if (!go || opts.build === false) return undefined;
  mkdirSync(bin, { recursive: true });
  opts.logger?.info({ module: TEMPORAL_CLI_MODULE, into: bin }, 'building the Temporal CLI with go install (first run only; takes a few minutes)');
  // Built into a directory of this process's own, then renamed into place: go install may write its
  // output in place (copied from its build cache), and a build killed half way left a truncated
  // binary where the cache is looked up, trusted on every start after (it is executable).
  const staging = path.join(cacheDir(), `bin.tmp-${process.pid}`);
  mkdirSync(staging, { recursive: true });
  try {
    await promisify(execFile)(go, ['install', TEMPORAL_CLI_MODULE], {
      env: { ...goEnv(), GOBIN: staging, GOFLAGS: `${process.env.GOFLAGS ?? ''} -buildvcs=false`.trim() },
      maxBuffer: 64 * 1024 * 1024,
    });
    renameSync(path.join(staging, 'temporal'), cached);
  } catch (err) {
    const e = err as { stderr?: string; message: string; signal?: unknown };
    // Ctrl-C reaches go install too (it is in the service's process group): start-up interrupted, if
    // the service took the signal (cli/serve.ts), not a failed build. go itself catches SIGINT and
    // exits once the compilers it runs have died of it, saying so.
    const signal = isStopSignal(e.signal) ? e.signal : /\bsignal: interrupt\b/.test(e.stderr ?? '') ? 'SIGINT' : /\bsignal: terminated\b/.test(e.stderr ?? '') ? 'SIGTERM' : undefined;
    if (signal) throw new HelperInterrupted('go install', signal, { cause: err });
    throw new Error(`go install ${TEMPORAL_CLI_MODULE} failed: ${(e.stderr || e.message).trim().split('\n').slice(-5).join('\n')}`, { cause: err });
  } finally {
    rmSync(staging, { recursive: true, force: true });
  }
  return cached;
}

/**
 * What go install is given of this process's environment: Go's own settings (GOPROXY, GOPATH,
 * GOFLAGS …: no underscore in their names but GO_EXTLINK_ENABLED's, so GOOGLE_APPLICATION_CREDENTIALS
 * and the like stay out), where it caches and finds its configuration, the proxies and certificates
 * it fetches modules through, git's (GIT_CONFIG_KEY_0 …) and ssh's for a module fetched directly,
 * the library path of a toolchain installed aside, locale and time zone. Not the service's: an
 * inline VAULT_MASTER_KEY, ADMIN_TOKEN and the passwords in DATABASE_URL and SMTP_URL went into a
 * toolchain that runs compilers and fetches third-party code (as the dev server's environment keeps
 * them out: embedded/temporal.ts).
 */
const GO_ENV =
  /^(GO[A-Z0-9]+|GO_EXTLINK_ENABLED|CGO_[A-Z0-9_]+|CC|CXX|AR|PKG_CONFIG[A-Z_]*|PATH|LD_LIBRARY_PATH|HOME|USER|TMPDIR|XDG_CACHE_HOME|XDG_CONFIG_HOME|NETRC|SSL_CERT_FILE|SSL_CERT_DIR|(HTTP|HTTPS|NO|ALL)_PROXY|(http|https|no|all)_proxy|GIT_[A-Z0-9_]+|SSH_AUTH_SOCK|LANG|LANGUAGE|LC_[A-Z]+|TZ)$/;

export function goEnv(): NodeJS.ProcessEnv {
  return envNamed(GO_ENV);
}

function which(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(dir, name);
    if (dir && isExecutable(candidate)) return candidate;
  }
  return undefined;
}

function isExecutable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}
