import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { bundleWorkflowCode } from '@temporalio/worker';
import type { Logger } from '../core/logger';
import { cacheDir, privateDir } from '../embedded/temporal-cli';
import { FAILURE_CONVERTER_PATH } from '../vault/payload-codec';

export const WORKFLOWS_PATH = fileURLToPath(new URL('../workflows/index.ts', import.meta.url));
const THIS_FILE = fileURLToPath(import.meta.url);

/**
 * What a bundle was made from: every file webpack read (with its SHA-256) and every path it looked
 * for and did not find (one made since could change what an import resolves to).
 */
export interface BundleInputs {
  files: Record<string, string>;
  missing: string[];
}

/** A bundle kept in the cache: its code's SHA-256 (the file is named by it) and what it was made from. */
interface Manifest extends BundleInputs {
  code: string;
}

const sha256 = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');

/**
 * The workflow bundle a worker runs: the one kept in the cache (MAILGENT_CACHE_DIR) when every file
 * it was made from is as it was then, else a new one, bundled in a child process and kept for the
 * next start (webpack costs a worker some 3 s of CPU at every start otherwise). `remove` once the
 * worker has read it: it removes a bundle that could not be kept. A cache directory that is not this
 * user's own, or cannot be written, is not used.
 */
export async function workflowBundle(logger?: Logger): Promise<{ codePath: string; remove(): void; cached: boolean }> {
  let dir: string | undefined;
  try {
    dir = privateDir(path.join(cacheDir(), 'workflow-bundles'));
  } catch (err) {
    logger?.warn({ err: (err as Error).message }, 'the workflow bundle cache is not used');
  }
  const key = dir ? path.join(dir, bundleKey()) : undefined;
  const kept = key ? keptBundle(key) : undefined;
  if (kept) return { codePath: kept, remove: () => undefined, cached: true };
  const built = await bundleInChild();
  if (!key || !built.inputs) return { ...built, cached: false };
  try {
    const code = readFileSync(built.codePath);
    const codePath = `${key}-${sha256(code).slice(0, 16)}.js`;
    // The code first, then the manifest naming it (each written aside and renamed into place).
    writeFileSync(`${codePath}.${process.pid}.tmp`, code, { mode: 0o600 });
    renameSync(`${codePath}.${process.pid}.tmp`, codePath);
    const manifest: Manifest = { code: sha256(code), ...built.inputs };
    writeFileSync(`${key}.json.${process.pid}.tmp`, JSON.stringify(manifest), { mode: 0o600 });
    renameSync(`${key}.json.${process.pid}.tmp`, `${key}.json`);
    // Bundles of this key the manifest no longer names (an earlier version of the code).
    const base = path.basename(key);
    for (const name of readdirSync(path.dirname(key))) {
      if (name.startsWith(`${base}-`) && name.endsWith('.js') && path.join(path.dirname(key), name) !== codePath) rmSync(path.join(path.dirname(key), name), { force: true });
    }
    built.remove();
    return { codePath, remove: () => undefined, cached: false };
  } catch (err) {
    logger?.warn({ err: (err as Error).message }, 'the workflow bundle could not be kept for the next start');
    return { ...built, cached: false };
  }
}

/**
 * The cache entry's name: this checkout's workflows (a path of its own) bundled by this file with
 * this SDK and webpack. Whatever else goes into a bundle is in its manifest.
 */
function bundleKey(): string {
  const require = createRequire(import.meta.url);
  const version = (pkg: string) => (JSON.parse(readFileSync(require.resolve(`${pkg}/package.json`), 'utf8')) as { version: string }).version;
  return sha256([WORKFLOWS_PATH, sha256(readFileSync(THIS_FILE)), version('@temporalio/worker'), version('webpack')].join('\n')).slice(0, 24);
}

/** The kept bundle's path if it is whole and every input is as it was when it was made. */
function keptBundle(key: string): string | undefined {
  let manifest: Manifest;
  try {
    manifest = JSON.parse(readFileSync(`${key}.json`, 'utf8')) as Manifest;
  } catch {
    return undefined;
  }
  const codePath = `${key}-${String(manifest.code).slice(0, 16)}.js`;
  try {
    if (sha256(readFileSync(codePath)) !== manifest.code || !inputsUnchanged(manifest)) return undefined;
  } catch {
    return undefined;
  }
  return codePath;
}

export function inputsUnchanged(inputs: BundleInputs): boolean {
  for (const [file, digest] of Object.entries(inputs.files)) {
    try {
      if (sha256(readFileSync(file)) !== digest) return false;
    } catch {
      return false;
    }
  }
  return inputs.missing.every((p) => !existsSync(p));
}

/**
 * Bundles the workflows in a short-lived child process and returns the path of the bundle (in a
 * temporary directory; call `remove` once the worker has read it) and what it was made from (none
 * if an input changed while it was made). Webpack's ~100 MB stay in the child: bundled in the worker
 * itself, they would stay in its resident set for its whole life.
 */
export async function bundleInChild(): Promise<{ codePath: string; remove(): void; inputs?: BundleInputs }> {
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
  let inputs: BundleInputs | undefined;
  try {
    inputs = JSON.parse(readFileSync(`${codePath}.inputs.json`, 'utf8')) as BundleInputs;
  } catch {
    inputs = undefined;
  }
  return { codePath, inputs, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** The bundle every worker runs: the workflows and the failure converter that encrypts failure messages. */
export async function bundleWorkflows(): Promise<string> {
  return (await bundleWithInputs()).code;
}

/**
 * The bundle and what webpack made it from. `inputs` is absent when a file it read was changed
 * while it ran (the bundle may hold the old text): such a bundle is used once, never kept.
 */
async function bundleWithInputs(): Promise<{ code: string; inputs?: BundleInputs }> {
  const quiet = { log() {}, trace() {}, debug() {}, info() {}, warn() {}, error: (m: string) => process.stderr.write(`${m}\n`) };
  const began = Date.now();
  let read: string[] = [];
  let missing: string[] = [];
  const { code } = await bundleWorkflowCode({
    workflowsPath: WORKFLOWS_PATH,
    failureConverterPath: FAILURE_CONVERTER_PATH,
    logger: quiet,
    webpackConfigHook: (config) => ({
      ...config,
      plugins: [
        ...(config.plugins ?? []),
        {
          apply(compiler) {
            compiler.hooks.done.tap('mailgent-bundle-inputs', (stats) => {
              read = [...stats.compilation.fileDependencies];
              missing = [...stats.compilation.missingDependencies];
            });
          },
        },
      ],
    }),
  });
  const files: Record<string, string> = {};
  for (const file of read) {
    // Directories webpack looked into, and the entry point the SDK writes for the build and removes.
    let stat;
    try {
      stat = statSync(file);
    } catch {
      continue;
    }
    if (!stat.isFile()) continue;
    if (stat.mtimeMs >= began - 1000) return { code };
    files[file] = sha256(readFileSync(file));
  }
  return { code, inputs: { files, missing } };
}

// Run as a script: bundle into the file named by the argument, what it was made from beside it.
if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) {
  const { code, inputs } = await bundleWithInputs();
  writeFileSync(process.argv[2]!, code);
  if (inputs) writeFileSync(`${process.argv[2]!}.inputs.json`, JSON.stringify(inputs));
}
