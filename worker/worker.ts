import type { DataConverter } from '@temporalio/common';
import { DefaultLogger, NativeConnection, Runtime, Worker, type ActivityInterceptorsFactory } from '@temporalio/worker';
import type { Logger } from '../core/logger';
import { createActivities, type ActivityDeps } from '../activities';
import { bundleInChild } from './bundle';

/** Builds a worker for the mailgent task queue; the caller owns `connection` and runs/stops the worker. */
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
}): Promise<Worker> {
  // Bundled in a child process unless prebuilt, so webpack's memory is not the worker's for life.
  const bundle = opts.workflowBundle ? undefined : await bundleInChild();
  try {
    return await Worker.create({
      connection: opts.connection,
      namespace: opts.namespace,
      taskQueue: opts.taskQueue,
      activities: createActivities(opts.deps),
      ...(opts.shutdownGraceMs !== undefined ? { shutdownGraceTime: opts.shutdownGraceMs, shutdownForceTime: opts.shutdownGraceMs + 10_000 } : {}),
      dataConverter: opts.dataConverter,
      // The SDK's default grows with the heap limit (over 2,000 on a 4 GB heap): bounded, memory is too.
      maxCachedWorkflows: opts.maxCachedWorkflows ?? DEFAULT_CACHED_WORKFLOWS,
      workflowBundle: opts.workflowBundle ?? { codePath: bundle!.codePath },
      ...(opts.activityInterceptors ? { interceptors: { activity: opts.activityInterceptors } } : {}),
    });
  } finally {
    bundle?.remove();
  }
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
