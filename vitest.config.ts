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
    // Three files at a time on two cores: most of a file's time is spent waiting out real timeouts
    // (heartbeats, grace periods, SMTP retries), and two workers left the cores a third idle
    // (~9.5 minutes against ~7). Running three at once also shakes out tests that race their
    // servers under load (two did, both fixed).
    maxWorkers: 3,
    // The minute-long files first, so the workers end together (test/support/sequencer.ts).
    sequence: { sequencer: LongestFirst },
    // The fault suite's summary table (test/faults/last-run.md) when fault scenarios ran.
    reporters: ['default', './test/faults/reporter.ts'],
  },
});
