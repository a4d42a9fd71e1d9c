import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { SMTPServer } from 'smtp-server';
import { ApplicationFailure } from '@temporalio/common';
import { WorkflowFailedError } from '@temporalio/client';
import type { ActivityInterceptorsFactory } from '@temporalio/worker';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createActivities } from '../activities';
import { handOverNotice, UNCHECKED_NOTICE } from '../activities/notices';
import { openServices } from '../core/services';
import { Keyring } from '../vault/keyring';
import { queueNotice, sendNotice } from '../mail/notify';
import { deliverOutboxMessage, deliverQueued, giveUpMail, UNWATCHED_DELIVERY } from '../mail/outbox';
import type { Mailer } from '../mail/mailer';
import { createPool } from '../db/pool';
import { expectCleanRun } from './support/leaks';
import { TcpProxy } from './support/tcp-proxy';
import { startHarness, type Harness } from './support/harness';
import { waitFor } from './support/lifecycle-fixtures';

/**
 * A real SMTP conversation in which the server refuses one recipient (550 at RCPT TO) and accepts
 * the others. The message reaches the accepted ones once: it is marked sent, never resent, and the
 * refused addresses are recorded where a user looks (the outbox row, the audit log, the delivery
 * workflow's result). A message every recipient refuses stays undelivered and is retried.
 */

interface Received {
  messageId: string;
  rcptTo: string[];
}

/**
 * An SMTP server that refuses every address starting with `typo`, defers (451, greylisting) every one
 * starting with `grey` while `greylisting` is on, and keeps what it accepted.
 */
async function startPickyServer() {
  const received: Received[] = [];
  const state = { greylisting: true };
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    logger: false,
    onRcptTo(address, _session, callback) {
      if (address.address.startsWith('typo')) {
        return callback(Object.assign(new Error(`5.1.1 <${address.address}>: mailbox unavailable`), { responseCode: 550 }));
      }
      if (address.address.startsWith('grey') && state.greylisting) {
        return callback(Object.assign(new Error(`4.7.1 <${address.address}>: greylisted, try again later`), { responseCode: 451 }));
      }
      callback();
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const raw = Buffer.concat(chunks).toString('utf8');
        received.push({ messageId: /^Message-ID:\s*(\S+)/im.exec(raw)?.[1] ?? '', rcptTo: session.envelope.rcptTo.map((a) => a.address) });
        callback();
      });
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.server.address() as AddressInfo;
  return { url: `smtp://127.0.0.1:${port}`, received, state, stop: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

describe('mail with a recipient the SMTP server refuses', () => {
  let h: Harness;
  let smtp: Awaited<ReturnType<typeof startPickyServer>>;
  let agent: { id: string; token: string };
  const unique = (prefix: string) => `${prefix}-${randomUUID().slice(0, 8)}@example.com`;
  const outboxRow = async (id: string) =>
    (await h.sql('SELECT status, attempts, refused, last_error FROM mail_outbox WHERE id = $1', [id])).rows[0] as {
      status: string;
      attempts: number;
      refused: string[];
      last_error: string | null;
    };
  /** A message to one address the server refuses, once its first delivery attempt has been made: the address and the message id. */
  const refusedOnce = async (subject: string) => {
    const typo = unique('typo');
    const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: [typo], subject, text: 'hello?' } });
    expect(res.status).toBe(202);
    const id = res.body.messageId as string;
    await waitFor('a first delivery attempt', () => outboxRow(id), (r) => r.attempts >= 1, { timeoutMs: 20_000 });
    return { typo, id };
  };
  const deliveriesOf = (id: string) => smtp.received.filter((m) => m.messageId === `<${id}@mailgent>`);

  /** Messages whose delivery has, as far as the worker is told, spent its day of retries: the next attempt fails for good. */
  const spent = new Set<string>();
  const activityInterceptors: ActivityInterceptorsFactory[] = [
    (ctx) => ({
      inbound: {
        async execute(input, next) {
          const messageId = (input.args[0] as { messageId?: string } | undefined)?.messageId;
          if (ctx.info.activityType === 'deliverMail' && messageId && spent.has(messageId)) {
            throw ApplicationFailure.nonRetryable('its day of retries is spent (the test says so)', 'RetriesSpent');
          }
          return next(input);
        },
      },
    }),
  ];

  beforeAll(async () => {
    smtp = await startPickyServer();
    h = await startHarness({ worker: true, smtpUrl: smtp.url, activityInterceptors });
    agent = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'api', kind: 'api_key', value: h.secret(`sk_${randomUUID()}`) } });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
    await smtp.stop();
  });

  it('mail.send: delivered once to the accepted recipients, marked sent, the refused one recorded in the outbox, the audit log and the workflow result', async () => {
    const [owner, other, typo] = [unique('owner'), unique('other'), unique('typo')];
    const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: [owner, typo, other], subject: 'Deploy finished', text: 'Release 43 is live.' } });
    expect(res.status).toBe(202);
    const id = res.body.messageId as string;

    // The workflow finishes (before the fix its activity failed and was retried for 24 h).
    const result = await Promise.race([
      h.client.workflow.getHandle(`mail:${id}`).result(),
      new Promise((resolve) => setTimeout(() => resolve('still retrying after 15 s'), 15_000)),
    ]);
    expect(result).toBe(`sent; refused by the SMTP server: ${typo}`);
    const row = await outboxRow(id);
    expect(row).toMatchObject({ status: 'sent', attempts: 1, refused: [typo] });
    expect(row.last_error).toContain(typo);
    expect(row.last_error).toContain('550');
    expect(deliveriesOf(id)).toEqual([{ messageId: `<${id}@mailgent>`, rcptTo: [owner, other] }]);

    // Where the sender looks: its own audit log names the refused address and the message.
    const audit = await h.api('GET', '/v1/audit', { token: agent.token });
    const refusedRows = audit.body.items.filter((e: { action: string }) => e.action === 'mail.recipients_refused');
    expect(refusedRows).toHaveLength(1);
    expect(refusedRows[0]).toMatchObject({
      outcome: 'failed',
      identityId: agent.id,
      detail: { messageId: id, purpose: 'mail.send', delivered: 2, refused: [{ address: typo, reply: expect.stringContaining('550') }] },
    });

    // Nothing is resent: a later delivery attempt (a retried activity) finds the message sent.
    expect(await deliverQueued(h.deps.pool, h.deps.mailer, id)).toBe('already-sent');
    await new Promise((r) => setTimeout(r, 3_000));
    expect(deliveriesOf(id)).toHaveLength(1);
    expect((await outboxRow(id)).attempts).toBe(1);
  });

  it('a recipient the server defers (4xx: greylisting) is sent the message again later, the ones it reached are not; after its day, the rest are recorded refused', async () => {
    const [owner, grey, typo] = [unique('owner'), unique('grey'), unique('typo')];
    smtp.state.greylisting = true;
    try {
      const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: [owner, grey, typo], subject: 'Greylisted', text: 'Release 44 is live.' } });
      expect(res.status).toBe(202);
      const id = res.body.messageId as string;
      // Before, the message was marked sent at once: the deferred recipient never got it.
      const row = await waitFor('the first attempt', () => outboxRow(id), (r) => r.attempts >= 1, { timeoutMs: 20_000 });
      expect(row).toMatchObject({ status: 'queued', refused: [typo] });
      expect(row.last_error).toContain(`deferred by the SMTP server: ${grey} (451`);
      expect((await h.sql('SELECT delivered FROM mail_outbox WHERE id = $1', [id])).rows[0].delivered).toEqual([owner]);
      // The server stops deferring: a retry sends it to the deferred recipient alone.
      smtp.state.greylisting = false;
      expect(await h.client.workflow.getHandle(`mail:${id}`).result()).toBe(`sent; refused by the SMTP server: ${typo}`);
      expect(deliveriesOf(id)).toEqual([
        { messageId: `<${id}@mailgent>`, rcptTo: [owner] },
        { messageId: `<${id}@mailgent>`, rcptTo: [grey] },
      ]);
      expect(await outboxRow(id)).toMatchObject({ status: 'sent', refused: [typo], last_error: expect.not.stringContaining('deferred') });
      const audited = await h.sql("SELECT detail FROM audit_log WHERE action = 'mail.recipients_refused' AND detail->>'messageId' = $1", [id]);
      expect(audited.rows.map((r) => r.detail.refused.map((x: { address: string }) => x.address))).toEqual([[typo]]);

      // Deferred for its whole day: the message is sent (it reached the owner), the deferred one recorded refused and audited.
      smtp.state.greylisting = true;
      const notice = { id: randomUUID(), identityId: agent.id, purpose: 'rotation.notice', to: [owner, grey], subject: '[mailgent] Rotated api', text: 'Version 4 is now current.', actor: 'test' };
      await queueNotice(h.deps, notice);
      await expect(deliverQueued(h.deps.pool, h.deps.mailer, notice.id, UNWATCHED_DELIVERY)).rejects.toThrow(`the SMTP server deferred ${grey} (451`);
      await expect(deliverQueued(h.deps.pool, h.deps.mailer, notice.id, UNWATCHED_DELIVERY)).rejects.toThrow(/it has reached 1 of 2/);
      expect(deliveriesOf(notice.id)).toEqual([{ messageId: `<${notice.id}@mailgent>`, rcptTo: [owner] }]);
      expect(await giveUpMail(h.deps.pool, notice.id, 'its day of retries is spent')).toBe(true);
      expect(await outboxRow(notice.id)).toMatchObject({ status: 'sent', refused: [grey] });
      const given = await h.sql("SELECT detail FROM audit_log WHERE action = 'mail.recipients_refused' AND detail->>'messageId' = $1", [notice.id]);
      expect(given.rows).toEqual([{ detail: expect.objectContaining({ delivered: 1, refused: [{ address: grey }], error: expect.stringContaining('451') }) }]);
      expect(await deliverQueued(h.deps.pool, h.deps.mailer, notice.id)).toBe('already-sent');
    } finally {
      smtp.state.greylisting = true;
    }
  });

  it('a notice (as a rotation sends it, delivered inline) with a refused recipient is sent once, not failed', async () => {
    const [owner, typo] = [unique('owner'), unique('typo')];
    const notice = { id: randomUUID(), identityId: agent.id, purpose: 'rotation.notice', to: [owner, typo], subject: '[mailgent] Rotated api', text: 'Version 2 is now current.', actor: 'test' };
    expect(await sendNotice(h.deps, notice)).toBe('sent');
    expect(await sendNotice(h.deps, notice)).toBe('already-sent');
    expect(deliveriesOf(notice.id)).toEqual([{ messageId: `<${notice.id}@mailgent>`, rcptTo: [owner] }]);
    expect(await outboxRow(notice.id)).toMatchObject({ status: 'sent', attempts: 1, refused: [typo] });
    const audited = await h.sql("SELECT detail FROM audit_log WHERE action = 'mail.recipients_refused' AND detail->>'messageId' = $1", [notice.id]);
    expect(audited.rows.map((r) => r.detail.refused.map((x: { address: string }) => x.address))).toEqual([[typo]]);
  });

  it('a scheduled notice queued by an attempt that died before starting its delivery is delivered by the retry (which does not count it as its own)', async () => {
    const owner = unique('owner');
    const notice = { id: randomUUID(), identityId: agent.id, purpose: 'expiry.reminder', to: [owner], subject: '[mailgent] api expires in 7 days', text: 'Replace it.', actor: 'test' };
    // The first attempt queued it and died: no delivery was started.
    expect(await queueNotice(h.deps, notice)).toBe('queued');
    expect(await handOverNotice(h.deps, notice)).toBe(false);
    expect(await h.client.workflow.getHandle(`mail:${notice.id}`).result()).toBe('sent');
    expect(deliveriesOf(notice.id)).toEqual([{ messageId: `<${notice.id}@mailgent>`, rcptTo: [owner] }]);
    expect(await handOverNotice(h.deps, notice)).toBe(false);
    // A notice handed over by this call counts; one with no one to tell does not.
    expect(await handOverNotice(h.deps, { ...notice, id: randomUUID() })).toBe(true);
    expect(await handOverNotice(h.deps, { ...notice, id: randomUUID(), to: [] })).toBe(false);
  });

  it('a scheduled notice whose identity\'s key fails its integrity check is skipped and audited once, not retried (it would hold every sweep)', async () => {
    const broken = await h.createIdentity(`broken-${randomUUID().slice(0, 8)}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: broken.token, body: { name: 'k', kind: 'api_key', value: h.secret(`sk_broken_${randomUUID()}`) } });
    expect(stored.status, stored.text).toBe(201);
    const flip = () => h.sql('UPDATE data_keys SET wrapped = set_byte(wrapped, 15, get_byte(wrapped, 15) # 1) WHERE identity_id = $1', [broken.id]);
    await flip();
    // A process that has not unwrapped the key before (the worker's cache would hide the damage).
    const fresh = openServices({ databaseUrl: h.databaseUrl, poolSize: 2, keyring: Keyring.fromSetting(h.keyringFile), smtpUrl: 'smtp://unused', mailFrom: 'x@localhost' });
    try {
      const deps = { ...h.deps, vault: fresh.vault };
      const notice = { id: randomUUID(), identityId: broken.id, purpose: 'password.reminder', to: [unique('owner')], subject: '[mailgent] k is overdue', text: 'Change it.', actor: 'test' };
      // Before, the key's error escaped the activity, which its sweep retries without end.
      expect(await handOverNotice(deps, notice)).toBe(false);
      expect(await outboxRow(notice.id)).toMatchObject({ status: 'abandoned', last_error: UNCHECKED_NOTICE });
      expect(await handOverNotice(deps, notice)).toBe(false);
      const audited = await h.sql("SELECT outcome, detail FROM audit_log WHERE action = 'mail.send' AND detail->>'messageId' = $1", [notice.id]);
      expect(audited.rows).toEqual([{ outcome: 'rejected', detail: expect.objectContaining({ error: 'key-failed', purpose: 'password.reminder' }) }]);
      // No key id in the outbox or the audit row (the worker's log has it).
      const dataKeyId = (await h.sql('SELECT id FROM data_keys WHERE identity_id = $1', [broken.id])).rows[0].id as string;
      expect(JSON.stringify([await outboxRow(notice.id), audited.rows])).not.toContain(dataKeyId);
    } finally {
      await flip();
      await fresh.close();
    }
  });

  it("a scheduled notice whose scan meets a damaged ciphertext (one version failing its check) is skipped and audited once, not retried (it held every sweep)", async () => {
    const damaged = await h.createIdentity(`damaged-${randomUUID().slice(0, 8)}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: damaged.token, body: { name: 'k', kind: 'api_key', value: h.secret(`sk_damaged_${randomUUID()}`) } });
    expect(stored.status, stored.text).toBe(201);
    const flip = () => h.sql('UPDATE secret_versions SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1) WHERE credential_id = $1', [stored.body.id]);
    await flip();
    try {
      const notice = { id: randomUUID(), identityId: damaged.id, purpose: 'password.reminder', to: [unique('owner')], subject: '[mailgent] k is overdue', text: 'Change it.', actor: 'test' };
      // Before, the IntegrityError escaped: the sweep's activity failed and was retried (for good, under password policies).
      expect(await handOverNotice(h.deps, notice, [damaged.id])).toBe(false);
      expect(await outboxRow(notice.id)).toMatchObject({ status: 'abandoned', last_error: UNCHECKED_NOTICE });
      expect(await handOverNotice(h.deps, notice, [damaged.id])).toBe(false);
      const audited = await h.sql("SELECT outcome, detail FROM audit_log WHERE action = 'mail.send' AND detail->>'messageId' = $1", [notice.id]);
      expect(audited.rows).toEqual([{ outcome: 'rejected', detail: expect.objectContaining({ error: 'integrity-failed', purpose: 'password.reminder' }) }]);
    } finally {
      await flip();
    }
  });

  it('two delivery attempts that overlap (a retry while the first still talks to the server) send the message once', async () => {
    const to = unique('overlap');
    const notice = { id: randomUUID(), identityId: agent.id, purpose: 'rotation.notice', to: [to], subject: '[mailgent] Rotated api', text: 'Version 3 is now current.', actor: 'test' };
    // Queued, not yet delivered: as a notice is before its delivery attempt.
    await h.sql(`INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body) VALUES ($1, $2, $3, $4, $5, $6)`, [
      notice.id, agent.id, notice.purpose, notice.to, notice.subject, notice.text,
    ]);
    const attempts = await Promise.allSettled([deliverQueued(h.deps.pool, h.deps.mailer, notice.id), deliverQueued(h.deps.pool, h.deps.mailer, notice.id)]);
    // Before, both found the message queued and both sent it. The one that found it claimed waits for
    // the claim (a live attempt's: not for it to lapse, 15 s, but for the message to be sent).
    expect(deliveriesOf(notice.id)).toHaveLength(1);
    expect(attempts.map((a) => (a.status === 'fulfilled' ? a.value : a.reason.message)).sort()).toEqual(['already-sent', 'sent']);
    // A retry after them finds it sent.
    expect(await deliverQueued(h.deps.pool, h.deps.mailer, notice.id)).toBe('already-sent');
    expect(await outboxRow(notice.id)).toMatchObject({ status: 'sent', attempts: 1 });
  });

  it('a message the server accepted while the database went away is marked sent once it is back, not sent again by the retry', async () => {
    const id = randomUUID();
    const to = unique('outage');
    await h.sql(`INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body) VALUES ($1, $2, 'test', $3, 's', 't')`, [id, agent.id, [to]]);
    const db = new URL(h.databaseUrl);
    const proxy = await new TcpProxy({ host: db.hostname, port: Number(db.port) }).start();
    db.host = proxy.address;
    const pool = createPool(db.toString(), 2);
    try {
      // The database goes away just as the server accepts the message, for 2 s.
      const accepting: Mailer = {
        ...h.deps.mailer,
        send: async (mail) => {
          const report = await h.deps.mailer.send(mail);
          await proxy.down();
          setTimeout(() => void proxy.up(), 2_000);
          return report;
        },
      };
      const lease = { seconds: 8, renewMs: 200 };
      // Before, the attempt failed here with the message left queued: its retry sent it again once the claim lapsed.
      expect(await deliverOutboxMessage(pool, accepting, id, { lease })).toEqual({ result: 'sent', refused: [] });
      expect(deliveriesOf(id)).toEqual([{ messageId: `<${id}@mailgent>`, rcptTo: [to] }]);
      expect(await outboxRow(id)).toMatchObject({ status: 'sent', attempts: 1 });
      expect((await deliverOutboxMessage(h.deps.pool, h.deps.mailer, id, { lease })).result).toBe('already-sent');
    } finally {
      await pool.end();
      await proxy.stop();
    }
  });

  it('an attempt that outlasts its claim keeps renewing it: a retry meanwhile still does not send', async () => {
    const id = randomUUID();
    await h.sql(`INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body) VALUES ($1, $2, 'test', $3, 's', 't')`, [id, agent.id, [unique('slow')]]);
    // A claim of 3 s renewed every 200 ms (15 s and 3 s in production: a renewal misses only past a
    // 2.8 s stall), and an attempt whose relay takes 8 s before the real SMTP conversation. The retry
    // waits for the claim it found to lapse (~3 s), sees it renewed, and gives up, long before the
    // slow attempt has sent.
    const lease = { seconds: 3, renewMs: 200 };
    const slow: Mailer = { ...h.deps.mailer, send: async (mail) => (await new Promise((r) => setTimeout(r, 8_000)), h.deps.mailer.send(mail)) };
    const first = deliverOutboxMessage(h.deps.pool, slow, id, { lease });
    await new Promise((r) => setTimeout(r, 1_500));
    await expect(deliverOutboxMessage(h.deps.pool, h.deps.mailer, id, { lease })).rejects.toThrow(/being sent by another delivery attempt/);
    expect((await first).result).toBe('sent');
    expect(deliveriesOf(id)).toHaveLength(1);
  });

  it("a retry that finds a dead attempt's claim waits for it to lapse, then sends once", async () => {
    const id = randomUUID();
    const to = unique('orphaned');
    // An attempt claimed the message and died with its worker: nothing renews its claim.
    await h.sql(
      `INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body, lease_until) VALUES ($1, $2, 'test', $3, 's', 't', now() + interval '1.5 seconds')`,
      [id, agent.id, [to]],
    );
    // Before, the retry failed at once ("being sent by another delivery attempt") and waited out a backoff.
    expect(await deliverOutboxMessage(h.deps.pool, h.deps.mailer, id, { lease: { seconds: 2, renewMs: 200 } })).toEqual({ result: 'sent', refused: [] });
    expect(deliveriesOf(id)).toEqual([{ messageId: `<${id}@mailgent>`, rcptTo: [to] }]);
    expect(await outboxRow(id)).toMatchObject({ status: 'sent', attempts: 1 });
  });

  it('an attempt scheduled without a heartbeat timeout does not wait for a claim it finds: its own claim outlasts its start-to-close', async () => {
    const id = randomUUID();
    await h.sql(
      `INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body, lease_until) VALUES ($1, $2, 'test', $3, 's', 't', now() + interval '1 second')`,
      [id, agent.id, [unique('unwatched')]],
    );
    const started = Date.now();
    await expect(deliverOutboxMessage(h.deps.pool, h.deps.mailer, id, UNWATCHED_DELIVERY)).rejects.toThrow(/being sent by another delivery attempt/);
    expect(Date.now() - started).toBeLessThan(900);
    expect(deliveriesOf(id)).toEqual([]);
  });

  it('an attempt cancelled before it sent (a worker shutting down) sends nothing and gives its claim back', async () => {
    const id = randomUUID();
    await h.sql(`INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body) VALUES ($1, $2, 'test', $3, 's', 't')`, [id, agent.id, [unique('cancelled')]]);
    const shutdown = new AbortController();
    shutdown.abort(new Error('worker shutting down'));
    // Before, the cancellation was not looked at: the attempt sent the message, and with the worker's
    // pool closed under it could not mark it sent, so another worker's retry sent it again.
    await expect(deliverOutboxMessage(h.deps.pool, h.deps.mailer, id, { signal: shutdown.signal })).rejects.toThrow('worker shutting down');
    expect(deliveriesOf(id)).toEqual([]);
    expect(await outboxRow(id)).toMatchObject({ status: 'queued', attempts: 0 });
    expect((await h.sql('SELECT lease_until FROM mail_outbox WHERE id = $1', [id])).rows[0].lease_until).toBeNull();
    expect(await deliverQueued(h.deps.pool, h.deps.mailer, id)).toBe('sent');
  });

  it('a failed attempt gives its claim back: the next one sends at once', async () => {
    const id = randomUUID();
    await h.sql(`INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body) VALUES ($1, $2, 'test', $3, 's', 't')`, [id, agent.id, [unique('typo')]]);
    await expect(deliverQueued(h.deps.pool, h.deps.mailer, id)).rejects.toThrow(/every recipient/);
    expect((await h.sql('SELECT lease_until FROM mail_outbox WHERE id = $1', [id])).rows[0].lease_until).toBeNull();
    await expect(deliverQueued(h.deps.pool, h.deps.mailer, id)).rejects.toThrow(/every recipient/);
    expect(await outboxRow(id)).toMatchObject({ status: 'queued', attempts: 2 });
  });

  it('a sweep whose reminder every recipient refuses still finishes: the reminder waits in a delivery of its own', async () => {
    const owner = unique('typo');
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name: `expiring-${randomUUID().slice(0, 8)}`, kind: 'token', value: h.secret(`tok_${randomUUID()}`), owners: [owner], expiresAt: new Date(Date.now() + 2 * 86_400_000).toISOString() },
    });
    expect(stored.status, stored.text).toBe(201);
    const sweepActivities = createActivities(h.deps);
    const sweep = await h.client.workflow.start('rotationSweep', { taskQueue: h.taskQueue, workflowId: `sweep-refused-${randomUUID()}`, args: [{}] });
    let messageId: string | undefined;
    try {
      // Before, the sweep delivered the reminder itself and retried it for a day: nothing after it ran.
      let timer: NodeJS.Timeout | undefined;
      const outcome = await Promise.race([sweep.result(), new Promise((resolve) => (timer = setTimeout(() => resolve('still running after 30 s'), 30_000)))]);
      clearTimeout(timer);
      expect(outcome).toMatchObject({ total: 0 });
      messageId = (await h.sql("SELECT id FROM mail_outbox WHERE purpose = 'expiry.reminder' AND $1 = ANY(recipients)", [owner])).rows[0]?.id;
      expect(messageId).toBeDefined();
      const row = await waitFor('a delivery attempt', () => outboxRow(messageId!), (r) => r.attempts >= 1, { timeoutMs: 20_000 });
      expect(row).toMatchObject({ status: 'queued', refused: [] });
      expect(row.last_error).toMatch(/every recipient/);
      expect((await h.client.workflow.getHandle(`mail:${messageId}`).describe()).status.name).toBe('RUNNING');
      // The next sweep finds the reminder still queued: it is not handed over, nor counted, again.
      const again = await sweepActivities.sendExpiryReminders({ asOf: new Date().toISOString() });
      expect(again).toEqual({ sent: 0 });
      const reminder = { id: messageId!, identityId: agent.id, purpose: 'test', to: [owner], subject: 's', text: 't', actor: 'test' };
      expect(await handOverNotice(h.deps, reminder)).toBe(false);
    } finally {
      await sweep.terminate('test over').catch(() => undefined);
      if (messageId) await h.client.workflow.getHandle(`mail:${messageId}`).terminate('test over: every recipient is refused');
    }
  });

  it('every recipient refused: not sent, the refusal recorded, and delivery retried (it stays a failure)', async () => {
    const typo = unique('typo');
    const res = await h.api('POST', '/v1/mail.send', { token: agent.token, body: { to: [typo], subject: 'Nobody home', text: 'hello?' } });
    expect(res.status).toBe(202);
    const id = res.body.messageId as string;
    try {
      const row = await waitFor('a second delivery attempt', () => outboxRow(id), (r) => r.attempts >= 2, { timeoutMs: 20_000 });
      expect(row).toMatchObject({ status: 'queued', refused: [] });
      expect(row.last_error).toContain(typo);
      expect(row.last_error).toMatch(/every recipient/);
      expect(deliveriesOf(id)).toEqual([]);
      expect((await h.sql("SELECT count(*)::int AS n FROM audit_log WHERE action = 'mail.recipients_refused' AND detail->>'messageId' = $1", [id])).rows[0].n).toBe(0);
    } finally {
      await h.client.workflow.getHandle(`mail:${id}`).terminate('test over: every recipient is refused');
    }
  });

  it('a message its delivery gives up on is marked abandoned, and its sender is told in the audit log', async () => {
    const { id } = await refusedOnce('Still nobody home');
    spent.add(id);
    await expect(h.client.workflow.getHandle(`mail:${id}`).result()).rejects.toBeInstanceOf(WorkflowFailedError);
    // Before, it stayed queued for good, and the sender's only row was mail.send's ok.
    const row = await outboxRow(id);
    expect(row.status).toBe('abandoned');
    expect(row.last_error).toMatch(/every recipient/);
    const audited = await h.sql("SELECT identity_id, outcome, detail FROM audit_log WHERE action = 'mail.undelivered' AND detail->>'messageId' = $1", [id]);
    expect(audited.rows).toEqual([
      { identity_id: agent.id, outcome: 'failed', detail: { messageId: id, purpose: 'mail.send', attempts: row.attempts, error: row.last_error } },
    ]);
    expect(deliveriesOf(id)).toEqual([]);
  });

  it('a delivery out of time whose message an attempt sent after all ends as sent, not failed, and nothing is abandoned', async () => {
    const { typo, id } = await refusedOnce('Sent at the last');
    // The attempt that ran out the day had got it out (the server took it as the time ran out), and
    // marked it sent while the give-up waited for its claim; the next attempt is told the day is spent.
    await h.sql(`UPDATE mail_outbox SET status = 'sent', sent_at = now(), lease_until = NULL, refused = $2 WHERE id = $1`, [id, [typo]]);
    spent.add(id);
    // Before, the run failed with the last error though the message was sent. (Its refused recipients named, as a delivery's result names them.)
    expect(await h.client.workflow.getHandle(`mail:${id}`).result()).toBe(`already-sent; refused by the SMTP server: ${typo}`);
    expect((await outboxRow(id)).status).toBe('sent');
    expect((await h.sql("SELECT count(*)::int AS n FROM audit_log WHERE action = 'mail.undelivered' AND detail->>'messageId' = $1", [id])).rows[0].n).toBe(0);
  });

  it('a message an attempt still holds is not given up until that attempt lets go: it may yet be sent', async () => {
    const id = randomUUID();
    await h.sql(
      `INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body, attempts, lease_until)
       VALUES ($1, $2, 'mail.send', $3, 'held', 'held', 3, now() + interval '1 minute')`,
      [id, agent.id, [unique('held')]],
    );
    // Before, it was marked abandoned (and mail.undelivered written) under the attempt still talking to the server.
    await expect(giveUpMail(h.deps.pool, id, 'timed out')).rejects.toThrow(/still held by a delivery attempt/);
    expect((await outboxRow(id)).status).toBe('queued');
    expect((await h.sql("SELECT count(*)::int AS n FROM audit_log WHERE action = 'mail.undelivered' AND detail->>'messageId' = $1", [id])).rows[0].n).toBe(0);
    // The attempt sent it: nothing to give up.
    await h.sql(`UPDATE mail_outbox SET status = 'sent', sent_at = now(), lease_until = NULL WHERE id = $1`, [id]);
    expect(await giveUpMail(h.deps.pool, id, 'timed out')).toBe(false);
    expect((await outboxRow(id)).status).toBe('sent');
    // One whose claim lapsed (a dead attempt) is given up.
    const lapsed = randomUUID();
    await h.sql(
      `INSERT INTO mail_outbox (id, identity_id, purpose, recipients, subject, text_body, attempts, lease_until)
       VALUES ($1, $2, 'mail.send', $3, 'lapsed', 'lapsed', 3, now() - interval '1 second')`,
      [lapsed, agent.id, [unique('lapsed')]],
    );
    expect(await giveUpMail(h.deps.pool, lapsed, 'timed out')).toBe(true);
    expect(await outboxRow(lapsed)).toMatchObject({ status: 'abandoned', last_error: 'undelivered: timed out' });
  });
});
