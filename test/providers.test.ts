import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { randomBytes, randomUUID } from 'node:crypto';
import pg from 'pg';
import { CancelledFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { markAttemptStart } from '../core/activity-attempt';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AppError, UnprocessableError } from '../core/errors';
import { checkPolicy } from '../providers';
import { httpApi } from '../providers/http';
import { resolvePath } from '../providers/http/request';
import { postgresRole } from '../providers/postgres-role';
import type { Provider, SecretReader } from '../providers/types';
import type { Caller } from '../vault/vault';
import { expectCleanRun } from './support/leaks';
import { startHarness, TEST_OUTBOUND_ALLOW, type Harness } from './support/harness';
import { ProviderServer } from './support/provider-server';
import { canLogin as canLoginAs } from './support/lifecycle-fixtures';
import { allowOutbound } from '../core/outbound';
import { consumerUrl, login, randomPassword, saslPrepared, setPassword } from '../providers/postgres-role/role';

/**
 * The postgres-role and http providers against real servers: the file's PostgreSQL cluster (roles
 * are made and dropped here) and a real HTTP key service. Admin credentials live in the real vault.
 */
describe('rotation providers', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  let caller: Caller;
  let secrets: SecretReader;

  const store = async (name: string, value: string, extra: Record<string, unknown> = {}) => {
    const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name, kind: 'password', value: h.secret(value), ...extra } });
    expect(res.status).toBe(201);
    return res.body.id as string;
  };
  const context = <S>(provider: Provider<S>, settings: unknown, credentialName = 'rotated') => ({
    settings: provider.settings.parse(settings),
    kind: 'password' as const,
    identityId: agent.id,
    credentialId: randomUUID(),
    credentialName,
    secrets,
  });
  /** Awaits a rejection and checks that no registered secret is in its message or stack. */
  const failure = async (promise: Promise<unknown>): Promise<Error> => {
    const err = await promise.then(
      () => {
        throw new Error('expected a failure');
      },
      (e: unknown) => e as Error,
    );
    for (const s of h.secrets) expect(`${err.message}\n${err.stack}`).not.toContain(s);
    return err;
  };

  beforeAll(async () => {
    h = await startHarness();
    agent = await h.createIdentity();
    caller = { identityId: agent.id, actor: 'test' };
    secrets = { read: async (name) => (await h.services.vault.get(caller, { name })).value };
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  describe('postgres-role', () => {
    const tag = randomBytes(4).toString('hex');
    const roles: string[] = [];
    let server: URL;

    const newRole = async (name: string) => {
      const role = `mg_${name}_${tag}`;
      const password = h.secret(randomBytes(18).toString('base64url'));
      await h.sql(`CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN PASSWORD ${pg.escapeLiteral(password)}`);
      roles.push(role);
      return { role, password };
    };
    const canLogin = (role: string, password: string) => canLoginAs(h, role, password);
    const roleUrl = (role: string, password: string) => `postgresql://${role}:${encodeURIComponent(password)}@${server.host}${server.pathname}`;
    const passwordOf = (url: string) => decodeURIComponent(new URL(url).password);

    beforeAll(async () => {
      server = new URL(h.databaseUrl);
      h.secret(h.databaseUrl);
      h.secret(decodeURIComponent(server.password));
      await store('pg-admin', h.databaseUrl);
    });
    afterAll(async () => {
      for (const role of roles) await h.sql(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
    });

    it('an admin URL on this machine or a private network is refused before any connection (OUTBOUND_ALLOW here lists 127.0.0.1 only)', async () => {
      const { role } = await newRole('guarded');
      for (const [name, url, refusal] of [
        ['pg-loopback', `postgresql://postgres:${randomBytes(9).toString('hex')}@127.0.0.2:${server.port}/postgres`, '127.0.0.2 is an address on this machine or a private network'],
        ['pg-private', `postgresql://postgres:${randomBytes(9).toString('hex')}@10.0.0.7:6379/x`, '10.0.0.7 is an address on this machine or a private network'],
        ['pg-socket', `postgresql://postgres:${randomBytes(9).toString('hex')}@%2Ftmp/postgres`, 'a Unix socket is on this machine'],
      ] as const) {
        await store(name, url);
        const started = Date.now();
        const err = await failure(postgresRole.create({ ...context(postgresRole, { adminCredential: name, role }), current: { version: 1, value: 'x' } } as never));
        expect(err).toBeInstanceOf(UnprocessableError);
        expect(err.message).toContain(refusal);
        expect(err.message).toMatch(/^PostgreSQL at /);
        // Refused at once: no connection attempt waited on (10.0.0.7 would have taken the 10 s connect timeout).
        expect(Date.now() - started).toBeLessThan(2_000);
      }
    });

    it('an admin URL is taken for its server, database, login and the few parameters it names (sslmode, ssl, connect_timeout, options, application_name): any other is refused before a connection', async () => {
      const { role, password } = await newRole('params');
      const adminPassword = decodeURIComponent(server.password);
      const at = `${server.host}${server.pathname}`;
      const refusedParameter = "carries a connection parameter other than sslmode, ssl, connect_timeout, options, application_name (a CA for TLS goes in the worker's NODE_EXTRA_CA_CERTS)";
      for (const [name, url, problem] of [
        // pg's parser read the named file as the client was made (/dev/zero: the worker's event loop held until it died; a missing one: ENOENT in the run's error).
        ['pg-rootcert', `postgresql://postgres:${encodeURIComponent(adminPassword)}@${at}?sslrootcert=/nonexistent/${tag}.pem`, refusedParameter],
        // The query's user and password were taken over the URL's: this logged in as the admin whatever the login checked.
        ['pg-query-login', `postgresql://${role}:wrong@${at}?user=postgres&password=${encodeURIComponent(adminPassword)}`, refusedParameter],
        ['pg-query-host', `postgresql://postgres:${encodeURIComponent(adminPassword)}@${at}?host=/tmp`, refusedParameter],
        ['pg-sslmode', `postgresql://postgres:${encodeURIComponent(adminPassword)}@${at}?sslmode=sometimes`, 'has an sslmode other than disable, prefer, require, verify-ca, verify-full, no-verify'],
        ['pg-no-user', `postgresql://${at}`, 'names no user'],
        ['pg-ssl-flag', `postgresql://postgres:${encodeURIComponent(adminPassword)}@${at}?ssl=maybe`, 'has an ssl other than true, false, 1 or 0'],
        ['pg-timeout', `postgresql://postgres:${encodeURIComponent(adminPassword)}@${at}?connect_timeout=soon`, 'has a connect_timeout that is not a whole number of seconds'],
      ] as const) {
        await store(name, url);
        const err = await failure(postgresRole.create({ ...context(postgresRole, { adminCredential: name, role }), idempotencyKey: randomUUID(), current: { version: 1, value: password } }));
        expect(err, name).toBeInstanceOf(UnprocessableError);
        expect(err.message, name).toBe(`the admin credential '${name}' ${problem}`);
      }
      expect(await canLogin(role, password)).toBe(true);
      // The parameters it takes are taken.
      await store('pg-admin-params', `${h.databaseUrl}${server.search ? '&' : '?'}sslmode=disable&ssl=false&connect_timeout=5&options=-c%20statement_timeout%3D5000&application_name=mailgent-test`);
      const created = await postgresRole.create({ ...context(postgresRole, { adminCredential: 'pg-admin-params', role }), idempotencyKey: randomUUID(), current: { version: 1, value: password } });
      expect(await canLogin(role, h.secret(created.value))).toBe(true);
      // What the URL leaves out is pg's default, the worker's environment's: PGSSLMODE=require asks
      // this server (no TLS here) for TLS. (Refused so, the URL's TLS setting was not dropped to "none".)
      const before = process.env.PGSSLMODE;
      process.env.PGSSLMODE = 'require';
      try {
        const err = await failure(postgresRole.create({ ...context(postgresRole, { adminCredential: 'pg-admin', role }), idempotencyKey: randomUUID(), current: { version: 2, value: created.value } }));
        expect(err.message).toMatch(/does not support SSL/);
      } finally {
        if (before === undefined) delete process.env.PGSSLMODE;
        else process.env.PGSSLMODE = before;
      }
      expect(await canLogin(role, created.value)).toBe(true);
    });

    it('an admin URL without a password logs in without one: never with the worker\'s PGPASSWORD', async () => {
      const { role, password } = await newRole('pgpassword');
      const bare = new URL(h.databaseUrl);
      bare.password = '';
      await store('pg-admin-bare', bare.href);
      const before = process.env.PGPASSWORD;
      process.env.PGPASSWORD = decodeURIComponent(server.password);
      try {
        // Before, pg took PGPASSWORD (then ~/.pgpass) for the empty password, and sent it to whatever server the URL named.
        const err = await failure(postgresRole.create({ ...context(postgresRole, { adminCredential: 'pg-admin-bare', role }), idempotencyKey: randomUUID(), current: { version: 1, value: password } }));
        expect(err.message).toMatch(new RegExp(`^setting the password of role "${role}" failed: `));
        expect(err.message).not.toContain(process.env.PGPASSWORD);
      } finally {
        if (before === undefined) delete process.env.PGPASSWORD;
        else process.env.PGPASSWORD = before;
      }
      expect(await canLogin(role, password)).toBe(true);
    });

    it('single role: create replaces the password at once; after promote and revoke only the new one logs in', async () => {
      const { role, password: v1 } = await newRole('single');
      const settings = { adminCredential: 'pg-admin', role };
      const credentialId = await store('app-db', v1, { rotation: { provider: 'postgres-role', settings, periodDays: 30 } });
      const ctx = { ...context(postgresRole, settings, 'app-db'), credentialId };
      const key = `${randomUUID()}:create_pending`;
      let calls = 0;
      // What the createPendingVersion activity does: create only when nothing is staged under the key.
      const createPending = async () => {
        const staged = await h.services.rotations.findStaged(credentialId, key);
        if (staged) return staged;
        calls++;
        const created = await postgresRole.create({ ...ctx, idempotencyKey: key, current: { version: 1, value: v1, externalId: null } });
        h.secret(created.value);
        expect(created.externalId).toBe(role);
        return h.services.rotations.stagePending(caller, credentialId, key, created);
      };

      const staged = await createPending();
      expect(await createPending()).toEqual(staged); // a retry after a crash finds the staged version
      expect(calls).toBe(1);
      const pending = await h.services.rotations.read(caller, credentialId, staged.version, 'verify');
      expect(pending).toEqual({ version: 2, value: expect.stringMatching(/^[A-Za-z0-9]{32}$/), externalId: role });
      expect(await canLogin(role, pending.value)).toBe(true);
      expect(await canLogin(role, v1)).toBe(false); // one role, one password: the switch is immediate

      await postgresRole.verify({ ...ctx, secret: pending });
      await h.services.rotations.promote(caller, credentialId, staged.version);
      const previous = await h.services.rotations.read(caller, credentialId, 1, 'revoke');
      await postgresRole.revoke({ ...ctx, secret: previous, idempotencyKey: `${key}:revoke` });
      expect(await canLogin(role, v1)).toBe(false);
      expect(await canLogin(role, pending.value)).toBe(true);
      expect(await h.services.vault.get(caller, { name: 'app-db' })).toMatchObject({ version: 2, label: 'current' });

      const err = await failure(postgresRole.verify({ ...ctx, secret: { version: 1, value: v1 } }));
      expect(err.message).toBe(`version 1 does not log in as role "${role}": password authentication failed for user "${role}"`);
    });

    it('single role in url format: the value names the role and the admin URL host and database', async () => {
      const { role, password } = await newRole('singleurl');
      const ctx = context(postgresRole, { adminCredential: 'pg-admin', role, format: 'url', passwordLength: 40 });
      const created = await postgresRole.create({ ...ctx, idempotencyKey: randomUUID(), current: { version: 1, value: roleUrl(role, password) } });
      h.secret(created.value);
      const url = new URL(created.value);
      expect([url.protocol, url.username, url.host, url.pathname]).toEqual(['postgresql:', role, server.host, server.pathname]);
      expect(passwordOf(created.value)).toMatch(/^[A-Za-z0-9]{40}$/);
      await postgresRole.verify({ ...ctx, secret: { version: 2, value: created.value } });
    });

    it('url format keeps the admin URL’s connection options, never its user or password', () => {
      const admin = new URL('postgresql://admin:adminpw@db.internal:6432/app?sslmode=require&user=admin&password=adminpw&application_name=billing');
      const value = consumerUrl(admin, 'billing_rw', 'p@ss/word');
      expect(value).toBe('postgresql://billing_rw:p%40ss%2Fword@db.internal:6432/app?sslmode=require&application_name=billing');
      expect(consumerUrl(new URL('postgresql://admin:x@db/app'), 'r', 'pw')).toBe('postgresql://r:pw@db/app');
    });

    it('single role: discard (before promotion) puts the current password back; twice is the same', async () => {
      const { role, password: v1 } = await newRole('discard');
      const ctx = context(postgresRole, { adminCredential: 'pg-admin', role });
      const current = { version: 1, value: v1 };
      const created = await postgresRole.create({ ...ctx, idempotencyKey: 'k-discard', current });
      const pending = { version: 2, value: h.secret(created.value), externalId: created.externalId };
      expect(await canLogin(role, v1)).toBe(false);

      await postgresRole.discard!({ ...ctx, pending, current, idempotencyKey: 'k-discard:discard' });
      await postgresRole.discard!({ ...ctx, pending, current, idempotencyKey: 'k-discard:discard' });
      expect(await canLogin(role, v1)).toBe(true);
      expect(await canLogin(role, pending.value)).toBe(false);

      // An unknown current value is refused rather than set as the password.
      const err = await failure(postgresRole.discard!({ ...ctx, pending, current: { version: 1, value: '' }, idempotencyKey: 'x' }));
      expect(err).toBeInstanceOf(AppError);
      expect(err.message).toBe('version 1 has an empty value');
      expect(await canLogin(role, v1)).toBe(true);
    });

    it('a password outside ASCII goes as the SCRAM verifier of its SASLprep form, the one PostgreSQL makes of the plaintext: never in clear', async () => {
      const { role } = await newRole('saslprep');
      const hex = randomBytes(4).toString('hex');
      const samples: [string, 'prepared' | 'as given'][] = [
        [`pässwörd-${hex}`, 'as given'], // NFKC leaves it as it is
        [`ｆｕｌｌ\u00a0ｗｉｄｔｈ-${hex}`, 'prepared'], // fullwidth letters to ASCII, a no-break space to a space
        [`so\u00adft\u200bhy-\ufb01x-${hex}`, 'prepared'], // a soft hyphen dropped, a zero-width space to a space, the ligature to "fi"
        [`pa\u0301ss-${hex}`, 'prepared'], // a combining accent composed
        [`private\ue000use-${hex}`, 'as given'], // a private-use character: prohibited, so used as given
        [`\u05e9\u05dc\u05d5\u05dd-abc-${hex}`, 'as given'], // right-to-left beside left-to-right: prohibited
      ];
      const sent: string[] = [];
      const query = pg.Client.prototype.query;
      for (const [raw, form] of samples) {
        const password = h.secret(raw);
        expect(saslPrepared(password) === password, raw).toBe(form === 'as given');
        // The server's own preparation of the plaintext (node-postgres prepares the password it logs in with as the server does).
        await h.sql(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD ${pg.escapeLiteral(password)}`);
        expect(await canLogin(role, password), raw).toBe(true);
        await h.sql(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD ${pg.escapeLiteral(h.secret(randomBytes(12).toString('hex')))}`);
        // Set here: the statement carries the verifier alone, and the same logins work.
        pg.Client.prototype.query = function (this: pg.Client, ...args: unknown[]) {
          if (typeof args[0] === 'string') sent.push(args[0]);
          return (query as (...a: unknown[]) => unknown).apply(this, args);
        } as typeof query;
        try {
          await setPassword(server, role, password);
        } finally {
          pg.Client.prototype.query = query;
        }
        expect(await canLogin(role, password), raw).toBe(true);
        await login(server, role, password);
      }
      expect(sent.filter((text) => text.startsWith('ALTER ROLE'))).toHaveLength(samples.length);
      // Before, each password outside ASCII went as plaintext in the statement (log_statement logs it).
      expect(sent.filter((text) => samples.some(([raw]) => text.includes(raw)))).toEqual([]);
    });

    it('alternating roles: create sets the idle role, both work until revoke retires the old one; the next rotation flips back', async () => {
      const blue = await newRole('blue');
      const green = await newRole('green');
      const ctx = context(postgresRole, { adminCredential: 'pg-admin', roles: [blue.role, green.role], format: 'url' });
      const v1 = { version: 1, value: h.secret(roleUrl(blue.role, blue.password)), externalId: null };

      const created = await postgresRole.create({ ...ctx, idempotencyKey: 'k-alt-1', current: v1 });
      const v2 = { version: 2, value: h.secret(created.value), externalId: created.externalId };
      expect(created.externalId).toBe(green.role);
      expect(new URL(created.value).username).toBe(green.role);
      expect(await canLogin(green.role, passwordOf(v2.value))).toBe(true);
      expect(await canLogin(blue.role, blue.password)).toBe(true); // the live role is untouched: no downtime
      await postgresRole.verify({ ...ctx, secret: v2 });

      // promoted; after the grace period the previous version is revoked
      await postgresRole.revoke({ ...ctx, secret: v1, idempotencyKey: 'k-alt-1:revoke' });
      await postgresRole.revoke({ ...ctx, secret: v1, idempotencyKey: 'k-alt-1:revoke' });
      expect(await canLogin(blue.role, blue.password)).toBe(false);
      expect(await canLogin(green.role, passwordOf(v2.value))).toBe(true);
      expect((await failure(postgresRole.verify({ ...ctx, secret: v1 }))).message).toMatch(/^version 1 does not log in as role "mg_blue_\w+": password authentication failed/);

      // The next rotation goes back to blue (the live role is read from the URL).
      const next = await postgresRole.create({ ...ctx, idempotencyKey: 'k-alt-2', current: { ...v2, externalId: null } });
      const v3 = { version: 3, value: h.secret(next.value), externalId: next.externalId };
      expect(next.externalId).toBe(blue.role);
      expect(await canLogin(blue.role, passwordOf(v3.value))).toBe(true);

      // A stale revoke of v1 (blue's old password) must not retire blue's new password.
      await postgresRole.revoke({ ...ctx, secret: v1, idempotencyKey: 'k-alt-1:revoke' });
      expect(await canLogin(blue.role, passwordOf(v3.value))).toBe(true);

      // Compensation before promotion: the pending role is retired, the live one keeps working.
      await postgresRole.discard!({ ...ctx, pending: v3, current: v2, idempotencyKey: 'k-alt-2:discard' });
      expect(await canLogin(blue.role, passwordOf(v3.value))).toBe(false);
      expect(await canLogin(green.role, passwordOf(v2.value))).toBe(true);
    });

    it('refuses what it cannot do safely, with messages that carry no secret', async () => {
      const { role, password } = await newRole('errors');
      const current = { version: 1, value: password };
      const create = (settings: Record<string, unknown>, value = current, credentialName = 'rotated') =>
        failure(postgresRole.create({ ...context(postgresRole, settings, credentialName), idempotencyKey: randomUUID(), current: value }));

      const wrongAdmin = new URL(h.databaseUrl);
      wrongAdmin.password = h.secret(`wrong-${randomBytes(12).toString('hex')}`);
      await store('pg-admin-wrong', wrongAdmin.href);
      expect((await create({ adminCredential: 'pg-admin-wrong', role })).message).toBe(
        `setting the password of role "${role}" failed: password authentication failed for user "postgres"`,
      );
      await store('pg-admin-not-url', 'just-a-password-value');
      expect((await create({ adminCredential: 'pg-admin-not-url', role })).message).toBe("the admin credential 'pg-admin-not-url' is not a postgres:// URL");
      expect((await create({ adminCredential: 'pg-admin', role }, current, 'pg-admin')).message).toBe(
        "settings.adminCredential must name a credential other than 'pg-admin' itself",
      );
      expect((await create({ adminCredential: 'pg-admin', role: 'postgres' })).message).toBe("the admin credential 'pg-admin' logs in as a role this rotation changes");
      // One role in url format whose current version is no such URL: refused before the password
      // changes (before, it changed, and the undo could never put the old one back).
      expect((await create({ adminCredential: 'pg-admin', role, format: 'url' })).message).toBe('version 1 is not a postgresql://<role>:<password>@host/db URL');
      expect((await create({ adminCredential: 'pg-admin', role, format: 'url' }, { version: 1, value: roleUrl(`mg_else_${tag}`, password) })).message).toBe(
        `version 1 names a role other than ${role}`,
      );
      expect(await canLogin(role, password)).toBe(true);
      expect((await create({ adminCredential: 'no-such-credential', role })).message).toBe("no credential with name 'no-such-credential'");
      expect((await create({ adminCredential: 'pg-admin', role: `mg_missing_${tag}` })).message).toBe(
        `setting the password of role "mg_missing_${tag}" failed: role "mg_missing_${tag}" does not exist`,
      );
      const alternating = { adminCredential: 'pg-admin', roles: [role, `mg_other_${tag}`], format: 'url' };
      const notLive = await create(alternating, { version: 4, value: roleUrl(`mg_stranger_${tag}`, password) });
      expect(notLive).toBeInstanceOf(AppError);
      expect(notLive.message).toBe(`the current version (4) must be a postgresql://<role>:<password>@host/db URL with role ${role} or mg_other_${tag}`);
      expect(await canLogin(role, password)).toBe(true); // nothing was changed by any of these
    });

    it('validates its settings', () => {
      const issues = (settings: unknown) => {
        const parsed = postgresRole.settings.safeParse(settings);
        return parsed.success ? [] : parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
      };
      expect(postgresRole.settings.parse({ adminCredential: 'pg-admin', role: 'app' })).toEqual({
        adminCredential: 'pg-admin',
        role: 'app',
        format: 'password',
        passwordLength: 32,
        symbols: false,
      });
      // Every class at least once, whatever the draw (a password policy requiring one is met at any length it allows).
      for (let i = 0; i < 500; i++) {
        const password = randomPassword(16, i % 2 === 0);
        expect(password).toMatch(/^(?=.*[a-z])(?=.*[A-Z])(?=.*[0-9])[A-Za-z0-9._~-]{16}$/);
        if (i % 2 === 0) expect(password).toMatch(/[._~-]/);
        else expect(password).toMatch(/^[A-Za-z0-9]+$/);
      }
      expect(issues({ adminCredential: 'pg-admin' })).toEqual(['role: give exactly one of role (one role) or roles (two roles that alternate)']);
      expect(issues({ adminCredential: 'pg-admin', role: 'a', roles: ['b', 'c'], format: 'url' })).toEqual([
        'role: give exactly one of role (one role) or roles (two roles that alternate)',
      ]);
      expect(issues({ adminCredential: 'pg-admin', roles: ['a', 'b'] })).toEqual([
        "format: must be 'url' with alternating roles: consumers learn the live role from the value",
      ]);
      expect(issues({ adminCredential: 'pg-admin', roles: ['a', 'a'], format: 'url' })).toEqual(['roles: the two roles must differ']);
      expect(issues({ adminCredential: 'pg-admin', role: 'app"; DROP ROLE x; --' })[0]).toMatch(/^role: must be a role name/);
      expect(issues({ adminCredential: 'pg-admin', role: 'app', passwordLength: 8 })[0]).toMatch(/^passwordLength: Too small/);
      expect(issues({ adminCredential: 'pg-admin', role: 'app', host: 'x' })).toEqual([': Unrecognized key: "host"']);
      expect(() => checkPolicy({ provider: 'postgres-role', settings: { adminCredential: 'pg-admin', roles: ['a', 'b'] }, periodDays: 30 })).toThrow(
        "rotation settings are not valid for provider 'postgres-role': rotation.settings.format: must be 'url' with alternating roles",
      );
    });
  });

  describe('http', () => {
    let server: ProviderServer;
    const settingsFor = (overrides: Record<string, unknown> = {}) => ({
      create: { url: `${server.url}/keys`, body: { scopes: ['read'], note: 'made by mailgent' } },
      verify: { url: `${server.url}/whoami` },
      revoke: { url: `${server.url}/keys/{id}` },
      auth: { credential: 'api-admin' },
      valuePath: 'secret',
      idPath: 'id',
      ...overrides,
    });
    const create = async (idempotencyKey: string, settings = settingsFor()) => {
      const created = await httpApi.create({ ...context(httpApi, settings), idempotencyKey, current: { version: 1, value: '' } });
      h.secret(created.value);
      return created;
    };

    beforeAll(async () => {
      server = await new ProviderServer().start();
      await store('api-admin', server.adminToken);
    });
    afterAll(async () => {
      await server.stop();
    });

    it('creates a key with the admin token, verifies it with the key itself, revokes it by id (twice is fine)', async () => {
      const ctx = context(httpApi, settingsFor());
      const created = await create('k-http-1');
      expect(created.externalId).toMatch(/^key_/);
      expect(server.requests.at(-1)).toEqual({ route: 'create', method: 'POST', path: '/keys', status: 201, idempotencyKey: 'k-http-1', body: { scopes: ['read'], note: 'made by mailgent' } });
      const secret = { version: 2, value: created.value, externalId: created.externalId };
      await httpApi.verify({ ...ctx, secret });

      const revokesBefore = server.revokes;
      await httpApi.revoke({ ...ctx, secret, idempotencyKey: 'k-http-1:revoke' });
      await httpApi.revoke({ ...ctx, secret, idempotencyKey: 'k-http-1:revoke' });
      expect(server.revokes - revokesBefore).toBe(1);
      expect(server.requests.slice(-2).map((r) => [r.route, r.status, r.idempotencyKey])).toEqual([
        ['revoke', 200, 'k-http-1:revoke'],
        ['revoke', 404, 'k-http-1:revoke'],
      ]);
      expect(server.isActive(created.value)).toBe(false);
      const err = await failure(httpApi.verify({ ...ctx, settings: { ...ctx.settings, verify: { ...ctx.settings.verify, waitSeconds: 0 } }, secret }));
      expect(err.message).toBe(`version 2 does not work: GET ${server.url}/whoami answered 401 Unauthorized`);
    });

    it('the same idempotency key mints one key, also when the first answer was lost', async () => {
      const before = server.creates;
      const first = await create('k-idem');
      const again = await create('k-idem');
      expect(again).toEqual(first);
      expect(server.creates - before).toBe(1);

      server.failNext('create', 1, 502, { afterEffect: true }); // the key is made, the answer is lost
      const lost = await failure(create('k-idem-lost'));
      expect(lost.message).toBe(`POST ${server.url}/keys answered 502 Bad Gateway`);
      const retried = await create('k-idem-lost');
      expect(server.creates - before).toBe(2);
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-idem-lost')).toEqual([{ id: retried.externalId, active: true, idempotencyKey: 'k-idem-lost' }]);

      await create('k-idem-other');
      expect(server.creates - before).toBe(3);
    });

    it('discard finds a key whose create answer never reached the vault by the create’s idempotency key, and revokes it', async () => {
      const ctx = context(httpApi, settingsFor());
      const current = { version: 1, value: '' };
      const before = server.creates;
      server.failNext('create', 1, 502, { afterEffect: true }); // the key is made, the answer is lost
      await failure(create('k-orphan'));
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-orphan')).toEqual([expect.objectContaining({ active: true })]);
      await httpApi.discard!({ ...ctx, current, idempotencyKey: 'k-orphan:discard', createKey: 'k-orphan' });
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-orphan')).toEqual([expect.objectContaining({ active: false })]);
      expect(server.creates - before).toBe(1);
      // A create the provider refuses made nothing: nothing to find, and discard does not fail. (A
      // 401 or 403 does not say so: an auth layer's answer, given before any key is looked for.)
      server.failNext('create', 1, 422);
      await httpApi.discard!({ ...ctx, current, idempotencyKey: 'k-refused:discard', createKey: 'k-refused' });
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-refused')).toEqual([]);
      // An answer with the key's id but no usable value: the key is revoked there and then.
      const noValue = await failure(create('k-no-value', settingsFor({ valuePath: 'data.secret' })));
      expect(noValue.message).toBe(`POST ${server.url}/keys answered without a string at data.secret`);
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-no-value')).toEqual([expect.objectContaining({ active: false })]);
      // That attempt's undo sends the create again: the same key, unusable again and revoked again: the undo is done.
      await httpApi.discard!({ ...context(httpApi, settingsFor({ valuePath: 'data.secret' })), current, idempotencyKey: 'k-no-value:discard', createKey: 'k-no-value' });
      // Its revoke failing for now fails the create for now (retried), not for good with the key left working (before: ignored).
      server.failNext('revoke', 1, 503);
      const unrevoked = await failure(create('k-no-value-2', settingsFor({ valuePath: 'data.secret' })));
      expect(unrevoked).not.toBeInstanceOf(AppError);
      expect(unrevoked.message).toBe(`POST ${server.url}/keys answered without a string at data.secret; revoking the key it made failed for now`);
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-no-value-2')).toEqual([expect.objectContaining({ active: true })]);
      await failure(create('k-no-value-2', settingsFor({ valuePath: 'data.secret' })));
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-no-value-2')).toEqual([expect.objectContaining({ active: false })]);
      // The create sent again refused with 401 (the admin token no longer works) says nothing of what
      // the first made: the discard fails (before, it passed, a key perhaps left working).
      server.failNext('create', 1, 502, { afterEffect: true });
      await failure(create('k-unauthorised'));
      server.failNext('create', 1, 401);
      const unauthorised = await failure(httpApi.discard!({ ...ctx, current, idempotencyKey: 'k-unauthorised:discard', createKey: 'k-unauthorised' }));
      expect(unauthorised.message).toBe(`POST ${server.url}/keys answered 401 Unauthorized`);
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-unauthorised')).toEqual([expect.objectContaining({ active: true })]);
      await httpApi.discard!({ ...ctx, current, idempotencyKey: 'k-unauthorised:discard', createKey: 'k-unauthorised' });
      expect(server.listKeys().filter((k) => k.idempotencyKey === 'k-unauthorised')).toEqual([expect.objectContaining({ active: false })]);
    });

    it('failures surface as errors with method, URL and status only; 4xx are permanent, 5xx and timeouts are not', async () => {
      const ctx = context(httpApi, settingsFor());

      server.failNext('create', 1, 500); // its body echoes the Authorization header
      const serverError = await failure(create(randomUUID()));
      expect(serverError.message).toBe(`POST ${server.url}/keys answered 500 Internal Server Error`);
      expect(serverError).not.toBeInstanceOf(AppError);

      server.failNext('create', 1, 403);
      const forbidden = await failure(create(randomUUID()));
      expect(forbidden.message).toBe(`POST ${server.url}/keys answered 403 Forbidden`);
      expect(forbidden).toBeInstanceOf(AppError);

      await store('api-admin-wrong', `adm_wrong_${randomBytes(16).toString('hex')}`);
      const wrongToken = await failure(create(randomUUID(), settingsFor({ auth: { credential: 'api-admin-wrong' } })));
      expect(wrongToken.message).toBe(`POST ${server.url}/keys answered 401 Unauthorized`);

      server.delayNext('create', 1, 1_000);
      const slow = await failure(create(randomUUID(), settingsFor({ timeoutMs: 100 })));
      expect(slow.message).toBe(`POST ${server.url}/keys timed out after 100 ms`);

      const closed = await new ProviderServer().start();
      await closed.stop();
      const refused = await failure(create(randomUUID(), settingsFor({ create: { url: `${closed.url}/keys` } })));
      expect(refused.message).toBe(`POST ${closed.url}/keys failed: ECONNREFUSED`);

      // This machine is off limits unless OUTBOUND_ALLOW lists it (the tests' harness allows 127.0.0.1).
      allowOutbound([]);
      try {
        const blocked = await failure(create(randomUUID()));
        expect(blocked).toBeInstanceOf(AppError);
        expect(blocked.message).toBe(`POST ${server.url}/keys: 127.0.0.1 is an address on this machine or a private network, which the worker does not call unless OUTBOUND_ALLOW lists it`);
      } finally {
        allowOutbound(TEST_OUTBOUND_ALLOW);
      }

      // An endless answer is cut off after 1 MiB, not read into memory whole.
      const flood = createServer((_req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        const chunk = Buffer.alloc(64 * 1024, 0x20);
        const more = () => {
          while (!res.destroyed && res.write(chunk));
          if (!res.destroyed) res.once('drain', more);
        };
        res.write('{"pad":"');
        more();
      });
      await new Promise<void>((resolve) => flood.listen(0, '127.0.0.1', resolve));
      try {
        const floodUrl = `http://127.0.0.1:${(flood.address() as AddressInfo).port}`;
        const huge = await failure(create(randomUUID(), settingsFor({ create: { url: `${floodUrl}/keys` } })));
        expect(huge.message).toBe(`POST ${floodUrl}/keys answered 200 with a body over 1048576 bytes`);
      } finally {
        flood.closeAllConnections();
        await new Promise((resolve) => flood.close(resolve));
      }

      const noValue = await failure(create(randomUUID(), settingsFor({ valuePath: 'data.secret' })));
      expect(noValue.message).toBe(`POST ${server.url}/keys answered without a string at data.secret`);

      const created = await create(randomUUID());
      const secret = { version: 2, value: created.value, externalId: created.externalId };
      server.failNext('revoke', 1, 503);
      expect((await failure(httpApi.revoke({ ...ctx, secret, idempotencyKey: 'r' }))).message).toBe(
        // Named by its template: a policy stored before idPath had to differ from valuePath revokes by the value, which the URL then holds.
        `DELETE ${server.url}/keys/{id} answered 503 Service Unavailable`,
      );
      await httpApi.revoke({ ...ctx, secret, idempotencyKey: 'r' });
      expect(server.isActive(created.value)).toBe(false);

      // A provider id of '.' or '..' would climb the URL's path to another endpoint: refused, nothing sent.
      const sent = server.requests.length;
      for (const externalId of ['.', '..']) {
        const dots = await failure(httpApi.revoke({ ...ctx, secret: { version: 1, value: created.value, externalId }, idempotencyKey: 'r-dots' }));
        expect(dots.message).toBe(`version 1 has the provider id '${externalId}', which cannot name a key in a URL; revoke it at the provider by hand`);
      }
      expect(server.requests.length).toBe(sent);

      const noId = await failure(httpApi.revoke({ ...ctx, secret: { version: 1, value: created.value, externalId: null }, idempotencyKey: 'r' }));
      expect(noId.message).toBe('version 1 has no provider id, so it cannot be revoked through the API; revoke it at the provider by hand');
    });

    it('validates its settings', () => {
      const issues = (settings: unknown) => {
        const parsed = httpApi.settings.safeParse(settings);
        return parsed.success ? [] : parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
      };
      expect(httpApi.settings.parse(settingsFor())).toMatchObject({
        create: { method: 'POST' },
        verify: { method: 'GET', header: 'Authorization', scheme: 'Bearer', waitSeconds: 30 },
        revoke: { method: 'DELETE' },
        auth: { header: 'Authorization', scheme: 'Bearer' },
        idempotencyHeader: 'Idempotency-Key',
        timeoutMs: 10_000,
      });
      const urlRule = 'must be an http(s) URL without a user or password in it';
      expect(issues(settingsFor({ create: { url: 'ftp://example.com/keys' } }))).toEqual([`create.url: ${urlRule}`]);
      expect(issues(settingsFor({ verify: { url: 'https://user:pw@example.com/whoami' } }))).toEqual([`verify.url: ${urlRule}`]);
      expect(issues(settingsFor({ verify: { url: 'javascript:alert(1)' } }))).toEqual([`verify.url: ${urlRule}`]);
      expect(issues(settingsFor({ revoke: { url: 'https://example.com/keys' } }))).toEqual(['revoke.url: must contain {id}, where the key id goes']);
      expect(issues(settingsFor({ valuePath: 'data..secret' }))).toEqual(['valuePath: must be a dotted path like data.secret']);
      expect(issues(settingsFor({ auth: { credential: 'api-admin', header: 'Bad Header:' } }))).toEqual(['auth.header: must be an HTTP header name']);
      expect(issues(settingsFor({ extra: true }))).toEqual([': Unrecognized key: "extra"']);
      expect(issues({ ...settingsFor(), idPath: undefined })).toEqual(['idPath: Invalid input: expected string, received undefined']);
      // A policy written with idPath = valuePath is refused; one stored before still parses, so a run going on can revoke what it must.
      expect(() => checkPolicy({ provider: 'http', settings: settingsFor({ idPath: 'secret' }), periodDays: 30 })).toThrow(
        "rotation settings are not valid for provider 'http': rotation.settings.idPath: must not be valuePath: the id is kept unencrypted, so a key revoked by its value cannot be rotated by this provider",
      );
      expect(issues(settingsFor({ idPath: 'secret' }))).toEqual([]);
    });

    it('an id past 2^53 (its digits lost in JSON) or one holding the value is refused at create, never stored or sent in a URL', async () => {
      const value = h.secret(`hk_${randomBytes(12).toString('hex')}`);
      let answer = '';
      const revoked: string[] = [];
      const odd = createServer((req, res) => {
        if (req.method === 'DELETE') revoked.push(req.url!);
        res.writeHead(200, { 'content-type': 'application/json' }).end(req.method === 'DELETE' ? '{}' : answer);
      });
      await new Promise<void>((resolve) => odd.listen(0, '127.0.0.1', resolve));
      const at = `http://127.0.0.1:${(odd.address() as AddressInfo).port}`;
      const settings = settingsFor({ create: { url: `${at}/keys` }, revoke: { url: `${at}/keys/{id}` } });
      try {
        answer = `{"id": 1234567890123456789, "secret": "${value}"}`;
        // Before, stored as 1234567890123456800: its revoke a 404 (taken for revoked), the key left working.
        const tooLarge = await failure(create(randomUUID(), settings));
        expect(tooLarge).toBeInstanceOf(UnprocessableError);
        expect(tooLarge.message).toMatch(/answered an id at id too large for a JSON number to hold exactly \(past 2\^53\); point idPath at a string id/);
        expect(revoked).toEqual([]);
        answer = `{"id": "key-${value}", "secret": "${value}"}`;
        // Before, the id (the value in it) was kept unencrypted and revoked by a URL that errors quote.
        const holding = await failure(create(randomUUID(), settings));
        expect(holding.message).toBe(`POST ${at}/keys answered an id at id that holds the key's value`);
        expect(revoked).toEqual([`/keys/key-${value}`]);
      } finally {
        odd.closeAllConnections();
        await new Promise((resolve) => odd.close(resolve));
      }
    });

    it('verify tries a key that does not work yet again, 1 s, 2 s … apart, until verify.waitSeconds have passed (0: one call); a cancelled activity or a stopping worker ends the wait at once', async () => {
      const created = await create(randomUUID());
      const secret = { version: 2, value: created.value, externalId: created.externalId };
      const verify = (waitSeconds: number, madeAt?: string) =>
        httpApi.verify({ ...context(httpApi, settingsFor({ verify: { url: `${server.url}/whoami`, waitSeconds } })), secret, ...(madeAt ? { madeAt } : {}) });
      const whoamis = () => server.requests.filter((r) => r.route === 'whoami').map((r) => r.status);
      let seen = whoamis().length;
      let began = Date.now();
      const since = () => [whoamis().slice(seen), Date.now() - began] as const;
      const again = () => {
        seen = whoamis().length;
        began = Date.now();
      };

      // Refused twice (as a key not known everywhere yet): the third call, 3 s after the first, gets through.
      server.failNext('whoami', 2, 401);
      await verify(10);
      let [calls, took] = since();
      expect(calls).toEqual([401, 401, 200]);
      expect(took).toBeGreaterThanOrEqual(2_900);

      // A key that never works: the last error once waitSeconds have passed (calls at 0, 1 and 2 s,
      // the last wait cut short by the deadline); 0 is the single call it always was.
      await httpApi.revoke({ ...context(httpApi, settingsFor()), secret, idempotencyKey: 'k-wait:revoke' });
      again();
      const never = await failure(verify(2));
      [calls, took] = since();
      expect(never.message).toBe(`version 2 does not work: GET ${server.url}/whoami answered 401 Unauthorized`);
      expect(calls).toEqual([401, 401, 401]);
      expect(took).toBeGreaterThanOrEqual(1_900);
      expect(took).toBeLessThan(2_900);
      again();
      expect((await failure(verify(0))).message).toBe(never.message);
      expect(since()[0]).toEqual([401]);

      // In an activity, a cancel or the worker's shutdown ends the wait (300 s here) at once: no further call.
      for (const reason of ['CANCELLED', 'WORKER_SHUTDOWN'] as const) {
        const env = new MockActivityEnvironment({ currentAttemptScheduledTimestampMs: Date.now(), startToCloseTimeoutMs: 600_000, heartbeatTimeoutMs: 10_000 });
        again();
        const waiting = env.run(() => verify(300));
        await new Promise((resolve) => setTimeout(resolve, 300));
        env.cancel(reason);
        const stopped = await failure(waiting);
        took = since()[1];
        expect(stopped).toBeInstanceOf(CancelledFailure);
        expect(stopped.message).toBe(reason);
        expect(took).toBeLessThan(1_000);
        await new Promise((resolve) => setTimeout(resolve, 1_200));
        expect(since()[0]).toEqual([401]);
      }

      // Nor does a wait go past what its attempt has left, less the last call and the step's database
      // work (30 s): here 1.5 s of its start-to-close remain for it.
      const short = new MockActivityEnvironment({ currentAttemptScheduledTimestampMs: Date.now(), startToCloseTimeoutMs: 10_000 + 30_000 + 1_500, heartbeatTimeoutMs: 10_000 });
      again();
      expect((await failure(short.run(() => verify(300)))).message).toBe(never.message);
      [calls, took] = since();
      expect(calls).toEqual([401, 401, 401]);
      expect(took).toBeLessThan(2_500);

      // Counted from the attempt's start (markAttemptStart, as a rotation's steps call it), not from
      // when it was scheduled: one queued 9 min 40 s of its 10 minutes behind busy slots still waits its 2 s.
      const queued = new MockActivityEnvironment({ currentAttemptScheduledTimestampMs: Date.now() - 580_000, startToCloseTimeoutMs: 600_000, heartbeatTimeoutMs: 10_000 });
      again();
      expect((await failure(queued.run(() => (markAttemptStart(), verify(2)))))).toMatchObject({ message: never.message });
      expect(since()[0]).toEqual([401, 401, 401]);

      // Counted from when the key was made (madeAt, its create step's end), not from each call: the
      // step's next attempt, once the wait is over, makes one call (before: the whole wait again);
      // one made 1.5 s before a 2 s wait, two (three if the timer fires a millisecond early, leaving a
      // last wait of 1 ms). A madeAt ahead of this clock counts from the first call.
      const ago = (ms: number) => new Date(Date.now() - ms).toISOString();
      again();
      expect(await failure(verify(2, ago(10_000)))).toMatchObject({ message: never.message });
      expect(since()[0]).toEqual([401]);
      again();
      expect(await failure(verify(2, ago(1_500)))).toMatchObject({ message: never.message });
      [calls, took] = since();
      expect(calls.slice(0, 2)).toEqual([401, 401]);
      expect(calls.length).toBeLessThanOrEqual(3);
      expect(took).toBeLessThan(1_400); // the 0.5 s left of its wait, not 2 s
      again();
      expect(await failure(verify(2, ago(-60_000)))).toMatchObject({ message: never.message });
      expect(since()[0]).toEqual([401, 401, 401]);
    });

    it('refuses a verify.waitSeconds outside 0–300 or not whole where the policy is set (a 422 problem naming it); nothing is stored', async () => {
      const rotation = (waitSeconds?: unknown) => ({ provider: 'http', settings: settingsFor({ verify: { url: `${server.url}/whoami`, waitSeconds } }) });
      const kept = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'wait-kept', kind: 'api_key', value: h.secret(`sk_${randomBytes(16).toString('hex')}`), rotation: rotation(300) } });
      expect(kept.status, kept.text).toBe(201);
      const keptRow = async () => (await h.sql("SELECT to_jsonb(c) AS row FROM credentials c WHERE name = 'wait-kept'")).rows[0].row;
      const before = await keptRow();
      expect(before.rotation.settings.verify.waitSeconds).toBe(300);
      for (const waitSeconds of [-1, 301, 1.5]) {
        const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'wait-refused', kind: 'api_key', value: 'wait-refused-value', rotation: rotation(waitSeconds) } });
        const patched = await h.api('PATCH', '/v1/credentials/wait-kept', { token: agent.token, body: { rotation: rotation(waitSeconds) } });
        for (const res of [stored, patched]) {
          expect(res.status, res.text).toBe(422);
          expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
          expect(res.body.detail).toMatch(/^rotation settings are not valid for provider 'http': rotation\.settings\.verify\.waitSeconds: /);
        }
      }
      expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name = 'wait-refused'")).rows[0].n).toBe(0);
      expect(await keptRow()).toEqual(before);
      // Not given, it is 30.
      const defaulted = await h.api('PATCH', '/v1/credentials/wait-kept', { token: agent.token, body: { rotation: rotation() } });
      expect(defaulted.status, defaulted.text).toBe(200);
      expect(defaulted.body.policy.settings.verify).toMatchObject({ waitSeconds: 30 });
    });

    it('resolves dotted paths over own properties only', () => {
      const doc = JSON.parse('{"data":{"items":[{"secret":"s1"}],"n":0},"__proto__":{"x":1}}');
      expect(resolvePath(doc, 'data.items.0.secret')).toBe('s1');
      expect(resolvePath(doc, 'data.n')).toBe(0);
      expect(resolvePath(doc, 'data.items.1.secret')).toBeUndefined();
      expect(resolvePath(doc, 'data.constructor')).toBeUndefined();
      expect(resolvePath('text', 'length')).toBeUndefined();
    });
  });
});
