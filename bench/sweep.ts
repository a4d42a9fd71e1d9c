import { randomBytes } from 'node:crypto';
import type { Client } from '@temporalio/client';
import type { Pool } from '../db/pool';
import type { rotationSweep } from '../workflows/batch';
import { FAILED_RETRY_HOURS, SELECT_DUE_SQL } from '../activities/batch';

/** One sweep over the whole vault: its time, its runs (continue-as-new) and the plan of its selection query. */
export interface SweepResult {
  credentials: number;
  /** Due as the database counts them (next_rotation_at ≤ asOf): what the sweep must page through. */
  due: number;
  seconds: number;
  runs: number;
  historyEventsPerRun: number[];
  maxHistoryEventsPerRun: number;
  plan: { indexScan: boolean; seqScanOnCredentials: boolean; index: string | null; node: string; executionMs: number; rowsRead: number };
}

export async function measureSweep(
  client: Client,
  pool: Pool,
  opts: { taskQueue: string; credentials: number; pageSize: number },
): Promise<SweepResult> {
  const asOf = new Date().toISOString();
  const plan = await explainSelectDue(pool, asOf, opts.pageSize);
  const workflowId = `bench-sweep-${opts.credentials}-${randomBytes(3).toString('hex')}`;
  const started = performance.now();
  const handle = await client.workflow.start<typeof rotationSweep>('rotationSweep', {
    taskQueue: opts.taskQueue,
    workflowId,
    args: [{ asOf, pageSize: opts.pageSize }],
  });
  await handle.result();
  const seconds = (performance.now() - started) / 1000;

  // Follow the continue-as-new chain from the first run, counting each run's history.
  const historyEventsPerRun: number[] = [];
  let runId: string | undefined = handle.firstExecutionRunId;
  while (runId) {
    const history: { events?: { workflowExecutionContinuedAsNewEventAttributes?: { newExecutionRunId?: string | null } | null }[] | null } =
      await client.workflow.getHandle(workflowId, runId).fetchHistory();
    const events = history.events ?? [];
    historyEventsPerRun.push(events.length);
    runId = events.at(-1)?.workflowExecutionContinuedAsNewEventAttributes?.newExecutionRunId ?? undefined;
  }
  const due = Number(
    (await pool.query('SELECT count(*) AS n FROM credentials WHERE deleted_at IS NULL AND next_rotation_at <= $1', [asOf])).rows[0].n,
  );
  return {
    credentials: opts.credentials,
    due,
    seconds,
    runs: historyEventsPerRun.length,
    historyEventsPerRun,
    maxHistoryEventsPerRun: Math.max(...historyEventsPerRun),
    plan,
  };
}

export async function explainSelectDue(pool: Pool, asOf: string, limit: number): Promise<SweepResult['plan']> {
  const { rows } = await pool.query(`EXPLAIN (ANALYZE, FORMAT JSON) ${SELECT_DUE_SQL}`, [asOf, null, null, limit, FAILED_RETRY_HOURS]);
  const root = rows[0]['QUERY PLAN'][0];
  const nodes = planNodes(root.Plan);
  const onCredentials = nodes.filter((n) => n['Relation Name'] === 'credentials');
  // Index Scan / Index Only Scan name the relation; a Bitmap Index Scan names only its index.
  const scan = nodes.find((n) => /Index/.test(n['Node Type']) && String(n['Index Name'] ?? '').startsWith('credentials_'));
  return {
    indexScan: Boolean(scan),
    seqScanOnCredentials: onCredentials.some((n) => n['Node Type'] === 'Seq Scan'),
    index: scan?.['Index Name'] ?? null,
    node: scan?.['Node Type'] ?? onCredentials[0]?.['Node Type'] ?? 'none',
    executionMs: root['Execution Time'],
    rowsRead: onCredentials.reduce((sum, n) => sum + (n['Actual Rows'] ?? 0), 0),
  };
}

/** Every node of an EXPLAIN (FORMAT JSON) plan, the root first, each before its children. */
export function planNodes(plan: Record<string, any>): Record<string, any>[] {
  return [plan, ...(plan.Plans ?? []).flatMap((child: Record<string, any>) => planNodes(child))];
}
