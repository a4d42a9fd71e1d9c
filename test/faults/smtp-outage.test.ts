import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startSmtpSink, type SmtpSink } from '../../embedded/smtp-sink';
import { progressQuery } from '../../workflows/definitions';
import { startHarness, type Harness } from '../support/harness';
import { expectCleanRun } from '../support/leaks';
import { readMailbox, recipients } from '../support/mail';
import { expectSettled, faultRow } from './checks';
import { rotatingKey, until, type RotatingKey } from './fixtures';

const OUTAGE_MS = 30_000;

/**
 * The SMTP server is down for 30 s when a rotation's notice is due. The notice waits in the outbox,
 * its delivery retried with growing pauses, and arrives exactly once (one Message-ID) when the
 * server is back on the same port. A sink of this file's own: the shared one serves other files.
 */
describe('fault: SMTP down for 30 s', () => {
  const mailDir = path.join(inject('tmpDir'), `smtp-outage-${randomBytes(3).toString('hex')}`);
  let sink: SmtpSink | undefined;
  let h: Harness;
  let key: RotatingKey | undefined;

  beforeAll(async () => {
    sink = await startSmtpSink({ mailDir });
    h = await startHarness({ worker: true, smtpUrl: sink.url });
  });
  afterAll(async () => {
    await key?.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    for (const m of await readMailbox(mailDir)) for (const s of h.secrets) expect(m.raw).not.toContain(s);
    await h.close();
    await sink?.stop();
  });

  it('the notice is retried with backoff and delivered once when the server is back; the rotation does not wait for it', { timeout: 150_000 }, async ({ task }) => {
    const row = faultRow(task, 'SMTP down 30 s when the notice is due');
    const agent = await h.createIdentity();
    key = await rotatingKey(h, agent, { label: 'smtp-outage' });
    const port = sink!.port;
    await sink!.stop();
    sink = undefined;
    const downAt = Date.now();
    const workflowId = await key.rotate();

    // Watch the outbox row: each failed delivery adds an attempt; note when.
    const attempts: number[] = [];
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        const { rows } = await h.sql('SELECT attempts FROM mail_outbox WHERE $1 = ANY(recipients)', [key!.owner]);
        const n = rows[0]?.attempts ?? 0;
        while (attempts.length < n) attempts.push(Date.now());
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    await new Promise((r) => setTimeout(r, downAt + OUTAGE_MS - Date.now()));
    sink = await startSmtpSink({ mailDir, port });
    const upAt = Date.now();

    // The rotation did not wait for the server: its notice went on in a delivery of its own.
    const ended = (await h.client.workflow.getHandle(workflowId).describe()).closeTime;
    expect(ended?.getTime()).toBeLessThan(upAt);
    const deliveredAt = await until('the notice delivered', async () => {
      const { rows } = await h.sql('SELECT status FROM mail_outbox WHERE $1 = ANY(recipients)', [key!.owner]);
      return rows[0]?.status === 'sent' && Date.now();
    }, 90_000);
    await expectSettled(h, key.expected(workflowId, 'rotated', { mailDir }));
    watching = false;
    await watcher;

    const outbox = (await h.sql('SELECT id, status, attempts, last_error FROM mail_outbox WHERE $1 = ANY(recipients)', [key.owner])).rows;
    expect(outbox).toHaveLength(1);
    expect(outbox[0]).toMatchObject({ status: 'sent', last_error: null });
    // Failed attempts during the outage, then the one that got through; the pauses grow.
    expect(outbox[0].attempts).toBeGreaterThanOrEqual(4);
    const failed = attempts.slice(0, outbox[0].attempts - 1);
    const pauses = failed.slice(1).map((t, i) => t - failed[i]!);
    expect(pauses.length).toBeGreaterThanOrEqual(2);
    for (let i = 1; i < pauses.length; i++) expect(pauses[i]!).toBeGreaterThan(pauses[i - 1]! * 1.4);
    // Delivered once, under the outbox id as its Message-ID (a resend would carry the same one).
    const mails = (await readMailbox(mailDir)).filter((m) => recipients(m.mail).includes(key!.owner));
    expect(mails.map((m) => m.mail.messageId)).toEqual([`<${outbox[0].id}@mailgent>`]);

    row.outcome = 'finished';
    row['delivery attempts'] = outbox[0].attempts;
    row['pauses between failures'] = pauses.map((p) => `${(p / 1000).toFixed(1)}`).join(', ') + ' s';
    row['up → delivered'] = `${((deliveredAt - upAt) / 1000).toFixed(1)} s`;
    row['rotation ended'] = `${((ended!.getTime() - downAt) / 1000).toFixed(1)} s after the server went down`;
  });

  it('a leak reported while the grace notice waits for the server revokes the previous version at once', { timeout: 150_000 }, async ({ task }) => {
    const row = faultRow(task, 'SMTP down when the grace notice is due; a leak reported meanwhile');
    const agent = await h.createIdentity();
    const graced = await rotatingKey(h, agent, { label: 'grace-notice', graceHours: 1 });
    try {
      const port = sink!.port;
      await sink!.stop();
      sink = undefined;
      const workflowId = await graced.rotate();
      // Promoted, and its grace notice failing at the server.
      await until('the grace notice to fail once', async () => {
        const { rows } = await h.sql('SELECT attempts FROM mail_outbox WHERE $1 = ANY(recipients)', [graced.owner]);
        return rows[0]?.attempts >= 1;
      });
      expect((await graced.readCurrent()).version).toBe(2);
      expect(graced.provider.revokes).toBe(graced.before.revokes);

      const reported = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: graced.id, version: 1, source: 'fault-suite' } });
      expect(reported.status, reported.text).toBe(202);
      const at = Date.now();
      // Before, the run read the leak only once the grace notice was out: the server down, the
      // leaked value kept working as long as it was (a day of retries at most).
      await until('version 1 revoked at the provider', () => graced.provider.revokes > graced.before.revokes, 30_000);
      const revokedIn = Date.now() - at;
      // The vault records the revoke once the provider has answered it.
      const revoked = await until('version 1 recorded revoked', async () => {
        const { rows } = await h.sql('SELECT version FROM secret_versions WHERE credential_id = $1 AND revoked_at IS NOT NULL', [graced.id]);
        return rows.length > 0 && rows;
      }, 10_000);
      expect(revoked).toEqual([{ version: 1 }]);

      sink = await startSmtpSink({ mailDir, port });
      const done = await h.client.workflow.getHandle(workflowId).result();
      expect(done).toMatchObject({ state: 'succeeded', leakReported: true });
      // Every notice (the grace notice, the incident alert, the notice that v1 is revoked) sent, each once.
      // (The incident alert is the leak report's own delivery, retried on its own schedule.)
      const outbox = await until('every notice to the owner sent', async () => {
        const { rows } = await h.sql('SELECT id, status FROM mail_outbox WHERE $1 = ANY(recipients)', [graced.owner]);
        return rows.every((m) => m.status === 'sent') && rows;
      }, 60_000);
      expect(outbox).toHaveLength(3);
      const mails = (await readMailbox(mailDir)).filter((m) => recipients(m.mail).includes(graced.owner));
      expect(mails.map((m) => m.mail.messageId).sort()).toEqual(outbox.map((m) => `<${m.id}@mailgent>`).sort());
      row.outcome = 'revoked at once';
      row['leak → revoked'] = `${(revokedIn / 1000).toFixed(1)} s (server still down)`;
    } finally {
      await graced.stop();
    }
  });

  it('a leak of the value the rotation just made, reported while the server is down, rotates it again at once', { timeout: 150_000 }, async ({ task }) => {
    const row = faultRow(task, 'SMTP down; the new value reported leaked in grace');
    const agent = await h.createIdentity();
    const graced = await rotatingKey(h, agent, { label: 'leak-new', graceHours: 1 });
    try {
      const port = sink!.port;
      await sink!.stop();
      sink = undefined;
      const workflowId = await graced.rotate();
      await until('the grace period', async () => {
        const progress = await h.client.workflow.getHandle(workflowId).query(progressQuery).catch(() => undefined); // not started yet
        return progress?.state === 'grace';
      });
      expect((await graced.readCurrent()).version).toBe(2);

      // By name: the current version, the one this rotation made.
      const reported = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: graced.id, source: 'fault-suite' } });
      expect(reported.status, reported.text).toBe(202);
      const at = Date.now();
      // Before, the run rotated it again only once its notices were out: the server down, the leaked value kept working.
      const revoked = await until('versions 1 and 2 revoked, version 3 current', async () => {
        const { rows } = await h.sql('SELECT version FROM secret_versions WHERE credential_id = $1 AND revoked_at IS NOT NULL ORDER BY version', [graced.id]);
        const current = (await h.sql('SELECT current_version FROM credentials WHERE id = $1', [graced.id])).rows[0].current_version;
        return rows.length === 2 && current === 3 && rows;
      }, 30_000);
      const rotatedIn = Date.now() - at;
      expect(revoked).toEqual([{ version: 1 }, { version: 2 }]);
      expect(graced.provider.isActive((await graced.readCurrent()).value)).toBe(true);
      expect(graced.provider.listKeys().filter((k) => k.active)).toHaveLength(1);

      sink = await startSmtpSink({ mailDir, port });
      expect(await h.client.workflow.getHandle(workflowId).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
      // Every notice sent once when the server is back (each under its own Message-ID).
      const outbox = await until('every notice to the owner sent', async () => {
        const { rows } = await h.sql('SELECT id, status FROM mail_outbox WHERE $1 = ANY(recipients)', [graced.owner]);
        return rows.length > 0 && rows.every((m) => m.status === 'sent') && rows;
      }, 90_000);
      const mails = (await readMailbox(mailDir)).filter((m) => recipients(m.mail).includes(graced.owner));
      expect(mails.map((m) => m.mail.messageId).sort()).toEqual(outbox.map((m) => `<${m.id}@mailgent>`).sort());
      expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [graced.id])).rows).toEqual([{ status: 'closed' }]);
      row.outcome = 'rotated again at once';
      row['leak → v3 current, v1 and v2 revoked'] = `${(rotatedIn / 1000).toFixed(1)} s (server still down)`;
      row['notices sent once'] = outbox.length;
    } finally {
      await graced.stop();
    }
  });
});
