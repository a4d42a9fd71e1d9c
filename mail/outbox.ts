import { WorkflowExecutionAlreadyStartedError, type Client } from '@temporalio/client';
import { isCommitUnconfirmed, isDatabaseUnavailable, outlastingOutages, withTransaction, type Db, type Pool } from '../db/pool';
import { appendAudit } from '../vault/audit';
import { describeRefused, type Mailer, type RefusedRecipient, type SendReport } from './mailer';

/**
 * Every message is first written to the outbox (in the same transaction as its audit row), then
 * delivered by a retrying activity. Delivery is idempotent: a message marked sent is not sent again.
 * A message is sent once the SMTP server accepted it for one recipient or more.
 */
export interface QueuedMail {
  id: string;
  identityId: string | null;
  /** mail.send, or the kind of notice the service composed (rotation.notice, leak.incident …). */
  purpose: string;
  to: string[];
  subject: string;
  text: string;
  html?: string | null;
}

export async function queueMail(db: Db, mail: QueuedMail): Promise<boolean> {
  const { rowCount } = await db.query(
    `INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body, html_body)
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING`,
    [mail.id, mail.identityId, mail.purpose, mail.to, mail.subject, mail.text, mail.html ?? null],
  );
  return rowCount === 1;
}

export type DeliveryResult = 'sent' | 'already-sent' | 'abandoned' | 'missing';

export interface Delivery {
  result: DeliveryResult;
  /** Recipients the SMTP server refused while accepting the message for the others. */
  refused: string[];
}

export async function deliverQueued(pool: Pool, mailer: Mailer, id: string, how?: DeliveryOptions): Promise<DeliveryResult> {
  return (await deliverOutboxMessage(pool, mailer, id, how)).result;
}

/** How an attempt delivers a message: the claim it holds, whether it waits for another's, how long it waits to mark it sent. */
export interface DeliveryOptions {
  /**
   * Its claim on the message lapses `seconds` after it last renewed it, and it renews it every
   * `renewMs` while it talks to the server (a slow relay can take longer than any claim: the
   * mailer's timeouts are per exchange), so only a dead attempt's claim lapses.
   */
  lease?: { seconds: number; renewMs: number };
  /**
   * Whether it waits for a claim it finds to lapse (the dead attempt it retries held it) or for the
   * message to be sent (a live one holds it), instead of failing at once into the retry's backoff.
   */
  waitForClaim?: boolean;
  /** How long it waits for the database to mark sent a message the server accepted. */
  patienceMs?: number;
  /** The attempt's cancellation (a worker shutting down): honoured until the message is handed to the server, not after. */
  signal?: AbortSignal;
}

/**
 * An attempt Temporal watches by its heartbeats (noticeDelivery: 10 s heartbeat timeout, 5 min
 * start-to-close): a dead worker's attempt is retried ~10 s after it died, and waits a few seconds
 * for the dead claim to lapse. Its patience is longer than its claim: no retry can start while it
 * lives (it heartbeats, and the start-to-close outlasts a claim's wait, a slow relay's exchanges and
 * this wait), and its renewals take hold again once the database is back.
 */
export const WATCHED_DELIVERY = { lease: { seconds: 15, renewMs: 3_000 }, waitForClaim: true, patienceMs: 60_000 } satisfies DeliveryOptions;

/**
 * An attempt with no heartbeat timeout (scheduled before noticeDelivery was, with the 30 s
 * start-to-close and no heartbeat of the delivery activities then): a retry can start 30 s after
 * it did, dead or alive, so its claim outlasts that, a claim found fails at once, and it waits for
 * the database no longer than its claim holds without a renewal.
 */
export const UNWATCHED_DELIVERY = { lease: { seconds: 45, renewMs: 15_000 }, waitForClaim: false, patienceMs: 30_000 } satisfies DeliveryOptions;

/**
 * Sends a queued message and marks it sent. A server that accepts some recipients and refuses others
 * has delivered the message: it is marked sent (sending it again would reach the accepted ones a
 * second time, ~290 times over the retry policy's day), the refused addresses are kept on the row and
 * in an audit row of the sender's. Only a message nobody accepted fails, and is retried. Recipients
 * the server deferred (a 4xx reply: try again later) keep it queued for them: the recipients reached
 * are kept on the row (`delivered`), the attempt fails, and each retry sends it only to those not yet
 * reached nor refused (giveUpMail records the ones left refused once the day is spent).
 *
 * An attempt first claims the message (lease_until), so a second attempt that overlaps it (a retry
 * started while the first still talks to a slow relay) does not send it again: it fails retryably,
 * or (waitForClaim) first waits for the claim to lapse (a dead attempt's does; a live one's is
 * renewed) or for the message to be sent by the attempt that holds it.
 */
export async function deliverOutboxMessage(pool: Pool, mailer: Mailer, id: string, how: DeliveryOptions = {}): Promise<Delivery> {
  const { lease, waitForClaim, patienceMs, signal } = { ...WATCHED_DELIVERY, ...how };
  const cancelled = () => {
    const reason = signal?.reason;
    return reason instanceof Error ? reason : new Error('the delivery attempt was cancelled before it sent the message');
  };
  const claim = async () =>
    (
      await pool.query(
        `UPDATE mail_outbox SET lease_until = now() + make_interval(secs => $2)
          WHERE id = $1 AND status = 'queued' AND (lease_until IS NULL OR lease_until < now())
          RETURNING *, lease_until::text AS held`,
        [id, lease.seconds],
      )
    ).rows[0];
  /** Why the message could not be claimed: settled (sent, abandoned, gone), or claimed by another attempt, its claim lapsing in `lapsesInMs`. */
  const unclaimed = async (): Promise<Delivery | { lapsesInMs: number }> => {
    const current = (
      await pool.query(`SELECT status, refused, GREATEST(0, EXTRACT(EPOCH FROM lease_until - now()) * 1000)::float8 AS lapses_in FROM mail_outbox WHERE id = $1`, [id])
    ).rows[0];
    if (!current) return { result: 'missing', refused: [] };
    if (current.status === 'sent') return { result: 'already-sent', refused: current.refused };
    if (current.status === 'abandoned') return { result: 'abandoned', refused: [] };
    return { lapsesInMs: Number(current.lapses_in ?? 0) };
  };
  const busy = () => new Error('the message is being sent by another delivery attempt; it is tried again once that one has finished');
  let row = await claim();
  if (!row) {
    // Most often the claim is that of the attempt this one retries, lost with its worker: it lapses
    // within the claim's length, and this attempt waits for that (heartbeating) instead of failing
    // and waiting out a backoff, looking every half second in case the other attempt finishes
    // first. A claim still held when the one it found should have lapsed was renewed: a live attempt's.
    const found = await unclaimed();
    if ('result' in found) return found;
    if (!waitForClaim) throw busy();
    const lapsesAt = Date.now() + Math.min(found.lapsesInMs, lease.seconds * 1000) + 100;
    while (!row) {
      if (signal?.aborted) throw cancelled();
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, Math.min(500, lapsesAt - Date.now()))));
      row = await claim();
      if (row) break;
      const now = await unclaimed();
      if ('result' in now) return now;
      if (Date.now() >= lapsesAt) throw busy();
    }
  }
  // The claim is this attempt's while lease_until is the value it last set (to the microsecond):
  // it renews, and gives back, only that one, never a claim another attempt took once this one lapsed.
  let held: string = row.held;
  let renewing: Promise<unknown> = Promise.resolve();
  const renew = setInterval(() => {
    renewing = pool
      .query(
        `UPDATE mail_outbox SET lease_until = now() + make_interval(secs => $2)
          WHERE id = $1 AND status = 'queued' AND lease_until = $3::timestamptz RETURNING lease_until::text AS held`,
        [id, lease.seconds, held],
      )
      .then((r) => (held = r.rows[0]?.held ?? held))
      .catch(() => undefined); // a renewal that fails lets the claim lapse; the attempt goes on
  }, lease.renewMs);
  /** Gives the claim back (once a renewal in flight has landed: it would otherwise take it again), counting the attempt when it failed. */
  const giveBack = async (failure?: Error) => {
    clearInterval(renew);
    await renewing;
    await pool.query(
      `UPDATE mail_outbox SET attempts = attempts + $4, last_error = coalesce($2, last_error),
              lease_until = CASE WHEN lease_until = $3::timestamptz THEN NULL ELSE lease_until END
        WHERE id = $1`,
      [id, failure ? failure.message.slice(0, 500) : null, held, failure ? 1 : 0],
    );
  };
  // Cancelled before the server has it (a worker shutting down, its grace period over): stopped
  // here, the claim given back, the retry (another worker's) sends it. Past this point the attempt
  // finishes: a message the server accepted must be marked sent, or it would be sent again.
  if (signal?.aborted) {
    await giveBack();
    throw cancelled();
  }
  // Sent to the recipients an earlier attempt neither reached nor had refused for good: a server
  // that deferred some (a 4xx reply) asked for it to be sent to them again.
  const reached: string[] = row.delivered ?? [];
  const refusedBefore: string[] = row.refused ?? [];
  const settled = new Set([...reached, ...refusedBefore].map((address) => address.toLowerCase()));
  const pending = (row.recipients as string[]).filter((address) => !settled.has(address.toLowerCase()));
  let report: SendReport = { accepted: [], refused: [] };
  try {
    if (pending.length > 0) report = await mailer.send({ id, to: pending, subject: row.subject, text: row.text_body, html: row.html_body });
  } catch (err) {
    // Every recipient refused or deferred: a message that has reached no one yet is tried again
    // whole; one that has is settled for those refused for good, and kept for those deferred.
    const everyone = (err as { refused?: RefusedRecipient[] }).refused;
    if (!everyone || reached.length === 0) {
      await giveBack(err as Error).catch(() => undefined); // the send's error is the one to report; the claim lapses
      throw err;
    }
    report = { accepted: [], refused: everyone };
  }
  const refusedNow = report.refused.filter((r) => !r.temporary);
  const deferred = report.refused.filter((r) => r.temporary);
  const delivered = [...reached, ...report.accepted];
  const refused = [...refusedBefore, ...refusedNow.map((r) => r.address)];
  const refusedAll = [...refusedBefore.map((address) => ({ address, reply: '' })), ...refusedNow];
  const done = deferred.length === 0;
  const lastError = [
    ...(done ? [] : [`deferred by the SMTP server: ${describeRefused(deferred)}`]),
    ...(refused.length ? [`refused by the SMTP server: ${describeRefused(refusedAll)}`] : []),
  ].join('; ');
  // The server has the message (for some recipients at least): recording that must outlast a
  // database outage (the renewals take hold again once it is back). Failing here would leave it
  // queued as it was, and a retry would send it to them again once the claim lapsed. (An outage
  // longer than the patience can still end that way.) Deferred recipients keep it queued for them.
  const record = () =>
    withTransaction(pool, async (tx) => {
      const marked = await tx.query(
        `UPDATE mail_outbox SET status = CASE WHEN $5 THEN 'sent' ELSE status END, attempts = attempts + 1, sent_at = CASE WHEN $5 THEN now() ELSE sent_at END,
                delivered = $2, refused = $3, last_error = $4
          WHERE id = $1 AND status <> 'sent'`,
        [id, delivered, refused, lastError ? lastError.slice(0, 500) : null, done],
      );
      if (marked.rowCount === 1 && refusedNow.length > 0) {
        await appendAudit(tx, {
          identityId: row.identity_id,
          actor: 'mail:delivery',
          action: 'mail.recipients_refused',
          outcome: 'failed',
          detail: { messageId: id, purpose: row.purpose, delivered: report.accepted.length, refused: refusedNow },
        });
      }
    });
  try {
    await outlastingOutages(record, patienceMs, (err) => isDatabaseUnavailable(err) || isCommitUnconfirmed(err));
  } finally {
    clearInterval(renew);
  }
  if (!done) {
    // Recorded (the claim renewed meanwhile, through an outage too): given back once no renewal is
    // in flight (one landing later would take it again), for the retry to send to the deferred.
    await giveBack().catch(() => undefined);
    throw new Error(`the SMTP server deferred ${describeRefused(deferred)}; the message is sent to them again (it has reached ${delivered.length} of ${row.recipients.length})`);
  }
  return { result: 'sent', refused };
}

/**
 * Takes a message id for good: an abandoned row that holds nothing of a message (no recipients, no
 * text), `last_error` saying why (a refused notice's record, a delivery's tombstone). False if a
 * row had the id already.
 */
export async function abandonedPlaceholder(db: Db, row: { id: string; identityId?: string | null; purpose: string; marker: string; reason: string }): Promise<boolean> {
  const { rowCount } = await db.query(
    `INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body, status, last_error)
     VALUES ($1, $2, $3, '{}', $4, $4, 'abandoned', $5) ON CONFLICT (id) DO NOTHING`,
    [row.id, row.identityId ?? null, row.purpose, row.marker, row.reason],
  );
  return rowCount === 1;
}

/**
 * Mail retention: settled messages (sent or abandoned) queued before `cutoff` lose what they said and
 * to whom (recipients, subject, bodies, refused recipients, and the last error, which may be the SMTP
 * server's, naming addresses), at most `limit` of them, oldest first. Their rows stay: the id keeps a
 * notice from being queued again, and the status and times answer repeats and escalations. A last
 * error that is one of `keptErrors` (the service's own records that an escalation reads) is kept.
 * Returns how many were erased.
 */
export async function eraseSettledMail(db: Db, cutoff: Date, limit: number, keptErrors: string[]): Promise<number> {
  const { rowCount } = await db.query(
    `UPDATE mail_outbox m
        SET recipients = '{}', refused = '{}', delivered = '{}', subject = '', text_body = '', html_body = NULL,
            last_error = CASE WHEN m.last_error = ANY($3::text[]) THEN m.last_error END, erased_at = now()
      WHERE m.id IN (SELECT id FROM mail_outbox
                      WHERE erased_at IS NULL AND created_at < $1 AND status <> 'queued'
                      ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)`,
    [cutoff, limit, keptErrors],
  );
  return rowCount ?? 0;
}

export async function abandonMail(db: Db, id: string, reason: string): Promise<void> {
  await db.query(`UPDATE mail_outbox SET status = 'abandoned', last_error = $2 WHERE id = $1 AND status = 'queued'`, [id, reason]);
}

/**
 * A message its delivery gave up on (a day of retries, every recipient refused or the server away):
 * marked abandoned, and the sender's audit log says so (`mail.undelivered`, with the last error), in
 * one transaction. Before, it stayed `queued` for good and the only row was mail.send's `ok`. A
 * message sent meanwhile is left as it is; one an attempt still holds (its claim live: the day ran
 * out while it talked to a slow relay, and it may yet be sent) is waited for, by failing (retried).
 * Whether this call marked it.
 */
export async function giveUpMail(pool: Pool, id: string, error: string): Promise<boolean> {
  return withTransaction(pool, async (tx) => {
    // One that reached some recipients (others deferred it for the day) is sent, to them: the
    // deferred ones join the refused, and the audit row names them.
    const partly = await tx.query(
      `WITH m AS (SELECT id, ARRAY(SELECT r FROM unnest(recipients) r WHERE lower(r) <> ALL (SELECT lower(x) FROM unnest(delivered || refused) x)) AS deferred
                    FROM mail_outbox WHERE id = $1 AND status = 'queued' AND cardinality(delivered) > 0 AND (lease_until IS NULL OR lease_until <= now()) FOR UPDATE)
       UPDATE mail_outbox o SET status = 'sent', sent_at = now(), refused = o.refused || m.deferred FROM m WHERE o.id = m.id
       RETURNING o.identity_id, o.purpose, o.last_error, cardinality(o.delivered) AS delivered, m.deferred AS refused`,
      [id],
    );
    if (partly.rows[0]) {
      const given = partly.rows[0];
      await appendAudit(tx, {
        identityId: given.identity_id,
        actor: 'mail:delivery',
        action: 'mail.recipients_refused',
        outcome: 'failed',
        detail: { messageId: id, purpose: given.purpose, delivered: given.delivered, refused: (given.refused as string[]).map((address) => ({ address })), error: given.last_error },
      });
      return true;
    }
    const { rows } = await tx.query(
      `UPDATE mail_outbox SET status = 'abandoned', last_error = coalesce(last_error, $2)
        WHERE id = $1 AND status = 'queued' AND (lease_until IS NULL OR lease_until <= now())
       RETURNING identity_id, purpose, attempts, last_error`,
      [id, `undelivered: ${error}`.slice(0, 500)],
    );
    const row = rows[0];
    if (!row) {
      const held = await tx.query(`SELECT 1 FROM mail_outbox WHERE id = $1 AND status = 'queued'`, [id]);
      if (held.rowCount) throw new Error(`message ${id} is still held by a delivery attempt; it is given up once that attempt ends`);
      return false;
    }
    await appendAudit(tx, {
      identityId: row.identity_id,
      actor: 'mail:delivery',
      action: 'mail.undelivered',
      outcome: 'failed',
      detail: { messageId: id, purpose: row.purpose, attempts: row.attempts, error: row.last_error },
    });
    return true;
  });
}

/**
 * Starts the delivery workflow of a queued message (deliverMail, mail:<id>) unless it is running
 * already; what the message's status is otherwise.
 */
export async function startDelivery(
  pool: Pool,
  temporal: { client: Client; taskQueue: string } | undefined,
  messageId: string,
): Promise<'handed-over' | 'already-sent' | 'abandoned' | 'missing'> {
  const status = (await pool.query('SELECT status FROM mail_outbox WHERE id = $1', [messageId])).rows[0]?.status as string | undefined;
  if (status === 'sent') return 'already-sent';
  if (status !== 'queued') return status === 'abandoned' ? 'abandoned' : 'missing';
  if (!temporal) throw new Error('no Temporal client here for starting deliveries');
  try {
    await temporal.client.workflow.start('deliverMail', { taskQueue: temporal.taskQueue, workflowId: `mail:${messageId}`, args: [{ messageId }] });
  } catch (err) {
    // Its delivery is running already (an earlier attempt, an earlier run or report, started it).
    if (!(err instanceof WorkflowExecutionAlreadyStartedError)) throw err;
  }
  return 'handed-over';
}
