import { randomUUID } from 'node:crypto';
import { outlastingOutages, type Db, type Pool } from '../db/pool';
import { AppError, AuditUnavailableError, unconfirmedChange } from '../core/errors';
import type { Logger } from '../core/logger';
import type { Caller } from './types';

/**
 * The audit log. Rows are chained by a database trigger (the foundation migration; since the
 * audit_chain_head_per_transaction one, only a transaction's first row reads the chain's head); this
 * module writes rows, lists them and re-checks the chain. Detail never holds a secret value.
 */
export type AuditOutcome = 'ok' | 'denied' | 'rejected' | 'conflict' | 'failed';

export interface AuditEntry {
  identityId: string | null;
  actor: string;
  action: string;
  credentialId?: string | null;
  outcome: AuditOutcome;
  requestId?: string | null;
  detail?: Record<string, unknown>;
  /** The interface the call came through (Caller.via); kept in the row's detail. */
  via?: string;
}

export interface AuditRow {
  seq: number;
  at: string;
  identityId: string | null;
  actor: string;
  action: string;
  credentialId: string | null;
  outcome: AuditOutcome;
  requestId: string | null;
  detail: Record<string, unknown>;
}

/** A caller's row for `action`, outcome ok until decided otherwise. */
export function callerEntry(caller: Caller, action: string, detail: Record<string, unknown>, credentialId: string | null = null): AuditEntry {
  return { identityId: caller.identityId, actor: caller.actor, action, credentialId, outcome: 'ok', requestId: caller.requestId, via: caller.via, detail };
}

/**
 * Append one row. Callers in a transaction make this their last statement: it takes the chain lock.
 * A row that cannot be written is an AuditUnavailableError (503), so the caller's transaction rolls
 * back and the request fails closed, whatever the database said.
 */
export function appendAudit(db: Db, e: AuditEntry): Promise<void> {
  return appendAuditRows(db, [e]);
}

/**
 * Writes the failure row of `err` (its outcome, and its kind added to `entry.detail`) and marks the
 * error audited, so the API's problem handler does not write another. Returns the error, marked only
 * if its row was written: one that cannot be audited either is left for the handler to try again.
 */
export async function auditFailure<E>(db: Db, entry: Omit<AuditEntry, 'outcome'>, err: E): Promise<E> {
  try {
    await appendAudit(db, { ...entry, outcome: outcomeOf(err), detail: { ...entry.detail, ...errorDetail(err) } });
  } catch {
    return err;
  }
  return markAudited(err);
}

/** How long the ok row of a change already made is tried again (at 0, 0.5 and 1.5 s). */
const AUDIT_AFTER_CHANGE_MS = 2_000;

/**
 * Appends the ok row of a change already made outside any transaction of the database (a Temporal
 * cancel, update or start): the change cannot roll back with its row. A row that cannot be written
 * is tried again for a moment; failing still, the answer must not be 503 audit-unavailable ("not
 * carried out": a retry would then meet the change, a rollback's as a 409), but a 503 marked
 * unconfirmed that says the change was made. It is logged (the row's fields: the audit log's own,
 * never a value) and, if the database takes it after all, audited as failed and unconfirmed, as
 * audited() does for a COMMIT without an answer. `change` names it for the caller.
 */
export async function auditChangeMade(deps: { pool: Pool; logger?: Pick<Logger, 'error'> }, entry: AuditEntry, change: string): Promise<void> {
  // A failed attempt's row may have been written all the same (only the answer lost): a retry looks
  // for it first, by a key of this write's own in its detail (a request id is the client's to choose,
  // and may repeat), so the change is not audited twice. (Not a guarantee: an attempt whose
  // connection failed while PostgreSQL still ran its insert, waiting for the chain's lock, may
  // commit after the look.)
  const row: AuditEntry = { ...entry, detail: { ...entry.detail, auditKey: randomUUID() } };
  let tried = false;
  const append = async () => {
    if (tried) {
      const written = await deps.pool
        // Among the newest rows only (the attempt was a moment ago; detail has no index): one backward walk of the primary key.
        .query(
          `SELECT 1 FROM (SELECT action, detail FROM audit_log ORDER BY seq DESC LIMIT 50000) recent
            WHERE action = $1 AND detail->>'auditKey' = $2 LIMIT 1`,
          [row.action, row.detail!.auditKey],
        )
        .catch(() => Promise.reject(new AuditUnavailableError()));
      if (written.rowCount) return;
    }
    tried = true;
    await appendAudit(deps.pool, row);
  };
  try {
    await outlastingOutages(append, AUDIT_AFTER_CHANGE_MS, (err) => err instanceof AuditUnavailableError);
  } catch (cause) {
    const { identityId, actor, action, credentialId, requestId, detail } = entry;
    deps.logger?.error({ err: cause, requestId, unaudited: { identityId, actor, action, credentialId, detail } }, 'a change was carried out, but its audit row could not be written');
    const err = Object.assign(
      unconfirmedChange(`${change} was carried out, but it could not be recorded in the audit log (the database is unavailable); check its result before trying again`),
      { cause },
    );
    throw await auditFailure(deps.pool, { ...entry, detail: { ...detail, unconfirmed: true } }, err);
  }
}

/** Appends rows in one statement, chained in the order given (one chain lock for all of them). */
export async function appendAuditRows(db: Db, entries: AuditEntry[]): Promise<void> {
  if (entries.length === 0) return;
  try {
    await db.query({ name: 'audit-append', text: auditInsertSql(1), values: auditValues(entries) });
  } catch (err) {
    throw Object.assign(new AuditUnavailableError(), { cause: err });
  }
}

/**
 * The insert of appendAuditRows, its seven parameters numbered from `first` (`auditValues` gives
 * them), for a statement that appends the rows along with other work (the store batch's version insert).
 */
export function auditInsertSql(first: number): string {
  const p = (k: number) => `$${first + k}`;
  return `INSERT INTO audit_log (identity_id, actor, action, credential_id, outcome, request_id, detail)
            SELECT identity_id, actor, action, credential_id, outcome, request_id, detail
              FROM unnest(${p(0)}::uuid[], ${p(1)}::text[], ${p(2)}::text[], ${p(3)}::uuid[], ${p(4)}::text[], ${p(5)}::text[], ${p(6)}::jsonb[])
                   WITH ORDINALITY AS e(identity_id, actor, action, credential_id, outcome, request_id, detail, n)
             ORDER BY n`;
}

export function auditValues(entries: AuditEntry[]): unknown[] {
  const column = <T>(f: (e: AuditEntry) => T) => entries.map(f);
  return [
    column((e) => e.identityId),
    column((e) => e.actor),
    column((e) => e.action),
    column((e) => e.credentialId ?? null),
    column((e) => e.outcome),
    column((e) => e.requestId ?? null),
    column((e) => JSON.stringify(e.via ? { ...e.detail, via: e.via } : (e.detail ?? {}))),
  ];
}

/**
 * SQL for a credential's last read: the time of its newest successful vault.get or vault.totp row
 * (the audit_log_reads index answers it). Every read has its row, so this is the only record kept.
 */
export function lastReadSql(credentialIdColumn: string): string {
  return `(SELECT max(a.at) FROM audit_log a
            WHERE a.credential_id = ${credentialIdColumn} AND a.action IN ('vault.get', 'vault.totp') AND a.outcome = 'ok')`;
}

export function outcomeOf(err: unknown): AuditOutcome {
  if (!(err instanceof AppError)) return 'failed';
  if (err.status === 401 || err.status === 403 || err.status === 404) return 'denied';
  if (err.status === 409) return 'conflict';
  if (err.status >= 400 && err.status < 500) return 'rejected';
  return 'failed';
}

/** What an audit row may say about an error: its kind, never its message (which might echo input). */
export function errorDetail(err: unknown): Record<string, unknown> {
  return err instanceof AppError ? { error: err.slug, status: err.status } : { error: 'internal' };
}

export interface AuditQuery {
  identityId?: string;
  credentialId?: string;
  since?: Date;
  afterSeq?: number;
  limit: number;
}

export async function listAudit(db: Db, q: AuditQuery): Promise<AuditRow[]> {
  // `since` as a place in the log too: no index has `at`, and the rows before it were all read
  // (every read writes one: millions a day), past the statement timeout, a 503 "try again".
  const after = q.since ? Math.max(q.afterSeq ?? 0, (await firstSeqAt(db, new Date(q.since.getTime() - CLOCK_STEP_MS))) - 1) : (q.afterSeq ?? 0);
  const { rows } = await db.query(
    `SELECT seq, at, identity_id, actor, action, credential_id, outcome, request_id, detail
       FROM audit_log
      WHERE ($1::uuid IS NULL OR identity_id = $1)
        AND ($2::uuid IS NULL OR credential_id = $2)
        AND ($3::timestamptz IS NULL OR at >= $3)
        AND seq > $4
      ORDER BY seq
      LIMIT $5`,
    [q.identityId ?? null, q.credentialId ?? null, q.since ?? null, after, q.limit],
  );
  return rows.map((r) => ({
    seq: Number(r.seq),
    at: (r.at as Date).toISOString(),
    identityId: r.identity_id,
    actor: r.actor,
    action: r.action,
    credentialId: r.credential_id,
    outcome: r.outcome,
    requestId: r.request_id,
    detail: r.detail,
  }));
}

/**
 * How far back a row's time may be from the row before it: a clock stepped back. Rows are stamped
 * under the chain's lock (seq, then clock_timestamp()), so their times rise with seq but for that.
 */
const CLOCK_STEP_MS = 60_000;

/**
 * Where the rows stamped at `at` or later begin: a seq before which every row is older, and from
 * which the first row is not (one past the newest row when none is; a rolled-back row's unused seq
 * may come first). A binary search over seq, a primary-key probe a step (some 40 for a billion
 * rows), since a row's time rises with its seq (CLOCK_STEP_MS aside).
 */
export async function firstSeqAt(db: Db, at: Date): Promise<number> {
  const bounds = (await db.query('SELECT min(seq) AS lo, max(seq) AS hi FROM audit_log')).rows[0];
  if (bounds.hi === null) return 1;
  let lo = Number(bounds.lo);
  let hi = Number(bounds.hi) + 1;
  // Invariant: every row before lo is older than `at`; the row at hi (or none, past the end) is not.
  while (lo < hi) {
    const mid = Math.floor((lo + hi) / 2);
    const row = (await db.query('SELECT seq, at FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT 1', [mid])).rows[0];
    if (!row || Number(row.seq) >= hi) hi = mid;
    else if ((row.at as Date) >= at) hi = Number(row.seq);
    else lo = Number(row.seq) + 1;
  }
  return lo;
}

export interface ChainReport {
  ok: boolean;
  rows: number;
  firstBroken?: { seq: number; reason: string };
  /** The newest row verified (seq and hash, hex): kept outside the database, it lets a later verify (`expected`) tell a rewrite. */
  head?: { seq: number; hash: string };
}

const GENESIS = Buffer.alloc(32);

/** sha256(prev_hash || audit_payload(a)), spelt out of pg_catalog's functions (see verifyAuditChain). */
const VERIFIED_HASH_SQL = `pg_catalog.sha256(a.prev_hash OPERATOR(pg_catalog.||) pg_catalog.convert_to(pg_catalog.jsonb_build_array(
    a.seq, pg_catalog.floor(EXTRACT(epoch FROM a.at) OPERATOR(pg_catalog.*) 1000000)::bigint, a.identity_id, a.actor, a.action,
    a.credential_id, a.outcome, a.request_id, a.detail)::text, 'UTF8'))`;
const BATCH = 5_000;

/**
 * Walks the whole chain in seq order, recomputing every hash; names the first row that fails. The
 * chain is plain SHA-256: it shows an edit or a removal made without recomputing the hashes after
 * it, not one made by a writer who recomputed them (the table's owner can disable its triggers).
 * Against that, `expected` (a head an earlier verify answered, kept outside the database): the row
 * at its seq must still be there with that hash, or the log was rewritten or cut back past it.
 */
export async function verifyAuditChain(pool: Pool, expected?: { seq: number; hash: string }): Promise<ChainReport> {
  let expectedPrev: Buffer = GENESIS;
  let after = 0;
  let rows = 0;
  let head: ChainReport['head'];
  let sawExpected = false;
  const against = (report: ChainReport): ChainReport => {
    if (!report.ok || !expected || sawExpected) return report;
    const reason =
      !head || head.seq < expected.seq
        ? 'the recorded head is gone: the log was cut back past it'
        : 'the recorded head is gone: its row was removed and the hashes after it recomputed';
    return { ok: false, rows, firstBroken: { seq: expected.seq, reason }, ...(head ? { head } : {}) };
  };
  for (;;) {
    // The payload is built here, of built-in functions only (schema-qualified), as audit_payload
    // (the foundation migration) builds it: not by calling that function, which the table's owner
    // can replace with one handing back a row's old bytes after editing it (its hash then matched,
    // and so did a head kept outside the database).
    const batch = await pool.query(
      `SELECT seq, prev_hash, hash, ${VERIFIED_HASH_SQL} AS computed
         FROM audit_log a WHERE seq > $1 ORDER BY seq LIMIT $2`,
      [after, BATCH],
    );
    for (const r of batch.rows as { seq: string; prev_hash: Buffer; hash: Buffer; computed: Buffer }[]) {
      const seq = Number(r.seq);
      if (!r.prev_hash.equals(expectedPrev)) {
        return { ok: false, rows, firstBroken: { seq, reason: 'chain link broken: the row before it was removed, inserted or rewritten' } };
      }
      if (!r.hash.equals(r.computed)) {
        return { ok: false, rows, firstBroken: { seq, reason: 'hash mismatch: the row was edited after it was written' } };
      }
      if (expected && seq === expected.seq) {
        if (r.hash.toString('hex') !== expected.hash.toLowerCase()) {
          return { ok: false, rows, firstBroken: { seq, reason: 'not the recorded head: the log was rewritten up to here, its hashes recomputed' } };
        }
        sawExpected = true;
      }
      expectedPrev = r.hash;
      after = seq;
      rows += 1;
      head = { seq, hash: r.hash.toString('hex') };
    }
    if (batch.rows.length < BATCH) return against({ ok: true, rows, ...(head ? { head } : {}) });
  }
}

const audited = new WeakSet<object>();

/** Marks an error as already written to the audit log, so outer layers do not write it twice. */
export function markAudited<E>(err: E): E {
  if (typeof err === 'object' && err !== null) audited.add(err);
  return err;
}

export function isAudited(err: unknown): boolean {
  return typeof err === 'object' && err !== null && audited.has(err);
}
