import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';

/**
 * The run-wide secret-leak sweep. Every harness registers the secrets its file created and, when
 * it closes, leaves behind what must never hold one: its audit rows, mail outbox, decoded workflow
 * histories (failure messages included) and the bodies of every HTTP error it received. At the end
 * of the run (test/support/global-setup.ts) one sweep looks for every secret of every file — raw,
 * base64 and hex — in all of that, in every process log under the run's directory, in every email
 * the SMTP sink took, and in the raw history of every workflow on the Temporal server.
 */
export const SWEEP_DIR = 'leak-sweep';

export function sweepDir(runDir: string): string {
  const dir = path.join(runDir, SWEEP_DIR);
  mkdirSync(dir, { recursive: true });
  return dir;
}

export function registerSecrets(runDir: string, tag: string, secrets: string[]): void {
  writeFileSync(path.join(sweepDir(runDir), `${tag}.secrets.json`), JSON.stringify(secrets));
}

/** Adds text to a place the sweep will search (one file per harness and kind). */
export function recordPlace(runDir: string, tag: string, kind: string, text: string): void {
  appendFileSync(path.join(sweepDir(runDir), `${tag}.${kind}.txt`), `${text}\n`);
}

export interface SweepResult {
  secrets: number;
  places: number;
  bytes: number;
  hits: string[];
}

/**
 * The forms a leaked value could take in text: as is; JSON-escaped and percent-encoded; base64 (also
 * URL-safe, unpadded) of the value alone and inside a longer encoded text, at each of the three
 * places a byte can start in a base64 group (its first and last characters, which share bits with
 * what surrounds it, left out); and hex in either case. (Whole-value base64 alone found a value
 * inside a larger encoded blob only when it began on a group's boundary: one time in three.)
 */
export function leakForms(secret: string): string[] {
  const bytes = Buffer.from(secret);
  const b64 = bytes.toString('base64');
  const hex = bytes.toString('hex');
  const forms = [secret, JSON.stringify(secret).slice(1, -1), encodeURIComponent(secret), b64, b64.replace(/=+$/, ''), bytes.toString('base64url'), hex, hex.toUpperCase()];
  for (const offset of [0, 1, 2]) {
    // Preceded by `offset` bytes: the characters that hold only the value's bits, from the first
    // group boundary after them to the last whole group before whatever follows.
    const inner = Buffer.concat([Buffer.alloc(offset), bytes]).toString('base64');
    const start = offset === 0 ? 0 : offset === 1 ? 2 : 3;
    const end = inner.length - 4;
    const fragment = inner.slice(start, end);
    if (fragment.length >= 8) forms.push(fragment, fragment.replace(/\+/g, '-').replace(/\//g, '_'));
  }
  return [...new Set(forms)];
}

export function sweep(secrets: Iterable<string>, places: Iterable<[string, string]>): SweepResult {
  const unique = [...new Set(secrets)].filter((s) => s.length >= 6);
  const formOf = new Map<string, string>();
  for (const secret of unique) for (const form of leakForms(secret)) formOf.set(form, secret);
  // A few passes per place: alternations of up to 200 forms (V8 refuses one huge pattern; longer
  // forms first so a longer form wins), and indexOf for the very long values.
  const forms = [...formOf.keys()].sort((a, b) => b.length - a.length);
  const long = forms.filter((f) => f.length > 512);
  const short = forms.filter((f) => f.length <= 512);
  const patterns: RegExp[] = [];
  for (let i = 0; i < short.length; i += 200) {
    patterns.push(new RegExp(short.slice(i, i + 200).map((f) => f.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|'), 'g'));
  }
  const hits = new Set<string>();
  const hit = (form: string, where: string) => {
    const secret = formOf.get(form)!;
    hits.add(`a secret (${secret.length} chars, starting '${secret.slice(0, 3)}…') appears in ${where}`);
  };
  let count = 0;
  let bytes = 0;
  for (const [where, text] of places) {
    count++;
    bytes += text.length;
    for (const pattern of patterns) for (const match of text.matchAll(pattern)) hit(match[0], where);
    for (const form of long) if (text.includes(form)) hit(form, where);
  }
  return { secrets: unique.length, places: count, bytes, hits: [...hits] };
}

/** Every registered secret of the run. */
export function registeredSecrets(runDir: string): string[] {
  const dir = path.join(runDir, SWEEP_DIR);
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => f.endsWith('.secrets.json'))
    .flatMap((f) => JSON.parse(readFileSync(path.join(dir, f), 'utf8')) as string[]);
}

/**
 * The files of the run the sweep reads: the harnesses' recorded places, every *.log (service,
 * child-process and the servers' own logs: PostgreSQL logs a failed statement, Temporal a refused
 * request) and every *.eml under the run directory. The servers' data files are not read: their
 * contents are searched through the places the harnesses recorded and through the Temporal API.
 * (Their directories were skipped whole, and with them the servers' logs.)
 */
export function* runFiles(runDir: string): Generator<[string, string]> {
  const walk = function* (dir: string): Generator<string> {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) yield* walk(full);
      else if (entry.isFile()) yield full;
    }
  };
  for (const file of walk(runDir)) {
    const rel = path.relative(runDir, file);
    const inSweep = rel.startsWith(`${SWEEP_DIR}${path.sep}`) && !rel.endsWith('.secrets.json');
    if (inSweep || file.endsWith('.log') || file.endsWith('.eml')) {
      if (statSync(file).size > 256 * 1024 * 1024) throw new Error(`${rel} is too large to sweep`);
      yield [rel, readFileSync(file, 'utf8')];
    }
  }
}

/** The sweep at the end of a run: registered secrets against the run's files and every raw history on the server. */
export async function runLeakSweep(runDir: string, temporalAddress: string): Promise<SweepResult & { workflows: number }> {
  const { Client, Connection } = await import('@temporalio/client');
  const connection = await Connection.connect({ address: temporalAddress });
  const histories: [string, string][] = [];
  try {
    const client = new Client({ connection, namespace: 'default' });
    // Listed by the raw call: the client's list() decodes each run's memo, which the payload codec
    // encrypted (a batch's rotations carry their rotation id there), and this client has no codec.
    let nextPageToken: Uint8Array | undefined;
    do {
      const page = await client.workflowService.listWorkflowExecutions({ namespace: 'default', pageSize: 1000, nextPageToken });
      for (const wf of page.executions ?? []) {
        const { workflowId, runId } = wf.execution ?? {};
        if (!workflowId || !runId) continue;
        const history = await client.workflow.getHandle(workflowId, runId).fetchHistory();
        histories.push([`raw history of ${workflowId} (${runId})`, rawHistoryText(history)]);
      }
      nextPageToken = page.nextPageToken?.length ? page.nextPageToken : undefined;
    } while (nextPageToken);
  } finally {
    await connection.close();
  }
  const result = sweep(registeredSecrets(runDir), (function* () {
    yield* runFiles(runDir);
    yield* histories;
  })());
  return { ...result, workflows: histories.length };
}

/** Bytes as JSON.stringify's replacer sees them (a Buffer arrives already as {type: 'Buffer', data}). */
export function asBytes(v: any): Buffer | undefined {
  if (v instanceof Uint8Array) return Buffer.from(v);
  if (v?.type === 'Buffer' && Array.isArray(v.data)) return Buffer.from(v.data);
  return undefined;
}

/** A history as text with byte fields as UTF-8: what anyone reading the Temporal server sees. */
export function rawHistoryText(history: unknown): string {
  return JSON.stringify(history, (_k, v) => asBytes(v)?.toString('utf8') ?? v);
}
