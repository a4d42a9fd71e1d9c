import { createHash, randomUUID } from 'node:crypto';
import pg from 'pg';
import { WorkflowNotFoundError } from '@temporalio/client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createActivities } from '../activities';
import { incidentMailId } from '../activities/support';
import { reportLeak } from '../api/routes/leaks';
import { leakSignal } from '../workflows/definitions';
import { expectCleanRun } from './support/leaks';
import { holdTable, mintKey, whoami } from './support/lifecycle-fixtures';
import { ProviderServer } from './support/provider-server';
import { startHarness, type Harness } from './support/harness';
import { readMailbox, recipients, waitForMail } from './support/mail';

const sha256 = (value: string) => createHash('sha256').update(value).digest('hex');

/** Leak response through the real API, Temporal server, worker, PostgreSQL and SMTP sink. */
describe('POST /v1/leaks', () => {
  let h: Harness;
  let agent: { id: string; token: string };
  const security = `security-${randomUUID().slice(0, 8)}@example.com`;

  const store = async (name: string, value: string, extra: Record<string, unknown> = {}) => {
    const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name, kind: 'api_key', value: h.secret(value), ...extra } });
    expect(res.status).toBe(201);
    return res.body.id as string;
  };
  const current = async (name: string) => {
    const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } });
    h.secret(res.body.value);
    return res.body as { version: number; value: string };
  };
  const waitFor = async <T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> => {
    const deadline = Date.now() + timeoutMs;
    let last: unknown;
    for (;;) {
      const value = await probe().catch((err) => ((last = err), undefined));
      if (value !== undefined) return value;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (${String(last ?? '')})`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  const revokedVersions = async (credentialId: string) =>
    (await h.sql('SELECT version FROM secret_versions WHERE credential_id = $1 AND revoked_at IS NOT NULL ORDER BY version', [credentialId])).rows.map((r) => r.version as number);
  /** The leak route's dependencies, with a Temporal client that signals and describes but loses every workflow start. */
  const depsLosingStarts = () => {
    const workflow = Object.create(h.client.workflow, { start: { value: async () => Promise.reject(new Error('14 UNAVAILABLE: the connection was lost')) } });
    const client = Object.create(h.client, { workflow: { value: workflow } });
    return { pool: h.services.pool, vault: h.services.vault, secrets: h.services.secrets, client, taskQueue: h.taskQueue, securityNotify: [security] };
  };
  /** The same, with a Temporal client that has lost its server: every signal and describe fails. */
  const depsLosingTemporal = () => {
    const lost = async () => Promise.reject(new Error('14 UNAVAILABLE: the connection was lost'));
    const workflow = Object.create(h.client.workflow, { getHandle: { value: () => ({ describe: lost, signal: lost }) } });
    return { ...depsLosingStarts(), client: Object.create(h.client, { workflow: { value: workflow } }) };
  };
  /** A leak incident of `name` whose leak rotation was terminated while it waited at its first provider step: the report's answer. */
  const incidentWithRunTerminated = async (name: string, id: string) => {
    const lock = await holdTable(h, 'password_policies');
    try {
      const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: name, source: 'scan' } });
      expect(first.body.results).toEqual([expect.objectContaining({ action: 'rotating', version: 1 })]);
      await lock.waiting();
      await h.client.workflow.getHandle(`rotate:${id}`).terminate('stopped by an operator');
      return first;
    } finally {
      await lock.release();
    }
  };
  /** A requested rotation of `name`, once in its grace period: its rotation id. */
  const requestedInGrace = async (name: string): Promise<string> => {
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(started.status, started.text).toBe(202);
    await waitFor("the requested rotation's grace period", async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r : undefined;
    });
    return started.body.rotationId as string;
  };
  /** The rotation's report once it has succeeded. */
  const rotationSucceeded = (rotationId: string, what: string) =>
    waitFor(what, async () => {
      const r = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
      return r.body.state === 'succeeded' ? r.body : undefined;
    }, 20_000);
  /** The same, with a Temporal client whose signal-with-start fails (the starter lost Temporal, or died, right after the incident was saved). */
  const depsLosingSignalWithStart = () => {
    const workflow = Object.create(h.client.workflow, { signalWithStart: { value: async () => Promise.reject(new Error('14 UNAVAILABLE: the connection was lost')) } });
    return { ...depsLosingStarts(), client: Object.create(h.client, { workflow: { value: workflow } }) };
  };
  /** The one email with this subject, once it has arrived (none other with it by then). */
  const onlyEmail = async (subject: string) => {
    const [told, ...more] = await waitFor(`the email '${subject}'`, async () => {
      const mails = (await readMailbox()).filter((m) => m.mail.subject === subject);
      return mails.length > 0 ? mails : undefined;
    });
    expect(more).toEqual([]);
    return told!;
  };
  /** The leak route's dependencies with Temporal's handles made by `handle`; starting a leak run is a failure. */
  const depsWithHandles = (handle: (workflowId: string) => object) => {
    const workflow = Object.create(h.client.workflow, {
      getHandle: { value: handle },
      signalWithStart: { value: async () => Promise.reject(new Error('a leak run was started for a deleted credential')) },
    });
    return { ...depsLosingStarts(), client: Object.create(h.client, { workflow: { value: workflow } }) };
  };
  /** The incident emails of a credential's leak, once at least one has arrived. */
  const incidentEmails = (name: string) =>
    waitFor('the incident email', async () => {
      const mails = (await readMailbox()).filter((m) => m.mail.subject === `[mailgent] SECURITY: leak reported for ${name}`);
      return mails.length > 0 ? mails : undefined;
    });
  const rotationsOf = async (credentialId: string) =>
    (await h.sql("SELECT count(*)::int AS n FROM audit_log WHERE credential_id = $1 AND action = 'rotation.create_pending' AND outcome = 'ok'", [credentialId])).rows[0].n as number;

  beforeAll(async () => {
    h = await startHarness({ worker: true, securityNotify: [security] });
    agent = await h.createIdentity('leaky-agent', `agent-${randomUUID().slice(0, 8)}@example.com`);
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('twenty duplicate reports in parallel make one incident, one rotation in leak mode and one incident email', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const id = await store('ci-token', 'ghp_leakedTokenValue0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 24 } });
    const reports = await Promise.all(
      Array.from({ length: 20 }, (_, i) => h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'ci-token', source: `scanner-${i}` } })),
    );
    expect(reports.map((r) => r.status)).toEqual(Array(20).fill(202));
    const actions = reports.map((r) => r.body.results[0].action).sort();
    expect(actions).toEqual([...Array(19).fill('joined'), 'rotating']);
    expect(new Set(reports.map((r) => r.body.results[0].incidentId)).size).toBe(1);
    // Every report names the incident's rotation, to follow as any other (GET /v1/rotations/:id, MCP rotation_status).
    const rotationIds = new Set(reports.map((r) => r.body.results[0].rotationId));
    expect(rotationIds.size).toBe(1);
    const rotationId = [...rotationIds][0] as string;
    expect((await h.sql('SELECT kind FROM rotations WHERE id = $1', [rotationId])).rows).toEqual([{ kind: 'leak' }]);

    // Leak mode: no grace period, so the run completes and the leaked version is revoked.
    const handle = h.client.workflow.getHandle(`rotate:${id}`);
    const result = await handle.result();
    const followed = await h.api('GET', `/v1/rotations/${rotationId}`, { token: agent.token });
    expect(followed.body).toMatchObject({ state: 'succeeded', credentials: [expect.objectContaining({ credentialId: id, state: 'succeeded' })] });
    expect(result).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    expect(result.steps.find((s: { name: string }) => s.name === 'grace').state).toBe('skipped');
    expect(await rotationsOf(id)).toBe(1);
    expect((await current('ci-token')).version).toBe(2);
    const revoked = (await h.sql('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [id])).rows[0];
    expect(revoked.revoked_at).not.toBeNull();
    const incident = (await h.sql('SELECT status, reports FROM leak_incidents WHERE credential_id = $1', [id])).rows;
    expect(incident).toEqual([{ status: 'closed', reports: 20 }]);

    const incidentMails = (await waitForMail(security, 1)).filter((m) => m.mail.subject === '[mailgent] SECURITY: leak reported for ci-token');
    expect(incidentMails).toHaveLength(1);
    expect(recipients(incidentMails[0]!.mail)).toEqual(expect.arrayContaining([security, owner]));
    const notices = await waitForMail(owner, 2);
    expect(notices.map((m) => m.mail.subject).sort()).toEqual(['[mailgent] Rotated ci-token', '[mailgent] SECURITY: leak reported for ci-token']);
    expect(notices.find((m) => m.mail.subject === '[mailgent] Rotated ci-token')!.mail.text).toContain('because a leak was reported');

    // A late duplicate, after the incident closed, names a version that is no longer live.
    const late = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('ghp_leakedTokenValue0001'), source: 'late-scanner' } });
    expect(late.body.results).toEqual([{ credentialId: id, version: 1, action: 'already-revoked' }]);
  });

  /** What a run terminated by an operator leaves: an open incident that nothing will close, opened `ago` seconds back. */
  const leftOverIncident = async (credentialId: string, ago: number) => {
    const incidentId = randomUUID();
    await h.sql(`INSERT INTO leak_incidents (id, credential_id, identity_id, version, source, opened_at) VALUES ($1, $2, $3, 1, 'old-scan', now() - make_interval(secs => $4))`, [
      incidentId,
      credentialId,
      agent.id,
      ago,
    ]);
    return incidentId;
  };

  it('a report by name that finds an open incident with no run left closes it and rotates afresh; one just opened (its run starting) is joined', async () => {
    const id = await store('abandoned-incident', 'sk_abandoned_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    const fresh = await leftOverIncident(id, 0);
    const joined = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'abandoned-incident', source: 'scan' } });
    expect(joined.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, incidentId: fresh, action: 'joined' })]);
    await h.sql(`UPDATE leak_incidents SET opened_at = now() - interval '2 minutes' WHERE id = $1`, [fresh]);
    // Before, every later report joined it, and the credential was never rotated.
    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'abandoned-incident', source: 'scan' } });
    expect(res.status, res.text).toBe(202);
    expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    const incidents = (await h.sql('SELECT id, status, reports FROM leak_incidents WHERE credential_id = $1 ORDER BY opened_at', [id])).rows;
    expect(incidents).toEqual([
      // Opened, then joined once; the report that closed it counts on the incident it opened instead.
      { id: fresh, status: 'closed', reports: 2 },
      { id: res.body.results[0].incidentId, status: 'closed', reports: 1 },
    ]);
    h.secret((await current('abandoned-incident')).value);
  });

  it('a report that finds an open incident whose run has already ended (terminated a moment ago) does not join it: it closes it and rotates afresh', async () => {
    const id = await store('terminated-leak', 'pw_terminated_value_0001', { kind: 'password', rotation: { provider: 'generated', graceHours: 0 } });
    // A generated password reads its identity's password policy before it is made: an open
    // transaction holding that table keeps the leak rotation at its first provider step.
    const lock = await holdTable(h, 'password_policies');
    try {
      const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'terminated-leak', source: 'scan' } });
      expect(first.status, first.text).toBe(202);
      expect(first.body.results).toEqual([expect.objectContaining({ credentialId: id, action: 'rotating' })]);
      await lock.waiting();
      // An operator terminates the run: its incident stays open, seconds old, and nothing will close it.
      await h.client.workflow.getHandle(`rotate:${id}`).terminate('stopped by an operator');

      // Before, a report within a minute of the incident joined it, and the leaked value was never rotated.
      const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'terminated-leak', source: 'scan' } });
      expect(again.status, again.text).toBe(202);
      expect(again.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
      expect(again.body.results[0].incidentId).not.toBe(first.body.results[0].incidentId);
      await lock.release();
      expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1 });
      const incidents = (await h.sql('SELECT id, status FROM leak_incidents WHERE credential_id = $1 ORDER BY opened_at', [id])).rows;
      expect(incidents).toEqual([
        { id: first.body.results[0].incidentId, status: 'closed' },
        { id: again.body.results[0].incidentId, status: 'closed' },
      ]);
      const revoked = (await h.sql('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [id])).rows[0];
      expect(revoked.revoked_at).not.toBeNull();
      h.secret((await current('terminated-leak')).value);
    } finally {
      await lock.release();
    }
  });

  /**
   * What a run terminated after its promotion and before its revoke leaves: `name` stored and
   * reported leaked, version 2 current, the leaked version 1 still live, its incident open with
   * nothing running to close it. The credential's id.
   */
  const leakLeftLive = async (name: string) => {
    const id = await store(name, `sk_${name.replaceAll('-', '_')}_0001`, { rotation: { provider: 'generated', graceHours: 0 } });
    const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: name, source: 'scan' } });
    expect(first.body.results).toEqual([expect.objectContaining({ version: 1, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    h.secret((await current(name)).value);
    await h.sql('UPDATE secret_versions SET revoked_at = NULL WHERE credential_id = $1 AND version = 1', [id]);
    await h.sql(`UPDATE leak_incidents SET status = 'open', closed_at = NULL WHERE id = $1`, [first.body.results[0].incidentId]);
    return id;
  };
  /** A report by name that replaces `name`'s left-over incident, answered 503 (its rotation's start failed). */
  const replacementStartLost = async (name: string) => {
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(reportLeak(depsLosingSignalWithStart(), caller, agent.id, { credential: name, source: 'scan' })).rejects.toMatchObject({ status: 503 });
  };

  it("a report that replaces a left-over incident of another version, still live, has the new rotation revoke that version too", async () => {
    const id = await leakLeftLive('left-over-version');

    // A report by name names the current version, 2: its incident replaces the left-over one.
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'left-over-version', source: 'scan' } });
    expect(again.status, again.text).toBe(202);
    expect(again.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 2, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    // Before, [2]: version 1 kept working, and both incidents ended closed.
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1 ORDER BY opened_at', [id])).rows).toEqual([{ status: 'closed' }, { status: 'closed' }]);
    h.secret((await current('left-over-version')).value);
  });

  it('the version a left-over incident hands its replacement is kept on it: a replacement whose start failed, started by a report again, revokes it too', async () => {
    const id = await leakLeftLive('left-over-kept');
    await replacementStartLost('left-over-kept');
    expect((await h.sql(`SELECT version, left_over FROM leak_incidents WHERE credential_id = $1 AND status = 'open'`, [id])).rows).toEqual([{ version: 2, left_over: 1 }]);
    // Reported again as the 503 asked: it starts the replacement's rotation, with the version handed to it.
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'left-over-kept', source: 'scan' } });
    expect(again.body.results).toEqual([expect.objectContaining({ version: 2, action: 'joined' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    // Before, [2]: the version handed over was in the failed start's memory alone, and version 1 kept working.
    expect(await revokedVersions(id)).toEqual([1, 2]);
    h.secret((await current('left-over-kept')).value);
  });

  it('a rotation that never heard a replacement incident, and revokes its version, hears the live version a left-over incident handed it: revoked, not closed with it', async () => {
    const id = await leakLeftLive('left-over-unheard');
    await replacementStartLost('left-over-unheard');
    // A requested rotation runs before any report again: it replaces version 2 (the incident's own)
    // and revokes it as it ends, never having heard of the incident.
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['left-over-unheard'] } });
    expect(started.status, started.text).toBe(202);
    const requested = await waitFor('the requested rotation to start', async () => {
      const { rows } = await h.sql('SELECT run_id FROM rotation_runs WHERE rotation_id = $1 AND run_id IS NOT NULL', [started.body.rotationId]);
      return rows[0]?.run_id as string | undefined;
    });
    // It hears version 1 as it ends and rotates again, in leak mode: that run revokes it as an
    // older leaked version. (Before, it succeeded as requested, 2 → 3, revoked [2] alone, and closed
    // the incident with version 1 working.)
    const chain = h.client.workflow.getHandle(`rotate:${id}`, requested);
    expect(await chain.result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 3, toVersion: 4 });
    expect(await revokedVersions(id)).toEqual([1, 2, 3]);
    expect((await h.sql(`SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1 AND status = 'open'`, [id])).rows).toEqual([{ n: 0 }]);
    h.secret((await current('left-over-unheard')).value);
  });

  it('an unstarted replacement incident of a credential deleted since is told by the sweep with the version a left-over incident handed it', async () => {
    const id = await leakLeftLive('left-over-told');
    // The report replacing its incident got a 503; then the credential was deleted.
    await replacementStartLost('left-over-told');
    expect((await h.api('DELETE', '/v1/credentials/left-over-told', { token: agent.token })).status).toBe(200);
    await h.sql(`UPDATE leak_incidents SET opened_at = now() - interval '2 minutes' WHERE credential_id = $1 AND status = 'open'`, [id]);
    expect(await createActivities(h.deps).resumeLeakIncidents({ asOf: new Date().toISOString() })).toEqual({ started: 0, told: 1 });
    // Both live leaked versions told as not rotated: before, version 2 alone (version 1 kept working, told to no one).
    const told = await waitFor('both versions told', async () => {
      const mails = (await readMailbox()).filter((m) => m.mail.subject === '[mailgent] SECURITY: leak reported for left-over-told (deleted; not rotated)');
      return mails.length >= 2 ? mails : undefined;
    });
    expect(told.map((m) => /\(version (\d+)\)/.exec(m.mail.text ?? '')?.[1]).sort()).toEqual(['1', '2']);
  });

  it('a report repeated by its Idempotency-Key after its rotation ended gets the first answer back: no second incident, rotation or email', async () => {
    const id = await store('keyed-leak', 'sk_keyed_leak_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    const key = `leak-${randomUUID()}`;
    const body = { credential: 'keyed-leak', source: 'scan' };
    const first = await h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': key } });
    expect(first.status, first.text).toBe(202);
    expect(first.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    // The answer was lost; the reporter repeats it. Before, by name it named version 2, the new
    // value: a second incident, a second rotation, a second incident email.
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': key } });
    expect(again.status, again.text).toBe(202);
    expect(again.body).toEqual({ ...first.body, repeated: true });
    const viaBody = await h.api('POST', '/v1/leaks', { token: agent.token, body: { ...body, idempotencyKey: key } });
    expect(viaBody.body).toEqual({ ...first.body, repeated: true });
    expect((await h.sql('SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1', [id])).rows[0].n).toBe(1);
    expect(await rotationsOf(id)).toBe(1);
    const repeats = (await h.sql(`SELECT detail FROM audit_log WHERE action = 'leak.report' AND identity_id = $1 AND detail->>'repeated' = 'true'`, [agent.id])).rows;
    expect(repeats).toEqual([{ detail: { source: 'scan', repeated: true } }, { detail: { source: 'scan', repeated: true } }]);
    // Another report under the key is refused; the admin's keys are its own.
    const other = await h.api('POST', '/v1/leaks', { token: agent.token, body: { ...body, source: 'another-scan' }, headers: { 'idempotency-key': key } });
    expect(other.status).toBe(422);
    expect(other.body.type).toMatch(/idempotency-key-reused$/);
    const byAdmin = await h.api('POST', '/v1/leaks', { token: h.adminToken, body: { credential: id, source: 'scan' }, headers: { 'idempotency-key': key } });
    expect(byAdmin.status, byAdmin.text).toBe(202);
    expect(byAdmin.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 2, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    expect((await h.api('POST', '/v1/leaks', { token: h.adminToken, body: { credential: id, source: 'scan' }, headers: { 'idempotency-key': key } })).body).toEqual({
      ...byAdmin.body,
      repeated: true,
    });
    expect(await rotationsOf(id)).toBe(2);
    h.secret((await current('keyed-leak')).value);

    // A first report whose answer was never kept (it died after its work, before keeping it): a
    // repeat acts on the version the first resolved (3, revoked by its rotation by now), not on the
    // current one. Before, by name it resolved version 4, the new value, and rotated that.
    const lostKey = `leak-${randomUUID()}`;
    const lost = await h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': lostKey } });
    expect(lost.body.results).toEqual([expect.objectContaining({ version: 3, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', fromVersion: 3, toVersion: 4 });
    await h.sql(`UPDATE idempotency_keys SET answer = answer - 'answer' WHERE key = $1`, [lostKey]);
    const afterLoss = await h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': lostKey } });
    expect(afterLoss.status, afterLoss.text).toBe(202);
    expect(afterLoss.body.results).toEqual([{ credentialId: id, version: 3, action: 'already-revoked' }]);
    expect(await rotationsOf(id)).toBe(3);
    h.secret((await current('keyed-leak')).value);

    // A report refused (404) does not take its key: the request set right under it is carried out.
    const fixKey = `leak-${randomUUID()}`;
    expect((await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'keyed-leek', source: 'scan' }, headers: { 'idempotency-key': fixKey } })).status).toBe(404);
    const fixed = await h.api('POST', '/v1/leaks', { token: agent.token, body: { ...body, version: 1 }, headers: { 'idempotency-key': fixKey } });
    expect(fixed.status, fixed.text).toBe(202);
    expect(fixed.body.results).toEqual([{ credentialId: id, version: 1, action: 'already-revoked' }]);
  });

  it('a keyed report by fingerprint keeps no hash a guessed value can be checked against: its request hash is of the keyed fingerprint', async () => {
    const value = 'sk_keyed_fingerprint_value_0001';
    const id = await store('keyed-fingerprint', value, { rotation: { provider: 'generated', graceHours: 0 } });
    const key = `leak-${randomUUID()}`;
    const body = { fingerprint: createHash('sha256').update(value).digest('hex'), source: 'gitleaks' };
    const first = await h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': key } });
    expect(first.status, first.text).toBe(202);
    expect(first.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    const stored = (await h.sql('SELECT request FROM idempotency_keys WHERE key = $1', [key])).rows[0].request as Buffer;
    // Before, it was the SHA-256 of the request as sent: a guess at the value (and the source, in the audit log) confirmed offline.
    expect(stored.equals(createHash('sha256').update(JSON.stringify(body)).digest())).toBe(false);
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': key } });
    expect(again.body).toEqual({ ...first.body, repeated: true });
    const other = await h.api('POST', '/v1/leaks', { token: agent.token, body: { ...body, fingerprint: createHash('sha256').update(`${value}x`).digest('hex') }, headers: { 'idempotency-key': key } });
    expect(other.status).toBe(422);
    expect(other.body.type).toMatch(/idempotency-key-reused$/);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    h.secret((await current('keyed-fingerprint')).value);
  });

  it('two requests under one Idempotency-Key at once are one report: the incident counts it once, the second audited as a repeat', async () => {
    const id = await store('keyed-at-once', 'sk_keyed_at_once_value_01', { rotation: { provider: 'generated', graceHours: 0 } });
    const key = `leak-${randomUUID()}`;
    const body = { credential: 'keyed-at-once', source: 'scan' };
    const answers = await Promise.all([0, 1].map(() => h.api('POST', '/v1/leaks', { token: agent.token, body, headers: { 'idempotency-key': key } })));
    for (const a of answers) expect(a.status, a.text).toBe(202);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    // Before, two reports counted (one answered rotating, the other joined, both audited as reports of their own).
    expect((await h.sql('SELECT reports FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ reports: 1 }]);
    const rows = (await h.sql(`SELECT detail FROM audit_log WHERE action = 'leak.report' AND credential_id = $1 ORDER BY seq`, [id])).rows.map((r) => r.detail);
    expect(rows.filter((d) => d.repeated === true)).toHaveLength(1);
    expect(await rotationsOf(id)).toBe(1);
    h.secret((await current('keyed-at-once')).value);
  });

  it('parallel reports that meet a left-over incident all join the one incident that replaces it, none the closed one', async () => {
    const id = await store('left-over-parallel', 'sk_left_over_parallel_1', { rotation: { provider: 'generated', graceHours: 0 } });
    const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'left-over-parallel', source: 'scan' } });
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    h.secret((await current('left-over-parallel')).value);
    // Its incident left open by a run that ended: the next report replaces it.
    const leftOver = first.body.results[0].incidentId as string;
    await h.sql(`UPDATE leak_incidents SET status = 'open', closed_at = NULL WHERE id = $1`, [leftOver]);

    const reports = await Promise.all(
      Array.from({ length: 6 }, () => h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'left-over-parallel', source: 'scan' } })),
    );
    expect(reports.map((r) => r.status)).toEqual([202, 202, 202, 202, 202, 202]);
    const answered = reports.map((r) => r.body.results[0]);
    // Before, those that found it closed by another report were answered joined to it: a closed incident, an ended run.
    expect(answered.filter((r) => r.incidentId === leftOver)).toEqual([]);
    expect(new Set(answered.map((r) => r.incidentId)).size).toBe(1);
    expect(answered.filter((r) => r.action === 'rotating')).toHaveLength(1);
    const incidents = (await h.sql('SELECT id, status, reports FROM leak_incidents WHERE credential_id = $1 ORDER BY opened_at', [id])).rows;
    expect(incidents).toEqual([
      { id: leftOver, status: 'closed', reports: 1 },
      { id: answered[0].incidentId, status: expect.any(String), reports: 6 },
    ]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    expect(await rotationsOf(id)).toBe(2);
    h.secret((await current('left-over-parallel')).value);
  });

  it('a leak of a credential with no one to tell (no security contacts, owners or identity email) queues no incident email', async () => {
    const quiet = await h.createIdentity();
    const stored = await h.api('POST', '/v1/vault.store', {
      token: quiet.token,
      body: { name: 'untold-leak', kind: 'api_key', value: h.secret('sk_untold_leak_value_001'), rotation: { provider: 'generated', graceHours: 0 } },
    });
    expect(stored.status, stored.text).toBe(201);
    const caller = { identityId: quiet.id, actor: `identity:${quiet.id}`, requestId: randomUUID() };
    const deps = { pool: h.services.pool, vault: h.services.vault, secrets: h.services.secrets, client: h.client, taskQueue: h.taskQueue, securityNotify: [] };
    const { results } = await reportLeak(deps, caller, quiet.id, { credential: 'untold-leak', source: 'scan' });
    expect(results).toEqual([expect.objectContaining({ credentialId: stored.body.id, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${stored.body.id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    expect(await revokedVersions(stored.body.id)).toEqual([1]);
    // Before, a message to no one, queued, its delivery failing for a day before it was recorded undelivered.
    expect((await h.sql('SELECT count(*)::int AS n FROM mail_outbox WHERE id = $1', [incidentMailId((results[0] as { incidentId: string }).incidentId)])).rows[0].n).toBe(0);
    expect((await h.sql(`SELECT count(*)::int AS n FROM audit_log WHERE identity_id = $1 AND action = 'mail.send' AND detail->>'purpose' = 'leak.incident'`, [quiet.id])).rows[0].n).toBe(0);
    const read = await h.api('POST', '/v1/vault.get', { token: quiet.token, body: { name: 'untold-leak' } });
    expect(read.body.version).toBe(2);
    h.secret(read.body.value);
  });

  it('a duplicate that joins an incident its run closes a moment later (as it ends) stays a duplicate: no second incident, rotation or email', async () => {
    const id = await store('closing-incident', 'sk_closing_incident_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'closing-incident', source: 'scan' } });
    expect(first.body.results).toEqual([expect.objectContaining({ action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    // The moment before the run closed it: open, its run ended. The join's own update then finds it
    // closed by the run (a trigger stands in for the run's closeLeakIncidents landing in between: it
    // closes the incident as the report's upsert finds it open).
    await h.sql(`UPDATE leak_incidents SET status = 'open', closed_at = NULL WHERE id = $1`, [first.body.results[0].incidentId]);
    await h.sql(`CREATE FUNCTION close_on_join() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.status = 'open' THEN NEW.status := 'closed'; NEW.closed_at := now(); END IF; RETURN NEW; END $$`);
    await h.sql('CREATE TRIGGER close_on_join BEFORE UPDATE ON leak_incidents FOR EACH ROW EXECUTE FUNCTION close_on_join()');
    try {
      const late = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'closing-incident', source: 'scan' } });
      expect(late.status, late.text).toBe(202);
      // Before, it closed the incident again (nothing to close), opened a new one and rotated once more.
      expect(late.body.results).toEqual([expect.objectContaining({ incidentId: first.body.results[0].incidentId, action: 'joined' })]);
    } finally {
      await h.sql('DROP TRIGGER close_on_join ON leak_incidents');
      await h.sql('DROP FUNCTION close_on_join()');
    }
    expect((await h.sql('SELECT reports FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ reports: 2 }]);
    expect(await rotationsOf(id)).toBe(1);
    // One incident email, queued once (a second incident would have queued its own).
    const queued = await h.sql(`SELECT subject FROM mail_outbox WHERE purpose = 'leak.incident' AND subject LIKE '%closing-incident'`);
    expect(queued.rows).toEqual([{ subject: '[mailgent] SECURITY: leak reported for closing-incident' }]);
    h.secret((await current('closing-incident')).value);
  });

  it('a report whose rotation could not be started leaves its incident open, and a report again within the minute starts that rotation, not only joins', async () => {
    const id = await store('start-lost', 'sk_start_lost_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(reportLeak(depsLosingSignalWithStart(), caller, agent.id, { credential: 'start-lost', source: 'scan' })).rejects.toMatchObject({ status: 503 });
    // Before, the incident was closed and its email abandoned (though the start may have reached Temporal with only its answer lost).
    const open = (await h.sql('SELECT id, status FROM leak_incidents WHERE credential_id = $1', [id])).rows;
    expect(open).toEqual([{ id: expect.any(String), status: 'open' }]);
    // The report again, in the minute an incident's starter is given: before, it only joined (had the
    // starter died there, nothing would ever have started the rotation).
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'start-lost', source: 'scan' } });
    expect(again.status, again.text).toBe(202);
    expect(again.body.results).toEqual([expect.objectContaining({ credentialId: id, incidentId: open[0].id, action: 'joined' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    const alert = await incidentEmails('start-lost');
    expect(alert).toHaveLength(1);
    h.secret((await current('start-lost')).value);
  });

  it('an incident whose report died before starting its rotation, never reported again, has that rotation started by the next sweep', async () => {
    const id = await store('report-died', 'sk_report_died_value_001', { rotation: { provider: 'generated', graceHours: 0 } });
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    // The incident, its rotation and its email committed; the start never made (a 503 here, or the process gone).
    await expect(reportLeak(depsLosingSignalWithStart(), caller, agent.id, { credential: 'report-died', source: 'scan' })).rejects.toMatchObject({ status: 503 });
    const [incident] = (await h.sql('SELECT id FROM leak_incidents WHERE credential_id = $1', [id])).rows;
    // A sweep leaves an incident younger than a minute to its report, which may still be starting it.
    const sweep = async () => {
      const handle = await h.client.workflow.start('rotationSweep', { taskQueue: h.taskQueue, workflowId: `sweep-leaks-${randomUUID()}`, args: [{ waitSeconds: 1 }] });
      await handle.result();
    };
    await sweep();
    expect((await h.sql('SELECT run_id FROM rotation_runs r JOIN leak_incidents i ON i.rotation_id = r.rotation_id WHERE i.id = $1', [incident.id])).rows).toEqual([{ run_id: null }]);
    await h.sql(`UPDATE leak_incidents SET opened_at = now() - interval '2 minutes' WHERE id = $1`, [incident.id]);
    // Before, nothing but another report of the credential would ever start it: the leaked value stayed live.
    await sweep();
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE id = $1', [incident.id])).rows).toEqual([{ status: 'closed' }]);
    const alert = await incidentEmails('report-died');
    expect(alert).toHaveLength(1);
    h.secret((await current('report-died')).value);
  });

  it("the sweep leaves an unstarted incident a report is replacing (its row held) or has closed: no run for it", async () => {
    const id = await store('replaced-unstarted', 'sk_replaced_unstarted_01', { rotation: { provider: 'generated', graceHours: 0 } });
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(reportLeak(depsLosingSignalWithStart(), caller, agent.id, { credential: 'replaced-unstarted', source: 'scan' })).rejects.toMatchObject({ status: 503 });
    const [incident] = (await h.sql(`UPDATE leak_incidents SET opened_at = now() - interval '2 minutes' WHERE credential_id = $1 RETURNING id`, [id])).rows;
    const other = new pg.Client({ connectionString: h.databaseUrl });
    await other.connect();
    try {
      // A report closing it as its replacement opens: the row held until that commits.
      await other.query('BEGIN');
      await other.query(`UPDATE leak_incidents SET status = 'closed', closed_at = now() WHERE id = $1`, [incident.id]);
      const resume = () => createActivities(h.deps).resumeLeakIncidents({ asOf: new Date().toISOString() });
      // Before, it was started all the same: a run for a closed incident, and its email beside the successor's.
      expect(await resume()).toEqual({ started: 0, told: 0 });
      await other.query('COMMIT');
      expect(await resume()).toEqual({ started: 0, told: 0 });
    } finally {
      await other.end();
    }
    await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toBeInstanceOf(WorkflowNotFoundError);
  });

  it('a leak the running rotation never heard (its report lost Temporal, answered 503, and was not repeated) is not closed unanswered when that rotation ends: the leaked value is rotated', async () => {
    const id = await store('unheard-leak', 'sk_unheard_leak_value_0001', { rotation: { provider: 'generated', graceHours: 0.001 } }); // 3.6 s of grace
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['unheard-leak'] } });
    expect(started.status, started.text).toBe(202);
    await waitFor("the requested rotation's grace period", async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r : undefined;
    });
    // In grace, version 2 (the new value) is current: it is the one reported leaked, by name. The
    // report's signal never reaches Temporal: 503, its incident left open (report again), and no
    // report comes again.
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(reportLeak(depsLosingSignalWithStart(), caller, agent.id, { credential: 'unheard-leak', source: 'scan' })).rejects.toMatchObject({ status: 503 });
    const [incident] = (await h.sql('SELECT id, version, status FROM leak_incidents WHERE credential_id = $1', [id])).rows;
    expect(incident).toMatchObject({ version: 2, status: 'open' });

    // Before, the requested rotation ended after its grace period and closed the incident, its email
    // saying the value was being rotated, with version 2 current and working.
    const result = await h.client.workflow.getHandle(`rotate:${id}`).result();
    expect(result).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect((await current('unheard-leak')).version).toBe(3);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    const alert = await incidentEmails('unheard-leak');
    expect(alert).toHaveLength(1);
    expect(await rotationsOf(id)).toBe(2);
  });

  it('an unheard incident whose leaked version the ending rotation revoked itself is closed, its email sent: no second rotation of a value that never leaked', async () => {
    const id = await store('unheard-revoked', 'sk_unheard_revoked_value_0001', { rotation: { provider: 'generated', graceHours: 0.001 } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['unheard-revoked'] } });
    expect(started.status, started.text).toBe(202);
    await waitFor("the requested rotation's grace period", async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r : undefined;
    });
    // Version 1, working until the grace period ends, reported leaked; the signal is lost (503).
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(
      reportLeak(depsLosingSignalWithStart(), caller, agent.id, { fingerprint: sha256('sk_unheard_revoked_value_0001'), source: 'scan' }),
    ).rejects.toMatchObject({ status: 503 });
    expect((await h.sql('SELECT version, status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ version: 1, status: 'open' }]);

    // The rotation revokes version 1 as its grace period ends: the leak is answered, and version 2 (never leaked) stays current.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'requested', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    expect((await current('unheard-revoked')).version).toBe(2);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    expect(await rotationsOf(id)).toBe(1);
    const alert = await incidentEmails('unheard-revoked');
    expect(alert).toHaveLength(1);
  });

  it('an older version a stored value replaced, never revoked, is a live leak (rotated and revoked), not already-revoked; an unknown name is a 404 that does not repeat it', async () => {
    const id = await store('replaced-twice', 'sk_replaced_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    await store('replaced-twice', 'sk_replaced_value_0002');
    await store('replaced-twice', 'sk_replaced_value_0003');
    // Version 1 has no label left (current 3, previous 2) but was never revoked: it may still work.
    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_replaced_value_0001'), source: 'old-paste' } });
    expect(res.status, res.text).toBe(202);
    // Before: already-revoked, nothing done, and version 1 kept working.
    expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 3, toVersion: 4 });
    expect(await revokedVersions(id)).toEqual(expect.arrayContaining([1, 3]));
    h.secret((await current('replaced-twice')).value);
    // A value given where a name goes is not repeated in the 404.
    const typo = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'sk_pasted_by_mistake_0001', source: 'x' } });
    expect(typo.status).toBe(404);
    expect(typo.text).not.toContain('sk_pasted_by_mistake_0001');
  });

  it('a report whose rotation started but whose incident email could not be handed over keeps its incident open, and the next report hands the email over', async () => {
    const id = await store('mail-handover', 'pw_handover_value_0001', { kind: 'password', rotation: { provider: 'generated', graceHours: 0 } });
    // The leak rotation waits at its first provider step (see the terminated-run test): it is still
    // running when the second report comes.
    const lock = await holdTable(h, 'password_policies');
    try {
      // Temporal takes the rotation, then is lost before the email's delivery is started.
      const deps = depsLosingStarts();
      const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
      await expect(reportLeak(deps, caller, agent.id, { credential: 'mail-handover', source: 'scan' })).rejects.toMatchObject({ status: 503 });
      // The rotation it started is a change made: it has its ok row, marked incomplete (before, none:
      // the API's failure row alone, and the report again's "joined").
      const rows = (await h.sql(`SELECT outcome, detail FROM audit_log WHERE action = 'leak.report' AND request_id = $1`, [caller.requestId])).rows;
      expect(rows).toEqual([{ outcome: 'ok', detail: expect.objectContaining({ results: ['rotating'], incomplete: true }) }]);
      // Before, the incident was closed and its email abandoned, with the rotation running.
      const open = (await h.sql('SELECT id, status FROM leak_incidents WHERE credential_id = $1', [id])).rows;
      expect(open).toEqual([{ id: expect.any(String), status: 'open' }]);
      expect((await h.client.workflow.getHandle(`rotate:${id}`).describe()).status.name).toBe('RUNNING');

      // A report that cannot reach Temporal to join is asked to report again, and does not count.
      await expect(reportLeak(depsLosingTemporal(), caller, agent.id, { credential: 'mail-handover', source: 'scan' })).rejects.toMatchObject({ status: 503 });
      const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'mail-handover', source: 'scan' } });
      expect(again.status, again.text).toBe(202);
      expect(again.body.results).toEqual([expect.objectContaining({ credentialId: id, incidentId: open[0].id, action: 'joined' })]);
      // Only the report answered 202 counts: neither the one answered 503 as it joined (before: 3), nor
      // the one that opened the incident and was answered 503 as its email could not be handed over (before: 2).
      expect((await h.sql('SELECT reports FROM leak_incidents WHERE id = $1', [open[0].id])).rows).toEqual([{ reports: 1 }]);
      const alert = await incidentEmails('mail-handover');
      expect(alert).toHaveLength(1);
      await lock.release();
      expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1 });
      expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
      h.secret((await current('mail-handover')).value);
    } finally {
      await lock.release();
    }
  });

  it('a cancel of a requested rotation that a leak was reported to undoes it and rotates again in leak mode: the leaked value is revoked, not left working', async () => {
    const id = await store('cancelled-under-leak', 'pw_cancelled_leak_value_0001', { kind: 'password', rotation: { provider: 'generated', graceHours: 1 } });
    // The requested rotation waits at its first provider step (see the terminated-run test).
    const lock = await holdTable(h, 'password_policies');
    let requested;
    try {
      requested = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['cancelled-under-leak'] } });
      expect(requested.status, requested.text).toBe(202);
      await lock.waiting();
      const leak = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'cancelled-under-leak', source: 'scan' } });
      expect(leak.status, leak.text).toBe(202);
      // Its requester cancels the rotation it asked for, not knowing of the leak.
      const cancel = await h.api('DELETE', `/v1/rotations/${requested.body.rotationId}`, { token: agent.token });
      expect(cancel.body).toMatchObject({ cancelling: [id] });
    } finally {
      await lock.release();
    }
    // Before, the run ended cancelled and closed the incident, with version 1 (the leaked value) working.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 1 });
    expect(await revokedVersions(id)).toContain(1);
    expect((await current('cancelled-under-leak')).version).toBeGreaterThan(1);
    expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1 AND status = 'open'", [id])).rows[0].n).toBe(0);
    const report = await h.api('GET', `/v1/rotations/${requested.body.rotationId}`, { token: agent.token });
    expect(report.body.credentials[0]).toMatchObject({ outcome: 'cancelled' });
    const notice = await waitFor('the cancel notice to the security contacts', async () =>
      (await readMailbox()).find((m) => m.mail.subject === '[mailgent] Rotation cancelled for cancelled-under-leak' && recipients(m.mail).includes(security)),
    );
    expect(notice.mail.text).toContain('it is being rotated again now, in leak mode');
    expect(notice.mail.text).not.toContain('the leaked value still works');
  });

  it('a report that joins an incident while a rotation other than the incident\'s runs (a requested one, in grace) tells that rotation of the leak', async () => {
    const id = await store('joined-other-run', 'pw_other_run_value_0001', { kind: 'password', rotation: { provider: 'generated', graceHours: 1 } });
    // An incident whose leak rotation was terminated; then someone rotates it on request, and that run enters its grace period.
    const first = await incidentWithRunTerminated('joined-other-run', id);
    const rotationId = await requestedInGrace('joined-other-run');

    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'joined-other-run', source: 'scan' } });
    expect(again.body.results).toEqual([expect.objectContaining({ incidentId: first.body.results[0].incidentId, action: 'joined' })]);
    // Before, the running rotation never heard of it: it sat out its hour of grace with the leaked value working.
    const result = await rotationSucceeded(rotationId, 'the requested rotation to hear of the leak and finish');
    // The report named the current version, the one the rotation made: the old one was revoked at
    // once, and the run went on as a leak rotation of the new one (its report follows it there).
    expect(result.credentials[0].progress).toMatchObject({ mode: 'leak', state: 'succeeded' });
    const { fromVersion, toVersion } = result.credentials[0].progress;
    expect(await revokedVersions(id)).toEqual(expect.arrayContaining([1, fromVersion]));
    expect((await current('joined-other-run')).version).toBe(toVersion);
    expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1 AND status = 'open'", [id])).rows[0].n).toBe(0);
    for (let v = 2; v <= (await current('joined-other-run')).version; v++) {
      const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'joined-other-run', version: v } });
      if (res.status === 200) h.secret(res.body.value);
    }
  });

  it('a report that tells another rotation of an incident names the incident\'s version: an older leaked value (stored over by hand since) is revoked too', async () => {
    const id = await store('joined-older', 'pw_joined_older_value_0001', { kind: 'password', rotation: { provider: 'generated', graceHours: 1 } });
    // The incident (of version 1) whose leak rotation was terminated; a value stored by hand, then rotated on request, in its grace period.
    const first = await incidentWithRunTerminated('joined-older', id);
    await store('joined-older', 'pw_joined_older_value_0002', { kind: 'password' });
    const rotationId = await requestedInGrace('joined-older');
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'joined-older', source: 'scan' } });
    expect(again.body.results).toEqual([expect.objectContaining({ incidentId: first.body.results[0].incidentId, action: 'joined' })]);
    const reported = again.body.results[0].version as number;
    await rotationSucceeded(rotationId, 'the requested rotation to finish');
    await waitFor('no incident open', async () => ((await h.sql("SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1 AND status = 'open'", [id])).rows[0].n === 0 ? true : undefined), 20_000);
    // Before, the run heard version 3 alone: version 1, the one the incident was of, kept working, its incident closed.
    await waitFor('version 1 revoked', async () => ((await revokedVersions(id)).includes(1) ? true : undefined), 10_000);
    expect(await revokedVersions(id)).toEqual(expect.arrayContaining([1, reported]));
    for (let v = reported; v <= (await current('joined-older')).version; v++) {
      const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'joined-older', version: v } });
      if (res.status === 200) h.secret(res.body.value);
    }
  });

  it('a report that meets a destroy between finding the version live and opening its incident is answered deleted and told, not already-revoked', async () => {
    const id = await store('destroy-race', 'sk_destroy_race_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    // The report's scan of its free text runs between the two: the credential is destroyed there.
    const real = h.services.vault;
    const vault = Object.create(real, {
      readableValues: {
        value: async function* (identityId: string) {
          const destroyed = await h.api('DELETE', '/v1/credentials/destroy-race?destroy=true', { token: agent.token });
          expect(destroyed.status, destroyed.text).toBe(200);
          yield* real.readableValues(identityId);
        },
      },
    });
    const deps = { ...depsLosingStarts(), vault, client: h.client };
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    const answer = await reportLeak(deps, caller, agent.id, { credential: 'destroy-race', source: 'gitleaks-scan' });
    // Before, `already-revoked`: the destroyed version's missing row read as revoked, and no one was told.
    expect(answer.results).toEqual([{ credentialId: id, version: 1, action: 'deleted' }]);
    const [told] = await waitFor('the leak told', async () => {
      const mails = (await readMailbox()).filter((m) => m.mail.subject === '[mailgent] SECURITY: leak reported for destroy-race (destroyed; not rotated)');
      return mails.length > 0 ? mails : undefined;
    });
    expect(told!.mail.text).toContain('The credential was destroyed on');
    expect((await h.sql('SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1', [id])).rows[0].n).toBe(0);
  });

  it('an incident email whose delivery was never started goes out when the incident\'s run closes it, if no report came again', async () => {
    await store('mail-at-close', 'sk_mail_at_close_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    // Temporal takes the rotation, then is lost before the email's delivery is started (as above).
    const deps = depsLosingStarts();
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(reportLeak(deps, caller, agent.id, { credential: 'mail-at-close', source: 'scan' })).rejects.toMatchObject({ status: 503 });
    // Nobody reports again. Before, the run closed the incident and the email stayed queued for good.
    const alert = await incidentEmails('mail-at-close');
    expect(alert).toHaveLength(1);
    const id = (await h.sql("SELECT id FROM credentials WHERE name = 'mail-at-close'")).rows[0].id as string;
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    h.secret((await current('mail-at-close')).value);
  });

  it('a fingerprint report of another version, when the open incident has no run left (terminated, say), closes that incident and rotates afresh', async () => {
    const id = await store('orphaned-incident', 'sk_orphan_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    const stale = await leftOverIncident(id, 120);
    await store('orphaned-incident', 'sk_orphan_value_0002');
    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_orphan_value_0002'), source: 'new-scan' } });
    expect(res.status, res.text).toBe(202);
    expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 2, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    const incidents = (await h.sql('SELECT id, status FROM leak_incidents WHERE credential_id = $1 ORDER BY opened_at', [id])).rows;
    expect(incidents).toEqual([
      { id: stale, status: 'closed' },
      { id: res.body.results[0].incidentId, status: 'closed' },
    ]);
    h.secret((await current('orphaned-incident')).value);
  });

  it('a leak of the previous version (still working) revokes it too, not only the version the rotation replaces', async () => {
    const id = await store('older-leak', 'sk_older_leak_value_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    await store('older-leak', 'sk_older_leak_value_0002');
    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_older_leak_value_0001'), source: 'old-paste' } });
    expect(res.status, res.text).toBe(202);
    expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    // Before, version 2 was revoked and the leaked version 1 kept working, though later reports of it
    // were answered already-revoked.
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    h.secret((await current('older-leak')).value);
  });

  it('an older version reported while the run revokes the older leaked versions is revoked too, not closed with the incident still working', async () => {
    const id = await store('late-older-leak', 'sk_late_older_leak_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    await store('late-older-leak', 'sk_late_older_leak_0002');
    await store('late-older-leak', 'sk_late_older_leak_0003');
    // Version 2's row held: the leak run (3 → 4) revokes version 3, then waits at version 2's revoke.
    const held = new pg.Client({ connectionString: h.databaseUrl });
    await held.connect();
    try {
      await held.query('BEGIN');
      await held.query('SELECT 1 FROM secret_versions WHERE credential_id = $1 AND version = 2 FOR UPDATE', [id]);
      const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_late_older_leak_0002'), source: 'paste-1' } });
      expect(first.body.results).toEqual([expect.objectContaining({ version: 2, action: 'rotating' })]);
      await waitFor('the run to wait at the revoke of version 2', async () => {
        const revoked = await revokedVersions(id);
        const { rows } = await h.sql('SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted');
        return revoked.includes(3) && rows[0].n > 0 ? true : undefined;
      });
      // Meanwhile version 1 is found pasted too: the running rotation hears of it.
      const second = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_late_older_leak_0001'), source: 'paste-2' } });
      expect(second.body.results).toEqual([expect.objectContaining({ version: 1, action: 'joined' })]);
    } finally {
      await held.query('ROLLBACK').catch(() => undefined);
      await held.end();
    }
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 3, toVersion: 4 });
    // Before, version 1 kept working, its incident closed with version 2's.
    expect(await revokedVersions(id)).toEqual([1, 2, 3]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    h.secret((await current('late-older-leak')).value);
  });

  it('an older version reported late whose revoke the provider refuses, after the owners had their last notice, makes the run rotate again: the next run tries it and tells them', async () => {
    // A key service whose revokes the test can hold or refuse, and four keys it minted: its admin
    // token, and versions 1-3 of the credential (stored by hand, each with its key's id).
    const provider = await new ProviderServer().start();
    let hold: { reached: Promise<void>; release: () => void } | undefined;
    try {
      const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
      await store('late-refused-admin', provider.adminToken, { kind: 'token' });
      const k1 = await mintKey(h, provider);
      const k2 = await mintKey(h, provider);
      const k3 = await mintKey(h, provider);
      const rotation = {
        provider: 'http',
        graceHours: 1,
        settings: {
          create: { url: `${provider.url}/keys` },
          verify: { url: `${provider.url}/whoami`, waitSeconds: 0 },
          revoke: { url: `${provider.url}/keys/{id}` },
          auth: { credential: 'late-refused-admin' },
          valuePath: 'secret',
          idPath: 'id',
        },
      };
      const id = await store('late-refused', k1.secret, { owners: [owner], rotation, externalId: k1.id });
      await store('late-refused', k2.secret, { externalId: k2.id });
      await store('late-refused', k3.secret, { externalId: k3.id });
      // Rotated on request (3 → 4) into its grace period: the owners' notice of it is the run's `notify` step.
      await requestedInGrace('late-refused');
      const firstRun = (await h.client.workflow.getHandle(`rotate:${id}`).describe()).runId;
      const toOwner = async () => (await readMailbox()).filter((m) => recipients(m.mail).includes(owner) && m.mail.subject === '[mailgent] Rotated late-refused');
      await waitFor('the grace notice', async () => ((await toOwner()).length === 1 ? true : undefined));

      // Version 2 is reported leaked: the run revokes version 3 (it replaced it) and waits at version 2's revoke.
      provider.delayNext('revoke', 1, 1); // version 3's revoke goes through (the faults are queued per route, in order)
      hold = provider.holdNext('revoke');
      const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(k2.secret), source: 'paste-1' } });
      expect(first.body.results).toEqual([expect.objectContaining({ version: 2, action: 'rotating' })]);
      await hold.reached;
      // Meanwhile version 1 is found pasted too; the provider refuses its revoke (403), in this run and the next.
      const second = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(k1.secret), source: 'paste-2' } });
      expect(second.body.results).toEqual([expect.objectContaining({ version: 1, action: 'joined' })]);
      provider.failNext('revoke', 1, 403); // this run's late revoke of version 1
      provider.delayNext('revoke', 1, 1); // the next run's revoke of version 4 goes through
      provider.failNext('revoke', 1, 403); // the next run's revoke of version 1
      hold.release();

      // The run told the owners that version 3 is revoked before it tried version 1: with that notice
      // out and version 1 still working, it continues as new, in leak mode (4 → 5), which tries
      // version 1 again. Before, it ended there: version 1 working, the incident closed, no one told.
      const result = await h.client.workflow.getHandle(`rotate:${id}`).result();
      expect(result).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 4, toVersion: 5 });
      expect((await h.client.workflow.getHandle(`rotate:${id}`, firstRun).describe()).status.name).toBe('CONTINUED_AS_NEW');
      // The owners hear it from that run: its notice says version 1 may still work.
      const notices = await waitFor('the notice of the rotation again', async () => {
        const mails = await toOwner();
        return mails.length >= 3 ? mails : undefined;
      });
      expect(notices).toHaveLength(3);
      const texts = notices.map((m) => m.mail.text ?? '');
      const [grace, leakNotice, again] = ['Version 3 keeps working until', 'because a leak was reported.\n\nVersion 4 is now current.', 'Version 5 is now current.'].map(
        (line) => texts.find((t) => t.includes(line)) ?? `(no notice with '${line}' among: ${JSON.stringify(texts)})`,
      );
      expect(grace).toContain('Version 3 keeps working until');
      expect(leakNotice).toContain('Version 3 has been revoked.');
      expect(leakNotice).not.toMatch(/version 1\b/i);
      expect(again).toContain('because a leak was reported');
      expect(again).toContain('Version 4 has been revoked.');
      expect(again).toContain(`- revoking the leaked version 1 (it may still work): DELETE ${provider.url}/keys/{id} answered 403`);
      expect(await whoami(provider, k1.secret)).toBe(200);
      expect(await revokedVersions(id)).toEqual([2, 3, 4]);
      expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1 AND status = 'open'", [id])).rows[0].n).toBe(0);

      // Once the provider lets it be revoked, a report of it again gets it revoked, its incident closed.
      const third = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(k1.secret), source: 'paste-3' } });
      expect(third.body.results).toEqual([expect.objectContaining({ version: 1, action: 'rotating' })]);
      expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 5, toVersion: 6 });
      expect(await whoami(provider, k1.secret)).toBe(401);
      expect(await revokedVersions(id)).toEqual([1, 2, 3, 4, 5]);
      expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1 AND status = 'open'", [id])).rows[0].n).toBe(0);
      // Every revoke the provider saw, by version (its keys in the order they were made: versions 1-6).
      const versionOf = new Map(provider.listKeys().map((k, i) => [`/keys/${k.id}`, i + 1]));
      const revokes = provider.requests.filter((r) => r.route === 'revoke').map((r) => `v${versionOf.get(r.path)} ${r.status}`);
      expect(revokes).toEqual(['v3 200', 'v2 200', 'v1 403', 'v4 200', 'v1 403', 'v5 200', 'v1 200']);
      for (let v = 4; v <= 6; v++) {
        const res = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'late-refused', version: v } });
        if (res.status === 200) h.secret(res.body.value);
      }
    } finally {
      hold?.release();
      await provider.stop();
    }
  });

  it('a leak of a value stored during the grace period (current once the rotation ends) rotates again, in leak mode', async () => {
    const id = await store('stored-in-grace', 'sk_in_grace_value_0001', { rotation: { provider: 'generated', graceHours: 1 } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['stored-in-grace'] } });
    expect(started.status, started.text).toBe(202);
    await waitFor('the grace period', async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r : undefined;
    });
    await store('stored-in-grace', 'sk_in_grace_value_0003');
    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_in_grace_value_0003'), source: 'paste' } });
    expect(res.status, res.text).toBe(202);
    expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 3, action: 'rotating' })]);
    // Before, the run revoked version 1 and ended, and the leaked version 3 stayed current.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 3, toVersion: 4 });
    expect(await revokedVersions(id)).toEqual([1, 3]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    expect((await current('stored-in-grace')).version).toBe(4);
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'stored-in-grace', version: 2 } })).body.value);
  });

  it('matches a SHA-256 fingerprint against stored versions without decrypting them, and rotates only live ones', async () => {
    const id = await store('stripe-live', 'sk_live_fingerprinted_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    const other = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: other.token, body: { name: 'same-value', kind: 'api_key', value: 'sk_live_fingerprinted_0001', rotation: { provider: 'generated' } } });

    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('sk_live_fingerprinted_0001'), source: 'github-scan' } });
    expect(res.status).toBe(202);
    // Only the reporter's own credential matches: another identity's identical value is out of scope.
    expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
    await h.client.workflow.getHandle(`rotate:${id}`).result();
    expect((await current('stripe-live')).version).toBe(2);
    const otherStill = await h.api('POST', '/v1/vault.get', { token: other.token, body: { name: 'same-value' } });
    expect(otherStill.body.version).toBe(1);

    // The admin token reports across identities.
    const admin = await h.api('POST', '/v1/leaks', { token: h.adminToken, body: { fingerprint: sha256('sk_live_fingerprinted_0001'), source: 'admin-scan' } });
    expect(admin.body.results.map((r: { action: string }) => r.action).sort()).toEqual(['already-revoked', 'rotating']);
    const otherId = (await h.sql("SELECT id FROM credentials WHERE name = 'same-value'")).rows[0].id;
    await h.client.workflow.getHandle(`rotate:${otherId}`).result();
    h.secret((await h.api('POST', '/v1/vault.get', { token: other.token, body: { name: 'same-value' } })).body.value);

    const unknown = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256('never-stored-anywhere'), source: 'x' } });
    expect(unknown.status).toBe(404);
    expect(unknown.body.detail).toBe('no stored version matches this fingerprint');
  });

  it('a leak reported by name during the grace period revokes the old value at once and rotates the new one too', async () => {
    const id = await store('signalled', 'signalled-original-0001', { rotation: { provider: 'generated', graceHours: 1 } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['signalled'] } });
    await waitFor('the grace period', async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r.body : undefined;
    });
    h.secret((await current('signalled')).value);
    // By name, the report names the current version: the one this rotation just made (v2).
    const report = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: id, source: 'pager' } });
    expect(report.body.results[0]).toMatchObject({ action: 'rotating', version: 2 });
    // v1 is revoked at once; since v2 itself is reported, the run continues as a leak rotation to v3.
    const result = await h.client.workflow.getHandle(`rotate:${id}`).result();
    expect(result).toMatchObject({ state: 'succeeded', mode: 'leak', fromVersion: 2, toVersion: 3 });
    expect(await rotationsOf(id)).toBe(2);
    expect(await revokedVersions(id)).toEqual([1, 2]);
    expect((await current('signalled')).version).toBe(3);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
  });

  it('a leak signal that names no version (null: an incident recorded before versions were, joined now) revokes the replaced value and tries no revoke of a version "null"', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const id = await store('unversioned-signal', 'unversioned-original-0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 1 } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['unversioned-signal'] } });
    await waitFor('the grace period', async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r.body : undefined;
    });
    h.secret((await current('unversioned-signal')).value);
    // What startLeakRun sends for such an incident: its version column is NULL.
    await h.client.workflow.getHandle(`rotate:${id}`).signal(leakSignal, { incidentId: randomUUID(), version: null as unknown as number });
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    // Every read of a value for the provider found its version: none of "version null".
    const reads = await h.sql("SELECT outcome, detail->>'purpose' AS purpose, detail->>'version' AS version FROM audit_log WHERE credential_id = $1 AND action = 'rotation.read' ORDER BY seq", [id]);
    expect(reads.rows.filter((r) => r.outcome !== 'ok')).toEqual([]);
    expect(reads.rows).toContainEqual({ outcome: 'ok', purpose: 'provider.revoke', version: '1' });
    // The owners' notices name no such revoke among the run's problems.
    const told = await waitFor("the owner's leak notice", async () => {
      const mails = (await readMailbox()).filter((m) => recipients(m.mail).includes(owner) && /revoked/i.test(m.mail.text ?? ''));
      return mails.length > 0 ? mails : undefined;
    });
    for (const m of told) expect(m.mail.text).not.toMatch(/version null/);
  });

  it("a report that found the version live, which its rotation revokes (closing its incident) before the report opens one, is answered already-revoked: no second incident, email or rotation", async () => {
    const id = await store('revoked-meanwhile', 'sk_revoked_meanwhile_0001', { rotation: { provider: 'generated', graceHours: 0 } });
    // The run's end, held: the version revoked (the incident closed), not yet committed; the
    // report reads it live, then waits at its incident's INSERT for this transaction.
    const held = new pg.Client({ connectionString: h.databaseUrl });
    await held.connect();
    try {
      await held.query('BEGIN');
      await held.query('LOCK TABLE leak_incidents IN EXCLUSIVE MODE');
      await held.query('UPDATE secret_versions SET revoked_at = now() WHERE credential_id = $1 AND version = 1', [id]);
      const report = h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'revoked-meanwhile', source: 'slow-scan' } });
      await waitFor('the report to wait at its incident', async () => {
        const { rows } = await h.sql(`SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted AND relation = 'leak_incidents'::regclass`);
        return rows[0].n > 0 ? true : undefined;
      });
      await held.query('COMMIT');
      const res = await report;
      // Before, it opened a second incident and started a leak rotation of the value that had replaced the leaked one.
      expect(res.status, res.text).toBe(202);
      expect(res.body.results).toEqual([{ credentialId: id, version: 1, action: 'already-revoked' }]);
    } finally {
      await held.query('ROLLBACK').catch(() => undefined);
      await held.end();
    }
    expect((await h.sql('SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1', [id])).rows[0].n).toBe(0);
    expect((await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE purpose = 'leak.incident' AND subject LIKE '%revoked-meanwhile'`)).rows[0].n).toBe(0);
    await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toBeInstanceOf(WorkflowNotFoundError);
  });

  it('when a leak rotation fails, the incident closes and the next report tries again', async () => {
    // A role's password whose admin connection names no stored credential: the leak rotation fails at its create (and says so).
    const id = await store('unrotatable-role', 'role-password-0001', { rotation: { provider: 'postgres-role', settings: { adminCredential: 'no-such-admin-url', role: 'app' } } });
    const first = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'unrotatable-role', source: 'scan-1' } });
    expect(first.body.results[0].action).toBe('rotating');
    await expect(h.client.workflow.getHandle(`rotate:${id}`).result()).rejects.toThrow();
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    const second = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'unrotatable-role', source: 'scan-2' } });
    expect(second.body.results[0].action).toBe('rotating');
    expect(second.body.results[0].incidentId).not.toBe(first.body.results[0].incidentId);
    await expect(h.client.workflow.getHandle(`rotate:${id}`).result()).rejects.toThrow();
  });

  /** Stores `name`, rotates it into its grace period (v2 current, v1 still working), then deletes it; its id. */
  const deletedInGrace = async (name: string, value: string, graceHours: number, extra: Record<string, unknown> = {}) => {
    const id = await store(name, value, { ...extra, rotation: { provider: 'generated', graceHours } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(started.status, started.text).toBe(202);
    await waitFor('the grace period', async () => {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      return r.body.state === 'grace' ? r : undefined;
    });
    h.secret((await current(name)).value);
    expect((await h.api('DELETE', `/v1/credentials/${name}`, { token: agent.token })).status).toBe(200);
    return id;
  };

  it('a credential deleted during its rotation\'s grace period still has its old value revoked when the grace period ends', async () => {
    const id = await deletedInGrace('deleted-in-grace', 'sk_deleted_in_grace_0001', 0.003);
    // Before, the revoke refused the deleted credential for good: the old value stayed live, the run ended revoke_failed.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    // The delete came first (the grace period, 10.8 s, outlasted it): the revoke went on for a deleted credential.
    const order = (await h.sql(`SELECT action FROM audit_log WHERE credential_id = $1 AND action IN ('credential.delete', 'rotation.revoke') AND outcome = 'ok' ORDER BY seq`, [id])).rows;
    expect(order.map((r) => r.action)).toEqual(['credential.delete', 'rotation.revoke']);
  });

  it('a leak of a soft-deleted credential is not rotated and not a 404: the security contacts and owners are told once; a destroyed one is a 404', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const value = 'sk_deleted_then_leaked_0001';
    const id = await store('deleted-leak', value, { owners: [owner], rotation: { provider: 'generated', graceHours: 0 } });
    expect((await h.api('DELETE', '/v1/credentials/deleted-leak', { token: agent.token })).status).toBe(200);
    const subject = '[mailgent] SECURITY: leak reported for deleted-leak (deleted; not rotated)';

    // Before, a 404 ("no stored version matches this fingerprint"), and no one was told.
    const byValue = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'paste-site-scan' } });
    expect(byValue.status, byValue.text).toBe(202);
    expect(byValue.body).toEqual({ results: [{ credentialId: id, version: 1, action: 'deleted' }] });
    const told = await onlyEmail(subject);
    expect(recipients(told.mail)).toEqual(expect.arrayContaining([security, owner]));
    expect(told.mail.text).toContain('does not rotate it');
    expect(told.mail.text).toContain(`POST /v1/credentials/${id}/restore`);
    // Not rotated, not restored, no incident.
    expect((await h.sql('SELECT deleted_at IS NOT NULL AS deleted, current_version FROM credentials WHERE id = $1', [id])).rows).toEqual([{ deleted: true, current_version: 1 }]);
    expect((await h.sql('SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1', [id])).rows[0].n).toBe(0);
    await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toThrow(WorkflowNotFoundError);

    // By name (a deleted credential's name stays taken until it is destroyed), again: answered the same, no second email.
    const byName = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'deleted-leak', source: 'paste-site-scan' } });
    expect(byName.body).toEqual({ results: [{ credentialId: id, version: 1, action: 'deleted' }] });
    const audited = (await h.sql(`SELECT detail FROM audit_log WHERE action = 'leak.report' AND credential_id = $1 ORDER BY seq`, [id])).rows;
    expect(audited.map((r) => r.detail.results)).toEqual([['deleted'], ['deleted']]);
    await new Promise((r) => setTimeout(r, 1_000));
    expect((await readMailbox()).filter((m) => m.mail.subject === subject)).toHaveLength(1);
    const emails = async (n: number) =>
      waitFor(`${n} emails about the deleted credential`, async () => {
        const mails = (await readMailbox()).filter((m) => m.mail.subject === subject);
        return mails.length >= n ? mails : undefined;
      });
    // Its email given up on (a day of SMTP refusals, say): the next report tells them again.
    await h.sql(`UPDATE mail_outbox SET status = 'abandoned' WHERE purpose = 'leak.incident' AND recipients @> $1::text[] AND status = 'sent' AND subject = $2`, [[owner], subject]);
    expect((await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'paste-site-scan' } })).body.results[0].action).toBe('deleted');
    expect(await emails(2)).toHaveLength(2);
    // Restored and deleted again, a leak is news again.
    expect((await h.api('POST', `/v1/credentials/${id}/restore`, { token: agent.token })).status).toBe(200);
    expect((await h.api('DELETE', `/v1/credentials/${id}`, { token: agent.token })).status).toBe(200);
    expect((await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'paste-site-scan' } })).body.results[0].action).toBe('deleted');
    expect(await emails(3)).toHaveLength(3);

    // Destroyed, nothing of it is left to match.
    expect((await h.api('DELETE', `/v1/credentials/${id}?destroy=true`, { token: agent.token })).status).toBe(200);
    expect((await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'paste-site-scan' } })).status).toBe(404);
  });

  it('a leak of a credential without a rotation policy is not "rotated" into a random value: it stays, not marked revoked, and the security contacts and owners are told to revoke it; with a policy given, a report again rotates it', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const value = 'sk_no_policy_leaked_0001';
    const id = await store('no-policy-leak', value, { owners: [owner] });
    const subject = '[mailgent] SECURITY: leak reported for no-policy-leak (no rotation policy; not rotated)';
    // Before: rotated with the generated provider's defaults (a random value stored as version 2, version 1
    // recorded as revoked, the incident email and the notice saying so) while the leaked key still worked at its issuer.
    const byValue = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'repo-scanner' } });
    expect(byValue.status, byValue.text).toBe(202);
    expect(byValue.body).toEqual({ results: [{ credentialId: id, version: 1, action: 'no-policy' }] });
    const told = await onlyEmail(subject);
    expect(recipients(told.mail)).toEqual(expect.arrayContaining([security, owner]));
    expect(told.mail.text).toContain('no rotation policy, so Mailgent cannot rotate it');
    expect(told.mail.text).toContain(`PATCH /v1/credentials/${id}`);
    expect(told.mail.text).not.toContain(value);
    expect(await current('no-policy-leak')).toMatchObject({ version: 1, value });
    expect(await revokedVersions(id)).toEqual([]);
    expect((await h.sql('SELECT count(*)::int AS n FROM leak_incidents WHERE credential_id = $1', [id])).rows[0].n).toBe(0);
    await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toThrow(WorkflowNotFoundError);
    // Again, by name: the same answer, no second email.
    const again = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'no-policy-leak', source: 'repo-scanner' } });
    expect(again.body).toEqual({ results: [{ credentialId: id, version: 1, action: 'no-policy' }] });
    await new Promise((r) => setTimeout(r, 1_000));
    expect((await readMailbox()).filter((m) => m.mail.subject === subject)).toHaveLength(1);

    // Given a policy, the leak is rotated as any other.
    expect((await h.api('PATCH', '/v1/credentials/no-policy-leak', { token: agent.token, body: { rotation: { provider: 'generated', graceHours: 0 } } })).status).toBe(200);
    const rotated = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'repo-scanner' } });
    expect(rotated.body.results[0]).toMatchObject({ credentialId: id, version: 1, action: 'rotating' });
    await h.client.workflow.getHandle(`rotate:${id}`).result();
    expect(await revokedVersions(id)).toEqual([1]);
  });

  it('a leaked TOTP seed (no provider makes them) is answered no-policy, and they are told to enrol a new one', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const seed = 'JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXQ';
    const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'leaked-totp-seed', kind: 'totp_seed', totp: { secret: h.secret(seed) }, owners: [owner] } });
    expect(res.status).toBe(201);
    // Before: a leak rotation that failed at its plan ("a generated value would not be a TOTP seed"), its emails saying rotating, then failed.
    const reported = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'leaked-totp-seed', source: 'screenshot-scan' } });
    expect(reported.body).toEqual({ results: [{ credentialId: res.body.id, version: 1, action: 'no-policy' }] });
    const told = await onlyEmail('[mailgent] SECURITY: leak reported for leaked-totp-seed (no rotation policy; not rotated)');
    expect(told.mail.text).toContain('enrol a new seed with its service');
    await expect(h.client.workflow.getHandle(`rotate:${res.body.id}`).describe()).rejects.toThrow(WorkflowNotFoundError);
  });

  it("a leak of a deleted credential whose rotation ends between the report's look and its signal is told, not rotated: no leak run is started for it", async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const id = await store('deleted-run-ending', 'sk_deleted_run_ending_0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 0 } });
    expect((await h.api('DELETE', '/v1/credentials/deleted-run-ending', { token: agent.token })).status).toBe(200);
    // Temporal as the report sees it: the rotation running when it looks, ended when it signals; a start would be a failure.
    const gone = (workflowId: string) => ({
      describe: async () => ({ status: { name: 'RUNNING' }, workflowId, runId: 'ended-since' }),
      signal: async () => Promise.reject(new WorkflowNotFoundError('workflow execution already completed', workflowId, 'ended-since')),
    });
    const deps = depsWithHandles(gone);
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    // Before: a leak run started (signal-with-start), which failed at its create; its emails said rotating, then failed.
    const { results } = await reportLeak(deps, caller, agent.id, { credential: 'deleted-run-ending', source: 'scan' });
    expect(results).toEqual([{ credentialId: id, version: 1, action: 'deleted' }]);
    const incidents = (await h.sql('SELECT status, rotation_id FROM leak_incidents WHERE credential_id = $1', [id])).rows;
    expect(incidents).toEqual([{ status: 'closed', rotation_id: expect.any(String) }]);
    expect((await h.sql('SELECT cancelled_at IS NOT NULL AS cancelled FROM rotations WHERE id = $1', [incidents[0].rotation_id])).rows).toEqual([{ cancelled: true }]);
    expect((await h.sql(`SELECT status FROM mail_outbox WHERE purpose = 'leak.incident' AND recipients @> $1::text[] ORDER BY created_at`, [[owner]])).rows.map((r) => r.status)).toEqual([
      'abandoned',
      expect.stringMatching(/^(queued|sending|sent)$/),
    ]);
    await onlyEmail('[mailgent] SECURITY: leak reported for deleted-run-ending (deleted; not rotated)');
    expect((await readMailbox()).filter((m) => m.mail.subject === '[mailgent] SECURITY: leak reported for deleted-run-ending')).toEqual([]);
    await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toThrow(WorkflowNotFoundError);
  });

  it("a leak of a deleted credential whose rotation a parallel report's signal reached first is answered as heard: its incident not closed, not told as unrotated", async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const id = await store('deleted-heard-first', 'sk_deleted_heard_first_0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 0 } });
    expect((await h.api('DELETE', '/v1/credentials/deleted-heard-first', { token: agent.token })).status).toBe(200);
    // Running when the report looks; by its signal, ended, a parallel report having signalled it first (recording the run on the incident's rotation).
    let looks = 0;
    const handle = (workflowId: string) => ({
      describe: async () => {
        looks += 1;
        if (looks === 1) return { status: { name: 'RUNNING' }, workflowId, runId: 'heard-run' };
        await h.sql(`UPDATE rotation_runs SET run_id = 'heard-run' WHERE credential_id = $1 AND run_id IS NULL`, [id]);
        return { status: { name: 'COMPLETED' }, workflowId, runId: 'heard-run' };
      },
      signal: async () => Promise.reject(new WorkflowNotFoundError('workflow execution already completed', workflowId, 'heard-run')),
    });
    const deps = depsWithHandles(handle);
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    const { results } = await reportLeak(deps, caller, agent.id, { credential: 'deleted-heard-first', source: 'scan' });
    // Before this check, the incident was closed, its email abandoned and its rotation marked cancelled under the run that heard it.
    expect(results).toEqual([expect.objectContaining({ credentialId: id, action: 'rotating' })]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'open' }]);
    expect((await h.sql(`SELECT count(*)::int AS n FROM mail_outbox WHERE recipients @> $1::text[] AND status = 'abandoned'`, [[owner]])).rows[0].n).toBe(0);
    expect((await h.sql('SELECT count(*)::int AS n FROM mail_outbox WHERE subject LIKE $1', ['%deleted-heard-first (deleted; not rotated)'])).rows[0].n).toBe(0);
    await h.sql(`UPDATE leak_incidents SET status = 'closed', closed_at = now() WHERE credential_id = $1`, [id]);
  });

  it("a leak of a deleted credential whose rotation still runs (in its grace period) is heard by that rotation: the leaked value is revoked at once", async () => {
    const value = 'sk_deleted_grace_leak_0001';
    const id = await deletedInGrace('deleted-grace-leak', value, 1);
    const report = await h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint: sha256(value), source: 'paste-site-scan' } });
    // Answered as any leak the running rotation hears, not 'deleted' (left working until the grace period's end, an hour on).
    expect(report.body.results).toMatchObject([{ credentialId: id, version: 1, action: 'rotating' }]);
    expect(await waitFor('the leaked version revoked', async () => ((await revokedVersions(id)).includes(1) ? revokedVersions(id) : undefined))).toEqual([1]);
    // The leak cut the grace period short: the run ends now, not in an hour. (Before, the test
    // terminated it, and failed whenever the run had ended first.)
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', fromVersion: 1, toVersion: 2 });
  });

  it("a leak of the current value of a credential deleted during its rotation's grace period is told as not rotated (deleted), not as a failed rotation: the run revokes the previous value and succeeds", async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const name = 'deleted-grace-current-leak';
    const id = await deletedInGrace(name, 'sk_deleted_grace_current_0001', 1, { owners: [owner] });
    // By name: the current version, v2, the one the running rotation made.
    const report = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: name, source: 'paste-site-scan' } });
    expect(report.body.results).toMatchObject([{ credentialId: id, version: 2, action: 'rotating' }]);

    // Before: the run revoked v1, then continued as new in leak mode to rotate v2; that run failed at
    // its plan ("is deleted; it is not rotated"), the credential was marked rotation_failed, and the
    // owners and the security contacts got "Rotation FAILED … Rotate it again" (which a deleted credential cannot be).
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', leakReported: true, fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    expect(await rotationsOf(id)).toBe(1);
    expect((await h.sql('SELECT outcome FROM run_outcomes WHERE credential_id = $1', [id])).rows).toEqual([{ outcome: 'rotated' }]);
    expect((await h.sql('SELECT status, current_version FROM credentials WHERE id = $1', [id])).rows).toEqual([{ status: 'active', current_version: 2 }]);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE credential_id = $1', [id])).rows).toEqual([{ status: 'closed' }]);
    // The leak of v2 is told as a report of it now would tell it: deleted, so not rotated; revoke it by hand, or restore and report again.
    const told = await onlyEmail(`[mailgent] SECURITY: leak reported for ${name} (deleted; not rotated)`);
    expect(recipients(told.mail)).toEqual(expect.arrayContaining([security, owner]));
    expect(told.mail.text).toContain('(version 2) was reported by paste-site-scan');
    expect(told.mail.text).toContain(`POST /v1/credentials/${id}/restore`);
    await new Promise((r) => setTimeout(r, 1_000));
    const subjects = (await readMailbox()).filter((m) => recipients(m.mail).includes(owner)).map((m) => m.mail.subject);
    expect(subjects.filter((s) => s?.includes('FAILED'))).toEqual([]);
    expect(subjects.filter((s) => s === `[mailgent] Rotated ${name}`)).toHaveLength(2); // the grace notice, and the leak's: v1 revoked
  });

  it("a leak of a credential deleted during its rotation's grace period that the rotation never heard is told when it ends, not rotated again", async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const id = await deletedInGrace('unheard-deleted', 'sk_unheard_deleted_0001', 0.002, { owners: [owner] }); // 7.2 s of grace
    // Version 2, current in the grace period, reported leaked; the report's signal to the running rotation is lost (503, its incident left open).
    const losingSignals = depsWithHandles((workflowId: string) => {
      const real = h.client.workflow.getHandle(workflowId);
      return { describe: () => real.describe(), signal: async () => Promise.reject(new Error('14 UNAVAILABLE: the connection was lost')) };
    });
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    await expect(reportLeak(losingSignals, caller, agent.id, { credential: 'unheard-deleted', source: 'scan' })).rejects.toMatchObject({ status: 503 });
    const [incident] = (await h.sql('SELECT id, version, rotation_id, status FROM leak_incidents WHERE credential_id = $1', [id])).rows;
    expect(incident).toMatchObject({ version: 2, status: 'open' });

    // Before: the run went on in leak mode (continue-as-new), which failed at its plan: its emails said rotating, then failed.
    expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'requested', fromVersion: 1, toVersion: 2 });
    expect(await revokedVersions(id)).toEqual([1]);
    expect(await rotationsOf(id)).toBe(1);
    expect((await h.sql('SELECT status FROM leak_incidents WHERE id = $1', [incident.id])).rows).toEqual([{ status: 'closed' }]);
    expect((await h.sql('SELECT cancelled_at IS NOT NULL AS cancelled FROM rotations WHERE id = $1', [incident.rotation_id])).rows).toEqual([{ cancelled: true }]);
    expect((await h.sql('SELECT status FROM mail_outbox WHERE id = $1', [incidentMailId(incident.id)])).rows).toEqual([{ status: 'abandoned' }]);
    const told = await onlyEmail('[mailgent] SECURITY: leak reported for unheard-deleted (deleted; not rotated)');
    expect(told.mail.text).toContain("(version 2) was reported by scan");
    expect((await readMailbox()).filter((m) => m.mail.subject === '[mailgent] SECURITY: leak reported for unheard-deleted')).toEqual([]);
  });

  it('an unstarted incident of a credential deleted or destroyed, or its policy taken away, since its report is told by the sweep, not rotated', async () => {
    const owner = `owner-${randomUUID().slice(0, 8)}@example.com`;
    const ids = {
      deleted: await store('resumed-deleted', 'sk_resumed_deleted_0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 0 } }),
      unmanaged: await store('resumed-unmanaged', 'sk_resumed_unmanaged_0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 0 } }),
      destroyed: await store('resumed-destroyed', 'sk_resumed_destroyed_0001', { owners: [owner], rotation: { provider: 'generated', graceHours: 0 } }),
    };
    const caller = { identityId: agent.id, actor: `identity:${agent.id}`, requestId: randomUUID() };
    // Each report's incident, rotation and email committed; its start never made (a 503, or the process gone), and the report not repeated.
    for (const name of ['resumed-deleted', 'resumed-unmanaged', 'resumed-destroyed']) {
      await expect(reportLeak(depsLosingSignalWithStart(), caller, agent.id, { credential: name, source: 'scan' })).rejects.toMatchObject({ status: 503 });
    }
    expect((await h.api('DELETE', '/v1/credentials/resumed-deleted', { token: agent.token })).status).toBe(200);
    expect((await h.api('PATCH', '/v1/credentials/resumed-unmanaged', { token: agent.token, body: { rotation: null } })).status).toBe(200);
    expect((await h.api('DELETE', '/v1/credentials/resumed-destroyed?destroy=true', { token: agent.token })).status).toBe(200);
    const incidents = (
      await h.sql(`UPDATE leak_incidents SET opened_at = now() - interval '2 minutes' WHERE credential_id = ANY($1::uuid[]) RETURNING id, rotation_id`, [Object.values(ids)])
    ).rows;
    expect(incidents).toHaveLength(3);
    const resume = () => createActivities(h.deps).resumeLeakIncidents({ asOf: new Date().toISOString() });
    // Before: a leak run started for each, which failed at its first step, its emails saying rotating, then failed.
    // (Destroyed, it is told from its row, which the destroy keeps: before, describing it to tell it failed,
    // and the sweep's first step was retried for ever, every later sweep skipped.)
    expect(await resume()).toEqual({ started: 0, told: 3 });
    for (const incident of incidents) {
      expect((await h.sql('SELECT status FROM leak_incidents WHERE id = $1', [incident.id])).rows).toEqual([{ status: 'closed' }]);
      expect((await h.sql('SELECT cancelled_at IS NOT NULL AS cancelled FROM rotations WHERE id = $1', [incident.rotation_id])).rows).toEqual([{ cancelled: true }]);
      expect((await h.sql('SELECT status FROM mail_outbox WHERE id = $1', [incidentMailId(incident.id)])).rows).toEqual([{ status: 'abandoned' }]);
    }
    const destroyed = await onlyEmail('[mailgent] SECURITY: leak reported for resumed-destroyed (destroyed; not rotated)');
    expect(destroyed.mail.text).toContain('revoke it there by hand');
    expect(recipients(destroyed.mail)).toEqual(expect.arrayContaining([owner, security]));
    await onlyEmail('[mailgent] SECURITY: leak reported for resumed-deleted (deleted; not rotated)');
    const unmanaged = await onlyEmail('[mailgent] SECURITY: leak reported for resumed-unmanaged (no rotation policy; not rotated)');
    expect(unmanaged.mail.text).toContain('It has no rotation policy');
    for (const id of Object.values(ids)) await expect(h.client.workflow.getHandle(`rotate:${id}`).describe()).rejects.toThrow(WorkflowNotFoundError);
    expect(await resume()).toEqual({ started: 0, told: 0 });
    expect((await readMailbox()).filter((m) => /^\[mailgent\] SECURITY: leak reported for resumed-(deleted|unmanaged|destroyed)$/.test(m.mail.subject ?? ''))).toEqual([]);
  });

  it('refuses details that carry the leaked value, and unknown credentials', async () => {
    await store('careful', 'careful-secret-value-01');
    const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'careful', source: 'x', details: 'found careful-secret-value-01 in a gist' } });
    expect(res.status).toBe(422);
    expect(res.body.detail).toMatch(/^details must not contain a stored value/);
    expect(res.text).not.toContain('careful-secret-value-01');
    // The source goes into the audit row, the rotation's reason and the incident email just the same.
    const bySource = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'careful', source: 'pastebin: careful-secret-value-01' } });
    expect(bySource.status).toBe(422);
    expect(bySource.body.detail).toMatch(/^source must not contain a stored value/);
    expect((await h.sql("SELECT count(*)::int AS n FROM rotations WHERE reason LIKE '%careful-secret-value-01%'")).rows[0].n).toBe(0);
    expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents i JOIN credentials c ON c.id = i.credential_id WHERE c.name = 'careful'")).rows[0].n).toBe(0);
    // Nor a value another identity granted it: the incident email goes to owners the reporter sets.
    const granter = await h.createIdentity();
    const granted = await h.api('POST', '/v1/vault.store', { token: granter.token, body: { name: 'shared', kind: 'api_key', value: h.secret('granted-secret-value-01') } });
    expect(granted.status).toBe(201);
    const grant = await h.api('POST', '/v1/grants', { token: granter.token, body: { credential: granted.body.id, grantee: 'leaky-agent' } });
    expect(grant.status, grant.text).toBe(201);
    const viaGrant = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'careful', source: 'x', details: 'see granted-secret-value-01' } });
    expect(viaGrant.status, viaGrant.text).toBe(422);
    expect(viaGrant.body.detail).toMatch(/^details must not contain a stored value/);
    expect(viaGrant.text).not.toContain('granted-secret-value-01');
    expect((await h.sql("SELECT count(*)::int AS n FROM leak_incidents i JOIN credentials c ON c.id = i.credential_id WHERE c.name = 'careful'")).rows[0].n).toBe(0);
    expect((await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'nope', source: 'x' } })).status).toBe(404);
    const other = await h.createIdentity();
    expect((await h.api('POST', '/v1/leaks', { token: other.token, body: { credential: 'careful', source: 'x' } })).status).toBe(404);
    expect((await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'careful', fingerprint: sha256('x'), source: 'x' } })).status).toBe(400);
    const mails = (await readMailbox()).filter((m) => m.mail.subject === '[mailgent] SECURITY: leak reported for careful');
    expect(mails).toEqual([]);
  });

  // README: any 8-4-4-4-12 hex string is taken as an id. These compared `id::text`, which is lower
  // case: an id in upper case was a 404 (or an empty trail) for the caller's own credential.
  describe("the caller's own credential named by its id in upper case", () => {
    const upperId = async (name: string) => {
      const id = await store(name, `sk_${name}_${randomUUID()}`, { rotation: { provider: 'generated', graceHours: 0 } });
      expect(id.toUpperCase()).not.toBe(id);
      return { id, upper: id.toUpperCase() };
    };

    it('is reported leaked', async () => {
      const { id, upper } = await upperId('upper-leaked');
      const res = await h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: upper, source: 'upper-case-scan' } });
      expect(res.status, res.text).toBe(202);
      expect(res.body.results).toEqual([expect.objectContaining({ credentialId: id, version: 1, action: 'rotating' })]);
      expect(await h.client.workflow.getHandle(`rotate:${id}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
      expect((await current('upper-leaked')).version).toBe(2);
    });

    it('is rotated', async () => {
      const { id, upper } = await upperId('upper-rotated');
      const res = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [upper] } });
      expect(res.status, res.text).toBe(202);
      expect(res.body.workflowIds).toEqual([`rotate:${id}`]);
      expect(await h.client.workflow.getHandle(res.body.batchWorkflowId).result()).toEqual({ total: 1, rotated: 1, failed: 0 });
      expect((await current('upper-rotated')).version).toBe(2);
    });

    it("lists its audit trail, and leaves no denied row against its owner", async () => {
      const { id, upper } = await upperId('upper-audited');
      const res = await h.api('GET', `/v1/audit?credential=${upper}`, { token: agent.token });
      expect(res.status, res.text).toBe(200);
      expect(res.body.items).toEqual(expect.arrayContaining([expect.objectContaining({ action: 'vault.store', credentialId: id, outcome: 'ok' })]));
      const denied = await h.sql("SELECT count(*)::int AS n FROM audit_log WHERE action = 'audit.list' AND outcome = 'denied' AND request_id = $1", [res.headers.get('x-request-id')]);
      expect(denied.rows[0].n).toBe(0);
    });
  });
});
