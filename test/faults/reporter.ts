import { writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Reporter, TestModule } from 'vitest/node';
import type { FaultRow } from './checks';

const OUT = path.resolve(import.meta.dirname, 'last-run.md');

/**
 * Collects the summary rows the fault scenarios leave in their test meta (see faultRow in
 * checks.ts) and, when any ran, prints a table and writes it to test/faults/last-run.md.
 */
export default class FaultReporter implements Reporter {
  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    const rows: string[] = [];
    let failed = 0;
    for (const module of testModules) {
      for (const test of module.children.allTests()) {
        const fault = test.meta().fault as FaultRow | undefined;
        if (!fault) continue;
        const state = test.result().state;
        if (state !== 'passed') failed++;
        const seconds = ((test.diagnostic()?.duration ?? 0) / 1000).toFixed(1);
        const figures = Object.entries(fault.figures)
          .map(([k, v]) => `${k}: ${v}`)
          .join('; ');
        rows.push(`| ${fault.scenario} | ${state === 'passed' ? 'pass' : state.toUpperCase()} | ${seconds} s | ${figures.replaceAll('|', '\\|')} |`);
      }
    }
    if (rows.length === 0) return;
    const table = [
      `# Fault suite — last run`,
      '',
      `${new Date().toISOString()}, Node ${process.version}, ${rows.length} scenarios, ${failed} failed. Each scenario ran against the real`,
      'Temporal dev server, PostgreSQL and SMTP sink, and ended with the common checks of test/faults/checks.ts.',
      '',
      '| scenario | result | duration | figures |',
      '| --- | --- | --- | --- |',
      ...rows,
      '',
    ].join('\n');
    writeFileSync(OUT, table);
    process.stdout.write(`\n${table}\nwritten to ${path.relative(process.cwd(), OUT)}\n`);
  }
}
