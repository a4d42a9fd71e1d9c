import { WorkflowNotFoundError, type Client, type WorkflowExecutionDescription, type WorkflowHandle } from '@temporalio/client';
import type { temporal } from '@temporalio/proto';

/**
 * HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT. A type-only import: @temporalio/proto is CommonJS, and Node's
 * own ESM loader (the service runs without a bundler) finds no named export `temporal` in it.
 */
const CLOSE_EVENT = 2 as temporal.api.enums.v1.HistoryEventFilterType;

/** Far more continue-as-new hops than one rotation makes (each is another leak answered). */
const MAX_HOPS = 100;

/**
 * The run a recorded run id has become, and its status (null once the server no longer keeps it):
 * a rotation records the run its batch (or leak report) started, and that run may continue as new
 * (a leak reported during it, a leaked value it made). Follows each run that continued as new, by
 * its close event (not its whole history), to the run it continued as.
 */
export async function latestRunOf(client: Client, workflowId: string, runId: string): Promise<{ handle: WorkflowHandle; runId: string; status: string | null }> {
  let current = runId;
  for (let hop = 0; ; hop++) {
    const handle = client.workflow.getHandle(workflowId, current);
    const status = await statusOf(handle);
    if (status === null) return { handle, runId: current, status };
    if (status !== 'CONTINUED_AS_NEW' || hop === MAX_HOPS) return { handle, runId: current, status };
    const { history } = await client.workflowService.getWorkflowExecutionHistory({
      namespace: client.options.namespace,
      execution: { workflowId, runId: current },
      historyEventFilterType: CLOSE_EVENT,
    });
    const next = history?.events?.at(-1)?.workflowExecutionContinuedAsNewEventAttributes?.newExecutionRunId;
    if (!next) return { handle, runId: current, status };
    current = next;
  }
}

/** A run's status on the Temporal server, or null once the server no longer has it (its retention ended). */
export async function statusOf(handle: WorkflowHandle): Promise<string | null> {
  return (await describeIfKept(handle))?.status.name ?? null;
}

/** A run's (or a workflow's latest run's) description, or undefined when the server has none. */
export async function describeIfKept(handle: WorkflowHandle): Promise<WorkflowExecutionDescription | undefined> {
  try {
    return await handle.describe();
  } catch (err) {
    if (err instanceof WorkflowNotFoundError) return undefined;
    throw err;
  }
}

/**
 * The run a batch's start made, if the server has it: a start that a wave sent and did not record
 * (its attempt died between the two) reached the server only if a run of the workflow carries the
 * batch in its memo (every start does; a leak's or another batch's run of the credential is
 * theirs). Its first run's id, under which it records its outcome whatever runs it continued as;
 * undefined when there is none of the batch's. The newest run is asked first (strongly consistent,
 * and the batch's in all but rare cases); when it is another's, the batch's may have ended before
 * it began, and the workflow's runs are listed (visibility: the batch's run, started before the
 * newest, is listed by then). Read as absent, the batch's run would be started a second time.
 */
export async function batchRunOf(client: Client, workflowId: string, rotationId: string): Promise<string | undefined> {
  const described = await describeIfKept(client.workflow.getHandle(workflowId));
  if (described === undefined) return undefined;
  if (described.memo?.rotationId === rotationId) return described.raw.workflowExecutionInfo?.firstRunId || described.runId;
  let first: { runId: string; startTime: number } | undefined;
  for await (const run of runsOf(client, workflowId)) {
    if (run.memo?.rotationId !== rotationId) continue;
    // Every run of its chain names the same first run; a server too old to say, the earliest of the batch's.
    const runId = run.raw.firstRunId || run.runId;
    const startTime = run.startTime.getTime();
    if (!first || startTime < first.startTime) first = { runId, startTime };
  }
  return first?.runId;
}

/**
 * The run a start sent with USE_EXISTING may have joined: the earliest run of the workflow (anyone's:
 * a leak's, another batch's) that was open at or after `since`, the moment the start was marked
 * sent. A batch's wave that joined another's run and died before recording it finds no run of its
 * own (batchRunOf) when it runs again; by then the run it joined may have ended, and a start sent
 * again would rotate the credential a second time. Runs of one workflow id never overlap, so when
 * the newest began before `since` no earlier one can have been open since. Undefined when no run
 * was open since (the start, if it reached the server at all, joined nothing).
 */
export async function runOpenSince(client: Client, workflowId: string, since: Date): Promise<string | undefined> {
  const described = await describeIfKept(client.workflow.getHandle(workflowId));
  if (described === undefined) return undefined;
  const openSince = (run: { closeTime?: Date }) => run.closeTime === undefined || run.closeTime.getTime() >= since.getTime();
  let earliest = openSince(described) ? { runId: described.runId, startTime: described.startTime.getTime() } : undefined;
  if (earliest === undefined || described.startTime.getTime() <= since.getTime()) return earliest?.runId;
  for await (const run of runsOf(client, workflowId)) {
    if (openSince(run) && run.startTime.getTime() < earliest.startTime) earliest = { runId: run.runId, startTime: run.startTime.getTime() };
  }
  return earliest.runId;
}

/** Every run of a workflow id the server lists (visibility: eventually consistent). */
function runsOf(client: Client, workflowId: string) {
  if (/["\\]/.test(workflowId)) throw new Error(`cannot list the runs of workflow id ${JSON.stringify(workflowId)}`);
  return client.workflow.list({ query: `WorkflowId = "${workflowId}"` });
}
