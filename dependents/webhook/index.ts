import { randomUUID } from 'node:crypto';
import { UnprocessableError } from '../../core/errors';
import type { Dependent, DependentContext } from '../types';
import { webhookSettings, type WebhookSettings } from './schema';
import { postEvent, type WebhookEventType } from './send';

export { verifyWebhookSignature, SIGNATURE_HEADER } from './signature';
export type { WebhookEvent, WebhookEventType } from './send';

const MIN_KEY_LENGTH = 16;

/**
 * Tells a receiver, with signed events that carry no value, which version to use; the receiver
 * reads it itself with its own identity through vault.get. verify asks the receiver which version
 * it now runs and requires the pending one, so "applied" means "picked up", not just "delivered".
 */
export const webhookDependent: Dependent<WebhookSettings> = {
  type: 'webhook',
  settings: webhookSettings,
  async apply(ctx) {
    await send(ctx, 'credential.pending', ctx.target.version, ctx.idempotencyKey);
  },
  async verify(ctx) {
    // A fresh id per call: verify is a question, and a receiver must not answer it from a cache.
    const answer = await send(ctx, 'credential.verify', ctx.target.version, `verify:${ctx.credentialId}:${ctx.target.version}:${randomUUID()}`);
    const origin = new URL(ctx.settings.url).origin;
    const version = (answer as { version?: unknown } | undefined)?.version;
    if (!Number.isInteger(version)) throw new Error(`webhook ${origin} answered credential.verify without a JSON {"version": <n>} body`);
    if (version !== ctx.target.version) throw new Error(`webhook ${origin} reports version ${version}, not ${ctx.target.version}`);
  },
  async restore(ctx) {
    await send(ctx, 'credential.restored', ctx.target.version, ctx.idempotencyKey);
  },
  async promoted(ctx) {
    await send(ctx, 'credential.promoted', ctx.target.version, ctx.idempotencyKey);
  },
};

async function send(ctx: DependentContext<WebhookSettings>, type: WebhookEventType, version: number, id: string): Promise<unknown> {
  const { signingKeyCredential } = ctx.settings;
  if (signingKeyCredential === ctx.credentialName) {
    throw new UnprocessableError(`webhook signing key '${signingKeyCredential}' is the credential being rotated; use a credential of its own`);
  }
  const key = await ctx.secrets.read(signingKeyCredential);
  if (key.length < MIN_KEY_LENGTH) throw new UnprocessableError(`webhook signing key '${signingKeyCredential}' is shorter than ${MIN_KEY_LENGTH} characters`);
  return postEvent(ctx.settings, key, {
    id,
    type,
    credentialId: ctx.credentialId,
    credentialName: ctx.credentialName,
    version,
  });
}
