import { IntegrityError, KeyIntegrityError, UnprocessableError } from '../core/errors';
import { Context } from '@temporalio/activity';
import { abandonedPlaceholder, deliverOutboxMessage, deliverQueued, giveUpMail, startDelivery, UNWATCHED_DELIVERY, WATCHED_DELIVERY, type DeliveryOptions, type DeliveryResult } from '../mail/outbox';
import { withTransaction } from '../db/pool';
import { appendAudit } from '../vault/audit';
import { noticeAudit, queueNotice, sendNotice, storedValueRefusal, type Notice } from '../mail/notify';
import type { CredentialMeta } from '../vault/types';
import type { RotationNotice } from '../workflows/types';
import type { ActivityDeps } from './index';
import { callingRunId, heartbeating, KEY_FAILED, logKeyFailure, permanentErrorsFail, sleep, stableUuid } from './support';

/** Rotation outcome notices and mail delivery. No notice ever carries a value: they are built from metadata. */
export function noticeActivities(deps: ActivityDeps) {
  return {
    /**
     * One notice per outcome of a run; its id comes from the run and the outcome, so a retry never
     * sends two. A `rotated` notice (not the one that opens a grace period) answers with
     * `currentVersion`, the credential's current version once the notice is sent or handed to its
     * delivery workflow (a value stored meanwhile replaces the rotated one); absent if it could not
     * be read (deleted meanwhile).
     */
    async sendRotationNotice(n: RotationNotice): Promise<{ messageId: string; recipients: number; delivery: string; currentVersion?: number }> {
      return permanentErrorsFail(() => heartbeating(async () => {
        const meta = await deps.vault.describe(n.identityId, n.credentialId);
        const identity = await deps.identities.get(n.identityId);
        // A batch's `notify` list gets the batch summary, not a notice per credential.
        const rotation = (await deps.pool.query('SELECT reason FROM rotations WHERE id = $1', [n.rotationId])).rows[0];
        const to = [
          ...meta.owners,
          ...meta.notify,
          ...(identity?.email ? [identity.email] : []),
          ...(n.mode === 'leak' || n.outcome === 'revoke_failed' ? (deps.securityNotify ?? []) : []),
        ];
        // A leak during the grace period adds a second 'rotated' notice to the run: it needs an id of its own.
        // A superseded notice may be followed by a second one, once that version is reported leaked and revoked.
        const messageId = stableUuid(
          `${callingRunId() ?? n.rotationId}:${n.credentialId}:notice:${n.outcome}${n.mode === 'leak' ? ':leak' : ''}${n.supersededLeaked ? ':revoked' : ''}`,
        );
        const notice: Notice = {
          id: messageId,
          identityId: n.identityId,
          purpose: 'rotation.notice',
          to,
          ...composeRotationNotice(n, meta, rotation?.reason ?? null),
          actor: `workflow:${n.workflowId}`,
          requestId: n.rotationId,
          credentialId: n.credentialId,
          detail: { outcome: n.outcome },
        };
        let delivery: Awaited<ReturnType<typeof sendOrHandOver>>;
        try {
          delivery = await sendOrHandOver(deps, notice);
          // An earlier attempt refused it and recorded so (below), then was retried: still refused.
          if (delivery === 'abandoned' && (await refusedEarlier(deps, notice.id))) throw storedValueRefusal(notice);
        } catch (err) {
          if (!(err instanceof UnprocessableError)) throw err;
          // Refused: its text would carry a stored value (an error a provider or dependent answered,
          // the rotation's reason, a value stored after it was checked). The recipients still hear
          // that there was an outcome, from ids alone, and where to read it; the refusal is audited;
          // then the run records it among its problems, as before. In that order: the refusal's
          // record answers a retry of this attempt (above), so what comes before it must be done.
          const refusal = { reason: REFUSED_NOTICE, error: 'secret-in-message' };
          const withheld = withheldNotice(notice, n);
          await sendOrHandOver(deps, withheld).catch((again: unknown) => {
            // Refused too (the recipients' own addresses are stored values): the audit rows say so.
            if (!(again instanceof UnprocessableError)) throw again;
            return recordRefusedNotice(deps, withheld, refusal, { outcome: n.outcome, withheld: true });
          });
          await recordRefusedNotice(deps, notice, refusal, { outcome: n.outcome });
          throw err;
        }
        // Only the final notice's answer is read by the run (learnSuperseded): no other notice pays for
        // the look, nor the one that opens a grace period (it carries graceEndsAt, and the run ignores its answer).
        const currentVersion =
          n.outcome === 'rotated' && n.graceEndsAt === undefined
            ? await deps.vault.describe(n.identityId, n.credentialId).then(
                (now) => now.version,
                () => undefined,
              )
            : undefined;
        return { messageId, recipients: new Set(to).size, delivery, ...(currentVersion !== undefined ? { currentVersion } : {}) };
      }));
    },

    /**
     * The deliverMail workflow gave up on the message: abandoned, and audited for its sender
     * (mail/outbox.ts, giveUpMail): true. 'already-sent' (naming any recipient the server refused,
     * as deliverMail's result does) when an attempt sent it after all (the last one, its day spent
     * while it talked to a slow relay, marked it sent as this waited for its claim); false when it
     * was settled otherwise (abandoned, gone).
     */
    async giveUpMail(input: { messageId: string; error: string }): Promise<boolean | string> {
      if (await giveUpMail(deps.pool, input.messageId, input.error)) return true;
      const { rows } = await deps.pool.query(`SELECT status, refused FROM mail_outbox WHERE id = $1`, [input.messageId]);
      if (rows[0]?.status !== 'sent') return false;
      const refused: string[] = rows[0].refused ?? [];
      return refused.length ? `already-sent; refused by the SMTP server: ${refused.join(', ')}` : 'already-sent';
    },

    /** The deliverMail workflow's result: 'sent', 'already-sent' …, naming any recipient the server refused. */
    async deliverMail(input: { messageId: string }): Promise<string> {
      const { result, refused } = await heartbeating(async () => {
        // mail.send starts the delivery before it commits the message (so that a start that fails
        // leaves nothing queued): a message not there yet is waited for, a while. One not committed
        // by then gets a tombstone under its id, so a commit later than that cannot queue it (the
        // request is answered 503, not sent), and is 'missing'; one committed meanwhile is sent.
        const until = Date.now() + (deps.messageCommitWaitMs ?? MESSAGE_COMMIT_WAIT_MS);
        for (;;) {
          const delivery = await deliverOutboxMessage(deps.pool, deps.mailer, input.messageId, attemptDelivery());
          if (delivery.result !== 'missing') return delivery;
          if (Date.now() >= until && (await tombstone(deps, input.messageId))) return delivery;
          await sleep(250);
        }
      });
      return refused.length ? `${result}; refused by the SMTP server: ${refused.join(', ')}` : result;
    },
  };
}

/** How long a delivery waits for a message not committed yet (mail.send commits it after starting the delivery). */
export const MESSAGE_COMMIT_WAIT_MS = 30_000;

/** Marks a message id never to be queued (abandoned, nothing of a message in it); false if a message took the id first. */
function tombstone(deps: ActivityDeps, id: string): Promise<boolean> {
  const reason = `not committed within ${Math.round((deps.messageCommitWaitMs ?? MESSAGE_COMMIT_WAIT_MS) / 1000)} s of its delivery's start`;
  return abandonedPlaceholder(deps.pool, { id, purpose: 'mail.send', marker: '(not committed)', reason });
}

/**
 * A rotation's notice: queued (checked, audited), then sent by this attempt; if the SMTP server
 * does not take it (down, refusing every recipient, too slow), handed to a delivery workflow of its
 * own (deliverMail, mail:<id>: retried for a day with growing pauses, then given up and the sender
 * told in the audit log, as mail.send's), and the run goes on. Before, the run waited for the
 * server as long as it was away (a day of retries at most), and with it whatever came after the
 * notice: the rotation again of a value reported leaked (it continues as new once its notices are
 * out), a cancel's or a rollback's leak rotation, the end of the run. A refusal (the notice would
 * carry a stored value) is not handed over: it fails the attempt, for good. Without a Temporal
 * client here (deps.temporal), the attempt fails and is retried, as before.
 */
async function sendOrHandOver(deps: ActivityDeps, notice: Notice): Promise<DeliveryResult | 'no-recipients' | 'handed-over'> {
  if ((await queueNotice(deps, notice)) === 'no-recipients') return 'no-recipients';
  const how = attemptDelivery();
  try {
    return await deliverQueued(deps.pool, deps.mailer, notice.id, how);
  } catch (err) {
    // Cancelled (a worker shutting down): its retry, on another worker, sends it.
    if (!deps.temporal || how.signal?.aborted) throw err;
    const handed = await startDelivery(deps.pool, deps.temporal, notice.id);
    return handed === 'missing' ? Promise.reject(err) : handed;
  }
}

/**
 * A scheduled notice (a sweep's summaries and reminders, the orphan report): queued as sendNotice
 * queues it, then handed to a delivery workflow of its own (mail:<id>, the one mail.send uses),
 * not delivered inline. An address the SMTP server keeps refusing, or an SMTP outage, then holds up
 * that message's delivery alone, not the sweep, whose steps after it (reminders, retention) and
 * whose successors (the schedule skips a sweep while one runs) would wait with it. Without a
 * Temporal client (deps.temporal), it is delivered inline.
 *
 * True when this call queued the notice and handed it over (or, without Temporal, sent it); false
 * when it has no recipients, or (with Temporal) an earlier call, an earlier sweep's or a retried
 * attempt's, had queued it: what a sweep counts. A notice an attempt queued and then died before
 * handing over is handed over by the retry all the same, but counted by neither.
 */
export async function handOverNotice(deps: ActivityDeps, notice: Notice, scanIdentities?: string[]): Promise<boolean> {
  try {
    return await handOver(deps, notice, scanIdentities);
  } catch (err) {
    // Refused for carrying a stored value (a value that is also text the notice prints), or not
    // checkable (a key the scan needs failed its integrity check: one identity's broken key): neither
    // heals by retrying, and retried it would hold the sweep, and with it every sweep after it (the
    // schedule skips a sweep while one runs): every identity's rotations, reminders and retention.
    // The notice is skipped and its refusal audited, once: an abandoned outbox row under its id
    // (nothing of the message in it: not its text, not its recipients) answers every later sweep,
    // as any queued notice does (queueNotice finds it before scanning; startDelivery and
    // deliverQueued leave an abandoned message alone).
    // A stored version that fails its own check (a damaged ciphertext: bit rot, a bad restore, a row
    // moved) cannot be checked either, and does not heal: before, its error failed the activity,
    // retried for a day (summaries, reminders) or for good (password policies), every sweep held.
    const refusal =
      err instanceof UnprocessableError
        ? { reason: REFUSED_NOTICE, error: 'secret-in-message' }
        : err instanceof IntegrityError
          ? { reason: UNCHECKED_NOTICE, error: err instanceof KeyIntegrityError ? 'key-failed' : 'integrity-failed' }
          : undefined;
    if (!refusal) throw err;
    // Its message names key ids, or the version that failed: for the worker's log, not for the outbox or the audit log.
    if (err instanceof IntegrityError) logKeyFailure(err);
    await recordRefusedNotice(deps, notice, refusal);
    return false;
  }
}

/**
 * A refused notice's record: an abandoned outbox row under its id (nothing of the message in it: not
 * its text, not its recipients) and, once, its `mail.send` `rejected` audit row.
 */
async function recordRefusedNotice(deps: ActivityDeps, notice: Notice, refusal: { reason: string; error: string }, extra: Record<string, unknown> = {}): Promise<void> {
  await withTransaction(deps.pool, async (tx) => {
    const recorded = await abandonedPlaceholder(tx, { id: notice.id, identityId: notice.identityId, purpose: notice.purpose, marker: '(refused)', reason: refusal.reason });
    if (recorded) await appendAudit(tx, noticeAudit(notice, 'rejected', { ...extra, error: refusal.error }));
  });
}

/** Whether the outbox row of `id` records its refusal (recordRefusedNotice). */
export async function refusedEarlier(deps: ActivityDeps, id: string): Promise<boolean> {
  const { rows } = await deps.pool.query(`SELECT 1 FROM mail_outbox WHERE id = $1 AND status = 'abandoned' AND last_error = $2`, [id, REFUSED_NOTICE]);
  return rows.length > 0;
}

/** What the recipients of a refused rotation notice get instead: its outcome and ids, no free text (no name, error, reason). */
function withheldNotice(notice: Notice, n: RotationNotice): Notice {
  return {
    ...notice,
    id: stableUuid(`${notice.id}:withheld`),
    subject: `[mailgent] Rotation notice withheld (${n.outcome})`,
    text: [
      `A rotation of credential ${n.credentialId} ended a step with the outcome '${n.outcome}', but its notice was withheld:`,
      'its text (an error a provider or dependent answered, the rotation\'s reason) would have carried a value stored in Mailgent.',
      '',
      `Read the rotation's state with GET /v1/rotations/${n.rotationId}, and its trail with GET /v1/audit?credential=${n.credentialId}.`,
      '',
      `Rotation: ${n.rotationId}`,
      `Workflow: ${n.workflowId}`,
    ].join('\n'),
    detail: { ...notice.detail, withheld: true },
  };
}

/**
 * How this attempt delivers a message: as Temporal watches it. Scheduled with a heartbeat timeout
 * (noticeDelivery; emailDelivery, for a sweep's notice sent inline without a Temporal client), it
 * waits for a dead attempt's claim and honours its cancellation until it sends; without one
 * (scheduled before those had one), its claim must outlast its 30 s start-to-close
 * (mail/outbox.ts, UNWATCHED_DELIVERY).
 */
export function attemptDelivery(): DeliveryOptions {
  let ctx: Context;
  try {
    ctx = Context.current();
  } catch {
    return {}; // not an activity (direct calls): the defaults
  }
  return ctx.info.heartbeatTimeoutMs ? { ...WATCHED_DELIVERY, signal: ctx.cancellationSignal } : UNWATCHED_DELIVERY;
}

/** The outbox's record (last_error) of a scheduled notice refused for carrying a stored value. */
export const REFUSED_NOTICE = 'refused: it would carry a stored value';

/** The outbox's record of a scheduled notice that could not be checked for stored values (KEY_FAILED: the worker's log names the key). */
export const UNCHECKED_NOTICE = `not sent: it could not be checked for stored values (${KEY_FAILED})`;

async function handOver(deps: ActivityDeps, notice: Notice, scanIdentities?: string[]): Promise<boolean> {
  if (!deps.temporal) return (await sendNotice(deps, notice, scanIdentities, attemptDelivery())) === 'sent';
  const queued = await queueNotice(deps, notice, scanIdentities);
  if (queued === 'no-recipients') return false;
  // Queued already, its delivery is started all the same (an attempt that queued it may have died
  // before starting it), but not counted: an earlier run (a sweep's reminder not yet delivered) or attempt did.
  const delivery = await startDelivery(deps.pool, deps.temporal, notice.id);
  return queued === 'queued' && delivery === 'handed-over';
}


const SUBJECTS: Record<RotationNotice['outcome'], (name: string) => string> = {
  rotated: (name) => `[mailgent] Rotated ${name}`,
  failed: (name) => `[mailgent] Rotation FAILED for ${name}`,
  cancelled: (name) => `[mailgent] Rotation cancelled for ${name}`,
  rolled_back: (name) => `[mailgent] Rotation rolled back for ${name}`,
  revoke_failed: (name) => `[mailgent] ACTION NEEDED: the old value of ${name} is still valid`,
  superseded: (name) => `[mailgent] ACTION NEEDED: the rotated value of ${name} was replaced; its dependents still have it`,
};

export function composeRotationNotice(
  n: RotationNotice,
  meta: Pick<CredentialMeta, 'name' | 'kind' | 'nextRotationAt' | 'version'> & { deletedAt?: string | null; policy?: CredentialMeta['policy'] },
  reason: string | null,
) {
  const what = `the ${meta.kind} credential '${meta.name}'`;
  const problems = n.problems ?? [];
  const listed = problems.map((p) => `- ${p}`);
  const stillLeaked = leakLines(n, meta);
  const body: Record<RotationNotice['outcome'], string[]> = {
    rotated: [
      `${cap(what)} was rotated${n.mode === 'leak' ? ' because a leak was reported' : ''}.`,
      '',
      n.currentVersion !== undefined && n.toVersion !== undefined && n.currentVersion > n.toVersion
        ? `Version ${n.toVersion} was made, but version ${n.currentVersion}, stored while the rotation ran, is current (a notice of its own says what that leaves to do).`
        : `Version ${n.toVersion} is now current.`,
      n.previousNotRevoked
        ? `Version ${n.fromVersion} could not be revoked at the provider and still works: revoke it there by hand.`
        : n.graceEndsAt
          ? `Version ${n.fromVersion} keeps working until ${n.graceEndsAt}, then it is revoked.`
          : `Version ${n.fromVersion} has been revoked.`,
      `Next rotation due: ${meta.nextRotationAt ?? 'no rotation policy set'}.`,
      ...(problems.length > 0 ? ['', 'Not everything went through:', ...listed] : []),
      // A leak of the version it made (or of one stored since), the credential not rotated now: not rotated again (UNROTATED_LEAKS_TOLD).
      ...(n.unrotatedLeaks && (meta.deletedAt || meta.policy === null) ? stillLeaked : []),
    ],
    failed: [
      problems.length > 0
        ? `Rotating ${what} failed${n.step ? ` at step ${n.step}` : ''}, and undoing it failed in part:`
        : `Rotating ${what} failed${n.step ? ` at step ${n.step}` : ''}; it was undone and nothing changed.`,
      ...(problems.length > 0 ? [...listed, 'Put those back by hand.'] : []),
      ...(n.abandonedKept ? [keptPending(n)] : []),
      '',
      `Error: ${n.error ?? 'unknown'}`,
      // A value stored while the rotation ran (what makes promote refuse) is current now, not the one it started from.
      n.fromVersion === undefined || n.fromVersion === meta.version
        ? `Version ${n.fromVersion ?? meta.version} is still current. The credential is marked rotation_failed.`
        : `Version ${meta.version}, stored while the rotation ran, is current. The credential is marked rotation_failed.`,
      ...stillLeaked,
    ],
    cancelled: [
      problems.length > 0
        ? `Rotating ${what} was cancelled, and undoing it failed in part; version ${n.fromVersion ?? meta.version} is still current.`
        : n.fromVersion === undefined
          ? `Rotating ${what} was cancelled; nothing it made is left in place, and version ${meta.version} is still current.`
          : `Rotating ${what} was cancelled and undone; version ${n.fromVersion} is still current.`,
      ...(problems.length > 0 ? [...listed, 'Put those back by hand. The credential is marked rotation_failed.'] : []),
      ...(n.abandonedKept ? [keptPending(n)] : []),
      ...stillLeaked,
    ],
    rolled_back: [
      // Absent from a notice an older run scheduled: any problem but the revoke's was a dependent not put back.
      (n.restoresFailed ?? problems.length > (n.abandonedNotRevoked ? 1 : 0))
        ? `The rotation of ${what} was rolled back: version ${n.fromVersion} is current again in the vault, but not everywhere (see below),`
        : `The rotation of ${what} was rolled back: version ${n.fromVersion} is current again everywhere,`,
      n.abandonedKept
        ? `and version ${n.toVersion} was left working: the dependents below could not be put back and still use it. Once they are off it, revoke it at the provider, if it keeps one. ${n.error ?? ''}`.trim()
        : n.abandonedNotRevoked
          ? `but version ${n.toVersion} could not be revoked at the provider and may still work there (a provider that holds one value may still be on it): revoke it there by hand, and put version ${n.fromVersion} back if needed. ${n.error ?? ''}`.trim()
          : `and version ${n.toVersion} was revoked. ${n.error ?? ''}`.trim(),
      ...(problems.length > 0 ? ['', 'Not everything went through:', ...listed] : []),
      // A leak heard by a run rolled back (a cancel in its grace period) is answered all the same:
      // the run rotates again, in leak mode, once this notice is out, unless the credential is not
      // rotated now (deleted, or its policy taken away). Before, this notice said nothing of the leak.
      ...(n.mode === 'leak' ? leakLines({ ...n, rotatingAgain: n.rotatingAgain ?? (!meta.deletedAt && meta.policy !== null) }, meta) : []),
    ],
    revoke_failed: [
      `${cap(what)} was rotated to version ${n.toVersion}, but revoking version ${n.fromVersion} at the provider failed:`,
      `${n.error ?? 'unknown error'}`,
      '',
      `Revoke version ${n.fromVersion} by hand at the provider.`,
    ],
    superseded: [
      `The rotation of ${what} made version ${n.toVersion}, but version ${n.currentVersion ?? meta.version}, stored while the rotation ran, is current now.`,
      n.previousNotRevoked
        ? `Version ${n.fromVersion} could not be revoked at the provider and still works: revoke it there by hand.`
        : `Version ${n.fromVersion} was revoked as planned.`,
      ...(n.supersededLeaked
        ? n.supersededRevoked
          ? [`Version ${n.toVersion} was reported leaked and has been revoked. The dependents were given it during the rotation: move them to the current version.`]
          : [`Version ${n.toVersion} was reported leaked, and revoking it failed: it still works. Revoke it by hand (at the provider, if it keeps one), and move the dependents, which were given it during the rotation, to the current version.`]
        : [
            `Version ${n.toVersion} was not revoked: the dependents were given it during the rotation, and it still works wherever it is accepted (at the provider too, if it keeps one).`,
            `Move the dependents to the current version, then revoke version ${n.toVersion} by hand.`,
          ]),
      ...(problems.length > 0 ? ['', 'Not everything went through:', ...listed] : []),
    ],
  };
  const lines = [
    ...body[n.outcome],
    ...(reason ? [`Reason given: ${reason}`] : []),
    '',
    `Credential id: ${n.credentialId}`,
    `Rotation id: ${n.rotationId}`,
    `Workflow: ${n.workflowId}`,
    '',
    'This notice never contains a secret. Read the current value with vault.get.',
  ];
  return { subject: SUBJECTS[n.outcome](meta.name), text: lines.join('\n') };
}

/**
 * What a leak notice says of a leak the run did not answer by rotating: it is rotated again (a
 * cancelled run's), or not, and then why and what the owners can do. A credential that is not
 * rotated now (deleted, or its policy taken away, while it ran) is not rotated again: before, the
 * notice told them to rotate it again, which it cannot be. What the run did instead
 * (`unrotatedLeaks`: a replaced leaked version revoked, the live ones told) is said as it is: a
 * leaked value the run revoked is not said to work still.
 */
function leakLines(n: RotationNotice, meta: { deletedAt?: string | null; policy?: CredentialMeta['policy']; kind: string }): string[] {
  if (n.rotatingAgain) {
    return ['', 'A leak of this credential was reported, and a cancel or a rollback does not stop the answer to it: it is being rotated again now, in leak mode.', 'You will get a notice when that rotation has finished.'];
  }
  if (n.mode !== 'leak') return [];
  // A policy taken away (not deleted): set one, or revoke by hand; not "rotate it again" (no policy, no rotation).
  const unmanaged = !meta.deletedAt && meta.policy === null;
  if (!meta.deletedAt && !unmanaged) {
    return ['', 'A leak of this credential was reported and the rotation did not replace it: the leaked value still works.', 'Rotate it again, or revoke it at the provider by hand.'];
  }
  const answered = n.unrotatedLeaks;
  const lines = [
    '',
    meta.deletedAt
      ? 'A leak of this credential was reported, but the credential was deleted while it was being rotated: Mailgent does not rotate a deleted credential.'
      : 'A leak of this credential was reported, but its rotation policy was taken away while it was being rotated: Mailgent cannot rotate it without one.',
  ];
  if (answered && answered.revoked.length > 0) {
    lines.push(`${cap(versionsText(answered.revoked))}, reported leaked and replaced since, ${answered.revoked.length > 1 ? 'have' : 'has'} been revoked at the provider.`);
  }
  if (answered && answered.failed.length > 0) lines.push('Not revoked:', ...answered.failed.map((f) => `- ${f}`));
  // Unknown (a run that did not answer them itself): the leaked value is taken to be live, as it may be.
  const live = answered ? answered.live : undefined;
  if (live && live.length === 0) return lines;
  const which = live ? ` (${versionsText(live)})` : '';
  lines.push(
    `The leaked value${which} still works where it was issued.`,
    meta.deletedAt
      ? `Revoke it there by hand, or restore the credential (POST /v1/credentials/${n.credentialId}/restore) and report the leak again to have it rotated.`
      : meta.kind === 'totp_seed'
        ? 'Enrol a new seed with its service (which retires the old one) and store it with vault.store.'
        : `Set a rotation policy on it (PATCH /v1/credentials/${n.credentialId}) and report the leak again to have it rotated, or revoke it there by hand and store its replacement with vault.store.`,
  );
  return lines;
}

/** "version 3", "versions 1 and 2", "versions 1, 2 and 4". */
function versionsText(versions: number[]): string {
  if (versions.length === 1) return `version ${versions[0]}`;
  return `versions ${versions.slice(0, -1).join(', ')} and ${versions.at(-1)}`;
}

function cap(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

/** A failed or cancelled attempt's pending version left working (its undo could not put a dependent back: PENDING_KEPT_UNDER_DEPENDENTS). */
function keptPending(n: RotationNotice): string {
  return `Version ${n.toVersion}, which the rotation made, was left working: the dependents above could not be put back and still use it. Once they are off it, revoke it at the provider, if it keeps one.`;
}
