import { createHash } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { inputsUnchanged, workflowBundle } from '../../worker/bundle';

describe('the workflow bundle cache', () => {
  const saved = process.env.MAILGENT_CACHE_DIR;
  const dirs: string[] = [];
  const made = (prefix: string) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
    dirs.push(dir);
    return dir;
  };
  afterEach(() => {
    if (saved === undefined) delete process.env.MAILGENT_CACHE_DIR;
    else process.env.MAILGENT_CACHE_DIR = saved;
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  it('a worker start reuses the bundle the one before it made (0600, in a 0700 directory); a kept bundle altered since is made again', async () => {
    const cache = made('mailgent-bundle-cache-');
    process.env.MAILGENT_CACHE_DIR = cache;
    const first = await workflowBundle();
    expect(first.cached).toBe(false);
    const code = readFileSync(first.codePath, 'utf8');
    expect(code).toContain('rotateCredential');
    first.remove();
    const kept = path.join(cache, 'workflow-bundles');
    expect(statSync(kept).mode & 0o777).toBe(0o700);
    expect(readdirSync(kept).map((f) => statSync(path.join(kept, f)).mode & 0o777)).toEqual([0o600, 0o600]);

    const second = await workflowBundle();
    expect(second).toMatchObject({ cached: true, codePath: first.codePath });
    second.remove();
    expect(readFileSync(second.codePath, 'utf8')).toBe(code);

    // Cut short (a full disk) or edited: not run, made again.
    writeFileSync(first.codePath, code.slice(0, 1000));
    const third = await workflowBundle();
    expect(third.cached).toBe(false);
    expect(readFileSync(third.codePath, 'utf8')).toBe(code);
    third.remove();
  }, 60_000);

  it('a kept bundle is stale once a file it was made from changes, or a path it looked for and missed appears', () => {
    const dir = made('mailgent-bundle-inputs-');
    const file = path.join(dir, 'rotate-credential.ts');
    writeFileSync(file, 'export const a = 1;\n');
    const digest = '2b58bd5b4ef3d1c4aa5e8ba2ce2f80b5e6f6ffb2f4e0c3a6c5bb3e2bc0a1dbd4';
    const inputs = { files: { [file]: digest }, missing: [path.join(dir, 'rotate-credential.js')] };
    // The digest above is not the file's: stale.
    expect(inputsUnchanged(inputs)).toBe(false);
    const actual = { ...inputs, files: { [file]: sha256Of(file) } };
    expect(inputsUnchanged(actual)).toBe(true);
    writeFileSync(file, 'export const a = 2;\n');
    expect(inputsUnchanged(actual)).toBe(false);
    writeFileSync(file, 'export const a = 1;\n');
    expect(inputsUnchanged(actual)).toBe(true);
    // An import resolved elsewhere once this path exists.
    writeFileSync(path.join(dir, 'rotate-credential.js'), '');
    expect(inputsUnchanged(actual)).toBe(false);
  });

  it('a cache directory others can write to is not used: the bundle is made for this start alone', async () => {
    const cache = made('mailgent-bundle-shared-');
    process.env.MAILGENT_CACHE_DIR = cache;
    mkdirSync(path.join(cache, 'workflow-bundles'));
    chmodSync(path.join(cache, 'workflow-bundles'), 0o777);
    const warnings: string[] = [];
    const logger = { warn: (_: unknown, message: string) => warnings.push(message) } as unknown as Parameters<typeof workflowBundle>[0];
    const bundle = await workflowBundle(logger);
    expect(bundle.cached).toBe(false);
    expect(readdirSync(path.join(cache, 'workflow-bundles'))).toEqual([]);
    expect(warnings).toEqual(['the workflow bundle cache is not used']);
    bundle.remove();
    expect(() => statSync(bundle.codePath)).toThrow();
  }, 60_000);
});

function sha256Of(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}
