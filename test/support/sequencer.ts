import { relative } from 'node:path';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * The files that take a minute or more (they wait out real timeouts: workers killed, servers
 * restarted, grace periods, the bench's own loads), longest first. They start before the rest, so
 * the workers finish close together: in a fresh clone vitest has no durations of its own and
 * starts the largest files first, which left the longest of these (small files) for last, one
 * worker running it alone for two minutes.
 */
const LONGEST = [
  'test/faults/worker-kill-late.test.ts',
  'test/rotation-failures.test.ts',
  'test/bench.test.ts',
  'test/cli.test.ts',
  'test/lifecycle.test.ts',
  'test/start.test.ts',
  'test/faults/worker-kill-early.test.ts',
];

export default class LongestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const rank = (file: TestSpecification) => {
      const at = LONGEST.indexOf(relative(file.project.config.root, file.moduleId).split('\\').join('/'));
      return at === -1 ? LONGEST.length : at;
    };
    // Array.prototype.sort is stable: the rest keep vitest's own order.
    return (await super.sort(files)).sort((a, b) => rank(a) - rank(b));
  }
}
