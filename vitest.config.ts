import { defineConfig } from 'vitest/config';
import LongestFirst from './test/support/sequencer';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/support/global-setup.ts'],
    // The first run may build the Temporal CLI with Go before the servers start.
    hookTimeout: 600_000,
    testTimeout: 60_000,
    pool: 'forks',
    isolate: false,
    // Three on two cores: with two, the machine sat idle a third of the run (files waiting out grace
    // periods, outages and kills); measured 558 → 450 s, 33% → 12% idle.
    maxWorkers: 3,
    // The minute-long files first, so the workers end together (test/support/sequencer.ts).
    sequence: { sequencer: LongestFirst },
    // The fault suite's summary table (test/faults/last-run.md) when fault scenarios ran.
    reporters: ['default', './test/faults/reporter.ts'],
  },
});
