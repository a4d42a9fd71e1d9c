import type { Db, Pool } from '../db/pool';
import type { Mailer } from './mailer';

/**
 * Every message is first written to the outbox (in the same transaction as its audit row), then
 * delivered by a retrying activity. Delivery is idempotent: a message marked sent is not sent again.
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

export async function deliverQueued(pool: Pool, mailer: Mailer, id: string): Promise<DeliveryResult> {
  const { rows } = await pool.query('SELECT * FROM mail_outbox WHERE id = $1', [id]);
  const row = rows[0];
  if (!row) return 'missing';
  if (row.status === 'sent') return 'already-sent';
  if (row.status === 'abandoned') return 'abandoned';
  try {
    await mailer.send({ id, to: row.recipients, subject: row.subject, text: row.text_body, html: row.html_body });
  } catch (err) {
    await pool.query('UPDATE mail_outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1', [id, (err as Error).message.slice(0, 500)]);
    throw err;
  }
  await pool.query(`UPDATE mail_outbox SET status = 'sent', attempts = attempts + 1, sent_at = now(), last_error = NULL WHERE id = $1`, [id]);
  return 'sent';
}

export async function abandonMail(db: Db, id: string, reason: string): Promise<void> {
  await db.query(`UPDATE mail_outbox SET status = 'abandoned', last_error = $2 WHERE id = $1 AND status = 'queued'`, [id, reason]);
}
