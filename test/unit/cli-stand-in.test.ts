import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createNetServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

/**
 * The `mailgent` binary (a child process, as a user runs it) against a stand-in for the API: a
 * node:http server answering as a proxy, a gateway or a rotation that never ends would. What the
 * real API answers is test/cli.test.ts's; here is what it never answers.
 */

const BIN = fileURLToPath(new URL('../../bin/mailgent.js', import.meta.url));
/** Makes the child's stderr pass for a terminal, so `rotate` draws its bar (into our pipe). */
const FAKE_TTY = 'data:text/javascript,process.stderr.isTTY=true';
/** Makes the child's stdin pass for a terminal, so `store` prompts for the value (read from our pipe). */
const FAKE_STDIN_TTY = 'data:text/javascript,process.stdin.isTTY=true;process.stdin.setRawMode=function(){return this}';
/** After FAKE_STDIN_TTY: each switch of raw mode (no echo) is written to stderr, `[raw true]` … `[raw false]`. */
const RECORD_RAW_MODE = `data:text/javascript,process.stdin.setRawMode=function(on){process.stderr.write('[raw '%2Bon%2B']');return this}`;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

interface Seen {
  method: string;
  url: string;
  authorization?: string;
  idempotencyKey?: string;
  body: string;
}

type Answer = { status: number; body: unknown; type?: string; headers?: Record<string, string> } | 'hang' | 'drop';

const ROTATION_ID = '0b7c6a52-3f0e-4a8e-9d1c-5e2f7a9b4c13';
const CREDENTIAL_ID = '9a1d4e7f-2b3c-4d5e-8f6a-7b8c9d0e1f2a';
const started = { rotationId: ROTATION_ID, batchWorkflowId: `rotation:${ROTATION_ID}`, workflowIds: [`rotate:${CREDENTIAL_ID}`] };
const report = (state: 'running' | 'succeeded') => ({
  rotationId: ROTATION_ID,
  state,
  reason: null,
  createdAt: new Date().toISOString(),
  credentials: [
    {
      credentialId: CREDENTIAL_ID,
      name: 'stripe',
      workflowId: `rotate:${CREDENTIAL_ID}`,
      runId: null,
      outcome: null,
      state,
      status: null,
      progress: state === 'succeeded' ? { state, mode: 'requested', attempt: 1, steps: [], fromVersion: 1, toVersion: 2 } : null,
    },
  ],
});
const isStart = (r: Seen) => r.method === 'POST' && r.url === '/v1/rotations';
const isPoll = (r: Seen) => r.method === 'GET' && r.url === `/v1/rotations/${ROTATION_ID}`;
/** `text` as a regular expression that matches it literally. */
const literally = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
/** A proxy's error page: what nginx answers when the API did not. */
const proxyPage = (status: number): Answer => ({ status, type: 'text/html', body: `<html><head><title>${status}</title></head><body>nginx</body></html>` });

describe('mailgent CLI against a stand-in API', () => {
  let cwd: string;
  beforeAll(() => {
    cwd = mkdtempSync(path.join(tmpdir(), 'mailgent-cli-stand-in-'));
  });
  afterAll(() => rmSync(cwd, { recursive: true, force: true }));

  /**
   * Runs the binary with a clean environment plus `env`, `input` on stdin. A run still going after
   * `killAfterMs` is killed (code null): a bug that makes it hang fails the test, not its timeout.
   */
  const mailgent = (
    args: string[],
    opts: {
      url?: string;
      env?: Record<string, string>;
      input?: string | Buffer;
      tty?: boolean;
      stdinTty?: boolean;
      recordRawMode?: boolean;
      killAfterMs?: number;
      started?: (child: ChildProcess) => void;
    } = {},
  ): Promise<Run> =>
    new Promise((resolve, reject) => {
      const env = { PATH: process.env.PATH!, HOME: cwd, MAILGENT_URL: opts.url ?? 'http://127.0.0.1:9', MAILGENT_TOKEN: 'mgt_identity_token', ...opts.env };
      const imports = [...(opts.tty ? ['--import', FAKE_TTY] : []), ...(opts.stdinTty ? ['--import', FAKE_STDIN_TTY] : []), ...(opts.recordRawMode ? ['--import', RECORD_RAW_MODE] : [])];
      const child = spawn(process.execPath, [...imports, BIN, ...args], { cwd, env });
      const killer = setTimeout(() => child.kill('SIGKILL'), opts.killAfterMs ?? 20_000);
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d) => (stdout += d));
      child.stderr.on('data', (d) => (stderr += d));
      child.on('error', reject);
      child.on('close', (code, signal) => {
        clearTimeout(killer);
        resolve({ code, signal, stdout, stderr });
      });
      child.stdin.end(opts.input ?? '');
      opts.started?.(child);
    });
  const json = (run: Run) => JSON.parse(run.stdout);

  /** Runs `fn` against a server answering each request as `answer` says; `seen` lists the requests. */
  const withApi = async (answer: (req: Seen, seen: Seen[]) => Answer, fn: (url: string, seen: Seen[]) => Promise<void>) => {
    const seen: Seen[] = [];
    const server = createServer((req: IncomingMessage, res: ServerResponse) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const key = req.headers['idempotency-key'];
        const request = { method: req.method!, url: req.url!, authorization: req.headers.authorization, ...(typeof key === 'string' ? { idempotencyKey: key } : {}), body: Buffer.concat(chunks).toString('utf8') };
        seen.push(request);
        const a = answer(request, seen);
        if (a === 'hang') return;
        if (a === 'drop') return void req.socket.destroy();
        const type = a.type ?? (a.status >= 400 ? 'application/problem+json' : 'application/json');
        res.writeHead(a.status, { 'content-type': type, ...a.headers }).end(typeof a.body === 'string' ? a.body : JSON.stringify(a.body));
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      await fn(`http://127.0.0.1:${(server.address() as { port: number }).port}`, seen);
    } finally {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  };

  it('never repeats what --value-env or --value-file names: given as "$STRIPE_KEY", it is the secret itself', async () => {
    const secret = `sk_live_SECRET123_${randomBytes(6).toString('hex')}`;
    const cases = [
      [['store', 'stripe', '--value-env', secret], 'the variable named by --value-env is not set'],
      [['store', 'stripe', '--value-file', secret], 'cannot read the file named by --value-file (ENOENT)'],
      [['leak', '--value-file', secret], 'cannot read the file named by --value-file (ENOENT)'],
    ] as const;
    const runs = await Promise.all(cases.flatMap(([args]) => [mailgent([...args]), mailgent([...args, '--json'])]));
    cases.forEach(([args, says], i) => {
      const [human, asJson] = [runs[2 * i]!, runs[2 * i + 1]!];
      for (const run of [human, asJson]) {
        expect(run.code, args.join(' ')).toBe(2);
        expect(run.stdout + run.stderr, args.join(' ')).not.toContain(secret);
        expect(run.stderr, args.join(' ')).toContain(says);
      }
      expect(json(asJson), args.join(' ')).toEqual({ type: 'https://mailgent.dev/problems/cli-usage', title: 'Usage error', detail: expect.stringContaining(says) });
    });
  });

  it('a 2xx JSON answer of another shape (a gateway\'s {"error": …}) is an unexpected answer, exit 1, never `undefined` on stdout', async () => {
    const commands: [string[], boolean][] = [
      [['get', 'stripe'], false],
      [['totp', 'stripe'], false],
      [['audit', 'verify'], false],
      [['store', 'stripe'], true],
      [['identities', 'create', 'bot'], true],
      [['leak', 'stripe'], true],
      [['rotate', 'stripe'], true],
      [['rotate', 'stripe', '--no-wait'], true],
    ];
    await withApi(
      () => ({ status: 200, body: { error: 'login required' } }),
      async (url) => {
        const env = { MAILGENT_ADMIN_TOKEN: 'mgt_admin_token' };
        const runs = await Promise.all(commands.flatMap(([args]) => [mailgent(args, { url, env, input: 'v' }), mailgent([...args, '--json'], { url, env, input: 'v' })]));
        commands.forEach(([args, change], i) => {
          const [human, asJson] = [runs[2 * i]!, runs[2 * i + 1]!];
          const what = args.join(' ');
          expect(human.code, what).toBe(1);
          expect(human.stdout, what).toBe('');
          expect(human.stderr, what).toContain(`mailgent ${args[0]}: Unexpected answer: the API at ${url} answered HTTP 200 with a JSON document that is not the answer to `);
          expect(human.stderr.includes('(the request may have been carried out)'), what).toBe(change);
          expect(human.stderr, what).not.toContain('undefined');
          expect(asJson.code, what).toBe(1);
          expect(json(asJson), what).toEqual({ type: 'https://mailgent.dev/problems/cli-unexpected-answer', title: 'Unexpected answer', detail: expect.any(String) });
        });
        // The fields missing are named, never the answer's content.
        expect(json(runs[1]!).detail).toContain('not the answer to POST /v1/vault.get (missing or of the wrong type: name, kind, version, label, value, ageDays)');
        expect(runs.map((r) => r.stdout + r.stderr).join('')).not.toContain('login required');
      },
    );

    // Once the rotation started, a poll answered so ends the follow naming the rotation (exit 1).
    await withApi(
      (req) => (isStart(req) ? { status: 201, body: started } : { status: 200, body: { error: 'login required' } }),
      async (url) => {
        const run = await mailgent(['rotate', 'stripe', '--json', '--interval', '50'], { url });
        expect(run.code).toBe(1);
        expect(json(run)).toMatchObject({
          type: 'https://mailgent.dev/problems/cli-not-followed',
          rotationId: ROTATION_ID,
          cause: { type: 'https://mailgent.dev/problems/cli-unexpected-answer', detail: expect.stringContaining(`not the answer to GET /v1/rotations/${ROTATION_ID}`) },
        });
      },
    );

    // An answer with fields this CLI does not know (a newer API) is still the answer, handed on unchanged.
    const read = { id: CREDENTIAL_ID, name: 'stripe', kind: 'api_key', version: 3, label: 'current', value: 'sk_test_value', createdAt: new Date().toISOString(), ageDays: 0, addedLater: { x: 1 } };
    await withApi(
      () => ({ status: 200, body: read }),
      async (url) => {
        const [human, asJson] = await Promise.all([mailgent(['get', 'stripe'], { url }), mailgent(['get', 'stripe', '--json'], { url })]);
        expect(human).toMatchObject({ code: 0, stdout: 'sk_test_value\n', stderr: 'stripe version 3 (current), api_key, 0 days old\n' });
        expect(asJson.code).toBe(0);
        expect(json(asJson)).toEqual(read);
      },
    );
  });

  it("a proxy's 502 or 504 is busy (exit 4) for a read and an answer lost (exit 1) for a change; the rotation follow asks again", async () => {
    const reads = [['get', 'stripe'], ['totp', 'stripe'], ['audit', 'verify']];
    const changes = [['store', 'stripe'], ['leak', 'stripe'], ['rotate', 'stripe'], ['identities', 'create', 'bot']];
    for (const status of [502, 504]) {
      await withApi(
        () => proxyPage(status),
        async (url) => {
          const env = { MAILGENT_ADMIN_TOKEN: 'mgt_admin_token' };
          const [readRuns, changeRuns] = await Promise.all([
            Promise.all(reads.map((args) => mailgent([...args, '--json'], { url, env }))),
            Promise.all(changes.map((args) => mailgent([...args, '--json'], { url, env, input: 'v' }))),
          ]);
          readRuns.forEach((run, i) => {
            expect(run.code, `${status} ${reads[i]!.join(' ')}`).toBe(4);
            expect(json(run), `${status} ${reads[i]!.join(' ')}`).toMatchObject({ status, detail: `the API answered HTTP ${status}` });
          });
          changeRuns.forEach((run, i) => {
            expect(run.code, `${status} ${changes[i]!.join(' ')}`).toBe(1);
            expect(json(run), `${status} ${changes[i]!.join(' ')}`).toMatchObject({
              type: 'https://mailgent.dev/problems/cli-answer-lost',
              detail: expect.stringContaining(`a proxy answered HTTP ${status} in its place; it may have been carried out: check before repeating it`),
            });
          });
        },
      );
    }

    // Before, the first 502 ended the follow with exit 1 while the rotation went on.
    await withApi(
      (req, seen) => {
        if (isStart(req)) return { status: 201, body: started };
        const polls = seen.filter(isPoll).length;
        return polls === 1 ? proxyPage(502) : polls === 2 ? proxyPage(504) : { status: 200, body: report('succeeded') };
      },
      async (url, seen) => {
        const run = await mailgent(['rotate', 'stripe', '--json', '--interval', '50'], { url });
        expect(run).toMatchObject({ code: 0, stderr: '' });
        expect(json(run)).toMatchObject({ rotationId: ROTATION_ID, state: 'succeeded', credentials: [{ name: 'stripe', fromVersion: 1, toVersion: 2, outcome: 'succeeded' }] });
        expect(seen.filter(isStart)).toHaveLength(1);
        expect(seen.filter(isPoll)).toHaveLength(3);
      },
    );
  });

  it('rotate: a start whose answer was lost (a proxy\'s 502, a dropped connection) or answered 503 is sent again with the same Idempotency-Key, not left to the user', async () => {
    for (const first of [proxyPage(502), 'drop', { status: 503, body: { type: 'https://mailgent.dev/problems/unavailable', title: 'Service unavailable', status: 503, detail: 'Temporal is unavailable; try again shortly' } }] as const) {
      await withApi(
        (req, seen) => {
          if (isStart(req)) return seen.filter(isStart).length === 1 ? first : { status: 202, body: started };
          return { status: 200, body: report('succeeded') };
        },
        async (url, seen) => {
          const run = await mailgent(['rotate', 'stripe', '--json', '--interval', '50'], { url });
          // Before, exit 1 (answer lost: "check before repeating it") or the 503, and no key was sent.
          expect(run, JSON.stringify(first)).toMatchObject({ code: 0, stderr: '' });
          const starts = seen.filter(isStart);
          expect(starts).toHaveLength(2);
          expect(starts[0]!.idempotencyKey).toMatch(/^[0-9a-f-]{36}$/);
          expect(starts[1]!.idempotencyKey).toBe(starts[0]!.idempotencyKey);
        },
      );
    }
    // Lost, then 503 twice: the start may have been made; exit 1 (not 4, "try again later"), with the key to run again with.
    await withApi(
      (req, seen) => (isStart(req) ? (seen.filter(isStart).length === 1 ? 'drop' : { status: 503, body: { type: 'https://mailgent.dev/problems/unavailable', title: 'Service unavailable', status: 503, detail: 'Temporal is unavailable; try again shortly' } }) : { status: 200, body: report('succeeded') }),
      async (url, seen) => {
        const run = await mailgent(['rotate', 'stripe', '--json', '--interval', '50', '--idempotency-key', 'my-key-1'], { url });
        expect(run.code, run.stdout + run.stderr).toBe(1);
        expect(json(run)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-answer-lost', detail: expect.stringContaining('run again with --idempotency-key my-key-1') });
        expect(seen.filter(isStart).map((r) => r.idempotencyKey)).toEqual(['my-key-1', 'my-key-1', 'my-key-1']);
      },
    );
  });

  it('leak: a report whose answer was lost or answered 503 is sent again with the same Idempotency-Key; tries run out after a loss, the key is named', async () => {
    const isReport = (r: Seen) => r.method === 'POST' && r.url === '/v1/leaks';
    const answer = { results: [{ credentialId: CREDENTIAL_ID, version: 1, incidentId: ROTATION_ID, workflowId: `rotate:${CREDENTIAL_ID}`, rotationId: ROTATION_ID, action: 'rotating' }] };
    await withApi(
      (req, seen) => (isReport(req) && seen.filter(isReport).length === 1 ? 'drop' : { status: 202, body: answer }),
      async (url, seen) => {
        const run = await mailgent(['leak', 'stripe', '--json'], { url });
        // Before, exit 1 (answer lost: "check before repeating it"), and no key was sent.
        expect(run).toMatchObject({ code: 0, stderr: '' });
        expect(json(run)).toEqual(answer);
        const reports = seen.filter(isReport);
        expect(reports.map((r) => r.idempotencyKey)).toEqual([expect.stringMatching(/^[0-9a-f-]{36}$/), reports[0]!.idempotencyKey]);
      },
    );
    await withApi(
      (req, seen) => (isReport(req) && seen.filter(isReport).length === 1 ? proxyPage(502) : { status: 503, body: { type: 'https://mailgent.dev/problems/unavailable', title: 'Service unavailable', status: 503, detail: 'try again shortly' } }),
      async (url, seen) => {
        const run = await mailgent(['leak', 'stripe', '--json', '--idempotency-key', 'leak-key-1'], { url });
        expect(run.code, run.stdout + run.stderr).toBe(1);
        expect(json(run)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-answer-lost', detail: expect.stringContaining('run again with --idempotency-key leak-key-1 to get its answer') });
        expect(seen.filter(isReport).map((r) => r.idempotencyKey)).toEqual(['leak-key-1', 'leak-key-1', 'leak-key-1']);
      },
    );
  });

  it('rotate: an --interval longer than --timeout does not outlast it', async () => {
    await withApi(
      (req) => (isStart(req) ? { status: 201, body: started } : { status: 200, body: report('running') }),
      async (url) => {
        const begun = Date.now();
        // Before, it slept the whole minute before looking at the deadline again (killed here at 20 s).
        const run = await mailgent(['rotate', 'stripe', '--json', '--timeout', '1s', '--interval', '60000'], { url });
        expect(run.code).toBe(1);
        expect(json(run)).toMatchObject({ type: 'https://mailgent.dev/problems/cli-timeout', rotationId: ROTATION_ID });
        expect(Date.now() - begun).toBeLessThan(10_000);
      },
    );
  });

  it('rotate: Ctrl-C while following ends the bar, says the rotation goes on and how to follow it, exits 130', async () => {
    for (const mode of ['terminal', 'json'] as const) {
      let child: ChildProcess | undefined;
      await withApi(
        (req, seen) => {
          if (isStart(req)) return { status: 201, body: started };
          // Once it follows: the user presses Ctrl-C (with --json, after this answer is on its way; in a
          // terminal, once the bar is drawn: below).
          if (mode === 'json' && seen.filter(isPoll).length === 1) setTimeout(() => child!.kill('SIGINT'), 100);
          return { status: 200, body: report('running') };
        },
        async (url) => {
          const args = ['rotate', 'stripe', '--interval', '60000', ...(mode === 'json' ? ['--json'] : [])];
          const run = await mailgent(args, {
            url,
            tty: mode === 'terminal',
            started: (c) => {
              child = c;
              let err = '';
              if (mode === 'terminal') c.stderr?.on('data', (d) => (err += d) && err.includes('0/1 done') && c.kill('SIGINT'));
            },
          });
          // Before, Node's default: killed by the signal, the bar's line left open, nothing said.
          expect(run, mode).toMatchObject({ code: 130, signal: null });
          const says = `mailgent rotate: Interrupted: stopped following rotation ${ROTATION_ID}; it goes on on the server: follow it with GET /v1/rotations/${ROTATION_ID}\n`;
          if (mode === 'terminal') {
            expect(run.stderr).toBe(`rotation ${ROTATION_ID}: 1 credential\n\r\x1b[2K[${'-'.repeat(30)}] 0/1 done\n${says}`);
            expect(run.stdout).toBe('');
          } else {
            expect(run.stderr).toBe(says);
            expect(json(run)).toEqual({ type: 'https://mailgent.dev/problems/cli-interrupted', title: 'Interrupted', detail: expect.stringContaining('it goes on on the server'), rotationId: ROTATION_ID });
          }
        },
      );
    }
  });

  it('leak: --admin-token is the token sent (it implies --admin); beside --token, it or --admin is refused', async () => {
    const results = { results: [{ credentialId: CREDENTIAL_ID, version: 1, action: 'already-revoked' }] };
    await withApi(
      () => ({ status: 200, body: results }),
      async (url, seen) => {
        // Before, without --admin, it was dropped and the report went out as MAILGENT_TOKEN's identity.
        const asAdmin = await mailgent(['leak', 'stripe', '--admin-token', 'mgt_admin_flag', '--json'], { url });
        expect(asAdmin.code).toBe(0);
        expect(json(asAdmin)).toEqual(results);
        expect(seen.map((r) => r.authorization)).toEqual(['Bearer mgt_admin_flag']);

        for (const flags of [['--admin-token', 'mgt_admin_flag'], ['--admin']]) {
          const both = await mailgent(['leak', 'stripe', ...flags, '--token', 'mgt_identity_flag'], { url, env: { MAILGENT_ADMIN_TOKEN: 'mgt_admin_env' } });
          expect(both.code, flags[0]).toBe(2);
          expect(both.stderr, flags[0]).toContain('give --token, or --admin/--admin-token to report with the admin token, not both');
        }
        expect(seen).toHaveLength(1);
      },
    );
  });

  it('leak --version sends the version that leaked with the credential; beside --fingerprint, or not a whole number ≥ 1, it is refused', async () => {
    const results = { results: [{ credentialId: CREDENTIAL_ID, version: 2, action: 'rotating', workflowId: `rotate:${CREDENTIAL_ID}` }] };
    await withApi(
      () => ({ status: 202, body: results }),
      async (url, seen) => {
        const reported = await mailgent(['leak', 'stripe', '--version', '2', '--json'], { url, env: { MAILGENT_TOKEN: 'mgt_identity_env' } });
        expect(reported.code, reported.stderr).toBe(0);
        expect(JSON.parse(seen[0]!.body)).toEqual({ credential: 'stripe', version: 2, source: 'mailgent-cli' });
        for (const [args, says] of [
          [['--fingerprint', 'a'.repeat(64), '--version', '1'], '--version goes with a credential named'],
          [['stripe', '--version', '0'], '--version must be a whole number ≥ 1'],
          [['stripe', '--version', 'two'], '--version must be a whole number ≥ 1'],
        ] as const) {
          const refused = await mailgent(['leak', ...args], { url, env: { MAILGENT_TOKEN: 'mgt_identity_env' } });
          expect(refused.code, args.join(' ')).toBe(2);
          expect(refused.stderr, args.join(' ')).toContain(says);
        }
        expect(seen).toHaveLength(1);
      },
    );
  });

  it('store: a flag and the same field in --policy are refused together (exit 2), as --policy setting a flag\'s field is', async () => {
    const stored = { id: CREDENTIAL_ID, name: 'stripe', version: 1, createdAt: new Date().toISOString() };
    await withApi(
      () => ({ status: 201, body: stored }),
      async (url, seen) => {
        const twice = [
          [['--owner', 'a@example.com', '--policy', '{"owners":["b@example.com"]}'], `--owner and --policy's "owners" set the same field: give it once`],
          [['--tag', 'x', '--service', 's', '--policy', '{"tags":["y"],"service":"t"}'], `--tag and --policy's "tags", --service and --policy's "service" set the same field: give it once`],
          [['--notify', 'a@example.com', '--policy', '{"notify":[]}'], `--notify and --policy's "notify" set the same field`],
        ] as const;
        for (const [flags, says] of twice) {
          // Before, the flag quietly replaced the field: exit 0.
          const run = await mailgent(['store', 'stripe', ...flags], { url, input: 'v' });
          expect(run.code, flags[0]).toBe(2);
          expect(run.stderr, flags[0]).toContain(says);
        }
        expect(seen).toHaveLength(0);
        // Different fields from the flags and --policy go together.
        const run = await mailgent(['store', 'stripe', '--owner', 'a@example.com', '--policy', '{"service":"payments"}'], { url, input: 'v' });
        expect(run.code).toBe(0);
        expect(JSON.parse(seen[0]!.body)).toMatchObject({ owners: ['a@example.com'], service: 'payments' });
      },
    );
  });

  it('mcp --json is refused (exit 2): stdout is the MCP channel, so even the error goes to stderr only', async () => {
    const run = await mailgent(['mcp', '--json']);
    expect(run).toMatchObject({ code: 2, stdout: '' });
    expect(run.stderr).toContain('mailgent mcp: Usage error: --json is not for mcp: its stdout carries only the MCP protocol');
  });

  it('a value that is not UTF-8 text (a Latin-1 file, pipe, terminal or variable) is refused (exit 2) before anything is sent, never shown', async () => {
    // `printf 'p\xe4ss'`: before, each such byte became U+FFFD, and the mangled value was stored (or hashed, for leak): exit 0.
    const latin1 = Buffer.concat([Buffer.from('sk_live_SECRET_p'), Buffer.from([0xe4]), Buffer.from('ss\n')]);
    const file = path.join(cwd, 'latin1-value.txt');
    writeFileSync(file, latin1, { mode: 0o600 });
    const stored = { id: CREDENTIAL_ID, name: 'stripe', version: 1, createdAt: new Date().toISOString() };
    await withApi(
      (req) => (req.url === '/v1/leaks' ? { status: 200, body: { results: [] } } : { status: 201, body: stored }),
      async (url, seen) => {
        const cases: [string, string[], Parameters<typeof mailgent>[1]][] = [
          ['stdin', ['store', 'stripe'], { input: latin1 }],
          ['stdin', ['store', 'stripe', '--value-file', '-'], { input: latin1 }],
          ['the file named by --value-file', ['store', 'stripe', '--value-file', file], {}],
          ['the file named by --value-file', ['leak', '--value-file', file], {}],
          ['stdin', ['leak', '--value-file', '-'], { input: latin1 }],
          ['the prompt', ['store', 'stripe'], { input: Buffer.concat([latin1.subarray(0, -1), Buffer.from('\r')]), stdinTty: true }],
          // Node decodes the environment itself: U+FFFD is what is left of such a byte.
          ['the variable named by --value-env', ['store', 'stripe', '--value-env', 'THE_VALUE'], { env: { THE_VALUE: 'sk_live_SECRET_p\uFFFDss' } }],
        ];
        const runs = await Promise.all(cases.map(([, args, opts]) => mailgent([...args, '--json'], { url, ...opts })));
        cases.forEach(([from, args], i) => {
          const run = runs[i]!;
          const what = `${args.join(' ')} (${from})`;
          expect(run.code, what).toBe(2);
          expect(json(run), what).toEqual({
            type: 'https://mailgent.dev/problems/cli-usage',
            title: 'Usage error',
            detail: expect.stringMatching(new RegExp(`^the (value of stripe|leaked value) read from ${literally(from)} is not UTF-8 text`)),
          });
          expect(run.stdout + run.stderr, what).not.toContain('SECRET');
        });
        expect(seen).toEqual([]);

        // UTF-8 (a multi-byte character, from a pipe and from the terminal) is sent as it is, one trailing newline dropped.
        const piped = await mailgent(['store', 'stripe'], { url, input: Buffer.from('pässwörd-€\n') });
        const typed = await mailgent(['store', 'stripe'], { url, input: Buffer.from('pässwörd-€\r'), stdinTty: true });
        for (const run of [piped, typed]) expect(run.code, run.stderr).toBe(0);
        expect(seen.map((r) => JSON.parse(r.body).value)).toEqual(['pässwörd-€', 'pässwörd-€']);
      },
    );
  });

  it('--value-file - on a terminal is read by the prompt that does not echo (store and leak); piped, it is read as before', async () => {
    // Before, stdin was read in cooked mode even when it was a terminal, which echoes each key
    // typed: the secret was on the screen (and `leak` takes a value only through --value-file).
    const stored = { id: CREDENTIAL_ID, name: 'stripe', version: 1, createdAt: new Date().toISOString() };
    await withApi(
      (req) => (req.url === '/v1/leaks' ? { status: 200, body: { results: [] } } : { status: 201, body: stored }),
      async (url, seen) => {
        const onTerminal = { url, stdinTty: true, recordRawMode: true };
        // As a file is read: every line (Enter, or a pasted line break, CR, LF or CRLF, kept as LF), up to Ctrl-D; one trailing newline dropped.
        const store = await mailgent(['store', 'stripe', '--value-file', '-'], { ...onTerminal, input: '-----BEGIN KEY-----\rsk_live_SECRET\r\n-----END KEY-----\n\u0004not this' });
        const leak = await mailgent(['leak', '--value-file', '-', '--json'], { ...onTerminal, input: 'sk_live_SECRET_typed\r\u0004' });
        const question = (what: string) => `${what} (every line up to Ctrl-D): `;
        for (const [run, asked] of [[store, question('Value of stripe')], [leak, question('Leaked value')]] as const) {
          expect(run.code, run.stderr).toBe(0);
          // The prompt: its question, raw mode (no echo) on while the value is typed, then off again.
          expect(run.stderr).toContain(`${asked}[raw true][raw false]\n`);
          expect(run.stdout + run.stderr).not.toContain('SECRET');
        }
        expect(seen.map((r) => JSON.parse(r.body) as Record<string, unknown>)).toEqual([
          expect.objectContaining({ value: '-----BEGIN KEY-----\nsk_live_SECRET\n-----END KEY-----' }),
          expect.objectContaining({ fingerprint: createHash('sha256').update('sk_live_SECRET_typed').digest('hex') }),
        ]);

        // From a pipe or a file: every line, one trailing newline dropped, no prompt.
        seen.length = 0;
        const multiLine = '-----BEGIN KEY-----\nsk_live_SECRET\n-----END KEY-----\n\n';
        const piped = await Promise.all([
          mailgent(['store', 'stripe', '--value-file', '-'], { url, recordRawMode: true, input: multiLine }),
          mailgent(['leak', '--value-file', '-', '--json'], { url, recordRawMode: true, input: multiLine }),
        ]);
        for (const run of piped) {
          expect(run.code, run.stderr).toBe(0);
          expect(run.stderr).toBe('');
        }
        const bodies = seen.map((r) => JSON.parse(r.body) as Record<string, unknown>);
        expect(bodies.find((b) => 'value' in b)?.value).toBe(multiLine.slice(0, -1));
        expect(bodies.find((b) => 'fingerprint' in b)?.fingerprint).toBe(createHash('sha256').update(multiLine.slice(0, -1)).digest('hex'));
      },
    );
  });

  it('a redirect (an HTTP → HTTPS 308) is not followed: exit 2 naming the Location (no user info, no query), nothing sent there', async () => {
    // Before, the request (the secret in its body) was sent again to the Location, without its
    // Authorization header (another origin), and the answer was a misleading 401: exit 3.
    await withApi(
      () => ({ status: 401, body: { type: 'https://mailgent.dev/problems/unauthorized', title: 'Unauthorized', status: 401, detail: 'no bearer token' } }),
      async (target, atTarget) => {
        const locations = {
          plain: (route: string) => `${target}${route}?via=redirect#top`,
          userinfo: (route: string) => `${target.replace('//', '//admin:hunter2@')}${route}`,
        };
        for (const [how, location] of Object.entries(locations)) {
          await withApi(
            (req) => ({ status: 308, type: 'text/html', body: '<html>moved</html>', headers: { location: location(req.url) } }),
            async (url, seen) => {
              const commands = [
                ['store', 'stripe'],
                ['get', 'stripe'],
                ['rotate', 'stripe'],
              ];
              const runs = await Promise.all(commands.map((args) => mailgent([...args, '--json'], { url, input: 'sk_live_SECRET_value' })));
              runs.forEach((run, i) => {
                const what = `${how}: ${commands[i]!.join(' ')}`;
                const route = ['/v1/vault.store', '/v1/vault.get', '/v1/rotations'][i];
                expect(run.code, what).toBe(2);
                expect(json(run), what).toEqual({
                  type: 'https://mailgent.dev/problems/cli-usage',
                  title: 'Usage error',
                  detail:
                    `the API URL (--url or MAILGENT_URL) ${url} answered HTTP 308, a redirect to ${target}${route}; the CLI does not follow redirects ` +
                    `(it would send the request, and any secret in it, a second time): if that is where the Mailgent API is, point MAILGENT_URL (or --url) at ${target}`,
                });
                expect(run.stdout + run.stderr, what).not.toMatch(/via=redirect|#top|hunter2|admin:|SECRET/);
              });
              expect(seen).toHaveLength(commands.length);
            },
          );
        }
        expect(atTarget).toEqual([]);
      },
    );
  });

  it('mcp: a tools/call sent whose answer was lost may have been carried out (check before repeating it); one that never connected does not say so', async () => {
    const call = { jsonrpc: '2.0', id: 1, method: 'tools/call', params: { name: 'vault_store', arguments: { name: 'stripe', kind: 'api_key', value: 'sk_live_SECRET_mcp' } } };
    const list = { jsonrpc: '2.0', id: 2, method: 'tools/list' };
    const input = `${JSON.stringify(call)}\n${JSON.stringify(list)}\n`;
    /** The bridge's answers, by request id. */
    const bridge = async (url: string) => {
      const run = await mailgent(['mcp'], { url, input });
      expect(run.code, run.stderr).toBe(0);
      const answers = run.stdout.trim().split('\n').map((line) => JSON.parse(line) as { id: number; error: { code: number; message: string } });
      expect(answers.map((a) => a.id).sort()).toEqual([1, 2]);
      expect(run.stdout + run.stderr).not.toContain('SECRET');
      return { call: answers.find((a) => a.id === 1)!.error.message, list: answers.find((a) => a.id === 2)!.error.message };
    };
    const check =
      'it may have been carried out: check (e.g. with list_credentials or rotation_status) before repeating it (a mail_send, rotate_credentials or report_leak given an idempotencyKey may be repeated with the same key)';

    // Sent, then: the connection reset at once; the headers and part of the body, then cut; a proxy's
    // 502 in the server's place. Each with the cause's code (a pattern: a reset is seen while the
    // request is written, or after).
    const servers: [string, (socket: Socket) => void, string][] = [
      ['reset', (socket) => socket.destroy(), '(UND_ERR_SOCKET|ECONNRESET|EPIPE)'],
      ['cut after the headers', (socket) => socket.end('HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"jsonrpc', () => socket.destroy()), 'UND_ERR_SOCKET'],
      ['502', (socket) => socket.end('HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>'), 'HTTP 502'],
    ];
    for (const [how, onRequest, cause] of servers) {
      const server = createNetServer((socket) => socket.once('data', () => onRequest(socket)));
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      try {
        const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
        const said = await bridge(url);
        // Before, "mailgent: fetch failed" (or the proxy's page): the agent repeated the call.
        expect(said.call, how).toMatch(new RegExp(`^mailgent: the request was sent to the Mailgent API at ${literally(`${url}/mcp`)} but no answer came from it \\(${cause}\\); ${literally(check)}$`));
        // A request that is not a tool call changes nothing: the transport's own message, with the cause.
        expect(said.list, how).not.toContain('may have been carried out');
        expect(said.list, how).toMatch(new RegExp(`^mailgent: .+ \\(${cause}\\)$`));
      } finally {
        await new Promise((resolve) => server.close(resolve));
      }
    }

    // Never sent: a closed port, a port fetch refuses outright (the default URL here, :9).
    const closed = await new Promise<number>((resolve) => {
      const server = createNetServer().listen(0, '127.0.0.1', () => {
        const { port } = server.address() as { port: number };
        server.close(() => resolve(port));
      });
    });
    for (const [url, cause] of [[`http://127.0.0.1:${closed}`, 'ECONNREFUSED'], ['http://127.0.0.1:9', 'bad port']]) {
      const said = await bridge(url!);
      expect(said.call, url).toBe(`mailgent: fetch failed (${cause})`);
      expect(said.list, url).toBe(`mailgent: fetch failed (${cause})`);
    }
  });
});
