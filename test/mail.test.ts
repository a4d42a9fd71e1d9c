import { randomUUID } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSmtpSink } from '../embedded/smtp-sink';
import { sendNotice } from '../mail/notify';
import { queueMail } from '../mail/outbox';
import { findStoredValueIn } from '../mail/secret-scan';
import { freePort } from '../embedded/ports';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { readMailbox, recipients, waitForMail } from './support/mail';

describe('mail.send', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  const secretValue = 'xoxb-slack-bot-token-9f8e7d';

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'slack', kind: 'token', value: h.secret(secretValue) } });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('queues the message and delivers it over SMTP once, with a stable Message-ID', async () => {
    const to = `team-${randomUUID().slice(0, 8)}@example.com`;
    const res = await h.api('POST', '/v1/mail.send', {
      token: agent.token,
      body: { to: [to, 'cc-someone@example.com'], subject: 'Deploy finished', text: 'Release 42 is live.', html: '<p>Release <b>42</b> is live.</p>' },
    });
    expect(res.status).toBe(202);
    expect(res.body).toEqual({ messageId: expect.stringMatching(/^[0-9a-f-]{36}$/), status: 'queued' });
    const [delivered] = await waitForMail(to);
    expect(delivered!.mail.subject).toBe('Deploy finished');
    expect(delivered!.mail.text?.trim()).toBe('Release 42 is live.');
    expect(delivered!.mail.html).toContain('<b>42</b>');
    expect(delivered!.mail.messageId).toBe(`<${res.body.messageId}@mailgent>`);
    expect(recipients(delivered!.mail)).toEqual([to, 'cc-someone@example.com']);
    const row = (await h.sql('SELECT status, attempts FROM mail_outbox WHERE id = $1', [res.body.messageId])).rows[0];
    expect(row).toEqual({ status: 'sent', attempts: 1 });
    await new Promise((r) => setTimeout(r, 500));
    expect(await waitForMail(to, 2, 0)).toHaveLength(1);
  });

  it('a request repeated with its Idempotency-Key gets the first one\'s message back: one email, whatever its answer was; another message under the key is refused', async () => {
    // An identity of its own: tests below count the agent's mail.send audit rows.
    const sender = await h.createIdentity();
    const to = `keyed-${randomUUID().slice(0, 8)}@example.com`;
    const key = `agent-retry-${randomUUID()}`;
    const body = { to: [to], subject: 'Deploy finished', text: 'Release 43 is live.' };
    const first = await h.api('POST', '/v1/mail.send', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(first.status, first.text).toBe(202);
    expect(first.body).toEqual({ messageId: expect.stringMatching(/^[0-9a-f-]{36}$/), status: 'queued' });
    await waitForMail(to);
    // The client lost the answer and sends the request again (quoted, as the draft's structured header writes it; or, as MCP gives it, in the body).
    const again = await h.api('POST', '/v1/mail.send', { token: sender.token, body, headers: { 'idempotency-key': `"${key}"` } });
    expect(again.status, again.text).toBe(202);
    // Before, a second message was queued and sent.
    expect(again.body).toEqual({ messageId: first.body.messageId, status: 'sent', repeated: true });
    const inBody = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { ...body, idempotencyKey: key } });
    expect(inBody.body).toEqual({ messageId: first.body.messageId, status: 'sent', repeated: true });
    await new Promise((r) => setTimeout(r, 500));
    expect(await waitForMail(to, 2, 0)).toHaveLength(1);
    expect((await h.sql('SELECT count(*)::int AS n FROM mail_outbox WHERE $1 = ANY(recipients)', [to])).rows[0].n).toBe(1);
    const audited = (await h.sql(`SELECT detail FROM audit_log WHERE identity_id = $1 AND action = 'mail.send' AND detail->>'messageId' = $2 ORDER BY seq`, [sender.id, first.body.messageId])).rows;
    expect(audited.map((r) => r.detail.repeated ?? false)).toEqual([false, true, true]);

    // Another message under the same key: refused, nothing queued.
    const other = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { ...body, text: 'Release 44 is live.' }, headers: { 'idempotency-key': key } });
    expect(other.status, other.text).toBe(422);
    expect(other.body).toMatchObject({ type: expect.stringMatching(/idempotency-key-reused$/), detail: expect.stringContaining(first.body.messageId) });
    // Another identity's key of the same text is its own.
    const peer = await h.createIdentity();
    const theirs = await h.api('POST', '/v1/mail.send', { token: peer.token, body: { ...body, to: [`peer-${to}`], text: 'Release 44 is live.' }, headers: { 'idempotency-key': key } });
    expect(theirs.status, theirs.text).toBe(202);
    expect(theirs.body.messageId).not.toBe(first.body.messageId);
    // A key older than a day names nothing: the same request is a new message.
    await h.sql(`UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE identity_id = $1 AND action = 'mail.send' AND key = $2`, [sender.id, key]);
    const later = await h.api('POST', '/v1/mail.send', { token: sender.token, body, headers: { 'idempotency-key': key } });
    expect(later.status, later.text).toBe(202);
    expect(later.body).toEqual({ messageId: expect.not.stringMatching(first.body.messageId), status: 'queued' });
    expect(await waitForMail(to, 2)).toHaveLength(2);
  });

  it('concurrent requests with one Idempotency-Key queue one message between them', async () => {
    const sender = await h.createIdentity();
    const to = `keyed-race-${randomUUID().slice(0, 8)}@example.com`;
    const key = randomUUID();
    const body = { to: [to], subject: 'Once', text: 'Only once, however often asked.' };
    const answers = await Promise.all(Array.from({ length: 6 }, () => h.api('POST', '/v1/mail.send', { token: sender.token, body, headers: { 'idempotency-key': key } })));
    expect(answers.map((a) => a.status)).toEqual(Array(6).fill(202));
    expect(new Set(answers.map((a) => a.body.messageId)).size).toBe(1);
    expect((await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE $1 = ANY(recipients) AND status <> 'abandoned'`, [to])).rows[0].n).toBe(1);
    await waitForMail(to);
    await new Promise((r) => setTimeout(r, 500));
    expect(await waitForMail(to, 2, 0)).toHaveLength(1);
  });

  it('an Idempotency-Key that is no key is a 400 before anything is scanned or queued', async () => {
    const sender = await h.createIdentity();
    const before = (await h.sql('SELECT count(*)::int AS n FROM mail_outbox')).rows[0].n;
    for (const [headers, body, path] of [
      [{ 'idempotency-key': 'has a space' }, {}, 'Idempotency-Key'],
      [{ 'idempotency-key': 'x'.repeat(256) }, {}, 'Idempotency-Key'],
      [{ 'idempotency-key': 'one' }, { idempotencyKey: 'two' }, 'idempotencyKey'],
      [{}, { idempotencyKey: '' }, 'idempotencyKey'],
    ] as const) {
      const res = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: ['x@example.com'], subject: 's', text: 't', ...body }, headers });
      expect(res.status, JSON.stringify(headers)).toBe(400);
      expect(res.body.errors[0].path).toBe(path);
    }
    expect((await h.sql('SELECT count(*)::int AS n FROM mail_outbox')).rows[0].n).toBe(before);
  });

  it('a message whose COMMIT fails is a 503 marked unconfirmed (it may have been queued), not "try again"', async () => {
    // A check PostgreSQL runs only at COMMIT (a deferred constraint trigger), for this test's subject.
    await h.sql(`CREATE FUNCTION mail_fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF NEW.subject = 'refused at commit' THEN RAISE EXCEPTION 'refused at commit'; END IF;
        RETURN NULL;
      END $$`);
    await h.sql(`CREATE CONSTRAINT TRIGGER mail_fail_at_commit AFTER INSERT ON mail_outbox DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION mail_fail_at_commit()`);
    try {
      // An identity of its own: the tests after this one count the agent's mail.send audit rows.
      const sender = await h.createIdentity();
      const res = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: ['unconfirmed@example.com'], subject: 'refused at commit', text: 'hello' } });
      // Before, a plain 503 "try again shortly": a client repeating it could send the message twice.
      expect(res.status).toBe(503);
      expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/unavailable', unconfirmed: true, detail: expect.stringContaining('it may have been carried out') });
    } finally {
      await h.sql('DROP TRIGGER mail_fail_at_commit ON mail_outbox');
      await h.sql('DROP FUNCTION mail_fail_at_commit()');
    }
  });

  it('mail.send starts the delivery before it commits the message: a delivery that finds no message yet waits for it, then sends it once', async () => {
    const messageId = randomUUID();
    const to = `late-commit-${messageId.slice(0, 8)}@example.com`;
    const handle = await h.client.workflow.start('deliverMail', { taskQueue: h.taskQueue, workflowId: `mail:${messageId}`, args: [{ messageId }] });
    await new Promise((r) => setTimeout(r, 1_500));
    await queueMail(h.services.pool, { id: messageId, identityId: agent.id, purpose: 'mail.send', to: [to], subject: 'committed late', text: 'hello' });
    // Before, the delivery found nothing, ended 'missing' at once, and the message stayed queued unsent.
    expect(await handle.result()).toBe('sent');
    expect(await waitForMail(to)).toHaveLength(1);
    expect((await h.sql('SELECT status FROM mail_outbox WHERE id = $1', [messageId])).rows).toEqual([{ status: 'sent' }]);
  });

  it('refuses (422) a message carrying a stored value in any part or common encoding; nothing is queued or sent', async () => {
    const to = `leak-${randomUUID().slice(0, 8)}@example.com`;
    const attempts = [
      { subject: `token ${secretValue}`, text: 'hi' },
      { subject: 'hi', text: `the token is ${secretValue}, keep it safe` },
      { subject: 'hi', text: 'see html', html: `<code>${secretValue}</code>` },
      { subject: 'hi', text: `b64: ${Buffer.from(secretValue).toString('base64')}` },
      { subject: 'hi', text: `hex: ${Buffer.from(secretValue).toString('hex')}` },
    ];
    const queued = Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count);
    for (const message of attempts) {
      const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: [to], ...message } });
      expect(res.status).toBe(422);
      expect(res.body).toMatchObject({
        type: 'https://mailgent.dev/problems/secret-in-message',
        detail: "the message contains the value of credential 'slack' (or an encoding of it); mail never carries a secret",
      });
      expect(res.text).not.toContain(secretValue);
    }
    expect(Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count)).toBe(queued);
    const audit = (await h.sql("SELECT outcome, detail FROM audit_log WHERE action = 'mail.send' AND outcome <> 'ok' AND identity_id = $1", [agent.id])).rows;
    expect(audit).toHaveLength(attempts.length);
    expect(audit[0]).toEqual({ outcome: 'rejected', detail: { error: 'secret-in-message', status: 422 } });
    await new Promise((r) => setTimeout(r, 500));
    expect((await readMailbox()).filter((m) => recipients(m.mail).includes(to))).toHaveLength(0);
  });

  it('refuses (422) a subject with an encoded word in a charset the scan cannot read, and finds a TOTP seed in dashed groups; other charsets are sent', async () => {
    // An identity of its own: the test above counts the agent's refusals.
    const sender = await h.createIdentity();
    const value = h.secret('sk_live_51HxYzAbCdEf');
    expect((await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'stripe-live', kind: 'api_key', value } })).status).toBe(201);
    const seed = h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP');
    expect((await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'seed-2fa', kind: 'totp_seed', totp: { secret: seed } } })).status).toBe(201);
    const to = `charset-${randomUUID().slice(0, 8)}@example.com`;
    const queued = Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count);
    // Before, this was a 202 and sent: nodemailer passes the word on, and a client shows the value.
    const utf7 = await h.api('POST', '/v1/mail.send', {
      token: sender.token,
      body: { to: [to], subject: '=?utf-7?Q?+AHMAawBfAGwAaQB2AGUAXwA1ADEASAB4AFkAegBBAGIAQwBkAEUAZg-?=', text: 'hi' },
    });
    expect(utf7.status, utf7.text).toBe(422);
    expect(utf7.body).toMatchObject({ type: 'https://mailgent.dev/problems/unprocessable', detail: expect.stringMatching(/^charset 'utf-7' in the subject is not accepted .*: send the subject as UTF-8 text$/) });
    // Before, this was a 202 and sent: vault/totp.ts takes `JBSW-Y3DP-…` as the same seed.
    const dashed = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: [to], subject: 'setup', text: 'key JBSW-Y3DP-EHPK-3PXP-JBSW-Y3DP-EHPK-3PXP' } });
    expect(dashed.status, dashed.text).toBe(422);
    expect(dashed.body).toMatchObject({ type: 'https://mailgent.dev/problems/secret-in-message', detail: expect.stringContaining("'seed-2fa'") });
    for (const res of [utf7, dashed]) expect(res.text).not.toMatch(/sk_live|JBSW/);
    expect(Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count)).toBe(queued);
    const audit = (await h.sql("SELECT detail FROM audit_log WHERE action = 'mail.send' AND outcome = 'rejected' AND identity_id = $1 ORDER BY seq", [sender.id])).rows;
    expect(audit.map((row) => row.detail.error)).toEqual(['unprocessable', 'secret-in-message']);
    // A word in ISO-8859-1 is read, and sent as it was written.
    const latin1 = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: [to], subject: '=?iso-8859-1?Q?Caf=E9?= menu', text: 'hi' } });
    expect(latin1.status, latin1.text).toBe(202);
    const [delivered] = await waitForMail(to);
    expect(delivered!.mail.subject).toBe('Café menu');
  });

  it('refuses (422) a value shown by an override of part of it, inside noscript, or in an alt text with an invisible character; ordinary html with alt texts is sent', async () => {
    const sender = await h.createIdentity();
    const value = h.secret('sk_live_51HxYzAbCdEf');
    expect((await h.api('POST', '/v1/vault.store', { token: sender.token, body: { name: 'stripe-live', kind: 'api_key', value } })).status).toBe(201);
    const to = `shown-${randomUUID().slice(0, 8)}@example.com`;
    const queued = Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count);
    // Before, each of these was a 202 and sent: a client shows sk_live_51HxYzAbCdEf in each.
    for (const body of [
      { subject: 'key', text: 'sk_live_51HxYz\u202efEdCbA\u202c' },
      { subject: 'key', text: 'see html', html: '<p>sk_live_51HxYz<bdo dir="rtl">fEdCbA</bdo></p>' },
      { subject: 'key', text: 'see html', html: 'sk_live_51<noscript><b>Hx</b></noscript>YzAbCdEf' },
      { subject: 'key', text: 'see html', html: '<img src="cid:none" alt="sk_live_&#8203;51HxYzAbCdEf">' },
    ]) {
      const res = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: [to], ...body } });
      expect(res.status, JSON.stringify(body)).toBe(422);
      expect(res.body).toMatchObject({ type: 'https://mailgent.dev/problems/secret-in-message', detail: expect.stringContaining("'stripe-live'") });
    }
    expect(Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count)).toBe(queued);
    const html = '<img src="cid:logo" alt="Acme logo"><p dir="rtl" title="Rotation">שלום <bdo dir="rtl">עולם</bdo>, the key was rotated.</p>';
    const sent = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: [to], subject: 'Rotated', text: 'The key was rotated \u202eשלום\u202c.', html } });
    expect(sent.status, sent.text).toBe(202);
    expect(await waitForMail(to)).toHaveLength(1);
  });

  it('a grantee cannot mail a value granted to it: it may read it, not pass it on', async () => {
    const owner = await h.createIdentity();
    const grantee = await h.createIdentity();
    const shared = h.secret(`sk_shared_${randomUUID()}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name: 'shared-key', kind: 'api_key', value: shared } });
    const grant = await h.api('POST', '/v1/grants', { token: owner.token, body: { credential: 'shared-key', grantee: grantee.id } });
    expect(grant.status, grant.text).toBe(201);
    expect((await h.api('POST', '/v1/vault.get', { token: grantee.token, body: { id: stored.body.id } })).body.value).toBe(shared);

    const to = `grantee-${randomUUID().slice(0, 8)}@example.com`;
    const queued = Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count);
    const refused = await h.api('POST', '/v1/mail.send', { token: grantee.token, body: { to: [to], subject: 'hi', text: `use ${shared}` } });
    expect(refused.status).toBe(422);
    expect(refused.body).toMatchObject({ type: 'https://mailgent.dev/problems/secret-in-message' });
    expect(refused.text).not.toContain(shared);
    expect(Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count)).toBe(queued);
    // A third identity, granted nothing, is not refused for a value it cannot know: the scan is the sender's own.
    const stranger = await h.createIdentity();
    const unrelated = await h.api('POST', '/v1/mail.send', { token: stranger.token, body: { to: [to], subject: 'hi', text: 'nothing secret here' } });
    expect(unrelated.status).toBe(202);
  });

  it('a grantee cannot mail a value once granted to it after the grant is revoked or the credential deleted: it has read it', async () => {
    const owner = await h.createIdentity();
    const grantee = await h.createIdentity();
    const revokedValue = h.secret(`sk_revoked_${randomUUID()}`);
    const deletedValue = h.secret(`sk_deleted_${randomUUID()}`);
    const grants: Record<string, string> = {};
    for (const [name, value] of [['revoked-key', revokedValue], ['deleted-key', deletedValue]] as const) {
      const stored = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'api_key', value } });
      expect(stored.status, stored.text).toBe(201);
      const grant = await h.api('POST', '/v1/grants', { token: owner.token, body: { credential: name, grantee: grantee.id } });
      expect(grant.status, grant.text).toBe(201);
      grants[name] = grant.body.id;
      expect((await h.api('POST', '/v1/vault.get', { token: grantee.token, body: { id: stored.body.id } })).body.value).toBe(value);
    }
    expect((await h.api('DELETE', `/v1/grants/${grants['revoked-key']}`, { token: owner.token })).status).toBe(200);
    // A soft delete revokes the credential's grants.
    expect((await h.api('DELETE', '/v1/credentials/deleted-key', { token: owner.token })).status).toBe(200);

    const to = `revoked-${randomUUID().slice(0, 8)}@example.com`;
    const queued = Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count);
    for (const value of [revokedValue, deletedValue]) {
      const refused = await h.api('POST', '/v1/mail.send', { token: grantee.token, body: { to: [to], subject: 'hi', text: `still works: ${value}` } });
      expect(refused.status, value).toBe(422);
      expect(refused.body).toMatchObject({ type: 'https://mailgent.dev/problems/secret-in-message' });
      expect(refused.text).not.toContain(value);
    }
    expect(Number((await h.sql('SELECT count(*) FROM mail_outbox')).rows[0].count)).toBe(queued);
    // A version stored after the grant was revoked was never the grantee's to read: not scanned for it
    // (a refusal would tell it that a guess was right).
    const later = h.secret(`sk_later_${randomUUID()}`);
    expect((await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name: 'revoked-key', kind: 'api_key', value: later } })).status).toBe(201);
    const readable = async () => {
      const values: string[] = [];
      for await (const page of h.services.vault.readableValues(grantee.id)) values.push(...page.map((p) => p.value));
      return values.sort();
    };
    expect(await readable()).toEqual([revokedValue, deletedValue].sort());
    // Granted again beside the revoked grant: every version is readable again, each read once, however many grants led to it.
    expect((await h.api('POST', '/v1/grants', { token: owner.token, body: { credential: 'revoked-key', grantee: grantee.id } })).status).toBe(201);
    expect(await readable()).toEqual([revokedValue, deletedValue, later].sort());
    await new Promise((r) => setTimeout(r, 500));
    expect((await readMailbox()).filter((m) => recipients(m.mail).includes(to))).toHaveLength(0);
  });

  it('an old version of a value is still a secret', async () => {
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'slack', kind: 'token', value: h.secret('xoxb-newer-token-value-123') } });
    const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: ['a@example.com'], subject: 's', text: `old one: ${secretValue}` } });
    expect(res.status).toBe(422);
  });
  it('stored values are read a page at a time: every version once, in (credential, version) order, and a scan reads on to the last page', async () => {
    const owner = await h.createIdentity();
    const stored: { id: string; version: number; name: string; value: string }[] = [];
    for (const name of ['paged-a', 'paged-b', 'paged-c']) {
      for (let v = 1; v <= (name === 'paged-b' ? 3 : 1); v++) {
        const value = h.secret(`${name}-v${v}-${randomUUID().slice(0, 8)}`);
        const res = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'token', value } });
        expect(res.status).toBe(201);
        stored.push({ id: res.body.id, version: res.body.version, name, value });
      }
    }
    const pages: string[][] = [];
    for await (const page of h.services.vault.storedValues(owner.id, undefined, 2)) pages.push(page.map((p) => p.value));
    expect(pages.map((p) => p.length)).toEqual([2, 2, 1]);
    const inOrder = [...stored].sort((a, b) => (a.id === b.id ? a.version - b.version : a.id < b.id ? -1 : 1));
    expect(pages.flat()).toEqual(inOrder.map((s) => s.value));
    // Whichever page holds a value, the scan finds it (the last one only on the third page).
    for (const { name, value } of stored) {
      expect(await findStoredValueIn({ subject: 'paged', text: `carries ${value}` }, h.services.vault.storedValues(owner.id, undefined, 2))).toBe(name);
    }
    expect(await findStoredValueIn({ subject: 'paged', text: 'carries nothing stored' }, h.services.vault.storedValues(owner.id, undefined, 2))).toBeUndefined();
    // And mail.send refuses each of them.
    for (const { value } of stored) {
      const res = await h.api('POST', '/v1/mail.send', { token: owner.token, body: { to: ['team@example.com'], subject: 'paged', text: `carries ${value}` } });
      expect(res.status).toBe(422);
    }
  });

  it('a notice about a credential is searched for that credential\'s values only; one about none, for all the identity\'s', async () => {
    const owner = await h.createIdentity();
    const stored: Record<string, { id: string; value: string }> = {};
    for (const name of ['notice-about', 'notice-other']) {
      const value = h.secret(`${name}-value-${randomUUID().slice(0, 8)}`);
      const res = await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name, kind: 'token', value } });
      stored[name] = { id: res.body.id, value };
    }
    await h.api('POST', '/v1/vault.store', { token: owner.token, body: { name: 'notice-about', kind: 'token', value: h.secret('notice-about-second-value') } });
    const asked: (string[] | undefined)[] = [];
    const deps = {
      ...h.deps,
      vault: {
        storedValues: (identityId: string, credentialIds?: string[]) => {
          asked.push(credentialIds);
          return h.deps.vault.storedValues(identityId, credentialIds);
        },
      },
    };
    const queued = async () => (await h.sql('SELECT count(*)::int AS n FROM mail_outbox WHERE identity_id = $1', [owner.id])).rows[0].n;
    const notice = (text: string, credentialId?: string) =>
      sendNotice(deps, { id: randomUUID(), identityId: owner.id, purpose: 'test.notice', to: ['owner@example.com'], subject: 'About a credential', text, actor: 'test', credentialId });

    // Its own values, old and current, in any encoding, are refused.
    for (const text of [`v1 ${stored['notice-about']!.value}`, `v2 ${Buffer.from('notice-about-second-value').toString('base64')}`]) {
      await expect(notice(text, stored['notice-about']!.id)).rejects.toMatchObject({ status: 422 });
    }
    expect(asked).toEqual([[stored['notice-about']!.id], [stored['notice-about']!.id]]);
    const names: string[] = [];
    for await (const page of h.deps.vault.storedValues(owner.id, [stored['notice-about']!.id])) names.push(...page.map((v) => v.name));
    expect(names).toEqual(['notice-about', 'notice-about']);
    // A notice about no credential is searched against every value of the identity.
    await expect(notice(`other ${stored['notice-other']!.value}`)).rejects.toMatchObject({ status: 422 });
    expect(asked.at(-1)).toBeUndefined();
    // One about several (a batch's summary) is searched against their values.
    const summary = (text: string) =>
      sendNotice(deps, { id: randomUUID(), identityId: owner.id, purpose: 'rotation.summary', to: ['team@example.com'], subject: 'Summary', text, actor: 'test', credentialIds: [stored['notice-other']!.id] });
    await expect(summary(`other ${stored['notice-other']!.value}`)).rejects.toMatchObject({ status: 422 });
    expect(asked.at(-1)).toEqual([stored['notice-other']!.id]);
    expect(await queued()).toBe(0);
    // A clean notice about the credential goes out.
    expect(await notice('Rotated to version 3.', stored['notice-about']!.id)).not.toBe('no-recipients');
    expect(await queued()).toBe(1);
    // The same notice again (a retried activity): already checked and queued, so not scanned again, and sent once.
    const id = randomUUID();
    const again = () => sendNotice(deps, { id, identityId: owner.id, purpose: 'test.notice', to: ['owner@example.com'], subject: 'Summary', text: 'Nothing secret.', actor: 'test' });
    expect(await again()).toBe('sent');
    const scans = asked.length;
    expect(await again()).toBe('already-sent');
    expect(asked.length).toBe(scans);
    expect(await queued()).toBe(2);
  });

});

describe('mail.send whose COMMIT comes after its delivery stopped waiting', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ worker: true, messageCommitWaitMs: 1_000 });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('is a 503 saying it was not sent, and is never sent: the delivery left a tombstone the late commit cannot pass', async () => {
    // The message's insert takes 3 s (a trigger for this subject): the delivery, started before it, waits 1 s.
    await h.sql(`CREATE FUNCTION mail_slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.subject = 'slow commit' THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$`);
    await h.sql('CREATE TRIGGER mail_slow_insert BEFORE INSERT ON mail_outbox FOR EACH ROW EXECUTE FUNCTION mail_slow_insert()');
    try {
      const sender = await h.createIdentity();
      const to = `late-${randomUUID().slice(0, 8)}@example.com`;
      const res = await h.api('POST', '/v1/mail.send', { token: sender.token, body: { to: [to], subject: 'slow commit', text: 'hello' } });
      // Before, a 202 for a message queued after its delivery had ended 'missing': never sent, never reported undelivered.
      expect(res.status, res.text).toBe(503);
      expect(res.body.detail).toContain('it was not sent');
      const trail = (await h.sql(`SELECT outcome, detail FROM audit_log WHERE identity_id = $1 AND action = 'mail.send'`, [sender.id])).rows;
      expect(trail).toEqual([{ outcome: 'failed', detail: expect.objectContaining({ notQueued: true, status: 503 }) }]);
      const messageId = trail[0]!.detail.messageId as string;
      expect(await h.client.workflow.getHandle(`mail:${messageId}`).result()).toBe('missing');
      expect((await h.sql('SELECT status, recipients FROM mail_outbox WHERE id = $1', [messageId])).rows).toEqual([{ status: 'abandoned', recipients: [] }]);
      await new Promise((r) => setTimeout(r, 500));
      expect(await waitForMail(to, 1, 0)).toEqual([]);
    } finally {
      await h.sql('DROP TRIGGER mail_slow_insert ON mail_outbox');
      await h.sql('DROP FUNCTION mail_slow_insert()');
    }
  });
});

describe('mail.send while SMTP is down', () => {
  let h: Harness;
  let port: number;
  let mailDir: string;

  beforeAll(async () => {
    port = await freePort();
    mailDir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-sink-'));
    h = await startHarness({ worker: true, smtpUrl: `smtp://127.0.0.1:${port}` });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
    rmSync(mailDir, { recursive: true, force: true });
  });

  // (Its backoff, the pauses between attempts, is measured by test/faults/smtp-outage.test.ts.)
  it('retries while SMTP is down and delivers the message exactly once when it is back', async () => {
    const agent = await h.createIdentity();
    const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: ['late@example.com'], subject: 'eventually', text: 'arrives once' } });
    expect(res.status).toBe(202);
    // Nobody listens on the port: the first attempt fails and is recorded.
    let failed: { attempts: number; last_error: string | null } | undefined;
    for (let i = 0; i < 150 && !failed; i++) {
      const row = (await h.sql('SELECT attempts, last_error FROM mail_outbox WHERE id = $1', [res.body.messageId])).rows[0];
      if (row.attempts > 0) failed = row;
      else await new Promise((r) => setTimeout(r, 100));
    }
    expect(failed, 'no failed attempt recorded in 15 s').toBeDefined();
    expect(failed!.last_error).toMatch(/ECONNREFUSED|connect/);
    const sink = await startSmtpSink({ mailDir, port });
    try {
      for (let i = 0; i < 150; i++) {
        const row = (await h.sql('SELECT status FROM mail_outbox WHERE id = $1', [res.body.messageId])).rows[0];
        if (row.status === 'sent') break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const row = (await h.sql('SELECT status, attempts FROM mail_outbox WHERE id = $1', [res.body.messageId])).rows[0];
      expect(row.status).toBe('sent');
      expect(row.attempts).toBeGreaterThan(1);
      expect(readdirSync(mailDir).filter((f) => f.endsWith('.eml'))).toHaveLength(1);
    } finally {
      await sink.stop();
    }
  });

});
