import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leakSignal } from '../../workflows/definitions';
import { startHarness, type Harness } from '../support/harness';
import { expectCleanRun } from '../support/leaks';
import type { Identity } from '../support/lifecycle-fixtures';
import { readMailbox, recipients } from '../support/mail';
import { expectAuditAndNoLeaks, expectSettled, faultRow } from './checks';
import { rotatingKey, until, type RotatingKey } from './fixtures';

/**
 * Things that arrive more than once: the same signal twice, the same leak twenty times at once,
 * fifty writers racing on one name. Each must have exactly one effect.
 */
describe('fault: duplicates and races', () => {
  const security = `security-${randomBytes(3).toString('hex')}@example.com`;
  let h: Harness;
  let agent: Identity;
  const keys: RotatingKey[] = [];

  beforeAll(async () => {
    h = await startHarness({ worker: true, securityNotify: [security] });
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    for (const key of keys) await key.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('the same leak signal delivered twice during grace: one revoke, one leak notice', { timeout: 60_000 }, async ({ task }) => {
    const row = faultRow(task, 'the same leak signal delivered twice');
    const key = await rotatingKey(h, agent, { label: 'signal-twice', graceHours: 1 });
    keys.push(key);
    const workflowId = await key.rotate();
    const handle = h.client.workflow.getHandle(workflowId);
    await until('the grace period', async () => (await handle.query<{ state: string }>('progress').catch(() => undefined))?.state === 'grace');
    // One report, delivered twice (a client retrying after a lost answer): v1, the previous version, leaked.
    const signal = { incidentId: 'c0ffee00-0000-4000-8000-000000000001', version: 1 };
    await Promise.all([handle.signal(leakSignal, signal), handle.signal(leakSignal, signal)]);

    await expectSettled(
      h,
      key.expected(workflowId, 'rotated', {
        // The grace notice, then the one saying v1 is revoked because of the leak.
        notices: [`[mailgent] Rotated ${key.name}`, `[mailgent] Rotated ${key.name}`],
      }),
    );
    const history = await handle.fetchHistory();
    const signals = history.events!.filter((e) => e.workflowExecutionSignaledEventAttributes);
    expect(signals).toHaveLength(2);
    row.outcome = 'one effect';
    row['signals in history'] = signals.length;
    row['provider creates/revokes'] = `${key.provider.creates - key.before.creates}/${key.provider.revokes - key.before.revokes}`;
  });

  it('the same leak reported 20 times in parallel: one incident, one rotation, one incident email', { timeout: 60_000 }, async ({ task }) => {
    const row = faultRow(task, 'the same leak reported 20× in parallel');
    const key = await rotatingKey(h, agent, { label: 'leak-20x', graceHours: 24 });
    keys.push(key);
    const reports = await Promise.all(
      Array.from({ length: 20 }, (_, i) => h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: key.id, source: `scanner-${i}` } })),
    );
    expect(reports.map((r) => r.status)).toEqual(Array(20).fill(202));
    expect(reports.map((r) => r.body.results[0].action).sort()).toEqual([...Array(19).fill('joined'), 'rotating']);
    expect(new Set(reports.map((r) => r.body.results[0].incidentId)).size).toBe(1);

    // Leak mode skips the grace period: v1 is revoked as soon as v2 is live.
    const incidentSubject = `[mailgent] SECURITY: leak reported for ${key.name}`;
    await expectSettled(h, key.expected(`rotate:${key.id}`, 'rotated', { notices: [incidentSubject, `[mailgent] Rotated ${key.name}`] }));
    const incidents = await h.sql('SELECT status, reports FROM leak_incidents WHERE credential_id = $1', [key.id]);
    expect(incidents.rows).toEqual([{ status: 'closed', reports: 20 }]);
    const toSecurity = (await readMailbox()).filter((m) => recipients(m.mail).includes(security) && m.mail.subject === incidentSubject);
    expect(toSecurity).toHaveLength(1);
    row.outcome = 'one effect';
    row['incidents / rotations / incident emails'] = `${incidents.rows.length} / ${key.provider.creates - key.before.creates} / ${toSecurity.length}`;
  });

  it('50 parallel vault.store with expectedVersion on one name: exactly one wins per version', { timeout: 60_000 }, async ({ task }) => {
    const row = faultRow(task, '50 parallel vault.store with expectedVersion on one name');
    const name = `contended-${randomBytes(3).toString('hex')}`;
    const store = (i: number, expectedVersion: number) => {
      const value = h.secret(`contended-value-${i}-${randomBytes(8).toString('hex')}`);
      return h.api('POST', '/v1/vault.store', { token: agent.token, body: { name, kind: 'api_key', value, expectedVersion } }).then((res) => ({ i, value, expectedVersion, res }));
    };
    const race = async (expected: (i: number) => number) => {
      const results = await Promise.all(Array.from({ length: 50 }, (_, i) => store(i, expected(i))));
      const winners = results.filter((r) => r.res.status === 201);
      const losers = results.filter((r) => r.res.status !== 201);
      for (const l of losers) {
        expect(l.res.status, l.res.text).toBe(409);
        expect(l.res.body).toMatchObject({ type: 'https://mailgent.dev/problems/version-conflict', status: 409 });
      }
      // Each winner made the version after the one it expected.
      for (const w of winners) expect(w.res.body.version).toBe(w.expectedVersion + 1);
      return winners;
    };

    // Round 1: writers expect 0..4 (a new name, then each version in turn); whoever is right at commit time wins.
    const first = await race((i) => i % 5);
    const versions = first.map((w) => w.res.body.version as number).sort((a, b) => a - b);
    expect(versions).toEqual(Array.from({ length: versions.length }, (_, i) => i + 1));
    // Round 2: all fifty expect the version that is current now; exactly one wins.
    const top = versions.at(-1)!;
    const second = await race(() => top);
    expect(second).toHaveLength(1);
    const winners = [...first, ...second];

    // No gaps, no duplicates, and every version holds its winner's value.
    const stored = await h.sql('SELECT v.version FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.name = $1 ORDER BY v.version', [name]);
    expect(stored.rows.map((r) => r.version)).toEqual(Array.from({ length: top + 1 }, (_, i) => i + 1));
    for (const w of winners) {
      const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name, version: w.res.body.version } });
      expect(read.body.value).toBe(w.value);
    }
    const conflicts = await h.sql("SELECT count(*)::int AS n FROM audit_log WHERE action = 'vault.store' AND outcome = 'conflict' AND detail->>'name' = $1", [name]);
    expect(conflicts.rows[0].n).toBe(100 - winners.length);
    await expectAuditAndNoLeaks(h);
    row.outcome = 'one winner per version';
    row['versions made'] = top + 1;
    row['409s'] = 100 - winners.length;
  });
});
