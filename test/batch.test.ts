import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { waitForMail } from './support/mail';

/**
 * The agent's batch, end to end: "rotate every API key older than 90 days and email the team a
 * summary" is one POST /v1/rotations with a filter and `notify`.
 */
describe('batch rotation for agents', () => {
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

  it('rotates only the api keys older than 90 days, in one batch workflow, and mails notify one summary', async () => {
    const team = `platform-${randomUUID().slice(0, 8)}@example.com`;
    const store = async (name: string, kind: string, ageDays: number) => {
      const res = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: { name, kind, value: h.secret(`${name}-original-value`), rotation: { provider: 'generated', graceHours: 0 } },
      });
      await h.sql(`UPDATE secret_versions SET created_at = now() - make_interval(days => $2) WHERE credential_id = $1`, [res.body.id, ageDays]);
      return res.body.id as string;
    };
    const oldA = await store('billing-key', 'api_key', 120);
    const oldB = await store('search-key', 'api_key', 95);
    const fresh = await store('maps-key', 'api_key', 10);
    const oldPassword = await store('db-password', 'password', 200);

    const started = await h.api('POST', '/v1/rotations', {
      token: agent.token,
      body: { filter: { kind: 'api_key', olderThanDays: 90 }, notify: [team], reason: 'quarterly hygiene' },
    });
    expect(started.status).toBe(202);
    expect(started.body.workflowIds.sort()).toEqual([`rotate:${oldA}`, `rotate:${oldB}`].sort());
    const batch = await h.client.workflow.getHandle(started.body.batchWorkflowId).result();
    expect(batch).toEqual({ total: 2, rotated: 2, failed: 0 });

    const versions = async (id: string) => (await h.sql('SELECT current_version FROM credentials WHERE id = $1', [id])).rows[0].current_version;
    expect(await versions(oldA)).toBe(2);
    expect(await versions(oldB)).toBe(2);
    expect(await versions(fresh)).toBe(1);
    expect(await versions(oldPassword)).toBe(1);
    for (const name of ['billing-key', 'search-key']) {
      h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
    }

    const [summary, ...more] = await waitForMail(team, 1);
    expect(more).toEqual([]);
    expect(summary!.mail.subject).toBe('[mailgent] Rotation batch: 2 rotated, 0 failed');
    expect(summary!.mail.text).toContain('(quarterly hygiene)');
    expect(summary!.mail.text).toMatch(/- billing-key: version 1 → 2; next due \d{4}-/);
    expect(summary!.mail.text).toMatch(/- search-key: version 1 → 2; next due/);
    expect(summary!.mail.text).not.toContain('maps-key');

    const report = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
    expect(report.body.state).toBe('succeeded');
    expect(report.body.credentials.map((c: { name: string; outcome: string }) => [c.name, c.outcome])).toEqual([
      ['billing-key', 'rotated'],
      ['search-key', 'rotated'],
    ]);
  });

  it('a batch with a failing member reports it in the summary and as partial', async () => {
    const team = `mixed-${randomUUID().slice(0, 8)}@example.com`;
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'ok-key', kind: 'token', value: h.secret('ok-key-original'), rotation: { provider: 'generated', graceHours: 0 } } });
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'seed', kind: 'totp_seed', totp: { secret: h.secret('JBSWY3DPEHPK3PXPJBSWY3DP') } } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['ok-key', 'seed'], notify: [team] } });
    expect(await h.client.workflow.getHandle(started.body.batchWorkflowId).result()).toEqual({ total: 2, rotated: 1, failed: 1 });
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'ok-key' } })).body.value);
    const [summary] = await waitForMail(team, 1);
    expect(summary!.mail.subject).toBe('[mailgent] Rotation batch: 1 rotated, 1 failed');
    expect(summary!.mail.text).toContain("- seed: failed — credential 'seed' is a totp_seed; a generated value would not be a TOTP seed");
    expect((await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state).toBe('partial');
  });
});
