import type { z } from 'zod';
import { KINDS } from '../../vault/types';
import { CliError, EXIT, usageError } from './errors';
import { Api, baseUrl, idempotencyKeyOption, identityToken, Out, parse, reportError, sendKeyed, TOKEN_OPTION } from './context';
import { Progress, table } from './render';
import { credentialPage, rotationReport, rotationStarted } from './answers';
import type { ClientCommand } from './commands';

/**
 * `mailgent rotate`: starts a rotation (POST /v1/rotations, by names or with the API's own filter
 * {kind, olderThanDays}), then follows GET /v1/rotations/:id until every credential has an
 * outcome, drawing progress on stderr, and ends with a table of what changed.
 */

const usage = `Usage: mailgent rotate <name|id>... [options]
       mailgent rotate [--kind <kind>] [--older-than <days>d] [options]

Rotates credentials through their rotation policy (one named without a policy is refused, and nothing
starts; --kind and --older-than pass over them), follows the batch until every credential has an
outcome, and prints a table: credential, old version → new version, outcome. Exit 0 when every
credential rotated (a rotation in its grace period counts: the new version is current), 1 when any
failed, was cancelled or rolled back. Once the rotation has started, a busy or unreachable API is
asked again until --timeout, and any failure exits 1 (never 4, "try again later") naming the
rotation id (in "rotationId" with --json): follow that rotation rather than starting another.

Options:
  --kind <kind>           rotate every credential of this kind (${KINDS.join(', ')})
  --older-than <n>d       ... whose current version is older than n days (e.g. 90d); alone, of every kind
  --reason <text>         recorded with the rotation
  --notify <email>        gets one summary of the batch (repeatable)
  --no-wait               print the rotation id and return at once
  --timeout <n>ms|s|m|h   stop following after this long (exit 1; the rotation goes on). Default 30m
  --interval <ms>         how often to poll (default 500)
  --idempotency-key <key> the start's Idempotency-Key (default: a new one). The start is sent up to
                          three times when its answer is lost or the API answers 503; if it still
                          fails after an answer was lost, the key is printed: run again with it to
                          get the rotation it may have made instead of starting another

Ctrl-C stops following, not the rotation: it goes on on the server, and its id is printed (on
stdout too with --json, as the problem's "rotationId"); the exit code is 130.

Progress goes to stderr: a bar on a terminal, one line per finished credential otherwise, nothing
with --json. --json prints {rotationId, state, reason, credentials: [{credentialId, name,
fromVersion, toVersion, outcome, error}]} (with --no-wait: {rotationId, batchWorkflowId, workflowIds}).

Connection: --url or MAILGENT_URL; identity: --token or MAILGENT_TOKEN.`;

type RotationReport = z.infer<typeof rotationReport>;
type RunReport = RotationReport['credentials'][number];

const FINISHED = new Set(['succeeded', 'grace', 'failed', 'cancelled', 'rolled_back']);
const OK_STATES = new Set(['succeeded', 'grace']);

function days(raw: string | undefined): number | undefined {
  if (raw === undefined) return undefined;
  const m = /^(\d+)d?$/.exec(raw);
  if (!m) throw usageError(`--older-than must be whole days, e.g. 90d (got '${raw}')`, usage);
  return Number(m[1]);
}

function duration(raw: string): number {
  const m = /^(\d+)(ms|s|m|h)$/.exec(raw);
  if (!m) throw usageError(`--timeout must be a number with ms, s, m or h, e.g. 10m (got '${raw}')`, usage);
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h'];
}

export const rotate: ClientCommand = {
  summary: 'rotate <name>... | --kind  rotate credentials; follows the batch and prints what changed',
  usage,
  async run(args) {
    const { values, positionals: names } = parse(
      args,
      {
        ...TOKEN_OPTION,
        kind: { type: 'string' },
        'older-than': { type: 'string' },
        reason: { type: 'string' },
        notify: { type: 'string', multiple: true },
        'no-wait': { type: 'boolean', default: false },
        timeout: { type: 'string', default: '30m' },
        interval: { type: 'string', default: '500' },
        'idempotency-key': { type: 'string' },
      },
      usage,
    );
    const filtered = values.kind !== undefined || values['older-than'] !== undefined;
    if (names.length > 0 && filtered) throw usageError('give credential names or a filter (--kind, --older-than), not both', usage);
    if (names.length === 0 && !filtered) throw usageError('name the credentials to rotate, or give a filter (--kind, --older-than)', usage);
    if (values.kind !== undefined && !(KINDS as readonly string[]).includes(values.kind)) throw usageError(`--kind must be one of ${KINDS.join(', ')}`, usage);
    const olderThanDays = days(values['older-than']);
    const timeoutMs = duration(values.timeout);
    if (!/^\d+$/.test(values.interval) || Number(values.interval) < 50) throw usageError('--interval must be a whole number of milliseconds ≥ 50', usage);
    const interval = Number(values.interval);
    const api = new Api(baseUrl(values.url), identityToken(values.token));
    const out = new Out(values.json);

    const key = idempotencyKeyOption(values['idempotency-key'], usage);
    const started = await sendKeyed(
      api,
      '/v1/rotations',
      rotationStarted,
      {
        ...(filtered ? { filter: { ...(values.kind ? { kind: values.kind } : {}), ...(olderThanDays !== undefined ? { olderThanDays } : {}) } } : { credentials: names }),
        ...(values.reason ? { reason: values.reason } : {}),
        ...(values.notify ? { notify: values.notify } : {}),
      },
      key,
      { sent: "the rotation's start", made: 'that rotation instead of starting another' },
    );
    if (values['no-wait']) {
      out.result(started, () => out.line(started.rotationId));
      return EXIT.ok;
    }

    const { rotationId } = started;
    const total = started.workflowIds.length;
    out.note(`rotation ${rotationId}: ${total} credential${total === 1 ? '' : 's'}`);
    const progress = values.json ? undefined : new Progress(total);
    const deadline = Date.now() + timeoutMs;
    let report: RotationReport;
    let unknownFrom: Map<string, number>;
    const stopHandlingInterrupt = onInterrupt(rotationId, progress, values.json);
    try {
      try {
        for (;;) {
          report = await poll(api, rotationId, deadline, interval, values.timeout);
          const done = report.credentials.filter((c) => FINISHED.has(c.state));
          progress?.update(
            done.map((c) => ({ key: c.credentialId, line: `${c.name}: ${outcomeText(c)}` })),
            done.filter((c) => !OK_STATES.has(c.state)).length,
          );
          if (report.state !== 'running') break;
          if (Date.now() > deadline) {
            throw new CliError(EXIT.failed, {
              type: 'https://mailgent.dev/problems/cli-timeout',
              title: 'Still running',
              detail: `rotation ${rotationId} had not finished after ${values.timeout}; it goes on: follow it with GET /v1/rotations/${rotationId}`,
              rotationId,
            });
          }
          // --timeout is kept to even with a long --interval: the last wait ends at the deadline.
          await sleep(Math.max(0, Math.min(interval, deadline - Date.now())));
        }
      } finally {
        progress?.end();
      }
      // Only where nothing changed: a rotated credential's version now is the one the rotation made.
      unknownFrom = await currentVersions(api, report.credentials.filter((c) => c.progress?.fromVersion === undefined && !OK_STATES.has(c.state)).map((c) => c.credentialId));
    } catch (err) {
      throw notFollowed(err, rotationId);
    } finally {
      stopHandlingInterrupt();
    }

    const credentials = report.credentials.map((c) => ({
      credentialId: c.credentialId,
      name: c.name,
      fromVersion: c.progress?.fromVersion ?? unknownFrom.get(c.credentialId) ?? null,
      // As in the table: a run that did not take effect made no new version (its pending one was discarded).
      toVersion: OK_STATES.has(c.state) ? (c.progress?.toVersion ?? null) : null,
      outcome: c.state,
      ...(c.state === 'grace' && c.progress?.graceEndsAt ? { graceEndsAt: c.progress.graceEndsAt } : {}),
      error: errorOf(c),
    }));
    out.result({ rotationId: report.rotationId, state: report.state, reason: report.reason, credentials }, () => {
      out.line(
        table(
          ['CREDENTIAL', 'VERSION', 'OUTCOME'],
          report.credentials.map((c, i) => [c.name, `${credentials[i]!.fromVersion ?? '?'} → ${OK_STATES.has(c.state) ? (c.progress?.toVersion ?? '?') : '–'}`, outcomeText(c)]),
        ),
      );
      const failed = credentials.filter((c) => !OK_STATES.has(c.outcome)).length;
      out.line(`\nrotation ${report.rotationId}: ${report.state} (${credentials.length - failed} rotated, ${failed} not)`);
    });
    // Per credential: a batch with one run in its grace period and another failed is not a success.
    return credentials.every((c) => OK_STATES.has(c.outcome)) ? EXIT.ok : EXIT.failed;
  },
};

/** How long one poll may take, and the longest wait between polls of a busy or unreachable API. */
const POLL_TIMEOUT_MS = 15_000;
const MAX_BACKOFF_MS = 5_000;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The exit code of a process ended by Ctrl-C (128 + SIGINT), as shells report it. */
const INTERRUPTED = 130;

/**
 * Ctrl-C while following stops the following, not the rotation (a workflow on the server): the bar's
 * line is ended and the user told which rotation goes on and how to see it, with the rotation id on
 * stdout as well under --json (the only place it would otherwise never be printed). Exit 130, as a
 * shell reports a process ended by SIGINT. Returns what removes the handler, once the follow ends.
 */
function onInterrupt(rotationId: string, progress: Progress | undefined, json: boolean): () => void {
  const interrupted = () => {
    progress?.end();
    const problem = {
      type: 'https://mailgent.dev/problems/cli-interrupted',
      title: 'Interrupted',
      detail: `stopped following rotation ${rotationId}; it goes on on the server: follow it with GET /v1/rotations/${rotationId}`,
      rotationId,
    };
    reportError(new CliError(EXIT.failed, problem), 'rotate', json);
    process.exit(INTERRUPTED);
  };
  process.on('SIGINT', interrupted);
  return () => process.off('SIGINT', interrupted);
}

/**
 * GET /v1/rotations/:id. Once the rotation has started, a busy or unreachable API (429, 503, a
 * proxy's 502 or 504, a refused or dropped connection, a poll that timed out: exit 4, "try again
 * later") is asked again, backing off, until the deadline: a script that took exit 4 at its word
 * would start a second rotation.
 */
async function poll(api: Api, rotationId: string, deadline: number, interval: number, timeout: string): Promise<RotationReport> {
  for (let wait = interval; ; wait = Math.min(wait * 2, Math.max(MAX_BACKOFF_MS, interval))) {
    try {
      // A poll that hangs is cut short, to be asked again, and never outlasts --timeout by much.
      const timeoutMs = Math.min(POLL_TIMEOUT_MS, Math.max(deadline - Date.now(), 1000));
      return await api.call('GET', `/v1/rotations/${rotationId}`, rotationReport, undefined, { timeoutMs });
    } catch (err) {
      if (!(err instanceof CliError) || err.exitCode !== EXIT.unavailable) throw err;
      const left = deadline - Date.now();
      if (left <= 0) throw notFollowed(err, rotationId, ` for ${timeout}`);
      await sleep(Math.min(wait, left));
    }
  }
}

/**
 * Any failure after the rotation started: exit 1 (it may well be going on; "try again later" would
 * start another), and the rotation id in the problem, so a script can follow it itself.
 */
function notFollowed(err: unknown, rotationId: string, during = ''): CliError {
  if (err instanceof CliError && err.problem.rotationId === rotationId) return err;
  return new CliError(EXIT.failed, {
    type: 'https://mailgent.dev/problems/cli-not-followed',
    title: 'Rotation not followed',
    detail: `rotation ${rotationId} started but could not be followed${during}: ${describe(err)}; it goes on: follow it with GET /v1/rotations/${rotationId}`,
    rotationId,
    ...(err instanceof CliError ? { cause: err.problem } : {}),
  });
}

function describe(err: unknown): string {
  if (!(err instanceof CliError)) return (err as Error).message;
  const p = err.problem;
  return `${p.title}${p.status ? ` (${p.status})` : ''}: ${p.detail}`;
}

/**
 * A run that failed before it read the credential reports no fromVersion (nor does one whose
 * progress the API could not tell); nothing changed, so the old version is the current one. Read from the metadata list (no values), page by page.
 */
async function currentVersions(api: Api, ids: string[]): Promise<Map<string, number>> {
  const found = new Map<string, number>();
  const wanted = new Set(ids);
  for (let after: string | null = null; wanted.size > found.size; ) {
    const page: z.infer<typeof credentialPage> = await api.call('GET', `/v1/credentials?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ''}`, credentialPage);
    for (const item of page.items) if (wanted.has(item.id)) found.set(item.id, item.version);
    if (!page.nextCursor) break;
    after = page.nextCursor;
  }
  return found;
}

function errorOf(c: RunReport): string | null {
  if (OK_STATES.has(c.state)) return null;
  return c.progress?.error ?? c.progress?.steps?.find((s) => s.error)?.error ?? null;
}

function outcomeText(c: RunReport): string {
  if (c.state === 'grace') return `succeeded; previous version valid until ${c.progress?.graceEndsAt ?? 'the grace period ends'}`;
  const error = errorOf(c);
  return error ? `${c.state}: ${error}` : c.state;
}
