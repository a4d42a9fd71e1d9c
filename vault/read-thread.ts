import { Worker } from 'node:worker_threads';
import * as errors from '../core/errors';
import { AppError, unconfirmedChange, UnavailableError } from '../core/errors';
import type { Logger } from '../core/logger';
import { isAudited, markAudited } from './audit';
import type { Caller, CredentialRef, StoredVersion, StoreInput } from './types';

/**
 * The API's audited reads (vault.get, its masked form, vault.totp) and its stores run in a worker
 * thread of their own: a `Vault` there, with its own small pool, runs the read batches of
 * read-batch.ts (the read statement, the decryptions, each call's outcome and the audit append) and
 * the store batches of store-batch.ts (the locks, the sealing, the inserts and the audit rows). The
 * main thread only parses requests and writes answers. Why: a read batch is two round trips and a
 * store batch four, and on the main thread each waited for a turn of an event loop busy with HTTP;
 * in the thread they are answered at once (on 2 cores: vault.get ~+20% req/s under steady load,
 * ~+0.05 of the HTTP floor in the bench's 2-second slices; a store batch of 16 took 7–9 ms on the
 * main thread; ~20 MB more RSS; see the README's benchmark notes).
 *
 * Nothing changes for callers: the same scoping, the same audit rows (written in the thread, before a
 * value is handed back), the same errors (rebuilt here with their class, and their audited mark so
 * the API does not write them twice). If the thread dies, its calls fail with a 503 that is not
 * marked audited (the API writes their failure rows; a store's 503 says it may have been committed,
 * as when a process dies after its commit) and the next call starts a new thread (at
 * once; after a thread that could not start, calls fail for a second before the next try). On close,
 * the calls already sent finish and are answered before the thread's pool ends.
 *
 * The thread reads the wall clock (a clock function cannot cross threads), so services built with a
 * clock of their own (tests) keep their reads on the calling thread.
 */

export type ReadOp = 'get' | 'masked' | 'totp';

export type ReadCall =
  | { id: number; op: ReadOp; caller: Caller; ref: CredentialRef; version?: number; detail?: Record<string, unknown> }
  | { id: number; op: 'store'; caller: Caller; input: StoreInput }
  | { id: number; op: 'ping' };

export type ReadReply = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: SentError };

export interface BatchStats {
  batches: number;
  calls: number;
}

/** The thread's read batches, and its store batches with those that rolled back. */
export interface ThreadStats {
  reads: BatchStats;
  stores: BatchStats & { fallbacks: number };
}

const NO_STATS: ThreadStats = { reads: { batches: 0, calls: 0 }, stores: { batches: 0, calls: 0, fallbacks: 0 } };

/** Messages from the thread. */
export type FromThread =
  | { type: 'ready' }
  | { type: 'replies'; replies: ReadReply[]; stats: ThreadStats }
  | { type: 'log'; msg: string; err?: SentError };

/** Messages to the thread. */
export type ToThread = { type: 'calls'; calls: ReadCall[] } | { type: 'close' };

/**
 * How long a vault thread's statement may go unanswered (PostgreSQL reachable but silent) before the
 * calls waiting on it fail with a 503: far above any batch's time (milliseconds, tens under load).
 */
export const VAULT_QUERY_TIMEOUT_MS = 10_000;

export interface ReadThreadData {
  databaseUrl: string;
  poolSize: number;
  /** VAULT_MASTER_KEY as given (a file keyring is re-read by the thread as `rekey` changes it). */
  keyringSetting: string;
  /** GCM encryptions per data key before a new one takes over (DATA_KEY_MAX_ENCRYPTIONS), for stores. */
  maxEncryptionsPerKey?: number;
}

/** An error as it crosses the thread boundary: its class by name, its message and own fields. */
export interface SentError {
  name: string;
  message: string;
  fields: Record<string, unknown>;
  audited: boolean;
  cause?: SentError;
}

export function sendError(err: unknown): SentError {
  const e = (typeof err === 'object' && err !== null ? err : { message: String(err) }) as Error & Record<string, unknown>;
  const fields: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(e)) {
    if (k === 'cause' || k === 'stack' || k === 'name' || k === 'message') continue;
    // Only data crosses (a pg error's code and position, an AppError's status and extra …).
    if (v === null || ['string', 'number', 'boolean'].includes(typeof v)) fields[k] = v;
    else if (typeof v === 'object' && !Array.isArray(v) && Object.getPrototypeOf(v) !== Object.prototype) continue;
    else {
      try {
        fields[k] = JSON.parse(JSON.stringify(v));
      } catch {
        // not data; left behind
      }
    }
  }
  return {
    name: typeof e.name === 'string' ? e.name : 'Error',
    message: typeof e.message === 'string' ? e.message : '',
    fields,
    audited: isAudited(err),
    ...(e.cause !== undefined ? { cause: sendError(e.cause) } : {}),
  };
}

/**
 * Why a call the thread did not answer failed. A thread that never said it was ready ran nothing; a
 * store the thread had committed before it stopped stays stored, as when a process dies after its commit.
 */
function unansweredReason(store: boolean, ran: boolean): string {
  if (!ran) return `the vault ${store ? 'store' : 'read'} could not start; try again`;
  if (!store) return 'the vault read could not finish; try again';
  return 'the store could not be confirmed: it may have been committed before the vault thread stopped; read the credential (or store with expectedVersion) before trying again';
}

const APP_ERRORS = new Map<string, { prototype: AppError }>(
  Object.values(errors)
    .filter((c): c is typeof AppError => typeof c === 'function' && (c === AppError || c.prototype instanceof AppError))
    .map((c) => [c.name, c]),
);

/** The error the calling thread throws: the same class (for AppErrors), message, fields and audited mark. */
export function receiveError(sent: SentError): Error {
  const f = sent.fields;
  let err: Error;
  if (typeof f.status === 'number' && typeof f.slug === 'string') {
    err = new AppError(f.status, f.slug as errors.ProblemSlug, String(f.title ?? ''), sent.message, (f.extra as Record<string, unknown>) ?? {});
    Object.setPrototypeOf(err, APP_ERRORS.get(sent.name)?.prototype ?? AppError.prototype);
  } else {
    err = new Error(sent.message);
  }
  Object.assign(err, f);
  err.name = sent.name;
  if (sent.cause) (err as Error & { cause?: unknown }).cause = receiveError(sent.cause);
  return sent.audited ? markAudited(err) : err;
}

/**
 * The thread's heap. Unbounded, V8 sizes a thread's heap for the machine's memory and lets it grow
 * well past what the thread needs (~20 MB after start). The young generation is 8 MB: at 4 MB a
 * batch's objects outlived it often enough to fill the old generation several times a second, and
 * in paired runs on 2 cores (the same stack, APIs interleaved) 8 MB gave vault.get +10% and
 * vault.totp +5% req/s for ~6 MB more peak RSS (16 MB gave no more). A thread that outgrew 96 MB
 * would be stopped, its calls failed with a 503, and a new one started.
 */
const THREAD_HEAP = { maxYoungGenerationSizeMb: 8, maxOldGenerationSizeMb: 96 };

/** After a start that failed, calls fail at once for this long before the next start is tried. */
const RESTART_DELAY_MS = 1_000;
/** How long close() waits for the thread to answer its last calls and end its pool. */
const CLOSE_TIMEOUT_MS = 15_000;

interface Pending {
  store: boolean;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

export class ReadThread {
  private worker?: Worker;
  private starting?: Promise<void>;
  private pending = new Map<number, Pending>();
  private outbox: ReadCall[] = [];
  private nextId = 0;
  /** Stats of threads that have ended, and of the current one as last reported. */
  private ended: ThreadStats = NO_STATS;
  private current: ThreadStats = NO_STATS;
  /** performance.now() of the last start that failed (a wall-clock step must not stall reads). */
  private failedAt = -Infinity;
  private closed = false;
  /** The thread that said it was ready (it runs calls only after that). */
  private ready?: Worker;
  private closing?: Promise<void>;

  constructor(
    private readonly data: ReadThreadData,
    private readonly logger?: Pick<Logger, 'warn' | 'error'>,
  ) {}

  /** Starts the thread (calls also start it); rejects if it cannot start, with the thread's own error. */
  start(): Promise<void> {
    if (this.closed) return Promise.reject(new UnavailableError('the service is shutting down'));
    if (this.worker) return this.starting ?? Promise.resolve();
    let worker: Worker;
    try {
      worker = new Worker(new URL('./read-thread-entry.cjs', import.meta.url), {
        workerData: this.data,
        // The process's own flags (a --cpu-prof, a loader) are not all valid for a thread.
        execArgv: [],
        resourceLimits: THREAD_HEAP,
      });
    } catch (err) {
      this.failedAt = performance.now();
      return Promise.reject(err);
    }
    // The thread keeps the process alive until close(), as the pool's connections do.
    this.worker = worker;
    this.current = NO_STATS;
    this.starting = new Promise<void>((resolve, reject) => {
      worker.on('message', (m: FromThread) => {
        if (m.type === 'ready') {
          this.ready = worker;
          resolve();
        }
        else if (m.type === 'replies') this.answer(m);
        else if (m.type === 'log') this.logger?.warn({ err: m.err && receiveError(m.err) }, m.msg);
      });
      worker.on('error', (err) => {
        this.logger?.error({ err }, 'the vault thread failed');
        reject(err);
      });
      worker.on('exit', (code) => {
        reject(new Error(`the vault thread exited with code ${code} before it was ready`));
        this.gone(worker, code);
      });
    });
    this.starting.then(
      () => (this.starting = undefined),
      () => (this.failedAt = performance.now()),
    );
    return this.starting;
  }

  call<T>(op: ReadOp, caller: Caller, ref: CredentialRef, version?: number, detail?: Record<string, unknown>): Promise<T> {
    return this.send<T>((id) => ({ id, op, caller, ref, version, detail }));
  }

  store(caller: Caller, input: StoreInput): Promise<StoredVersion> {
    return this.send<StoredVersion>((id) => ({ id, op: 'store', caller, input }));
  }

  /**
   * Readiness (/readyz): the thread answers, behind the calls already sent to it, and its own pool
   * reaches the database. Fails as a call would: the thread restarting, closed, or its pool down.
   */
  ping(): Promise<void> {
    return this.send<void>((id) => ({ id, op: 'ping' }));
  }

  private send<T>(call: (id: number) => ReadCall): Promise<T> {
    if (this.closed) return Promise.reject(new UnavailableError('the service is shutting down'));
    if (performance.now() - this.failedAt < RESTART_DELAY_MS) return Promise.reject(new UnavailableError('the vault thread is restarting; try again shortly'));
    if (!this.worker) this.start().catch(() => undefined); // its failure fails the calls sent to it
    const id = this.nextId++;
    const made = call(id);
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { store: made.op === 'store', resolve: resolve as (v: unknown) => void, reject });
      // Calls made in the same turn cross in one message.
      if (this.outbox.length === 0) queueMicrotask(() => this.flush());
      this.outbox.push(made);
    });
  }

  /** Read batches of this thread and of those before it. */
  stats(): BatchStats {
    return this.totals().reads;
  }

  /** Store batches of this thread and of those before it. */
  storeStats(): ThreadStats['stores'] {
    return this.totals().stores;
  }

  private totals(): ThreadStats {
    const [e, c] = [this.ended, this.current];
    return {
      reads: { batches: e.reads.batches + c.reads.batches, calls: e.reads.calls + c.reads.calls },
      stores: { batches: e.stores.batches + c.stores.batches, calls: e.stores.calls + c.stores.calls, fallbacks: e.stores.fallbacks + c.stores.fallbacks },
    };
  }

  /** Lets the calls already made finish and be answered, then ends the thread and its pool. */
  close(): Promise<void> {
    this.closing ??= this.end();
    return this.closing;
  }

  private async end(): Promise<void> {
    this.closed = true;
    const worker = this.worker;
    if (!worker) return;
    this.flush();
    const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    worker.postMessage({ type: 'close' } satisfies ToThread);
    const timer = setTimeout(() => {
      this.logger?.warn({ timeoutSeconds: CLOSE_TIMEOUT_MS / 1000 }, 'the vault thread did not finish in time; stopping it');
      void worker.terminate();
    }, CLOSE_TIMEOUT_MS);
    await exited;
    clearTimeout(timer);
  }

  private flush(): void {
    if (this.outbox.length === 0) return;
    const calls = this.outbox;
    this.outbox = [];
    if (!this.worker) {
      for (const c of calls) this.fail(c.id, new UnavailableError(unansweredReason(c.op === 'store', false)));
      return;
    }
    try {
      this.worker.postMessage({ type: 'calls', calls } satisfies ToThread);
    } catch {
      // A call holding something that cannot cross (a function in its detail): it alone fails, and
      // its error does not quote it (the clone error would).
      for (const c of calls) {
        try {
          this.worker.postMessage({ type: 'calls', calls: [c] } satisfies ToThread);
        } catch {
          this.fail(c.id, new TypeError(`the ${c.op === 'store' ? 'store' : 'read'} request holds a value that cannot be passed to the vault thread`));
        }
      }
    }
  }

  private fail(id: number, err: Error): void {
    this.pending.get(id)?.reject(err);
    this.pending.delete(id);
  }

  private answer(m: Extract<FromThread, { type: 'replies' }>): void {
    this.current = m.stats;
    for (const r of m.replies) {
      const p = this.pending.get(r.id);
      if (!p) continue;
      this.pending.delete(r.id);
      if (r.ok) p.resolve(r.value);
      else p.reject(receiveError(r.error));
    }
  }

  /** The thread ended: what it had not answered fails (unaudited: the caller writes the failure). */
  private gone(worker: Worker, code: number): void {
    if (this.worker !== worker) return;
    this.worker = undefined;
    this.starting = undefined;
    this.ended = this.totals();
    this.current = NO_STATS;
    if (!this.closed) {
      this.logger?.error({ exitCode: code, unanswered: this.pending.size }, 'the vault thread stopped; the next call starts a new one');
    }
    const unanswered = [...this.pending.values()];
    this.pending.clear();
    const ran = this.ready === worker;
    for (const p of unanswered) {
      const reason = unansweredReason(p.store, ran);
      p.reject(p.store && ran ? unconfirmedChange(reason) : new UnavailableError(reason));
    }
  }
}
