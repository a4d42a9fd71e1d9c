import { createHash } from 'node:crypto';
import { ApplicationFailure } from '@temporalio/activity';
import { AppError, UnprocessableError } from '../core/errors';
import type { Pool } from '../db/pool';
import { withTransaction } from '../db/pool';
import type { Mailer } from '../mail/mailer';
import { deliverQueued, queueMail } from '../mail/outbox';
import { findStoredValue } from '../mail/secret-scan';
import { DEFAULT_POLICY, providers, type Provider } from '../providers';
import { appendAudit } from '../vault/audit';
import type { Identities } from '../vault/identities';
import type { Caller, Vault } from '../vault/vault';
import type { RotationIds, RotationNotice } from '../workflows/types';

export interface ActivityDeps {
  pool: Pool;
  vault: Pick<Vault, 'stagePending' | 'promote' | 'discardPending' | 'describe' | 'storedValues'>;
  identities: Pick<Identities, 'get'>;
  mailer: Mailer;
  providers?: Record<string, Provider<any>>;
}

/**
 * Rotation and mail activities. They take ids and versions and open the vault themselves; a
 * value never leaves an activity. Each is idempotent, so a retry or a replay changes nothing twice.
 */
export function createActivities(deps: ActivityDeps) {
  const registry = deps.providers ?? providers;

  const caller = (ids: RotationIds): Caller => ({ identityId: ids.identityId, actor: `workflow:${ids.workflowId}`, requestId: ids.rotationId });

  return {
    async createPendingVersion(ids: RotationIds): Promise<{ version: number; basedOn: number }> {
      return permanentErrorsFail(async () => {
        const meta = await deps.vault.describe(ids.identityId, ids.credentialId);
        const policy = meta.policy ?? DEFAULT_POLICY;
        const provider = registry[policy.provider];
        if (!provider) throw new UnprocessableError(`rotation provider '${policy.provider}' is not installed on this worker`);
        if (meta.kind === 'totp_seed' && policy.provider === 'generated') {
          throw new UnprocessableError(`credential '${meta.name}' is a totp_seed; a generated value would not be a TOTP seed`);
        }
        const settings = provider.settings.parse(policy.settings ?? {});
        const idempotencyKey = `${ids.rotationId}:create_pending`;
        return deps.vault.stagePending(caller(ids), ids.credentialId, idempotencyKey, async (kind) => {
          const { value } = await provider.create({ settings, kind, credentialId: ids.credentialId, idempotencyKey });
          return value;
        });
      });
    },

    async promotePendingVersion(ids: RotationIds & { version: number }): Promise<{ current: number; previous: number | null }> {
      return permanentErrorsFail(() => deps.vault.promote(caller(ids), ids.credentialId, ids.version));
    },

    async discardPendingVersion(ids: RotationIds & { version: number | null }): Promise<void> {
      return permanentErrorsFail(() => deps.vault.discardPending(caller(ids), ids.credentialId, ids.version, 'rotation_failed'));
    },

    /** Queues and sends the outcome notice. The message id is derived from the rotation, so a retry never sends a second notice. */
    async sendRotationNotice(notice: RotationNotice): Promise<{ messageId?: string; recipients: number; delivery: string }> {
      return permanentErrorsFail(async () => {
        const meta = await deps.vault.describe(notice.identityId, notice.credentialId);
        const identity = await deps.identities.get(notice.identityId);
        const { rows } = await deps.pool.query('SELECT reason, notify FROM rotations WHERE id = $1', [notice.rotationId]);
        const recipients = [...new Set([...meta.owners, ...(rows[0]?.notify ?? []), ...(identity?.email ? [identity.email] : [])])];
        if (recipients.length === 0) return { recipients: 0, delivery: 'skipped: the credential has no owners and the identity no email' };

        const message = composeNotice(notice, meta, rows[0]?.reason ?? null);
        // Defence in depth: the notice is built from metadata only, but check it like any other mail.
        if (findStoredValue(message, await deps.vault.storedValues(notice.identityId))) {
          throw new UnprocessableError('the rotation notice would carry a stored secret; it was not sent');
        }
        const messageId = stableUuid(`${notice.rotationId}:${notice.credentialId}:notice:${notice.outcome}`);
        await withTransaction(deps.pool, async (tx) => {
          const queued = await queueMail(tx, { id: messageId, identityId: notice.identityId, purpose: 'rotation.notice', to: recipients, ...message });
          if (queued) {
            await appendAudit(tx, {
              ...caller(notice),
              action: 'mail.send',
              credentialId: notice.credentialId,
              outcome: 'ok',
              detail: { messageId, purpose: 'rotation.notice', outcome: notice.outcome, recipients: recipients.length },
            });
          }
        });
        const delivery = await deliverQueued(deps.pool, deps.mailer, messageId);
        return { messageId, recipients: recipients.length, delivery };
      });
    },

    async deliverMail(input: { messageId: string }): Promise<string> {
      return deliverQueued(deps.pool, deps.mailer, input.messageId);
    },
  };
}

function composeNotice(
  n: RotationNotice,
  meta: { name: string; kind: string; nextRotationAt: string | null },
  reason: string | null,
): { subject: string; text: string } {
  const lines =
    n.outcome === 'rotated'
      ? [
          `The ${meta.kind} credential '${meta.name}' was rotated.`,
          '',
          `Version ${n.toVersion} is now current; version ${n.fromVersion} is kept as previous.`,
          `Next rotation due: ${meta.nextRotationAt ?? 'no rotation policy set'}.`,
        ]
      : [
          `Rotating the ${meta.kind} credential '${meta.name}' failed; nothing changed.`,
          '',
          `Error: ${n.error ?? 'unknown'}`,
          `Version ${n.fromVersion ?? '(unchanged)'} is still current. The credential is marked rotation_failed.`,
        ];
  lines.push(
    ...(reason ? [`Reason given: ${reason}`] : []),
    '',
    `Credential id: ${n.credentialId}`,
    `Rotation id: ${n.rotationId}`,
    `Workflow: ${n.workflowId}`,
    '',
    'This notice never contains a secret. Read the new value with vault.get.',
  );
  return {
    subject: n.outcome === 'rotated' ? `[mailgent] Rotated ${meta.name}` : `[mailgent] Rotation FAILED for ${meta.name}`,
    text: lines.join('\n'),
  };
}

/** A UUID-shaped id derived from a string, for idempotent inserts. */
function stableUuid(seed: string): string {
  const h = createHash('sha256').update(seed).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

/** Our own 4xx/integrity errors will not heal by retrying: fail the activity for good. */
async function permanentErrorsFail<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof AppError && err.status !== 503) {
      throw ApplicationFailure.create({ type: err.slug, message: err.message, nonRetryable: true });
    }
    throw err;
  }
}
