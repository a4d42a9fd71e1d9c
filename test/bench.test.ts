import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it, inject } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * The benchmark harness at a tiny size, so it cannot rot: `bench/run.ts` runs end to end as
 * `npm run bench` does (API and worker as child processes, every item), against this run's
 * servers, and writes a results file with every field and a chart. The full run is `npm run bench`.
 */
const ROOT = path.resolve(import.meta.dirname, '..');

describe('GET /v1/whoami (the HTTP floor of the benchmark)', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('answers the token’s identity, 401 without a valid token, 403 for the admin token', async () => {
    const me = await h.createIdentity('whoami-agent', 'agent@example.com');
    const res = await h.api('GET', '/v1/whoami', { token: me.token });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ id: me.id, name: 'whoami-agent', email: 'agent@example.com' });
    expect((await h.api('GET', '/v1/whoami')).status).toBe(401);
    expect((await h.api('GET', '/v1/whoami', { token: `${me.token}x` })).status).toBe(401);
    // The admin token is valid, but acts for no identity: forbidden here, as an identity token is on an admin route.
    const asAdmin = await h.api('GET', '/v1/whoami', { token: h.adminToken });
    expect(asAdmin.status).toBe(403);
    expect(asAdmin.body.detail).toBe('this route needs an identity’s token; the admin token acts for no identity');
  });
});

describe('npm run bench at a tiny size', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-bench-test-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('runs every item and writes valid JSON with every figure, and a chart', { timeout: 420_000 }, async () => {
    const out = path.join(dir, 'results', 'latest.json');
    const args = ['--import', 'tsx', 'bench/run.ts', '--seconds', '1', '--slice-seconds', '0.5', '--warmup', '0', '--connections', '4', '--sizes', '100,400', '--sweep-sizes', '200,400',
      '--sweep-page-size', '5', '--rotations', '3', '--baseline-workflows', '2', '--out', out,
      '--pg-admin-url', inject('pgAdminUrl'), '--temporal-address', inject('temporalAddress'), '--smtp-url', inject('smtpUrl')];
    // The run's workflow bundle: its worker does not bundle its own (WORKFLOW_BUNDLE).
    const env = { ...process.env, WORKFLOW_BUNDLE: inject('workflowBundlePath') };
    const { stdout } = await promisify(execFile)(process.execPath, args, { cwd: ROOT, env, timeout: 400_000, maxBuffer: 16 * 1024 * 1024 });
    expect(stdout).toContain('operation');

    const r = JSON.parse(readFileSync(out, 'utf8'));
    expect(r.schema).toBe(1);
    expect(r.machine.cpus).toBeGreaterThan(0);
    for (const v of ['mailgent', 'node', 'postgres', 'temporalServer', 'temporalSdk', 'autocannon']) expect(r.versions[v], v).toMatch(/\d/);

    const positive = (figures: Record<string, number>, where: string) => {
      for (const k of ['rps', 'p50', 'p99']) expect(figures[k], `${where}.${k}`).toBeGreaterThan(0);
      expect(figures.errors, `${where}.errors`).toBe(0);
    };
    // The floor at 4 connections can answer in under a millisecond: its p50 may round to 0 (as below).
    expect(r.primitives.httpFloor.rps).toBeGreaterThan(0);
    expect(r.primitives.httpFloor.p99).toBeGreaterThanOrEqual(r.primitives.httpFloor.p50);
    expect(r.primitives.httpFloor.errors).toBe(0);
    // Each primitive alternates with slices of the HTTP floor and of its database floor, and is
    // compared with those slices.
    expect(r.primitives.httpFloor.slicesPerPrimitive).toBe(2); // --seconds 1 --slice-seconds 0.5
    expect(r.primitives.httpFloor.sliceSeconds).toBe(0.5);
    for (const op of ['vault.get', 'vault.store', 'vault.totp']) {
      const floors = r.primitives.ops[op].floors;
      expect(floors.httpSlicesRps).toHaveLength(2);
      expect(floors.httpRps).toBeCloseTo((floors.httpSlicesRps[0] + floors.httpSlicesRps[1]) / 2, 0);
      expect(floors.dbSlicesRps).toHaveLength(2);
      expect(floors.dbRps).toBeCloseTo((floors.dbSlicesRps[0] + floors.dbSlicesRps[1]) / 2, 0);
      expect(r.primitives.dbFloors[op].rps).toBe(floors.dbRps);
    }
    for (const op of ['vault.get', 'vault.store', 'vault.totp']) {
      const o = r.primitives.ops[op];
      positive(o, op);
      positive(r.primitives.dbFloors[op], `dbFloors.${op}`);
      expect(o.ratioToMinFloor).toBeCloseTo(o.rps / Math.min(o.floors.httpRps, o.floors.dbRps), 1);
      if (op === 'vault.store') {
        // A batch of one: BEGIN, the credentials' locks and versions, the versions' insert, the audit rows, COMMIT.
        expect(o.sqlStatementsPerCall).toBe(4);
      } else {
        // Group-committed reads: the read, then one statement that stamps, writes the audit rows and commits.
        expect(o.sqlStatementsPerCall).toBe(2);
      }
      // Reads and stores are group-committed: calls per batch from the API's /metrics and the in-process vault.
      expect(o.callsPerBatch.http).toBeGreaterThanOrEqual(1);
      expect(o.callsPerBatch.db).toBeGreaterThanOrEqual(1);
      expect(typeof o.pass).toBe('boolean');
    }

    expect(Object.keys(r.size.get)).toEqual(['100', '400']);
    // Each size is a vault of its own (the small one a database and an API of its own), measured in one stretch.
    expect(r.size.storedCredentials['100']).toBeGreaterThanOrEqual(100);
    expect(r.size.storedCredentials['100']).toBeLessThan(400);
    expect(r.size.storedCredentials['400']).toBeGreaterThanOrEqual(400);
    positive(r.size.get['100'], 'size@100');
    positive(r.size.get['400'], 'size@400');
    expect(r.size.ratioP50).toBeGreaterThan(0);
    // Judged on the median of each round's own ratio (its slices seconds apart).
    // Only get slices, the sizes in turn (no floor slices between them): two rounds of 0.5 s here.
    expect(Object.keys(r.size)).not.toContain('httpFloor');
    expect(r.size.slicesP50['100']).toHaveLength(2);
    expect(r.size.slicesP50['400']).toHaveLength(2);
    expect(r.size.roundRatiosP50).toHaveLength(2);
    r.size.roundRatiosP50.forEach((ratio: number, i: number) => expect(ratio).toBeCloseTo(r.size.slicesP50['400'][i] / r.size.slicesP50['100'][i], 2));
    const sorted = [...r.size.roundRatiosP50].sort((a: number, b: number) => a - b);
    const mid = Math.floor(sorted.length / 2);
    expect(r.size.medianRoundRatioP50).toBeCloseTo(sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2, 2);
    expect(r.size.pass).toBe(r.size.medianRoundRatioP50 <= r.size.target);

    expect(r.rotation).toMatchObject({ rotations: 3, rotated: 3, failed: 0 });
    expect(r.rotation.perSecond).toBeGreaterThan(0);
    expect(r.rotation.activitiesPerRotation).toBeGreaterThan(3);
    // The baseline runs --baseline-workflows of them, not the batch's count.
    expect(r.rotation.baseline).toMatchObject({ workflows: 2, activitiesPerWorkflow: r.rotation.activitiesPerRotation });
    expect(r.options).toMatchObject({ rotations: 3, baselineWorkflows: 2 });
    expect(r.rotation.baseline.perSecond).toBeGreaterThan(0);
    expect(r.rotation.ratio).toBeGreaterThan(0);
    // pending, verify and promoted per rotation, each through the sink's signature check
    expect(r.rotation.webhookEvents).toBeGreaterThanOrEqual(9);

    expect(r.sweep.sizes.map((s: { credentials: number }) => s.credentials)).toEqual([200, 400]);
    for (const s of r.sweep.sizes) {
      expect(s.plan).toMatchObject({ indexScan: true, seqScanOnCredentials: false, index: 'credentials_due' });
      expect(s.plan.node).toMatch(/Index/);
      expect(s.due).toBe(s.credentials / 100); // 1% due
      expect(s.seconds).toBeGreaterThan(0);
      expect(s.maxHistoryEventsPerRun).toBeGreaterThan(0);
    }
    expect(r.sweep.indexScan).toBe(true);
    expect(typeof r.sweep.growthExponent).toBe('number');
    expect(r.sweep.seeding).toMatch(/unnest/);

    expect(r.memory.item1.apiPeakRssMb).toBeGreaterThan(20);
    expect(r.memory.item1.workerPeakRssMb).toBeGreaterThan(20);
    expect(r.memory.item3.workerPeakRssMb).toBeGreaterThan(20);
    // The processes ran with the tuning the compose file ships (bench/stack.ts reads it from there).
    expect(r.memory.tuning.worker).toEqual({ NODE_OPTIONS: expect.stringMatching(/--max-old-space-size=\d+/), MALLOC_ARENA_MAX: '2' });
    expect(r.memory.tuning.api.NODE_OPTIONS).toMatch(/--v8-pool-size=1/);

    // The run's time against the six minutes, and where it went: every part, none left out.
    expect(r.duration).toMatchObject({ seconds: r.durationSeconds, target: 360, pass: r.durationSeconds <= 360 });
    expect(Object.keys(r.duration.phases)).toEqual(['servers', 'seeding', 'primitives', 'sizeAndSweep', 'rotationSetup', 'rotationBatch', 'rotationBaseline']);
    // (Tenths of a second: storing three credentials can round to 0.)
    for (const [phase, seconds] of Object.entries(r.duration.phases)) expect(seconds, phase).toBeGreaterThanOrEqual(0);
    expect(r.duration.phases.servers).toBeGreaterThan(0);
    const phaseSum = Object.values(r.duration.phases as Record<string, number>).reduce((a, b) => a + b, 0);
    expect(phaseSum).toBeGreaterThan(r.durationSeconds * 0.9);
    expect(phaseSum).toBeLessThanOrEqual(r.durationSeconds + 0.1 * Object.keys(r.duration.phases).length);

    const svg = readFileSync(path.join(path.dirname(out), 'latency.svg'), 'utf8');
    expect(svg).toMatch(/^<svg /);
    expect(svg).toContain('vault.get (HTTP)');

    // The benchmark's own secrets (stored values, the webhook signing key) never reach its output.
    for (const prefix of ['sk_live_', 'sk_store_', 'sk_bench_', 'sk_seed_', 'whsec_', 'mgt_']) {
      expect(stdout).not.toContain(prefix);
      expect(JSON.stringify(r)).not.toContain(prefix);
    }
    expect(existsSync(out)).toBe(true);
  });
});

describe('npm run bench:compare at a tiny size', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-compare-test-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const servers = () => ['--pg-admin-url', inject('pgAdminUrl'), '--temporal-address', inject('temporalAddress'), '--smtp-url', inject('smtpUrl')];
  const compare = (args: string[]) =>
    promisify(execFile)(process.execPath, ['--import', 'tsx', 'bench/compare.ts', ...args, ...servers()], { cwd: ROOT, timeout: 200_000, maxBuffer: 16 * 1024 * 1024 });

  it('loads each variant in turn, slice by slice, and writes each one’s figures against the first', { timeout: 240_000 }, async () => {
    const out = path.join(dir, 'compare.json');
    const { stdout } = await compare([
      '--variant', 'shipped', '--variant', 'small-pool:DATABASE_POOL_SIZE=2,LOG_LEVEL=error',
      '--ops', 'floor,vault.get', '--rounds', '2', '--slice-seconds', '0.5', '--connections', '4', '--out', out,
    ]);
    expect(stdout).toContain('vs first');
    const r = JSON.parse(readFileSync(out, 'utf8'));
    expect(r.schema).toBe(1);
    expect(r.options).toEqual({ ops: ['floor', 'vault.get'], rounds: 2, sliceSeconds: 0.5, connections: 4 });
    expect(r.variants.map((v: { label: string }) => v.label)).toEqual(['shipped', 'small-pool']);
    expect(r.variants[1].env).toEqual({ DATABASE_POOL_SIZE: '2', LOG_LEVEL: 'error' });
    for (const v of r.variants) expect(v.peakRssMb, v.label).toBeGreaterThan(20);
    expect(Object.keys(r.ops)).toEqual(['floor', 'vault.get']);
    for (const op of ['floor', 'vault.get']) {
      for (const label of ['shipped', 'small-pool']) {
        const f = r.ops[op][label];
        expect(f.slicesRps, `${op} ${label}`).toHaveLength(2);
        expect(f.rps, `${op} ${label}`).toBeCloseTo((f.slicesRps[0] + f.slicesRps[1]) / 2, 0);
        expect(f.rps, `${op} ${label}`).toBeGreaterThan(0);
        expect(f.errors, `${op} ${label}`).toBe(0);
        expect(f.wins).toBeGreaterThanOrEqual(0);
        expect(f.wins).toBeLessThanOrEqual(2);
      }
      expect(r.ops[op].shipped).toMatchObject({ vsFirst: 1, wins: 0 });
      expect(r.ops[op]['small-pool'].vsFirst).toBeCloseTo(r.ops[op]['small-pool'].rps / r.ops[op].shipped.rps, 2);
    }
    expect(stdout).not.toContain('sk_live_');
    expect(JSON.stringify(r)).not.toContain('sk_live_');
  });

  it('fails, naming the variant, when a variant’s API does not start, and refuses a malformed variant', { timeout: 240_000 }, async () => {
    const broken = compare(['--variant', 'shipped', '--variant', 'broken:DATABASE_POOL_SIZE=0', '--rounds', '1', '--slice-seconds', '0.5', '--connections', '2']);
    await expect(broken).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining("variant 'broken' did not start") });
    const malformed = compare(['--variant', 'shipped', '--variant', 'odd:NOT A PAIR']);
    await expect(malformed).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining("variant 'odd': 'NOT A PAIR' is not KEY=VALUE") });
    const alone = compare(['--variant', 'shipped']);
    await expect(alone).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining('at least two variants') });
  });
});
