import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planNodes } from '../bench/sweep';
import { JOINED_EARLIER_SQL, openRunsOf } from '../db/run-outcome';
import { startHarness, type Harness } from './support/harness';

/**
 * A batch's open runs (started, no outcome): what its wait polls every second and its waves count.
 * They are few (a batch keeps at most 50 open) however many the batch has finished, and are read
 * by an index of the open ones, kept by triggers on rotation_runs and run_outcomes.
 */
describe("a batch's open runs", () => {
  let h: Harness;
  let identityId: string;
  const open = async (rotationId: string, credentialId: string) =>
    (await h.sql('SELECT open FROM rotation_runs WHERE rotation_id = $1 AND credential_id = $2', [rotationId, credentialId])).rows[0].open as boolean;
  const newBatch = async () => {
    const id = randomUUID();
    await h.sql(`INSERT INTO rotations (id, identity_id, kind, workflow_id) VALUES ($1, $2, 'request', $3)`, [id, identityId, `rotation:${id}`]);
    return id;
  };
  const credentials = async (prefix: string, n: number) =>
    (
      await h.sql(
        `INSERT INTO credentials (id, identity_id, name, kind, current_version)
         SELECT gen_random_uuid(), $1, $2 || g, 'api_key', 1 FROM generate_series(1, $3::int) AS g RETURNING id`,
        [identityId, prefix, n],
      )
    ).rows.map((r) => r.id as string);

  beforeAll(async () => {
    h = await startHarness();
    identityId = (await h.createIdentity()).id;
  });
  afterAll(() => h.close());

  it('are flagged as their runs are recorded, end, are reset to start again, or lose their outcome', async () => {
    const rotationId = await newBatch();
    const [a, b] = (await credentials('flag-', 2)) as [string, string];
    const ended = `run-${randomUUID()}`;
    await h.sql(`INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome) VALUES ($1, $2, $3, 'rotated')`, [ended, `rotate:${b}`, b]);
    // Added waiting; added with a run that is going (a joined run), or one that has ended.
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2::uuid, 'rotate:' || $2::text)`, [rotationId, a]);
    expect(await open(rotationId, a)).toBe(false);
    const other = await newBatch();
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id) VALUES ($1, $2::uuid, 'rotate:' || $2::text, $3), ($4, $2::uuid, 'rotate:' || $2::text, $5)`, [
      other,
      b,
      ended,
      rotationId,
      'run-going',
    ]);
    expect([await open(other, b), await open(rotationId, b)]).toEqual([false, true]);

    // Started, then its outcome recorded: every batch that recorded the run sees it end.
    const run = `run-${randomUUID()}`;
    await h.sql('UPDATE rotation_runs SET run_id = $3 WHERE rotation_id = $1 AND credential_id = $2', [rotationId, a, run]);
    await h.sql(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id) VALUES ($1, $2::uuid, 'rotate:' || $2::text, $3)`, [other, a, run]);
    expect([await open(rotationId, a), await open(other, a)]).toEqual([true, true]);
    await h.sql(`INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome) VALUES ($1, $2, $3, 'failed') ON CONFLICT (run_id) DO NOTHING`, [run, `rotate:${a}`, a]);
    expect([await open(rotationId, a), await open(other, a)]).toEqual([false, false]);
    // A second report of the same outcome (ON CONFLICT: nothing inserted) changes nothing.
    await h.sql(`INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome) VALUES ($1, $2, $3, 'failed') ON CONFLICT (run_id) DO NOTHING`, [run, `rotate:${a}`, a]);
    expect(await open(rotationId, a)).toBe(false);

    // Its outcome gone, it is open again; reset to start again, it waits; recorded as a run that ended, it is not open.
    await h.sql('DELETE FROM run_outcomes WHERE run_id = $1', [run]);
    expect([await open(rotationId, a), await open(other, a)]).toEqual([true, true]);
    await h.sql('UPDATE rotation_runs SET run_id = NULL, start_sent_at = NULL WHERE rotation_id = $1 AND credential_id = $2', [rotationId, a]);
    expect(await open(rotationId, a)).toBe(false);
    await h.sql('UPDATE rotation_runs SET run_id = $3 WHERE rotation_id = $1 AND credential_id = $2', [rotationId, a, ended]);
    expect(await open(rotationId, a)).toBe(false);

    // What the wait reads: its runs without an outcome, by the flag and the outcome both.
    const read = async (id: string) => (await h.sql(`SELECT credential_id FROM rotation_runs WHERE (rotation_id, run_id) IN (SELECT rotation_id, run_id FROM ${openRunsOf('$1')} r)`, [id])).rows;
    expect(await read(rotationId)).toEqual([{ credential_id: b }]);
    expect(await read(other)).toEqual([{ credential_id: a }]);
    // A flag left open of a run whose outcome is there (recorded as the run was) does not count it.
    await h.sql('UPDATE rotation_runs SET open = true WHERE rotation_id = $1 AND credential_id = $2', [rotationId, a]);
    expect(await read(rotationId)).toEqual([{ credential_id: b }]);
  });

  it("the migration flags a live database's runs: waiting, going and ended", async () => {
    const rotationId = await newBatch();
    const [waiting, going, ended] = (await credentials('migrated-', 3)) as [string, string, string];
    await h.sql(
      `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id) VALUES ($1, $2::uuid, 'w', NULL), ($1, $3::uuid, 'w', 'run-going-' || $1), ($1, $4::uuid, 'w', 'run-ended-' || $1)`,
      [rotationId, waiting, going, ended],
    );
    await h.sql(`INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome) VALUES ('run-ended-' || $1, 'w', $2, 'rotated')`, [rotationId, ended]);
    // As the database was before the migration (the flag all false, as a column added without it would read), then migrated.
    await h.sql(
      `BEGIN;
       DROP INDEX rotation_runs_open; DROP TRIGGER run_outcomes_close_runs ON run_outcomes; DROP FUNCTION run_outcomes_close_runs();
       DROP TRIGGER rotation_runs_open ON rotation_runs; DROP FUNCTION rotation_runs_open(); ALTER TABLE rotation_runs DROP COLUMN open;
       COMMIT`,
    );
    await h.sql(`BEGIN; ${readFileSync(new URL('../db/migrations/1735700000000_run_open.sql', import.meta.url), 'utf8')}; COMMIT`);
    expect([await open(rotationId, waiting), await open(rotationId, going), await open(rotationId, ended)]).toEqual([false, true, false]);
    // And its statistics are there: the planner is not left to take half the runs for open.
    const stats = await h.sql(`SELECT 1 FROM pg_stats WHERE tablename = 'rotation_runs' AND attname = 'open'`);
    expect(stats.rowCount).toBe(1);
  });

  it('are read by the index of open runs, not by reading every run the batch has finished', async () => {
    // A sweep's backlog part way: 4,000 runs ended, 50 going, 950 waiting.
    const rotationId = await newBatch();
    const ids = await credentials('backlog-', 5_000);
    await h.sql(
      `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id, run_id, start_sent_at)
       SELECT $1, id, 'rotate:' || id, CASE WHEN n <= 4050 THEN 'run-' || id END, CASE WHEN n <= 4050 THEN now() END
         FROM unnest($2::uuid[]) WITH ORDINALITY AS t(id, n)`,
      [rotationId, ids],
    );
    await h.sql(
      `INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome)
       SELECT 'run-' || id, 'rotate:' || id, id, 'rotated' FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n) WHERE n <= 4000`,
      [ids],
    );
    // And the outcomes of a vault that has rotated for years (twenty runs a credential), which the
    // outcome's look-up must not read either.
    await h.sql(
      `INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome, finished_at)
       SELECT 'old-' || id || '-' || k, 'rotate:' || id, id, 'rotated', now() - make_interval(days => k * 90) FROM unnest($1::uuid[]) AS id, generate_series(1, 20) AS k`,
      [ids],
    );
    await h.sql('ANALYZE rotation_runs');
    await h.sql('ANALYZE run_outcomes');

    const query = `SELECT r.workflow_id, r.run_id, ${JOINED_EARLIER_SQL} AS joined FROM ${openRunsOf('$1')} r`;
    expect((await h.sql(query, [rotationId])).rows.map((r) => r.run_id).sort()).toEqual(ids.slice(4000, 4050).map((id) => `run-${id}`).sort());
    const plan = (await h.sql(`EXPLAIN (ANALYZE, FORMAT JSON) ${query}`, [rotationId])).rows[0]['QUERY PLAN'][0].Plan;
    const nodes: { type: string; relation?: string; index?: string; rows: number }[] = planNodes(plan).map((n) => ({
      type: n['Node Type'],
      relation: n['Relation Name'],
      index: n['Index Name'],
      rows: n['Actual Rows'],
    }));
    const text = nodes.map((n) => [n.type, n.relation, n.index, n.rows].filter((x) => x !== undefined).join(' ')).join(' > ');
    expect(nodes.filter((n) => n.type.includes('Seq Scan') && n.relation !== 'rotations'), text).toEqual([]);
    const byOpen = nodes.find((n) => n.index === 'rotation_runs_open');
    expect(byOpen, text).toBeDefined();
    expect(byOpen!.rows, text).toBe(50);
  });
});
