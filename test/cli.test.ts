import { spawn } from 'node:child_process';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, STATUS_CODES, type RequestListener } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { base32 } from './support/base32';
import { startHarness, type Harness } from './support/harness';
import { expectCleanRun } from './support/leaks';

/**
 * The `mailgent` binary as a user runs it: `node bin/mailgent.js …` as a child process, from a
 * directory outside the repository, against this file's API (and worker, for rotations). Checks
 * stdout, stderr and the exit code (a contract: 0 ok, 1 failed, 2 usage, 3 denied/not found,
 * 4 unreachable) in human and --json modes.
 */

const BIN = fileURLToPath(new URL('../bin/mailgent.js', import.meta.url));

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

describe('mailgent CLI', () => {
  let h: Harness;
  let cwd: string;
  let alice: { id: string; token: string };
  let bob: { id: string; token: string };

  /** Runs the binary with a clean environment (no inherited tokens) plus `env`, feeding `input` on stdin. */
  const mailgent = (args: string[], opts: { env?: Record<string, string>; input?: string; exe?: boolean } = {}): Promise<Run> =>
    new Promise((resolve, reject) => {
      const env = { PATH: process.env.PATH!, HOME: process.env.HOME ?? cwd, MAILGENT_URL: h.url, ...opts.env };
      const child = opts.exe ? spawn(BIN, args, { cwd, env }) : spawn(process.execPath, [BIN, ...args], { cwd, env });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d) => (stdout += d));
      child.stderr.on('data', (d) => (stderr += d));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stdout, stderr }));
      child.stdin.end(opts.input ?? '');
    });
  const as = (who: { token: string }) => ({ MAILGENT_TOKEN: who.token });
  const admin = () => ({ MAILGENT_ADMIN_TOKEN: h.adminToken });
  const json = (run: Run) => JSON.parse(run.stdout);
  const read = async (token: string, name: string, version?: number) => {
    const res = await h.api('POST', '/v1/vault.get', { token, body: { name, ...(version ? { version } : {}) } });
    if (res.status === 200) h.secret(res.body.value as string);
    return res.body;
  };

  beforeAll(async () => {
    h = await startHarness({ worker: true });
    cwd = mkdtempSync(path.join(tmpdir(), 'mailgent-cli-'));
    alice = await h.createIdentity('cli-alice', 'cli-alice@example.com');
    bob = await h.createIdentity('cli-bob', 'cli-bob@example.com');
  });
  afterAll(async () => {
    rmSync(cwd, { recursive: true, force: true });
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  describe('usage', () => {
    it('is an executable that prints its usage with --help from any directory', async () => {
      expect(statSync(BIN).mode & 0o111).not.toBe(0);
      const run = await mailgent(['--help'], { exe: true });
      expect(run).toMatchObject({ code: 0, stderr: '' });
      for (const command of ['serve', 'api', 'worker', 'migrate', 'rekey', 'identities create', 'store', 'get', 'totp', 'rotate', 'leak', 'audit verify']) {
        expect(run.stdout).toContain(`  ${command}`);
      }
      expect(run.stdout).toMatch(/Exit codes: 0 ok, 1 the operation failed, 2 usage or configuration error,\s+3 not authorised or not found, 4 service unreachable/);
      const rotateHelp = await mailgent(['rotate', '--help']);
      expect(rotateHelp.code).toBe(0);
      expect(rotateHelp.stdout).toContain('Usage: mailgent rotate <name|id>...');
    });

    it('exits 2 with the usage for unknown commands, unknown options, missing or conflicting arguments', async () => {
      const unknown = await mailgent(['frobnicate']);
      expect(unknown).toMatchObject({ code: 2, stdout: '' });
      expect(unknown.stderr).toContain("mailgent frobnicate: Usage error: unknown command 'frobnicate'");
      expect(unknown.stderr).toContain('Usage: mailgent <command>');

      const missing = await mailgent(['get'], { env: as(alice) });
      expect(missing).toMatchObject({ code: 2, stdout: '' });
      expect(missing.stderr).toContain('missing <name|id>');
      expect(missing.stderr).toContain('Usage: mailgent get <name|id>');

      // A value is never taken from argv: there is no such flag.
      const valueFlag = await mailgent(['store', 'x', '--value', 'sk_in_argv_0001'], { env: as(alice) });
      expect(valueFlag.code).toBe(2);
      expect(valueFlag.stderr).toContain("Unknown option '--value'");

      const both = await mailgent(['rotate', 'a', '--kind', 'api_key'], { env: as(alice) });
      expect(both.code).toBe(2);
      expect(both.stderr).toContain('give credential names or a filter (--kind, --older-than), not both');
      const badAge = await mailgent(['rotate', '--older-than', '3h'], { env: as(alice) });
      expect(badAge.code).toBe(2);
      expect(badAge.stderr).toContain("--older-than must be whole days, e.g. 90d (got '3h')");

      const serviceArgs = await mailgent(['migrate', '--port', '1']);
      expect(serviceArgs.code).toBe(2);
      expect(serviceArgs.stderr).toContain('configuration comes from the environment');

      // --json: the problem on stdout as one JSON document, no usage text there.
      const asJson = await mailgent(['totp', '--json'], { env: as(alice) });
      expect(asJson.code).toBe(2);
      expect(json(asJson)).toEqual({ type: 'https://mailgent.dev/problems/cli-usage', title: 'Usage error', detail: 'missing <name|id>' });
    });

    it('-h or --help is a help request only as an option of its own, never as an option\'s value', async () => {
      // Before, `-h` anywhere printed the usage and exited 0: the leak went unreported.
      for (const args of [['leak', 'no-such-credential', '--details', '-h'], ['rotate', 'no-such-credential', '--reason', '-h'], ['store', 'x', '--value-env', '-h']]) {
        const run = await mailgent(args, { env: as(alice), input: 'v' });
        expect(run.code, args.join(' ')).toBe(2);
        expect(run.stdout, args.join(' ')).toBe('');
        expect(run.stderr, args.join(' ')).toContain(`Usage error: Option '${args[2]}' argument is ambiguous.`);
      }
      // Given inline, the value is the value, and the report reaches the API (which knows no such credential).
      const inline = await mailgent(['leak', 'no-such-credential', '--details=-h'], { env: as(alice) });
      expect(inline.code).toBe(3);
      expect(inline.stderr).toContain('Not found (404)');
      // As an option, even beside a mistake, it is help.
      for (const args of [['leak', 'x', '-h'], ['leak', '--bogus', '--help'], ['store', '--details', 'x', '-h'], ['migrate', '-h']]) {
        const run = await mailgent(args, { env: as(alice) });
        expect(run, args.join(' ')).toMatchObject({ code: 0, stderr: '' });
        expect(run.stdout, args.join(' ')).toMatch(/^Usage: mailgent /);
      }
    });

    it('a VAULT_MASTER_KEY file that is not a keyring is a configuration error (exit 2) before anything starts, its contents never shown', async () => {
      const dir = mkdtempSync(path.join(cwd, 'keyring-'));
      const files: Record<string, [contents: string, why: string]> = {
        bogus: ['{"bogus":1}', 'is neither one base64 key nor a keyring JSON document'],
        shortKey: [
          JSON.stringify({ version: 1, current: 'mk_0123456789abcdef', keys: [{ id: 'mk_0123456789abcdef', key: 'c2VjcmV0LWtleS12YWx1ZQ==', createdAt: new Date().toISOString() }] }),
          'holds a key that is not a 32-byte key matching its id',
        ],
      };
      for (const [name, [contents, why]] of Object.entries(files)) {
        const file = path.join(dir, `${name}.json`);
        writeFileSync(file, contents);
        // Before, the API migrated this database, then died on the keyring: exit 1, no heading.
        const run = await mailgent(['api'], {
          env: { DATA_DIR: dir, DATABASE_URL: h.databaseUrl, TEMPORAL_ADDRESS: '127.0.0.1:1', SMTP_URL: 'smtp://127.0.0.1:1', VAULT_MASTER_KEY: file, ADMIN_TOKEN: 'adm'.repeat(12) },
        });
        expect(run, name).toMatchObject({ code: 2, stdout: '' });
        expect(run.stderr, name).toBe(
          `Invalid configuration:\n  VAULT_MASTER_KEY: must be base64 of exactly 32 bytes (or several, comma-separated, the current one first), or the path of an existing keyring file; the file it names ${why}\n`,
        );
        expect(run.stderr, name).not.toMatch(/bogus|c2VjcmV0|mk_0123|keyring-/);
      }
    });

    it('exits 2 without a token or with a bad URL, and 4 when the service cannot be reached', async () => {
      const noToken = await mailgent(['get', 'anything']);
      expect(noToken.code).toBe(2);
      expect(noToken.stderr).toContain('no identity token: set MAILGENT_TOKEN (or pass --token)');
      const noAdmin = await mailgent(['audit', 'verify']);
      expect(noAdmin.code).toBe(2);
      expect(noAdmin.stderr).toContain('no admin token: set MAILGENT_ADMIN_TOKEN');
      // A token that cannot go into a header (a pasted line break, a typographic quote) is a usage error, never echoed.
      for (const bad of ['mgt_secret\nline', 'mgt_secret“quoted']) {
        const run = await mailgent(['get', 'anything', '--json'], { env: { MAILGENT_TOKEN: bad } });
        expect(run.code).toBe(2);
        expect(json(run)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-usage', detail: expect.stringContaining('holds a character a token never has') });
        expect(run.stdout + run.stderr).not.toContain('mgt_secret');
      }
      // rekey's configuration problems are configuration errors too.
      const rekey = await mailgent(['rekey'], { env: { DATA_DIR: cwd, VAULT_MASTER_KEY: randomBytes(32).toString('base64') } });
      expect(rekey.code).toBe(2);
      expect(rekey.stderr).toContain('VAULT_MASTER_KEY holds one inline key, so there is nothing to re-wrap under.');
      const badUrl = await mailgent(['get', 'anything'], { env: { ...as(alice), MAILGENT_URL: 'ftp://example.com' } });
      expect(badUrl.code).toBe(2);
      expect(badUrl.stderr).toContain('must be an http:// or https:// URL');

      const closed = await new Promise<number>((resolve) => {
        const server = createServer().listen(0, '127.0.0.1', () => {
          const { port } = server.address() as { port: number };
          server.close(() => resolve(port));
        });
      });
      const down = await mailgent(['get', 'anything', '--json', '--url', `http://127.0.0.1:${closed}`], { env: as(alice) });
      expect(down.code).toBe(4);
      expect(json(down)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-unreachable', detail: expect.stringContaining('ECONNREFUSED') });

      // A server that sends its headers and drops the connection before the body: see the next test.
      // A change sent, then no answer at all (the connection dropped): it may have been carried out.
      // Before, exit 4: a script taking that at its word would store, or start a rotation, twice.
      const silent = createServer((socket) => socket.once('data', () => socket.destroy()));
      await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
      try {
        const url = `http://127.0.0.1:${(silent.address() as { port: number }).port}`;
        for (const args of [['store', 'anything'], ['rotate', 'anything']]) {
          const run = await mailgent([...args, '--json', '--url', url], { env: as(alice), input: 'v' });
          expect(run.code, args[0]).toBe(1);
          expect(json(run), args[0]).toMatchObject({ type: 'https://mailgent.dev/problems/cli-answer-lost', detail: expect.stringContaining('it may have been carried out') });
        }
        expect((await mailgent(['get', 'anything', '--json', '--url', url], { env: as(alice) })).code).toBe(4);
      } finally {
        await new Promise((resolve) => silent.close(resolve));
      }
      // A change that never reached the API is safe to repeat.
      expect((await mailgent(['store', 'anything', '--url', `http://127.0.0.1:${closed}`], { env: as(alice), input: 'v' })).code).toBe(4);
      // A port fetch refuses outright (1, 25, 6000 …): nothing was sent, and the URL is wrong (before, store
      // said "was sent but no answer came; it may have been carried out", exit 1).
      const badPort = await mailgent(['store', 'anything', '--json'], { env: { ...as(alice), MAILGENT_URL: 'http://127.0.0.1:1' }, input: 'v' });
      expect(badPort.code).toBe(2);
      expect(json(badPort)).toEqual({
        type: 'https://mailgent.dev/problems/cli-usage',
        title: 'Usage error',
        detail: 'the API URL (--url or MAILGENT_URL) has a port that fetch refuses to connect to (bad port): http://127.0.0.1:1',
      });

      // The API's own refusals, answered as it answers them (test/read-thread.test.ts makes the real
      // unconfirmed store): a 503 whose store may have been committed is 1, not "try again later"
      // (before, 4: a script would store twice); a plain 503 is 4; a 431 is a malformed request, 2.
      const answers: Record<string, { status: number; problem: Record<string, unknown> }> = {
        unconfirmed: { status: 503, problem: { type: 'https://mailgent.dev/problems/unavailable', title: 'Service unavailable', status: 503, detail: 'the store could not be confirmed: it may have been committed', unconfirmed: true } },
        busy: { status: 503, problem: { type: 'https://mailgent.dev/problems/unavailable', title: 'Service unavailable', status: 503, detail: 'the database is unavailable; try again shortly' } },
        headers: { status: 431, problem: { type: 'https://mailgent.dev/problems/request-header-too-large', title: 'Request header fields too large', status: 431, detail: 'the request headers are too large' } },
      };
      let answer = answers.unconfirmed!;
      const api = createHttpServer((req, res) => {
        req.resume();
        req.on('end', () => res.writeHead(answer.status, { 'content-type': 'application/problem+json' }).end(JSON.stringify(answer.problem)));
      });
      await new Promise<void>((resolve) => api.listen(0, '127.0.0.1', resolve));
      try {
        const url = `http://127.0.0.1:${(api.address() as { port: number }).port}`;
        const store = () => mailgent(['store', 'anything', '--json', '--url', url], { env: as(alice), input: 'v' });
        const unconfirmed = await store();
        expect(unconfirmed.code).toBe(1);
        expect(json(unconfirmed)).toMatchObject({ status: 503, unconfirmed: true });
        answer = answers.busy!;
        expect((await store()).code).toBe(4);
        answer = answers.headers!;
        expect((await store()).code).toBe(2);
      } finally {
        await new Promise((resolve) => api.close(resolve));
      }
    });
    it('an answer cut off after its status line: a change answered with success was carried out, ≥ 500 may have been (exit 1); any other status keeps its exit code', async () => {
      // A server that sends its status line and headers, then drops the connection before the body.
      // The status it answers is the URL's first path segment (--url http://…/503), so runs go at once.
      const dropper = createServer((socket) => {
        socket.once('data', (request) => {
          const status = Number(/^\w+ \/(\d{3})\//.exec(String(request))![1]);
          const head = `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\ncontent-type: application/${status < 400 ? '' : 'problem+'}json\r\ncontent-length: 100\r\n\r\n`;
          socket.end(`${head}{"val`, () => socket.destroy());
        });
      });
      await new Promise<void>((resolve) => dropper.listen(0, '127.0.0.1', resolve));
      try {
        const base = `http://127.0.0.1:${(dropper.address() as { port: number }).port}`;
        const run = (status: number, args: string[]) => mailgent([...args, '--json', '--url', `${base}/${status}`], { env: as(alice), input: 'v' });
        // A read: unreachable, try again later (before, exit 1 "terminated" and nothing on stdout under --json).
        // A change answered with success, its answer then cut off, was carried out: not "try again later".
        const [dropped, stored] = await Promise.all([run(200, ['get', 'anything']), run(200, ['store', 'anything'])]);
        expect(dropped.code).toBe(4);
        expect(json(dropped)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-unreachable', detail: expect.stringContaining('dropped the connection') });
        expect(stored.code).toBe(1);
        expect(json(stored)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-answer-lost', detail: expect.stringContaining('the request was carried out') });

        // A change answered ≥ 500 may have been carried out (a 503's `unconfirmed` went with the body).
        // Before, exit 4 "try again later": a script would store, or start a rotation, twice.
        const maybeDone = [500, 502, 503, 504].flatMap((status) => [['store', 'anything'], ['rotate', 'anything']].map((args) => [status, args] as const));
        const cutChanges = await Promise.all(maybeDone.map(([status, args]) => run(status, args)));
        maybeDone.forEach(([status, args], i) => {
          expect(cutChanges[i]!.code, `${status} ${args[0]}`).toBe(1);
          // A rotation's start is sent again with its Idempotency-Key (three tries), then names the key to run again with.
          const rerun = args[0] === 'rotate' ? String.raw`\); it may have been carried out: run again with --idempotency-key [0-9a-f-]{36} to get that rotation instead of starting another` : '';
          expect(json(cutChanges[i]!), `${status} ${args[0]}`).toEqual({
            type: 'https://mailgent.dev/problems/cli-answer-lost',
            title: 'Answer lost',
            detail: expect.stringMatching(new RegExp(`answered HTTP ${status} but dropped the connection before the rest of its answer \\(\\w+\\); it may have been carried out: check before repeating it${rerun}$`)),
          });
        });

        // Any other status says what it says, cut or not (before, every one was exit 4); a read answered
        // 5xx as a whole answer would be (a server error 1; a proxy's 502 or 504, a 503: busy, 4).
        const byStatus: [number, string[], number][] = [
          [409, ['store', 'anything'], 1],
          [422, ['rotate', 'anything'], 1],
          [400, ['store', 'anything'], 2],
          [413, ['store', 'anything'], 2],
          [401, ['store', 'anything'], 3],
          [404, ['rotate', 'anything'], 3],
          [404, ['get', 'anything'], 3],
          [429, ['store', 'anything'], 4],
          [500, ['get', 'anything'], 1],
          [502, ['get', 'anything'], 4],
          [503, ['totp', 'anything'], 4],
          [504, ['get', 'anything'], 4],
        ];
        const cut = await Promise.all(byStatus.map(([status, args]) => run(status, args)));
        byStatus.forEach(([status, args, code], i) => {
          expect(cut[i]!.code, `${status} ${args[0]}`).toBe(code);
          expect(json(cut[i]!), `${status} ${args[0]}`).toEqual({
            type: 'about:blank',
            title: STATUS_CODES[status],
            status,
            detail: expect.stringMatching(new RegExp(`^the API answered HTTP ${status} but dropped the connection before the rest of its answer \\(\\w+\\)$`)),
          });
        });
      } finally {
        await new Promise((resolve) => dropper.close(resolve));
      }
    });

    it('never repeats an extra argument (often the secret itself): names its place instead', async () => {
      const secret = 'sk_live_in_argv_0001';
      const runs = [
        [await mailgent(['store', 'stripe', secret], { env: as(alice), input: 'x' }), 'unexpected argument 2'],
        [await mailgent(['get', 'stripe', secret, '--json'], { env: as(alice) }), 'unexpected argument 2'],
        [await mailgent(['leak', 'stripe', secret], { env: as(alice) }), 'unexpected argument 2'],
        [await mailgent(['identities', 'create', 'someone', secret], { env: admin() }), 'unexpected argument 3'],
        [await mailgent(['audit', 'verify', secret], { env: admin() }), 'unexpected argument 2'],
        [await mailgent(['mcp', secret], { env: as(alice) }), 'unexpected argument 1'],
        [await mailgent(['migrate', secret]), 'unexpected argument 1'],
      ] as const;
      for (const [run, says] of runs) {
        expect(run.code).toBe(2);
        expect(run.stderr).toContain(`Usage error: ${says} (not repeated here: it may be a secret)`);
        expect(run.stdout + run.stderr).not.toContain(secret);
      }
      expect(json(runs[1][0])).toMatchObject({ type: 'https://mailgent.dev/problems/cli-usage', detail: expect.stringMatching(/^unexpected argument 2 /) });
    });

    it('refuses an API URL with a user name or password (exit 2) and never prints it, for every command and mcp', async () => {
      const port = h.url.split(':').pop();
      const withPassword = [`http://admin:hunter2@127.0.0.1:${port}`, `http://hunter2@127.0.0.1:${port}`, 'http://admin:hunter2@bad host', 'ftp://admin:hunter2@127.0.0.1'];
      for (const url of withPassword) {
        const viaFlag = await mailgent(['get', 'anything', '--json', '--url', url], { env: as(alice) });
        expect(viaFlag.code, url).toBe(2);
        expect(json(viaFlag), url).toMatchObject({ type: 'https://mailgent.dev/problems/cli-usage' });
        const viaEnv = await mailgent(['audit', 'verify'], { env: { ...admin(), MAILGENT_URL: url } });
        expect(viaEnv.code, url).toBe(2);
        for (const run of [viaFlag, viaEnv]) expect(run.stdout + run.stderr, url).not.toMatch(/hunter2|admin:/);
      }
      const parsed = await mailgent(['get', 'anything', '--url', withPassword[0]!], { env: as(alice) });
      expect(parsed.stderr).toContain('must not hold a user name or password (user:password@host)');
      // Over `mailgent mcp` an error would go into the agent's transcript: refused before the bridge starts.
      const initialize = JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'initialize', params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 't', version: '1' } } });
      const mcp = await mailgent(['mcp'], { env: { ...as(alice), MAILGENT_URL: withPassword[0]! }, input: `${initialize}\n` });
      expect(mcp).toMatchObject({ code: 2, stdout: '' });
      expect(mcp.stderr).toContain('must not hold a user name or password');
      expect(mcp.stderr).not.toContain('hunter2');
    });

    it('a 2xx answer that is not a JSON document (a proxy\'s page) is an error, not a success: exit 1, one problem with --json', async () => {
      const answers: [string, string | undefined, string][] = [
        ['a proxy page', 'text/html', '<html><body>Welcome to the proxy</body></html>'],
        ['an empty body', undefined, ''],
        ['a JSON string', 'application/json', '"ok"'],
        ['JSON null', 'application/json', 'null'],
      ];
      for (const [what, type, body] of answers) {
        await withServer(
          (_req, res) => res.writeHead(200, type ? { 'content-type': type } : {}).end(body),
          async (url) => {
            const got = await mailgent(['get', 'anything', '--json', '--url', url], { env: as(alice) });
            expect(got.code, what).toBe(1);
            expect(json(got), what).toEqual({
              type: 'https://mailgent.dev/problems/cli-unexpected-answer',
              title: 'Unexpected answer',
              detail: expect.stringContaining(`answered HTTP 200 with ${type ?? 'no content type'}, not a JSON document`),
            });
            const stored = await mailgent(['store', 'anything', '--url', url], { env: as(alice), input: 'v' });
            expect(stored.code, what).toBe(1);
            expect(stored.stdout, what).toBe('');
            expect(stored.stderr, what).toContain('mailgent store: Unexpected answer: ');
            expect(stored.stderr, what).toContain('(the request may have been carried out)');
          },
        );
      }
    });

    it('an empty --token or --admin-token is a usage error; neither falls back to another token', async () => {
      const dataDir = mkdtempSync(path.join(cwd, 'data-'));
      writeFileSync(path.join(dataDir, 'admin-token'), `${h.adminToken}\n`, { mode: 0o600 });
      // Without the flag, the file (or ADMIN_TOKEN) is used...
      expect((await mailgent(['audit', 'verify'], { env: { DATA_DIR: dataDir } })).code).toBe(0);
      // ...but an empty one (an unset shell variable) does not quietly stand for it.
      for (const env of [{ DATA_DIR: dataDir }, { ADMIN_TOKEN: h.adminToken }, admin()] as Record<string, string>[]) {
        const run = await mailgent(['audit', 'verify', '--admin-token', '', '--json'], { env });
        expect(run.code).toBe(2);
        expect(json(run)).toEqual({ type: 'https://mailgent.dev/problems/cli-usage', title: 'Usage error', detail: '--admin-token is empty' });
      }
      const leak = await mailgent(['leak', 'x', '--admin', '--admin-token', ''], { env: { DATA_DIR: dataDir } });
      expect(leak.code).toBe(2);
      expect(leak.stderr).toContain('--admin-token is empty');
      const identity = await mailgent(['get', 'cli-key', '--token', '', '--json'], { env: as(alice) });
      expect(identity.code).toBe(2);
      expect(json(identity)).toMatchObject({ detail: '--token is empty' });
    });
  });

  describe('identities', () => {
    it('create prints the token once on stdout (admin token from the environment or DATA_DIR), --json the whole answer', async () => {
      const human = await mailgent(['identities', 'create', 'cli-made', '--email', 'cli-made@example.com'], { env: admin() });
      expect(human.code).toBe(0);
      const token = h.secret(human.stdout.trim());
      expect(human.stdout).toMatch(/^[\x21-\x7e]{32,}\n$/);
      expect(human.stderr).toMatch(/^created identity cli-made \(id [0-9a-f-]{36}\); its token follows, shown only this once:\n$/);
      expect((await h.api('GET', '/v1/credentials', { token })).status).toBe(200);

      // The file `mailgent serve` generates is found through DATA_DIR.
      const dataDir = mkdtempSync(path.join(cwd, 'data-'));
      writeFileSync(path.join(dataDir, 'admin-token'), `${h.adminToken}\n`, { mode: 0o600 });
      const viaFile = await mailgent(['identities', 'create', 'cli-made-2', '--json'], { env: { DATA_DIR: dataDir } });
      expect(viaFile).toMatchObject({ code: 0, stderr: '' });
      const body = json(viaFile);
      h.secret(body.token);
      expect(body).toEqual({ id: expect.any(String), name: 'cli-made-2', email: null, token: expect.any(String) });

      // A new token in place of the old, by name: the old one stops working.
      const reissued = await mailgent(['identities', 'token', 'cli-made'], { env: admin() });
      expect(reissued.code).toBe(0);
      const newToken = h.secret(reissued.stdout.trim());
      expect(reissued.stderr).toMatch(/^issued identity cli-made \(id [0-9a-f-]{36}\) a new token; its old one no longer works\. The new one follows, shown only this once:\n$/);
      expect((await h.api('GET', '/v1/credentials', { token })).status).toBe(401);
      expect((await h.api('GET', '/v1/credentials', { token: newToken })).status).toBe(200);
      expect(await mailgent(['identities', 'token', 'no-such-identity'], { env: admin() })).toMatchObject({ code: 3, stdout: '' });

      // An identity's token is not the admin token: 403 → exit 3, with the problem detail.
      const denied = await mailgent(['identities', 'create', 'nope', '--admin-token', alice.token]);
      expect(denied).toMatchObject({ code: 3, stdout: '' });
      expect(denied.stderr).toContain('mailgent identities: Forbidden (403): this route needs the admin token');
    });
  });

  describe('store, get, totp', () => {
    it('store reads the value from stdin, --value-file or --value-env, never from argv', async () => {
      const v1 = h.secret(`sk_cli_stdin_${randomBytes(8).toString('hex')}`);
      const piped = await mailgent(['store', 'cli-key', '--kind', 'api_key', '--owner', 'cli-owner@example.com', '--tag', 'cli'], { env: as(alice), input: `${v1}\n` });
      expect(piped).toMatchObject({ code: 0, stderr: '' });
      expect(piped.stdout).toMatch(/^stored cli-key version 1 \(id [0-9a-f-]{36}\)\n$/);
      expect(await read(alice.token, 'cli-key')).toMatchObject({ value: v1, kind: 'api_key', version: 1 });

      const v2 = h.secret(`sk_cli_file_${randomBytes(8).toString('hex')}`);
      const file = path.join(cwd, 'value.txt');
      writeFileSync(file, v2, { mode: 0o600 });
      const fromFile = await mailgent(['store', 'cli-key', '--kind', 'api_key', '--value-file', file, '--expected-version', '1', '--json'], { env: as(alice) });
      expect(fromFile.code).toBe(0);
      expect(json(fromFile)).toEqual({ id: expect.any(String), name: 'cli-key', version: 2, createdAt: expect.any(String) });
      expect(await read(alice.token, 'cli-key')).toMatchObject({ value: v2, version: 2 });

      const v3 = h.secret(`pw-cli-env-${randomBytes(8).toString('hex')}`);
      const fromEnv = await mailgent(['store', 'cli-password', '--kind', 'password', '--value-env', 'THE_VALUE'], { env: { ...as(alice), THE_VALUE: v3 } });
      expect(fromEnv.code).toBe(0);
      expect(await read(alice.token, 'cli-password')).toMatchObject({ value: v3, kind: 'password' });

      const empty = await mailgent(['store', 'cli-empty'], { env: as(alice), input: '\n' });
      expect(empty.code).toBe(2);
      expect(empty.stderr).toContain('is empty');
      const missingVar = await mailgent(['store', 'cli-empty', '--value-env', 'NOT_SET_HERE'], { env: as(alice) });
      expect(missingVar.code).toBe(2);
      expect(missingVar.stderr).toContain('the variable named by --value-env is not set');
      expect(missingVar.stderr).not.toContain('NOT_SET_HERE');
    });

    it('store: the API refusing the request maps to exit 2 (bad input) and 1 (version conflict), value never echoed', async () => {
      const value = h.secret(`sk_cli_refused_${randomBytes(8).toString('hex')}`);
      const badName = await mailgent(['store', '-bad-name-', '--json'], { env: as(alice), input: value });
      // parseArgs sees an option, not a name: usage error before anything is sent.
      expect(badName.code).toBe(2);
      const invalid = await mailgent(['store', 'bad name'], { env: as(alice), input: value });
      expect(invalid.code).toBe(2);
      expect(invalid.stderr).toContain('mailgent store: The request is not valid (400): the request body is not valid: name: must start with a letter or digit');
      expect(invalid.stderr).toContain('  name: must start with a letter or digit');
      expect(invalid.stderr).toMatch(/request id: \S+/);

      const conflict = await mailgent(['store', 'cli-key', '--kind', 'api_key', '--expected-version', '1', '--json'], { env: as(alice), input: value });
      expect(conflict.code).toBe(1);
      expect(json(conflict)).toMatchObject({ type: 'https://mailgent.dev/problems/version-conflict', status: 409, currentVersion: 2 });
      expect(conflict.stderr).toContain("mailgent store: Version conflict (409): credential 'cli-key' is at version 2, not 1");
      // --policy adds policy fields; it cannot quietly replace the name, the kind or the value.
      const sneaky = await mailgent(['store', 'cli-key', '--policy', '{"name":"other-key","value":"x"}'], { env: as(alice), input: value });
      expect(sneaky.code).toBe(2);
      expect(sneaky.stderr).toContain('--policy must not set name, value');
      for (const run of [badName, invalid, conflict, sneaky]) expect(run.stdout + run.stderr).not.toContain(value);
    });

    it('get prints the value alone on stdout (what it is on stderr); --json has it only in "value"', async () => {
      const current = await read(alice.token, 'cli-key');
      const human = await mailgent(['get', 'cli-key'], { env: as(alice) });
      expect(human).toMatchObject({ code: 0, stdout: `${current.value}\n` });
      expect(human.stderr).toBe('cli-key version 2 (current), api_key, 0 days old\n');

      const old = await read(alice.token, 'cli-key', 1);
      const byIdAndVersion = await mailgent(['get', current.id, '--version', '1', '--json'], { env: as(alice) });
      expect(byIdAndVersion).toMatchObject({ code: 0, stderr: '' });
      const body = json(byIdAndVersion);
      expect(body).toEqual({ id: current.id, name: 'cli-key', kind: 'api_key', version: 1, label: 'previous', value: old.value, createdAt: expect.any(String), ageDays: 0 });
      expect(JSON.stringify({ ...body, value: undefined })).not.toContain(old.value);

      // A reader that stops early (`| true`): the command's own exit code, no stack trace.
      const closedEarly = await new Promise<Run>((resolve, reject) => {
        const child = spawn(process.execPath, [BIN, 'get', 'cli-key', '--json'], { cwd, env: { PATH: process.env.PATH!, MAILGENT_URL: h.url, ...as(alice) } });
        child.stdout.destroy();
        let stderr = '';
        child.stderr.on('data', (d) => (stderr += d));
        child.on('error', reject);
        child.on('close', (code) => resolve({ code, stdout: '', stderr }));
      });
      expect(closedEarly).toEqual({ code: 0, stdout: '', stderr: '' });
    });

    it("another identity's credential is not found: exit 3 and the problem detail, by name or id, never the value", async () => {
      const value = h.secret(`sk_bob_private_${randomBytes(8).toString('hex')}`);
      const stored = await mailgent(['store', 'bob-private', '--kind', 'api_key', '--json'], { env: as(bob), input: value });
      const id = json(stored).id;

      const byName = await mailgent(['get', 'bob-private'], { env: as(alice) });
      expect(byName).toMatchObject({ code: 3, stdout: '' });
      expect(byName.stderr).toMatch(/^mailgent get: Not found \(404\): .*bob-private/);
      const byId = await mailgent(['get', id, '--json'], { env: as(alice) });
      expect(byId.code).toBe(3);
      expect(json(byId)).toMatchObject({ type: 'https://mailgent.dev/problems/not-found', status: 404, detail: expect.stringContaining(id) });
      const totp = await mailgent(['totp', 'bob-private'], { env: as(alice) });
      expect(totp.code).toBe(3);
      for (const run of [byName, byId, totp]) expect(run.stdout + run.stderr).not.toContain(value);

      const badToken = await mailgent(['get', 'bob-private'], { env: { MAILGENT_TOKEN: 'not-a-real-token-0000000000000000' } });
      expect(badToken.code).toBe(3);
      expect(badToken.stderr).toContain('Authentication required (401)');
      // Bob still reads his own.
      expect((await mailgent(['get', 'bob-private'], { env: as(bob) })).stdout).toBe(`${value}\n`);
    });

    it('totp: a base32 seed stored through stdin gives the RFC 6238 code of now', async () => {
      const seed = h.secret(base32('12345678901234567890'));
      const stored = await mailgent(['store', 'cli-2fa', '--kind', 'totp_seed', '--digits', '8', '--algorithm', 'sha1'], { env: as(alice), input: seed });
      expect(stored.code).toBe(0);
      const human = await mailgent(['totp', 'cli-2fa'], { env: as(alice) });
      expect(human.code).toBe(0);
      expect(human.stderr).toMatch(/^valid for \d+ more seconds\n$/);
      const step = Math.floor(Date.now() / 30_000);
      expect([step - 1, step].map(rfcCode)).toContain(human.stdout.trim());

      const asJson = await mailgent(['totp', 'cli-2fa', '--json'], { env: as(alice) });
      expect(json(asJson)).toEqual({ code: expect.stringMatching(/^\d{8}$/), period: 30, digits: 8, expiresInSeconds: expect.any(Number) });
    });

    it('store: --digits, --period or --algorithm with an otpauth:// URI is a usage error (the URI sets its own), nothing stored', async () => {
      const seed = base32(randomBytes(20).toString('latin1'));
      const uri = h.secret(`otpauth://totp/Example:cli?secret=${seed}&issuer=Example&digits=6&period=30`);
      for (const flag of [['--digits', '8'], ['--period', '60'], ['--algorithm', 'sha256']]) {
        const run = await mailgent(['store', 'cli-uri-2fa', '--kind', 'totp_seed', ...flag, '--json'], { env: as(alice), input: uri });
        expect(run.code, flag[0]).toBe(2);
        expect(json(run), flag[0]).toEqual({
          type: 'https://mailgent.dev/problems/cli-usage',
          title: 'Usage error',
          detail: '--digits, --period and --algorithm are for a base32 secret; an otpauth:// URI sets its own (digits=, period=, algorithm= in the URI)',
        });
        expect(run.stdout + run.stderr).not.toContain(seed);
      }
      expect((await h.api('POST', '/v1/vault.get', { token: alice.token, body: { name: 'cli-uri-2fa' } })).status).toBe(404);
      const plain = await mailgent(['store', 'cli-uri-2fa', '--kind', 'totp_seed'], { env: as(alice), input: uri });
      expect(plain.code).toBe(0);
      expect(json(await mailgent(['totp', 'cli-uri-2fa', '--json'], { env: as(alice) }))).toMatchObject({ digits: 6, period: 30 });
    });
  });

  describe('rotate', () => {
    const generated = JSON.stringify({ rotation: { provider: 'generated', settings: { length: 32, prefix: 'sk_' }, periodDays: 90, graceHours: 0 } });

    beforeAll(async () => {
      for (const name of ['rot-a', 'rot-b']) {
        const run = await mailgent(['store', name, '--kind', 'api_key', '--policy', generated], { env: as(alice), input: h.secret(`sk_${name}_${randomBytes(8).toString('hex')}`) });
        expect(run.code).toBe(0);
      }
      // A TOTP seed cannot be replaced by a generated value: its rotation fails.
      const seed = await mailgent(['store', 'rot-seed', '--kind', 'totp_seed'], { env: as(alice), input: h.secret('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP') });
      expect(seed.code).toBe(0);
      // Given a policy before vault.store refused one (a request names only credentials with one).
      await h.sql(`UPDATE credentials SET rotation = '{"provider": "generated", "settings": {}, "periodDays": 90}' WHERE name = 'rot-seed'`);
    });

    it('by names: follows the batch with one progress line per credential, prints the table, exits 1 when one failed', async () => {
      const run = await mailgent(['rotate', 'rot-a', 'rot-seed', '--reason', 'cli test', '--interval', '100'], { env: as(alice) });
      expect(run.code).toBe(1);
      const lines = run.stderr.trimEnd().split('\n');
      expect(lines[0]).toMatch(/^rotation [0-9a-f-]{36}: 2 credentials$/);
      // One line per credential as it finishes, counted in finishing order.
      expect(lines.slice(1).map((l) => l.slice(0, 6))).toEqual(['[1/2] ', '[2/2] ']);
      expect(lines.slice(1).map((l) => l.slice(6)).sort()).toEqual([
        'rot-a: succeeded',
        "rot-seed: failed: credential 'rot-seed' is a totp_seed; a generated value would not be a TOTP seed",
      ]);
      const rotationId = /^rotation (\S+):/.exec(lines[0]!)![1];
      expect(run.stdout).toBe(
        [
          'CREDENTIAL  VERSION  OUTCOME',
          'rot-a       1 → 2    succeeded',
          "rot-seed    1 → –    failed: credential 'rot-seed' is a totp_seed; a generated value would not be a TOTP seed",
          '',
          `rotation ${rotationId}: partial (1 rotated, 1 not)`,
          '',
        ].join('\n'),
      );
      expect(await read(alice.token, 'rot-a')).toMatchObject({ version: 2, label: 'current', value: expect.stringMatching(/^sk_[A-Za-z0-9]{32}$/) });
      await read(alice.token, 'rot-a', 1);
    });

    it('exits 1 when one failed even if another is in its grace period (the batch is partial, not grace)', async () => {
      const withGrace = JSON.stringify({ rotation: { provider: 'generated', settings: { length: 32, prefix: 'sk_' }, periodDays: 90, graceHours: 1 } });
      const stored = await mailgent(['store', 'rot-grace', '--kind', 'api_key', '--policy', withGrace], { env: as(alice), input: h.secret(`sk_grace_${randomBytes(8).toString('hex')}`) });
      expect(stored.code).toBe(0);
      const run = await mailgent(['rotate', 'rot-grace', 'rot-seed', '--json', '--interval', '100'], { env: as(alice) });
      expect(run.code).toBe(1);
      const report = json(run);
      expect(report.state).toBe('partial');
      expect(report.credentials.map((c: { name: string; outcome: string }) => [c.name, c.outcome]).sort()).toEqual([['rot-grace', 'grace'], ['rot-seed', 'failed']]);
      h.secret((await read(alice.token, 'rot-grace')).value);
      await read(alice.token, 'rot-grace', 1);
    });

    it('by filter (--kind, --older-than): only the old credential rotates; --json has the shape and no progress noise', async () => {
      // rot-b's current version is 100 days old; rot-a's was just made.
      await h.sql(
        `UPDATE secret_versions v SET created_at = now() - interval '100 days' FROM credentials c
          WHERE c.id = v.credential_id AND c.name = 'rot-b' AND v.version = c.current_version`,
      );
      const run = await mailgent(['rotate', '--kind', 'api_key', '--older-than', '90d', '--json', '--interval', '100'], { env: as(alice) });
      expect(run).toMatchObject({ code: 0, stderr: '' });
      const body = json(run);
      expect(body).toEqual({
        rotationId: expect.stringMatching(/^[0-9a-f-]{36}$/),
        state: 'succeeded',
        reason: null,
        credentials: [{ credentialId: expect.any(String), name: 'rot-b', fromVersion: 1, toVersion: 2, outcome: 'succeeded', error: null }],
      });
      const rotated = await read(alice.token, 'rot-b');
      expect(rotated).toMatchObject({ id: body.credentials[0].credentialId, version: 2 });
      await read(alice.token, 'rot-b', 1);
      expect(await read(alice.token, 'rot-a')).toMatchObject({ version: 2 });

      // Nothing older than that any more: the API's 422 is an operation failure (exit 1).
      const none = await mailgent(['rotate', '--kind', 'api_key', '--older-than', '90d'], { env: as(alice) });
      expect(none.code).toBe(1);
      expect(none.stderr).toContain('no credential matches the filter; nothing to rotate');
    });

    it('a failed rotation reports no new version with --json, as its table does (the pending one was discarded)', async () => {
      // A dependent that refuses every event: the new value (version 2) is made, then discarded.
      const refusing = createHttpServer((req, res) => {
        req.resume();
        req.on('end', () => res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":"refused"}'));
      });
      await new Promise<void>((resolve) => refusing.listen(0, '127.0.0.1', resolve));
      try {
        const hookKey = await h.api('POST', '/v1/vault.store', { token: alice.token, body: { name: 'cli-hook-key', kind: 'generic', value: h.secret(`whsec_${randomBytes(24).toString('hex')}`) } });
        expect(hookKey.status, hookKey.text).toBe(201);
        const url = `http://127.0.0.1:${(refusing.address() as { port: number }).port}/hook`;
        const stored = await h.api('POST', '/v1/vault.store', {
          token: alice.token,
          body: {
            name: 'cli-refused',
            kind: 'token',
            value: h.secret(`tok_${randomBytes(12).toString('hex')}`),
            rotation: { provider: 'generated', maxAttempts: 1, graceHours: 0 },
            dependents: [{ type: 'webhook', settings: { url, signingKeyCredential: 'cli-hook-key' } }],
          },
        });
        expect(stored.status, stored.text).toBe(201);

        const asJson = await mailgent(['rotate', 'cli-refused', '--json', '--interval', '100'], { env: as(alice) });
        expect(asJson.code).toBe(1);
        const body = json(asJson);
        // Before, toVersion was 2: a version that never came to be (the API's report names it, as made).
        expect(body.credentials).toEqual([{ credentialId: stored.body.id, name: 'cli-refused', fromVersion: 1, toVersion: null, outcome: 'failed', error: expect.stringMatching(/answered 400/) }]);
        const report = await h.api('GET', `/v1/rotations/${body.rotationId}`, { token: alice.token });
        expect(report.body.credentials[0].progress).toMatchObject({ fromVersion: 1, toVersion: 2 });
        const text = await mailgent(['rotate', 'cli-refused', '--interval', '100'], { env: as(alice) });
        expect(text.code).toBe(1);
        expect(text.stdout).toMatch(/cli-refused +1 → – +failed: .*answered 400/);
      } finally {
        await new Promise((resolve) => refusing.close(resolve));
      }
    });

    it('--no-wait prints the rotation id and returns; unknown names are not found (exit 3)', async () => {
      const run = await mailgent(['rotate', 'rot-a', '--no-wait', '--json'], { env: as(alice) });
      expect(run.code).toBe(0);
      const started = json(run);
      expect(started).toEqual({ rotationId: expect.any(String), batchWorkflowId: `rotation:${started.rotationId}`, workflowIds: [expect.stringMatching(/^rotate:/)] });
      await h.client.workflow.getHandle(started.batchWorkflowId).result();
      await read(alice.token, 'rot-a');

      const missing = await mailgent(['rotate', 'bob-private'], { env: as(alice) });
      expect(missing.code).toBe(3);
      expect(missing.stderr).toContain('no credential named or with id: bob-private');
    });

    /**
     * The API behind a proxy that answers the rotation polls (GET /v1/rotations/:id) as `fault`
     * says: a status (a problem document), 'drop' (the connection closed, no answer), 'hang' (no
     * answer at all), 'no-progress' (the API's answer without the runs' progress, as when no worker
     * answers the progress query in time), or 'pass'. Everything else goes through; POST
     * /v1/rotations are counted.
     */
    const flakyApi = async (fault: (poll: number) => number | 'drop' | 'hang' | 'no-progress' | 'pass', fn: (url: string, starts: () => number) => Promise<void>) => {
      let polls = 0;
      let starts = 0;
      await withServer(
        (req, res) => {
          const chunks: Buffer[] = [];
          req.on('data', (c: Buffer) => chunks.push(c));
          req.on('end', () => {
            const isPoll = req.method === 'GET' && /^\/v1\/rotations\/[^/]+$/.test(req.url!);
            if (req.method === 'POST' && req.url === '/v1/rotations') starts++;
            const what = isPoll ? fault(++polls) : 'pass';
            if (what === 'hang') return;
            if (what === 'drop') return void req.socket.destroy();
            if (typeof what === 'number') {
              return void res
                .writeHead(what, { 'content-type': 'application/problem+json' })
                .end(JSON.stringify({ type: 'about:blank', title: `HTTP ${what}`, status: what, detail: `the proxy answered ${what}` }));
            }
            fetch(h.url + req.url, {
              method: req.method,
              headers: { authorization: req.headers.authorization!, ...(req.headers['content-type'] ? { 'content-type': req.headers['content-type'] } : {}) },
              body: chunks.length ? Buffer.concat(chunks) : undefined,
            }).then(
              async (answer) => {
                let text = await answer.text();
                if (what === 'no-progress') {
                  const report = JSON.parse(text);
                  text = JSON.stringify({ ...report, credentials: report.credentials.map((c: object) => ({ ...c, progress: null })) });
                }
                res.writeHead(answer.status, { 'content-type': answer.headers.get('content-type') ?? 'text/plain' }).end(text);
              },
              () => req.socket.destroy(),
            );
          });
        },
        (url) => fn(url, () => starts),
      );
    };
    const settled = async (rotationId: string, name: string) => {
      await h.client.workflow.getHandle(`rotation:${rotationId}`).result();
      const rotation = await h.api('GET', `/v1/rotations/${rotationId}`, { token: alice.token });
      expect(rotation.body.credentials.map((c: { name: string }) => c.name)).toEqual([name]);
      h.secret((await read(alice.token, name)).value);
      return rotation.body;
    };

    it('once started, a busy or unreachable API (503, 429, a dropped connection) is polled again until the rotation ends: one rotation, exit 0', async () => {
      const stored = await mailgent(['store', 'rot-flaky', '--kind', 'api_key', '--policy', generated], { env: as(alice), input: h.secret(`sk_flaky_${randomBytes(8).toString('hex')}`) });
      expect(stored.code).toBe(0);
      const faults = [503, 429, 'drop', 503] as const;
      await flakyApi(
        (n) => faults[n - 1] ?? 'pass',
        async (url, starts) => {
          // Before, the first 503 ended the follow with exit 4 ("try again later"): a script would start a second rotation.
          const run = await mailgent(['rotate', 'rot-flaky', '--json', '--interval', '100', '--url', url], { env: as(alice) });
          expect(run).toMatchObject({ code: 0, stderr: '' });
          const report = json(run);
          expect(report).toMatchObject({ state: 'succeeded', credentials: [{ name: 'rot-flaky', fromVersion: 1, toVersion: 2, outcome: 'succeeded' }] });
          expect(starts()).toBe(1);
          await settled(report.rotationId, 'rot-flaky');
        },
      );
      await read(alice.token, 'rot-flaky', 1);
    });

    it('a rotated credential whose progress the API could not tell is shown from an unknown version, not from its new one', async () => {
      const stored = await mailgent(['store', 'rot-unknown', '--kind', 'api_key', '--policy', generated], { env: as(alice), input: h.secret(`sk_unknown_${randomBytes(8).toString('hex')}`) });
      expect(stored.code).toBe(0);
      await flakyApi(
        () => 'no-progress',
        async (url) => {
          const run = await mailgent(['rotate', 'rot-unknown', '--json', '--interval', '100', '--url', url], { env: as(alice) });
          expect(run).toMatchObject({ code: 0, stderr: '' });
          const report = json(run);
          // Before, fromVersion was read from the credential as it is now: the version just made.
          expect(report.credentials).toEqual([expect.objectContaining({ name: 'rot-unknown', outcome: 'succeeded', fromVersion: null, toVersion: null })]);
          await settled(report.rotationId, 'rot-unknown');
        },
      );
    });

    it('once started, a failure to follow exits 1 with the rotation id (never 4): busy until --timeout, a hanging poll, a server error', async () => {
      for (const [fault, during] of [
        [503, ' for 2s: HTTP 503 (503): the proxy answered 503'],
        ['hang', ' for 2s: Service unreachable: '],
        [500, ': HTTP 500 (500): the proxy answered 500'],
      ] as const) {
        await flakyApi(
          () => fault,
          async (url, starts) => {
            const run = await mailgent(['rotate', 'rot-flaky', '--json', '--timeout', '2s', '--interval', '100', '--url', url], { env: as(alice) });
            expect(run.code, String(fault)).toBe(1);
            const problem = json(run);
            expect(problem, String(fault)).toMatchObject({
              type: 'https://mailgent.dev/problems/cli-not-followed',
              title: 'Rotation not followed',
              rotationId: expect.stringMatching(/^[0-9a-f-]{36}$/),
              detail: expect.stringContaining(`started but could not be followed${during}`),
            });
            if (typeof fault === 'number') expect(problem.cause, String(fault)).toMatchObject({ status: fault });
            expect(run.stderr).toContain(`mailgent rotate: Rotation not followed: rotation ${problem.rotationId} started but could not be followed`);
            expect(run.stderr).toContain(`it goes on: follow it with GET /v1/rotations/${problem.rotationId}`);
            expect(starts()).toBe(1);
            // The rotation named is the one that was started, and it ran to its end.
            expect(await settled(problem.rotationId, 'rot-flaky')).toMatchObject({ state: 'succeeded' });
          },
        );
      }
    });
  });

  it('rotate --timeout: with no worker the batch does not finish; exit 1 naming the rotation, which goes on', async () => {
    const idle = await startHarness();
    try {
      const carol = await idle.createIdentity('cli-carol');
      const stored = await idle.api('POST', '/v1/vault.store', { token: carol.token, body: { name: 'stuck', kind: 'api_key', value: idle.secret(`sk_stuck_${randomBytes(8).toString('hex')}`), rotation: { provider: 'generated' } } });
      expect(stored.status).toBe(201);
      const run = await mailgent(['rotate', 'stuck', '--timeout', '2s', '--interval', '200'], { env: { MAILGENT_URL: idle.url, MAILGENT_TOKEN: carol.token } });
      expect(run).toMatchObject({ code: 1, stdout: '' });
      const rotationId = /^rotation (\S+): 1 credential\n/.exec(run.stderr)?.[1];
      expect(rotationId).toBeDefined();
      expect(run.stderr).toContain(`mailgent rotate: Still running: rotation ${rotationId} had not finished after 2s; it goes on`);
      await idle.client.workflow.getHandle(`rotation:${rotationId}`).terminate('test over');
      expect(await expectCleanRun(idle)).toEqual({ leaks: [], replay: [] });
    } finally {
      await idle.close();
    }
  });

  describe('leak and audit verify', () => {
    it('leak by name rotates at once; a second report joins (or reopens); a value given on stdin is matched by its hash only', async () => {
      // Without a rotation policy nothing can revoke it where it was issued: told, not rotated.
      const unmanaged = await mailgent(['leak', 'cli-password', '--source', 'cli-test'], { env: as(alice) });
      expect(unmanaged.code).toBe(0);
      expect(unmanaged.stdout).toMatch(/^CREDENTIAL +VERSION +ACTION +WORKFLOW\n[0-9a-f-]{36} +1 +no-policy *\n$/);
      const patched = await h.api('PATCH', '/v1/credentials/cli-password', { token: alice.token, body: { rotation: { provider: 'generated', graceHours: 0 } } });
      expect(patched.status).toBe(200);
      const first = await mailgent(['leak', 'cli-password', '--source', 'cli-test'], { env: as(alice) });
      expect(first.code).toBe(0);
      expect(first.stdout).toMatch(/^CREDENTIAL +VERSION +ACTION +WORKFLOW\n[0-9a-f-]{36} +1 +rotating +rotate:[0-9a-f-]{36}\n$/);
      // A second report joins the open incident, or opens a new one if the leak rotation already ended.
      const again = await mailgent(['leak', 'cli-password', '--json'], { env: as(alice) });
      expect(again.code).toBe(0);
      expect(json(again).results).toEqual([expect.objectContaining({ version: expect.any(Number), action: expect.stringMatching(/^(joined|rotating)$/) })]);
      const credentialId = json(again).results[0].credentialId;
      expect(await h.client.workflow.getHandle(`rotate:${credentialId}`).result()).toMatchObject({ state: 'succeeded', mode: 'leak' });
      // Rotated, without a grace period: the leaked version is revoked.
      expect((await read(alice.token, 'cli-password')).version).toBeGreaterThan(1);
      const revoked = await h.sql('SELECT version FROM secret_versions WHERE credential_id = $1 AND revoked_at IS NOT NULL ORDER BY version', [credentialId]);
      expect(revoked.rows[0]).toEqual({ version: 1 });

      // The leaked value of rot-b's first version, piped in: only its SHA-256 leaves the CLI.
      const leaked = await read(alice.token, 'rot-b', 1);
      const byValue = await mailgent(['leak', '--value-file', '-', '--json'], { env: as(alice), input: `${leaked.value}\n` });
      expect(byValue.code).toBe(0);
      expect(json(byValue).results).toEqual([{ credentialId: leaked.id, version: 1, action: 'already-revoked' }]);
      const audit = await h.sql(`SELECT detail FROM audit_log WHERE action = 'leak.report' ORDER BY seq DESC LIMIT 1`);
      expect(audit.rows[0].detail).toMatchObject({ by: 'fingerprint', matched: 1 });
      const fingerprint = createHash('sha256').update(leaked.value).digest('hex');
      const byHash = await mailgent(['leak', '--fingerprint', fingerprint, '--json'], { env: as(alice) });
      expect(json(byHash).results).toEqual([{ credentialId: leaked.id, version: 1, action: 'already-revoked' }]);

      // The admin token reports across identities.
      const asAdmin = await mailgent(['leak', '--admin', '--fingerprint', fingerprint, '--source', 'scanner', '--json'], { env: admin() });
      expect(asAdmin.code).toBe(0);
      expect(json(asAdmin).results).toEqual([{ credentialId: leaked.id, version: 1, action: 'already-revoked' }]);

      const unknown = await mailgent(['leak', 'no-such-credential'], { env: as(alice) });
      expect(unknown.code).toBe(3);
      expect(unknown.stderr).toContain('Not found (404): no credential of yours has that name or id');
      expect(unknown.stderr).not.toContain('no-such-credential'); // what was given where a name goes may be the value
      const twoWays = await mailgent(['leak', 'cli-key', '--fingerprint', fingerprint], { env: as(alice) });
      expect(twoWays.code).toBe(2);
      // An empty fingerprint (an unset variable in a script) is a usage error; before, it read the
      // value from stdin and reported whatever was piped in.
      const empty = await mailgent(['leak', '--fingerprint', '', '--json'], { env: as(alice), input: `${leaked.value}\n` });
      expect(empty.code).toBe(2);
      expect(empty.stderr).toContain('is empty');
    });

    it('audit verify: exit 0 when intact, 1 naming the first broken row, 3 for an identity token', async () => {
      const ok = await mailgent(['audit', 'verify'], { env: admin() });
      expect(ok.code).toBe(0);
      expect(ok.stdout).toMatch(/^audit chain intact: \d+ rows; head \d+:[0-9a-f]{64}\n$/);
      // Against the head it printed: intact; against a head the log never had: broken there.
      const printed = /head (\d+:[0-9a-f]{64})/.exec(ok.stdout)![1]!;
      expect((await mailgent(['audit', 'verify', '--head', printed], { env: admin() })).code).toBe(0);
      const other = await mailgent(['audit', 'verify', '--head', `${printed.split(':')[0]}:${'0'.repeat(64)}`], { env: admin() });
      expect(other.code).toBe(1);
      expect(other.stdout).toContain('not the recorded head: the log was rewritten up to here, its hashes recomputed');

      const target = Number((await h.sql(`SELECT min(seq) AS seq FROM audit_log WHERE action = 'vault.get'`)).rows[0].seq);
      const tamper = (outcome: string) =>
        h.sql(`DO $$ BEGIN SET LOCAL session_replication_role = replica; UPDATE audit_log SET outcome = '${outcome}' WHERE seq = ${target}; END $$`);
      const original = (await h.sql('SELECT outcome FROM audit_log WHERE seq = $1', [target])).rows[0].outcome;
      await tamper(original === 'ok' ? 'denied' : 'ok');
      try {
        const broken = await mailgent(['audit', 'verify'], { env: admin() });
        expect(broken.code).toBe(1);
        expect(broken.stdout).toMatch(new RegExp(`^audit chain BROKEN at row ${target}: hash mismatch: the row was edited after it was written \\(\\d+ rows intact before it\\)\\n$`));
        const brokenJson = await mailgent(['audit', 'verify', '--json'], { env: admin() });
        expect(brokenJson.code).toBe(1);
        expect(json(brokenJson)).toEqual({ ok: false, rows: expect.any(Number), firstBroken: { seq: target, reason: 'hash mismatch: the row was edited after it was written' } });
      } finally {
        await tamper(original);
      }
      const okJson = await mailgent(['audit', 'verify', '--json'], { env: admin() });
      expect(okJson.code).toBe(0);
      expect(json(okJson)).toEqual({ ok: true, rows: expect.any(Number), head: { seq: expect.any(Number), hash: expect.stringMatching(/^[0-9a-f]{64}$/) } });

      const asIdentity = await mailgent(['audit', 'verify', '--json'], { env: { MAILGENT_ADMIN_TOKEN: alice.token } });
      expect(asIdentity.code).toBe(3);
      expect(json(asIdentity)).toMatchObject({ status: 403, detail: 'this route needs the admin token' });
    });
  });
});

/** RFC 6238 TOTP (SHA-1, 8 digits) of the RFC's seed at a time step. */
function rfcCode(step: number): string {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = createHmac('sha1', '12345678901234567890').update(counter).digest();
  const offset = mac[mac.length - 1]! & 0xf;
  return String((mac.readUInt32BE(offset) & 0x7fffffff) % 10 ** 8).padStart(8, '0');
}

/** Runs `fn` against a plain HTTP server answering with `handler` (not the API: a proxy, a stranger). */
async function withServer(handler: RequestListener, fn: (url: string) => Promise<void>): Promise<void> {
  const server = createHttpServer(handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    await fn(`http://127.0.0.1:${(server.address() as { port: number }).port}`);
  } finally {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
}
