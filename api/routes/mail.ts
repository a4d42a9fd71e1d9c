import { randomUUID } from 'node:crypto';
import { Router } from 'express';
import type { z } from 'zod';
import type { Client } from '@temporalio/client';
import { UnavailableError, UnprocessableError, ValidationError } from '../../core/errors';
import { withTransaction, type Pool } from '../../db/pool';
import { queueMail } from '../../mail/outbox';
import { findStoredValueIn } from '../../mail/secret-scan';
import { appendAudit, auditFailure, callerEntry } from '../../vault/audit';
import type { Caller, Vault } from '../../vault/vault';
import { deliverMail } from '../../workflows';
import { endpoint, type AuthDeps } from '../endpoint';
import { mailQueued } from '../responses';
import { idempotencyKey, mailSend } from '../schemas';

export interface MailDeps {
  pool: Pool;
  vault: Vault;
  client: Client;
  taskQueue: string;
}

/** mail.send: refused if it carries a stored value; otherwise queued in the outbox and delivered by a workflow. */
export function mailRoutes(auth: AuthDeps, deps: MailDeps): Router {
  const router = Router();
  router.post(
    '/v1/mail.send',
    ...endpoint(auth, {
        who: 'identity',
        action: 'mail.send',
        summary: 'Send a message (refused if it carries a stored value)',
        body: mailSend,
        responses: { 202: mailQueued },
        problems: [422],
      }, async ({ req, body, caller }) => ({
      status: 202,
      body: await sendMail(deps, caller, { ...body, idempotencyKey: idempotencyKeyOf(req.get('idempotency-key'), body.idempotencyKey) }),
    })),
  );
  return router;
}

/** How long an Idempotency-Key names its message: a repeat within this time gets that message back. */
export const IDEMPOTENCY_HOURS = 24;

/** Scans, queues and starts delivery of one message (POST /v1/mail.send, MCP mail_send). */
export async function sendMail(deps: MailDeps, caller: Caller, input: z.output<typeof mailSend>) {
  const { idempotencyKey, ...body } = input;
  // Its own values and those granted to it: a grantee may read a granted value, not mail it on.
  const hit = await findStoredValueIn(body, deps.vault.readableValues(caller.identityId));
  if (hit) {
    throw new UnprocessableError(
      `the message contains the value of credential '${hit}' (or an encoding of it); mail never carries a secret`,
      'secret-in-message',
      'Message refused: it carries a stored secret',
    );
  }
  if (idempotencyKey !== undefined) {
    const earlier = await keyedMessage(deps.pool, caller, idempotencyKey, body);
    if (earlier) return earlier;
  }
  const messageId = randomUUID();
  // The delivery is started first, the message committed after it (the delivery waits a while for
  // it: MESSAGE_COMMIT_WAIT_MS). The other way round, a process that died (or lost Temporal and then
  // the database) between the commit and the start left a message queued, its `ok` row written,
  // that nothing would ever send or report undelivered. Now a start that fails leaves nothing
  // queued, and a commit that fails leaves the delivery nothing to send.
  try {
    await deps.client.workflow.start(deliverMail, {
      taskQueue: deps.taskQueue,
      workflowId: `mail:${messageId}`,
      args: [{ messageId }],
    });
  } catch {
    const err = new UnavailableError('mail delivery could not be started (Temporal is unavailable); the message was not sent');
    throw await auditFailure(deps.pool, callerEntry(caller, 'mail.send', { messageId, notQueued: true }), err);
  }
  const late = new UnavailableError('the message could not be queued in time (its delivery stopped waiting for it); it was not sent: try again');
  const raced = new Error('another request with this Idempotency-Key committed first');
  try {
    await withTransaction(deps.pool, async (tx) => {
      // Its delivery, tired of waiting, may have marked the id as never to be sent (a tombstone).
      if (!(await queueMail(tx, { id: messageId, identityId: caller.identityId, purpose: 'mail.send', ...body }))) throw late;
      if (idempotencyKey !== undefined) {
        // A key named last longer ago than it is honoured is taken over; a live one means a request
        // with this key committed since the look above: this one is rolled back (its delivery, finding
        // nothing, leaves a tombstone) and answered with that request's message.
        const taken = await tx.query(
          `INSERT INTO mail_idempotency (identity_id, key, message_id) VALUES ($1, $2, $3)
           ON CONFLICT (identity_id, key) DO UPDATE SET message_id = EXCLUDED.message_id, created_at = now()
             WHERE mail_idempotency.created_at <= now() - make_interval(hours => $4)`,
          [caller.identityId, idempotencyKey, messageId, IDEMPOTENCY_HOURS],
        );
        if (taken.rowCount === 0) throw raced;
      }
      await appendAudit(tx, { ...caller, action: 'mail.send', outcome: 'ok', detail: { messageId, recipients: body.to.length } });
    });
  } catch (err) {
    if (err === raced) {
      const earlier = await keyedMessage(deps.pool, caller, idempotencyKey!, body);
      if (earlier) return earlier;
    }
    throw err === late ? await auditFailure(deps.pool, callerEntry(caller, 'mail.send', { messageId, notQueued: true }), late) : err;
  }
  return { messageId, status: 'queued' as const };
}

/**
 * The message an Idempotency-Key already names (within IDEMPOTENCY_HOURS), with its status now: the
 * same message is answered as it was (audited as a repeat, nothing sent again); another message under
 * the key is refused, since sending it would lose one of the two requests silently.
 */
async function keyedMessage(pool: Pool, caller: Caller, key: string, body: Omit<z.output<typeof mailSend>, 'idempotencyKey'>) {
  const { rows } = await pool.query(
    `SELECT k.message_id, m.status,
            (m.recipients = $3::text[] AND m.subject = $4 AND m.text_body = $5 AND m.html_body IS NOT DISTINCT FROM $6) AS same
       FROM mail_idempotency k JOIN mail_outbox m ON m.id = k.message_id
      WHERE k.identity_id = $1 AND k.key = $2 AND k.created_at > now() - make_interval(hours => $7)`,
    [caller.identityId, key, body.to, body.subject, body.text, body.html ?? null, IDEMPOTENCY_HOURS],
  );
  const row = rows[0];
  if (!row) return undefined;
  if (!row.same) {
    throw new UnprocessableError(
      `this Idempotency-Key was used within ${IDEMPOTENCY_HOURS} hours for another message (${row.message_id}); nothing was sent: use a new key for a new message`,
      'idempotency-key-reused',
      'Idempotency-Key reused for another message',
    );
  }
  await appendAudit(pool, { ...caller, action: 'mail.send', outcome: 'ok', detail: { messageId: row.message_id, repeated: true } });
  return { messageId: row.message_id as string, status: row.status as 'queued' | 'sent' | 'abandoned', repeated: true as const };
}

/**
 * The Idempotency-Key header (the IETF draft's; as a string, its quotes are dropped) or the body's
 * idempotencyKey (as MCP gives it): the same key if both are given, else a 422.
 */
function idempotencyKeyOf(header: string | undefined, field: string | undefined): string | undefined {
  if (header === undefined) return field;
  const parsed = idempotencyKey.safeParse(header.replace(/^"(.*)"$/, '$1'));
  if (!parsed.success) {
    const message = parsed.error.issues[0]?.message ?? 'is not valid';
    throw new ValidationError(`the Idempotency-Key header ${message}`, [{ path: 'Idempotency-Key', message }]);
  }
  if (field !== undefined && field !== parsed.data) {
    throw new ValidationError("the Idempotency-Key header and the body's idempotencyKey differ: give one", [{ path: 'idempotencyKey', message: 'differs from the Idempotency-Key header' }]);
  }
  return parsed.data;
}
