import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MAX_JSON_DEPTH } from '../api/endpoint';
import { type Db, withTransaction } from '../db/pool';
import { DataKeys } from '../vault/data-keys';
import { Keyring } from '../vault/keyring';
import { SecretStore } from '../vault/secret-store';
import { Vault } from '../vault/vault';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { rawRequest } from './support/raw-http';
import { harnessRoutes } from './support/routes';

/**
 * The hardening hostile input calls for: other identities' tokens on every route that names a
 * resource, security headers, header/size/depth limits, audit writes failing closed, and data keys
 * replaced long before GCM's nonce limit. (Throttling has its own describe below.)
 */
describe('hardening', () => {
  let h: Harness;
  let alice: { id: string; token: string; name: string };
  let bob: { id: string; token: string; name: string };
  let carol: { id: string; token: string; name: string };

  const problem = (res: { status: number; headers: Headers | Record<string, unknown>; body: any; text: string }, status: number, slug: string) => {
    expect(res.status).toBe(status);
    const type = res.headers instanceof Headers ? res.headers.get('content-type') : (res.headers['content-type'] as string);
    expect(type).toMatch(/^application\/problem\+json/);
    expect(res.body).toMatchObject({ type: `https://mailgent.dev/problems/${slug}`, status });
    expect(res.text).not.toMatch(/\bat .+\(|node_modules|\/work\/|\.ts:\d|SELECT|INSERT|pg_/);
  };

  beforeAll(async () => {
    h = await startHarness();
    alice = await h.createIdentity('alice-h', 'alice@example.com');
    bob = await h.createIdentity('bob-h');
    carol = await h.createIdentity('carol-h');
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  describe("another identity's token on every route that names a resource", () => {
    let privateId: string;
    let seedId: string;
    let deletedId: string;
    let grantId: string;
    let rotationId: string;

    beforeAll(async () => {
      const store = (body: unknown) => h.api('POST', '/v1/vault.store', { token: alice.token, body });
      privateId = (await store({ name: 'private', kind: 'generic', value: h.secret('alice-private-value'), tags: ['mine'] })).body.id;
      seedId = (await store({ name: 'alice-2fa', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DP') } })).body.id;
      deletedId = (await store({ name: 'binned', kind: 'generic', value: h.secret('alice-binned-value') })).body.id;
      expect((await h.api('DELETE', '/v1/credentials/binned', { token: alice.token })).status).toBe(200);
      const grant = await h.api('POST', '/v1/grants', { token: alice.token, body: { credential: privateId, grantee: carol.name } });
      expect(grant.status).toBe(201);
      grantId = grant.body.id;
      // A rotation of Alice's, without starting a workflow (the routes look it up by owner first).
      rotationId = randomUUID();
      await h.sql(`INSERT INTO rotations (id, identity_id, kind, workflow_id) VALUES ($1, $2, 'request', $3)`, [rotationId, alice.id, `rotation:${rotationId}`]);
      await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [rotationId, privateId, `rotate:${privateId}`]);
    });

    /** Each case: Bob's request on Alice's resource, and the same request naming nothing that exists. */
    const cases = () => {
      const ghost = randomUUID();
      return [
        { route: 'POST /v1/vault.get', alice: { body: { name: 'private' } }, none: { body: { name: 'no-such' } } },
        { route: 'POST /v1/vault.get', alice: { body: { id: privateId } }, none: { body: { id: ghost } } },
        { route: 'POST /v1/vault.get', alice: { body: { id: privateId, version: 1 } }, none: { body: { id: ghost, version: 1 } } },
        { route: 'POST /v1/vault.totp', alice: { body: { name: 'alice-2fa' } }, none: { body: { name: 'no-such' } } },
        { route: 'POST /v1/vault.totp', alice: { body: { id: seedId } }, none: { body: { id: ghost } } },
        { route: 'PATCH /v1/credentials/:ref', alice: { path: 'private', body: { tags: ['bob-was-here'] } }, none: { path: 'no-such', body: { tags: ['x'] } } },
        { route: 'PATCH /v1/credentials/:ref', alice: { path: privateId, body: { tags: ['bob-was-here'] } }, none: { path: ghost, body: { tags: ['x'] } } },
        { route: 'DELETE /v1/credentials/:ref', alice: { path: 'private' }, none: { path: 'no-such' } },
        { route: 'DELETE /v1/credentials/:ref', alice: { path: `${privateId}?destroy=true` }, none: { path: `${ghost}?destroy=true` } },
        { route: 'POST /v1/credentials/:ref/restore', alice: { path: deletedId }, none: { path: ghost } },
        { route: 'POST /v1/grants', alice: { body: { credential: privateId, grantee: bob.name } }, none: { body: { credential: ghost, grantee: bob.name } } },
        { route: 'DELETE /v1/grants/:id', alice: { path: grantId }, none: { path: ghost } },
        { route: 'POST /v1/rotations', alice: { body: { credentials: [privateId] } }, none: { body: { credentials: [ghost] } } },
        { route: 'GET /v1/rotations/:id', alice: { path: rotationId }, none: { path: ghost } },
        { route: 'DELETE /v1/rotations/:id', alice: { path: rotationId }, none: { path: ghost } },
        { route: 'POST /v1/rotations/:id/rollback', alice: { path: rotationId }, none: { path: ghost } },
        { route: 'POST /v1/leaks', alice: { body: { credential: privateId, source: 'bob' } }, none: { body: { credential: ghost, source: 'bob' } } },
      ];
    };

    it('every route with a path parameter is covered here, or refuses identity tokens altogether', async () => {
      const covered = new Set(cases().map((c) => c.route));
      const withParams = harnessRoutes(h).filter((r) => r.path.includes(':'));
      expect(withParams.length).toBeGreaterThan(5);
      const uncovered = [];
      for (const r of withParams.filter((r) => !covered.has(`${r.method} ${r.path}`))) {
        // An admin-only route answers an identity token 403 whatever it names; anything else must be listed above.
        const res = await h.api(r.method, r.path.replace(/:[A-Za-z]+/g, randomUUID()), { token: bob.token, body: {} });
        if (res.status !== 403) uncovered.push(`${r.method} ${r.path} → ${res.status}`);
      }
      expect(uncovered).toEqual([]);
    });

    it('answers 404 exactly as for a resource that does not exist, changes nothing, and audits the attempt', async () => {
      const before = await h.sql(
        `SELECT (SELECT row_to_json(c) FROM credentials c WHERE id = $1) AS cred, (SELECT row_to_json(g) FROM grants g WHERE id = $2) AS grant,
                (SELECT count(*) FROM secret_versions) AS versions, (SELECT count(*) FROM rotations) AS rotations, (SELECT count(*) FROM leak_incidents) AS leaks`,
        [privateId, grantId],
      );
      for (const c of cases()) {
        const [method, pattern] = c.route.split(' ') as [string, string];
        const send = async (variant: { path?: string; body?: unknown }, requestId: string) => {
          const route = variant.path ? pattern.replace(/:(ref|id)/, variant.path) : pattern;
          return h.api(method, route, { token: bob.token, body: variant.body, headers: { 'x-request-id': requestId } });
        };
        const requestId = `xid-${randomUUID()}`;
        const theirs = await send(c.alice, requestId);
        const nothing = await send(c.none, `none-${randomUUID()}`);
        expect({ route: c.route, status: theirs.status }).toEqual({ route: c.route, status: 404 });
        problem(theirs, 404, 'not-found');
        // No existence leak: the answer is the one for a ref that names nothing (bar the ref itself).
        const normalise = (text: string, ref?: { path?: string; body?: unknown }) =>
          [ref?.path?.split('?')[0], ...Object.values((ref?.body ?? {}) as Record<string, unknown>).flat()]
            .filter((v): v is string => typeof v === 'string' && v.length > 3)
            .reduce((t, v) => t.split(v).join('<ref>'), text)
            .replace(/"requestId":"[^"]+"/, '')
            .replace(/"instance":"[^"]+"/, '');
        expect(normalise(theirs.text, c.alice)).toBe(normalise(nothing.text, c.none));
        expect(theirs.text).not.toContain('alice-private-value');
        const rows = (await h.sql('SELECT identity_id, outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
        expect({ route: c.route, rows }).toMatchObject({ route: c.route, rows: [{ identity_id: bob.id, outcome: 'denied', detail: { error: 'not-found', status: 404 } }] });
      }
      const after = await h.sql(
        `SELECT (SELECT row_to_json(c) FROM credentials c WHERE id = $1) AS cred, (SELECT row_to_json(g) FROM grants g WHERE id = $2) AS grant,
                (SELECT count(*) FROM secret_versions) AS versions, (SELECT count(*) FROM rotations) AS rotations, (SELECT count(*) FROM leak_incidents) AS leaks`,
        [privateId, grantId],
      );
      expect(after.rows).toEqual(before.rows);
      expect((await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'private' } })).body.value).toBe('alice-private-value');
    });

    it("the audit list filtered by another identity's credential is empty, not an error, and the probe is audited as denied", async () => {
      const requestId = `audit-probe-${Date.now()}`;
      const res = await h.api('GET', `/v1/audit?credential=${privateId}`, { token: bob.token, headers: { 'x-request-id': requestId } });
      expect(res.status).toBe(200);
      expect(res.body.items).toEqual([]);
      // Before, nothing was written: Bob could check ids against Alice's trail without a trace.
      const rows = (await h.sql('SELECT identity_id, action, outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
      expect(rows).toEqual([{ identity_id: bob.id, action: 'audit.list', outcome: 'denied', detail: { credential: privateId, error: 'not-found' } }]);
    });

    it('a TOTP code for a seed Bob does not own is a 404; granted, he gets it by id', async () => {
      problem(await h.api('POST', '/v1/vault.totp', { token: bob.token, body: { id: seedId } }), 404, 'not-found');
      expect((await h.api('POST', '/v1/grants', { token: alice.token, body: { credential: seedId, grantee: bob.name } })).status).toBe(201);
      const code = await h.api('POST', '/v1/vault.totp', { token: bob.token, body: { id: seedId } });
      expect(code.status).toBe(200);
      expect(code.body.code).toMatch(/^\d{6}$/);
      // By name it stays Alice's: names are per owner.
      problem(await h.api('POST', '/v1/vault.totp', { token: bob.token, body: { name: 'alice-2fa' } }), 404, 'not-found');
    });
  });

  describe('security headers and limits', () => {
    it('every answer carries the security headers, errors and health checks too', async () => {
      const answers = [
        await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'headers', kind: 'generic', value: h.secret('header-check-value') } }),
        await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'headers' } }),
        await h.api('POST', '/v1/vault.get', { body: { name: 'headers' } }),
        await h.api('GET', '/v1/nothing-here'),
        await h.api('GET', '/healthz'),
      ];
      for (const res of answers) {
        expect(res.headers.get('strict-transport-security')).toBe('max-age=31536000; includeSubDomains');
        expect(res.headers.get('x-content-type-options')).toBe('nosniff');
        expect(res.headers.get('x-frame-options')).toBe('DENY');
        expect(res.headers.get('referrer-policy')).toBe('no-referrer');
        expect(res.headers.get('content-security-policy')).toBe("default-src 'none';frame-ancestors 'none'");
        expect(res.headers.get('cross-origin-resource-policy')).toBe('same-origin');
        expect(res.headers.get('cache-control')).toBe('no-store');
        expect(res.headers.get('x-powered-by')).toBeNull();
        // No ETag: one is a hash of the body, and a vault.get body holds the value.
        expect(res.headers.get('etag')).toBeNull();
      }
    });

    it('oversize headers get a 431 problem; a broken request line a 400 problem', async () => {
      const big = await rawRequest(h.url, { path: '/v1/credentials', headers: [['authorization', `Bearer ${alice.token}`], ['x-padding', 'p'.repeat(20_000)]] });
      expect(big.status).toBe(431);
      expect(big.headers['content-type']).toBe('application/problem+json');
      expect(big.body).toMatchObject({ type: 'https://mailgent.dev/problems/request-header-too-large', status: 431 });
      const many = await rawRequest(h.url, { path: '/healthz', headers: Array.from({ length: 400 }, (_, i) => [`x-h${i}`, 'v'.repeat(40)] as [string, string]) });
      expect(many.status).toBe(431);
      // Sent over a raw socket: a NUL in the request line is not HTTP.
      const { connect } = await import('node:net');
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = connect(Number(new URL(h.url).port), '127.0.0.1', () => socket.end('GET /v1/\0credentials HTTP/1.1\r\nHost: x\r\n\r\n'));
        let out = '';
        socket.on('data', (d) => (out += d));
        socket.on('end', () => resolve(out));
        socket.on('error', reject);
      });
      expect(answer).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/);
      expect(answer).toContain('"type":"https://mailgent.dev/problems/malformed-request"');
    });

    it(`JSON nested deeper than ${MAX_JSON_DEPTH} levels is a 400 problem, however deep; nothing is stored`, async () => {
      const before = (await h.sql('SELECT count(*)::int AS n FROM credentials')).rows[0].n;
      for (const depth of [MAX_JSON_DEPTH + 1, 5_000, 100_000]) {
        const nested = '{"a":'.repeat(depth) + '1' + '}'.repeat(depth);
        const raw = `{"name":"deep","kind":"generic","value":"v","metadata":${nested}}`;
        const res = await h.api('POST', '/v1/vault.store', { token: alice.token, raw, headers: { 'content-type': 'application/json' } });
        problem(res, depth * 6 > 256 * 1024 ? 413 : 400, depth * 6 > 256 * 1024 ? 'payload-too-large' : 'validation-failed');
        const arrays = `{"name":"deep","kind":"generic","value":"v","rotation":{"provider":"generated","settings":{"x":${'['.repeat(depth)}${']'.repeat(depth)}}}}`;
        const res2 = await h.api('POST', '/v1/vault.store', { token: alice.token, raw: arrays, headers: { 'content-type': 'application/json' } });
        problem(res2, depth * 2 > 256 * 1024 ? 413 : 400, depth * 2 > 256 * 1024 ? 'payload-too-large' : 'validation-failed');
        if (res2.status === 400) expect(res2.body.detail).toBe(`the request body is nested more than ${MAX_JSON_DEPTH} levels deep`);
      }
      // Just under the limit is an ordinary validation question.
      const ok = '{"a":'.repeat(MAX_JSON_DEPTH - 2) + '1' + '}'.repeat(MAX_JSON_DEPTH - 2);
      const shallow = await h.api('POST', '/v1/vault.store', { token: alice.token, raw: `{"name":"deep","kind":"generic","value":"v","metadata":${ok}}`, headers: { 'content-type': 'application/json' } });
      problem(shallow, 400, 'validation-failed');
      expect(shallow.body.errors.map((e: { path: string }) => e.path)).toEqual(['metadata.a']);
      expect((await h.sql('SELECT count(*)::int AS n FROM credentials')).rows[0].n).toBe(before);
    });
  });

  describe('audit writes fail closed', () => {
    const refuseAudit = (action: string) =>
      h.sql(`CREATE TRIGGER audit_refuse_test BEFORE INSERT ON audit_log FOR EACH ROW WHEN (NEW.action = '${action}') EXECUTE FUNCTION audit_log_refuse()`);
    const allowAudit = () => h.sql('DROP TRIGGER IF EXISTS audit_refuse_test ON audit_log');

    it('a TOTP code that cannot be audited is a 503 with no code', async () => {
      await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'guarded-2fa', kind: 'totp_seed', totp: { secret: h.secret('GEZDGNBVGY3TQOJQGEZDGNBV') } } });
      await refuseAudit('vault.totp');
      try {
        const res = await h.api('POST', '/v1/vault.totp', { token: alice.token, body: { name: 'guarded-2fa' } });
        problem(res, 503, 'audit-unavailable');
        expect(res.headers.get('retry-after')).toBe('5');
        expect(res.body.code).toBeUndefined();
        expect(res.text.replace(res.body.requestId, '')).not.toMatch(/\d{6}/);
      } finally {
        await allowAudit();
      }
      expect((await h.api('POST', '/v1/vault.totp', { token: alice.token, body: { name: 'guarded-2fa' } })).status).toBe(200);
    });

    it('a store that cannot be audited is a 503 and stores nothing', async () => {
      const before = (await h.sql('SELECT count(*)::int AS n FROM secret_versions')).rows[0].n;
      await refuseAudit('vault.store');
      try {
        problem(await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'unaudited', kind: 'generic', value: h.secret('unaudited-value') } }), 503, 'audit-unavailable');
      } finally {
        await allowAudit();
      }
      expect((await h.sql('SELECT count(*)::int AS n FROM secret_versions')).rows[0].n).toBe(before);
      expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name = 'unaudited'")).rows[0].n).toBe(0);
    });
  });

  describe('data keys', () => {
    it('a data key is replaced once it has made the configured number of encryptions; old versions still open', async () => {
      // A second vault on the same database with a tiny limit (the service's default is 2^30).
      const dataKeys = new DataKeys(h.services.pool, Keyring.fromSetting(h.keyringFile), { maxEncryptions: 3 });
      const vault = new Vault(h.services.pool, new SecretStore(dataKeys, () => new Date()));
      const dave = await h.createIdentity('dave-h');
      const caller = { identityId: dave.id, actor: `identity:${dave.id}` };
      const keyOf = async (version: number) =>
        (await h.sql(`SELECT v.data_key_id FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.identity_id = $1 AND c.name = 'counted' AND v.version = $2`, [dave.id, version])).rows[0]
          .data_key_id as string;

      // One seal through the API first: its process caches dave's key as the active one.
      expect((await h.api('POST', '/v1/vault.store', { token: dave.token, body: { name: 'counted', kind: 'generic', value: h.secret('counted-value-1') } })).status).toBe(201);
      for (let v = 2; v <= 7; v++) await vault.store(caller, { name: 'counted', kind: 'generic', value: h.secret(`counted-value-${v}`) });
      const keys = await h.sql('SELECT id, encryptions, retired_at IS NOT NULL AS retired FROM data_keys WHERE identity_id = $1 ORDER BY created_at', [dave.id]);
      // Seals 1-3 under the first key, 4-6 under the second, the 7th under a third.
      expect(keys.rows.map((k) => [Number(k.encryptions), k.retired])).toEqual([
        [3, true],
        [3, true],
        [1, false],
      ]);
      expect(await keyOf(1)).toBe(keys.rows[0].id);
      expect(await keyOf(3)).toBe(keys.rows[0].id);
      expect(await keyOf(4)).toBe(keys.rows[1].id);
      expect(await keyOf(7)).toBe(keys.rows[2].id);

      // The API process still had the first key cached as active: it must notice the retirement.
      expect((await h.api('POST', '/v1/vault.store', { token: dave.token, body: { name: 'counted', kind: 'generic', value: h.secret('counted-value-8') } })).status).toBe(201);
      expect(await keyOf(8)).toBe(keys.rows[2].id);
      for (let v = 1; v <= 8; v++) {
        const read = await h.api('POST', '/v1/vault.get', { token: dave.token, body: { name: 'counted', version: v } });
        expect(read.body.value).toBe(`counted-value-${v}`);
      }
      expect(Number((await h.sql('SELECT encryptions FROM data_keys WHERE id = $1', [keys.rows[2].id])).rows[0].encryptions)).toBe(2);
    });

    it('an unwrapped data key is cached once (read, then sealed with: the same buffer) and zeroed once it expires, asked for again or not', async () => {
      const dataKeys = new DataKeys(h.services.pool, Keyring.fromSetting(h.keyringFile), { cacheTtlMs: 300, zeroDelayMs: 0 });
      const fran = await h.createIdentity('fran-h');
      const keyId = (await h.sql('SELECT id FROM data_keys WHERE identity_id = $1', [fran.id])).rows[0].id as string;
      const read = await dataKeys.byKeyId(h.services.pool, fran.id, keyId);
      const active = await dataKeys.active(h.services.pool, fran.id);
      // Before, the active key was a second copy: the first left the cache without being zeroed.
      expect(active.key).toBe(read.key);
      expect(read.key.equals(Buffer.alloc(read.key.length))).toBe(false);
      // Nobody asks for it again: the sweep drops it and zeroes it all the same.
      await new Promise((r) => setTimeout(r, 1_000));
      expect(read.key.equals(Buffer.alloc(read.key.length))).toBe(true);
      // And a later call unwraps it afresh.
      const again = await dataKeys.active(h.services.pool, fran.id);
      expect(again.key).not.toBe(read.key);
      expect(again.key.equals(Buffer.alloc(again.key.length))).toBe(false);
    });

    it('a seal refused under a successor not yet committed leaves it active: one rollover, not two', async () => {
      // B's rollover waits at this gate, so A can commit between B's refused seal and its rollover.
      let gate: Promise<void> | undefined;
      let atGate!: () => void;
      const reached = new Promise<void>((resolve) => (atGate = resolve));
      class Gated extends DataKeys {
        override async rollOver(db: Db, identityId: string, keyId: string): Promise<void> {
          if (gate) {
            atGate();
            await gate;
          }
          return super.rollOver(db, identityId, keyId);
        }
      }
      const pool = h.services.pool;
      const dataKeys = new Gated(pool, Keyring.fromSetting(h.keyringFile), { maxEncryptions: 2 });
      const secrets = new SecretStore(dataKeys, () => new Date());
      const fay = await h.createIdentity('fay-h');
      const credential = async (name: string): Promise<string> =>
        (
          await h.sql(
            `INSERT INTO credentials (id, identity_id, name, kind, current_version, created_at, updated_at)
             VALUES (gen_random_uuid(), $1, $2, 'generic', 1, now(), now()) RETURNING id`,
            [fay.id, name],
          )
        ).rows[0].id as string;
      const [spent, a, b] = [await credential('spent'), await credential('a'), await credential('b')];
      // The first key's two encryptions.
      for (const version of [1, 2]) await withTransaction(pool, (tx) => secrets.insert(tx, fay.id, spent, version, h.secret(`fay-spent-${version}`)));

      // A: the first key is spent, so A retires it and seals under a successor made in its own
      // transaction, which it does not commit yet.
      const txA = await pool.connect();
      const txB = await pool.connect();
      try {
        await txA.query('BEGIN');
        await secrets.insert(txA, fay.id, a, 1, h.secret('fay-a'));
        // B is handed that successor (the cache has it), and its seal is refused: the row is not
        // visible to B. A commits before B's rollover runs.
        let open!: () => void;
        gate = new Promise<void>((resolve) => (open = resolve));
        await txB.query('BEGIN');
        const sealB = secrets.insert(txB, fay.id, b, 1, h.secret('fay-b'));
        await reached;
        gate = undefined;
        await txA.query('COMMIT');
        open();
        await sealB;
        await txB.query('COMMIT');
      } finally {
        txA.release();
        txB.release();
      }
      const keys = await h.sql('SELECT id, encryptions, retired_at IS NOT NULL AS retired FROM data_keys WHERE identity_id = $1 ORDER BY created_at', [fay.id]);
      expect(keys.rows.map((k) => [Number(k.encryptions), k.retired])).toEqual([
        [2, true],
        [2, false],
      ]);
      const sealedUnder = await h.sql('SELECT c.name, v.data_key_id FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.id = ANY($1) ORDER BY c.name', [[a, b]]);
      expect(sealedUnder.rows.map((r) => r.data_key_id)).toEqual([keys.rows[1].id, keys.rows[1].id]);
    });

    it('concurrent seals are all counted', async () => {
      const erin = await h.createIdentity('erin-h');
      const stores = await Promise.all(
        Array.from({ length: 12 }, (_, i) =>
          h.api('POST', '/v1/vault.store', { token: erin.token, body: { name: `c${i}`, kind: 'generic', value: h.secret(`concurrent-value-${i}`) } }),
        ),
      );
      expect(stores.map((s) => s.status)).toEqual(Array(12).fill(201));
      const { rows } = await h.sql('SELECT sum(encryptions)::int AS n FROM data_keys WHERE identity_id = $1', [erin.id]);
      expect(rows[0].n).toBe(12);
    });
  });
});

describe('throttling clients that present invalid tokens', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  const LIMIT = 5;

  beforeAll(async () => {
    h = await startHarness({ authFailures: { maxFailures: LIMIT, windowMs: 60_000 } });
    agent = await h.createIdentity('throttled-agent');
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  const guess = (localAddress?: string, requestId: string = randomUUID()) =>
    rawRequest(h.url, {
      method: 'POST',
      path: '/v1/vault.get',
      localAddress,
      headers: [
        ['authorization', `Bearer mgt_${randomUUID()}`],
        ['content-type', 'application/json'],
        ['x-request-id', requestId],
      ],
      body: '{"name":"x"}',
    });

  it('brute force gets a 429 with Retry-After; tokens that worked from that client keep working; other clients are not affected', async () => {
    expect((await h.api('GET', '/v1/credentials', { token: agent.token })).status).toBe(200);
    const answers = [];
    for (let i = 0; i < LIMIT + 3; i++) answers.push(await guess());
    expect(answers.map((a) => a.status)).toEqual([...Array(LIMIT).fill(401), 429, 429, 429]);
    const throttled = answers.at(-1)!;
    expect(throttled.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(throttled.body).toMatchObject({ type: 'https://mailgent.dev/problems/too-many-requests', status: 429 });
    expect(Number(throttled.headers['retry-after'])).toBeGreaterThan(0);
    expect(Number(throttled.headers['retry-after'])).toBeLessThanOrEqual(60);

    // The agent's token worked from here before: it is not throttled, however often it is used.
    for (let i = 0; i < 10; i++) expect((await h.api('GET', '/v1/credentials', { token: agent.token })).status).toBe(200);
    // The admin token too; but a token never seen from this client waits like a guess.
    const fresh = await h.createIdentity('fresh-agent');
    const refused = await h.api('GET', '/v1/credentials', { token: fresh.token });
    expect(refused.status).toBe(429);
    // Another client (another source address) is not affected: its valid token works, its bad one is a 401.
    const other = await rawRequest(h.url, { path: '/v1/credentials', localAddress: '127.0.0.2', headers: [['authorization', `Bearer ${fresh.token}`]] });
    expect(other.status).toBe(200);
    expect((await guess('127.0.0.2')).status).toBe(401);
    // Without a token there is nothing to guess: still a plain 401.
    expect((await h.api('GET', '/v1/credentials')).status).toBe(401);
  });

  it('a parallel burst of guesses gets no more than the limit checked; a parallel burst with a valid token is never throttled', async () => {
    // Before, every guess of a burst was checked against a count that the others had not yet raised:
    // all forty were looked up and answered 401.
    const burst = await Promise.all(Array.from({ length: 40 }, () => guess('127.0.0.3')));
    const statuses = burst.map((a) => a.status);
    expect(statuses.filter((s) => s === 401)).toHaveLength(LIMIT);
    expect(statuses.filter((s) => s === 429)).toHaveLength(40 - LIMIT);

    // One failure short of the limit, a burst with a token never used from this client: while the
    // first lookups run, the rest wait for their answers instead of being refused, and all pass.
    for (let i = 0; i < LIMIT - 1; i++) expect((await guess('127.0.0.4')).status).toBe(401);
    const valid = await h.createIdentity('bursty-agent');
    const calls = await Promise.all(
      Array.from({ length: 20 }, () => rawRequest(h.url, { path: '/v1/credentials', localAddress: '127.0.0.4', headers: [['authorization', `Bearer ${valid.token}`]] })),
    );
    expect(calls.map((c) => c.status)).toEqual(Array(20).fill(200));
    // The valid calls did not count: the next guess is the limit's last, then the client is throttled.
    expect((await guess('127.0.0.4')).status).toBe(401);
    expect((await guess('127.0.0.4')).status).toBe(429);
  });

  it('requests without a token are all answered 401, but only the limit\'s worth per client are audited', async () => {
    const ids = Array.from({ length: LIMIT + 3 }, () => randomUUID());
    const answers = [];
    for (const id of ids) {
      answers.push(
        await rawRequest(h.url, { method: 'POST', path: '/v1/vault.get', localAddress: '127.0.0.5', headers: [['content-type', 'application/json'], ['x-request-id', id]], body: '{"name":"x"}' }),
      );
    }
    expect(answers.map((a) => a.status)).toEqual(Array(LIMIT + 3).fill(401));
    const audited = await h.sql('SELECT request_id FROM audit_log WHERE request_id = ANY($1)', [ids]);
    // Before, every one was written, each taking the audit chain's lock.
    expect(audited.rows.map((r) => r.request_id).sort()).toEqual(ids.slice(0, LIMIT).sort());
  });

  it('each invalid token up to the limit is audited; the 429s are not', async () => {
    const id = `throttled-${randomUUID()}`;
    expect((await guess(undefined, id)).status).toBe(429);
    expect((await h.sql('SELECT count(*)::int AS n FROM audit_log WHERE request_id = $1', [id])).rows[0].n).toBe(0);
    expect((await h.sql(`SELECT count(*)::int AS n FROM audit_log WHERE outcome = 'denied' AND detail->>'error' = 'unauthorized'`)).rows[0].n).toBeGreaterThanOrEqual(LIMIT);
  });
});
