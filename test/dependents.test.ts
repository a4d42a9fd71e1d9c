import { createHmac, randomBytes, randomUUID } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { chmodSync, chownSync, closeSync, constants, existsSync, linkSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { UnprocessableError } from '../core/errors';
import { allowOutbound } from '../core/outbound';
import { checkDependents, createDependents, type Dependent, type DependentTarget } from '../dependents';
import { MAX_ENV_FILE_BYTES, readNoFollow, rewriteFile, withEnvFile } from '../dependents/env-file/files';
import { lockOwner, STALE_LOCK_MS } from '../dependents/env-file/lock';
import { verifyWebhookSignature } from '../dependents/webhook';
import { expectCleanRun } from './support/leaks';
import { startHarness, TEST_OUTBOUND_ALLOW, type Harness } from './support/harness';
import { WebhookReceiver } from './support/webhook-receiver';

/** Lines with their own endings, as bytes, to compare a file line by line. */
const linesOf = (buf: Buffer): string[] => buf.toString('latin1').split(/(?<=\n)/);
const asRoot = process.getuid?.() === 0;
const ROOT = path.resolve(import.meta.dirname, '..');

describe('dependents', () => {
  let h: Harness;
  /** The deployment's env files root, and `root`, this test identity's directory in it. */
  let envFilesRoot: string;
  let root: string;
  let outside: string;
  const ME = randomUUID();
  let registry: Record<string, Dependent<any>>;

  beforeAll(async () => {
    h = await startHarness();
    const base = mkdtempSync(path.join(inject('tmpDir'), 'dependents-'));
    envFilesRoot = path.join(base, 'env');
    // The identity's own directory under the root: every path below is relative to it.
    root = path.join(envFilesRoot, ME);
    outside = path.join(base, 'outside');
    mkdirSync(root, { recursive: true });
    mkdirSync(outside);
    registry = createDependents({ envFilesRoot });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  describe('env-file', () => {
    let n = 0;
    const noSecrets = { read: async () => Promise.reject(new Error('an env file reads no other credential')) };
    const ctx = (file: string, key = 'DB_PASSWORD') => ({
      settings: { file, key },
      identityId: ME,
      credentialId: 'credential-1',
      credentialName: 'staging-db',
      secrets: noSecrets,
    });
    const target = (version: number, value: string): DependentTarget => ({ version, value: value ? h.secret(value) : value });
    const dep = () => registry['env-file']!;
    const apply = (file: string, t: DependentTarget, key?: string) => dep().apply({ ...ctx(file, key), target: t, idempotencyKey: `rot:apply:${t.version}` });
    const restore = (file: string, t: DependentTarget, key?: string) => dep().restore({ ...ctx(file, key), target: t, idempotencyKey: `rot:restore:${t.version}` });
    const verify = (file: string, t: DependentTarget, key?: string) => dep().verify({ ...ctx(file, key), target: t });
    const envFile = (content: string | Buffer, mode = 0o600) => {
      const name = `app-${++n}.env`;
      writeFileSync(path.join(root, name), content, { mode });
      chmodSync(path.join(root, name), mode);
      return name;
    };
    const read = (name: string) => readFileSync(path.join(root, name));

    it('apply changes only the key line, atomically, keeping mode, owner and every other byte', async () => {
      const original = Buffer.concat([
        Buffer.from('# staging settings\nexport APP_ENV=staging\r\nDB_HOST = db.internal # primary\n'),
        Buffer.from('DB_PASSWORD=old-password-1\n\nDB_PASSWORD_OLD=keep\n  # DB_PASSWORD=commented-out\n'),
        Buffer.from('CERT="-----BEGIN\nDB_PASSWORD=inside-another-value\n-----END"\n'),
        Buffer.from('CITY=caf\xe9\n', 'latin1'),
        Buffer.from('LAST=1'),
      ]);
      const file = envFile(original, 0o640);
      if (asRoot) chownSync(path.join(root, file), 4242, 4343);
      const before = statSync(path.join(root, file));
      const listing = readdirSync(root).sort();

      await apply(file, target(2, 'new-password-2'));

      const after = read(file);
      const expected = linesOf(original).map((l) => (l === 'DB_PASSWORD=old-password-1\n' ? 'DB_PASSWORD=new-password-2\n' : l));
      expect(linesOf(after)).toEqual(expected);
      expect(after.equals(Buffer.from(expected.join(''), 'latin1'))).toBe(true);
      const stats = statSync(path.join(root, file));
      expect(stats.mode & 0o7777).toBe(0o640);
      if (asRoot) expect([stats.uid, stats.gid]).toEqual([4242, 4343]);
      expect(stats.ino).not.toBe(before.ino); // replaced by rename, not rewritten in place
      expect(readdirSync(root).sort()).toEqual(listing); // no temp file left behind
      await verify(file, target(2, 'new-password-2'));
    });

    const styles: [string, string, string][] = [
      ['unquoted', 'A=1\nDB_PASSWORD=orig-value_1\nB=2\n', 'orig-value_1'],
      ['double-quoted', 'DB_PASSWORD="orig value # not a comment"\n', 'orig value # not a comment'],
      ['single-quoted with export, spaces and a comment', "export DB_PASSWORD = 'orig $HOME \"x\" #y'  # rotated\n", 'orig $HOME "x" #y'],
      ['CRLF', 'A=1\r\nDB_PASSWORD="orig-crlf"\r\nB=2\r\n', 'orig-crlf'],
      ['no trailing newline', 'A=1\nDB_PASSWORD=orig-last', 'orig-last'],
      ['a BOM on the first line', '\uFEFFDB_PASSWORD=orig-bom\nA=1\n', 'orig-bom'],
      ['an empty placeholder with a comment', 'DB_PASSWORD= # set by mailgent\n', ''],
    ];
    it.each(styles)('apply then restore gives back the same bytes: %s', async (_name, content, previous) => {
      const file = envFile(content);
      const original = read(file);
      const pending = target(8, `Pending-${randomBytes(6).toString('hex')}`);

      await apply(file, pending);
      const applied = read(file);
      expect(applied.equals(original)).toBe(false);
      expect(linesOf(applied).filter((l, i) => l !== linesOf(original)[i])).toHaveLength(1);
      await verify(file, pending);
      await apply(file, pending); // idempotent
      expect(read(file).equals(applied)).toBe(true);

      await restore(file, target(7, previous));
      expect(read(file).equals(original)).toBe(true);
      await restore(file, target(7, previous));
      expect(read(file).equals(original)).toBe(true);
      await verify(file, target(7, previous));
    });

    it('writes line breaks into a double-quoted value as \\n, and reads them back', async () => {
      const file = envFile('DB_PASSWORD="orig"\n');
      const value = target(3, 'first line\nsecond line');
      await apply(file, value);
      expect(read(file).toString()).toBe('DB_PASSWORD="first line\\nsecond line"\n');
      await verify(file, value);
      await restore(file, target(2, 'orig'));
      expect(read(file).toString()).toBe('DB_PASSWORD="orig"\n');
    });

    it('two keys of one file rotated at the same time both land', async () => {
      const file = envFile('API_KEY=old-api\nDB_PASSWORD=old-db\n');
      const api = target(2, 'concurrent-api-value');
      const db = target(2, 'concurrent-db-value');
      await Promise.all([apply(file, api, 'API_KEY'), apply(file, db)]);
      expect(read(file).toString()).toBe(`API_KEY=${api.value}\nDB_PASSWORD=${db.value}\n`);
    });

    const lockOf = (file: string) => path.join(root, `.${file}.lock`);
    /** A process that is alive until killed, and what its lock would say. */
    const otherProcess = async () => {
      const proc = spawn('sleep', ['60']);
      await once(proc, 'spawn');
      const exited = once(proc, 'exit');
      return { owner: `${lockOwner(proc.pid!)} ${randomBytes(8).toString('hex')}`, kill: async () => (proc.kill('SIGKILL'), await exited) };
    };
    const settles = <T>(p: Promise<T>) => {
      const state = { settled: false, promise: p.finally(() => (state.settled = true)) };
      return state;
    };

    /**
     * A worker process applying `count` values of `key` to `file` one after another, once told to go
     * (a line on stdin). Before each apply (and at the end) it checks that the file still holds the
     * value it wrote last: only the other process writes the file meanwhile, and only another key.
     */
    const writer = (file: string, key: string, prefix: string, count: number) => {
      const script = `
        const { readFileSync } = await import('node:fs');
        const { createEnvFileDependent } = await import(${JSON.stringify(path.join(ROOT, 'dependents/env-file/index.ts'))});
        const dep = createEnvFileDependent({ root: ${JSON.stringify(envFilesRoot)} });
        const full = ${JSON.stringify(path.join(root, file))};
        const holds = (value) => readFileSync(full, 'latin1').split('\\n').includes(${JSON.stringify(key)} + '=' + value);
        process.stdout.write('ready\\n');
        await new Promise((go) => process.stdin.once('data', go));
        let last = null, lost = 0;
        const failed = [];
        for (let i = 1; i <= ${count}; i++) {
          if (last !== null && !holds(last)) lost++;
          const value = ${JSON.stringify(prefix)} + '-' + i;
          try {
            await dep.apply({ settings: { file: ${JSON.stringify(file)}, key: ${JSON.stringify(key)} }, identityId: ${JSON.stringify(ME)}, credentialId: 'c', credentialName: 'n',
              secrets: {}, target: { version: i, value }, idempotencyKey: 'apply:' + i });
            last = value;
          } catch (err) {
            failed.push(err.message);
          }
        }
        if (last !== null && !holds(last)) lost++;
        process.stdout.write(JSON.stringify({ lost, failed }) + '\\n');
        process.exit(0);
      `;
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      const ready = new Promise<void>((resolve, reject) => {
        const check = () => (out.startsWith('ready\n') ? resolve() : undefined);
        child.stdout.on('data', check);
        child.once('exit', (code) => reject(new Error(`writer exited ${code} before it was ready: ${err}`)));
      });
      const done = new Promise<{ lost: number; failed: string[] }>((resolve, reject) => {
        child.once('exit', (code) => (code === 0 ? resolve(JSON.parse(out.split('\n')[1]!)) : reject(new Error(`writer exited ${code}: ${err}`))));
      });
      // Awaited by the test, unless it failed before: then they are the finally's kill, not news.
      for (const p of [ready, done]) p.catch(() => undefined);
      return { ready, go: () => child.stdin.write('go\n'), done, kill: () => child.kill('SIGKILL') };
    };

    it('two processes applying different keys of one file many times lose neither key\'s writes', { timeout: 120_000 }, async () => {
      // A rolling deploy's overlap: an old and a new worker, each rotating a credential of the same file.
      const file = envFile('# two workers\nAPI_KEY=old-api\nMIDDLE=kept\nDB_PASSWORD=old-db\n');
      const count = 300;
      const writers = [writer(file, 'API_KEY', 'api', count), writer(file, 'DB_PASSWORD', 'db', count)];
      try {
        await Promise.all(writers.map((w) => w.ready));
        // Both find a lock a killed worker left, and both judge it stale: one of them takes it over.
        const dead = await otherProcess();
        await dead.kill();
        writeFileSync(lockOf(file), `${dead.owner}\n`);
        for (const w of writers) w.go();
        const [api, db] = await Promise.all(writers.map((w) => w.done));
        // Before, each process serialised only its own writes: one's rename dropped the other's line.
        expect({ api, db }).toEqual({ api: { lost: 0, failed: [] }, db: { lost: 0, failed: [] } });
        expect(read(file).toString()).toBe(`# two workers\nAPI_KEY=api-${count}\nMIDDLE=kept\nDB_PASSWORD=db-${count}\n`);
        expect(readdirSync(root).filter((name) => name.startsWith(`.${file}`))).toEqual([]);
      } finally {
        for (const w of writers) w.kill();
      }
    });

    it('a lock whose process is gone is taken over at once', async () => {
      const file = envFile('API_KEY=old-api\nDB_PASSWORD=old-db\n');
      const dead = await otherProcess();
      await dead.kill();
      writeFileSync(lockOf(file), `${dead.owner}\n`);
      const began = Date.now();
      await apply(file, target(2, 'after-a-dead-lock'));
      expect(Date.now() - began).toBeLessThan(2_000);
      expect(read(file).toString()).toBe(`API_KEY=old-api\nDB_PASSWORD=${h.secret('after-a-dead-lock')}\n`);
      expect(existsSync(lockOf(file))).toBe(false);
      expect(existsSync(`${lockOf(file)}.break`)).toBe(false);

      // Its pid now another process's (this one's, say): the start time tells them apart.
      const [pid, started, space] = lockOwner().split(' ');
      writeFileSync(lockOf(file), `${pid} ${Number(started) - 1} ${space} ${randomBytes(8).toString('hex')}\n`);
      await apply(file, target(3, 'after-a-reused-pid-lock'), 'API_KEY');
      expect(read(file).toString()).toBe(`API_KEY=${h.secret('after-a-reused-pid-lock')}\nDB_PASSWORD=${h.secret('after-a-dead-lock')}\n`);
      expect(existsSync(lockOf(file))).toBe(false);
    });

    it('a live holder makes a write wait until it releases the lock', async () => {
      const file = envFile('DB_PASSWORD=held-orig\n');
      const holder = await otherProcess();
      try {
        writeFileSync(lockOf(file), `${holder.owner}\n`);
        // A call with nothing to change (a retry, a restore of the value in place) does not wait for it.
        await restore(file, target(1, 'held-orig'));
        const write = settles(apply(file, target(2, 'waited-for-the-lock')));
        await new Promise((r) => setTimeout(r, 600));
        expect(write.settled).toBe(false);
        expect(read(file).toString()).toBe('DB_PASSWORD=held-orig\n');
        expect(readFileSync(lockOf(file), 'utf8')).toBe(`${holder.owner}\n`);
        rmSync(lockOf(file)); // the holder's release
        await write.promise;
        expect(read(file).toString()).toBe(`DB_PASSWORD=${h.secret('waited-for-the-lock')}\n`);
        expect(existsSync(lockOf(file))).toBe(false);
      } finally {
        await holder.kill();
      }
    });

    it('a lock of another container or host is waited for while touched, and taken over once untouched for the stale bound', async () => {
      const file = envFile('DB_PASSWORD=elsewhere-orig\n');
      // Its pid means nothing here (another pid namespace): this very process's pid, say.
      writeFileSync(lockOf(file), `${process.pid} 12345 worker-2/${randomUUID()}/4026532999 ${randomBytes(8).toString('hex')}\n`);
      const write = settles(apply(file, target(2, 'after-an-untouched-lock')));
      await new Promise((r) => setTimeout(r, 600));
      expect(write.settled).toBe(false);
      expect(read(file).toString()).toBe('DB_PASSWORD=elsewhere-orig\n');
      const untouched = (Date.now() - STALE_LOCK_MS - 1_000) / 1000;
      utimesSync(lockOf(file), untouched, untouched);
      await write.promise;
      expect(read(file).toString()).toBe(`DB_PASSWORD=${h.secret('after-an-untouched-lock')}\n`);
      expect(existsSync(lockOf(file))).toBe(false);
    });

    it('the lock holds who writes, never the value, and is gone after a write that fails', async () => {
      const file = envFile("DB_PASSWORD='orig'\n");
      const value = h.secret(`lock-${randomBytes(6).toString('hex')}`);
      let seen = '';
      await withEnvFile(root, file, (f) => rewriteFile(f, (content) => {
        if (existsSync(lockOf(file))) seen = readFileSync(lockOf(file), 'utf8'); // its edit under the lock (a first one, without, finds there is work to do)
        return Buffer.from(content.toString().replace('orig', value));
      }));
      expect(read(file).toString()).toBe(`DB_PASSWORD='${value}'\n`);
      expect(seen).toMatch(new RegExp(`^${process.pid} \\S+ \\S+ [0-9a-f]{16}\\n$`));
      expect(seen).not.toContain(value);
      expect(existsSync(lockOf(file))).toBe(false);
      // An edit that fails under the lock (its first call, without it, found work to do): the lock is removed all the same.
      let calls = 0;
      let heldWhenItFailed = false;
      const failing = withEnvFile(root, file, (f) => rewriteFile(f, (content) => {
        if (++calls === 1) return Buffer.from(`${content}\n`);
        heldWhenItFailed = existsSync(lockOf(file));
        throw new UnprocessableError('refused under the lock');
      }));
      await expect(failing).rejects.toThrow('refused under the lock');
      expect(heldWhenItFailed).toBe(true);
      expect(existsSync(lockOf(file))).toBe(false);
      expect(readdirSync(root).filter((name) => name.startsWith(`.${file}`))).toEqual([]);
    });

    it('a write whose lock was taken over while it held it (paused past the stale bound) changes nothing', async () => {
      const file = envFile('DB_PASSWORD=paused-orig\n');
      const taker = `${process.pid} 1 elsewhere/-/- ${randomBytes(8).toString('hex')}\n`;
      const err = await withEnvFile(root, file, (f) => rewriteFile(f, () => {
        if (existsSync(lockOf(file))) {
          // Under the lock: another process judged it stale, broke it and took it.
          rmSync(lockOf(file));
          writeFileSync(lockOf(file), taker);
        }
        return Buffer.from('DB_PASSWORD=must-not-land\n');
      })).catch((e: Error) => e);
      expect((err as Error).message).toBe(`env file ${file} was not written: its lock was taken over as stale while this write held it`);
      expect(read(file).toString()).toBe('DB_PASSWORD=paused-orig\n');
      expect(readFileSync(lockOf(file), 'utf8')).toBe(taker); // the taker's, left alone
      expect(readdirSync(root).filter((name) => name.startsWith(`.${file}`))).toEqual([`.${file}.lock`]);
      rmSync(lockOf(file));
    });

    it('something else at the lock\'s name is refused, not removed', async () => {
      const file = envFile('DB_PASSWORD=in-the-way\n');
      symlinkSync(path.join(root, file), lockOf(file));
      await expect(apply(file, target(2, 'must-not-land-anywhere'))).rejects.toThrow(`env file ${file} cannot be locked: .${file}.lock beside it is not a lock file; remove it`);
      expect(read(file).toString()).toBe('DB_PASSWORD=in-the-way\n');
      rmSync(lockOf(file));
      mkdirSync(lockOf(file));
      await expect(apply(file, target(2, 'must-not-land-anywhere'))).rejects.toThrow(/cannot be locked/);
      expect(statSync(lockOf(file)).isDirectory()).toBe(true);
    });

    it('verify fails when the file holds another value, without naming either value', async () => {
      const file = envFile('DB_PASSWORD=orig\n');
      const pending = target(5, 'verify-pending-value');
      await apply(file, pending);
      writeFileSync(path.join(root, file), `DB_PASSWORD=${h.secret('someone-else-wrote-this')}\n`);
      const err = await verify(file, pending).catch((e: Error) => e);
      expect(err).toBeInstanceOf(Error);
      expect((err as Error).message).toBe(`DB_PASSWORD in ${file} does not hold version 5`);
    });

    it('refuses a value its line cannot hold, naming the styles that would, and changes nothing', async () => {
      const cases: [string, string, RegExp][] = [
        ['DB_PASSWORD=orig\n', 'has a space', /as an unquoted value .*; it would fit a single-quoted or double-quoted line$/],
        ["DB_PASSWORD='orig'\n", "it's quoted", /as a single-quoted value .*; it would fit a double-quoted line$/],
        ['DB_PASSWORD="orig"\n', 'costs $5', /as a double-quoted value .*; it would fit a single-quoted line$/],
        ["DB_PASSWORD='orig'\n", 'two\nlines', /as a single-quoted value .*; it would fit a double-quoted line$/],
        ['DB_PASSWORD="orig"\n', 'back\\slash', /as a double-quoted value \(no ", backslash, \$ or `\)$/],
      ];
      for (const [content, value, message] of cases) {
        const file = envFile(content);
        const err = (await apply(file, target(4, value)).catch((e: Error) => e)) as Error;
        expect(err).toBeInstanceOf(UnprocessableError);
        expect(err.message).toMatch(message);
        expect(err.message).not.toContain(value);
        expect(read(file).toString()).toBe(content);
      }
    });

    it('refuses to change a line whose current value it could not write back exactly', async () => {
      for (const content of ['DB_PASSWORD=two words\n', 'DB_PASSWORD="with \\"escaped\\" quotes"\n']) {
        const file = envFile(content);
        await expect(apply(file, target(6, 'fits-anywhere'))).rejects.toThrow(/could not be written back exactly .* fix the line's quoting first/);
        expect(read(file).toString()).toBe(content);
      }
    });

    it('a restore of the value the line already holds changes nothing, even one it could not write (the apply before it refused)', async () => {
      // A space: no unquoted line can be written with it. Before, the compensation's restore failed ("cannot be written … as unquoted").
      const value = `kept ${randomBytes(6).toString('hex')}`;
      const content = `DB_PASSWORD=${value}\nOTHER=1\n`;
      const file = envFile(content);
      await expect(apply(file, target(6, `refused-${randomBytes(4).toString('hex')}`))).rejects.toThrow(/could not be written back exactly/);
      await restore(file, target(5, value));
      expect(read(file).toString()).toBe(content);
    });

    it('after an apply that was refused, a restore where the file, its directory or its line is not there has nothing to put back; any other refusal, or absence after a completed apply, still fails it', async () => {
      const old = target(1, `absent-old-${randomBytes(4).toString('hex')}`);
      const noKey = envFile('OTHER=1\n');
      const undo = (file: string, identityId = ME) => dep().restore({ ...ctx(file), identityId, target: old, idempotencyKey: 'rot:restore:1', unapplied: true });
      // Each refused the apply before it changed anything; before, the restore was refused the same way (a failed undo).
      for (const file of ['missing.env', 'nowhere/app.env', noKey]) {
        await expect(apply(file, target(2, 'absent-pending-value'))).rejects.toThrow(UnprocessableError);
        await expect(undo(file)).resolves.toBeUndefined();
        // A rollback's restore (the apply completed): the file may come back holding the abandoned version.
        await expect(restore(file, old)).rejects.toThrow(UnprocessableError);
      }
      expect(read(noKey).toString()).toBe('OTHER=1\n');
      const homeless = randomUUID();
      await expect(undo(noKey, homeless)).resolves.toBeUndefined();
      expect(existsSync(path.join(envFilesRoot, homeless))).toBe(false);
      // Present but not restorable: still a failure.
      const twice = envFile('DB_PASSWORD=a\nDB_PASSWORD=b\n');
      await expect(undo(twice)).rejects.toThrow(/is set 2 times/);
      await expect(undo('../outside/victim.env')).rejects.toThrow(/outside the env files root/);
    });

    it('a temp file a killed write left (holding the value it wrote) is removed by the next write once 10 s old; a younger one is left to its writer', async () => {
      const file = envFile('DB_PASSWORD=orig-left\n');
      const old = path.join(root, `.${file}.${'a1'.repeat(6)}.tmp`);
      const young = path.join(root, `.${file}.${'b2'.repeat(6)}.tmp`);
      const others = path.join(root, `.x${file}.${'c3'.repeat(6)}.tmp`); // another file's
      for (const f of [old, young, others]) writeFileSync(f, 'DB_PASSWORD=left-behind\n', { mode: 0o600 });
      const past = new Date(Date.now() - 60_000);
      for (const f of [old, others]) utimesSync(f, past, past);
      await apply(file, target(2, `after-leftover-${randomBytes(4).toString('hex')}`));
      expect([existsSync(old), existsSync(young), existsSync(others)]).toEqual([false, true, true]);
    });

    it('an env file over 1 MiB is refused unread, and left as it was', async () => {
      const content = `DB_PASSWORD=old-value\n# ${'x'.repeat(MAX_ENV_FILE_BYTES)}\n`;
      const file = envFile(content);
      const err = (await apply(file, target(3, `big-${randomBytes(4).toString('hex')}`)).catch((e: Error) => e)) as Error;
      expect(err).toBeInstanceOf(UnprocessableError);
      expect(err.message).toMatch(/^env file app-\d+\.env is refused: it is larger than 1 MiB \(\d+ bytes\)$/);
      expect(read(file).toString()).toBe(content);
    });

    it('a FIFO where the file was (swapped in after the check) is refused at once, not waited on', async () => {
      const fifo = path.join(root, `pipe-${++n}.env`);
      execFileSync('mkfifo', [fifo]);
      // Before, the open waited for a writer (for good, holding a thread of libuv's pool): this valve lets a stuck open go after 3 s.
      const valve = setTimeout(() => closeSync(openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK)), 3_000);
      const started = Date.now();
      try {
        await expect(readNoFollow(fifo)).rejects.toThrow(/is refused: it is not a regular file/);
        expect(Date.now() - started).toBeLessThan(2_000);
      } finally {
        clearTimeout(valve);
      }
    });

    it('a missing, commented-out, duplicated or multi-line key is a misconfiguration', async () => {
      const pending = target(2, 'misconfigured-pending');
      const cases: [string, RegExp][] = [
        ['OTHER=1\n', /^DB_PASSWORD is not set in app-\d+\.env; the dependent is misconfigured/],
        ['# DB_PASSWORD=x\nDB_PASSWORD_2=y\n', /is not set in/],
        ['DB_PASSWORD=a\nOTHER=1\nexport DB_PASSWORD=b\n', /^DB_PASSWORD is set 2 times in app-\d+\.env \(lines 1, 3\); it must be set exactly once$/],
        ['DB_PASSWORD="first\nsecond"\n', /spans several lines or lacks its closing quote/],
        ['DB_PASSWORD=`cmd`\n', /backtick-quoted/],
        ['DB_PASSWORD="x" trailing\n', /text after its closing quote/],
        ['DB_PASSWORD=#x\n', /cannot be read the same way by every dotenv parser/],
      ];
      for (const [content, message] of cases) {
        const file = envFile(content);
        const err = (await apply(file, pending).catch((e: Error) => e)) as Error;
        expect(err).toBeInstanceOf(UnprocessableError);
        expect(err.message).toMatch(message);
        expect(read(file).toString()).toBe(content);
      }
    });

    it('an identity reaches only its own directory: another identity’s file is not there, and no directory is a clear refusal', async () => {
      const mine = envFile('DB_PASSWORD=mine\n');
      const other = randomUUID();
      mkdirSync(path.join(envFilesRoot, other));
      const asOther = (file: string) => dep().apply({ ...ctx(file), identityId: other, target: target(2, 'written-by-another-identity'), idempotencyKey: 'rot:apply:2' });
      await expect(asOther(mine)).rejects.toThrow(/it does not exist/);
      await expect(asOther(`../${ME}/${mine}`)).rejects.toThrow(/outside the env files root/);
      const homeless = randomUUID();
      await expect(dep().apply({ ...ctx(mine), identityId: homeless, target: target(2, 'written-by-another-identity'), idempotencyKey: 'rot:apply:2' })).rejects.toThrow(
        `this identity has no env files directory: create ENV_FILES_ROOT/${homeless} and put its files there`,
      );
      expect(read(mine).toString()).toBe('DB_PASSWORD=mine\n');
    });

    it('refuses paths outside the root, symbolic links on the way, links and non-files', async () => {
      const victim = path.join(outside, 'victim.env');
      writeFileSync(victim, 'DB_PASSWORD=outside\n');
      const inside = envFile('DB_PASSWORD=inside\n');
      mkdirSync(path.join(root, 'sub'));
      writeFileSync(path.join(root, 'sub', 'app.env'), 'DB_PASSWORD=sub\n');
      symlinkSync(outside, path.join(root, 'to-outside'));
      symlinkSync(path.join(root, 'sub'), path.join(root, 'to-sub'));
      symlinkSync(path.join(root, inside), path.join(root, 'link.env'));
      linkSync(victim, path.join(root, 'hard.env'));

      const refused: [string, RegExp][] = [
        ['../outside/victim.env', /outside the env files root/],
        ['sub/../../outside/victim.env', /outside the env files root/],
        [victim, /must be a path relative to the env files root/],
        ['to-outside/victim.env', /a symbolic link is on its way/],
        ['to-sub/app.env', /a symbolic link is on its way/],
        ['link.env', /it is a symbolic link/],
        ['hard.env', /it has other hard links/],
        ['sub', /it is not a regular file/],
        ['missing.env', /it does not exist/],
        ['nowhere/app.env', /its directory does not exist/],
      ];
      for (const [file, message] of refused) {
        await expect(apply(file, target(2, 'must-not-land-anywhere'))).rejects.toThrow(message);
      }
      expect(readFileSync(victim, 'utf8')).toBe('DB_PASSWORD=outside\n');
      expect(read(inside).toString()).toBe('DB_PASSWORD=inside\n');
      // The same file through a plain path inside the root is fine.
      await apply('sub/app.env', target(2, 'sub-pending-value'));
    });

    it('writes through the directory it checked: one swapped for a link to another identity\'s after the check gets nothing', async () => {
      const other = randomUUID();
      const theirs = path.join(envFilesRoot, other, 'conf', 'app.env');
      mkdirSync(path.dirname(theirs), { recursive: true });
      writeFileSync(theirs, 'DB_PASSWORD=theirs\n');
      mkdirSync(path.join(root, 'conf'));
      writeFileSync(path.join(root, 'conf', 'app.env'), 'DB_PASSWORD=mine\n');
      const pending = 'DB_PASSWORD=swapped-dir-pending-value\n';
      await withEnvFile(root, 'conf/app.env', async (f) => {
        // Whoever can write in the identity's directory swaps conf for a link, after the check.
        renameSync(path.join(root, 'conf'), path.join(root, 'conf-was'));
        symlinkSync(path.dirname(theirs), path.join(root, 'conf'));
        await rewriteFile(f, () => Buffer.from(pending));
        expect((await readNoFollow(f.path)).content.toString()).toBe(pending);
      });
      // Before, every open and the rename went by path again: the value landed in the other identity's file.
      expect(readFileSync(theirs, 'utf8')).toBe('DB_PASSWORD=theirs\n');
      expect(readFileSync(path.join(root, 'conf-was', 'app.env'), 'utf8')).toBe(pending);
      expect(readdirSync(path.dirname(theirs))).toEqual(['app.env']);
      // And a later call is refused at the link.
      await expect(apply('conf/app.env', target(2, 'must-not-land-anywhere'))).rejects.toThrow(/a symbolic link is on its way/);
    });

    it('checkDependents names the bad field and fills defaults', () => {
      const check = (type: string, settings: Record<string, unknown>) => () => checkDependents([{ type, settings }], registry);
      expect(check('env-file', { file: '../x.env', key: 'K' })).toThrow(/dependents\.0\.settings\.file: must not contain '\.\.'/);
      expect(check('env-file', { file: '/etc/passwd', key: 'K' })).toThrow(/dependents\.0\.settings\.file: must be a path relative/);
      expect(check('env-file', { file: 'a.env', key: '1BAD' })).toThrow(/dependents\.0\.settings\.key: must be an environment variable name/);
      expect(check('env-file', { file: 'a.env', key: 'K', mode: 1 })).toThrow(/dependents\.0\.settings/);
      expect(check('webhook', { url: 'ftp://x', signingKeyCredential: 'k' })).toThrow(/dependents\.0\.settings\.url: must be an http or https URL/);
      expect(check('webhook', { url: 'https://u:p@x.test/', signingKeyCredential: 'k' })).toThrow(/dependents\.0\.settings\.url: must not carry a user/);
      expect(check('nope', {})).toThrow(/dependents\.0\.type 'nope' is unknown; known types: env-file, webhook/);
      const list = [
        { type: 'env-file', settings: { file: 'a.env', key: 'K' } },
        { type: 'webhook', settings: { url: 'https://hooks.example.test/x', signingKeyCredential: 'hook-key' } },
      ];
      expect(checkDependents(list, registry)[1]!.settings).toEqual({ ...list[1]!.settings, timeoutMs: 10_000 });
      expect(() => checkDependents([list[0]!, { type: 'webhook', settings: { url: 'https://x.test' } }], registry)).toThrow(
        /dependents\.1\.settings\.signingKeyCredential/,
      );
    });
  });

  describe('webhook', () => {
    const keyName = 'webhook-signing-key';
    let agent: { id: string; token: string };
    let signingKey: string;
    let receiver: WebhookReceiver;
    const credentialId = '5f0c0a52-6d8e-4f0a-9d34-0c6c2b1f7e11';

    const ctx = (settings: Record<string, unknown> = {}, credentialName = 'payments-api') => ({
      settings: registry.webhook!.settings.parse({ url: receiver.url, signingKeyCredential: keyName, ...settings }),
      identityId: agent.id,
      credentialId,
      credentialName,
      secrets: { read: async (name: string) => (await h.services.vault.get({ identityId: agent.id, actor: 'test' }, { name })).value },
    });
    const pending: DependentTarget = { version: 2, value: '' };
    const previous: DependentTarget = { version: 1, value: '' };
    const hook = () => registry.webhook!;

    beforeAll(async () => {
      agent = await h.createIdentity();
      signingKey = h.secret(`whsec_${randomBytes(24).toString('hex')}`);
      const res = await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: keyName, kind: 'generic', value: signingKey } });
      expect(res.status).toBe(201);
      pending.value = h.secret(`pending-${randomBytes(12).toString('hex')}`);
      previous.value = h.secret(`previous-${randomBytes(12).toString('hex')}`);
      receiver = new WebhookReceiver(signingKey);
      await receiver.start();
    });
    afterAll(async () => {
      await receiver.stop();
    });
    const reset = () => {
      receiver.events.length = 0;
      receiver.rejected.length = 0;
      receiver.answerVersion = null;
      receiver.failWith = null;
      receiver.delayMs = 0;
      receiver.signingKey = signingKey;
    };

    it('sends signed events that carry ids and versions, never a value', async () => {
      reset();
      await hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-1:apply:0' });
      await hook().verify({ ...ctx(), target: pending });
      await hook().restore({ ...ctx(), target: previous, idempotencyKey: 'rot-1:restore:0' });
      await hook().promoted!({ ...ctx(), target: pending, idempotencyKey: 'rot-1:promoted:0' });

      expect(receiver.rejected).toEqual([]);
      expect(receiver.events.map((r) => [r.event.type, r.event.version, r.event.id])).toEqual([
        ['credential.pending', 2, 'rot-1:apply:0'],
        ['credential.verify', 2, expect.stringMatching(new RegExp(`^verify:${credentialId}:2:[0-9a-f-]{36}$`))],
        ['credential.restored', 1, 'rot-1:restore:0'],
        ['credential.promoted', 2, 'rot-1:promoted:0'],
      ]);
      for (const { event, raw, headers } of receiver.events) {
        expect(Object.keys(event).sort()).toEqual(['credentialId', 'credentialName', 'id', 'type', 'version']);
        expect(event).toMatchObject({ credentialId, credentialName: 'payments-api' });
        expect(headers['idempotency-key']).toBe(event.id);
        expect(headers['content-type']).toBe('application/json');
        expect(verifyWebhookSignature(headers['mailgent-signature'] as string, raw, signingKey)).toBe(true);
        for (const secret of [pending.value, previous.value, signingKey]) expect(raw).not.toContain(secret);
      }
    });

    it('a retry sends the same body under the same idempotency key (a receiver may refuse a key reused with another body)', async () => {
      reset();
      await hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-2:apply:0' });
      await new Promise((r) => setTimeout(r, 20));
      await hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-2:apply:0' });
      const [first, retry] = receiver.events;
      // Before, the body carried the time it was sent: a retry's differed.
      expect(retry!.raw).toBe(first!.raw);
      expect(retry!.headers['idempotency-key']).toBe('rot-2:apply:0');
    });

    it('verify requires the receiver to report the pending version', async () => {
      reset();
      receiver.answerVersion = 1;
      await expect(hook().verify({ ...ctx(), target: pending })).rejects.toThrow(/^webhook http:\/\/127\.0\.0\.1:\d+ reports version 1, not 2$/);
      receiver.answerVersion = null;
      await hook().verify({ ...ctx(), target: pending });
    });

    it('a non-2xx answer fails with its status and no body; 5xx and 409 may be retried, another 4xx is a misconfiguration', async () => {
      reset();
      receiver.failWith = 503;
      const transient = (await hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-2:apply:0' }).catch((e: Error) => e)) as Error;
      expect(transient.message).toMatch(/^webhook http:\/\/127\.0\.0\.1:\d+ answered 503 to credential\.pending$/);
      expect(transient).not.toBeInstanceOf(UnprocessableError);
      // A 409 is what a receiver keeping idempotency keys answers a retry while the first request
      // with that key is still in progress (a worker killed mid-call): it heals, as at a provider.
      receiver.failWith = 409;
      const inProgress = (await hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-2:apply:0' }).catch((e: Error) => e)) as Error;
      expect(inProgress.message).toMatch(/answered 409 to credential\.pending$/);
      expect(inProgress).not.toBeInstanceOf(UnprocessableError);
      receiver.failWith = 404;
      const permanent = (await hook().verify({ ...ctx(), target: pending }).catch((e: Error) => e)) as Error;
      expect(permanent).toBeInstanceOf(UnprocessableError);
      expect(permanent.message).toMatch(/answered 404 to credential\.verify$/);
      expect(transient.message + permanent.message).not.toContain('receiver-side');
    });

    it('a slow or unreachable receiver fails within the timeout', async () => {
      reset();
      receiver.delayMs = 1_000;
      await expect(hook().apply({ ...ctx({ timeoutMs: 200 }), target: pending, idempotencyKey: 'rot-3:apply:0' })).rejects.toThrow(
        /did not answer credential\.pending within 200 ms$/,
      );
      const closed = createServer().listen(0, '127.0.0.1');
      await once(closed, 'listening');
      const port = (closed.address() as AddressInfo).port;
      await new Promise((resolve) => closed.close(resolve));
      await expect(hook().apply({ ...ctx({ url: `http://127.0.0.1:${port}/hook` }), target: pending, idempotencyKey: 'rot-3:apply:1' })).rejects.toThrow(
        `webhook http://127.0.0.1:${port} did not answer credential.pending: ECONNREFUSED`,
      );
    });

    it('a receiver on this machine or a private network is not called unless OUTBOUND_ALLOW lists it', async () => {
      reset();
      allowOutbound([]);
      try {
        const refused = (await hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-5:apply:0' }).catch((e: Error) => e)) as Error;
        expect(refused).toBeInstanceOf(UnprocessableError);
        expect(refused.message).toMatch(/^webhook http:\/\/127\.0\.0\.1:\d+: 127\.0\.0\.1 is an address on this machine or a private network/);
        expect(receiver.events).toEqual([]);
      } finally {
        allowOutbound(TEST_OUTBOUND_ALLOW);
      }
    });

    it('a receiver with another key rejects the event (401)', async () => {
      reset();
      receiver.signingKey = 'a-different-signing-key-entirely';
      await expect(hook().apply({ ...ctx(), target: pending, idempotencyKey: 'rot-4:apply:0' })).rejects.toThrow(/answered 401/);
      expect(receiver.rejected).toHaveLength(1);
      expect(receiver.events).toEqual([]);
    });

    it('the signing key must exist, be long enough, and not be the rotated credential itself', async () => {
      reset();
      await expect(hook().apply({ ...ctx({ signingKeyCredential: 'no-such-key' }), target: pending, idempotencyKey: 'k' })).rejects.toThrow(/not found|no-such-key/i);
      await expect(hook().apply({ ...ctx({}, keyName), target: pending, idempotencyKey: 'k' })).rejects.toThrow(/is the credential being rotated/);
      await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'short-key', kind: 'generic', value: h.secret('short-key-1') } });
      await expect(hook().apply({ ...ctx({ signingKeyCredential: 'short-key' }), target: pending, idempotencyKey: 'k' })).rejects.toThrow(/shorter than 16/);
      expect(receiver.events).toEqual([]);
    });

    it('verifyWebhookSignature accepts the scheme and rejects tampered, stale and malformed signatures', () => {
      const key = 'whsec_unit_test_key_0123456789';
      const body = JSON.stringify({ id: 'e1', type: 'credential.pending', version: 3 });
      const t = 1_750_000_000;
      const at = (seconds: number) => ({ now: new Date(seconds * 1000) });
      const sig = (k: string, b: string, ts = t) => createHmac('sha256', k).update(`${ts}.${b}`).digest('hex');
      const header = `t=${t},v1=${sig(key, body)}`;

      expect(verifyWebhookSignature(header, body, key, at(t))).toBe(true);
      expect(verifyWebhookSignature(header, Buffer.from(body), key, at(t + 299))).toBe(true);
      expect(verifyWebhookSignature(`t=${t},v1=${'0'.repeat(64)},v1=${sig(key, body)}`, body, key, at(t))).toBe(true);

      expect(verifyWebhookSignature(header, body.replace('3', '4'), key, at(t))).toBe(false);
      const flipped = header.slice(0, -1) + (header.endsWith('0') ? '1' : '0');
      expect(verifyWebhookSignature(flipped, body, key, at(t))).toBe(false);
      expect(verifyWebhookSignature(`t=${t + 1},v1=${sig(key, body)}`, body, key, at(t))).toBe(false);
      expect(verifyWebhookSignature(header, body, 'another-key-0123456789', at(t))).toBe(false);
      expect(verifyWebhookSignature(header, body, key, at(t + 301))).toBe(false);
      expect(verifyWebhookSignature(header, body, key, at(t - 301))).toBe(false);
      expect(verifyWebhookSignature(header, body, key, { toleranceSeconds: 10, ...at(t + 11) })).toBe(false);
      for (const bad of [undefined, '', 'garbage', `v1=${sig(key, body)}`, `t=${t}`, `t=abc,v1=${sig(key, body)}`, `t=${t},v1=${sig(key, body).slice(2)}`]) {
        expect(verifyWebhookSignature(bad, body, key, at(t))).toBe(false);
      }
    });
  });
});
