import { createHash } from 'node:crypto';
import { Validator } from '@seriousme/openapi-schema-validator';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openApiPath } from '../api/openapi';
import { ENCODING, KEY_ID_HEADER } from '../vault/payload-codec';
import { expectCleanRun } from './support/leaks';
import { startHarness, type ApiResponse, type Harness } from './support/harness';
import { harnessRoutes } from './support/routes';

type Operation = { responses: Record<string, { content?: Record<string, { schema?: object }> }>; parameters?: { name: string; in: string }[] };
type Doc = { openapi: string; paths: Record<string, Record<string, Operation>> };

/**
 * The served OpenAPI document is valid 3.1, documents exactly the routes express answers, and
 * every route's real answers (successes and problems) match the schema documented for their status.
 */
describe('OpenAPI document', () => {
  let h: Harness;
  let doc: Doc;
  let resolved: Doc;
  const ajv = new Ajv2020({ allErrors: true });
  (addFormats as unknown as (a: Ajv2020) => void)(ajv);
  const compiled = new Map<object, ValidateFunction>();
  const exercised = new Set<string>();

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    const res = await h.api('GET', '/openapi.json');
    expect(res.status).toBe(200);
    doc = res.body;
    const validator = new Validator();
    await validator.validate(structuredClone(doc) as Record<string, unknown>);
    resolved = validator.resolveRefs() as Doc;
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  /** The documented path template a concrete path matches (literal segments win over parameters). */
  const templateOf = (path: string): string | undefined =>
    Object.keys(resolved.paths)
      .filter((t) => new RegExp(`^${t.replace(/[.]/g, '\\.').replace(/\{[^}]+\}/g, '[^/]+')}$`).test(path))
      .sort((a, b) => (a.match(/\{/g)?.length ?? 0) - (b.match(/\{/g)?.length ?? 0))[0];

  /** Calls the API and checks the answer against the document: path, method, status, media type and body schema. */
  const call = async (method: string, route: string, opts: Parameters<Harness['api']>[2] = {}): Promise<ApiResponse> => {
    const res = await h.api(method, route, opts);
    const path = route.split('?')[0]!;
    const template = templateOf(path);
    expect(template, `${method} ${path} is documented`).toBeDefined();
    const op = resolved.paths[template!]![method.toLowerCase()];
    expect(op, `${method} ${template} is documented`).toBeDefined();
    const response = op!.responses[String(res.status)];
    expect(response, `${method} ${template} documents status ${res.status} (${res.text.slice(0, 200)})`).toBeDefined();
    const mediaType = (res.headers.get('content-type') ?? '').split(';')[0]!.trim();
    const content = response!.content?.[mediaType];
    expect(content, `${method} ${template} ${res.status} documents ${mediaType}`).toBeDefined();
    if (content!.schema && /json$/.test(mediaType)) {
      let validate = compiled.get(content!.schema);
      if (!validate) compiled.set(content!.schema, (validate = ajv.compile(content!.schema)));
      expect(validate(res.body) ? [] : validate.errors, `${method} ${template} ${res.status} body matches its schema`).toEqual([]);
    }
    exercised.add(`${method} ${template}`);
    return res;
  };

  it('is a valid OpenAPI 3.1 document, served without a token', async () => {
    const result = await new Validator().validate(structuredClone(doc) as Record<string, unknown>);
    expect(result.errors).toBeUndefined();
    expect(result.valid).toBe(true);
    expect(doc.openapi).toBe('3.1.0');
    // Every {param} in a path is declared as a path parameter.
    for (const [path, ops] of Object.entries(doc.paths)) {
      for (const op of Object.values(ops)) {
        const declared = (op.parameters ?? []).filter((p) => p.in === 'path').map((p) => p.name);
        expect(declared, path).toEqual([...path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]));
      }
    }
  });

  it('documents every route express answers, and nothing it does not answer', () => {
    const all = harnessRoutes(h);
    expect(all.length).toBeGreaterThan(20);
    // Middleware mounted at a path may answer anything under it, so each one is named here after
    // checking it is not a route in disguise.
    const middleware: Record<string, string> = { '/codec': 'CORS for the codec server: answers the preflight (OPTIONS) only' };
    const routes = all.filter((r) => !(r.method === 'USE' && !r.doc && middleware[r.path]));
    expect(routes.filter((r) => !r.doc).map((r) => `${r.method} ${r.path}`), 'routes without documentation (see documented() in api/openapi.ts)').toEqual([]);
    const answered = routes.map((r) => `${r.method} ${openApiPath(r.path)}`).sort();
    const documentedOps = Object.entries(doc.paths)
      .flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`))
      .sort();
    expect(documentedOps).toEqual([...new Set(answered)].sort());
    expect(answered).toContain('PATCH /v1/credentials/{ref}');
    expect(answered).toContain('GET /openapi.json');
  });

  it('every answer of every route matches the schema documented for its status', async () => {
    const admin = h.adminToken;
    const agent = await call('POST', '/v1/identities', { token: admin, body: { name: 'openapi-agent', email: 'openapi-agent@example.com' } });
    expect(agent.status).toBe(201);
    const token: string = agent.body.token;
    const other = await h.createIdentity('openapi-other');
    expect((await call('POST', '/v1/identities', { token: admin, body: { name: 'openapi-agent' } })).status).toBe(409);
    expect((await call('POST', '/v1/identities', { token, body: { name: 'nope' } })).status).toBe(403);
    expect((await call('POST', '/v1/identities', { body: { name: 'nope' } })).status).toBe(401);
    expect((await call('PATCH', `/v1/identities/${other.id}`, { token: admin, body: { mcpMasking: true } })).status).toBe(200);
    const spare = await h.createIdentity('openapi-spare');
    const reissued = await call('POST', `/v1/identities/${spare.id}/token`, { token: admin });
    expect(reissued.status).toBe(201);
    h.secret(reissued.body.token);
    expect((await call('POST', '/v1/identities/openapi-nobody/token', { token: admin })).status).toBe(404);
    expect((await call('GET', '/v1/whoami', { token })).body.name).toBe('openapi-agent');

    // The vault primitives, their policy routes and their problems.
    const value = h.secret('sk_openapi_value_0123456789');
    const stored = await call('POST', '/v1/vault.store', {
      token,
      body: { name: 'stripe', kind: 'api_key', value, owners: ['payments@example.com'], rotation: { provider: 'generated', settings: { length: 32 }, graceHours: 1 } },
    });
    expect(stored.status).toBe(201);
    expect((await call('POST', '/v1/vault.store', { token, body: { name: 'stripe', kind: 'api_key', value, expectedVersion: 0 } })).status).toBe(409);
    expect((await call('POST', '/v1/vault.store', { token, body: { name: 'x', kind: 'api_key', value: 'v', colour: 'red' } })).status).toBe(400);
    expect((await call('POST', '/v1/vault.store', { token, raw: 'name=x', headers: { 'content-type': 'text/plain' } })).status).toBe(415);
    expect((await call('POST', '/v1/vault.store', { token, raw: JSON.stringify({ name: 'x', value: 'a'.repeat(300_000) }), headers: { 'content-type': 'application/json' } })).status).toBe(413);
    expect((await call('POST', '/v1/vault.store', { token, body: { name: 'seed', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP') } } })).status).toBe(201);
    expect((await call('POST', '/v1/vault.get', { token, body: { name: 'stripe' } })).body.value).toBe(value);
    expect((await call('POST', '/v1/vault.get', { token, body: { name: 'missing' } })).status).toBe(404);
    expect((await call('POST', '/v1/vault.get', { token: admin, body: { name: 'stripe' } })).status).toBe(403);
    expect((await call('POST', '/v1/vault.totp', { token, body: { name: 'seed' } })).status).toBe(200);
    expect((await call('POST', '/v1/vault.totp', { token, body: { name: 'stripe' } })).status).toBe(422);
    expect((await call('GET', '/v1/credentials?kind=api_key&limit=5', { token })).body.items).toHaveLength(1);
    expect((await call('GET', '/v1/credentials?limit=0', { token })).status).toBe(400);
    expect((await call('PATCH', '/v1/credentials/stripe', { token, body: { tags: ['billing'] } })).body.tags).toEqual(['billing']);
    expect((await call('DELETE', '/v1/credentials/seed', { token })).body.deletedAt).toBeTruthy();
    expect((await call('POST', '/v1/credentials/seed/restore', { token })).status).toBe(200);
    expect((await call('DELETE', '/v1/credentials/seed?destroy=true', { token })).body.destroyedVersions).toBe(1);
    expect((await call('DELETE', '/v1/credentials/seed?destroy=yes', { token })).status).toBe(400);

    const grant = await call('POST', '/v1/grants', { token, body: { credential: 'stripe', grantee: 'openapi-other' } });
    expect(grant.status).toBe(201);
    expect((await call('GET', '/v1/grants', { token })).body.given).toHaveLength(1);
    expect((await call('DELETE', `/v1/grants/${grant.body.id}`, { token })).status).toBe(200);
    // A route without body or query schema still refuses an unstorable path: a documented 400.
    expect((await call('DELETE', '/v1/grants/%00', { token })).status).toBe(400);

    expect((await call('POST', '/v1/mail.send', { token, body: { to: ['team@example.com'], subject: 'hi', text: 'nothing secret' } })).status).toBe(202);
    expect((await call('POST', '/v1/mail.send', { token, body: { to: ['team@example.com'], subject: 'hi', text: `it is ${value}` } })).status).toBe(422);

    expect((await call('GET', '/v1/password-policy', { token })).status).toBe(404);
    expect((await call('PUT', '/v1/password-policy', { token, body: { maxAgeDays: 90 } })).body.length).toBe(16);
    expect((await call('GET', '/v1/password-policy', { token })).status).toBe(200);
    // A service account with a dependent: the inventory shows the dependent as stored, settings too.
    const account = await call('POST', '/v1/vault.store', {
      token,
      body: { name: 'svc-billing', kind: 'service_account', value: h.secret('sa_openapi_value_0123456789'), dependents: [{ type: 'env-file', settings: { file: 'svc.env', key: 'SVC_TOKEN' } }] },
    });
    expect(account.status, account.text).toBe(201);
    expect((await call('GET', '/v1/service-accounts', { token })).body.items).toEqual([
      expect.objectContaining({ name: 'svc-billing', dependents: [{ type: 'env-file', settings: { file: 'svc.env', key: 'SVC_TOKEN' } }] }),
    ]);
    expect((await call('GET', '/v1/reports/orphans?days=7', { token })).body.days).toBe(7);

    // A rotation through the real worker: progress, rollback in the grace period, cancel.
    const started = await call('POST', '/v1/rotations', { token, body: { credentials: ['stripe'], reason: 'openapi' } });
    expect(started.status).toBe(202);
    let report: ApiResponse | undefined;
    for (let i = 0; i < 150; i++) {
      report = await call('GET', `/v1/rotations/${started.body.rotationId}`, { token });
      if (report.body.state === 'grace') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    expect(report!.body.state).toBe('grace');
    expect((await call('POST', `/v1/rotations/${started.body.rotationId}/rollback`, { token })).body.results[0].rolledBack).toBe(true);
    expect((await call('DELETE', `/v1/rotations/${started.body.rotationId}`, { token })).status).toBe(202);
    expect((await call('GET', '/v1/rotations/00000000-0000-0000-0000-000000000000', { token })).status).toBe(404);
    expect((await call('POST', '/v1/rotations', { token, body: { credentials: ['nothing-here'] } })).status).toBe(404);

    const leak = await call('POST', '/v1/leaks', { token, body: { fingerprint: createHash('sha256').update(value).digest('hex'), source: 'openapi test' } });
    expect(leak.status).toBe(202);
    expect((await call('POST', '/v1/leaks', { token, body: { credential: 'missing', source: 'openapi test' } })).status).toBe(404);

    expect((await call('GET', '/v1/audit?limit=3', { token })).body.items).toHaveLength(3);
    expect((await call('GET', '/v1/audit/verify', { token: admin })).body.ok).toBe(true);
    expect((await call('GET', '/v1/audit/verify', { token })).status).toBe(403);

    // The codec server (admin only).
    expect((await call('POST', '/codec/encode', { token: admin, body: { payloads: [] } })).body).toEqual({ payloads: [] });
    expect((await call('POST', '/codec/decode', { token, body: { payloads: [] } })).status).toBe(403);
    // A payload this deployment cannot open (encrypted under another key): a documented 422 problem.
    const b64 = (text: string) => Buffer.from(text).toString('base64');
    const foreign = { metadata: { encoding: b64(ENCODING), [KEY_ID_HEADER]: b64('payload-codec:0000000000000000') }, data: b64('sealed elsewhere') };
    expect((await call('POST', '/codec/decode', { token: admin, body: { payloads: [foreign] } })).status).toBe(422);

    // The operational routes.
    expect((await call('GET', '/healthz')).status).toBe(200);
    expect((await call('GET', '/readyz')).status).toBe(200);
    expect((await call('GET', '/metrics')).text).toContain('mailgent_http_requests_total');
    expect((await call('GET', '/openapi.json')).status).toBe(200);

    // Every route of /v1 and the others above was called at least once (/mcp has its own tests).
    const own = ['/healthz', '/readyz', '/metrics', '/openapi.json', '/codec/encode', '/codec/decode'];
    const all = Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`));
    expect(all.filter((op) => (op.includes(' /v1/') || own.some((p) => op.endsWith(` ${p}`))) && !exercised.has(op))).toEqual([]);
  });
});
