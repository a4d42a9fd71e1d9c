import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Payload } from '@temporalio/common';
import { temporal } from '@temporalio/proto';
import { Worker } from '@temporalio/worker';
import { inject } from 'vitest';
import type { Harness } from './harness';
import { readMailbox } from './mail';

type History = Awaited<ReturnType<ReturnType<Harness['client']['workflow']['getHandle']>['fetchHistory']>>;

/** A history as text with byte fields as UTF-8: what anyone reading the Temporal server sees. */
export function rawHistoryText(history: unknown): string {
  // A Buffer reaches the replacer already turned into {type: 'Buffer', data: [...]} by its toJSON.
  return JSON.stringify(history, (_k, v) =>
    v instanceof Uint8Array ? Buffer.from(v).toString('utf8') : v?.type === 'Buffer' && Array.isArray(v.data) ? Buffer.from(v.data).toString('utf8') : v,
  );
}

/**
 * A history as text with every payload decrypted by this deployment's codec — what an operator
 * with the key sees. Searching this too proves values stay out of payloads, not just that the
 * codec hides them.
 */
export async function decodedHistoryText(h: Pick<Harness, 'services'>, history: unknown): Promise<string> {
  const codecs = h.services.dataConverter.payloadCodecs ?? [];
  const decodeAll = async (node: unknown): Promise<unknown> => {
    if (node instanceof Uint8Array || node === null || typeof node !== 'object') return node;
    if (Array.isArray(node)) return Promise.all(node.map(decodeAll));
    const record = node as Record<string, unknown>;
    if (record.metadata && typeof record.metadata === 'object' && record.data instanceof Uint8Array) {
      let payloads = [record as Payload];
      for (const codec of [...codecs].reverse()) payloads = await codec.decode(payloads);
      return payloads[0];
    }
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(record)) out[k] = await decodeAll(v);
    return out;
  };
  return rawHistoryText(await decodeAll(history));
}

async function histories(h: Harness): Promise<{ workflowId: string; runId: string; history: History }[]> {
  const out = [];
  for await (const wf of h.client.workflow.list({ query: `TaskQueue = '${h.taskQueue}'` })) {
    out.push({ workflowId: wf.workflowId, runId: wf.runId, history: await h.client.workflow.getHandle(wf.workflowId, wf.runId).fetchHistory() });
  }
  return out;
}

/**
 * Looks for every secret the test registered, raw and base64/hex encoded, in everything that must
 * never hold one: the service log, audit rows, the mail outbox, every delivered email, and the
 * full history (payloads decoded) of every workflow on this file's task queue.
 */
export async function findLeaks(h: Harness): Promise<string[]> {
  const places: [string, string][] = [['service log', readFileSync(h.logFile, 'utf8')]];
  const audit = await h.sql('SELECT * FROM audit_log');
  places.push(['audit_log', JSON.stringify(audit.rows)]);
  const outbox = await h.sql('SELECT * FROM mail_outbox');
  places.push(['mail_outbox', JSON.stringify(outbox.rows)]);
  for (const m of await readMailbox()) places.push([`email ${m.file}`, m.raw + (m.mail.text ?? '')]);
  for (const { workflowId, history } of await histories(h)) {
    places.push([`history of ${workflowId}`, rawHistoryText(history)]);
    places.push([`decoded history of ${workflowId}`, await decodedHistoryText(h, history)]);
  }
  const hits: string[] = [];
  for (const secret of h.secrets) {
    const forms = [secret, Buffer.from(secret).toString('base64'), Buffer.from(secret).toString('hex')];
    for (const [where, text] of places) {
      if (forms.some((f) => text.includes(f))) hits.push(`a secret (${secret.length} chars) appears in ${where}`);
    }
  }
  return hits;
}

/**
 * Replays every workflow history of this file's task queue against the current workflow code: a
 * change that would break running workflows (non-determinism) fails here. Returns the failures.
 */
export async function replayFailures(h: Harness): Promise<string[]> {
  const recorded = await histories(h);
  if (process.env.MAILGENT_RECORD_HISTORIES) await record(h, recorded, process.env.MAILGENT_RECORD_HISTORIES);
  const failures: string[] = [];
  for await (const result of Worker.runReplayHistories({ workflowBundle: { codePath: inject('workflowBundlePath') }, dataConverter: h.services.dataConverter }, recorded)) {
    if (result.error) failures.push(`${result.workflowId}: ${result.error.message}`);
  }
  return failures;
}

/**
 * A history with every payload decrypted, bytes as base64 — what test/fixtures/histories holds
 * (ids and versions only; the leak check covers it). Load it with loadHistory.
 */
export async function decodedHistoryJson(h: Pick<Harness, 'services'>, history: unknown): Promise<string> {
  const codecs = [...(h.services.dataConverter.payloadCodecs ?? [])].reverse();
  const walk = async (node: any): Promise<any> => {
    if (node === null || typeof node !== 'object' || node instanceof Uint8Array) return node;
    if (Array.isArray(node)) return Promise.all(node.map(walk));
    if (node.metadata && typeof node.metadata === 'object' && node.data instanceof Uint8Array) {
      let payloads = [node as Payload];
      for (const codec of codecs) payloads = await codec.decode(payloads);
      return payloads[0];
    }
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(node)) out[k] = await walk(v);
    return out;
  };
  const bytes = (v: any) => (v instanceof Uint8Array ? Buffer.from(v).toString('base64') : v?.type === 'Buffer' && Array.isArray(v.data) ? Buffer.from(v.data).toString('base64') : v);
  return JSON.stringify(await walk(history), (_k, v) => bytes(v));
}

/** A history written by decodedHistoryJson, as the proto message replay takes. */
export function loadHistory(json: string): temporal.api.history.v1.IHistory {
  return temporal.api.history.v1.History.fromObject(JSON.parse(json));
}

/** MAILGENT_RECORD_HISTORIES=<dir>: keep each decoded history, named by workflow type and how it closed. */
async function record(h: Harness, recorded: Awaited<ReturnType<typeof histories>>, dir: string): Promise<void> {
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

/** The checks every test file ends with: no secret anywhere, and every history replays. */
export async function expectCleanRun(h: Harness): Promise<{ leaks: string[]; replay: string[] }> {
  return { leaks: await findLeaks(h), replay: await replayFailures(h) };
}
