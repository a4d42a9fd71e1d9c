import { readFileSync } from 'node:fs';
import { createHash, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';
import { auditChangeMade } from '../vault/audit';

/**
 * A change made outside the database's transaction (a Temporal cancel, update or start) whose ok
 * audit row then cannot be written: it was carried out, so its answer must not say it was not
 * (503 audit-unavailable, "try again", which a rollback's retry then answers with a 409).
 */
describe('a change made whose audit row cannot be written', () => {
  let h: Harness;
  let agent: { id: string; token: string };

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    agent = await h.createIdentity('unrecorded-agent', `unrecorded-${randomUUID().slice(0, 8)}@example.com`);
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  /**
   * Refuses the next `times` ok rows of `action` whose detail has `key` (all of them by default): the
   * route's row, not the worker's rows of the same action (a rollback activity's has no rolledBack
   * count). As a database lost just after the change: the append fails, nothing else does. Fires
   * before the chain's trigger. Returns how to stop, which says how many rows it refused.
   */
  const refuseAudit = async (action: string, key: string, times = 1_000_000) => {
    await h.sql('DROP TRIGGER IF EXISTS a_refuse_audit ON audit_log');
    await h.sql('CREATE SEQUENCE IF NOT EXISTS audit_refusals');
    await h.sql('ALTER SEQUENCE audit_refusals RESTART');
    await h.sql(`CREATE OR REPLACE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF NEW.action = TG_ARGV[0] AND NEW.outcome = 'ok' AND NEW.detail ? TG_ARGV[1] THEN
          IF nextval('audit_refusals') <= TG_ARGV[2]::bigint THEN
            RAISE EXCEPTION 'audit row refused by the test';
          END IF;
        END IF;
        RETURN NEW;
      END $$`);
    await h.sql(`CREATE TRIGGER a_refuse_audit BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION refuse_audit('${action}', '${key}', '${times}')`);
    let stopped = false;
    return async () => {
      if (!stopped) await h.sql('DROP TRIGGER a_refuse_audit ON audit_log');
      stopped = true;
      const { rows } = await h.sql('SELECT last_value, is_called FROM audit_refusals');
      return Math.min(rows[0].is_called ? Number(rows[0].last_value) : 0, times);
    };
  };
  /** Calls `call` while refuseAudit(action, key, times) is in place; says how many rows it refused. */
  const whileRefused = async <T>(action: string, key: string, call: () => Promise<T>, times?: number) => {
    const stop = await refuseAudit(action, key, times);
    let res: T;
    try {
      res = await call();
    } catch (err) {
      await stop();
      throw err;
    }
    return { res, refused: await stop() };
  };
  const rowsOf = async (requestId: string) =>
    (await h.sql('SELECT action, outcome, detail FROM audit_log WHERE request_id = $1 ORDER BY seq', [requestId])).rows;
  const inGrace = async (name: string) => {
    const stored = await h.api('POST', '/v1/vault.store', {
      token: agent.token,
      body: { name, kind: 'api_key', value: h.secret(`sk_live_${name}_${randomUUID()}`), rotation: { provider: 'generated', settings: { length: 40 }, graceHours: 1 } },
    });
    expect(stored.status, stored.text).toBe(201);
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } });
    expect(started.status, started.text).toBe(202);
    for (let i = 0; ; i++) {
      if ((await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state === 'grace') break;
      if (i > 150) throw new Error(`rotation of ${name} never reached its grace period`);
      await new Promise((r) => setTimeout(r, 200));
    }
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } })).body.value);
    return { credentialId: stored.body.id as string, rotationId: started.body.rotationId as string };
  };
  const logged = async (requestId: string) => {
    for (let i = 0; i < 50; i++) {
      const line = readFileSync(h.logFile, 'utf8')
        .split('\n')
        .find((l) => l.includes(requestId) && l.includes('its audit row could not be written'));
      if (line) return JSON.parse(line);
      await new Promise((r) => setTimeout(r, 100));
    }
    return undefined;
  };

  it('a rollback made whose row cannot be written is a 503 marked unconfirmed saying it was made, audited as such and logged; not "not carried out"', async () => {
    const { credentialId, rotationId } = await inGrace('rollback-unrecorded');
    const { res, refused } = await whileRefused('rotation.rollback', 'rolledBack', () => h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: agent.token }));
    expect(res.status, res.text).toBe(503);
    // Before: 503 audit-unavailable, "the request was not carried out; try again shortly".
    expect(res.body).toMatchObject({
      type: 'https://mailgent.dev/problems/unavailable',
      unconfirmed: true,
      detail: expect.stringMatching(new RegExp(`^the rollback of rotation ${rotationId} was carried out, but it could not be recorded in the audit log`)),
    });
    // Tried three times (at 0, 0.5 and 1.5 s) before the answer.
    expect(refused).toBe(3);
    // It was made: the first version is current again.
    expect((await h.sql('SELECT current_version FROM credentials WHERE id = $1', [credentialId])).rows[0].current_version).toBe(1);
    // Its row, once the database takes rows again, says it failed unconfirmed (as an unanswered COMMIT's does).
    expect(await rowsOf(res.body.requestId)).toEqual([
      { action: 'rotation.rollback', outcome: 'failed', detail: expect.objectContaining({ rotationId, rolledBack: 1, unconfirmed: true, error: 'unavailable', status: 503 }) },
    ]);
    const line = await logged(res.body.requestId);
    expect(line).toMatchObject({ level: 50, unaudited: { action: 'rotation.rollback', detail: { rotationId, rolledBack: 1 } } });
    // A retry finds it made.
    const again = await h.api('POST', `/v1/rotations/${rotationId}/rollback`, { token: agent.token });
    expect(again.status, again.text).toBe(409);
  });

  it('a row whose answer was lost is not written again by the retry', async () => {
    const requestId = `lost-answer-${randomUUID()}`;
    const real = h.deps.pool;
    let inserts = 0;
    // The first insert reaches the database and commits; its answer is lost on the way back, as when the connection drops.
    const pool = {
      query: async (...args: Parameters<typeof real.query>) => {
        const res = await (real.query as (...a: unknown[]) => Promise<unknown>)(...args);
        if (typeof args[0] === 'object' && (args[0] as { name?: string }).name === 'audit-append' && ++inserts === 1) throw new Error('Connection terminated unexpectedly');
        return res;
      },
    } as unknown as typeof real;
    await auditChangeMade({ pool }, { identityId: agent.id, actor: 'test', action: 'rotation.cancel', outcome: 'ok', requestId, detail: { cancelled: 1 } }, 'the cancellation');
    expect(inserts).toBe(1);
    expect(await rowsOf(requestId)).toEqual([{ action: 'rotation.cancel', outcome: 'ok', detail: { cancelled: 1, auditKey: expect.any(String) } }]);

    // A request id is the client's to choose: another change under the same id, whose first insert never
    // reached the database, is written on the retry (the look is for this write's own key, not the id).
    let failed = false;
    const losing = {
      query: async (...args: Parameters<typeof real.query>) => {
        if (typeof args[0] === 'object' && (args[0] as { name?: string }).name === 'audit-append' && !failed) {
          failed = true;
          throw new Error('connect ECONNREFUSED');
        }
        return (real.query as (...a: unknown[]) => Promise<unknown>)(...args);
      },
    } as unknown as typeof real;
    await auditChangeMade({ pool: losing }, { identityId: agent.id, actor: 'test', action: 'rotation.cancel', outcome: 'ok', requestId, detail: { cancelled: 2 } }, 'the cancellation');
    expect((await rowsOf(requestId)).map((r) => r.detail.cancelled)).toEqual([1, 2]);
  });

  it('a cancel made whose row fails twice is written on the third try and answered as made', async () => {
    const { credentialId, rotationId } = await inGrace('cancel-retried');
    const { res, refused } = await whileRefused('rotation.cancel', 'cancelled', () => h.api('DELETE', `/v1/rotations/${rotationId}`, { token: agent.token }), 2);
    // Before: 503 audit-unavailable after the cancel had gone through.
    expect(res.status, res.text).toBe(202);
    expect(refused).toBe(2);
    expect(res.body).toMatchObject({ rotationId, cancelling: [credentialId], notStarted: [] });
    expect(await rowsOf(res.headers.get('x-request-id')!)).toEqual([
      { action: 'rotation.cancel', outcome: 'ok', detail: expect.objectContaining({ rotationId, cancelled: 1, notStarted: 0 }) },
    ]);
    await h.client.workflow.getHandle(`rotate:${credentialId}`).result().catch(() => undefined);
  });

  it('a leak report carried out whose row cannot be written is a 503 marked unconfirmed saying it was made; its rotation runs', async () => {
    const value = h.secret(`sk_live_leak_unrecorded_${randomUUID()}`);
    const stored = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'leak-unrecorded', kind: 'api_key', value, rotation: { provider: 'generated' } } });
    expect(stored.status, stored.text).toBe(201);
    const credentialId = stored.body.id as string;
    const { res, refused } = await whileRefused('leak.report', 'matched', () => h.api('POST', '/v1/leaks', { token: agent.token, body: { credential: 'leak-unrecorded', source: 'unrecorded-scan' } }));
    expect(res.status, res.text).toBe(503);
    expect(res.body).toMatchObject({
      type: 'https://mailgent.dev/problems/unavailable',
      unconfirmed: true,
      detail: expect.stringMatching(/^the leak report \(rotating\) was carried out, but it could not be recorded in the audit log/),
    });
    // Not an invitation to repeat it (a client honouring Retry-After would): it was carried out. (Before: Retry-After: 5.)
    expect(res.headers.get('retry-after')).toBeNull();
    expect(refused).toBe(3);
    expect(await rowsOf(res.body.requestId)).toEqual([
      // The incident's email row, written with the incident, is the request's too.
      { action: 'mail.send', outcome: 'ok', detail: expect.objectContaining({ purpose: 'leak.incident' }) },
      { action: 'leak.report', outcome: 'failed', detail: expect.objectContaining({ source: 'unrecorded-scan', results: ['rotating'], unconfirmed: true, error: 'unavailable' }) },
    ]);
    // The leak rotation was started: it runs to its end and revokes the leaked value.
    expect(await h.client.workflow.getHandle(`rotate:${credentialId}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'leak-unrecorded' } })).body.value);
    expect((await h.sql('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = 1', [credentialId])).rows[0].revoked_at).not.toBeNull();

    // Reported again, the value is already revoked: nothing is done, so a row that cannot be written is a plain 503, not "carried out".
    const fingerprint = createHash('sha256').update(value).digest('hex');
    const { res: again } = await whileRefused('leak.report', 'matched', () => h.api('POST', '/v1/leaks', { token: agent.token, body: { fingerprint, source: 'unrecorded-scan' } }));
    expect(again.status, again.text).toBe(503);
    expect(again.body).toMatchObject({ type: 'https://mailgent.dev/problems/audit-unavailable' });
    expect(again.body.unconfirmed).toBeUndefined();
  });
});
