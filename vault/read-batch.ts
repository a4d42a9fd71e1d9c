import type { Pool } from 'pg';
import { NotFoundError, refWithheld, storedValueGiven, UnprocessableError } from '../core/errors';
import { storableText } from '../core/storable';
import { appendAuditRows, type AuditEntry, callerEntry, errorDetail, markAudited, outcomeOf } from './audit';
import type { SecretStore } from './secret-store';
import type { Caller, CredentialRef, Kind, VersionLabel } from './types';
import { STORED_VALUE, UNCHECKED, withhold } from './withheld';
import { UUID } from '../core/ids';

/**
 * Group commit for audited reads (vault.get, its masked form, vault.totp).
 *
 * Every audited call ends by inserting its audit row, which takes the chain lock until its commit has
 * flushed: one read at a time could commit, whatever the pool size. So reads that arrive while a
 * batch is running wait for the next one, and a batch is two statements: one finds every credential
 * its calls name; then, once the values are decrypted and each call's outcome is known, one appends
 * all their audit rows (the chain lock taken once) and commits them together. A call gets its value
 * only after that commit, so nothing leaves unaudited; a call that fails (not found, wrong kind, a
 * ciphertext that does not open) gets its own row with its outcome and fails alone. A batch whose
 * rows cannot be written fails all its calls with a 503, exactly as each would have failed alone.
 * A credential's last read is read from those rows (vault.ts): reads write nothing else, take no
 * row lock, and never wait on a rotation holding one. A batch with a call that found nothing looks,
 * between the two, for whether its reference is a value its caller can read, to withhold it from the
 * call's row (vault/withheld.ts): a batch that found every credential has no third statement.
 *
 * Round trips are what a batch costs under load (each waits a turn of a busy event loop), hence two
 * statements and no BEGIN/COMMIT: the second statement is its own transaction. The read needs no
 * transaction: at READ COMMITTED a read inside one saw no more than a statement's snapshot either.
 * Both are named (prepared once per connection): their text is not sent, parsed or planned again
 * (the read is a function for that: as a statement PostgreSQL planned it anew for every batch).
 * One statement that read and wrote the rows (its outcomes decided in SQL, values opened after the
 * commit) measured no faster: the commit's work, not the round trip, is the batch's cost.
 *
 * One batch runs at a time per batcher: with two in flight batches were half the size, and the
 * overlap gained less than the extra round trips cost (HTTP vault.get ~2,250 against ~2,600 req/s).
 * In the API the batcher runs in a worker thread of its own (read-thread.ts), where its round trips
 * are not kept waiting by HTTP work on the main event loop.
 */

export interface ReadRow {
  id: string;
  ownerId: string;
  name: string;
  kind: Kind;
  version: number;
  label: VersionLabel;
  /** The plaintext, or '' when the read does not open it. */
  value: string;
  createdAt: Date;
}

export interface ReadRequest<T> {
  caller: Caller;
  action: 'vault.get' | 'vault.totp';
  ref: CredentialRef;
  version?: number;
  /** The audit row's detail (never a value); the version read and any grant are added. */
  detail: Record<string, unknown>;
  /** Decrypt the value (false for masked reads). */
  open: boolean;
  /** Turns the row into the call's result before the audit row is written; a throw is the call's outcome. */
  finish: (row: ReadRow) => T;
}

interface Pending<T = unknown> extends ReadRequest<T> {
  resolve: (value: T) => void;
  reject: (err: unknown) => void;
}

/** Calls per batch: enough to amortise the commit, few enough that one batch stays short. */
export const MAX_BATCH = 128;
/** Batches in flight per process (see above for why one). */
export const MAX_IN_FLIGHT = 1;

/** The largest value of a PostgreSQL int (a version, an expected version). */
export const INT4_MAX = 2_147_483_647;

// Every credential the batch's calls name, row i for call i: see the vault_read_batch migration (a
// function, so that it runs on a cached generic plan instead of being planned for every batch).
const READ = 'SELECT * FROM vault_read_batch($1::uuid[], $2::text[], $3::uuid[], $4::int[])';

export class ReadBatcher {
  private queue: Pending[] = [];
  private inFlight = 0;
  /** Batches committed or failed since start, and the calls they carried (for /metrics and the bench). */
  readonly stats = { batches: 0, calls: 0 };

  constructor(
    private readonly pool: Pool,
    private readonly secrets: Pick<SecretStore, 'open' | 'readableAmong'>,
    private readonly maxBatch = MAX_BATCH,
    private readonly maxInFlight = MAX_IN_FLIGHT,
  ) {}

  read<T>(request: ReadRequest<T>): Promise<T> {
    const unusable = unrepresentable(request);
    if (unusable) return Promise.reject(new UnprocessableError(unusable));
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ ...request, resolve, reject } as Pending);
      this.pump();
    });
  }

  private pump(): void {
    while (this.inFlight < this.maxInFlight && this.queue.length > 0) {
      this.inFlight += 1;
      void this.run(this.queue.splice(0, this.maxBatch)).finally(() => {
        this.inFlight -= 1;
        this.pump();
      });
    }
  }

  private async run(batch: Pending[]): Promise<void> {
    this.stats.batches += 1;
    this.stats.calls += batch.length;
    let settled: Settled[] = [];
    try {
      const { rows } = await this.pool.query({
        name: 'vault-read-batch',
        text: READ,
        values: [
          batch.map((p) => p.caller.identityId),
          batch.map((p) => ('name' in p.ref ? p.ref.name : null)),
          batch.map((p) => ('id' in p.ref ? p.ref.id : null)),
          batch.map((p) => p.version ?? null),
        ],
      });
      const found = new Map<number, Record<string, any>>(rows.map((r) => [Number(r.i) - 1, r]));
      // A reference that found nothing is written into its row as given, unless it is a value its
      // caller can read (vault/withheld.ts): one look for the batch's, none for a batch that found every one.
      const missing = batch.filter((_, i) => !found.has(i));
      const withheld = new Map<Pending, typeof STORED_VALUE | typeof UNCHECKED>();
      if (missing.length > 0) {
        try {
          const readable = await this.secrets.readableAmong(this.pool, missing.map((p) => ({ readerId: p.caller.identityId, text: given(p.ref) })));
          missing.forEach((p, i) => readable[i] && withheld.set(p, STORED_VALUE));
        } catch {
          // Failed closed, and only for them: the calls that found their credential go on; these are
          // written withheld, unchecked (their answer a 404 that does not repeat them).
          for (const p of missing) withheld.set(p, UNCHECKED);
        }
      }
      settled = [];
      for (const [i, p] of batch.entries()) settled.push(await this.settle(p, found.get(i), withheld));
      // One statement, so one transaction: every audit row commits, or none (AuditUnavailableError).
      await appendAuditRows(this.pool, settled.map((s) => s.entry));
    } catch (err) {
      return this.failAll(batch, err, settled);
    }
    for (const s of settled) s.deliver();
  }

  /** Decides one call's outcome inside the batch: its audit row, and what to hand back after commit. */
  private async settle(p: Pending, row: Record<string, any> | undefined, withheld: ReadonlyMap<Pending, typeof STORED_VALUE | typeof UNCHECKED>): Promise<Settled> {
    const entry = auditEntry(p);
    if (!row) {
      const byId = 'id' in p.ref;
      const why = withheld.get(p);
      // (refDetail writes an id as `ref`, a name as `name`.)
      if (why) withhold(entry.detail!, byId ? 'ref' : 'name', why);
      const what = why ? `the ${byId ? 'id' : 'name'} given` : byId ? `id ${given(p.ref)}` : `name '${given(p.ref)}'`;
      const message = p.version ? `no version ${p.version} of a credential with ${what}` : `no credential with ${what}`;
      if (!why) return failed(p, entry, new NotFoundError(message));
      return failed(p, entry, refWithheld(new NotFoundError(why === STORED_VALUE ? `${message} (${storedValueGiven()})` : message)));
    }
    entry.credentialId = row.id;
    entry.detail!.version = row.version;
    if (row.identity_id !== p.caller.identityId) entry.detail!.grantedBy = row.identity_id;
    try {
      const value = p.open ? await this.secrets.open(this.pool, row.identity_id, row.id, row.name, row as never) : '';
      const result = p.finish({
        id: row.id,
        ownerId: row.identity_id,
        name: row.name,
        kind: row.kind,
        version: row.version,
        label: labelOf(row),
        value,
        createdAt: row.created_at,
      });
      return { entry, deliver: () => p.resolve(result) };
    } catch (err) {
      return failed(p, entry, err);
    }
  }

  /**
   * The batch did not commit: nothing it read is handed out. Each call's failure is audited in one
   * insert if the database takes it; if not, the error goes up unaudited (the API tries once more).
   */
  private async failAll(batch: Pending[], err: unknown, settled: Settled[] = []): Promise<void> {
    let audited = false;
    try {
      // A call the read found keeps what it learnt (its credential, version, and owner for a granted
      // one): the credential's trail (GET /v1/audit?credential=), the owner's included, shows the attempt.
      await appendAuditRows(
        this.pool,
        batch.map((p, i) => {
          const known = settled[i]?.entry;
          if (known) return failed(p, { ...auditEntry(p), credentialId: known.credentialId, detail: { ...known.detail } }, err).entry;
          // The read never decided (its statement failed: a timeout, a dropped connection): the
          // reference is not written as given, unchecked, as when the check itself fails.
          const entry = auditEntry(p);
          withhold(entry.detail!, 'id' in p.ref ? 'ref' : 'name', UNCHECKED);
          return failed(p, entry, err).entry;
        }),
      );
      audited = true;
    } catch {
      // reported unaudited below
    }
    for (const p of batch) p.reject(audited ? markAudited(err) : err);
  }
}

interface Settled {
  entry: AuditEntry;
  deliver: () => void;
}

/** The reference as the caller gave it: an id or a name. */
function given(ref: CredentialRef): string {
  return 'id' in ref ? ref.id : ref.name;
}

function auditEntry(p: Pending): AuditEntry {
  return callerEntry(p.caller, p.action, { ...p.detail });
}

function failed(p: Pending, entry: AuditEntry, err: unknown): Settled {
  entry.outcome = outcomeOf(err);
  entry.detail = { ...entry.detail, ...errorDetail(err) };
  return { entry, deliver: () => p.reject(markAudited(err)) };
}

function labelOf(row: Record<string, any>): VersionLabel {
  if (row.version === row.current_version) return 'current';
  if (row.version === row.previous_version) return 'previous';
  if (row.version === row.pending_version) return 'pending';
  return null;
}

/**
 * A reference the database could not take as a parameter would fail the whole batch, so it is
 * refused before it joins one. The API's schemas refuse all of these first; this guards the other callers.
 */
function unrepresentable(r: ReadRequest<unknown>): string | undefined {
  if (!UUID.test(r.caller.identityId)) return 'the caller is not a valid identity id';
  if ('id' in r.ref && !UUID.test(r.ref.id)) return 'id must be a UUID';
  if ('name' in r.ref && !storable(r.ref.name)) return 'name holds characters that cannot be stored';
  if (r.version !== undefined && !(Number.isInteger(r.version) && r.version >= 1 && r.version <= INT4_MAX)) return 'version must be a positive integer';
  if (!storable(r.detail) || !storable(r.caller.requestId ?? '') || !storable(r.caller.actor)) return 'the request holds characters that cannot be stored';
  return undefined;
}

export function storable(v: unknown): boolean {
  if (typeof v === 'string') return storableText(v);
  if (Array.isArray(v)) return v.every(storable);
  if (v && typeof v === 'object') return Object.entries(v).every(([k, x]) => storable(k) && storable(x));
  return true;
}
