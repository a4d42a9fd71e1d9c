import path from 'node:path';
import { Client } from '@temporalio/client';
import { DEFAULT_MAX_OPEN_ROTATIONS } from '../activities/batch';
import { startChild } from '../embedded/child';
import type { rotateBatch } from '../workflows/batch';
import { ROOT, type Stack } from './stack';
import type { noopRotation } from './noop-workflow';

export interface RotationResult {
  rotations: number;
  rotated: number;
  failed: number;
  seconds: number;
  perSecond: number;
  /** Activities one rotation ran (counted in a real rotation's history); the baseline runs as many. */
  activitiesPerRotation: number;
  webhookEvents: number;
  baseline: { workflows: number; activitiesPerWorkflow: number; seconds: number; perSecond: number };
  ratio: number;
}

type Api = (method: string, route: string, body?: unknown) => Promise<{ status: number; body: any }>;

/**
 * A batch of `count` rotations through the public API (POST /v1/rotations → rotateBatch → one
 * rotateCredential each: generated provider, one webhook dependent on a local sink, no grace
 * period), timed from the request until the batch workflow has every outcome. Then the baseline on
 * the same Temporal server: as many no-op workflows with as many activities, at most as many open at
 * once as the batch keeps (DEFAULT_MAX_OPEN_ROTATIONS; before, all were started at once: a thousand
 * open where the batch keeps fifty), on a worker process of their own, which starts
 * (and bundles its workflow) while the batch's credentials are stored, before anything is timed. `baselineWorkflows` below `count` runs fewer, for quick
 * runs only: the server slows as a run goes on, so 400 ran 1.1–1.2 times as fast as 1,000 beside
 * them (bench/FINDINGS.md) and a shorter baseline makes the ratio err low.
 */
export async function measureRotation(
  api: Api,
  client: Client,
  stack: Stack,
  opts: { count: number; baselineWorkflows: number; sinkUrl: string; webhookEvents: () => number; onPhase?: (phase: 'rotation' | 'baseline' | 'done') => void },
): Promise<RotationResult> {
  const baselineWorker = startBaselineWorker(stack);
  let result: RotationResult;
  try {
    result = await measureBoth(api, client, stack, opts, baselineWorker);
  } finally {
    await baselineWorker.worker.stop('SIGTERM', 20_000);
  }
  // After the worker's stop, which the baseline's phase counts as before.
  opts.onPhase?.('done');
  return result;
}

async function measureBoth(
  api: Api,
  client: Client,
  stack: Stack,
  opts: Parameters<typeof measureRotation>[3],
  baselineWorker: ReturnType<typeof startBaselineWorker>,
): Promise<RotationResult> {
  const names = Array.from({ length: opts.count }, (_, i) => `rotate-${i}`);
  // The baseline's client has no payload codec: its floor is the server and the SDK alone (stricter than the rotation's setting).
  const plainClient = new Client({ connection: client.connection, namespace: 'default' });
  const ready = waitForPoller(plainClient, baselineWorker.taskQueue, () => baselineWorker.worker.isRunning(), () => baselineWorker.worker.logTail(20));
  ready.catch(() => undefined); // awaited below; a failed set-up must not leave it unhandled
  await parallel(names, 16, async (name) => {
    const res = await api('POST', '/v1/vault.store', {
      name,
      kind: 'api_key',
      value: `sk_bench_${name}_${Math.random().toString(36).slice(2)}xxxxxxxx`,
      rotation: { provider: 'generated', settings: { length: 40, prefix: 'sk_' }, periodDays: 90, graceHours: 0 },
      dependents: [{ type: 'webhook', settings: { url: opts.sinkUrl, signingKeyCredential: 'bench-webhook-key' } }],
    });
    if (res.status !== 201) throw new Error(`storing ${name} failed: ${res.status} ${JSON.stringify(res.body)}`);
  });
  await ready;

  opts.onPhase?.('rotation');
  const started = performance.now();
  const res = await api('POST', '/v1/rotations', { credentials: names, reason: 'benchmark' });
  if (res.status !== 202) throw new Error(`starting the rotation batch failed: ${res.status} ${JSON.stringify(res.body)}`);
  const outcome = await within(client.workflow.getHandle<typeof rotateBatch>(res.body.batchWorkflowId).result(), 900, 'the rotation batch');
  const seconds = (performance.now() - started) / 1000;

  const history = await client.workflow.getHandle(res.body.workflowIds[0]).fetchHistory();
  const activities = (history.events ?? []).filter((e) => e.activityTaskScheduledEventAttributes).length;

  opts.onPhase?.('baseline');
  const baseline = await measureBaseline(plainClient, baselineWorker, opts.baselineWorkflows, activities);
  const perSecond = outcome.rotated / seconds;
  return {
    rotations: opts.count,
    rotated: outcome.rotated,
    failed: outcome.failed,
    seconds,
    perSecond,
    activitiesPerRotation: activities,
    webhookEvents: opts.webhookEvents(),
    baseline,
    ratio: perSecond / baseline.perSecond,
  };
}

function startBaselineWorker(stack: Stack) {
  const taskQueue = `${stack.taskQueue}-noop`;
  const worker = startChild(process.execPath, ['--import', import.meta.resolve('tsx'), path.join(ROOT, 'bench/noop-worker.ts')], {
    logFile: path.join(stack.dir, 'logs', 'noop-worker.log'),
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', TEMPORAL_ADDRESS: stack.temporalAddress, TASK_QUEUE: taskQueue },
  });
  return { taskQueue, worker };
}

async function measureBaseline(
  client: Client,
  { taskQueue, worker }: ReturnType<typeof startBaselineWorker>,
  count: number,
  activities: number,
): Promise<RotationResult['baseline']> {
  if (!worker.isRunning()) throw new Error(`the baseline's worker exited during the rotation batch:\n${worker.logTail(20)}`);
  // A worker that dies now fails the baseline at once, not after the 900 s wait.
  const died = worker.exited.then((code) => Promise.reject(new Error(`the baseline's worker exited (code ${code}):\n${worker.logTail(20)}`)));
  died.catch(() => undefined);
  const prefix = `bench-noop-${Date.now()}`;
  const started = performance.now();
  // As many open at once as the batch keeps (its default): the same shape of load on the server.
  const runs = parallel(
    Array.from({ length: count }, (_, i) => i),
    DEFAULT_MAX_OPEN_ROTATIONS,
    async (i) => {
      const handle = await client.workflow.start<typeof noopRotation>('noopRotation', { taskQueue, workflowId: `${prefix}-${i}`, args: [{ activities }] });
      await handle.result();
    },
  );
  await within(Promise.race([runs, died]), 900, 'the baseline workflows');
  const seconds = (performance.now() - started) / 1000;
  return { workflows: count, activitiesPerWorkflow: activities, seconds, perSecond: count / seconds };
}

/** A worker is ready once it polls its task queue. */
export async function waitForPoller(client: Client, taskQueue: string, alive: () => boolean, log: () => string): Promise<void> {
  const deadline = Date.now() + 180_000;
  for (;;) {
    if ((await pollers(client, taskQueue)) > 0) return;
    if (!alive()) throw new Error(`the worker for ${taskQueue} exited:\n${log()}`);
    if (Date.now() > deadline) throw new Error(`no worker polled ${taskQueue} within 180 s:\n${log()}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

export async function parallel<T>(items: T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, items.length) }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

/** How many workers poll the workflow side of a task queue. */
export async function pollers(client: Client, taskQueue: string): Promise<number> {
  const { pollers } = await client.workflowService.describeTaskQueue({ namespace: 'default', taskQueue: { name: taskQueue }, taskQueueType: 1 });
  return pollers?.length ?? 0;
}

/** Fails a phase that does not finish, instead of letting the benchmark hang. */
async function within<T>(promise: Promise<T>, seconds: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} did not finish within ${seconds} s`)), seconds * 1000);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
