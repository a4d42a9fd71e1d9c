import { createHash, randomBytes, randomUUID } from 'node:crypto';
import type { Services } from '../core/services';
import { seal, versionAad } from '../vault/crypto';

/**
 * Fills the vault with realistic credentials fast: the rows are what `vault.store` writes (a
 * credential row with a rotation policy, owners, tags and metadata; one version sealed with
 * AES-256-GCM under its identity's real data key, with its keyed fingerprint), inserted in large
 * batches with unnest() instead of one HTTP call each. next_rotation_at is set by the schema's
 * trigger on credentials. A fixed fraction is due (its version older than periodDays); those
 * carry a rotation window that is closed today, so a sweep selects them through the index and
 * defers them instead of rotating thousands of credentials (rotation cost is measured on its own).
 *
 * As a superuser (the embedded server's), a batch's versions go in first with
 * session_replication_role = replica (their foreign keys unchecked: the batch makes both sides;
 * their trigger, which touches each new version's credential to refresh its next_rotation_at, not
 * fired), then the credentials, whose insert trigger reads the version already there: each
 * credential row written once instead of inserted and then updated row by row, which was two
 * thirds of the seeding's time (100,000 credentials: 23.6 → ~12 s). Without the privilege, the
 * store's order (credential, then version and its trigger). The next batch is sealed while the
 * last one is written.
 */
export const SEEDING_METHOD =
  'in-process through the vault keys: real AES-256-GCM ciphertexts under each identity’s data key, keyed fingerprints, ' +
  'policy columns filled, inserted 5,000 rows per statement with unnest(); next_rotation_at set by the schema’s trigger on credentials ' +
  '(as a superuser each batch’s versions are inserted first, with session_replication_role = replica, so each credential row is written once)';

const BATCH = 5_000;
const PER_IDENTITY = 1_000;
const DAY_MS = 86_400_000;

export interface SeedState {
  seeded: number;
  due: number;
  identities: string[];
}

export function newSeedState(): SeedState {
  return { seeded: 0, due: 0, identities: [] };
}

/** Adds credentials until `total` are seeded; `dueEvery` = 100 makes 1% due. */
export async function seedTo(services: Services, state: SeedState, total: number, now: Date, dueEvery = 100): Promise<void> {
  const closedDay = (now.getUTCDay() + 3) % 7;
  const duePolicy = JSON.stringify({ provider: 'generated', settings: { length: 40 }, periodDays: 90, window: { days: [closedDay], startHour: 0, endHour: 24, timezone: 'UTC' } });
  const policy = JSON.stringify({ provider: 'generated', settings: { length: 40 }, periodDays: 90 });
  const versionsFirst = await isSuperuser(services);
  let writing: Promise<void> | undefined;
  try {
    while (state.seeded < total) {
      const batch = await sealBatch(services, state, Math.min(BATCH, total - state.seeded), now, dueEvery, { duePolicy, policy });
      await writing;
      writing = insertBatch(services, batch, versionsFirst);
      writing.catch(() => undefined); // awaited above or below; rejected meanwhile, not unhandled
    }
  } finally {
    await writing;
  }
  // Vacuumed as well as analysed: otherwise autovacuum, woken by the bulk insert, works through
  // the new rows during the next measurement and is measured as the vault's size.
  for (const table of ['credentials', 'secret_versions']) await services.pool.query(`VACUUM (ANALYZE) ${table}`);
}

interface Batch {
  n: number;
  cols: { id: string[]; identity: string[]; name: string[]; rotation: string[]; owner: string[]; tag: string[]; team: string[]; created: Date[] };
  versions: { keyId: string[]; sealed: Buffer[]; fingerprint: Buffer[] };
}

/** The next `n` credentials' rows, sealed; counted into `state` (seeded, due). */
async function sealBatch(
  services: Services,
  state: SeedState,
  n: number,
  now: Date,
  dueEvery: number,
  policies: { duePolicy: string; policy: string },
): Promise<Batch> {
  const cols: Batch['cols'] = { id: [], identity: [], name: [], rotation: [], owner: [], tag: [], team: [], created: [] };
  const versions: Batch['versions'] = { keyId: [], sealed: [], fingerprint: [] };
  for (let k = 0; k < n; k++) {
    const i = state.seeded + k;
    const owner = await identityFor(services, state, Math.floor(i / PER_IDENTITY));
    const key = await services.dataKeys.active(services.pool, owner);
    const id = randomUUID();
    const due = i % dueEvery === 0;
    const value = `sk_seed_${randomBytes(24).toString('base64url')}`;
    const plaintext = Buffer.from(value, 'utf8');
    cols.id.push(id);
    cols.identity.push(owner);
    cols.name.push(`seed-${i}`);
    cols.rotation.push(due ? policies.duePolicy : policies.policy);
    cols.owner.push(`team-${i % 50}@example.com`);
    cols.tag.push(`svc-${i % 20}`);
    cols.team.push(`team-${i % 50}`);
    cols.created.push(new Date(now.getTime() - (due ? 120 : i % 80) * DAY_MS - (i % 1000) * 1000));
    versions.keyId.push(key.id);
    versions.sealed.push(seal(key.key, plaintext, versionAad(owner, id, 1)));
    versions.fingerprint.push(await services.secrets.fingerprintOfSha256(services.pool, createHash('sha256').update(plaintext).digest()));
    if (due) state.due += 1;
  }
  state.seeded += n;
  return { n, cols, versions };
}

async function insertBatch(services: Services, { n, cols, versions }: Batch, versionsFirst: boolean): Promise<void> {
  const client = await services.pool.connect();
  const insertCredentials = () =>
    client.query(
      `INSERT INTO credentials (id, identity_id, name, kind, current_version, rotation, owners, tags, metadata, service, created_at, updated_at)
       SELECT id, identity, name, 'api_key', 1, rotation, ARRAY[owner], ARRAY['bench', tag], jsonb_build_object('team', team, 'seeded', true), tag, created, created
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
           AS t(id, identity, name, rotation, owner, tag, team, created)`,
      [cols.id, cols.identity, cols.name, cols.rotation, cols.owner, cols.tag, cols.team, cols.created],
    );
  const insertVersions = () =>
    client.query(
      `INSERT INTO secret_versions (credential_id, version, data_key_id, sealed, fingerprint, created_at)
       SELECT * FROM unnest($1::uuid[], array_fill(1, ARRAY[$6::int]), $2::uuid[], $3::bytea[], $4::bytea[], $5::timestamptz[])`,
      [cols.id, versions.keyId, versions.sealed, versions.fingerprint, cols.created, n],
    );
  try {
    await client.query('BEGIN');
    if (versionsFirst) {
      await client.query('SET LOCAL session_replication_role = replica');
      await insertVersions();
      await client.query('SET LOCAL session_replication_role = origin');
      await insertCredentials();
    } else {
      await insertCredentials();
      await insertVersions();
    }
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  } finally {
    client.release();
  }
}

async function isSuperuser(services: Services): Promise<boolean> {
  return (await services.pool.query(`SELECT current_setting('is_superuser') = 'on' AS su`)).rows[0].su === true;
}

async function identityFor(services: Services, state: SeedState, index: number): Promise<string> {
  while (state.identities.length <= index) {
    const created = await services.identities.create({ name: `seed-owner-${state.identities.length}-${randomBytes(3).toString('hex')}`, email: 'owners@example.com' }, { actor: 'admin' });
    state.identities.push(created.id);
  }
  return state.identities[index]!;
}
