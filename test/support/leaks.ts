import { readFileSync } from 'node:fs';
import type { Harness } from './harness';
import { readMailbox } from './mail';

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
  for await (const wf of h.client.workflow.list({ query: `TaskQueue = '${h.taskQueue}'` })) {
    const history = await h.client.workflow.getHandle(wf.workflowId, wf.runId).fetchHistory();
    places.push([
      `history of ${wf.workflowId}`,
      JSON.stringify(history, (_k, v) => (v instanceof Uint8Array ? Buffer.from(v).toString('utf8') : v)),
    ]);
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
