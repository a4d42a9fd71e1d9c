import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { createHmac } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { Ajv2020 } from 'ajv/dist/2020.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KINDS } from '../vault/types';
import { base32 } from './support/base32';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { waitFor } from './support/lifecycle-fixtures';
import { rawRequest } from './support/raw-http';

/**
 * The MCP server through the SDK's own client, over both transports: streamable HTTP at /mcp on the
 * API, and stdio through `mailgent mcp` (bin/mailgent.js as a child process, bridged to /mcp).
 */
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TOOLS = ['list_credentials', 'mail_send', 'report_leak', 'rotate_credentials', 'rotation_status', 'vault_get', 'vault_store', 'vault_totp'];
const TOTP_SEED = base32('mcp-test-seed-0123456789');

type Kind = 'http' | 'stdio';

interface Connected {
  client: Client;
  pid?: number;
  stderr: string[];
}

/** RFC 4226 HOTP, to check the code vault_totp gives without trusting the vault's own TOTP code. */
function hotp(secretAscii: string, counter: number, digits = 6): string {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const mac = createHmac('sha1', Buffer.from(secretAscii)).update(msg).digest();
  const offset = mac[mac.length - 1]! & 0xf;
  return String((mac.readUInt32BE(offset) & 0x7fffffff) % 10 ** digits).padStart(digits, '0');
}

describe('MCP server', () => {
  let h: Harness;
  const open: Connected[] = [];

  const connect = async (kind: Kind, token: string): Promise<Connected> => {
    const client = new Client({ name: 'mailgent-test', version: '1.0.0' });
    const c: Connected = { client, stderr: [] };
    if (kind === 'http') {
      await client.connect(new StreamableHTTPClientTransport(new URL(`${h.url}/mcp`), { requestInit: { headers: { authorization: `Bearer ${token}` } } }));
    } else {
      const transport = new StdioClientTransport({
        command: process.execPath,
        args: [path.join(ROOT, 'bin/mailgent.js'), 'mcp'],
        env: { MAILGENT_URL: h.url, MAILGENT_TOKEN: token },
        cwd: ROOT,
        stderr: 'pipe',
      });
      transport.stderr?.on('data', (d) => c.stderr.push(String(d)));
      open.push(c);
      await client.connect(transport);
      c.pid = transport.pid ?? undefined;
    }
    if (kind === 'http') open.push(c);
    return c;
  };
  const call = async (c: Connected, name: string, args: Record<string, unknown>) => (await c.client.callTool({ name, arguments: args })) as CallToolResult;
  const ok = (r: CallToolResult): any => {
    expect(r.isError, JSON.stringify(r)).toBeFalsy();
    // The text content is the same JSON as the structured content.
    expect(JSON.parse((r.content[0] as { text: string }).text)).toEqual(r.structuredContent);
    return r.structuredContent;
  };
  const problem = (r: CallToolResult): any => {
    expect(r.isError, JSON.stringify(r)).toBe(true);
    return JSON.parse((r.content[0] as { text: string }).text);
  };
  const auditOf = async (identityId: string, action: string) =>
    (await h.sql('SELECT outcome, credential_id, detail FROM audit_log WHERE identity_id = $1 AND action = $2 ORDER BY seq', [identityId, action])).rows;
  const setMcp = (identityId: string, body: Record<string, unknown>) => h.api('PATCH', `/v1/identities/${identityId}`, { token: h.adminToken, body });

  beforeAll(async () => {
    h = await startHarness({ worker: true });
  });
  afterAll(async () => {
    for (const c of open) await c.client.close();
    // The stdio bridges ended with their client: no process left behind.
    for (const c of open.filter((o) => o.pid)) {
      for (let i = 0; i < 50 && alive(c.pid!); i++) await new Promise((r) => setTimeout(r, 100));
      expect(alive(c.pid!), `mailgent mcp (pid ${c.pid}) still running`).toBe(false);
    }
    const stderr = open.map((c) => c.stderr.join('')).join('\n');
    for (const secret of h.secrets) expect(stderr.includes(secret), 'a secret reached the bridge’s stderr').toBe(false);
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  describe.each<Kind>(['http', 'stdio'])('over %s', (kind) => {
    let agent: { id: string; token: string };
    let other: { id: string; token: string };
    let mcp: Connected;
    let value: string;
    let stored: { id: string; handle: string };

    beforeAll(async () => {
      agent = await h.createIdentity(`mcp-${kind}`, `mcp-${kind}@example.com`);
      other = await h.createIdentity(`mcp-${kind}-other`);
      mcp = await connect(kind, agent.token);
      value = h.secret(`sk_live_${kind}_mcp_value_0001`);
    });

    it('lists the eight tools, each with the input schema of its HTTP endpoint', async () => {
      const { tools } = await mcp.client.listTools();
      expect(tools.map((t) => t.name).sort()).toEqual(TOOLS);
      for (const tool of tools) {
        expect(tool.inputSchema.type, tool.name).toBe('object');
        expect(Object.keys(tool.inputSchema.properties ?? {}).length, tool.name).toBeGreaterThan(0);
        expect(tool.description, tool.name).toBeTruthy();
      }
      const byName = Object.fromEntries(tools.map((t) => [t.name, t.inputSchema as any]));
      expect(byName.vault_store.properties.kind.enum).toEqual([...KINDS]);
      expect(byName.vault_store.additionalProperties).toBe(false);
      expect(Object.keys(byName.vault_get.properties).sort()).toEqual(['handle', 'id', 'name', 'reveal', 'version']);
      expect(Object.keys(byName.mail_send.properties).sort()).toEqual(['html', 'idempotencyKey', 'subject', 'text', 'to']);
      expect(byName.rotate_credentials.properties.credentials.maxItems).toBe(1000);
      // The tools that take an HTTP endpoint's body as it is advertise the very schema the OpenAPI
      // document gives that body (before: zod's own formats, such as 'starts_with', crept in).
      const openapi = (await h.api('GET', '/openapi.json')).body;
      const bodyOf = (route: string) => openapi.paths[route].post.requestBody.content['application/json'].schema;
      const sameBody = { vault_store: '/v1/vault.store', mail_send: '/v1/mail.send', rotate_credentials: '/v1/rotations', report_leak: '/v1/leaks' };
      for (const [tool, route] of Object.entries(sameBody)) expect(byName[tool], tool).toEqual(bodyOf(route));
    });

    it('stores, then reads masked by default: a handle and metadata, no value anywhere in the result', async () => {
      const res = ok(await call(mcp, 'vault_store', { name: 'stripe', kind: 'api_key', value, owners: ['payments@example.com'] }));
      expect(res).toMatchObject({ name: 'stripe', version: 1, handle: `mailgent://credentials/${res.id}@1` });
      stored = { id: res.id, handle: res.handle };

      const raw = await call(mcp, 'vault_get', { name: 'stripe' });
      const read = ok(raw);
      expect(read).toMatchObject({ id: stored.id, name: 'stripe', kind: 'api_key', version: 1, label: 'current', masked: true, handle: stored.handle });
      expect(read).not.toHaveProperty('value');
      expect(JSON.stringify(raw)).not.toContain(value);

      const audit = await auditOf(agent.id, 'vault.get');
      expect(audit.at(-1)).toEqual({ outcome: 'ok', credential_id: stored.id, detail: { name: 'stripe', version: 1, masked: true, via: 'mcp' } });
      const store = await auditOf(agent.id, 'vault.store');
      expect(store.at(-1)).toMatchObject({ outcome: 'ok', detail: { via: 'mcp' } });
    });

    it('takes a handle whose id is in upper case, as ids are taken in either case', async () => {
      // Before, the handle's pattern took lower-case hex only: a 400 validation problem.
      const upper = stored.handle.replace(stored.id, stored.id.toUpperCase());
      expect(upper).not.toBe(stored.handle);
      const read = ok(await call(mcp, 'vault_get', { handle: upper }));
      expect(read).toMatchObject({ id: stored.id, version: 1, masked: true, handle: stored.handle });
    });

    it('refuses an unmasked read without the permission: a 403 problem, audited as a denied unmasked read', async () => {
      const raw = await call(mcp, 'vault_get', { handle: stored.handle, reveal: true });
      expect(problem(raw)).toMatchObject({ type: 'https://mailgent.dev/problems/forbidden', title: 'Forbidden', status: 403 });
      expect(JSON.stringify(raw)).not.toContain(value);
      expect((await auditOf(agent.id, 'vault.get')).at(-1)).toEqual({
        outcome: 'denied',
        credential_id: null,
        detail: { ref: stored.id, unmasked: true, via: 'mcp', error: 'forbidden', status: 403 },
      });
    });

    it('reveals the value once the admin allows unmasked reads, audited as unmasked; without reveal it stays masked', async () => {
      const patched = await setMcp(agent.id, { allowUnmaskedRead: true });
      expect(patched.status).toBe(200);
      expect(patched.body).toEqual({ id: agent.id, name: `mcp-${kind}`, email: `mcp-${kind}@example.com`, mcpMasking: true, allowUnmaskedRead: true });

      const read = ok(await call(mcp, 'vault_get', { handle: stored.handle, reveal: true }));
      expect(read).toMatchObject({ id: stored.id, value, version: 1, masked: false, handle: stored.handle });
      expect((await auditOf(agent.id, 'vault.get')).at(-1)).toEqual({
        outcome: 'ok',
        credential_id: stored.id,
        detail: { ref: stored.id, requestedVersion: 1, version: 1, unmasked: true, via: 'mcp' },
      });
      expect(ok(await call(mcp, 'vault_get', { name: 'stripe' }))).not.toHaveProperty('value');
    });

    it('gives the current TOTP code for a handle, the same code the HTTP API gives, never the seed', async () => {
      const secret = h.secret(TOTP_SEED);
      ok(await call(mcp, 'vault_store', { name: 'github-2fa', kind: 'totp_seed', totp: { secret, period: 86400 } }));
      const { handle } = ok(await call(mcp, 'vault_get', { name: 'github-2fa' }));
      const before = Math.floor(Date.now() / 86_400_000);
      const raw = await call(mcp, 'vault_totp', { handle });
      const after = Math.floor(Date.now() / 86_400_000);
      const code = ok(raw);
      expect(code).toMatchObject({ period: 86400, digits: 6 });
      expect([hotp('mcp-test-seed-0123456789', before), hotp('mcp-test-seed-0123456789', after)]).toContain(code.code);
      expect(JSON.stringify(raw)).not.toContain(secret);
      expect((await auditOf(agent.id, 'vault.totp')).at(-1)).toMatchObject({ outcome: 'ok', detail: { ref: expect.any(String), via: 'mcp' } });
      const http = await h.api('POST', '/v1/vault.totp', { token: agent.token, body: { name: 'github-2fa' } });
      expect(http.body.code).toBe(code.code);
    });

    it('refuses mail carrying a stored value with the HTTP API’s problem, and sends a notice that does not', async () => {
      const body = { to: ['team@example.com'], subject: 'new key', text: `the key is ${value}` };
      const refused = problem(await call(mcp, 'mail_send', body));
      const http = await h.api('POST', '/v1/mail.send', { token: agent.token, body });
      expect(http.status).toBe(422);
      expect(refused).toMatchObject({ type: http.body.type, title: http.body.title, status: 422, detail: http.body.detail });
      expect(refused.type).toBe('https://mailgent.dev/problems/secret-in-message');

      const sent = ok(await call(mcp, 'mail_send', { to: ['team@example.com'], subject: 'Key rotated', text: `stripe was rotated; see ${stored.handle}` }));
      expect(sent).toMatchObject({ status: 'queued', messageId: expect.any(String) });
      expect((await auditOf(agent.id, 'mail.send')).map((a) => [a.outcome, a.detail.via ?? null])).toEqual([
        ['rejected', 'mcp'],
        ['rejected', null],
        ['ok', 'mcp'],
      ]);
    });

    it('rotates by handle and follows rotation_status to the end; the agent never sees either value', async () => {
      ok(
        await call(mcp, 'vault_store', {
          name: 'db-password',
          kind: 'password',
          value: h.secret(`Initial-${kind}-password-0001`),
          rotation: { provider: 'generated', settings: { length: 32 }, periodDays: 90, graceHours: 0 },
        }),
      );
      const { handle, id } = ok(await call(mcp, 'vault_get', { name: 'db-password' }));
      const started = ok(await call(mcp, 'rotate_credentials', { credentials: [handle], reason: `mcp ${kind}` }));
      expect(started.workflowIds).toEqual([`rotate:${id}`]);

      let status: any;
      for (let i = 0; i < 150; i++) {
        status = ok(await call(mcp, 'rotation_status', { rotationId: started.rotationId }));
        if (status.state !== 'running') break;
        await new Promise((r) => setTimeout(r, 200));
      }
      expect(status).toMatchObject({ rotationId: started.rotationId, state: 'succeeded', reason: `mcp ${kind}` });
      expect(status.credentials[0]).toMatchObject({ credentialId: id, name: 'db-password', progress: { fromVersion: 1, toVersion: 2 } });

      const after = ok(await call(mcp, 'vault_get', { name: 'db-password' }));
      expect(after).toMatchObject({ version: 2, label: 'current', masked: true, handle: `mailgent://credentials/${id}@2` });
      const listed = ok(await call(mcp, 'list_credentials', { kind: 'password' }));
      expect(listed.items.map((c: any) => [c.name, c.version, c.handle])).toEqual([['db-password', 2, after.handle]]);
      expect(JSON.stringify(listed)).not.toMatch(/"value"/);
      // Neither value in anything the agent was answered: read here over HTTP, to look for them.
      const v2 = (await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'db-password' } })).body.value as string;
      h.secret(v2);
      expect(v2).toHaveLength(32);
      for (const answer of [started, status, after, listed]) {
        expect(JSON.stringify(answer)).not.toContain(v2);
        expect(JSON.stringify(answer)).not.toContain(`Initial-${kind}-password-0001`);
      }
      expect((await auditOf(agent.id, 'rotation.start')).at(-1)).toMatchObject({ outcome: 'ok', detail: { rotationId: started.rotationId, via: 'mcp' } });
    });

    it('answers another identity’s credential as not found, like the HTTP API, and audits the denial', async () => {
      const intruder = await connect(kind, other.token);
      const byId = problem(await call(intruder, 'vault_get', { id: stored.id }));
      const http = await h.api('POST', '/v1/vault.get', { token: other.token, body: { id: stored.id } });
      expect(http.status).toBe(404);
      expect(byId).toMatchObject({ type: 'https://mailgent.dev/problems/not-found', status: 404, title: http.body.title, detail: http.body.detail });
      expect(problem(await call(intruder, 'vault_totp', { handle: stored.handle }))).toMatchObject({ status: 404 });
      expect(problem(await call(intruder, 'rotate_credentials', { credentials: [stored.handle] }))).toMatchObject({ status: 404 });

      const denied = await auditOf(other.id, 'vault.get');
      expect(denied[0]).toEqual({ outcome: 'denied', credential_id: null, detail: { ref: stored.id, masked: true, via: 'mcp', error: 'not-found', status: 404 } });
      expect(await auditOf(other.id, 'rotation.start')).toEqual([{ outcome: 'denied', credential_id: null, detail: { error: 'not-found', status: 404, via: 'mcp' } }]);
      expect(problem(await call(intruder, 'rotation_status', { rotationId: randomUUID() }))).toMatchObject({ status: 404 });
      expect(await auditOf(other.id, 'rotation.describe')).toEqual([{ outcome: 'denied', credential_id: null, detail: { error: 'not-found', status: 404, via: 'mcp' } }]);
    });

    it('rejects bad arguments with the HTTP API’s validation problem, audited as rejected', async () => {
      const args = { name: 'stripe', id: stored.id };
      const mcpProblem = problem(await call(mcp, 'vault_get', { ...args }));
      const http = await h.api('POST', '/v1/vault.get', { token: agent.token, body: args });
      expect(http.status).toBe(400);
      expect(mcpProblem.type).toBe(http.body.type);
      expect(mcpProblem.title).toBe(http.body.title);
      expect(mcpProblem.errors).toEqual([{ path: 'name', message: 'give exactly one of name, id, handle' }]);
      expect(http.body.errors).toEqual([{ path: 'name', message: 'give exactly one of name or id' }]);

      const unknown = problem(await call(mcp, 'mail_send', { to: ['a@example.com'], subject: 's', text: 't', bcc: ['x@example.com'] }));
      const httpUnknown = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: ['a@example.com'], subject: 's', text: 't', bcc: ['x@example.com'] } });
      expect(unknown).toMatchObject({ type: httpUnknown.body.type, title: httpUnknown.body.title, detail: httpUnknown.body.detail, errors: httpUnknown.body.errors });
      expect(unknown.detail).toContain('bcc: is not a known field');

      // Strings PostgreSQL cannot store are refused before anything runs, as over HTTP: not stored, not a 500.
      for (const [tool, bad] of [
        ['vault_store', { name: `nul-${kind}`, kind: 'generic', value: 'abc\u0000def' }],
        ['vault_store', { name: `surrogate-${kind}`, kind: 'generic', value: 'abc\ud800def' }],
        ['mail_send', { to: ['a@example.com'], subject: 'x\u0000', text: 't' }],
        ['report_leak', { credential: 'stripe', source: 'x', details: 'ab\u0000' }],
      ] as const) {
        expect(problem(await call(mcp, tool, bad)), tool).toMatchObject({ status: 400, detail: 'the request body contains a NUL character or an unpaired UTF-16 surrogate' });
      }
      expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name IN ($1, $2)", [`nul-${kind}`, `surrogate-${kind}`])).rows[0].n).toBe(0);
      expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents i JOIN credentials c ON c.id = i.credential_id WHERE c.name = 'stripe' AND i.identity_id = $1", [agent.id])).rows[0].n).toBe(0);
    });
  });

  describe('HTTP transport and settings', () => {
    /** A client's first JSON-RPC message, as sent over HTTP. */
    const INITIALIZE = JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'initialize', params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 't', version: '1' } } });
    /** Checks an answer of POST /mcp against the OpenAPI document: its status, its media type and (a JSON-RPC body) its schema. */
    const expectDocumented = async (status: number, contentType: string | null, body: unknown, where: string) => {
      const responses = (await h.api('GET', '/openapi.json')).body.paths['/mcp'].post.responses;
      expect(responses[String(status)], `${where}: POST /mcp documents ${status}`).toBeDefined();
      const mediaType = (contentType ?? '').split(';')[0]!.trim();
      const content = responses[String(status)].content?.[mediaType];
      expect(content, `${where}: POST /mcp ${status} documents ${mediaType}`).toBeDefined();
      if (content.schema && !content.schema.$ref) {
        const validate = new Ajv2020({ allErrors: true }).compile(content.schema);
        expect(validate(body) ? [] : validate.errors, `${where}: the body matches the documented schema`).toEqual([]);
      }
    };

    it('answers a missing or wrong token at /mcp with the 401 problem, audited, and the SDK client cannot connect', async () => {
      const headers = { 'content-type': 'application/json', accept: 'application/json, text/event-stream', 'x-request-id': 'mcp-bad-token' };
      for (const auth of [undefined, 'Bearer mgt_not-a-real-token']) {
        const res = await fetch(`${h.url}/mcp`, { method: 'POST', headers: { ...headers, ...(auth ? { authorization: auth } : {}) }, body: INITIALIZE });
        expect(res.status).toBe(401);
        expect(res.headers.get('content-type')).toContain('application/problem+json');
        expect(await res.json()).toMatchObject({ type: 'https://mailgent.dev/problems/unauthorized', status: 401 });
      }
      const audit = (await h.sql("SELECT action, outcome, detail->>'via' AS via FROM audit_log WHERE request_id = 'mcp-bad-token'")).rows;
      expect(audit).toEqual([
        { action: 'mcp.request', outcome: 'denied', via: 'mcp' },
        { action: 'mcp.request', outcome: 'denied', via: 'mcp' },
      ]);
      const client = new Client({ name: 't', version: '1' });
      await expect(
        client.connect(new StreamableHTTPClientTransport(new URL(`${h.url}/mcp`), { requestInit: { headers: { authorization: 'Bearer mgt_wrong' } } })),
      ).rejects.toThrow(/401|Authentication required/);
      await client.close();
      expect((await fetch(`${h.url}/mcp`, { headers: { accept: 'text/event-stream' } })).status).toBe(405);
      // Every method but POST, as the OpenAPI document says (HEAD as GET).
      const other = ['PUT', 'PATCH', 'DELETE', 'OPTIONS'];
      expect(await Promise.all([...other, 'HEAD'].map(async (method) => (await fetch(`${h.url}/mcp`, { method })).status))).toEqual([...other, 'HEAD'].map(() => 405));
      const documentedMethods = Object.keys(((await (await fetch(`${h.url}/openapi.json`)).json()) as { paths: Record<string, object> }).paths['/mcp']!).sort();
      expect(documentedMethods).toEqual(['get', 'post', ...other.map((m) => m.toLowerCase())].sort());
    });

    it('answers a Host it cannot use with a 400 problem, audited, not the transport’s bare 400; any other Host reaches MCP', async () => {
      const agent = await h.createIdentity('mcp-hosts');
      const post = (host: string, requestId: string) =>
        rawRequest(h.url, {
          method: 'POST',
          path: '/mcp',
          headers: [['host', host], ['authorization', `Bearer ${agent.token}`], ['content-type', 'application/json'], ['accept', 'application/json, text/event-stream'], ['x-request-id', requestId]],
          body: INITIALIZE,
        });
      const refused = ['', ' ', 'a b', '@x', 'x/y', 'x:y', 'example.com:99999', 'a%20b'];
      for (const [i, host] of refused.entries()) {
        const res = await post(host, `mcp-host-${i}`);
        expect(res.status, JSON.stringify(host)).toBe(400);
        expect(res.headers['content-type'], JSON.stringify(host)).toMatch(/^application\/problem\+json/);
        expect(res.body, JSON.stringify(host)).toMatchObject({ type: 'https://mailgent.dev/problems/malformed-request', status: 400, detail: expect.stringContaining('Host') });
      }
      // The document gives this 400 as a problem, besides the transport's JSON-RPC 400.
      await expectDocumented(400, 'application/problem+json', {}, 'a Host it cannot use');
      const audit = (await h.sql("SELECT action, outcome FROM audit_log WHERE request_id LIKE 'mcp-host-%'")).rows;
      expect(audit).toEqual(refused.map(() => ({ action: 'mcp.request', outcome: 'rejected' })));
      for (const host of ['localhost', 'EXAMPLE.com', '[::1]:8080', '127.0.0.1:0', 'a_b']) {
        const res = await post(host, 'mcp-host-ok');
        expect(res.status, host).toBe(200);
        expect(res.body, host).toMatchObject({ jsonrpc: '2.0', id: 1, result: { serverInfo: expect.any(Object) } });
      }
    });

    it('answers protocol errors as the MCP transport must (JSON-RPC errors, not problems), each audited as a rejected request', async () => {
      const agent = await h.createIdentity('mcp-protocol');
      const post = (requestId: string, headers: Record<string, string>, body: string) =>
        fetch(`${h.url}/mcp`, {
          method: 'POST',
          headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json', accept: 'application/json, text/event-stream', 'x-request-id': requestId, ...headers },
          body,
        });
      const cases: { id: string; headers: Record<string, string>; body: string; status: number }[] = [
        { id: 'mcp-proto-accept', headers: { accept: 'application/json' }, body: INITIALIZE, status: 406 },
        { id: 'mcp-proto-not-jsonrpc', headers: {}, body: '{}', status: 400 },
        { id: 'mcp-proto-version', headers: { 'mcp-protocol-version': '1999-01-01' }, body: JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'tools/list' }), status: 400 },
      ];
      for (const c of cases) {
        const res = await post(c.id, c.headers, c.body);
        expect(res.status, c.id).toBe(c.status);
        const body = await res.json();
        expect(body, c.id).toMatchObject({ jsonrpc: '2.0', error: { code: expect.any(Number), message: expect.any(String) } });
        // The OpenAPI document gives each as it is answered (before, it had no 406, and its 400 was a problem only).
        await expectDocumented(c.status, res.headers.get('content-type'), body, c.id);
      }
      // Before, none of these was in the audit log. (The transport writes its answer itself, so each
      // row is appended just after it: the last may land a moment after its answer.)
      const rows = async () => (await h.sql("SELECT request_id, identity_id, action, outcome, detail FROM audit_log WHERE request_id LIKE 'mcp-proto-%' ORDER BY request_id")).rows;
      const audit = await waitFor('the refusals to be audited', rows, (found) => found.length >= cases.length);
      expect(audit).toEqual(
        cases
          .map((c) => ({ request_id: c.id, identity_id: agent.id, action: 'mcp.request', outcome: 'rejected', detail: { error: 'mcp-protocol', status: c.status, via: 'mcp' } }))
          .sort((a, b) => a.request_id.localeCompare(b.request_id)),
      );
    });

    it('refuses a body that is not application/json with the 415 problem before the transport, audited; application/json with parameters reaches MCP', async () => {
      const agent = await h.createIdentity('mcp-media');
      const post = (requestId: string, type: string) =>
        fetch(`${h.url}/mcp`, {
          method: 'POST',
          headers: { authorization: `Bearer ${agent.token}`, 'content-type': type, accept: 'application/json, text/event-stream', 'x-request-id': requestId },
          body: INITIALIZE,
        });
      // The first two are JSON to the API's body parser (application/*+json), not to the MCP transport:
      // before, they reached it and got its 415 as a JSON-RPC error, which the document did not give.
      const refused = ['application/vnd.api+json', 'application/merge-patch+json; charset=utf-8', 'text/plain'];
      for (const [i, type] of refused.entries()) {
        const res = await post(`mcp-media-${i}`, type);
        expect(res.status, type).toBe(415);
        expect(res.headers.get('content-type'), type).toMatch(/^application\/problem\+json/);
        const body = await res.json();
        expect(body, type).toMatchObject({ type: 'https://mailgent.dev/problems/unsupported-media-type', status: 415 });
        await expectDocumented(415, res.headers.get('content-type'), body, type);
      }
      const audit = (await h.sql("SELECT request_id, identity_id, action, outcome, detail FROM audit_log WHERE request_id LIKE 'mcp-media-%' ORDER BY request_id")).rows;
      expect(audit).toEqual(
        refused.map((_, i) => ({ request_id: `mcp-media-${i}`, identity_id: agent.id, action: 'mcp.request', outcome: 'rejected', detail: { error: 'unsupported-media-type', status: 415, via: 'mcp' } })),
      );
      for (const type of ['application/json; charset=utf-8', 'Application/JSON']) {
        const res = await post('mcp-media-ok', type);
        expect(res.status, type).toBe(200);
        expect(await res.json(), type).toMatchObject({ jsonrpc: '2.0', id: 1, result: { serverInfo: expect.any(Object) } });
      }
    });

    it('audits a refused call answered inside a 200 (an unknown tool, arguments the SDK refuses, an unknown method) as a rejected mcp.request, without argument values', async () => {
      const agent = await h.createIdentity('mcp-refused-calls');
      const mcp = await connect('http', agent.token);
      const secret = h.secret('sk_live_refused_call_argument_0001');
      ok(await call(mcp, 'list_credentials', {}));
      await expect(mcp.client.callTool({ name: 'no_such_tool', arguments: { value: secret } })).rejects.toThrow(/names no tool this server has/);
      // Before, no row at all: the JSON-RPC error went out in a 200 the route does not audit.
      expect(await auditOf(agent.id, 'mcp.request')).toEqual([
        { outcome: 'rejected', credential_id: null, detail: { error: 'mcp-unknown-tool', code: -32602, method: 'tools/call', tool: 'no_such_tool', via: 'mcp' } },
      ]);

      // The same over raw HTTP, for what the SDK client would not send.
      const rpc = async (message: Record<string, unknown>) => {
        const res = await fetch(`${h.url}/mcp`, {
          method: 'POST',
          headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json', accept: 'application/json, text/event-stream' },
          body: JSON.stringify({ jsonrpc: '2.0', id: 7, ...message }),
        });
        expect(res.status).toBe(200);
        const body = (await res.json()) as { error: { code: number } };
        expect(body).toMatchObject({ jsonrpc: '2.0', id: 7, error: { code: expect.any(Number) } });
        return body.error.code;
      };
      const long = `x${'y'.repeat(199)}`;
      const codes = [
        await rpc({ method: 'tools/call', params: { name: 'vault_store', arguments: [secret] } }),
        await rpc({ method: 'tools/call', params: { name: 'vault_get', arguments: secret } }),
        await rpc({ method: 'tools/call', params: { arguments: { value: secret } } }),
        await rpc({ method: 'tools/call', params: { name: long, arguments: { value: secret } } }),
        await rpc({ method: 'tools/call', params: { name: 'nul\u0000tool', arguments: {} } }),
        await rpc({ method: 'resources/list' }),
      ];
      const audit = await auditOf(agent.id, 'mcp.request');
      expect(audit.slice(1)).toEqual(
        [
          { error: 'mcp-invalid-params', method: 'tools/call', tool: 'vault_store' },
          { error: 'mcp-invalid-params', method: 'tools/call', tool: 'vault_get' },
          { error: 'mcp-invalid-params', method: 'tools/call' },
          { error: 'mcp-unknown-tool', method: 'tools/call', tool: long.slice(0, 64) },
          { error: 'mcp-unknown-tool', method: 'tools/call' },
          { error: 'mcp-protocol', method: 'resources/list' },
        ].map((detail, i) => ({ outcome: 'rejected', credential_id: null, detail: { ...detail, code: codes[i], via: 'mcp' } })),
      );
      // Invalid params, not the SDK's -32603 (internal error: a fault of the server to retry or report).
      expect(codes.slice(0, 5)).toEqual([-32602, -32602, -32602, -32602, -32602]);
      expect(codes[5]).toBe(-32601);
      expect(JSON.stringify(audit)).not.toContain(secret);
      // A call that succeeds, or fails as a tool (a result with isError, audited under its action), adds no mcp.request row.
      problem(await call(mcp, 'vault_get', { name: 'missing' }));
      expect(await auditOf(agent.id, 'mcp.request')).toHaveLength(audit.length);
    });

    it('a tool or method name that is a value the caller stored is withheld from the audit row and not repeated in the error', async () => {
      const agent = await h.createIdentity('mcp-pasted-name');
      const short = h.secret('sk_live_pasted_as_tool_name_0001');
      const long = h.secret(`ghp_${'A1b2C3d4'.repeat(12)}`); // longer than the 64 characters a row keeps of a name
      for (const [i, value] of [short, long].entries()) {
        const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: `pasted-${i}`, kind: 'api_key', value } });
        expect(stored.status, stored.text).toBe(201);
      }
      const rpc = async (id: number, message: Record<string, unknown>) => {
        const res = await fetch(`${h.url}/mcp`, {
          method: 'POST',
          headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json', accept: 'application/json, text/event-stream' },
          body: JSON.stringify({ jsonrpc: '2.0', id, ...message }),
        });
        expect(res.status).toBe(200);
        return (await res.json()) as { error: { code: number; message: string } };
      };
      const answers = [
        await rpc(1, { method: 'tools/call', params: { name: short, arguments: {} } }),
        await rpc(2, { method: 'tools/call', params: { name: long, arguments: {} } }),
        await rpc(3, { method: short }),
        await rpc(4, { method: 'tools/call', params: { name: 'not_a_secret_tool', arguments: {} } }),
      ];
      expect(answers.map((a) => a.error.code)).toEqual([-32602, -32602, -32601, -32602]);
      for (const a of answers) for (const v of [short, long, long.slice(0, 64)]) expect(a.error.message).not.toContain(v);
      const rows = await auditOf(agent.id, 'mcp.request');
      expect(rows.map((r) => r.detail)).toEqual([
        { error: 'mcp-unknown-tool', code: -32602, method: 'tools/call', toolWithheld: 'stored-value', via: 'mcp' },
        { error: 'mcp-unknown-tool', code: -32602, method: 'tools/call', toolWithheld: 'stored-value', via: 'mcp' },
        { error: 'mcp-protocol', code: -32601, methodWithheld: 'stored-value', via: 'mcp' },
        // A name that is no value is the trail of what was tried: kept as given.
        { error: 'mcp-unknown-tool', code: -32602, method: 'tools/call', tool: 'not_a_secret_tool', via: 'mcp' },
      ]);
      for (const v of [short, long.slice(0, 64)]) expect(JSON.stringify(rows)).not.toContain(v);
    });

    it('refuses a JSON-RPC batch, and JSON that is not a JSON-RPC message, with a 400 invalid request (-32600), runs nothing of it, and audits it', async () => {
      const agent = await h.createIdentity('mcp-batch');
      const post = (requestId: string, body: unknown) =>
        fetch(`${h.url}/mcp`, {
          method: 'POST',
          headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json', accept: 'application/json, text/event-stream', 'x-request-id': requestId },
          body: JSON.stringify(body),
        });
      const store = (id: number, name: string) => ({
        jsonrpc: '2.0',
        id,
        method: 'tools/call',
        params: { name: 'vault_store', arguments: { name, kind: 'password', value: h.secret(`batched-value-${randomUUID()}`) } },
      });
      // Before: [] was a 202 (nothing refused, nothing audited); two requests sharing an id both ran
      // and one was answered; a batch of one was answered by an object, not an array; `{}` was a
      // -32700 parse error.
      const cases: [string, unknown][] = [
        ['mcp-batch-empty', []],
        ['mcp-batch-one', [store(1, 'batched-one')]],
        ['mcp-batch-same-id', [store(5, 'batched-a'), store(5, 'batched-b')]],
        ['mcp-batch-not-rpc', {}],
        ['mcp-batch-null', null],
      ];
      for (const [id, body] of cases) {
        const res = await post(id, body);
        expect(res.status, id).toBe(400);
        expect(await res.json(), id).toMatchObject({ jsonrpc: '2.0', error: { code: -32600, message: expect.stringMatching(/^Invalid Request: /) }, id: null });
      }
      expect((await h.sql("SELECT name FROM credentials WHERE identity_id = $1 AND name LIKE 'batched-%'", [agent.id])).rows).toEqual([]);
      const rows = async () => (await h.sql("SELECT request_id, outcome, detail FROM audit_log WHERE request_id LIKE 'mcp-batch-%' ORDER BY request_id")).rows;
      const audit = await waitFor('the refusals to be audited', rows, (found) => found.length >= cases.length);
      expect(audit).toEqual(cases.map(([id]) => ({ request_id: id, outcome: 'rejected', detail: { error: 'mcp-protocol', status: 400, via: 'mcp' } })).sort((a, b) => a.request_id.localeCompare(b.request_id)));
    });

    it('over stdio, requests piped in whole (stdin ends at once) are all answered before the bridge exits', async () => {
      const agent = await h.createIdentity('mcp-piped');
      const input = [
        { jsonrpc: '2.0', id: 1, method: 'initialize', params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 'pipe', version: '1' } } },
        { jsonrpc: '2.0', method: 'notifications/initialized' },
        { jsonrpc: '2.0', id: 2, method: 'tools/list' },
        { jsonrpc: '2.0', id: 3, method: 'tools/call', params: { name: 'list_credentials', arguments: {} } },
      ]
        .map((m) => JSON.stringify(m))
        .join('\n');
      const { stdout, stderr, code } = await new Promise<{ stdout: string; stderr: string; code: number | null }>((resolve, reject) => {
        const child = spawn(process.execPath, [path.join(ROOT, 'bin/mailgent.js'), 'mcp'], {
          cwd: ROOT,
          env: { ...process.env, MAILGENT_URL: h.url, MAILGENT_TOKEN: agent.token },
          stdio: ['pipe', 'pipe', 'pipe'],
        });
        let out = '';
        let err = '';
        child.stdout.on('data', (d) => (out += String(d)));
        child.stderr.on('data', (d) => (err += String(d)));
        child.on('error', reject);
        child.on('close', (exit) => resolve({ stdout: out, stderr: err, code: exit }));
        child.stdin.end(`${input}\n`);
      });
      expect(code).toBe(0);
      // A normal exit is quiet: before, closing the bridge wrote "mailgent mcp: This operation was aborted" twice.
      expect(stderr).toBe('');
      const answers = stdout.trim().split('\n').map((line) => JSON.parse(line));
      // Before, closing stdin cancelled the requests still in flight: each got "This operation was aborted".
      expect(answers.map((a) => a.id).sort()).toEqual([1, 2, 3]);
      expect(answers.filter((a) => a.error)).toEqual([]);
      expect(answers.find((a) => a.id === 2).result.tools.map((t: { name: string }) => t.name)).toContain('vault_get');
      expect(answers.find((a) => a.id === 3).result.structuredContent).toMatchObject({ items: [] });
    });

    it('over stdio, a wrong token fails the connection with the server’s 401 problem', async () => {
      const transport = new StdioClientTransport({
        command: process.execPath,
        args: [path.join(ROOT, 'bin/mailgent.js'), 'mcp'],
        env: { MAILGENT_URL: h.url, MAILGENT_TOKEN: 'mgt_wrong-token' },
        stderr: 'pipe',
      });
      const client = new Client({ name: 't', version: '1' });
      const c: Connected = { client, stderr: [] };
      transport.stderr?.on('data', (d) => c.stderr.push(String(d)));
      open.push(c);
      await expect(client.connect(transport)).rejects.toThrow(/401.*the bearer token is not valid/s);
      c.pid = transport.pid ?? undefined;
    });

    it('with masking switched off for an identity, vault_get answers the value, audited as unmasked', async () => {
      const agent = await h.createIdentity('mcp-unmasked');
      expect((await setMcp(agent.id, { mcpMasking: false })).body).toMatchObject({ mcpMasking: false, allowUnmaskedRead: false });
      const mcp = await connect('http', agent.token);
      const value = h.secret('plain-visible-value-0001');
      ok(await call(mcp, 'vault_store', { name: 'visible', kind: 'token', value }));
      expect(ok(await call(mcp, 'vault_get', { name: 'visible' }))).toMatchObject({ value, masked: false });
      expect((await auditOf(agent.id, 'vault.get')).at(-1)).toMatchObject({ outcome: 'ok', detail: { unmasked: true, via: 'mcp' } });
      // Switched back on, the same call is masked again: settings are read at every call.
      await setMcp(agent.id, { mcpMasking: true });
      expect(ok(await call(mcp, 'vault_get', { name: 'visible' }))).toMatchObject({ masked: true });
    });

    it('report_leak takes a handle and starts the leak rotation', async () => {
      const agent = await h.createIdentity('mcp-leak', 'mcp-leak@example.com');
      const mcp = await connect('http', agent.token);
      ok(
        await call(mcp, 'vault_store', {
          name: 'leaky',
          kind: 'api_key',
          value: h.secret('sk_live_leaked_through_mcp_01'),
          rotation: { provider: 'generated', settings: { length: 32 }, periodDays: 90 },
        }),
      );
      const { handle, id } = ok(await call(mcp, 'vault_get', { name: 'leaky' }));
      const key = `leak-${randomUUID()}`;
      const report = ok(await call(mcp, 'report_leak', { credential: handle, source: 'mcp test', idempotencyKey: key }));
      expect(report.results).toMatchObject([{ credentialId: id, version: 1, action: 'rotating', workflowId: `rotate:${id}` }]);
      // The same report, by id and version over HTTP under its key (its answer lost, say), is a repeat.
      // Before: a 422 idempotency-key-reused (the handle's report hashed with its keys in another order).
      const again = await h.api('POST', '/v1/leaks', { token: agent.token, headers: { 'idempotency-key': key }, body: { credential: id, version: 1, source: 'mcp test' } });
      expect(again.status, again.text).toBe(202);
      expect(again.body).toEqual({ ...report, repeated: true });
      await h.client.workflow.getHandle(`rotate:${id}`).result();
      expect(ok(await call(mcp, 'vault_get', { name: 'leaky' }))).toMatchObject({ version: 2 });
      const rows = await auditOf(agent.id, 'leak.report');
      expect(rows.at(-2)).toMatchObject({ outcome: 'ok', detail: { via: 'mcp', matched: 1 } });
      expect(rows.at(-1)).toMatchObject({ outcome: 'ok', detail: { repeated: true } });
      // The incident's email row is the report's too: its request and interface (before, neither).
      const mailRow = (
        await h.sql(
          `SELECT m.request_id, m.detail FROM audit_log m JOIN audit_log r ON r.request_id = m.request_id
            WHERE m.action = 'mail.send' AND m.credential_id = $1 AND r.action = 'leak.report' AND r.identity_id = $2`,
          [id, agent.id],
        )
      ).rows;
      expect(mailRow).toEqual([{ request_id: expect.any(String), detail: expect.objectContaining({ purpose: 'leak.incident', via: 'mcp' }) }]);
    });

    it("report_leak by a handle of an older version reports that version (rotated and revoked), not the current one", async () => {
      const agent = await h.createIdentity('mcp-leak-old', 'mcp-leak-old@example.com');
      const mcp = await connect('http', agent.token);
      const store = (value: string) => call(mcp, 'vault_store', { name: 'replaced', kind: 'api_key', value: h.secret(value), rotation: { provider: 'generated', settings: { length: 32 } } });
      ok(await store('sk_live_replaced_value_v1_0001'));
      ok(await store('sk_live_replaced_value_v2_0002'));
      const old = ok(await call(mcp, 'vault_get', { name: 'replaced', version: 1 }));
      expect(old).toMatchObject({ version: 1 });
      // A version beside the handle must agree with it.
      expect(problem(await call(mcp, 'report_leak', { credential: old.handle, version: 2, source: 'mcp test' }))).toMatchObject({ status: 422, detail: expect.stringContaining('version 1') });
      const report = ok(await call(mcp, 'report_leak', { credential: old.handle, source: 'mcp test' }));
      // Before, the handle's version was dropped: version 2 was reported, and version 1, still live, never revoked.
      expect(report.results).toMatchObject([{ credentialId: old.id, version: 1, action: 'rotating' }]);
      expect((await auditOf(agent.id, 'leak.report')).at(-1)).toMatchObject({ outcome: 'ok', credential_id: old.id, detail: { via: 'mcp', by: 'credential', version: 1, results: ['rotating'] } });
      await h.client.workflow.getHandle(`rotate:${old.id}`).result();
      const versions = (await h.sql('SELECT version, revoked_at IS NOT NULL AS revoked FROM secret_versions WHERE credential_id = $1 ORDER BY version', [old.id])).rows;
      expect(versions).toEqual([
        { version: 1, revoked: true },
        { version: 2, revoked: true },
        { version: 3, revoked: false },
      ]);
      h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'replaced' } })).body.value);
    });

    it('POST /v1/leaks takes the version that leaked: an unknown one is a 404, and a version without a credential is refused', async () => {
      const agent = await h.createIdentity('http-leak-version');
      expect((await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'versioned', kind: 'api_key', value: h.secret('sk_live_versioned_value_01') } })).status).toBe(201);
      const unknown = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'versioned', version: 7, source: 'test' } });
      expect(unknown.status, unknown.text).toBe(404);
      expect(unknown.body.detail).toContain('version 7');
      const orphan = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: 'a'.repeat(64), version: 1, source: 'test' } });
      expect(orphan.status, orphan.text).toBe(400);
      expect(orphan.body.errors).toEqual([{ path: 'version', message: expect.stringContaining('goes with a credential') }]);
      expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents WHERE identity_id = $1", [agent.id])).rows[0].n).toBe(0);
    });

    it('PATCH /v1/identities/:id is admin only, strict, and 404 for an unknown identity', async () => {
      const agent = await h.createIdentity('mcp-settings');
      expect((await h.api('PATCH', `/v1/identities/${agent.id}`, { token: agent.token, body: { allowUnmaskedRead: true } })).status).toBe(403);
      expect((await setMcp(agent.id, {})).status).toBe(400);
      const unknownField = await setMcp(agent.id, { allowUnmaskedRead: true, admin: true });
      expect(unknownField.status).toBe(400);
      expect(unknownField.body.errors).toEqual([{ path: 'admin', message: 'is not a known field' }]);
      expect((await setMcp('00000000-0000-4000-8000-000000000000', { mcpMasking: false })).status).toBe(404);
      expect((await setMcp('not-an-id', { mcpMasking: false })).status).toBe(404);
      const row = (await h.sql('SELECT mcp_masking, allow_unmasked_read FROM identities WHERE id = $1', [agent.id])).rows[0];
      expect(row).toEqual({ mcp_masking: true, allow_unmasked_read: false });
      // Only the identity's own attempt is attributed to it (the admin's refused calls have no identity).
      const audit = (await h.sql("SELECT actor, outcome FROM audit_log WHERE action = 'identity.update' AND identity_id = $1", [agent.id])).rows;
      expect(audit).toEqual([{ actor: `identity:${agent.id}`, outcome: 'denied' }]);
    });
  });
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
