import { randomUUID } from 'node:crypto';
import type { Pool, PoolClient } from 'pg';
import type { Db } from '../db/pool';
import { type AppError, ConflictError, refWithheld, unconfirmedChange, UnavailableError, UnprocessableError, VersionConflictError } from '../core/errors';
import { appendAuditRows, type AuditEntry, callerEntry, errorDetail, markAudited, outcomeOf } from './audit';
import type { SecretStore } from './secret-store';
import { aKind, type Caller, type Kind, type StoredVersion, type StoreInput } from './types';
import { withhold } from './withheld';
import { asSeed, inputSeedOf } from './totp';

/**
 * Group commit for vault.store, as read-batch.ts is for reads.
 *
 * A store's audit row takes the chain lock until its commit has flushed, and its version's insert
 * locks the data key's row: stores committed one at a time, ~830 a second on this machine however
 * many arrived together, and at 32 connections each waited for the thirty-one before it. So stores
 * that arrive while a batch runs wait for the next one, and a batch is one transaction: one statement
 * locks or creates every credential and makes each next version current (the vault_store_prepare
 * migration), the values are sealed here, one statement inserts every version (each data key counts
 * its encryptions at once) and appends every audit row, and one commit makes them durable together:
 * four statements with BEGIN. (The audit rows in a statement of their own, five: 1.8% slower over
 * HTTP in paired runs.)
 * A call gets its answer only after that commit.
 *
 * A call the credential refuses (deleted, another version expected, another kind) writes nothing; it
 * gets its own audit row with its outcome in the same commit and fails alone. Anything else that goes
 * wrong before the COMMIT is sent (a data key at its limit, a constraint, a lost connection) rolls the
 * batch back and every call in it stores alone (Vault's one-call path), which handles each case as
 * it always has, so the batch is only ever faster, never different. A COMMIT that fails is not
 * retried (its answer may be all that was lost): every call that would have stored fails with a 503
 * that says it may have been committed, as a single store's failed COMMIT fails; a call the batch
 * refused stored nothing either way, and fails with a plain 503 (its refusal's row is not confirmed
 * either, so it is not answered with the refusal). A name is in a batch at most once: a
 * second store of it waits for the next batch, and sees the first one's version.
 *
 * Stores that also set policy (owners, rotation, dependents …) always store alone: they are rare, and
 * their columns vary per call.
 */

/** Calls per batch: enough to amortise the commit, few enough that one batch stays short. */
export const MAX_STORE_BATCH = 64;

interface Pending {
  caller: Caller;
  input: StoreInput;
  plaintext: string;
  resolve: (value: StoredVersion) => void;
  reject: (err: unknown) => void;
}

/**
 * What a batch's calls get once it commits; `refused`, the calls it refused (which store nothing);
 * `stored`, the credential and version each other call stores (its row names them if the COMMIT's
 * answer is lost, as a single store's does: the credential's own trail shows the attempt).
 */
interface Settled {
  deliver: (() => void)[];
  refused: ReadonlySet<Pending>;
  /** Refused for a name that is a secret (secretName): its rows never carry the name. */
  secretNamed: ReadonlySet<Pending>;
  stored: ReadonlyMap<Pending, { id: string; version: number }>;
}

interface Found {
  currentVersion: number;
  kind: Kind;
  deleted: boolean;
}

/**
 * Why a store may not go on, given what its name holds (null: no credential yet); undefined if it may.
 * Both store paths decide with this.
 */
export function storeRefusal(input: StoreInput, found: Found | null): AppError | undefined {
  if (!found) {
    if (input.expectedVersion !== undefined && input.expectedVersion !== 0) {
      return new VersionConflictError(`credential '${input.name}' does not exist yet; expectedVersion must be 0 or absent`, null);
    }
    return undefined;
  }
  if (found.deleted) return new ConflictError(`credential '${input.name}' is deleted; restore it, or destroy it to reuse the name`);
  if (input.expectedVersion !== undefined && input.expectedVersion !== found.currentVersion) {
    return new VersionConflictError(`credential '${input.name}' is at version ${found.currentVersion}, not ${input.expectedVersion}`, found.currentVersion);
  }
  if (found.kind !== input.kind) return new UnprocessableError(`credential '${input.name}' is ${aKind(found.kind)}; its kind cannot change to ${input.kind}`);
  return undefined;
}

/**
 * The refusal of a store whose name finds no credential of the caller's (a new one, or
 * `expectedVersion` for none) when the name is a secret: a value the caller can read (`readable`,
 * vault/withheld.ts: its own or granted to it; not any identity's, or the refusal would confirm a
 * guess at another's), or the value it comes with. A name is not secret: it is listed, mailed in
 * notices and written into every audit row of the credential, so such a store would spread the value
 * everywhere. Nothing is stored, and the refusal's row withholds the name.
 */
export function secretName(input: StoreInput, readable: boolean): AppError | undefined {
  // A TOTP seed comes as its base32 (or in a URI), in any spelling: the name is compared as a seed.
  const seed = input.kind === 'totp_seed' && input.totp ? inputSeedOf(input.totp) : undefined;
  const ownValue = input.value === input.name || (seed !== undefined && asSeed(input.name) === seed);
  if (!readable && !ownValue) return undefined;
  return refWithheld(
    new UnprocessableError(
      `the name given is ${readable ? 'a value stored in the vault' : 'the value being stored'}: a name is not secret (it is listed, mailed in notices and audited), so nothing was stored, and the name is neither repeated here nor written to the audit log. Choose a name that does not hold the value`,
    ),
  );
}

export const UNCONFIRMED_STORE =
  'the store could not be confirmed: it may have been committed before the database connection failed; read the credential (or store with expectedVersion) before trying again';

/** A call its batch refused, when the batch's COMMIT failed: it could not have stored anything. */
const UNANSWERED_REFUSAL = 'the store could not be answered (the database connection failed); it stored nothing: try again shortly';

const PREPARE = 'SELECT * FROM vault_store_prepare($1::uuid[], $2::text[], $3::text[], $4::int[], $5::uuid[], $6::timestamptz)';

export class StoreBatcher {
  private queue: Pending[] = [];
  private running = false;
  /** Batches run and the calls they carried, stored alone after a rollback or not (for /metrics and the bench). */
  readonly stats = { batches: 0, calls: 0, fallbacks: 0 };

  constructor(
    private readonly pool: Pool,
    private readonly secrets: Pick<SecretStore, 'insertMany' | 'readableAmong'>,
    private readonly clock: () => Date,
    /** Vault's one-call path, for every call of a batch that rolled back. */
    private readonly alone: (caller: Caller, input: StoreInput) => Promise<StoredVersion>,
    private readonly maxBatch = MAX_STORE_BATCH,
  ) {}

  /** Stores `plaintext` (the value as sealed: a TOTP seed's otpauth URI) as `input` asks. */
  store(caller: Caller, input: StoreInput, plaintext: string): Promise<StoredVersion> {
    return new Promise<StoredVersion>((resolve, reject) => {
      this.queue.push({ caller, input, plaintext, resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    if (this.running || this.queue.length === 0) return;
    this.running = true;
    void this.run(this.take()).finally(() => {
      this.running = false;
      this.pump();
    });
  }

  /**
   * The next batch: queued calls, each name once, the rest left queued in order. The batch is sorted
   * by identity and name, the order its credentials' rows are locked in: two batches (of two API
   * processes) lock shared rows in the same order, so they wait for each other and never deadlock.
   */
  private take(): Pending[] {
    const keys = new Map<Pending, string>();
    const batch: Pending[] = [];
    const rest: Pending[] = [];
    const taken = new Set<string>();
    for (const p of this.queue) {
      const key = `${p.caller.identityId}\u0000${p.input.name}`;
      if (batch.length < this.maxBatch && !taken.has(key)) {
        taken.add(key);
        keys.set(p, key);
        batch.push(p);
      } else {
        rest.push(p);
      }
    }
    this.queue = rest;
    return batch.sort((a, b) => (keys.get(a)! < keys.get(b)! ? -1 : 1));
  }

  private async run(batch: Pending[]): Promise<void> {
    this.stats.batches += 1;
    this.stats.calls += batch.length;
    let client: PoolClient;
    try {
      client = await this.pool.connect();
    } catch {
      return this.fallBack(batch);
    }
    let settled: Settled;
    try {
      await client.query('BEGIN');
      settled = await this.commit(client, batch);
    } catch {
      const rolledBack = await client.query('ROLLBACK').then(() => true, () => false);
      client.release(!rolledBack);
      return this.fallBack(batch);
    }
    try {
      await client.query('COMMIT');
    } catch {
      client.release(true);
      return this.unconfirmed(batch, settled);
    }
    client.release();
    for (const deliver of settled.deliver) deliver();
  }

  /** Nothing of the batch committed: each call stores alone. */
  private async fallBack(batch: Pending[]): Promise<void> {
    this.stats.fallbacks += 1;
    await Promise.all(batch.map((p) => this.alone(p.caller, p.input).then(p.resolve, p.reject)));
  }

  /**
   * The COMMIT failed: the batch may be durable (only its answer lost) or not, so no call is stored
   * again. Each fails with a 503 and, if the database takes it, a failure row of its own: marked
   * unconfirmed (as audited() marks a single store's) for a call that would have stored; a plain 503
   * for one the batch refused, which stored nothing.
   */
  private async unconfirmed(batch: Pending[], { refused, secretNamed, stored }: Settled): Promise<void> {
    const errors = batch.map((p) => (refused.has(p) ? new UnavailableError(UNANSWERED_REFUSAL) : unconfirmedChange(UNCONFIRMED_STORE)));
    const audited = await appendAuditRows(
      this.pool,
      batch.map((p, i) => {
        const at = stored.get(p);
        const entry = callerEntry(p.caller, 'vault.store', { name: p.input.name, ...(at ? { version: at.version } : {}), ...errorDetail(errors[i]), ...(refused.has(p) ? {} : { unconfirmed: true }) }, at?.id ?? null);
        // Withheld here as in the row the batch had written (before, the name went in as given: a secret, the request's own value even).
        if (secretNamed.has(p)) withhold(entry.detail!, 'name');
        return { ...entry, outcome: outcomeOf(errors[i]) };
      }),
    ).then(() => true, () => false);
    batch.forEach((p, i) => p.reject(audited ? markAudited(errors[i]) : errors[i]));
  }

  /** The batch's statements; what each call gets once they commit, and which calls it refused. Throws to roll back. */
  private async commit(tx: Db, batch: Pending[]): Promise<Settled> {
    const { rows } = await tx.query({
      name: 'vault-store-prepare',
      text: PREPARE,
      values: [
        batch.map((p) => p.caller.identityId),
        batch.map((p) => p.input.name),
        batch.map((p) => p.input.kind),
        batch.map((p) => p.input.expectedVersion ?? null),
        batch.map(() => randomUUID()),
        this.clock(),
      ],
    });
    // A name that found no credential (created now, or `absent`) and is a secret (secretName) is
    // refused here, its name withheld, and the credential PREPARE made for it goes (nothing else of
    // it was written): the rest of the batch stores as it would have. One look for the batch's new
    // names; none for a batch that found all its credentials.
    const secretNames = new Map<Pending, AppError>();
    const fresh = batch.filter((_, i) => rows[i]?.outcome === 'created' || rows[i]?.outcome === 'absent');
    if (fresh.length > 0) {
      const readable = await this.secrets.readableAmong(tx, fresh.map((p) => ({ readerId: p.caller.identityId, text: p.input.name })));
      fresh.forEach((p, i) => {
        const err = secretName(p.input, readable[i]!);
        if (err) secretNames.set(p, err);
      });
      const made = batch.flatMap((p, i) => (secretNames.has(p) && rows[i]?.outcome === 'created' ? [rows[i].cred_id as string] : []));
      if (made.length > 0) await tx.query('DELETE FROM credentials WHERE id = ANY($1::uuid[])', [made]);
    }
    const entries: AuditEntry[] = [];
    const stored: { p: Pending; id: string; version: number }[] = [];
    const refused: { p: Pending; err: AppError }[] = [];
    for (const [i, p] of batch.entries()) {
      const row = rows[i];
      if (!row || row.i !== i + 1) throw new Error('the store batch lost track of its calls');
      const secret = secretNames.get(p);
      if (secret) {
        const entry = callerEntry(p.caller, 'vault.store', {}, null);
        withhold(entry.detail!, 'name');
        entries.push({ ...entry, outcome: outcomeOf(secret), detail: { ...entry.detail, ...errorDetail(secret) } });
        refused.push({ p, err: secret });
        continue;
      }
      const entry = callerEntry(p.caller, 'vault.store', { name: p.input.name }, row.cred_id);
      entries.push(entry);
      if (row.outcome === 'ok' || row.outcome === 'created') {
        entry.detail!.version = row.new_version;
        stored.push({ p, id: row.cred_id, version: row.new_version });
        continue;
      }
      if (row.outcome === null) throw new Error(`the store batch's call ${i + 1} met a credential that changed under it`);
      const found = row.outcome === 'absent' ? null : { currentVersion: row.found_version, kind: row.found_kind, deleted: row.outcome === 'deleted' };
      const err = storeRefusal(p.input, found);
      if (!err) throw new Error(`the store batch could not place call ${i + 1} (${row.outcome})`);
      entry.outcome = outcomeOf(err);
      entry.detail = { ...entry.detail, ...errorDetail(err) };
      refused.push({ p, err });
    }
    let createdAt = this.clock();
    if (stored.length > 0) {
      // The versions and every call's audit row, in one statement.
      const at = await this.secrets.insertMany(
        tx,
        stored.map(({ p, id, version }) => ({ ownerId: p.caller.identityId, credentialId: id, version, value: p.plaintext, providerRef: p.input.externalId })),
        entries,
      );
      if (!at) throw new Error('a data key refused the batch its encryptions');
      createdAt = at;
    } else {
      await appendAuditRows(tx, entries);
    }
    const iso = createdAt.toISOString();
    return {
      deliver: [
        ...stored.map(({ p, id, version }) => () => p.resolve({ id, name: p.input.name, version, createdAt: iso })),
        ...refused.map(({ p, err }) => () => p.reject(markAudited(err))),
      ],
      refused: new Set(refused.map(({ p }) => p)),
      secretNamed: new Set(secretNames.keys()),
      stored: new Map(stored.map(({ p, id, version }) => [p, { id, version }])),
    };
  }
}
