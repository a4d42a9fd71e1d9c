import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { WorkflowFailedError } from '@temporalio/client';
import type { Payload } from '@temporalio/common';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { IntegrityError } from '../core/errors';
import { findTemporalCli } from '../embedded/temporal-cli';
import { codecKeyId, CODEC_KEY_NAME, ENCODING, EncryptionCodec, KEY_ID_HEADER } from '../vault/payload-codec';
import { PATCH_IDS, ROTATION_PATCHES_AT_START } from '../workflows/patches';
import { decodedHistoryText, expectCleanRun, rawHistoryText } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

const run = promisify(execFile);

/** Every payload object (metadata + data) anywhere in a history, and every failure. */
function collect(node: unknown, payloads: Payload[] = [], failures: Record<string, any>[] = []) {
  if (node === null || typeof node !== 'object' || node instanceof Uint8Array) return { payloads, failures };
  if (Array.isArray(node)) {
    for (const item of node) collect(item, payloads, failures);
    return { payloads, failures };
  }
  const record = node as Record<string, any>;
  // A patch's marker, and the search attribute the SDK sets for it, are written past the codec (the
  // server indexes search attributes): only known patch ids may be there, in the clear.
  if (record.markerName === 'core_patch') {
    for (const p of Object.values(record.details ?? {}).flatMap((d: any) => d.payloads ?? [])) {
      const { id, ...rest } = JSON.parse(Buffer.from((p as Payload).data!).toString());
      expect(PATCH_IDS).toContain(id);
      expect(Object.keys(rest)).toEqual(['deprecated']);
    }
    return { payloads, failures };
  }
  if (record.searchAttributes?.indexedFields) {
    const fields = record.searchAttributes.indexedFields as Record<string, Payload>;
    expect(Object.keys(fields)).toEqual(['TemporalChangeVersion']);
    for (const id of JSON.parse(Buffer.from(fields.TemporalChangeVersion!.data!).toString())) expect(PATCH_IDS).toContain(id);
    return { payloads, failures };
  }
  if (record.metadata && record.data instanceof Uint8Array) payloads.push(record as Payload);
  else {
    if (typeof record.message === 'string' && ('encodedAttributes' in record || 'stackTrace' in record)) failures.push(record);
    for (const value of Object.values(record)) collect(value, payloads, failures);
  }
  return { payloads, failures };
}

/** The payload codec: what the Temporal server stores is ciphertext, and operators can still read it. */
describe('payload codec', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  let keyId: string;
  const marker = `codecmarker${randomBytes(4).toString('hex')}`;
  let okWorkflow: string;
  let failedWorkflow: string;
  let batchWorkflow: string;

  const waitForRotation = async (rotationId: string) => {
    for (let i = 0; i < 150; i++) {
      const res = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      if (res.body.state !== 'running') return res.body;
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(`rotation ${rotationId} did not finish`);
  };

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity();
    keyId = codecKeyId(await h.services.dataKeys.serviceKey(h.services.pool, CODEC_KEY_NAME));

    // One rotation that succeeds (its reason carries the marker) and one that fails (its error names the credential).
    const ok = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: `${marker}-api`, kind: 'api_key', value: h.secret(`sk_codec_${randomBytes(12).toString('hex')}`), rotation: { provider: 'generated', graceHours: 0 } },
    });
    const bad = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: `${marker}-totp`, kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXQ') } },
    });
    expect([ok.status, bad.status]).toEqual([201, 201]);
    // Given a policy before vault.store refused one (a request names only credentials with one): it fails at its plan.
    await h.sql(`UPDATE credentials SET rotation = '{"provider": "generated", "settings": {}, "periodDays": 90}' WHERE id = $1`, [bad.body.id]);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [ok.body.id, bad.body.id], reason: `reason ${marker}` } });
    expect(started.status).toBe(202);
    await waitForRotation(started.body.rotationId);
    batchWorkflow = started.body.batchWorkflowId;
    okWorkflow = `rotate:${ok.body.id}`;
    failedWorkflow = `rotate:${bad.body.id}`;
    const current = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: `${marker}-api` } });
    expect(current.body.version).toBe(2);
    h.secret(current.body.value);
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('the history on the server holds only encrypted payloads, failure messages included', async () => {
    for (const workflowId of [okWorkflow, failedWorkflow]) {
      const history = await h.client.workflow.getHandle(workflowId).fetchHistory();
      const { payloads, failures } = collect(history);
      expect(payloads.length).toBeGreaterThan(5);
      for (const p of payloads) {
        expect(Buffer.from(p.metadata!.encoding!).toString()).toBe(ENCODING);
        expect(Buffer.from(p.metadata![KEY_ID_HEADER]!).toString()).toBe(keyId);
      }
      const raw = rawHistoryText(history);
      expect(rawHistoryText(await h.client.workflow.getHandle(batchWorkflow).fetchHistory())).not.toContain(marker);
      expect(raw).not.toContain(marker);
      // Workflow ids are the server's own metadata (ids, never values); payloads must not repeat them.
      expect(raw.replaceAll(`"workflowId":"${workflowId}"`, '')).not.toContain(workflowId.slice('rotate:'.length));
      // What the codec hides is really there: decoded, the same history names the credential and the reason.
      const decoded = await decodedHistoryText(h, history);
      expect(decoded).toContain(workflowId.slice('rotate:'.length));
      if (workflowId === failedWorkflow) {
        expect(failures.length).toBeGreaterThan(0);
        for (const f of failures) {
          expect(f.message).toBe('Encoded failure');
          expect(f.stackTrace ?? '').toBe('');
        }
        expect(decoded).toContain(`credential '${marker}-totp' is a totp_seed`);
      }
    }
  });

  it('a rotation started now records one patch marker and one change-version update, whichever patched branches it takes', async () => {
    for (const workflowId of [okWorkflow, failedWorkflow]) {
      const { events } = await h.client.workflow.getHandle(workflowId).fetchHistory();
      const markers = events!.filter((e) => e.markerRecordedEventAttributes?.markerName === 'core_patch');
      const ids = markers.flatMap((e) =>
        Object.values(e.markerRecordedEventAttributes!.details ?? {}).flatMap((d) => (d.payloads ?? []).map((p) => JSON.parse(Buffer.from(p.data!).toString()).id)),
      );
      // Before, one marker and one update for each patch the run reached (five in a completed rotation).
      expect(ids).toEqual([ROTATION_PATCHES_AT_START]);
      expect(events!.filter((e) => e.upsertWorkflowSearchAttributesEventAttributes).length).toBe(1);
    }
  });

  it('clients decode failures transparently', async () => {
    const failure = await h.client.workflow.getHandle(failedWorkflow).result().catch((e) => e);
    expect(failure).toBeInstanceOf(WorkflowFailedError);
    expect(failure.cause.message).toContain(`credential '${marker}-totp' is a totp_seed`);
  });

  it('refuses a payload that was altered or encrypted under another key', async () => {
    const codec = h.services.dataConverter.payloadCodecs![0]!;
    const [sealed] = await codec.encode([{ metadata: { encoding: Buffer.from('json/plain') }, data: Buffer.from('{"a":1}') }]);
    expect(Buffer.from((await codec.decode([sealed!]))[0]!.data!).toString()).toBe('{"a":1}');
    const flipped = Buffer.from(sealed!.data!);
    flipped[flipped.length - 20]! ^= 1;
    await expect(codec.decode([{ ...sealed!, data: flipped }])).rejects.toBeInstanceOf(IntegrityError);
    const other = new EncryptionCodec(async () => ({ id: 'payload-codec:0000000000000000', key: randomBytes(32) }));
    const [foreign] = await other.encode([{ metadata: {}, data: Buffer.from('x') }]);
    await expect(codec.decode([foreign!])).rejects.toThrow(/payload-codec:0000000000000000/);
  });

  describe('codec server', () => {
    const encoded = async () => {
      const history = await h.client.workflow.getHandle(okWorkflow).fetchHistory();
      const started = history.events![0]!.workflowExecutionStartedEventAttributes!.input!.payloads!;
      return started.map((p) => ({
        metadata: Object.fromEntries(Object.entries(p.metadata!).map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
        data: Buffer.from(p.data!).toString('base64'),
      }));
    };

    it('decodes for the admin token only, and audits it', async () => {
      const payloads = await encoded();
      const res = await h.api('POST', '/codec/decode', { token: h.adminToken, body: { payloads }, headers: { 'x-namespace': 'default' } });
      expect(res.status).toBe(200);
      const decoded = res.body.payloads.map((p: { data: string }) => Buffer.from(p.data, 'base64').toString());
      expect(decoded.join()).toContain(okWorkflow.slice('rotate:'.length));
      expect(Buffer.from(res.body.payloads[0].metadata.encoding, 'base64').toString()).toBe('json/plain');

      const asAgent = await h.api('POST', '/codec/decode', { token: agent.token, body: { payloads } });
      expect(asAgent.status).toBe(403);
      expect(asAgent.text).not.toContain(okWorkflow.slice('rotate:'.length));
      expect((await h.api('POST', '/codec/decode', { body: { payloads } })).status).toBe(401);
      const wrongNs = await h.api('POST', '/codec/decode', { token: h.adminToken, body: { payloads }, headers: { 'x-namespace': 'other' } });
      expect(wrongNs.status).toBe(400);
      expect(wrongNs.headers.get('content-type')).toContain('application/problem+json');
      const bad = await h.api('POST', '/codec/decode', { token: h.adminToken, body: { payloads: [{ data: 'not base64!' }] } });
      expect(bad.status).toBe(400);

      const audit = await h.sql(`SELECT actor, outcome, detail FROM audit_log WHERE action = 'codec.decode' ORDER BY seq`);
      expect(audit.rows[0]).toMatchObject({ actor: 'admin', outcome: 'ok', detail: { payloads: payloads.length } });
      expect(audit.rows.map((r) => r.outcome)).toContain('denied');
    });

    it('round-trips through encode and decode', async () => {
      const plain = [{ metadata: { encoding: Buffer.from('json/plain').toString('base64') }, data: Buffer.from('"hello"').toString('base64') }];
      const enc = await h.api('POST', '/codec/encode', { token: h.adminToken, body: { payloads: plain } });
      expect(enc.status).toBe(200);
      expect(Buffer.from(enc.body.payloads[0].metadata.encoding, 'base64').toString()).toBe(ENCODING);
      const dec = await h.api('POST', '/codec/decode', { token: h.adminToken, body: { payloads: enc.body.payloads } });
      expect(dec.body.payloads).toEqual(plain);

      // Payloads this deployment cannot open are the caller's to fix: a 422 that names no key, not a 500.
      const [sealed] = enc.body.payloads;
      const cutShort = { ...sealed, data: Buffer.from(sealed.data, 'base64').subarray(0, 20).toString('base64') };
      const otherKey = { ...sealed, metadata: { ...sealed.metadata, 'encryption-key-id': Buffer.from('payload-codec:0000000000000000').toString('base64') } };
      for (const payload of [cutShort, otherKey]) {
        const refused = await h.api('POST', '/codec/decode', { token: h.adminToken, body: { payloads: [payload] } });
        expect(refused.status, refused.text).toBe(422);
        expect(refused.body.detail).toBe('a payload could not be decrypted: it was encrypted by another deployment or key, or altered');
      }
    });

    it('answers CORS preflights from the configured Web UI origin only', async () => {
      const allowed = await fetch(`${h.url}/codec/decode`, {
        method: 'OPTIONS',
        headers: { origin: 'http://localhost:8233', 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type,x-namespace' },
      });
      expect(allowed.status).toBe(204);
      expect(allowed.headers.get('access-control-allow-origin')).toBe('http://localhost:8233');
      expect(allowed.headers.get('access-control-allow-headers')).toMatch(/Authorization/);
      const other = await fetch(`${h.url}/codec/decode`, { method: 'OPTIONS', headers: { origin: 'http://evil.example', 'access-control-request-method': 'POST' } });
      expect(other.headers.get('access-control-allow-origin')).toBeNull();
    });

    it('lets the real Temporal CLI show a decoded history', async () => {
      const cli = await findTemporalCli({ configured: process.env.TEMPORAL_CLI_PATH, build: false });
      expect(cli, 'the Temporal CLI the test servers run on').toBeTruthy();
      const args = ['workflow', 'show', '--workflow-id', okWorkflow, '--address', inject('temporalAddress'), '--namespace', 'default', '--output', 'json'];
      const startInput = (stdout: string) => {
        const [payload] = JSON.parse(stdout).events[0].workflowExecutionStartedEventAttributes.input.payloads;
        return { encoding: Buffer.from(payload.metadata.encoding, 'base64').toString(), data: Buffer.from(payload.data, 'base64').toString('latin1') };
      };
      const credentialId = okWorkflow.slice('rotate:'.length);
      const plain = startInput((await run(cli!, args)).stdout);
      expect(plain.encoding).toBe(ENCODING);
      expect(plain.data).not.toContain(credentialId);
      const decoded = startInput((await run(cli!, [...args, '--codec-endpoint', `${h.url}/codec`, '--codec-auth', `Bearer ${h.adminToken}`])).stdout);
      expect(decoded.encoding).toBe('json/plain');
      expect(JSON.parse(decoded.data)).toMatchObject({ credentialId });
    });
  });
});
