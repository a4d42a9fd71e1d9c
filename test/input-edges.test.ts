import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { rawRequest, type RawResponse } from './support/raw-http';
import { startHarness, type Harness } from './support/harness';

/** Edges of the input: body bytes, charsets, far dates, query numbers, an id's case. Each is refused (or normalised), and nothing is stored. */
describe('input edges', () => {
  let h: Harness;
  let agent: { id: string; token: string };

  beforeAll(async () => {
    h = await startHarness();
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  const expectProblem = (res: { status: number; body: any }, status: number, slug: string) => {
    expect(res.status).toBe(status);
    expect(res.body).toMatchObject({ type: `https://mailgent.dev/problems/${slug}`, status });
  };
  const notStored = async (name: string) => {
    const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } });
    expect(res.status).toBe(404);
  };
  const store = (headers: [string, string][], body: string | Buffer): Promise<RawResponse> =>
    rawRequest(h.url, { method: 'POST', path: '/v1/vault.store', headers: [['authorization', `Bearer ${agent.token}`], ...headers], body });

  it('a body that is not valid UTF-8 is malformed JSON on both paths (Content-Length and chunked), not stored with U+FFFD in it', async () => {
    const bytes = (name: string) => Buffer.concat([Buffer.from(`{"name":"${name}","kind":"password","value":"p`), Buffer.from([0xe4]), Buffer.from('ss'), Buffer.from([0xff]), Buffer.from('word"}')]);
    const cases: [string, [string, string][]][] = [
      ['latin-plain', [['content-type', 'application/json']]],
      ['latin-chunked', [['content-type', 'application/json'], ['transfer-encoding', 'chunked']]],
      ['latin-charset', [['content-type', 'application/json; charset="utf-8"']]],
    ];
    for (const [name, headers] of cases) {
      const res = await store(headers, bytes(name));
      expectProblem(res, 400, 'malformed-json');
      expect(res.body.detail, name).toBe('the request body is not valid UTF-8');
      await notStored(name);
    }
    // Valid UTF-8 (the same letters, encoded) is stored as sent, on both paths.
    for (const headers of [[['content-type', 'application/json']], [['content-type', 'application/json'], ['transfer-encoding', 'chunked']]] as [string, string][][]) {
      const name = `utf8-${headers.length}`;
      expect((await store(headers, Buffer.from(JSON.stringify({ name, kind: 'password', value: h.secret(`p\u00e4ss\u00ffword-${name}`) }), 'utf8'))).status).toBe(201);
      expect((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value).toBe(`p\u00e4ss\u00ffword-${name}`);
    }
  });

  it('a charset other than UTF-8 (any case) is a 415, as latin1 always was', async () => {
    for (const charset of ['utf-16le', 'UTF-16LE', 'utf-16', 'latin1']) {
      const res = await store([['content-type', `application/json; charset=${charset}`]], Buffer.from(JSON.stringify({ name: 'utf16', kind: 'generic', value: 'v-utf16' }), 'utf16le'));
      expectProblem(res, 415, 'unsupported-media-type');
      expect(res.body.detail, charset).toBe('the request body must be UTF-8 JSON');
    }
    await notStored('utf16');
  });

  it('an expiresAt past the year 9999 (UTC) is a 400 naming the field', async () => {
    for (const expiresAt of ['9999-12-31T23:59:59-15:00', '9999-12-31T09:00:00-15:00']) {
      const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'far-future', kind: 'generic', value: 'v-far-future', expiresAt } });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors).toEqual([{ path: 'expiresAt', message: 'must be a date-time before the year 10000 (UTC)' }]);
    }
    await notStored('far-future');
    // The last instant of 9999 (UTC) is fine, and answered as given.
    const last = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'year-9999', kind: 'generic', value: h.secret('v-year-9999'), expiresAt: '9999-12-31T08:59:59-15:00' } });
    expect(last.status).toBe(201);
    const patched = await h.api('PATCH', '/v1/credentials/year-9999', { token: agent.token, body: { expiresAt: '9999-12-31T23:59:59-15:00' } });
    expectProblem(patched, 400, 'validation-failed');
    expect(patched.body.errors).toEqual([{ path: 'expiresAt', message: 'must be a date-time before the year 10000 (UTC)' }]);
    const listed = await h.api('GET', '/v1/credentials', { token: agent.token });
    expect(listed.body.items.find((c: { name: string }) => c.name === 'year-9999').expiresAt).toBe('9999-12-31T23:59:59.000Z');
  });

  it('numeric query parameters take plain decimal digits only, given once', async () => {
    const cases: [string, string, string][] = [
      ['/v1/credentials?olderThanDays=', 'olderThanDays', 'must be a whole number'],
      ['/v1/credentials?dueWithinDays=%201', 'dueWithinDays', 'must be a whole number'],
      ['/v1/credentials?limit=0x10', 'limit', 'must be a whole number'],
      ['/v1/credentials?limit=1e2', 'limit', 'must be a whole number'],
      ['/v1/credentials?limit=-1', 'limit', 'must be a whole number'],
      ['/v1/credentials?limit=1&limit=2', 'limit', 'was given more than once'],
      ['/v1/audit?limit=1e2', 'limit', 'must be a whole number'],
      ['/v1/audit?after=0x1', 'after', 'must be a whole number'],
      ['/v1/audit?after=1&after=2', 'after', 'was given more than once'],
      ['/v1/reports/orphans?days=1.5e1', 'days', 'must be a whole number'],
      ['/v1/reports/orphans?days=', 'days', 'must be a whole number'],
    ];
    for (const [route, path, message] of cases) {
      const res = await h.api('GET', route, { token: agent.token });
      expectProblem(res, 400, 'validation-failed');
      expect(res.body.errors, route).toEqual([{ path, message }]);
    }
    // Plain digits work as before (leading zeros are still decimal).
    const page = await h.api('GET', '/v1/credentials?limit=01&olderThanDays=0', { token: agent.token });
    expect(page.status).toBe(200);
    expect(page.body.items).toHaveLength(1);
    const audit = await h.api('GET', '/v1/audit?limit=2', { token: agent.token });
    expect(audit.body.items).toHaveLength(2);
    const next = await h.api('GET', `/v1/audit?limit=2&after=${audit.body.nextCursor}`, { token: agent.token });
    expect(next.status).toBe(200);
    expect(next.body.items).toHaveLength(2);
    expect((await h.api('GET', '/v1/reports/orphans?days=30', { token: agent.token })).body.days).toBe(30);
  });

  it("a credentials page that ends on a name from before a rule refused it is followed: its cursor is any name a credential has", async () => {
    const lister = await h.createIdentity();
    for (const name of ['m1', 'm2', 'mb', 'mc']) {
      expect((await h.api('POST', '/v1/vault.store', { token: lister.token, body: { name, kind: 'generic', value: h.secret(`page-value-${name}-0001`) } })).status).toBe(201);
    }
    // As an older version allowed (names starting with mailgent: are refused since).
    await h.sql("UPDATE credentials SET name = 'mailgent:old' WHERE identity_id = $1 AND name = 'm2'", [lister.id]);
    const first = await h.api('GET', '/v1/credentials?limit=2', { token: lister.token });
    expect(first.body.items.map((c: { name: string }) => c.name)).toEqual(['m1', 'mailgent:old']);
    expect(first.body.nextCursor).toBe('mailgent:old');
    // Before, a 400: "after: must not start with mailgent:", and the pages after it were out of reach.
    const next = await h.api('GET', `/v1/credentials?limit=2&after=${encodeURIComponent(first.body.nextCursor)}`, { token: lister.token });
    expect(next.status, next.text).toBe(200);
    expect(next.body.items.map((c: { name: string }) => c.name)).toEqual(['mb', 'mc']);
  });

  it('a path whose percent-encoding does not decode is a 400 problem that says so, titled as every validation problem', async () => {
    for (const route of ['/v1/credentials/%ZZ', '/v1/grants/%C0']) {
      const res = await h.api(route.includes('grants') ? 'DELETE' : 'PATCH', route, { token: agent.token, body: route.includes('grants') ? undefined : { tags: [] } });
      expectProblem(res, 400, 'validation-failed');
      // Before: "Bad request", "the request could not be read".
      expect(res.body).toMatchObject({ title: 'The request is not valid', detail: 'the request path is not valid percent-encoding' });
    }
    // A password with a % in it pasted where a name goes: not repeated in the answer (nor, by the same path, in the request log).
    const pasted = await h.api('PATCH', '/v1/credentials/hunter2%pa55word', { token: agent.token, body: { tags: [] } });
    expectProblem(pasted, 400, 'validation-failed');
    // Before, the instance was the path as sent.
    expect(pasted.body.instance).toBe('/v1/credentials/…');
    expect(JSON.stringify(pasted.body)).not.toContain('pa55word');
  });

  it('a value pasted where a reference goes is not echoed by an error raised before its lookup either', async () => {
    const caller = await h.createIdentity();
    const pasted = `sk_live_${Math.random().toString(36).slice(2)}${Date.now().toString(36)}`;
    const tries: [string, string, Parameters<Harness['api']>[2], number, string][] = [
      ['PATCH', `/v1/credentials/${pasted}`, { token: caller.token, body: { tags: 5 } }, 400, '/v1/credentials/:ref'],
      ['PATCH', `/v1/credentials/${pasted}`, { body: { tags: [] } }, 401, '/v1/credentials/:ref'],
      ['PATCH', `/v1/credentials/${pasted}`, { token: h.adminToken, body: { tags: [] } }, 403, '/v1/credentials/:ref'],
      ['PATCH', `/v1/credentials/${pasted}`, { token: caller.token, raw: 'tags', headers: { 'content-type': 'text/plain' } }, 415, '/v1/credentials/:ref'],
      ['DELETE', `/v1/credentials/${pasted}?destroy=yes`, { token: caller.token }, 400, '/v1/credentials/:ref'],
      ['POST', `/v1/credentials/${pasted}/restore`, { token: caller.token, body: { x: 1 } }, 400, '/v1/credentials/:ref/restore'],
      ['GET', `/v1/rotations/${pasted}?x=1`, { token: caller.token }, 400, '/v1/rotations/:id'],
      ['DELETE', `/v1/grants/${pasted}?x=1`, { token: caller.token }, 400, '/v1/grants/:id'],
    ];
    for (const [method, route, opts, status, instance] of tries) {
      const res = await h.api(method, route, opts);
      expect([method, route, res.status]).toEqual([method, route, status]);
      // Before, the instance was the path as sent, for every error but the lookup's own 404.
      expect([method, route, res.body.instance]).toEqual([method, route, instance]);
      expect(res.text).not.toContain(pasted);
    }
  });

  it('a grant revoked by its id in upper case is answered and audited with the id in lower case', async () => {
    const reader = await h.createIdentity('edge-reader');
    expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'shared', kind: 'api_key', value: h.secret('sk_shared_edge_0001') } })).status).toBe(201);
    const granted = await h.api('POST', '/v1/grants', { token: agent.token, body: { credential: 'shared', grantee: reader.id } });
    expect(granted.status).toBe(201);
    const id: string = granted.body.id;
    const revoked = await h.api('DELETE', `/v1/grants/${id.toUpperCase()}`, { token: agent.token });
    expect(revoked.status).toBe(200);
    expect(revoked.body.id).toBe(id);
    const rows = (await h.sql("SELECT detail->>'grantId' AS id FROM audit_log WHERE action = 'grant.revoke' AND identity_id = $1", [agent.id])).rows;
    expect(rows).toEqual([{ id }]);
  });
});
