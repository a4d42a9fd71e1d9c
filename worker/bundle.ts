import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { bundleWorkflowCode } from '@temporalio/worker';
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
    const stderr = String((err as { stderr?: string }).stderr ?? '').trim();
    throw new Error(`bundling the workflows failed${stderr ? `: ${stderr.split('\n').slice(-5).join(' ')}` : ''}`, { cause: err });
  }
  return { codePath, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** The bundle every worker runs: the workflows and the failure converter that encrypts failure messages. */
export async function bundleWorkflows(): Promise<string> {
  const quiet = { log() {}, trace() {}, debug() {}, info() {}, warn() {}, error: (m: string) => process.stderr.write(`${m}\n`) };
  return (await bundleWorkflowCode({ workflowsPath: WORKFLOWS_PATH, failureConverterPath: FAILURE_CONVERTER_PATH, logger: quiet })).code;
}

// Run as a script (npm run bundle -- <path>, and bundleInChild): bundle into the file named by the argument.
if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) {
  if (!process.argv[2]) {
    process.stderr.write('Usage: npm run bundle -- <path>   (writes the workflow bundle a worker loads with WORKFLOW_BUNDLE=<path>)\n');
    process.exit(2);
  }
  writeFileSync(process.argv[2], await bundleWorkflows());
}
