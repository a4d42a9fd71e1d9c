import { existsSync, statSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import { z } from 'zod';
import { inlineMasterKeys, KeyringFileError, readKeyringFile } from '../vault/keyring';
import { ConfigError, DEFAULT_PORT } from './defaults';

/**
 * The service's whole configuration, read once from the environment at start.
 * Each problem names its variable; values of secret variables are never echoed.
 */

/**
 * Whether an OUTBOUND_ALLOW entry is well-formed (the configuration check; here, not in core/outbound.ts, so
 * that loading the configuration, as every CLI command does, does not load the HTTP client).
 */
export function outboundEntryProblem(entry: string): string | undefined {
  const [address, prefix, extra] = entry.split('/');
  const family = isIP(address ?? '');
  if (extra !== undefined) return `'${entry}' is not a host, an address or a CIDR range`;
  if (family === 0) return prefix === undefined && /^[A-Za-z0-9.-]+$/.test(entry) ? undefined : `'${entry}' is not a host, an address or a CIDR range`;
  if (prefix !== undefined && !(/^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128))) return `'${entry}' has a bad prefix length`;
  return undefined;
}

/**
 * A whole number written in digits, and nothing else: Number() would take `0x50` as 80, `1e3` as
 * 1000 and ` 80 ` as 80, none of which anyone means in a setting.
 */
const whole = (min: number, max: number) =>
  z
    .string()
    .regex(/^\d{1,16}$/, 'must be a whole number, in digits')
    .transform(Number)
    .pipe(z.number().min(min, `must be between ${min} and ${max}`).max(max, `must be between ${min} and ${max}`));

const port = whole(1, 65535);

/** A host name (RFC 1123 labels) or an IP address, as a listener or a client takes it. */
const host = z.string().refine((value) => isIP(value) !== 0 || /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/.test(value), {
  error: 'must be a host name or an IP address',
});

const url = (protocols: string[]) =>
  z.string().refine(
    (value) => {
      try {
        return protocols.includes(new URL(value).protocol);
      } catch {
        return false;
      }
    },
    { error: `must be a URL starting with ${protocols.map((p) => `${p}//`).join(' or ')}` },
  );

const hostPort = z.string().refine(
  (value) => {
    const port = /^[A-Za-z0-9.\-_[\]:]+:(\d{1,5})$/.exec(value)?.[1];
    return port !== undefined && Number(port) >= 1 && Number(port) <= 65535;
  },
  { error: 'must be host:port with a port between 1 and 65535, e.g. localhost:7233' },
);

// Addresses on local domains (mailgent@localhost) are fine for a sender or a team alias.
const email = z.string().regex(/^[^\s@<>(),;:"]+@[A-Za-z0-9.-]+$/, 'must be an email address');

const cron = z
  .string()
  .regex(/^(\S+\s+){4}\S+$/, 'must be a five-field cron expression, e.g. "0 3 * * *"')
  .superRefine((value, ctx) => {
    const problem = cronProblem(value);
    if (problem) ctx.addIssue({ code: 'custom', message: `${problem} (minute hour day-of-month month day-of-week, e.g. "0 3 * * *")` });
  });

const CRON_FIELDS = [
  { name: 'minute', min: 0, max: 59 },
  { name: 'hour', min: 0, max: 23 },
  { name: 'day of month', min: 1, max: 31 },
  { name: 'month', min: 1, max: 12, names: ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'] },
  { name: 'day of week', min: 0, max: 7, names: ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'] },
];

/**
 * Why a five-field cron expression would be refused, checked here so that a bad SWEEP_CRON stops
 * the process at once with the variable named, not once the Temporal schedule is made. Each field
 * is a list of `*`, `n` or `n-m`, each optionally `/step`; months and weekdays also by name (as
 * Temporal's schedule parser takes them: weekdays 0–7, no `?`).
 */
export function cronProblem(value: string): string | undefined {
  const fields = value.trim().split(/\s+/);
  for (const [i, field] of fields.entries()) {
    const spec = CRON_FIELDS[i]!;
    const number = (token: string): number | undefined => {
      const byName = spec.names?.indexOf(token.toUpperCase()) ?? -1;
      if (byName >= 0) return byName + spec.min;
      return /^\d{1,2}$/.test(token) ? Number(token) : undefined;
    };
    for (const item of field.split(',')) {
      const m = /^(\*|[^-/]+(?:-[^-/]+)?)(?:\/(\d{1,2}))?$/.exec(item);
      if (!m) return `the ${spec.name} field '${field}' is not understood`;
      if (m[2] !== undefined && Number(m[2]) < 1) return `the ${spec.name} field '${field}' has a step of 0`;
      if (m[1] === '*') continue;
      for (const bound of m[1]!.split('-')) {
        const n = number(bound);
        if (n === undefined) return `the ${spec.name} field '${field}' is not understood`;
        if (n < spec.min || n > spec.max) return `the ${spec.name} field '${field}' must be within ${spec.min}–${spec.max}`;
      }
    }
  }
  return undefined;
}

const MASTER_KEY_FORMS = 'must be base64 of exactly 32 bytes (or several, comma-separated, the current one first), or the path of an existing keyring file';

const masterKey = z.string().superRefine((value, ctx) => {
  if (inlineMasterKeys(value) !== undefined) return;
  if (!isExistingFile(value)) return void ctx.addIssue({ code: 'custom', message: MASTER_KEY_FORMS });
  // Read here, as the service will: a file that is not a keyring must stop it before anything starts or migrates.
  const problem = keyringFileProblem(value);
  if (problem) ctx.addIssue({ code: 'custom', message: `${MASTER_KEY_FORMS}; the file it names ${problem}` });
});

/**
 * Why the keyring file cannot be used, in words of our own: its contents (keys, ids) are never
 * repeated, nor its path (the variable's value).
 */
function keyringFileProblem(file: string): string | undefined {
  try {
    readKeyringFile(file);
    return undefined;
  } catch (err) {
    if (err instanceof KeyringFileError) return err.reason;
    const code = (err as NodeJS.ErrnoException).code;
    return code ? `cannot be read (${code})` : 'cannot be read';
  }
}

/** A comma-separated setting's entries, blanks dropped. */
const commaList = (value: string) =>
  value
    .split(',')
    .map((part) => part.trim())
    .filter(Boolean);

export { ConfigError, DEFAULT_PORT };

/** The characters a bearer token is made of (api/endpoint.ts reads `Bearer <token>` with the same class). */
export const ADMIN_TOKEN_CHARS = /^[\x21-\x7e]+$/;

const schema = z.object({
  PORT: port.default(DEFAULT_PORT),
  HOST: host.default('127.0.0.1'),
  DATA_DIR: z.string().min(1, 'must not be empty').default('.data'),
  DATABASE_URL: url(['postgres:', 'postgresql:']).optional(),
  DATABASE_POOL_SIZE: whole(1, 200).default(10),
  TEMPORAL_ADDRESS: hostPort.optional(),
  TEMPORAL_NAMESPACE: z.string().regex(/^[A-Za-z0-9._-]{1,255}$/, 'must be a Temporal namespace name').default('default'),
  TASK_QUEUE: z.string().regex(/^[A-Za-z0-9._:-]{1,255}$/, 'must be letters, digits, . _ : or -').default('mailgent'),
  TEMPORAL_CLI_PATH: z.string().refine(isExistingFile, { error: 'must be the path of the temporal binary' }).optional(),
  SMTP_URL: url(['smtp:', 'smtps:']).optional(),
  MAIL_FROM: email.default('mailgent@localhost'),
  VAULT_MASTER_KEY: masterKey.optional(),
  ADMIN_TOKEN: z
    .string()
    .min(32, 'must be at least 32 characters (use 256 bits of randomness)')
    // What a bearer token can be (api/endpoint.ts): one with a space, a line break (a CRLF env file),
    // a non-ASCII character or more than 512 characters started a service no admin could call.
    .max(512, 'must be at most 512 characters')
    .regex(ADMIN_TOKEN_CHARS, 'must be printable ASCII without spaces (it is sent as Authorization: Bearer <token>)')
    .optional(),
  SECURITY_NOTIFY: z
    .string()
    .transform(commaList)
    .pipe(z.array(email))
    .optional(),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  ENV_FILES_ROOT: z.string().min(1).optional(),
  // Hosts, addresses and CIDR ranges on this machine or a private network that providers and webhooks may call (core/outbound.ts).
  OUTBOUND_ALLOW: z
    .string()
    .transform(commaList)
    .superRefine((entries, ctx) => {
      for (const [index, entry] of entries.entries()) {
        const problem = outboundEntryProblem(entry);
        if (problem) ctx.addIssue({ code: 'custom', path: [index], message: `${problem} (a host name, an IP address or a CIDR range such as 10.1.0.0/16)` });
      }
    })
    .default([]),
  // Hourly: rotation windows are in whole local hours, and the sweep must fall inside each of them.
  SWEEP_CRON: cron.default('0 * * * *'),
  ORPHAN_REPORT_CRON: cron.default('0 6 * * 1'),
  ORPHAN_DAYS: whole(1, 3650).default(30),
  DELETE_RETENTION_DAYS: whole(0, 3650).default(30),
  MAIL_RETENTION_DAYS: whole(0, 3650).default(30),
  CODEC_CORS_ORIGINS: z
    .string()
    .transform(commaList)
    .pipe(z.array(z.string().regex(/^https?:\/\/[^/\s]+$/, 'must be origins such as http://localhost:8233, comma-separated')))
    .optional(),
  AUTH_FAILURE_LIMIT: whole(1, 1_000_000).default(50),
  AUTH_FAILURE_WINDOW_SECONDS: whole(1, 86_400).default(300),
  // Well below 2^32, the NIST limit for AES-GCM with random nonces (see vault/data-keys.ts).
  DATA_KEY_MAX_ENCRYPTIONS: whole(1, 2 ** 31).default(2 ** 30),
  SHUTDOWN_GRACE_SECONDS: whole(0, 3600).default(30),
  WORKER_CACHED_WORKFLOWS: whole(2, 100_000).default(100),
  // A prebuilt workflow bundle (npm run bundle), so a worker does not bundle its workflows at each
  // start; checked by the worker (worker/bundle.ts, checkWorkflowBundle), not by the API beside it.
  WORKFLOW_BUNDLE: z.string().min(1).optional(),
  BATCH_MAX_OPEN_ROTATIONS: whole(1, 100_000).default(50),
  // The API's audited reads in a worker thread of their own (vault/read-thread.ts).
  READ_THREAD: z
    .enum(['on', 'off', 'true', 'false', '1', '0'], { error: 'must be on or off' })
    .transform((value) => ['on', 'true', '1'].includes(value))
    .default(true),
});

/** Variables whose values are secret: a problem with them never repeats the value. */
const SECRET_VARIABLES = new Set(['VAULT_MASTER_KEY', 'ADMIN_TOKEN', 'DATABASE_URL', 'SMTP_URL']);

type Parsed = z.infer<typeof schema>;

export interface Config extends Parsed {
  /** Absolute DATA_DIR. */
  dataDir: string;
  /** The only directory env-file dependents may write under. */
  envFilesRoot: string;
  /** Servers the process must start itself because no external address was given. */
  embedded: { postgres: boolean; temporal: boolean; smtp: boolean };
}

/** The variables that say where the shared servers are, as far as partProblems looks at them: set or not. */
type PartVariables = Partial<Record<'DATABASE_URL' | 'VAULT_MASTER_KEY' | 'TEMPORAL_ADDRESS' | 'ADMIN_TOKEN' | 'SMTP_URL', unknown>>;

/**
 * What the parts to run (`mailgent serve`: both; `api` or `worker`: one alone) need set beside the
 * variables' own checks: loadConfig names them with those, so one start names every problem.
 */
export function partProblems(config: PartVariables, parts: readonly ('api' | 'worker')[]): string[] {
  // A master key generated into this DATA_DIR works only for this process: the API and the workers
  // of one database (in containers, each with a DATA_DIR of its own that a re-creation loses) must
  // share one, or what one stores no other can open.
  // One part alone shares its servers with the other part, run elsewhere: a server it embedded would
  // be its own (an API's Temporal server with no worker polling it accepts rotations that never run).
  // Every problem is named at once.
  const alone = parts.length === 1 ? 'must be set for `mailgent api` and `mailgent worker` (one part alone)' : undefined;
  return [
    alone && !config.DATABASE_URL && `DATABASE_URL: ${alone}: a database embedded in this process is out of the other part's reach`,
    (config.DATABASE_URL || alone) &&
      !config.VAULT_MASTER_KEY &&
      `VAULT_MASTER_KEY: must be set when DATABASE_URL is${alone ? ' (as it must be here)' : ''}: every process using that database must share one master key (a key generated into one DATA_DIR would be lost with it; one made there before can be named by its path, VAULT_MASTER_KEY=<DATA_DIR>/master-keys.json)`,
    alone &&
      !config.TEMPORAL_ADDRESS &&
      `TEMPORAL_ADDRESS: ${alone}: a Temporal server embedded in this process has no other part to run or start its work; \`mailgent serve\` runs both parts with embedded servers`,
    alone &&
      parts[0] === 'api' &&
      !config.ADMIN_TOKEN &&
      'ADMIN_TOKEN: must be set for `mailgent api` alone: a token generated into its DATA_DIR would be lost with it (a container re-created, another API process with a DATA_DIR of its own), and with it every admin script',
    alone && parts[0] === 'worker' && !config.SMTP_URL && "SMTP_URL: must be set for `mailgent worker` alone: the embedded SMTP sink would keep every notice in this worker's DATA_DIR, recorded as sent",
  ].filter((problem): problem is string => Boolean(problem));
}

/**
 * The configuration from the environment. `parts`: the parts a service command runs, whose needs
 * (partProblems) are named with the variables' own problems: before, a bad value stopped the start
 * alone, and a variable the part needed was named only at the next start.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, parts?: readonly ('api' | 'worker')[]): Config {
  // An empty variable means "not set", as in most shells' `VAR= cmd`.
  const input = Object.fromEntries(
    Object.keys(schema.shape).flatMap((key) => (env[key] ? [[key, env[key]]] : [])),
  );
  const result = schema.safeParse(input);
  const problems = result.success
    ? []
    : result.error.issues.map((issue) => {
        const variable = String(issue.path[0]);
        // A list's problem names its entry, not the whole list once per bad entry.
        const entry = typeof issue.path[1] === 'number' ? commaList(String(input[variable]))[issue.path[1]] : undefined;
        const shown = SECRET_VARIABLES.has(variable) ? '' : entry !== undefined ? ` (got ${JSON.stringify(entry)})` : ` (got ${JSON.stringify(input[variable])})`;
        return `${variable}: ${issue.message}${shown}`;
      });
  problems.push(...(parts ? partProblems(input, parts) : []));
  if (!result.success || problems.length > 0) throw new ConfigError(problems);
  const parsed = result.data;
  return {
    ...parsed,
    dataDir: path.resolve(parsed.DATA_DIR),
    envFilesRoot: path.resolve(parsed.ENV_FILES_ROOT ?? path.join(parsed.DATA_DIR, 'env-files')),
    embedded: {
      postgres: !parsed.DATABASE_URL,
      temporal: !parsed.TEMPORAL_ADDRESS,
      smtp: !parsed.SMTP_URL,
    },
  };
}

function isExistingFile(value: string): boolean {
  try {
    return existsSync(value) && statSync(value).isFile();
  } catch {
    return false;
  }
}
