import { ActivityFailure, ApplicationFailure, proxyActivities } from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { noticeDelivery, rotationDatabaseStep } from './options';

const { deliverMail: deliver } = proxyActivities<ReturnType<typeof createActivities>>(noticeDelivery);
// Retried until the database answers (and an attempt still holding the message lets go of it).
const { giveUpMail } = proxyActivities<ReturnType<typeof createActivities>>(rotationDatabaseStep);

/**
 * Delivers one queued outbox message (by id), retrying through SMTP outages. Once its day of retries
 * is spent, the message is marked abandoned and its sender's audit log says it was not delivered
 * (before, it stayed queued for good, and only mail.send's `ok` row told of it); the run fails with
 * the last error, unless an attempt sent the message after all ('already-sent'). (No patch: a run
 * whose delivery failed before this ended then and there, so no open history has gone past that
 * failure.)
 */
export async function deliverMail(input: { messageId: string }): Promise<string> {
  try {
    return await deliver(input);
  } catch (err) {
    if (!(err instanceof ActivityFailure)) throw err;
    const cause = err.cause instanceof ApplicationFailure || err.cause instanceof Error ? err.cause.message : String(err.cause ?? err.message);
    // Sent after all (its last attempt, out of time, marked it sent meanwhile): not a failure.
    // Runs before this recorded true or false, and still throw: no patch needed.
    const given = await giveUpMail({ messageId: input.messageId, error: cause });
    if (typeof given === 'string' && given.startsWith('already-sent')) return given;
    throw err;
  }
}
