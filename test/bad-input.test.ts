import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { connect } from 'node:net';
import { gzipSync } from 'node:zlib';
import { expectCleanRun } from './support/leaks';
import { rawRequest, type RawResponse } from './support/raw-http';
import { startHarness, type Harness } from './support/harness';

/** Bad input gets a clear RFC 9457 problem, and nothing is stored. */
describe('bad input', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  let before: Record<string, number>;
  /** The two stores the file accepts (an edge of each rule), made before the count every rejection is held to. */
  let accepted: { tenBytes: { status: number }; exactly: { status: number } };

  const TABLES = [
    'identities', 'data_keys', 'credentials', 'secret_versions', 'mail_outbox', 'rotations', 'rotation_runs', 'rotation_plans', 'run_outcomes',
    'leak_incidents', 'grants', 'password_policies', 'service_keys',
  ];
  const counts = async () =>
    Object.fromEntries(await Promise.all(TABLES.map(async (t) => [t, Number((await h.sql(`SELECT count(*) FROM ${t}`)).rows[0].count)] as const)));

  const expectProblem = (res: { status: number; headers: Headers; body: any; text: string }, status: number, slug: string) => {
    expect(res.status).toBe(status);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(res.body).toMatchObject({ type: `https://mailgent.dev/problems/${slug}`, status, title: expect.any(String), detail: expect.any(String) });
    // Nothing internal leaks: no stack frames, file paths or SQL.
    expect(res.text).not.toMatch(/\bat .+\(|node_modules|\/work\/|\.ts:\d|SELECT|INSERT|pg_/);
  };

  /**
   * A request not recorded by the harness (it records a failed request's route, where the leak sweep
   * looks): for a value sent in the path, whose answer and request log must not repeat it.
   */
  const unrecorded = async (method: string, path: string, token: string, body?: unknown) => {
    const headers: Record<string, string> = { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) };
    const res = await fetch(h.url + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
    const text = await res.text();
    return { status: res.status, headers: res.headers, text, body: JSON.parse(text) };
  };

  beforeAll(async () => {
    h = await startHarness();
    agent = await h.createIdentity();
    accepted = {
      // An 80-bit seed (16 base32 characters) is what many issuers hand out.
      tenBytes: await post('/v1/vault.store', { body: { name: 'ten-byte-seed', kind: 'totp_seed', totp: { secret: h.secret('ABCDEFGHIJKLMNOP') } } }),
      // A value of exactly 64 KiB.
      exactly: await post('/v1/vault.store', { body: { name: 'edge', kind: 'generic', value: h.secret('y'.repeat(64 * 1024)) } }),
    };
    // Taken once: every rejection of the file is held to it (no test takes it again).
    before = await counts();
  });
  afterAll(async () => {
    // Every rejected call left the stored data as it was; only audit rows were added.
    expect(await counts()).toEqual(before);
    const audit = (
      await h.sql(`SELECT DISTINCT outcome FROM audit_log WHERE action <> 'identity.create'
                     AND NOT (action = 'vault.store' AND outcome = 'ok' AND detail->>'name' IN ('ten-byte-seed', 'edge'))`)
    ).rows.map((r) => r.outcome);
    expect(audit.sort()).toEqual(['denied', 'rejected']);
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  const post = (route: string, o: { body?: unknown; raw?: string; headers?: Record<string, string>; token?: string | null }) =>
    h.api('POST', route, { token: o.token === null ? undefined : (o.token ?? agent.token), body: o.body, raw: o.raw, headers: o.headers });

  const ROUTES = ['/v1/vault.store', '/v1/vault.get', '/v1/vault.totp', '/v1/mail.send', '/v1/rotations'];

  it.each(ROUTES)('%s: malformed JSON is a 400', async (route) => {
    for (const raw of ['{"name":', 'not json', '{"a":1,}', '']) {
      const res = await post(route, { raw, headers: { 'content-type': 'application/json' } });
      expectProblem(res, 400, raw === '' ? 'validation-failed' : 'malformed-json');
    }
  });

  it.each(ROUTES)('%s: a body that is not a JSON object, or not JSON at all, is refused', async (route) => {
    expectProblem(await post(route, { body: [1, 2] }), 400, 'validation-failed');
    expectProblem(await post(route, { body: 'a string' }), 400, 'validation-failed');
    expectProblem(await post(route, { raw: 'name=x', headers: { 'content-type': 'application/x-www-form-urlencoded' } }), 415, 'unsupported-media-type');
  });

  it.each(ROUTES)('%s: no token is a 401 before the body is even read', async (route) => {
    expectProblem(await post(route, { token: null, raw: '{"broken', headers: { 'content-type': 'application/json' } }), 401, 'unauthorized');
  });

  it('unknown fields are named', async () => {
    const res = await post('/v1/vault.store', { body: { name: 'a', kind: 'api_key', value: 'v-unknown-fields', colour: 'red', __proto__x: 1 } });
    expectProblem(res, 400, 'validation-failed');
    expect(res.body.errors).toEqual([
      { path: 'colour', message: 'is not a known field' },
      { path: '__proto__x', message: 'is not a known field' },
    ]);
    const nested = await post('/v1/vault.store', { body: { name: 'a', kind: 'api_key', value: 'v', rotation: { provider: 'generated', every: 3 } } });
    expect(nested.body.errors).toEqual([{ path: 'rotation.every', message: 'is not a known field' }]);
    const proto = await post('/v1/vault.get', { raw: '{"name":"a","__proto__":{"admin":true}}', headers: { 'content-type': 'application/json' } });
    expectProblem(proto, 400, 'validation-failed');
    // In the query of an endpoint that takes none too (before, ignored).
    const queried = await post('/v1/vault.get?name=b&debug=1', { body: { name: 'a' } });
    expectProblem(queried, 400, 'validation-failed');
    expect(queried.body.errors).toEqual([
      { path: 'name', message: 'is not a known field' },
      { path: 'debug', message: 'is not a known field' },
    ]);
  });

  it('wrong types and impossible values are named by path, without echoing the value', async () => {
    const cases: [string, unknown, string][] = [
      ['/v1/vault.store', { name: 'a', kind: 'api_key', value: 12345 }, 'value'],
      ['/v1/vault.store', { name: 'a', kind: 'laser', value: 'secret-kind-value' }, 'kind'],
      ['/v1/vault.store', { name: ' spaced', kind: 'api_key', value: 'x' }, 'name'],
      ['/v1/vault.store', { name: 'a', kind: 'api_key' }, 'value'],
      ['/v1/vault.store', { name: 'a', kind: 'totp_seed', value: 'JBSWY3DPEHPK3PXP' }, 'totp'],
      ['/v1/vault.store', { name: 'a', kind: 'api_key', value: 'secret-version-value', expectedVersion: -1 }, 'expectedVersion'],
      ['/v1/vault.store', { name: 'a', kind: 'api_key', value: 'x', owners: ['not-an-email'] }, 'owners.0'],
      ['/v1/vault.store', { name: 'a', kind: 'api_key', value: 'x', expiresAt: 'tomorrow' }, 'expiresAt'],
      ['/v1/vault.get', { name: 'a', id: '5d4f6b2e-8a51-4c53-9d0f-1c3f5c1d2e3f' }, 'name'],
      ['/v1/vault.get', { id: 'not-a-uuid' }, 'id'],
      ['/v1/vault.get', { name: 'a', version: 0 }, 'version'],
      ['/v1/mail.send', { to: [], subject: 's', text: 't' }, 'to'],
      ['/v1/mail.send', { to: ['a@example.com'], subject: 'two\r\nBcc: x@evil.com', text: 't' }, 'subject'],
      ['/v1/rotations', { credentials: ['a'], filter: { kind: 'api_key' } }, 'credentials'],
    ];
    for (const [route, body, path] of cases) {
      const res = await post(route, { body });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors.map((e: { path: string }) => e.path)).toContain(path);
      expect(res.text).not.toContain('secret-kind-value');
      expect(res.text).not.toContain('secret-version-value');
    }
  });

  it('semantic errors are 422 with the reason', async () => {
    // An 80-bit seed (16 base32 characters) is what many issuers hand out: accepted (in beforeAll).
    expect(accepted.tenBytes.status).toBe(201);
    const notBase32 = await post('/v1/vault.store', { body: { name: 'b', kind: 'totp_seed', totp: { secret: 'ABCDEFGHIJKLMNO1' } } });
    expectProblem(notBase32, 422, 'unprocessable');
    expect(notBase32.body.detail).toBe('the TOTP secret is not valid base32 (letters A-Z and digits 2-7)');
    const hotp = await post('/v1/vault.store', { body: { name: 'c', kind: 'totp_seed', totp: { otpauthUri: 'otpauth://hotp/x?secret=JBSWY3DPEHPK3PXP&counter=3' } } });
    expectProblem(hotp, 422, 'unprocessable');
    const provider = await post('/v1/vault.store', { body: { name: 'd', kind: 'api_key', value: 'v', rotation: { provider: 'aws-magic' } } });
    expectProblem(provider, 422, 'unprocessable');
    expect(provider.body.detail).toBe("rotation.provider 'aws-magic' is unknown; known providers: generated, postgres-role, http");
    // Names every object has (Object.prototype's) are unknown too: not a 500 from a lookup that found them there.
    for (const name of ['constructor', 'toString', '__proto__', 'hasOwnProperty']) {
      const inherited = await post('/v1/vault.store', { body: { name: 'd', kind: 'api_key', value: 'v', rotation: { provider: name } } });
      expectProblem(inherited, 422, 'unprocessable');
      expect(inherited.body.detail).toBe(`rotation.provider '${name}' is unknown; known providers: generated, postgres-role, http`);
      const dependent = await post('/v1/vault.store', { body: { name: 'd', kind: 'api_key', value: 'v', dependents: [{ type: name }] } });
      expectProblem(dependent, 422, 'unprocessable');
      expect(dependent.body.detail).toBe(`dependents.0.type '${name}' is unknown; known types: env-file, webhook`);
      const patched = await h.api('PATCH', '/v1/credentials/ten-byte-seed', { token: agent.token, body: { dependents: [{ type: name }] } });
      expectProblem(patched, 422, 'unprocessable');
    }
    expect((await post('/v1/vault.get', { body: { name: 'd' } })).status).toBe(404);
    // No provider makes TOTP seeds: a seed with a rotation policy would fail at every sweep's plan.
    const seedPolicy = { provider: 'generated', periodDays: 30 };
    const seedStored = await post('/v1/vault.store', { body: { name: 'rotating-seed', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXP') }, rotation: seedPolicy } });
    expectProblem(seedStored, 422, 'unprocessable');
    expect(seedStored.body.detail).toBe(
      'a totp_seed takes no rotation policy: no provider makes TOTP seeds (enrol a new seed with its service and store it with vault.store)',
    );
    expect((await post('/v1/vault.totp', { body: { name: 'rotating-seed' } })).status).toBe(404);
    const seedPatched = await h.api('PATCH', '/v1/credentials/ten-byte-seed', { token: agent.token, body: { rotation: seedPolicy, tags: ['2fa'] } });
    expectProblem(seedPatched, 422, 'unprocessable');
    expect(seedPatched.body.detail).toBe(seedStored.body.detail);
    const listed = await h.api('GET', '/v1/credentials?kind=totp_seed', { token: agent.token });
    expect(listed.body.items.map((c: { name: string }) => c.name)).toEqual(['ten-byte-seed']);
    expect(listed.body.items[0]).toMatchObject({ policy: null, tags: [], nextRotationAt: null });
  });

  it('a value over 64 KiB is a 400; a request over 256 KiB is a 413', async () => {
    const big = await post('/v1/vault.store', { body: { name: 'big', kind: 'generic', value: 'x'.repeat(64 * 1024 + 1) } });
    expectProblem(big, 400, 'validation-failed');
    expect(big.body.errors).toEqual([{ path: 'value', message: 'must be at most 65536 bytes' }]);
    const multibyte = await post('/v1/vault.store', { body: { name: 'big', kind: 'generic', value: 'é'.repeat(32 * 1024 + 1) } });
    expectProblem(multibyte, 400, 'validation-failed');
    // Exactly 64 KiB is accepted (in beforeAll).
    expect(accepted.exactly.status).toBe(201);
    const huge = await post('/v1/vault.store', { body: { name: 'huge', kind: 'generic', value: 'x'.repeat(300 * 1024) } });
    expectProblem(huge, 413, 'payload-too-large');
  });

  it('an endpoint that takes no body refuses one (before, ignored: a DELETE given {"destroy":true} went ahead as a soft delete); an empty one is none', async () => {
    const destroy = await h.api('DELETE', '/v1/credentials/edge', { token: agent.token, body: { destroy: true } });
    expectProblem(destroy, 400, 'validation-failed');
    expect(destroy.body.errors).toEqual([{ path: 'body', message: 'is not taken here' }]);
    const restore = await h.api('POST', '/v1/credentials/edge/restore', { token: agent.token, raw: 'x'.repeat(300 * 1024), headers: { 'content-type': 'text/plain' } });
    expectProblem(restore, 413, 'payload-too-large');
    // Chunked: read to learn whether anything came.
    const chunked = (path: string, method: string, chunks: string[]) =>
      new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = http.request(`${h.url}${path}`, { method, headers: { authorization: `Bearer ${agent.token}`, 'transfer-encoding': 'chunked' } }, (res) => {
          let body = '';
          res.on('data', (c) => (body += c));
          res.on('end', () => resolve({ status: res.statusCode!, body }));
        });
        req.on('error', reject);
        for (const c of chunks) req.write(c);
        req.end();
      });
    const sent = await chunked('/v1/credentials/edge', 'DELETE', ['{"destroy":', 'true}']);
    expect(sent.status, sent.body).toBe(400);
    expect((await chunked('/v1/whoami', 'GET', [])).status).toBe(200);
    // Not deleted, soft or otherwise.
    expect((await h.sql("SELECT deleted_at, destroyed_at FROM credentials WHERE name = 'edge'")).rows).toEqual([{ deleted_at: null, destroyed_at: null }]);
  });

  it('a body is read alike whichever path it takes (the plain JSON request read directly, the rest by body-parser)', async () => {
    // Each answer proves the body was parsed: vault.get names the credential it did not find.
    const send = (headers: [string, string][], body: string | Buffer) =>
      rawRequest(h.url, { method: 'POST', path: '/v1/vault.get', headers: [['authorization', `Bearer ${agent.token}`], ...headers], body });
    const json = '{"name":"nowhere-to-be-found"}';
    const notFound = (res: RawResponse) => {
      expect(res.status).toBe(404);
      expect(res.body.detail).toBe("no credential with name 'nowhere-to-be-found'");
    };
    notFound(await send([['content-type', 'application/json']], json));
    notFound(await send([['content-type', 'application/json; charset=utf-8']], json));
    notFound(await send([['content-type', 'application/json;charset=UTF-8']], json));
    notFound(await send([['content-type', 'application/merge-patch+json']], json));
    notFound(await send([['content-type', 'application/json'], ['transfer-encoding', 'chunked']], json));
    notFound(await send([['content-type', 'application/json'], ['content-encoding', 'gzip']], gzipSync(json)));
    // A UTF-8 byte order mark is dropped on both paths, as body-parser always did.
    notFound(await send([['content-type', 'application/json']], `\uFEFF${json}`));
    notFound(await send([['content-type', 'application/merge-patch+json']], `\uFEFF${json}`));
    // Errors are the same on both paths.
    const deep = `${'{"a":'.repeat(40)}1${'}'.repeat(40)}`;
    for (const type of ['application/json', 'application/merge-patch+json']) {
      const tooDeep = await send([['content-type', type]], deep);
      expect(tooDeep.status).toBe(400);
      expect(tooDeep.body.detail).toBe('the request body is nested more than 32 levels deep');
      const malformed = await send([['content-type', type]], '{"name":');
      expect(malformed.status).toBe(400);
      expect(malformed.body.type).toBe('https://mailgent.dev/problems/malformed-json');
      expect(malformed.text).not.toMatch(/SyntaxError|position|Unexpected/);
    }
    const latin1 = await send([['content-type', 'application/json; charset=latin1']], json);
    expect(latin1.status).toBe(415);
    expect(latin1.body.detail).toBe('the request body must be UTF-8 JSON');
  });

  it('a client that goes away in the middle of its body leaves the server answering', async () => {
    const { hostname, port } = new URL(h.url);
    await new Promise<void>((resolve, reject) => {
      const socket = connect({ host: hostname, port: Number(port) }, () => {
        socket.write(`POST /v1/vault.get HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${agent.token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name":`);
        setTimeout(() => socket.destroy(), 100);
      });
      socket.on('close', () => resolve());
      socket.on('error', reject);
    });
    const res = await post('/v1/vault.get', { body: { name: 'nowhere-to-be-found' } });
    expect(res.status).toBe(404);
  });

  it('text PostgreSQL cannot store (NUL, unpaired surrogates) and numbers beyond its int are 400s, wherever they appear', async () => {
    const json = { 'content-type': 'application/json' };
    const cases: [string, string, string, string][] = [
      ['POST', '/v1/rotations', '{"credentials":["a"],"reason":"a\\u0000b"}', 'reason'],
      ['POST', '/v1/vault.store', '{"name":"a","kind":"generic","value":"v-nul","tags":["x\\ud800"]}', 'tags.0'],
      ['POST', '/v1/vault.store', '{"name":"a","kind":"generic","value":"v-nul","metadata":{"k\\u0000":"v"}}', 'metadata.k\u0000'],
      ['POST', '/v1/leaks', '{"credential":"a","source":"s","details":"\\udc00"}', 'details'],
      ['PATCH', '/v1/credentials/a%00b', '{"tags":["x"]}', 'ref'],
      ['DELETE', '/v1/credentials/a%00b', '', 'ref'],
      ['GET', '/v1/audit?credential=a%00b', '', 'credential'],
      ['GET', '/v1/rotations/%00', '', 'id'],
    ];
    for (const [method, route, raw, path] of cases) {
      const res = await h.api(method, route, { token: agent.token, raw: raw || undefined, headers: raw ? json : {} });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors.map((e: { path: string }) => e.path)).toEqual([path]);
    }
    const version = await post('/v1/vault.get', { body: { name: 'a', version: 2 ** 31 } });
    expectProblem(version, 400, 'validation-failed');
    expect(version.body.errors.map((e: { path: string }) => e.path)).toEqual(['version']);
    expectProblem(await post('/v1/vault.store', { body: { name: 'a', kind: 'generic', value: 'v', expectedVersion: 2 ** 40 } }), 400, 'validation-failed');
  });

  it('unknown routes are 404 problems; a method a route does not answer is a 405 problem naming those it does', async () => {
    expectProblem(await h.api('GET', '/v1/nothing', { token: agent.token }), 404, 'not-found');
    expectProblem(await h.api('OPTIONS', '/v1/nothing'), 404, 'not-found');
    // A path no route answers is not repeated as sent: a segment no route has (a typo, or a value
    // pasted into the path) shows as …, in the answer, its instance and the request log (the leak sweep reads it).
    const pasted = h.secret(`sk_live_${randomUUID().replaceAll('-', '')}`);
    const typo = await unrecorded('GET', `/v1/credential/${pasted}`, agent.token);
    expectProblem(typo, 404, 'not-found');
    expect(typo.body).toMatchObject({ detail: 'no route GET /v1/…/…', instance: '/v1/…/…' });
    expect((await unrecorded('POST', `/v1/credentials/x/${pasted}`, agent.token)).body).toMatchObject({ detail: 'no route POST /v1/credentials/…/…' });
    const wrong = await h.api('DELETE', '/v1/vault.get', { token: agent.token });
    expectProblem(wrong, 405, 'method-not-allowed');
    expect(wrong.headers.get('allow')).toBe('POST, OPTIONS');
    expect(wrong.body.detail).toBe('/v1/vault.get does not answer DELETE; it answers POST, OPTIONS');
    // The path's routes, whatever its parameters (no GET of one credential: its metadata is in the list).
    const put = await h.api('PUT', '/v1/credentials/0b6f3a5e-1c2d-4e5f-8a9b-0c1d2e3f4a5b', { token: agent.token, body: {} });
    expectProblem(put, 405, 'method-not-allowed');
    expect(put.headers.get('allow')).toBe('PATCH, DELETE, OPTIONS');
    // Its answer names the route's pattern, not the path sent (a value pasted where a name goes, say).
    expect(put.body).toMatchObject({ detail: '/v1/credentials/:ref does not answer PUT; it answers PATCH, DELETE, OPTIONS', instance: '/v1/credentials/:ref' });
    // HEAD is answered where GET is (Express's own), and refused where it is not.
    expect((await h.api('HEAD', '/v1/credentials', { token: agent.token })).status).toBe(200);
    expect((await h.api('HEAD', '/v1/vault.get', { token: agent.token })).status).toBe(405);
    // Without a token too: which methods a path answers is in the public OpenAPI document anyway.
    expectProblem(await h.api('POST', '/healthz'), 405, 'method-not-allowed');
    // OPTIONS: 204, the same Allow, no body (Express's own answer was a 200 with the methods as text).
    for (const [path, allow] of [['/v1/vault.store', 'POST, OPTIONS'], ['/metrics', 'GET, HEAD, OPTIONS'], ['/v1/credentials', 'GET, HEAD, OPTIONS']] as const) {
      const options = await h.api('OPTIONS', path);
      expect(options.status, path).toBe(204);
      expect(options.headers.get('allow'), path).toBe(allow);
      expect(options.text).toBe('');
    }
  });

  it('an id that is not a UUID is not found, even when it looks like one to a loose check (36 dashes); the text is not repeated', async () => {
    // Nor logged (the leak sweep reads the request log): it may be a value pasted where an id goes.
    const pasted = h.secret(`sk_live_${randomUUID().replaceAll('-', '')}`);
    for (const [method, path, pattern, token, body] of [
      ['GET', '/v1/rotations/', '/v1/rotations/:id', agent.token],
      ['DELETE', '/v1/rotations/', '/v1/rotations/:id', agent.token],
      ['POST', '/v1/rotations/', '/v1/rotations/:id/rollback', agent.token, '/rollback'],
      ['DELETE', '/v1/grants/', '/v1/grants/:id', agent.token],
      ['PATCH', '/v1/identities/', '/v1/identities/:id', h.adminToken],
    ] as const) {
      const res = await unrecorded(method, `${path}${pasted}${body ?? ''}`, token, method === 'PATCH' ? { mcpMasking: false } : undefined);
      expectProblem(res, 404, 'not-found');
      expect(res.body.instance, path).toBe(pattern);
      expect(res.text).not.toContain(pasted);
    }
    const dashes = '-'.repeat(36);
    expectProblem(await h.api('GET', `/v1/rotations/${dashes}`, { token: agent.token }), 404, 'not-found');
    expectProblem(await h.api('DELETE', `/v1/rotations/${dashes}`, { token: agent.token }), 404, 'not-found');
    expectProblem(await h.api('POST', `/v1/rotations/${dashes}/rollback`, { token: agent.token }), 404, 'not-found');
    expectProblem(await h.api('DELETE', `/v1/grants/${dashes}`, { token: agent.token }), 404, 'not-found');
    expectProblem(await h.api('PATCH', `/v1/identities/${dashes}`, { token: h.adminToken, body: { mcpMasking: false } }), 404, 'not-found');
    // Text that is no identity's name or id, where the token route takes either: not repeated (before,
    // `no identity named 'a\nb'`, a bidi override, 300 characters, as given).
    for (const odd of ['a%0Ab', '%E2%80%AEevil', 'x'.repeat(300), dashes]) {
      const res = await h.api('POST', `/v1/identities/${odd}/token`, { token: h.adminToken });
      expectProblem(res, 404, 'not-found');
      expect(res.body.instance).toBe('/v1/identities/:ref/token');
      expect(res.text).not.toContain(decodeURIComponent(odd));
    }
    expect((await h.api('POST', '/v1/identities/no-such-identity/token', { token: h.adminToken })).body.detail).toBe("no identity named 'no-such-identity'");
    // Nor a credential's name (it starts with no letter or digit): a 400, as any reference of neither
    // form is now (it was a 200 with no items, the text written into the caller's denied row).
    const audit = await h.api('GET', `/v1/audit?credential=${dashes}`, { token: h.adminToken });
    expectProblem(audit, 400, 'validation-failed');
    expect(audit.body.errors.map((e: { path: string }) => e.path)).toEqual(['credential']);
  });

  it('a name shaped like a UUID is refused (a path segment of that shape names a credential by id)', async () => {
    const res = await post('/v1/vault.store', { body: { name: '0b6f3a5e-1c2d-4e5f-8a9b-0c1d2e3f4a5b', kind: 'generic', value: 'v-uuid-name' } });
    expectProblem(res, 400, 'validation-failed');
    expect(res.body.errors).toEqual([{ path: 'name', message: 'must not have the form of a UUID (that names a credential by id)' }]);
  });

  it('a name shaped like an MCP handle is refused (rotate_credentials and report_leak take a handle for its credential id)', async () => {
    for (const name of ['mailgent://credentials/0b6f3a5e-1c2d-4e5f-8a9b-0c1d2e3f4a5b@3', 'MAILGENT://x']) {
      const res = await post('/v1/vault.store', { body: { name, kind: 'generic', value: 'v-handle-name' } });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors).toEqual([{ path: 'name', message: 'must not start with mailgent: (that is a handle, which names a credential by id)' }]);
    }
    expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name ILIKE 'mailgent:%'")).rows[0].n).toBe(0);
  });

  it('a UUID-shaped id of no UUID version or variant is an id all the same: not found, in a body as in a path', async () => {
    // Refused as a name (it has a UUID's shape), it was refused as an id too (a 400): no way to name it.
    const odd = '12345678-1234-1234-1234-123456789012';
    expectProblem(await post('/v1/vault.get', { body: { id: odd } }), 404, 'not-found');
    expectProblem(await post('/v1/vault.totp', { body: { id: odd } }), 404, 'not-found');
    expectProblem(await h.api('DELETE', `/v1/credentials/${odd}`, { token: agent.token }), 404, 'not-found');
    expectProblem(await post('/v1/vault.get', { body: { id: 'not-an-id' } }), 400, 'validation-failed');
  });

  it('an identity name shaped like a UUID is refused (a grant names its grantee by name or id)', async () => {
    // Before, it was created, and a grant to the identity whose id it copied could go to it instead.
    const res = await h.api('POST', '/v1/identities', { token: h.adminToken, body: { name: agent.id } });
    expectProblem(res, 400, 'validation-failed');
    expect(res.body.errors).toEqual([{ path: 'name', message: 'must not have the form of a UUID (that names an identity by id)' }]);
  });

  it('a date-time PostgreSQL cannot store (the year 0000) is a 400, not a 500', async () => {
    for (const expiresAt of ['0000-01-01T00:00:00Z', '0001-01-01T00:00:00+05:00']) {
      const res = await post('/v1/vault.store', { body: { name: 'dated', kind: 'generic', value: 'v-dated', expiresAt } });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors).toEqual([{ path: 'expiresAt', message: 'must be a date-time from the year 1 (UTC) onwards' }]);
    }
    expectProblem(await h.api('PATCH', '/v1/credentials/dated', { token: agent.token, body: { expiresAt: '0000-06-01T00:00:00Z' } }), 400, 'validation-failed');
    expectProblem(await h.api('GET', '/v1/audit?since=0000-01-01T00:00:00Z', { token: agent.token }), 400, 'validation-failed');
  });

  it('a UTC offset PostgreSQL cannot take (over 15 hours, valid RFC 3339) is a 400, not a 500 (credentials.test stores one of 15 hours)', async () => {
    // Before, each went to PostgreSQL as given: "time zone displacement out of range", a 500.
    for (const expiresAt of ['2030-01-01T00:00:00+16:00', '2030-01-01T00:00:00-20:00', '2030-01-01T00:00:00+23:59']) {
      const res = await post('/v1/vault.store', { body: { name: 'far-offset', kind: 'generic', value: 'v-far-offset', expiresAt } });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors).toEqual([{ path: 'expiresAt', message: 'must have a UTC offset of at most 15 hours' }]);
      expectProblem(await h.api('PATCH', '/v1/credentials/far-offset', { token: agent.token, body: { expiresAt } }), 400, 'validation-failed');
    }
    expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name = 'far-offset'")).rows[0].n).toBe(0);
  });

  it('query strings are validated too', async () => {
    expectProblem(await h.api('GET', '/v1/credentials?limit=0', { token: agent.token }), 400, 'validation-failed');
    expectProblem(await h.api('GET', '/v1/credentials?kind=a&kind=b', { token: agent.token }), 400, 'validation-failed');
    expectProblem(await h.api('GET', '/v1/credentials?sneaky=1', { token: agent.token }), 400, 'validation-failed');
    expectProblem(await h.api('GET', '/v1/audit?since=yesterday', { token: agent.token }), 400, 'validation-failed');
  });
});
