import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { bundleWorkflowCode } from '@temporalio/worker';
import { ConfigError } from '../core/defaults';
import { HelperInterrupted, isStopSignal } from '../core/helper-interrupted';
import { FAILURE_CONVERTER_PATH } from '../vault/payload-codec';

export const WORKFLOWS_PATH = fileURLToPath(new URL('../workflows/index.ts', import.meta.url));
const THIS_FILE = fileURLToPath(import.meta.url);

/**
 * Bundles the workflows in a short-lived child process and returns the path of the bundle (in a
 * temporary directory; call `remove` once the worker has read it). Webpack's ~100 MB stay in the
 * child: bundled in the worker itself, they would stay in its resident set for its whole life.
 */
export async function bundleInChild(): Promise<{ codePath: string; remove(): void }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-bundle-'));
  const codePath = path.join(dir, 'workflows.js');
  const tsx = import.meta.resolve('tsx');
  const loaded = process.execArgv.some((a) => a.includes('tsx'));
  try {
    await promisify(execFile)(process.execPath, [...(loaded ? process.execArgv : ['--import', tsx]), THIS_FILE, codePath], {
      maxBuffer: 16 * 1024 * 1024,
    });
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    // Ended by Ctrl-C (which signals the service's process group, this child too) or a SIGTERM:
    // start-up interrupted, if the service took the signal too (cli/serve.ts), not a failed bundle.
    const signal = (err as { signal?: unknown }).signal;
    if (isStopSignal(signal)) throw new HelperInterrupted("the workflows' bundler", signal, { cause: err });
    const stderr = String((err as { stderr?: string }).stderr ?? '').trim();
    throw new Error(`bundling the workflows failed${stderr ? `: ${stderr.split('\n').slice(-5).join(' ')}` : ''}`, { cause: err });
  }
  return { codePath, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** The bundle every worker runs: the workflows and the failure converter that encrypts failure messages. Its first line names the code it was built from (workflowsFingerprint). */
export async function bundleWorkflows(): Promise<string> {
  const quiet = { log() {}, trace() {}, debug() {}, info() {}, warn() {}, error: (m: string) => process.stderr.write(`${m}\n`) };
  const { code } = await bundleWorkflowCode({ workflowsPath: WORKFLOWS_PATH, failureConverterPath: FAILURE_CONVERTER_PATH, logger: quiet });
  return `${FINGERPRINT_MARK}${workflowsFingerprint()}\n${code}`;
}

const FINGERPRINT_MARK = '// mailgent workflows ';

/**
 * What a bundle is built from: the workflows' sources (they import nothing of this repository but
 * each other, and types), the failure converter, and the Temporal workflow SDK's version.
 */
export function workflowsFingerprint(): string {
  const hash = createHash('sha256');
  const dir = path.dirname(WORKFLOWS_PATH);
  for (const name of readdirSync(dir).filter((n) => n.endsWith('.ts')).sort()) hash.update(`${name}\0`).update(readFileSync(path.join(dir, name))).update('\0');
  hash.update(readFileSync(FAILURE_CONVERTER_PATH));
  hash.update(String((createRequire(import.meta.url)('@temporalio/workflow/package.json') as { version: string }).version));
  return hash.digest('hex');
}

/**
 * A prebuilt bundle (WORKFLOW_BUNDLE) must be there and built from this checkout's workflows: one
 * built before a change (an upgrade, a pull) would run other workflow code than the rest of the
 * deployment, and replay runs started by the new code non-deterministically.
 */
export function checkWorkflowBundle(file: string): void {
  let first: string;
  try {
    const fd = openSync(file, 'r');
    try {
      const head = Buffer.alloc(FINGERPRINT_MARK.length + 64);
      first = head.subarray(0, readSync(fd, head, 0, head.length, 0)).toString('utf8');
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    throw new ConfigError([`WORKFLOW_BUNDLE: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); build it with npm run bundle -- <path>`]);
  }
  if (first !== `${FINGERPRINT_MARK}${workflowsFingerprint()}`) {
    throw new ConfigError([`WORKFLOW_BUNDLE: ${file} was not built from this checkout's workflows; build it again with npm run bundle -- <path>`]);
  }
}

// Run as a script (npm run bundle -- <path>, and bundleInChild): bundle into the file named by the argument.
if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) {
  if (!process.argv[2]) {
    process.stderr.write('Usage: npm run bundle -- <path>   (writes the workflow bundle a worker loads with WORKFLOW_BUNDLE=<path>)\n');
    process.exit(2);
  }
  // Written aside and renamed into place: a worker starting meanwhile reads the old bundle or the new, never half of one.
  const staging = `${process.argv[2]}.tmp-${process.pid}`;
  writeFileSync(staging, await bundleWorkflows());
  renameSync(staging, process.argv[2]);
}
