import { randomBytes, randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { readLog, startHarness, type Harness } from './support/harness';
import { waitFor } from './support/lifecycle-fixtures';

/** Credential policy: stored with the value, changed without it, checked by each provider's and dependent's own schema. */
describe('credential policy', () => {
  let h: Harness;
  let agent: { id: string; token: string };

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('stores owners, service, tags, rotation, dependents and notify; listing shows them, never a value', async () => {
    const res = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: {
        name: 'stripe',
        kind: 'api_key',
        value: h.secret('sk_live_policy_value_01'),
        owners: ['payments@example.com'],
        service: 'stripe',
        tags: ['pci', 'prod'],
        notify: ['oncall@example.com'],
        rotation: { provider: 'generated', settings: { length: 48 }, periodDays: 30, graceHours: 2, maxAttempts: 2, window: { days: [1, 2, 3, 4, 5], startHour: 9, endHour: 17, timezone: 'Europe/Berlin' } },
        dependents: [{ type: 'env-file', settings: { file: 'staging.env', key: 'STRIPE_KEY' } }],
      },
    });
    expect(res.status).toBe(201);
    const listed = await h.api('GET', '/v1/credentials', { token: agent.token });
    // Never a value: toMatchObject below would pass a listing that carried it beside the rest.
    expect(listed.text).not.toContain('sk_live_policy_value_01');
    const [meta] = listed.body.items;
    expect(meta).not.toHaveProperty('value');
    expect(meta).toMatchObject({
      name: 'stripe',
      owners: ['payments@example.com'],
      service: 'stripe',
      tags: ['pci', 'prod'],
      notify: ['oncall@example.com'],
      policy: { provider: 'generated', periodDays: 30, graceHours: 2, maxAttempts: 2, settings: { length: 48, lowercase: true } },
      dependents: [{ type: 'env-file', settings: { file: 'staging.env', key: 'STRIPE_KEY' } }],
    });
    const due = Date.parse(meta.nextRotationAt) - Date.parse(meta.versionCreatedAt);
    expect(due).toBe(30 * 86_400_000);
  });

  it('PATCH changes the policy without touching the value, and never rotates', async () => {
    const before = (await h.sql("SELECT current_version, next_rotation_at FROM credentials WHERE name = 'stripe'")).rows[0];
    const res = await h.api('PATCH', '/v1/credentials/stripe', { token: agent.token, body: { owners: ['new-owner@example.com'], rotation: { provider: 'generated', periodDays: 7 } } });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ owners: ['new-owner@example.com'], tags: ['pci', 'prod'], policy: { periodDays: 7 }, version: 1 });
    const after = (await h.sql("SELECT current_version, next_rotation_at FROM credentials WHERE name = 'stripe'")).rows[0];
    expect(after.current_version).toBe(before.current_version);
    expect(after.next_rotation_at.getTime()).toBe(before.next_rotation_at.getTime() - 23 * 86_400_000);
    expect((await h.sql("SELECT count(*)::int AS n FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.name = 'stripe'")).rows[0].n).toBe(1);
    const runs = await h.client.workflow.list({ query: `TaskQueue = '${h.taskQueue}'` });
    let count = 0;
    for await (const _ of runs) count++;
    expect(count).toBe(0);
    const audit = (await h.sql("SELECT action, detail FROM audit_log WHERE action = 'credential.update'")).rows;
    expect(audit).toEqual([{ action: 'credential.update', detail: { name: 'stripe', fields: ['owners', 'rotation'] } }]);
  });

  it('refuses unknown providers, dependents and settings with the path of the problem; nothing is stored', async () => {
    const stripeRow = async () => (await h.sql("SELECT to_jsonb(c) - 'updated_at' AS row, updated_at FROM credentials c WHERE name = 'stripe'")).rows[0];
    const stripeBefore = await stripeRow();
    const cases: [Record<string, unknown>, string][] = [
      [{ rotation: { provider: 'generated', settings: { length: 2 } } }, 'rotation.settings.length'],
      [{ dependents: [{ type: 'ftp-upload', settings: {} }] }, "dependents.0.type 'ftp-upload' is unknown"],
      [{ dependents: [{ type: 'env-file', settings: { file: '../etc/passwd', key: 'X' } }] }, 'dependents.0.settings.file'],
      [{ dependents: [{ type: 'webhook', settings: { url: 'ftp://x', signingKeyCredential: 'k' } }] }, 'dependents.0.settings.url'],
      [{ rotation: { provider: 'postgres-role', settings: { role: 'app' } } }, 'rotation.settings.adminCredential'],
    ];
    for (const [extra, message] of cases) {
      const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'bad', kind: 'password', value: 'bad-policy-value', ...extra } });
      expect(res.status).toBe(422);
      expect(res.body.detail).toContain(message);
      const patch = await h.api('PATCH', '/v1/credentials/stripe', { token: agent.token, body: extra });
      expect(patch.status).toBe(422);
    }
    expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name = 'bad'")).rows[0].n).toBe(0);
    // The refused PATCHes left stripe as it was: its policy, its dependents, its row's time.
    expect(await stripeRow()).toEqual(stripeBefore);
    const window = await h.api('PATCH', '/v1/credentials/stripe', {
      token: agent.token,
      body: { rotation: { provider: 'generated', window: { days: [1], startHour: 9, endHour: 17, timezone: 'Mars/Olympus' } } },
    });
    expect(window.status).toBe(400);
    expect(window.body.errors).toEqual([{ path: 'rotation.window.timezone', message: 'must be an IANA time zone such as Europe/Berlin' }]);
    // A grace period as long as the period (24 hours when not given): the credential would be due
    // again while its rotation is still in grace, and every hourly sweep would report it rotated.
    const graceMessage = 'must be shorter than the rotation period (periodDays × 24 hours; 24 when not given)';
    for (const rotation of [{ provider: 'generated', periodDays: 1 }, { provider: 'generated', periodDays: 2, graceHours: 48 }]) {
      const longGrace = await h.api('PATCH', '/v1/credentials/stripe', { token: agent.token, body: { rotation } });
      expect(longGrace.status, longGrace.text).toBe(400);
      expect(longGrace.body.errors).toEqual([{ path: 'rotation.graceHours', message: graceMessage }]);
      const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'bad', kind: 'api_key', value: 'long-grace-value', rotation } });
      expect(stored.status).toBe(400);
    }
    expect((await h.sql("SELECT count(*)::int AS n FROM credentials WHERE name = 'bad'")).rows[0].n).toBe(0);
    expect((await h.api('PATCH', '/v1/credentials/stripe', { token: agent.token, body: { rotation: { provider: 'generated', periodDays: 2, graceHours: 47.5 } } })).status).toBe(200);
    expect((await h.api('PATCH', '/v1/credentials/stripe', { token: agent.token, body: {} })).status).toBe(400);
    expect((await h.api('PATCH', '/v1/credentials/nothing-here', { token: agent.token, body: { tags: ['x'] } })).status).toBe(404);
  });

  it('grants are listed on both sides, refused for oneself and for strangers, and never allow changes', async () => {
    const reader = await h.createIdentity();
    const granted = await h.api('POST', '/v1/grants', { token: agent.token, body: { credential: 'stripe', grantee: reader.id } });
    expect(granted.status).toBe(201);
    expect((await h.api('POST', '/v1/grants', { token: agent.token, body: { credential: 'stripe', grantee: reader.id } })).status).toBe(409);
    expect((await h.api('POST', '/v1/grants', { token: agent.token, body: { credential: 'stripe', grantee: agent.id } })).status).toBe(422);
    expect((await h.api('POST', '/v1/grants', { token: reader.token, body: { credential: granted.body.credentialId, grantee: reader.id } })).status).toBe(404);
    expect((await h.api('GET', '/v1/grants', { token: agent.token })).body.given).toEqual([expect.objectContaining({ id: granted.body.id, granteeId: reader.id })]);
    expect((await h.api('GET', '/v1/grants', { token: reader.token })).body.received).toEqual([expect.objectContaining({ credentialName: 'stripe' })]);

    const read = await h.api('POST', '/v1/vault.get', { token: reader.token, body: { id: granted.body.credentialId } });
    expect(read.body.value).toBe('sk_live_policy_value_01');
    const audit = (await h.sql("SELECT identity_id, detail FROM audit_log WHERE action = 'vault.get' AND outcome = 'ok' ORDER BY seq DESC LIMIT 1")).rows[0];
    expect(audit).toEqual({ identity_id: reader.id, detail: { ref: granted.body.credentialId, version: 1, grantedBy: agent.id } });
    // A grant is read access only: by id, never by name, and never a change.
    expect((await h.api('POST', '/v1/vault.get', { token: reader.token, body: { name: 'stripe' } })).status).toBe(404);
    expect((await h.api('PATCH', `/v1/credentials/${granted.body.credentialId}`, { token: reader.token, body: { tags: [] } })).status).toBe(404);
    expect((await h.api('DELETE', `/v1/credentials/${granted.body.credentialId}`, { token: reader.token })).status).toBe(404);
    expect((await h.api('DELETE', `/v1/grants/${granted.body.id}`, { token: reader.token })).status).toBe(404);

    // The owner's trail of its credential shows who read it through the grant (before: only its own calls).
    const trail = (await h.api('GET', '/v1/audit?credential=stripe&limit=1000', { token: agent.token })).body.items;
    expect(trail.filter((e: { action: string; outcome: string }) => e.action === 'vault.get' && e.outcome === 'ok')).toEqual([
      expect.objectContaining({ identityId: reader.id, actor: `identity:${reader.id}`, credentialId: granted.body.credentialId }),
    ]);
    // The reader's own listing has its read; the owner's trail is not the reader's to see.
    expect((await h.api('GET', '/v1/audit', { token: reader.token })).body.items.map((e: { action: string }) => e.action)).toContain('vault.get');
    expect((await h.api('GET', `/v1/audit?credential=${granted.body.credentialId}`, { token: reader.token })).body.items).toEqual([]);
  });

  it('a soft delete revokes the credential\'s grants: a restore does not give the grantee its access back', async () => {
    const reader = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'shared-then-deleted', kind: 'api_key', value: h.secret('sk_shared_deleted_value_01') } });
    expect(stored.status).toBe(201);
    const granted = await h.api('POST', '/v1/grants', { token: agent.token, body: { credential: 'shared-then-deleted', grantee: reader.id } });
    expect(granted.status).toBe(201);
    expect((await h.api('POST', '/v1/vault.get', { token: reader.token, body: { id: stored.body.id } })).status).toBe(200);
    expect((await h.api('DELETE', '/v1/credentials/shared-then-deleted', { token: agent.token })).status).toBe(200);
    expect((await h.api('POST', '/v1/credentials/shared-then-deleted/restore', { token: agent.token })).status).toBe(200);
    // Before, the grant came back with the credential, unseen (it was left out of the lists while deleted).
    expect((await h.api('POST', '/v1/vault.get', { token: reader.token, body: { id: stored.body.id } })).status).toBe(404);
    expect((await h.api('GET', '/v1/grants', { token: reader.token })).body.received).toEqual([]);
    const deleted = (await h.sql("SELECT detail FROM audit_log WHERE action = 'credential.delete' AND credential_id = $1", [stored.body.id])).rows;
    expect(deleted).toEqual([{ detail: expect.objectContaining({ grantsRevoked: 1 }) }]);
  });

  it('a grant made while the credential is being deleted is refused (404), never left active for a restore to bring back', async () => {
    const reader = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'granted-while-deleted', kind: 'api_key', value: h.secret('sk_granted_while_deleted_01') } });
    expect(stored.status).toBe(201);
    // The audit chain's lock held: the delete stops at its audit row, its grants already revoked, uncommitted.
    const chain = new pg.Client({ connectionString: h.databaseUrl });
    await chain.connect();
    try {
      await chain.query('BEGIN');
      await chain.query('SELECT pg_advisory_xact_lock(4631800001)');
      const deleting = h.api('DELETE', '/v1/credentials/granted-while-deleted', { token: agent.token });
      const waiting = async () => (await h.sql('SELECT locktype FROM pg_locks WHERE NOT granted ORDER BY locktype')).rows.map((r) => r.locktype as string);
      await waitFor('the delete to wait for the chain', waiting, (locks) => locks.length === 1, { timeoutMs: 10_000 });
      const granting = h.api('POST', '/v1/grants', { token: agent.token, body: { credential: 'granted-while-deleted', grantee: reader.id } });
      // The grant waits for the delete (its lookup shares the credential's row lock), not for the chain:
      // before, it read the row as not deleted, inserted its grant unseen by the delete's revoke and queued for the chain too.
      expect(await waitFor('the grant to wait', waiting, (locks) => locks.length === 2, { timeoutMs: 10_000 })).toEqual(['advisory', 'transactionid']);
      await chain.query('COMMIT');
      expect((await deleting).status).toBe(200);
      const granted = await granting;
      expect(granted.status, granted.text).toBe(404);
    } finally {
      await chain.query('ROLLBACK').catch(() => undefined);
      await chain.end();
    }
    expect((await h.sql('SELECT count(*)::int AS n FROM grants WHERE credential_id = $1 AND revoked_at IS NULL', [stored.body.id])).rows[0].n).toBe(0);
    expect((await h.api('POST', '/v1/credentials/granted-while-deleted/restore', { token: agent.token })).status).toBe(200);
    expect((await h.api('POST', '/v1/vault.get', { token: reader.token, body: { id: stored.body.id } })).status).toBe(404);
  });

  it('a credential named in a path or a grant, or a grantee, by anything but an id or a name of its form is a 400, never looked up nor written into the audit log', async () => {
    // (Not h.secret: the harness records an error's route, where the leak sweep looks.)
    const invalid = ['line\r\n{"forged":"row"}', 'a\u0001b\u007f', 'has space', 'x'.repeat(201), '-starts-with-a-dash', 'pasted=value$x'];
    for (const [i, bad] of invalid.entries()) {
      const path = `/v1/credentials/${encodeURIComponent(bad)}`;
      const calls: [string, string, unknown][] = [
        ['PATCH', path, { tags: ['x'] }],
        ['DELETE', path, undefined],
        ['DELETE', `${path}?destroy=true`, undefined],
        ['POST', `${path}/restore`, undefined],
        ['POST', '/v1/grants', { credential: bad, grantee: 'anyone' }],
        // A grantee of no identity's form: the same (before, looked up, repeated in the 404 and written into the row).
        ['POST', '/v1/grants', { credential: 'stripe', grantee: bad }],
      ];
      for (const [j, [method, route, body]] of calls.entries()) {
        const requestId = `req-bad-ref-${i}-${j}`;
        const res = await h.api(method, route, { token: agent.token, body, headers: { 'x-request-id': requestId } });
        expect(res.status, `${method} ${route}: ${res.text}`).toBe(400);
        expect(res.body.errors, res.text).toEqual([
          j === 5
            ? { path: 'grantee', message: expect.stringMatching(/^must be an identity's id \(UUID\) or name /) }
            : { path: j === 4 ? 'credential' : 'ref', message: expect.stringMatching(/^must be a credential id \(UUID\) or name: /) },
        ]);
        // (The problem's `instance` is the caller's own path, as sent.)
        expect(JSON.stringify([res.body.detail, res.body.errors])).not.toContain(JSON.stringify(bad).slice(1, -1));
        const rows = (await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
        expect(rows, `${method} ${route}`).toEqual([{ outcome: 'rejected', detail: { error: 'validation-failed', status: 400 } }]);
      }
      const { rows } = await h.sql('SELECT count(*)::int AS n FROM audit_log WHERE strpos(detail::text, $1) > 0 OR strpos(detail::text, $2) > 0', [bad, JSON.stringify(bad).slice(1, -1)]);
      expect(rows[0].n, JSON.stringify(bad)).toBe(0);
    }
    // A name of a credential's form that names none is looked up, and its denied row names it.
    const missing = await h.api('PATCH', '/v1/credentials/no-such-credential', { token: agent.token, body: { tags: ['x'] }, headers: { 'x-request-id': 'req-missing-ref' } });
    expect(missing.status, missing.text).toBe(404);
    expect((await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', ['req-missing-ref'])).rows).toMatchObject([{ outcome: 'denied', detail: { name: 'no-such-credential' } }]);
  });

  it("a value the caller can read given where a credential is named finds nothing, as before, and is withheld from the answer, the audit row and the request log; another identity's value is not (no guess confirmed)", async () => {
    // Values of the forms keys take, so they pass as names and ids: a Stripe-like key, stored and then
    // replaced (an older version), and a key of an id's form; each given by the identity that stores
    // it, and by another once granted it.
    const holder = await h.createIdentity();
    const other = await h.createIdentity();
    const pasted = h.secret(`sk_live_51H${randomBytes(12).toString('hex')}`);
    const uuidShaped = h.secret(randomUUID());
    for (const [name, value] of [['pasted-key', pasted], ['pasted-key', h.secret(`sk_live_51H${randomBytes(12).toString('hex')}`)], ['pasted-uuid-key', uuidShaped]] as const) {
      const stored = await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name, kind: 'api_key', value } });
      expect(stored.status, stored.text).toBe(201);
    }
    const inPath = encodeURIComponent(pasted);
    const mcp = async (token: string, requestId: string, name: string, args: Record<string, unknown>) => {
      const res = await fetch(`${h.url}/mcp`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', accept: 'application/json, text/event-stream', 'x-request-id': requestId },
        body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'tools/call', params: { name, arguments: args } }),
      });
      const text = await res.text();
      expect(res.status, text).toBe(200);
      const result = JSON.parse(text).result;
      expect(result.isError, text).toBe(true);
      return { status: result.structuredContent.status as number, text };
    };
    type Call = { call: string; status: number; field?: string; send: (who: { token: string }, requestId: string, counterpart: string) => Promise<{ status: number; text: string }> };
    const api = (method: string, route: string, body?: unknown): Call['send'] => (who, requestId) => h.api(method, route, { token: who.token, body, headers: { 'x-request-id': requestId } });
    // A route holding the value is sent past h.api, which records each error's route for the leak sweep (the test's own text, not the service's).
    const direct =
      (method: string, route: string, body?: unknown): Call['send'] =>
      async (who, requestId) => {
        const headers: Record<string, string> = { authorization: `Bearer ${who.token}`, 'x-request-id': requestId, ...(body ? { 'content-type': 'application/json' } : {}) };
        const res = await fetch(h.url + route, { method, headers, body: body ? JSON.stringify(body) : undefined });
        return { status: res.status, text: await res.text() };
      };
    const calls: Call[] = [
      { call: 'vault.get by name', status: 404, field: 'name', send: api('POST', '/v1/vault.get', { name: pasted }) },
      { call: 'vault.get of a version', status: 404, field: 'name', send: api('POST', '/v1/vault.get', { name: pasted, version: 1 }) },
      { call: 'vault.get by id', status: 404, field: 'ref', send: api('POST', '/v1/vault.get', { id: uuidShaped }) },
      { call: 'vault.totp', status: 404, field: 'name', send: api('POST', '/v1/vault.totp', { name: pasted }) },
      { call: 'PATCH by name', status: 404, field: 'name', send: direct('PATCH', `/v1/credentials/${inPath}`, { tags: ['x'] }) },
      { call: 'PATCH by id', status: 404, field: 'ref', send: direct('PATCH', `/v1/credentials/${uuidShaped}`, { tags: ['x'] }) },
      { call: 'DELETE', status: 404, field: 'name', send: direct('DELETE', `/v1/credentials/${inPath}`) },
      { call: 'DELETE ?destroy=true', status: 404, field: 'name', send: direct('DELETE', `/v1/credentials/${inPath}?destroy=true`) },
      { call: 'restore', status: 404, field: 'name', send: direct('POST', `/v1/credentials/${inPath}/restore`) },
      {
        call: 'grant of it',
        status: 404,
        field: 'name',
        send: (who, requestId, counterpart) => h.api('POST', '/v1/grants', { token: who.token, body: { credential: pasted, grantee: counterpart }, headers: { 'x-request-id': requestId } }),
      },
      // (The other identity's try names a credential not its own: the grantee, in the row from the start, is withheld all the same.)
      { call: 'grant to it', status: 404, field: 'grantee', send: api('POST', '/v1/grants', { credential: 'pasted-key', grantee: pasted }) },
      { call: 'audit trail', status: 200, field: 'credential', send: direct('GET', `/v1/audit?credential=${inPath}`) },
      { call: 'leak report', status: 404, send: api('POST', '/v1/leaks', { credential: pasted, source: 'withheld-test' }) },
      { call: 'rotation', status: 404, send: api('POST', '/v1/rotations', { credentials: [pasted, 'no-such-rotated-key'] }) },
      { call: 'MCP vault_get', status: 404, field: 'name', send: (who, requestId) => mcp(who.token, requestId, 'vault_get', { name: pasted }) },
      { call: 'MCP vault_get reveal', status: 403, field: 'name', send: (who, requestId) => mcp(who.token, requestId, 'vault_get', { name: pasted, reveal: true }) },
      { call: 'MCP vault_totp', status: 404, field: 'name', send: (who, requestId) => mcp(who.token, requestId, 'vault_totp', { name: pasted }) },
    ];
    const forms = (v: string) => [v, encodeURIComponent(v), JSON.stringify(v).slice(1, -1)];
    // Another identity never granted them: answered and written as any name that names nothing (the
    // mark would tell it that some identity stores the text it tried). A value of the holder's, not
    // registered with the leak sweep and destroyed below, since these rows hold it by design.
    const unregistered = `sk_live_51H${randomBytes(12).toString('hex')}`;
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'unregistered-key', kind: 'api_key', value: unregistered } })).status).toBe(201);
    for (const [method, route, body, field] of [
      ['POST', '/v1/vault.get', { name: unregistered }, 'name'],
      ['PATCH', `/v1/credentials/${unregistered}`, { tags: ['x'] }, 'name'],
      ['GET', `/v1/audit?credential=${unregistered}`, undefined, 'credential'],
      // (Before, a grant's row did not name the credential tried at all.)
      ['POST', '/v1/grants', { credential: unregistered, grantee: holder.name }, 'name'],
    ] as const) {
      const requestId = `not-readable-${randomUUID()}`;
      const res = await fetch(h.url + route, {
        method,
        headers: { authorization: `Bearer ${other.token}`, 'x-request-id': requestId, ...(body ? { 'content-type': 'application/json' } : {}) },
        body: body ? JSON.stringify(body) : undefined,
      });
      const text = await res.text();
      expect(res.status, text).toBe(method === 'GET' ? 200 : 404);
      if (method !== 'GET') expect(text, route).toContain(unregistered);
      const rows = (await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
      expect(rows, route).toEqual([{ outcome: 'denied', detail: expect.objectContaining({ [field]: unregistered }) }]);
      expect(JSON.stringify(rows[0].detail)).not.toMatch(/Withheld/);
    }
    const destroyed = await h.api('DELETE', '/v1/credentials/unregistered-key?destroy=true', { token: holder.token });
    expect(destroyed.status, destroyed.text).toBe(200);
    // Granted them, it can read them: withheld as for the holder.
    for (const name of ['pasted-key', 'pasted-uuid-key']) {
      const granted = await h.api('POST', '/v1/grants', { token: holder.token, body: { credential: name, grantee: other.name } });
      expect(granted.status, granted.text).toBe(201);
    }
    for (const [who, counterpart] of [[holder, other.name], [other, holder.name]] as const) {
      for (const c of calls) {
        const requestId = `withheld-${randomUUID()}`;
        const res = await c.send(who, requestId, counterpart);
        const label = `${c.call} by ${who === holder ? 'the holder' : 'another identity'}: ${res.text}`;
        expect(res.status, label).toBe(c.status);
        for (const form of forms(pasted)) expect(res.text, label).not.toContain(form);
        expect(res.text, label).not.toContain(uuidShaped);
        // The answer says why it names nothing where the value is what it did not find (a leak report never repeats a name; the other identity's grant to it fails on its credential first).
        const says = c.status === 404 && c.call !== 'leak report' && !(c.call === 'grant to it' && who === other);
        if (says) expect(res.text, label).toContain('a value stored in the vault');
        if (c.call === 'rotation') expect(res.text, label).toContain('no-such-rotated-key');
        const rows = (await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
        expect(rows.length, label).toBeGreaterThan(0);
        for (const row of rows) {
          expect(row.outcome, label).toBe('denied');
          for (const form of forms(pasted)) expect(JSON.stringify(row.detail), label).not.toContain(form);
          expect(JSON.stringify(row.detail), label).not.toContain(uuidShaped);
          if (c.field) expect(row.detail, label).toMatchObject({ [`${c.field}Withheld`]: 'stored-value' });
        }
      }
    }
    // The request log (its lines are written as the answers go out).
    await new Promise((resolve) => setTimeout(resolve, 200));
    for (const form of [...forms(pasted), uuidShaped]) expect(readLog(h).includes(form), 'the request log').toBe(false);
    expect(readLog(h)).toContain('/v1/credentials/:ref');

    // A name or id that is not a stored value is answered and written as given, as before.
    const ghost = randomUUID();
    const plain: [string, string, unknown, string, Record<string, unknown>][] = [
      ['POST', '/v1/vault.get', { name: 'no-such-pasted-key' }, "no credential with name 'no-such-pasted-key'", { name: 'no-such-pasted-key' }],
      ['POST', '/v1/vault.get', { id: ghost }, `no credential with id ${ghost}`, { ref: ghost }],
      ['PATCH', '/v1/credentials/no-such-pasted-key', { tags: ['x'] }, "no credential with name 'no-such-pasted-key'", { name: 'no-such-pasted-key' }],
      ['GET', '/v1/audit?credential=no-such-pasted-key', undefined, '', { credential: 'no-such-pasted-key' }],
      ['POST', '/v1/grants', { credential: 'no-such-pasted-key', grantee: holder.name }, "no credential with name 'no-such-pasted-key'", { name: 'no-such-pasted-key', grantee: holder.name }],
      ['POST', '/v1/grants', { credential: ghost, grantee: holder.name }, `no credential with id ${ghost}`, { ref: ghost, grantee: holder.name }],
    ];
    for (const [method, route, body, detail, recorded] of plain) {
      const requestId = `not-withheld-${randomUUID()}`;
      const res = await h.api(method, route, { token: other.token, body, headers: { 'x-request-id': requestId } });
      // (The instance is the route's pattern whatever the reference: it cannot tell a value from a name.)
      if (detail) expect(res.body, res.text).toMatchObject({ status: 404, detail, instance: route.replace('no-such-pasted-key', ':ref') });
      const rows = (await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
      expect(rows, route).toEqual([{ outcome: 'denied', detail: expect.objectContaining(recorded) }]);
      expect(JSON.stringify(rows[0].detail)).not.toMatch(/Withheld/);
    }
  });

  it('a grantee whose grant was revoked: a value it could read is still withheld where it gives it as a name; one stored after the grant ended is not (no guess confirmed)', async () => {
    const holder = await h.createIdentity();
    const other = await h.createIdentity();
    const before = h.secret(`sk_live_51H${randomBytes(12).toString('hex')}`);
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'once-granted-key', kind: 'api_key', value: before } })).status).toBe(201);
    const granted = await h.api('POST', '/v1/grants', { token: holder.token, body: { credential: 'once-granted-key', grantee: other.name } });
    expect(granted.status, granted.text).toBe(201);
    expect((await h.api('DELETE', `/v1/grants/${granted.body.id}`, { token: other.token })).status).toBe(404);
    expect((await h.api('DELETE', `/v1/grants/${granted.body.id}`, { token: holder.token })).status).toBe(200);
    // Stored after the revoke: never the grantee's to read. Not registered with the leak sweep (the grantee's row holds it by design); destroyed below.
    const after = `sk_live_51H${randomBytes(12).toString('hex')}`;
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'once-granted-key', kind: 'api_key', value: after } })).status).toBe(201);
    const asName = async (name: string) => {
      const requestId = `revoked-grant-${randomUUID()}`;
      const res = await fetch(`${h.url}/v1/vault.get`, {
        method: 'POST',
        headers: { authorization: `Bearer ${other.token}`, 'content-type': 'application/json', 'x-request-id': requestId },
        body: JSON.stringify({ name }),
      });
      const rows = (await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
      return { status: res.status, text: await res.text(), rows };
    };
    // Before, only an active grant counted: the value it had read was written into its denied row as given.
    const known = await asName(before);
    expect(known.status).toBe(404);
    expect(known.text).not.toContain(before);
    expect(known.rows).toEqual([{ outcome: 'denied', detail: expect.objectContaining({ nameWithheld: 'stored-value' }) }]);
    expect(JSON.stringify(known.rows)).not.toContain(before);
    const unknown = await asName(after);
    expect(unknown.status).toBe(404);
    expect(unknown.rows).toEqual([{ outcome: 'denied', detail: expect.objectContaining({ name: after }) }]);
    expect((await h.api('DELETE', '/v1/credentials/once-granted-key?destroy=true', { token: holder.token })).status).toBe(200);
  });

  it('a value the caller can read pasted as a grant id (many keys are UUIDs) is neither repeated nor written into the denied row', async () => {
    const owner = await h.createIdentity();
    const uuidKey = h.secret(randomUUID());
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name: 'uuid-shaped-key', kind: 'api_key', value: uuidKey } })).status).toBe(201);
    const other = randomUUID();
    for (const given of [uuidKey, uuidKey.toUpperCase(), other]) {
      const requestId = `grant-id-${randomUUID()}`;
      // Not through h.api, which records a refused request's path (the leak sweep reads it).
      const answer = await fetch(`${h.url}/v1/grants/${given}`, { method: 'DELETE', headers: { authorization: `Bearer ${owner.token}`, 'x-request-id': requestId } });
      const res = { status: answer.status, text: await answer.text(), body: undefined as unknown as { detail: string } };
      res.body = JSON.parse(res.text);
      expect(res.status).toBe(404);
      const rows = (await h.sql('SELECT outcome, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
      if (given === other) {
        // An id that is no value is the trail of what was tried: kept, and repeated.
        expect(res.body.detail).toBe(`no active grant with id ${other}`);
        expect(rows).toEqual([{ outcome: 'denied', detail: expect.objectContaining({ grantId: other }) }]);
        continue;
      }
      // Before: "no active grant with id <the value>", and the row's grantId the value.
      expect(res.text.toLowerCase()).not.toContain(uuidKey);
      expect(rows).toEqual([{ outcome: 'denied', detail: expect.objectContaining({ grantIdWithheld: 'stored-value' }) }]);
      expect(JSON.stringify(rows).toLowerCase()).not.toContain(uuidKey);
    }
  });

  it('vault.store refuses an externalId that holds the value (it is kept unencrypted), and a __proto__ key anywhere (zod dropped it from metadata): 400s, nothing stored', async () => {
    const owner = await h.createIdentity();
    const value = h.secret('sk_live_external_id_pasted_0001');
    const held = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name: 'ext-held', kind: 'api_key', value, externalId: value } });
    expect(held.status).toBe(400);
    expect(held.body.errors).toEqual([{ path: 'externalId', message: expect.stringContaining('holds the value being stored') }]);
    expect(held.text).not.toContain(value);
    const proto = await h.api('POST', '/v1/vault.store', {
      token: owner.token,
      raw: '{"name":"meta-proto","kind":"generic","value":"v-meta-proto","metadata":{"__proto__":"z","a":"b"}}',
      headers: { 'content-type': 'application/json' },
    });
    expect(proto.status).toBe(400);
    expect(proto.body.errors).toEqual([{ path: 'metadata.__proto__', message: 'is not accepted as a key' }]);
    expect((await h.sql('SELECT name FROM credentials WHERE identity_id = $1', [owner.id])).rows).toEqual([]);
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name: 'meta-ok', kind: 'generic', value: h.secret('v-meta-ok') } })).status).toBe(201);
    const patched = await h.api('PATCH', '/v1/credentials/meta-ok', { token: owner.token, raw: '{"metadata":{"__proto__":{"x":1}}}', headers: { 'content-type': 'application/json' } });
    // Before: 200, and metadata {}.
    expect(patched.status).toBe(400);
  });

  it('vault.store refuses a new credential named by a value the caller can read, or by the value it comes with: a 422, nothing stored, the name withheld', async () => {
    const holder = await h.createIdentity();
    const other = await h.createIdentity();
    const value = h.secret(`ghp_${randomBytes(16).toString('hex')}`);
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'github-token', kind: 'api_key', value } })).status).toBe(201);
    // A stranger's store under the holder's value is a name like any other (a refusal would confirm that some identity stores it).
    const stranger = await h.createIdentity();
    const unregistered = `ghp_${randomBytes(16).toString('hex')}`;
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'unregistered-token', kind: 'api_key', value: unregistered } })).status).toBe(201);
    const strangers = await h.api('POST', '/v1/vault.store', { token: stranger.token, body: { name: unregistered, kind: 'api_key', value: h.secret(`other-value-${randomBytes(8).toString('hex')}`) } });
    expect(strangers.status, strangers.text).toBe(201);
    // (Destroyed, so the leak sweep does not look for it: the stranger's credential is named by it, by design.)
    expect((await h.api('DELETE', '/v1/credentials/unregistered-token?destroy=true', { token: holder.token })).status).toBe(200);
    // The other identity, granted the holder's token, can read it: refused as the holder is.
    const granted = await h.api('POST', '/v1/grants', { token: holder.token, body: { credential: 'github-token', grantee: other.name } });
    expect(granted.status, granted.text).toBe(201);
    const same = h.secret(`sk_same_${randomBytes(12).toString('hex')}`);
    const attempts: [{ token: string }, Record<string, unknown>][] = [
      [holder, { name: value, kind: 'api_key', value: h.secret(`other-value-${randomBytes(8).toString('hex')}`) }],
      [other, { name: value, kind: 'api_key', value: h.secret(`other-value-${randomBytes(8).toString('hex')}`) }],
      // With policy (a store alone, not in a batch), and with an expectedVersion for a credential there is not.
      [other, { name: value, kind: 'api_key', value: h.secret(`other-value-${randomBytes(8).toString('hex')}`), tags: ['t'] }],
      [other, { name: value, kind: 'api_key', value: h.secret(`other-value-${randomBytes(8).toString('hex')}`), expectedVersion: 3 }],
      [other, { name: same, kind: 'api_key', value: same }],
    ];
    for (const [who, body] of attempts) {
      const requestId = `store-withheld-${randomUUID()}`;
      const res = await h.api('POST', '/v1/vault.store', { token: who.token, body, headers: { 'x-request-id': requestId } });
      expect(res.status, res.text).toBe(422);
      expect(res.body.type).toBe('https://mailgent.dev/problems/unprocessable');
      expect(res.text).not.toContain(body.name as string);
      const rows = (await h.sql('SELECT outcome, credential_id, detail FROM audit_log WHERE request_id = $1', [requestId])).rows;
      expect(rows).toEqual([{ outcome: 'rejected', credential_id: null, detail: { nameWithheld: 'stored-value', error: 'unprocessable', status: 422 } }]);
    }
    expect((await h.sql('SELECT count(*)::int AS n FROM credentials WHERE name = ANY($1)', [[value, same]])).rows[0].n).toBe(0);
    // A new version of a credential that is there, and a new credential of another name, store as before.
    expect((await h.api('POST', '/v1/vault.store', { token: holder.token, body: { name: 'github-token', kind: 'api_key', value: h.secret(`ghp_${randomBytes(16).toString('hex')}`) } })).status).toBe(201);
    expect((await h.api('POST', '/v1/vault.store', { token: other.token, body: { name: 'github-token', kind: 'api_key', value: h.secret(`ghp_${randomBytes(16).toString('hex')}`) } })).status).toBe(201);
  });

  it('an expiry with a UTC offset of up to 15 hours (what PostgreSQL takes) is stored as its instant', async () => {
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: 'far-offset', kind: 'generic', value: h.secret('v-far-offset-value-01'), expiresAt: '2030-01-01T00:00:00+15:00' },
    });
    expect(stored.status, stored.text).toBe(201);
    const expiry = async () => (await h.sql("SELECT expires_at FROM credentials WHERE name = 'far-offset'")).rows[0].expires_at.toISOString();
    expect(await expiry()).toBe('2029-12-31T09:00:00.000Z');
    const patched = await h.api('PATCH', '/v1/credentials/far-offset', { token: agent.token, body: { expiresAt: '2030-01-01T00:00:00-15:30' } });
    expect(patched.status, patched.text).toBe(200);
    expect(await expiry()).toBe('2030-01-01T15:30:00.000Z');
  });
});

