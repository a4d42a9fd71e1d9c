import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Payload } from '@temporalio/common';
import { temporal } from '@temporalio/proto';
import { Worker } from '@temporalio/worker';
import { inject } from 'vitest';
import type { Harness } from './harness';
import { readMailbox } from './mail';
import { asBytes, rawHistoryText, sweep } from './sweep';

export { rawHistoryText };

type History = Awaited<ReturnType<ReturnType<Harness['client']['workflow']['getHandle']>['fetchHistory']>>;

/** A copy of a history with every payload decrypted by this deployment's codec. */
async function decodePayloads(h: Pick<Harness, 'services'>, history: unknown): Promise<unknown> {
  const codecs = [...(h.services.dataConverter.payloadCodecs ?? [])].reverse();
  const walk = async (node: unknown): Promise<unknown> => {
    if (node instanceof Uint8Array || node === null || typeof node !== 'object') return node;
    if (Array.isArray(node)) return Promise.all(node.map(walk));
    const record = node as Record<string, unknown>;
    if (record.metadata && typeof record.metadata === 'object' && record.data instanceof Uint8Array) {
      let payloads = [record as Payload];
      for (const codec of codecs) payloads = await codec.decode(payloads);
      return payloads[0];
    }
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(record)) out[k] = await walk(v);
    return out;
  };
  return walk(history);
}

/**
 * A history as text with every payload decrypted — what an operator with the key sees. Searching
 * this too proves values stay out of payloads, not just that the codec hides them.
 */
export async function decodedHistoryText(h: Pick<Harness, 'services'>, history: unknown): Promise<string> {
  return rawHistoryText(await decodePayloads(h, history));
}

type Recorded = Awaited<ReturnType<typeof histories>>;

async function histories(h: Harness): Promise<{ workflowId: string; runId: string; history: History }[]> {
  const out = [];
  for await (const wf of h.client.workflow.list({ query: `TaskQueue = '${h.taskQueue}'` })) {
    out.push({ workflowId: wf.workflowId, runId: wf.runId, history: await h.client.workflow.getHandle(wf.workflowId, wf.runId).fetchHistory() });
  }
  return out;
}

/**
 * Looks for every secret the test registered and every value stored in its database, raw and
 * base64/hex encoded, in everything that must never hold one: the service log and the logs of the
 * worker processes the file started, audit rows, the mail outbox, every delivered email, and the
 * full history (payloads decoded) of every workflow on this file's task queue.
 */
export async function findLeaks(h: Harness, recorded?: Recorded): Promise<string[]> {
  // Registered, so the run's sweep looks for them too once this file's database is gone.
  const known = new Set(h.secrets);
  h.secrets.push(...(await storedSecrets(h)).filter((value) => !known.has(value)));
  const places: [string, string][] = [['service log', readFileSync(h.logFile, 'utf8')]];
  // The logs of the worker processes the file started (test/support/worker-process.ts).
  const dir = path.dirname(h.logFile);
  for (const file of readdirSync(dir).filter((f) => /^worker-\d+\.log$/.test(f))) places.push([file, readFileSync(path.join(dir, file), 'utf8')]);
  const audit = await h.sql('SELECT * FROM audit_log');
  places.push(['audit_log', JSON.stringify(audit.rows)]);
  const outbox = await h.sql('SELECT * FROM mail_outbox');
  places.push(['mail_outbox', JSON.stringify(outbox.rows)]);
  for (const m of await readMailbox()) places.push([`email ${m.file}`, [m.raw, m.mail.subject, m.mail.text, m.mail.html].filter(Boolean).join('\n')]);
  for (const { workflowId, history } of recorded ?? (await histories(h))) {
    places.push([`history of ${workflowId}`, rawHistoryText(history)]);
    places.push([`decoded history of ${workflowId}`, await decodedHistoryText(h, history)]);
  }
  return sweep(h.secrets, places).hits;
}

/**
 * Replays every workflow history of this file's task queue against the current workflow code: a
 * change that would break running workflows (non-determinism) fails here. Returns the failures.
 */
export async function replayFailures(h: Harness, recorded?: Recorded): Promise<string[]> {
  recorded = (recorded ?? (await histories(h))).filter((r) => replayable(r.history));
  if (process.env.MAILGENT_RECORD_HISTORIES) await record(h, recorded, process.env.MAILGENT_RECORD_HISTORIES);
  const replay = (async () => {
    const failures: string[] = [];
    for await (const result of Worker.runReplayHistories({ workflowBundle: { codePath: inject('workflowBundlePath') }, dataConverter: h.services.dataConverter }, recorded)) {
      if (result.error) failures.push(`${result.workflowId}: ${result.error.message}`);
    }
    return failures;
  })();
  const limit = new Promise<never>((_, reject) => {
    setTimeout(() => reject(new Error(`replaying ${recorded.length} histories of ${h.taskQueue} did not finish in ${REPLAY_LIMIT_MS / 1000} s`)), REPLAY_LIMIT_MS).unref();
  });
  return Promise.race([replay, limit]);
}

/** Far more than replaying a test file's histories takes (a few seconds at most), far less than the hook timeout. */
const REPLAY_LIMIT_MS = 30_000;

/**
 * Whether a history holds anything to replay: the replayer checks the commands of completed
 * workflow tasks, so a run that has not completed one yet has none. Such a run is also one that
 * SDK 1.24's replayer never finishes when its history is the WorkflowExecutionStarted event alone
 * (a run just continued as new, fetched before the server added its first workflow task): it waits
 * for a task that the history will never bring. That hung a teardown for the hook's 600 s in CI.
 */
export function replayable(history: History): boolean {
  return (history.events ?? []).some((e) => e.eventType === temporal.api.enums.v1.EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED);
}

/**
 * A history with every payload decrypted, bytes as base64 — what test/fixtures/histories holds
 * (ids and versions only; the leak check covers it). Load it with loadHistory.
 */
export async function decodedHistoryJson(h: Pick<Harness, 'services'>, history: unknown): Promise<string> {
  return JSON.stringify(await decodePayloads(h, history), (_k, v) => {
    const bytes = asBytes(v);
    return bytes ? bytes.toString('base64') : v;
  });
}

/** A history written by decodedHistoryJson, as the proto message replay takes. */
export function loadHistory(json: string): temporal.api.history.v1.IHistory {
  return temporal.api.history.v1.History.fromObject(JSON.parse(json));
}

/** MAILGENT_RECORD_HISTORIES=<dir>: keep each decoded history, named by workflow type and how it closed. */
async function record(h: Harness, recorded: Recorded, dir: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  for (const { runId, history } of recorded) {
    const json = await decodedHistoryJson(h, history!);
    const { events } = loadHistory(json);
    const type = events?.[0]?.workflowExecutionStartedEventAttributes?.workflowType?.name ?? 'unknown';
    const last = temporal.api.enums.v1.EventType[events?.at(-1)?.eventType ?? 0] ?? '';
    const closed = last.replace(/^EVENT_TYPE_(WORKFLOW_EXECUTION_)?/, '').toLowerCase();
    writeFileSync(path.join(dir, `${type}-${closed}-${runId.slice(-12)}.json`), json);
  }
}

/**
 * Every value stored in this file's database, every version of every identity's credentials
 * (rotated, discarded and revoked ones too, which no test may have read): each is a secret the
 * checks look for, beside those the test registered; but those the test marked public text on
 * purpose (h.publicValue).
 */
async function storedSecrets(h: Harness): Promise<string[]> {
  const values: string[] = [];
  for (const { id } of (await h.sql('SELECT id FROM identities')).rows) {
    try {
      for await (const page of h.services.vault.storedValues(id as string)) for (const { value } of page) if (!h.publicValues.has(value)) values.push(value);
    } catch {
      // An identity whose key a test broke on purpose (its values cannot be opened, by anyone).
    }
  }
  return values;
}

/** The checks every test file ends with: no secret anywhere, and every history replays. */
export async function expectCleanRun(h: Harness): Promise<{ leaks: string[]; replay: string[] }> {
  const recorded = await histories(h);
  return { leaks: await findLeaks(h, recorded), replay: await replayFailures(h, recorded) };
}
