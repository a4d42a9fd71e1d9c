import { randomUUID } from 'node:crypto';
import { Router } from 'express';
import type { z } from 'zod';
import type { Client } from '@temporalio/client';
import { UnavailableError, UnprocessableError } from '../../core/errors';
import { withTransaction, type Pool } from '../../db/pool';
import { queueMail } from '../../mail/outbox';
import { findStoredValueIn } from '../../mail/secret-scan';
import { appendAudit, auditFailure, callerEntry } from '../../vault/audit';
import type { Caller, Vault } from '../../vault/vault';
import { deliverMail } from '../../workflows';
import { endpoint, type AuthDeps } from '../endpoint';
import { mailQueued } from '../responses';
import { mailSend } from '../schemas';
import { claimKey, idempotencyKeyOf, keyed, KeyTaken, repeatOf } from '../idempotency';

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

/** Scans, queues and starts delivery of one message (POST /v1/mail.send, MCP mail_send). */
export async function sendMail(deps: MailDeps, caller: Caller, input: z.output<typeof mailSend>) {
  const { idempotencyKey, ...body } = input;
  // A repeat first: the message was checked when it was queued (a value stored since must not turn
  // the repeat of a message already sent into a refusal).
  const key = keyed('mail.send', idempotencyKey, body);
  const repeat = (messageId: string) => repeated(deps.pool, caller, messageId);
  const earlier = await repeatOf(deps.pool, caller, key, repeat);
  if (earlier) return earlier;
  // Its own values and those granted to it: a grantee may read a granted value, not mail it on.
  const hit = await findStoredValueIn(body, deps.vault.readableValues(caller.identityId));
  if (hit) {
    throw new UnprocessableError(
      `the message contains the value of credential '${hit}' (or an encoding of it); mail never carries a secret`,
      'secret-in-message',
      'Message refused: it carries a stored secret',
    );
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
  try {
    await withTransaction(deps.pool, async (tx) => {
      // Its delivery, tired of waiting, may have marked the id as never to be sent (a tombstone).
      if (!(await queueMail(tx, { id: messageId, identityId: caller.identityId, purpose: 'mail.send', ...body }))) throw late;
      // A request with the same key committed since the look above: this one is rolled back (its
      // delivery, finding nothing, leaves a tombstone) and answered with that request's message.
      if (key && !(await claimKey(tx, caller, key, messageId))) throw new KeyTaken();
      await appendAudit(tx, { ...caller, action: 'mail.send', outcome: 'ok', detail: { messageId, recipients: body.to.length } });
    });
  } catch (err) {
    if (err instanceof KeyTaken) {
      const winner = await repeatOf(deps.pool, caller, key, repeat);
      if (winner) return winner;
      throw new UnavailableError('another request with this Idempotency-Key was being carried out; nothing was sent: try again');
    }
    throw err === late ? await auditFailure(deps.pool, callerEntry(caller, 'mail.send', { messageId, notQueued: true }), late) : err;
  }
  return { messageId, status: 'queued' as const };
}

/** A repeat of a request by its Idempotency-Key: the first's message with its status now, nothing sent again (audited as a repeat). */
async function repeated(pool: Pool, caller: Caller, messageId: string) {
  const { rows } = await pool.query('SELECT status FROM mail_outbox WHERE id = $1', [messageId]);
  await appendAudit(pool, { ...caller, action: 'mail.send', outcome: 'ok', detail: { messageId, repeated: true } });
  return { messageId, status: rows[0].status as 'queued' | 'sent' | 'abandoned', repeated: true as const };
}
