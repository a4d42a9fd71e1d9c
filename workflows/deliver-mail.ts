import { proxyActivities } from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { noticeDelivery } from './options';

const { deliverMail: deliver } = proxyActivities<ReturnType<typeof createActivities>>(noticeDelivery);

/** Delivers one queued outbox message (by id), retrying through SMTP outages. */
export async function deliverMail(input: { messageId: string }): Promise<string> {
  return deliver(input);
}
