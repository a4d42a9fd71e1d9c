import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

/**
 * A server process this process owns. On Linux it is started through `setpriv --pdeathsig`, so
 * it is stopped by the kernel even if this process is SIGKILLed and cannot clean up. It runs in
 * its own process group, so a signal meant for this process's group does not stop it early.
 */
export interface Child {
  pid: number;
  exited: Promise<number | null>;
  isRunning(): boolean;
  stop(signal?: NodeJS.Signals, graceMs?: number): Promise<void>;
  logTail(lines?: number): string;
  /** Resolves once everything the process wrote is in its log file (after it exited). */
  logWritten: Promise<void>;
}

const SETPRIV = '/usr/bin/setpriv';

/** The variables of this process's environment whose names match `names`: what a helper process is given of it. */
export function envNamed(names: RegExp): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => names.test(name)));
}

export function startChild(
  command: string,
  args: string[],
  opts: { logFile: string; uid?: number; gid?: number; deathSignal?: 'TERM' | 'INT'; env?: NodeJS.ProcessEnv },
): Child {
  mkdirSync(path.dirname(opts.logFile), { recursive: true });
  const log = createWriteStream(opts.logFile, { flags: 'a' });
  const wrapped = process.platform === 'linux' && existsSync(SETPRIV);
  const proc: ChildProcess = spawn(
    wrapped ? SETPRIV : command,
    wrapped ? [`--pdeathsig=${opts.deathSignal ?? 'TERM'}`, '--', command, ...args] : args,
    // A process group of its own: Ctrl-C (or a supervisor signalling the whole group) reaches only
    // this process, which stops the server once what depends on it has drained. The death signal
    // still stops the server if this process dies without doing so.
    { uid: opts.uid, gid: opts.gid, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true },
  );
  proc.stdout?.pipe(log, { end: false });
  proc.stderr?.pipe(log, { end: false });
  let code: number | null | undefined;
  const exited = new Promise<number | null>((resolve) => {
    proc.on('error', (err) => {
      log.write(`failed to start ${command}: ${err.message}\n`);
      code = null;
      resolve(null);
    });
    proc.on('exit', (c) => {
      code = c;
      resolve(c);
    });
  });
  // The log ends once the child's output has all arrived: 'close' comes after its stdout and stderr
  // are done, whereas 'exit' can come first, and output written to an ended log would be an error
  // (uncaught: this process would exit 1). Seen under load when a start-up was stopped early.
  proc.once('close', () => log.end());
  const logWritten = new Promise<void>((resolve) => log.once('close', () => resolve()));
  return {
    pid: proc.pid ?? -1,
    exited,
    isRunning: () => code === undefined,
    async stop(signal = 'SIGTERM', graceMs = 20_000) {
      if (code !== undefined) return;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    },
    logWritten,
    logTail(lines = 20) {
      try {
        return readFileSync(opts.logFile, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
      } catch {
        return '';
      }
    },
  };
}

/**
 * Polls `probe` until it resolves, the child exits, or the time runs out: `timeoutMs`; longer (up to `patience.maxMs`) while its
 * answer says it is still starting (`patience.starting`: PostgreSQL replaying its WAL after a crash
 * answers "the database system is starting up"). Killed after a fixed minute, a long recovery was
 * begun again at every start and never finished: the service never started.
 */
export async function waitUntilReady(
  child: Child,
  what: string,
  probe: () => Promise<unknown>,
  timeoutMs = 60_000,
  patience?: { starting: (err: unknown) => boolean; maxMs: number },
): Promise<void> {
  const startedAt = Date.now();
  let deadline = startedAt + timeoutMs;
  let lastError: unknown;
  while (Date.now() < deadline) {
    if (!child.isRunning()) {
      // Its last words (why it stopped) may still be on their way to the file.
      await Promise.race([child.logWritten, new Promise((r) => setTimeout(r, 2_000).unref())]);
      throw new Error(`${what} exited during start-up. Last log lines:\n${child.logTail()}`);
    }
    try {
      await probe();
      return;
    } catch (err) {
      lastError = err;
      if (patience?.starting(err)) deadline = Math.max(deadline, Math.min(Date.now() + timeoutMs, startedAt + patience.maxMs));
      await new Promise((r) => setTimeout(r, 150));
    }
  }
  await child.stop('SIGKILL');
  throw new Error(`${what} was not ready after ${Math.round((Date.now() - startedAt) / 1000)}s (${(lastError as Error)?.message}). Last log lines:\n${child.logTail()}`);
}

/** Whether a process with this pid exists (one of another user's counts: EPERM). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** When a process started (clock ticks after boot: /proc/<pid>/stat's 22nd field); undefined without /proc. */
export function startTimeOf(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/**
 * Whether the process that recorded `pid` and its start time (`started`; undefined or `-` when it
 * could not tell) is still running: alive, and not another process given the pid since (its start
 * time differs). An unknown start time, then or now, counts as the same process.
 */
export function stillRunning(pid: number, started: string | undefined): boolean {
  if (!isAlive(pid)) return false;
  const now = startTimeOf(pid);
  return started === undefined || started === '-' || now === undefined || now === started;
}
