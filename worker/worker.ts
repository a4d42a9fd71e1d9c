import type { DataConverter } from '@temporalio/common';
import { DefaultLogger, NativeConnection, Runtime, Worker, type ActivityInterceptorsFactory } from '@temporalio/worker';
import type { Logger } from '../core/logger';
import { createActivities, type ActivityDeps } from '../activities';
import { waitsQueue } from '../workflows/options';
import { bundleInChild } from './bundle';

/**
 * The service's worker: the rotations' task queue (workflows and activities), and beside it the
 * queue of the batches' and sweeps' waits for their outcomes (waitsQueue), polled by a second,
 * activity-only worker on the same connection. A wait lasts as long as its batch; on the first
 * queue a hundred of them held every activity slot, and the rotations they waited for could not
 * run a step (BATCH_WAITS_APART). Its slots hold nothing else, so a wait never stops a rotation.
 * Run and stopped as one: either stopping (or failing) stops the other.
 */
export interface ServiceWorker {
  run(): Promise<void>;
  shutdown(): void;
  getState(): ReturnType<Worker['getState']>;
}

/** Batches and sweeps waiting at once, each for its own runs; beyond it a wait queues for a slot (its runs go on meanwhile). */
export const BATCH_WAIT_SLOTS = 500;

/** Builds the worker for the mailgent task queue; the caller owns `connection` and runs/stops the worker. */
export async function createWorker(opts: {
  connection: NativeConnection;
  namespace: string;
  taskQueue: string;
  deps: ActivityDeps;
  /** The deployment's data converter (payload encryption); see vault/payload-codec.ts. */
  dataConverter: DataConverter;
  /** A prebuilt bundle (tests build it once); otherwise the workflows are bundled now. */
  workflowBundle?: { codePath: string };
  /**
   * On shutdown, how long running activities may go on before they are cancelled (heartbeating
   * ones see the cancellation); the worker gives up 10 s after that.
   */
  shutdownGraceMs?: number;
  /** Workflows kept in memory between tasks; others are replayed from history when they next run. */
  maxCachedWorkflows?: number;
  /** Around every activity this worker runs (the tests hold one at a chosen moment). */
  activityInterceptors?: ActivityInterceptorsFactory[];
  /** Activities the rotations' queue runs at once (the SDK's default, 100, unless set; tests set fewer). */
  activitySlots?: number;
}): Promise<ServiceWorker> {
  const activities = createActivities(opts.deps);
  const shared = {
    connection: opts.connection,
    namespace: opts.namespace,
    ...(opts.shutdownGraceMs !== undefined ? { shutdownGraceTime: opts.shutdownGraceMs, shutdownForceTime: opts.shutdownGraceMs + 10_000 } : {}),
    dataConverter: opts.dataConverter,
    ...(opts.activityInterceptors ? { interceptors: { activity: opts.activityInterceptors } } : {}),
  };
  // Bundled in a child process unless prebuilt, so webpack's memory is not the worker's for life.
  const bundle = opts.workflowBundle ? undefined : await bundleInChild();
  let main: Worker;
  try {
    main = await Worker.create({
      ...shared,
      taskQueue: opts.taskQueue,
      activities,
      // The SDK's default grows with the heap limit (over 2,000 on a 4 GB heap): bounded, memory is too.
      maxCachedWorkflows: opts.maxCachedWorkflows ?? DEFAULT_CACHED_WORKFLOWS,
      workflowBundle: opts.workflowBundle ?? { codePath: bundle!.codePath },
      ...(opts.activitySlots !== undefined ? { maxConcurrentActivityTaskExecutions: opts.activitySlots } : {}),
    });
  } finally {
    bundle?.remove();
  }
  let waits: Worker;
  try {
    waits = await Worker.create({
      ...shared,
      taskQueue: waitsQueue(opts.taskQueue),
      activities: { awaitOutcomes: activities.awaitOutcomes },
      maxConcurrentActivityTaskExecutions: BATCH_WAIT_SLOTS,
    });
  } catch (err) {
    // The first worker holds the connection until it has run: run and stopped at once, so the
    // caller can close the connection (closing it while a worker holds it throws).
    const ran = main.run();
    main.shutdown();
    await ran.catch(() => undefined);
    throw err;
  }
  const both = [main, waits];
  const service: ServiceWorker = {
    async run() {
      const runs = both.map((w) => w.run());
      // Whichever ends first (stopped, or failed), the other is stopped with it: half a worker would
      // run rotations whose batches never hear of them, or waits for rotations nothing runs.
      for (const run of runs) {
        run.then(
          () => service.shutdown(),
          () => service.shutdown(),
        );
      }
      const settled = await Promise.allSettled(runs);
      const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
    },
    shutdown() {
      for (const w of both) if (w.getState() === 'RUNNING') w.shutdown();
    },
    getState() {
      return main.getState();
    },
  };
  return service;
}

export const DEFAULT_CACHED_WORKFLOWS = 100;

/** Routes the Temporal SDK's own logs (bundling, worker state) into our logger, warnings and up. */
export function installTemporalLogging(logger: Logger, level: 'WARN' | 'INFO' | 'ERROR' = 'WARN'): void {
  Runtime.install({
    // The process's signals are serve's to handle (SIGINT and SIGTERM: a graceful stop of the whole
    // process). The SDK's default set, which adds SIGQUIT and SIGUSR2, shut the worker down on its
    // own at those, and left the API serving with no worker to run rotations or deliver mail.
    shutdownSignals: [],
    logger: new DefaultLogger(level, ({ level: l, message, meta }) => {
      const method = l === 'ERROR' ? 'error' : l === 'WARN' ? 'warn' : l === 'INFO' ? 'info' : 'debug';
      logger[method]({ temporal: meta }, message);
    }),
  });
}
