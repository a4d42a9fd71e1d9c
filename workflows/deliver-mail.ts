import { proxyActivities } from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { emailDelivery } from './options';

const { deliverMail: deliver } = proxyActivities<ReturnType<typeof createActivities>>(emailDelivery);

/** Delivers one queued outbox message (by id), retrying through SMTP outages. */
export async function deliverMail(input: { messageId: string }): Promise<string> {
  return deliver(input);
}
