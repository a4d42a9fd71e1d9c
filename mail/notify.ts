import type { Pool } from '../db/pool';
import { withTransaction } from '../db/pool';
import { UnprocessableError } from '../core/errors';
import { appendAudit } from '../vault/audit';
import type { Mailer } from './mailer';
import { deliverQueued, queueMail, type DeliveryOptions, type DeliveryResult, type QueuedMail } from './outbox';
import { findStoredValueIn } from './secret-scan';

/**
 * Sends a notice the service composes itself (rotation outcomes, incidents, summaries, reminders)
 * exactly like an agent's mail.send: checked for stored values, queued with its audit row, then
 * delivered. The id is derived from what the notice is about, so a retry never sends it twice.
 */
export interface Notice extends Omit<QueuedMail, 'html'> {
  actor: string;
  requestId?: string;
  credentialId?: string | null;
  /** A notice about several credentials (a batch's summary): only their versions are searched. */
  credentialIds?: string[];
  detail?: Record<string, unknown>;
}

export interface NoticeDeps {
  pool: Pool;
  mailer: Mailer;
  /** Values to keep out of the notice: every value of the identities it is about (or of its credential). */
  vault: { storedValues(identityId: string, credentialIds?: string[]): AsyncIterable<{ name: string; value: string }[]> };
}

export async function sendNotice(deps: NoticeDeps, notice: Notice, scanIdentities?: string[], how?: DeliveryOptions): Promise<DeliveryResult | 'no-recipients'> {
  if ((await queueNotice(deps, notice, scanIdentities)) === 'no-recipients') return 'no-recipients';
  return deliverQueued(deps.pool, deps.mailer, notice.id, how);
}

/**
 * sendNotice without the delivery: checked, queued with its audit row (once per id), for a delivery
 * of its own (the deliverMail workflow) to send.
 */
export async function queueNotice(
  deps: NoticeDeps,
  notice: Notice,
  scanIdentities: string[] = notice.identityId ? [notice.identityId] : [],
): Promise<'queued' | 'already-queued' | 'no-recipients'> {
  const to = [...new Set(notice.to.filter(Boolean))];
  if (to.length === 0) return 'no-recipients';
  // A notice about one credential is composed from that credential's metadata, in an activity that
  // handles no other value: its own versions are what a slip could put in it, so only they are
  // decrypted and searched (a summary: the versions of the credentials it lists). (Searching all the identity's versions cost every rotation notice one
  // decryption per version the identity ever stored: 18,000 in the bench, half its rotation time.)
  const only = notice.credentialId ? [notice.credentialId] : notice.credentialIds;
  // Queued by an earlier attempt: checked then. A retried activity that sends many notices (a sweep's
  // summaries) must not repeat every scan, or at scale each attempt would redo the work of the last.
  const queued = await deps.pool.query('SELECT 1 FROM mail_outbox WHERE id = $1', [notice.id]);
  if (queued.rowCount) return 'already-queued';
  for (const identityId of new Set(scanIdentities)) {
    if (await findStoredValueIn({ to, subject: notice.subject, text: notice.text }, deps.vault.storedValues(identityId, only))) {
      throw storedValueRefusal(notice);
    }
  }
  const inserted = await withTransaction(deps.pool, async (tx) => {
    const queued = await queueMail(tx, { id: notice.id, identityId: notice.identityId, purpose: notice.purpose, to, subject: notice.subject, text: notice.text });
    if (queued) await appendAudit(tx, noticeAudit(notice, 'ok', { recipients: to.length, ...notice.detail }));
    return queued;
  });
  return inserted ? 'queued' : 'already-queued';
}

/** The refusal of a notice that would carry a stored value. */
export function storedValueRefusal(notice: Pick<Notice, 'purpose'>): UnprocessableError {
  return new UnprocessableError(`the ${notice.purpose} notice would carry a stored secret; it was not sent`);
}

/** A notice's audit row (mail.send, by the notice's actor): its id and purpose, and what the outcome adds. */
export function noticeAudit(notice: Notice, outcome: 'ok' | 'rejected', detail: Record<string, unknown>) {
  return {
    identityId: notice.identityId,
    actor: notice.actor,
    action: 'mail.send',
    credentialId: notice.credentialId ?? null,
    outcome,
    requestId: notice.requestId,
    detail: { messageId: notice.id, purpose: notice.purpose, ...detail },
  };
}
