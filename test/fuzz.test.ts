import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KINDS } from '../vault/vault';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { rawRequest, type RawResponse } from './support/raw-http';
import { harnessRoutes, type RouteInfo } from './support/routes';

/**
 * Property-based hostile input against every route the API serves (read from the router stack, so a
 * new route is fuzzed without anyone listing it): arbitrary bodies, query strings, headers and paths.
 * Whatever arrives: no 5xx, errors are problem+json that reveal nothing internal, and a refused
 * request stores nothing. fast-check prints the seed and the shrunk counterexample on a failure.
 */
const STORED = ['identities', 'data_keys', 'credentials', 'secret_versions', 'grants', 'mail_outbox', 'rotations', 'rotation_runs', 'leak_incidents', 'password_policies', 'service_keys'];
const INTERNAL = /\bat [^\s]+ \(|node_modules|\/work\/|\/tmp\/|\.ts:\d|\bSELECT\b|\bINSERT\b|\bUPDATE\b|pg_|syntax error|violates|TypeError|RangeError|ReferenceError/;

const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** Field names the API knows, so generated bodies get past the first check often enough to reach deeper code. */
const FIELDS = [
  'name', 'kind', 'value', 'totp', 'id', 'version', 'expectedVersion', 'externalId', 'owners', 'service', 'tags', 'rotation', 'dependents', 'notify',
  'metadata', 'expiresAt', 'to', 'subject', 'text', 'html', 'credentials', 'filter', 'reason', 'credential', 'grantee', 'fingerprint', 'source',
  'details', 'email', 'maxAgeDays', 'length', 'lowercase', 'uppercase', 'digits', 'symbols', 'escalateAfterDays', 'secret', 'otpauthUri',
  'algorithm', 'period', 'provider', 'settings', 'periodDays', 'graceHours', 'window', 'mcpMasking', 'allowUnmaskedRead', 'jsonrpc', 'method', 'params',
];
const QUERY_KEYS = ['kind', 'limit', 'after', 'olderThanDays', 'dueWithinDays', 'credential', 'since', 'days', 'destroy', 'x'];
const NASTY_KEYS = ['__proto__', 'constructor', 'prototype', 'toString', 'hasOwnProperty', '__defineGetter__', ''];

const nastyString = fc.oneof(
  fc.string(),
  fc.string({ unit: 'grapheme' }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.constantFrom('\u0000', 'a\u0000b', '\ud800', 'x\udfffy', '\u202e', '💥'.repeat(50), "'; DROP TABLE credentials; --", '${7*7}', '../../etc/passwd', 'JBSWY3DPEHPK3PXP'),
  fc.constantFrom('x'.repeat(70_000), 'é'.repeat(40_000), ' '.repeat(1000)),
  fc.constantFrom(...KINDS, 'api_key', 'generated', 'env-file', 'webhook', 'a@example.com', '2024-01-01T00:00:00Z', 'otpauth://totp/x?secret=JBSWY3DPEHPK3PXP'),
);
const nastyNumber = fc.oneof(
  fc.integer(),
  fc.double(),
  fc.constantFrom(0, -1, 1, 2 ** 31, 2 ** 31 - 1, 2 ** 32, 2 ** 53, -(2 ** 53), 1e308, 5e-324, 1.5),
);
const scalar = fc.oneof(nastyString, nastyNumber, fc.boolean(), fc.constant(null));
const anyValue = fc.oneof({ depthSize: 'small' }, scalar, fc.jsonValue({ maxDepth: 4 }), fc.array(scalar, { maxLength: 5 }), fc.dictionary(fc.constantFrom(...FIELDS, ...NASTY_KEYS), scalar, { maxKeys: 4 }));

/** A JSON object as text, so duplicate keys and own `__proto__` keys survive. */
const objectText = fc
  .array(fc.tuple(fc.oneof(fc.constantFrom(...FIELDS), fc.constantFrom(...NASTY_KEYS), fc.string({ maxLength: 10 })), anyValue), { maxLength: 8 })
  .map((entries) => `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v) ?? 'null'}`).join(',')}}`);
const bodyText = fc.oneof(
  { weight: 6, arbitrary: objectText },
  { weight: 1, arbitrary: fc.jsonValue().map((v) => JSON.stringify(v) ?? 'null') },
  { weight: 1, arbitrary: fc.string() },
  { weight: 1, arbitrary: fc.constantFrom('', '{', '{"a":1,}', '[', 'null', '1e999', '"\\ud800"', '{"a":"\\u0000"}', '\u0000', '{"name":"a"}garbage') },
  { weight: 1, arbitrary: fc.integer({ min: 40, max: 3_000 }).map((d) => '['.repeat(d) + ']'.repeat(d)) },
);

const contentType = fc.constantFrom(
  'application/json',
  'application/json; charset=utf-8',
  'application/json; charset=utf-16',
  'application/json; charset=latin1',
  'application/merge-patch+json',
  'text/plain',
  'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=x',
  'application/json, text/plain',
  'APPLICATION/JSON',
  '',
);

/** Path parameter values: valid-looking ones, traversal, encoded separators and NULs, very long segments. */
const pathParam = fc.oneof(
  fc.uuid().map(String),
  fc.constantFrom('..', '.', '%2e%2e', '%2F', 'a%2Fb', '%00', 'a%00b', '%', '%zz', '%E0%A4%A', '~', '*', 'null', 'undefined', '__proto__', 'constructor'),
  fc.string({ maxLength: 30 }).map((p) => encodeURIComponent(p)),
  fc.string({ unit: 'grapheme', maxLength: 10 }).map((p) => encodeURIComponent(p)),
  fc.integer({ min: 200, max: 8_000 }).map((n) => 'a'.repeat(n)),
);

describe('fuzzing every endpoint', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  let routes: RouteInfo[];
  let stored: Record<string, number>;

  const counts = async () =>
    Object.fromEntries(
      await Promise.all(STORED.map(async (t) => [t, Number((await h.sql(`SELECT count(*) FROM ${t}`)).rows[0].count)] as const)),
    );

  beforeAll(async () => {
    // Fuzzing sends many invalid tokens on purpose; throttling would hide what they reach.
    h = await startHarness({ authFailures: { maxFailures: 1_000_000, windowMs: 60_000 } });
    agent = await h.createIdentity('fuzz-agent', 'fuzz@example.com');
    // Something for refs to find: a credential, a seed, a grant.
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'a', kind: 'generic', value: h.secret('fuzz-stored-value') } });
    // Middleware mounted at a path (USE, e.g. the codec's CORS) is not a route of its own.
    routes = harnessRoutes(h).filter((r) => r.method !== 'USE');
    stored = await counts();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  /** The properties every answer must have; echoed input (the path, the params) is removed before looking for internals. */
  const check = async (what: string, res: RawResponse, echoed: string[]) => {
    const where = `${what} → ${res.status} ${res.text.slice(0, 300)}`;
    expect(res.status, where).toBeGreaterThanOrEqual(200);
    expect(res.status, where).toBeLessThan(500);
    const after = await counts();
    if (res.status >= 400) {
      if (res.body?.jsonrpc === '2.0') {
        // The MCP endpoint answers in its protocol's own error format (JSON-RPC), not problem+json.
        expect(res.body, where).toMatchObject({ error: { code: expect.any(Number), message: expect.any(String) } });
      } else {
        expect(res.headers['content-type'], where).toMatch(/^application\/problem\+json/);
        expect(res.body, where).toMatchObject({ type: expect.stringMatching(/^https:\/\/mailgent\.dev\/problems\/[a-z-]+$/), title: expect.any(String), status: res.status, detail: expect.any(String) });
      }
      const decoded = echoed.flatMap((e) => {
        try {
          return [e, decodeURIComponent(e)];
        } catch {
          return [e];
        }
      });
      const text = [...decoded].sort((a, b) => b.length - a.length).reduce((t, e) => (e.length > 2 ? t.split(e).join('') : t), res.text);
      expect(text, where).not.toMatch(INTERNAL);
      // A refused request stores nothing (audit rows are the one thing it adds).
      expect(after, where).toEqual(stored);
    }
    stored = after;
  };

  const concrete = (route: RouteInfo, param: string) => route.path.replace(/:[A-Za-z]+/g, param);
  const send = (o: Parameters<typeof rawRequest>[1]) => rawRequest(h.url, o);
  const routeArb = () => fc.constantFrom(...routes);
  const tokenArb = () => fc.constantFrom(agent.token, h.adminToken);

  it('finds the routes from the router', () => {
    const names = routes.map((r) => `${r.method} ${r.path}`);
    for (const known of ['POST /v1/vault.store', 'POST /v1/vault.get', 'POST /v1/vault.totp', 'POST /v1/mail.send', 'PATCH /v1/credentials/:ref', 'GET /v1/audit']) {
      expect(names).toContain(known);
    }
  });

  it('bodies: arbitrary JSON, wrong types, huge and odd strings, prototype keys', { timeout: 120_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(routeArb(), tokenArb(), bodyText, fc.boolean(), async (route, token, body, jsonType) => {
        const path = concrete(route, 'a');
        const res = await send({
          method: route.method === 'GET' ? 'POST' : route.method,
          path: route.method === 'GET' ? path : path,
          headers: [
            ['authorization', `Bearer ${token}`],
            ['content-type', jsonType ? 'application/json' : 'application/json; charset=utf-8'],
          ],
          body,
        });
        await check(`${route.method} ${path} ${body.slice(0, 200)}`, res, [path, 'a']);
      }),
      { numRuns: 250 },
    );
  });

  it('query strings: known and unknown keys, repeats, odd encodings', { timeout: 60_000 }, async () => {
    const pair = fc.tuple(fc.oneof(fc.constantFrom(...QUERY_KEYS), fc.string({ maxLength: 8 })), fc.oneof(nastyString.filter((s) => s.length < 3000), fc.constantFrom('1', '0', '-1', '1e9', '99999999999999999999', 'true', 'api_key', '2024-01-01T00:00:00Z', '%00', '%zz')));
    await fc.assert(
      fc.asyncProperty(routeArb(), tokenArb(), fc.array(pair, { maxLength: 6 }), fc.boolean(), async (route, token, pairs, raw) => {
        if (pairs.flat().some((p) => LONE_SURROGATE.test(p))) return; // cannot be percent-encoded
        const query = pairs.map(([k, v]) => (raw ? `${k}=${v}` : `${encodeURIComponent(k)}=${encodeURIComponent(v)}`)).join('&');
        const path = `${concrete(route, 'a')}?${query}`;
        if (/[^\x21-\x7e]/.test(path)) return; // not sendable as a request line
        const res = await send({ method: route.method, path, headers: [['authorization', `Bearer ${token}`], ['content-type', 'application/json']], body: route.method === 'GET' ? undefined : '{}' });
        await check(`${route.method} ${path.slice(0, 300)}`, res, [path, ...pairs.flat(), ...pairs.flat().map((p) => encodeURIComponent(p))]);
      }),
      { numRuns: 120 },
    );
  });

  it('headers: content types, odd, repeated and huge authorization headers', { timeout: 60_000 }, async () => {
    const authorization = fc.oneof(
      fc.constant(`Bearer ${'__TOKEN__'}`),
      fc.constantFrom('Bearer', 'Bearer ', 'bearer __TOKEN__', 'BEARER __TOKEN__', 'Bearer  __TOKEN__', 'Bearer __TOKEN__ extra', 'Basic Zm9vOmJhcg==', 'Token __TOKEN__', '__TOKEN__', 'Bearer __TOKEN__\t'),
      fc.string({ maxLength: 100 }).map((s) => `Bearer ${s}`),
      fc.integer({ min: 500, max: 12_000 }).map((n) => `Bearer ${'t'.repeat(n)}`),
    );
    const extra = fc.array(
      fc.tuple(fc.constantFrom('authorization', 'x-request-id', 'content-encoding', 'transfer-encoding', 'x-forwarded-for', 'host', 'accept', 'x-pad'), fc.oneof(fc.string({ maxLength: 50 }), fc.constantFrom('gzip', 'br', 'identity', 'x-unknown', 'chunked, gzip', 'p'.repeat(20_000), 'a'.repeat(129), '../..'))),
      { maxLength: 3 },
    );
    await fc.assert(
      fc.asyncProperty(routeArb(), tokenArb(), fc.array(authorization, { maxLength: 3 }), contentType, extra, objectText, async (route, token, auths, type, more, body) => {
        const headers: [string, string][] = [...auths.map((a) => ['authorization', a.replaceAll('__TOKEN__', token)] as [string, string]), ...(type ? [['content-type', type] as [string, string]] : []), ...more];
        if (headers.some(([, v]) => /[^\t\x20-\x7e]/.test(v))) return; // Node refuses to send these itself
        const path = concrete(route, 'a');
        let res: RawResponse;
        try {
          res = await send({ method: route.method, path, headers, body: route.method === 'GET' ? undefined : body });
        } catch (err) {
          // Only a connection the server closed after answering a broken framing header is acceptable.
          if (headers.some(([k]) => k === 'transfer-encoding' || k === 'host')) return;
          throw err;
        }
        await check(`${route.method} ${path} ${JSON.stringify(headers).slice(0, 300)}`, res, [path, token, ...headers.map(([, v]) => v)]);
      }),
      { numRuns: 150 },
    );
  });

  it('paths: traversal, encoded slashes and NULs, very long segments, on every route', { timeout: 60_000 }, async () => {
    const shape = fc.constantFrom('plain', 'double-slash', 'trailing-slash', 'dot-segment', 'encoded-dots', 'prefix');
    await fc.assert(
      fc.asyncProperty(routeArb(), tokenArb(), pathParam, shape, async (route, token, param, how) => {
        let path = concrete(route, param);
        if (how === 'double-slash') path = path.replace('/v1/', '//v1//');
        if (how === 'trailing-slash') path += '/';
        if (how === 'dot-segment') path = path.replace('/v1/', '/v1/./x/../');
        if (how === 'encoded-dots') path = path.replace('/v1/', '/v1/%2e%2e/v1/');
        if (how === 'prefix') path = `/${param}${path}`;
        const res = await send({ method: route.method, path, headers: [['authorization', `Bearer ${token}`], ['content-type', 'application/json']], body: route.method === 'GET' ? undefined : '{"tags":["x"]}' });
        await check(`${route.method} ${path.slice(0, 300)}`, res, [path, param]);
      }),
      { numRuns: 150 },
    );
  });
});
