import { createHash } from 'node:crypto';
import { KINDS } from '../../vault/types';
import { EXIT, unexpectedArgument, usageError } from './errors';
import { ADMIN_TOKEN_OPTION, adminToken, Api, baseUrl, idempotencyKeyOption, identityToken, Out, parse, sendKeyed, TOKEN_OPTION } from './context';
import { readSecret } from './secret-input';
import { chainReport, identityCreated, leakResults, secretRead, storedVersion, totpCode } from './answers';
import { table } from './render';
import { rotate } from './rotate';
import { isUuid } from '../../core/ids';

/** A command of the `mailgent` CLI that talks to the HTTP API. */
export interface ClientCommand {
  summary: string;
  usage: string;
  run(args: string[]): Promise<number>;
}

const CONNECTION = `Connection: --url or MAILGENT_URL (default http://127.0.0.1:8080).`;
const IDENTITY = `${CONNECTION}
Identity: --token or MAILGENT_TOKEN (prefer the variable: argv is visible in ps).`;
const ADMIN = `${CONNECTION}
Admin token: --admin-token, MAILGENT_ADMIN_TOKEN, ADMIN_TOKEN, or the file DATA_DIR/admin-token
(DATA_DIR defaults to .data) that \`mailgent serve\` generates.`;
const JSON_NOTE = `--json prints one JSON document on stdout: the result, or the problem details of an error.`;

const refOf = (ref: string) => (isUuid(ref) ? { id: ref } : { name: ref });

function positionals(got: string[], names: string[], usage: string): string[] {
  if (got.length < names.length) throw usageError(`missing ${names.slice(got.length).map((n) => `<${n}>`).join(' ')}`, usage);
  if (got.length > names.length) throw unexpectedArgument(names.length + 1, usage);
  return got;
}

function wholeNumber(flag: string, raw: string | undefined, usage: string, min = 0): number | undefined {
  if (raw === undefined) return undefined;
  if (!/^\d+$/.test(raw) || Number(raw) < min) throw usageError(`--${flag} must be a whole number${min ? ` ≥ ${min}` : ''}`, usage);
  return Number(raw);
}

function jsonFlag(flag: string, raw: string | undefined, usage: string): Record<string, unknown> | undefined {
  if (raw === undefined) return undefined;
  try {
    const value = JSON.parse(raw);
    if (value && typeof value === 'object' && !Array.isArray(value)) return value;
  } catch {
    // fall through
  }
  throw usageError(`--${flag} must be a JSON object`, usage);
}

const identitiesUsage = `Usage: mailgent identities create <name> [--email <address>] [--json]
       mailgent identities token <name|id> [--json]

create makes an identity (an agent or a team) and prints its bearer token on stdout. token issues an
identity a new token in place of its old one (lost, or leaked), which stops working (within 5 s on
every API process), and prints it. A token is shown only this once; the service keeps its hash.

${ADMIN}
${JSON_NOTE}`;

const identities: ClientCommand = {
  summary: 'identities create <name> | token <name|id>   make an identity, or issue it a new token; prints the token once (admin)',
  usage: identitiesUsage,
  async run(args) {
    const { values, positionals: pos } = parse(args, { ...ADMIN_TOKEN_OPTION, email: { type: 'string' } }, identitiesUsage);
    if (pos[0] !== 'create' && pos[0] !== 'token') throw usageError(pos[0] ? `unknown subcommand '${pos[0]}'` : 'missing subcommand: create or token', identitiesUsage);
    const [subcommand, name] = positionals(pos, ['subcommand', pos[0] === 'token' ? 'name or id' : 'name'], identitiesUsage);
    if (subcommand === 'token' && values.email !== undefined) throw usageError('--email is for create', identitiesUsage);
    const api = new Api(baseUrl(values.url), adminToken(values['admin-token']));
    const made =
      subcommand === 'create'
        ? await api.call('POST', '/v1/identities', identityCreated, { name, ...(values.email ? { email: values.email } : {}) })
        : await api.call('POST', `/v1/identities/${encodeURIComponent(name!)}/token`, identityCreated);
    const out = new Out(values.json);
    out.result(made, () => {
      out.note(
        subcommand === 'create'
          ? `created identity ${made.name} (id ${made.id}); its token follows, shown only this once:`
          : `issued identity ${made.name} (id ${made.id}) a new token; its old one no longer works. The new one follows, shown only this once:`,
      );
      out.line(made.token);
    });
    return EXIT.ok;
  },
};

const storeUsage = `Usage: mailgent store <name> [--kind <kind>] [value source] [policy] [--json]

Stores a new version of a credential. The value is never taken from an argument (argv is visible
in ps); it comes from, in order:
  --value-file <path>     a file ('-' for stdin)
  --value-env <NAME>      an environment variable
  stdin                   when it is not a terminal (echo ... | mailgent store ...)
  a prompt                that does not echo, on a terminal
One trailing newline is dropped. A totp_seed value is an otpauth:// URI or a base32 secret.

Options:
  --kind <kind>              ${KINDS.join(' | ')} (default generic)
  --owner <email>            an owner who gets the notices (repeatable)
  --notify <email>           another address for the notices (repeatable)
  --tag <tag>                (repeatable)
  --service <name>           what the credential is for
  --policy <json>            more policy fields as a JSON object: rotation, dependents, metadata,
                             expiresAt (see the README)
  --expected-version <n>     refuse (exit 1) unless the credential is at version n (0 = new)
  --external-id <id>         the provider's id of this value
  --digits, --period, --algorithm   TOTP parameters for a base32 secret

${IDENTITY}
${JSON_NOTE}`;

/** The store flags that set a policy field, and that field. */
const POLICY_FLAGS = [
  ['owner', 'owners'],
  ['notify', 'notify'],
  ['tag', 'tags'],
  ['service', 'service'],
] as const;

const store: ClientCommand = {
  summary: 'store <name>               store a new version (value from stdin, a file, a variable or a prompt)',
  usage: storeUsage,
  async run(args) {
    const { values, positionals: pos } = parse(
      args,
      {
        ...TOKEN_OPTION,
        kind: { type: 'string', default: 'generic' },
        'value-file': { type: 'string' },
        'value-env': { type: 'string' },
        owner: { type: 'string', multiple: true },
        notify: { type: 'string', multiple: true },
        tag: { type: 'string', multiple: true },
        service: { type: 'string' },
        policy: { type: 'string' },
        'expected-version': { type: 'string' },
        'external-id': { type: 'string' },
        digits: { type: 'string' },
        period: { type: 'string' },
        algorithm: { type: 'string' },
      },
      storeUsage,
    );
    const [name] = positionals(pos, ['name'], storeUsage);
    const kind = values.kind;
    if (!(KINDS as readonly string[]).includes(kind)) throw usageError(`--kind must be one of ${KINDS.join(', ')}`, storeUsage);
    const totpFlags = values.digits ?? values.period ?? values.algorithm;
    if (totpFlags !== undefined && kind !== 'totp_seed') throw usageError('--digits, --period and --algorithm are for --kind totp_seed', storeUsage);
    const policy = jsonFlag('policy', values.policy, storeUsage) ?? {};
    // What the arguments and flags say is not to be overridden unseen by a field of --policy.
    const taken = ['name', 'kind', 'value', 'totp', 'expectedVersion', 'externalId'].filter((k) => Object.hasOwn(policy, k));
    if (taken.length) throw usageError(`--policy must not set ${taken.join(', ')}: give the name as the argument, the value from a source, and the rest as flags`, storeUsage);
    // Nor does a flag quietly replace the same field of --policy: one of the two would be lost unseen.
    const twice = POLICY_FLAGS.filter(([flag, field]) => values[flag] !== undefined && Object.hasOwn(policy, field));
    if (twice.length) throw usageError(`${twice.map(([flag, field]) => `--${flag} and --policy's "${field}"`).join(', ')} set the same field: give it once`, storeUsage);
    const expectedVersion = wholeNumber('expected-version', values['expected-version'], storeUsage);
    const digits = wholeNumber('digits', values.digits, storeUsage);
    const period = wholeNumber('period', values.period, storeUsage, 1);
    const api = new Api(baseUrl(values.url), identityToken(values.token));

    const value = await readSecret({ file: values['value-file'], envName: values['value-env'], what: `Value of ${name}` });
    // The URI carries its own parameters; flags that would be dropped unseen are refused instead.
    if (totpFlags !== undefined && value.startsWith('otpauth://')) {
      throw usageError('--digits, --period and --algorithm are for a base32 secret; an otpauth:// URI sets its own (digits=, period=, algorithm= in the URI)', storeUsage);
    }
    const secret =
      kind !== 'totp_seed'
        ? { value }
        : value.startsWith('otpauth://')
          ? { totp: { otpauthUri: value } }
          : {
              totp: {
                secret: value,
                ...(values.algorithm ? { algorithm: values.algorithm.toUpperCase() } : {}),
                ...(digits !== undefined ? { digits } : {}),
                ...(period !== undefined ? { period } : {}),
              },
            };
    const stored = await api.call('POST', '/v1/vault.store', storedVersion, {
      name,
      kind,
      ...secret,
      ...policy,
      ...(values.owner ? { owners: values.owner } : {}),
      ...(values.notify ? { notify: values.notify } : {}),
      ...(values.tag ? { tags: values.tag } : {}),
      ...(values.service ? { service: values.service } : {}),
      ...(expectedVersion !== undefined ? { expectedVersion } : {}),
      ...(values['external-id'] ? { externalId: values['external-id'] } : {}),
    });
    const out = new Out(values.json);
    out.result(stored, () => out.line(`stored ${stored.name} version ${stored.version} (id ${stored.id})`));
    return EXIT.ok;
  },
};

const getUsage = `Usage: mailgent get <name|id> [--version <n>] [--json]

Prints the credential's value on stdout (a TOTP seed as its otpauth:// URI) and, for people, what
it is on stderr. Every read is written to the audit log. With --json: the API's answer
{id, name, kind, version, label, value, createdAt, ageDays}; the value appears only in "value".

${IDENTITY}`;

const get: ClientCommand = {
  summary: 'get <name|id>              print a value (audited)',
  usage: getUsage,
  async run(args) {
    const { values, positionals: pos } = parse(args, { ...TOKEN_OPTION, version: { type: 'string' } }, getUsage);
    const [ref] = positionals(pos, ['name|id'], getUsage);
    const version = wholeNumber('version', values.version, getUsage, 1);
    const api = new Api(baseUrl(values.url), identityToken(values.token));
    const got = await api.call('POST', '/v1/vault.get', secretRead, { ...refOf(ref!), ...(version ? { version } : {}) });
    const out = new Out(values.json);
    out.result(got, () => {
      out.note(`${got.name} version ${got.version}${got.label ? ` (${got.label})` : ''}, ${got.kind}, ${got.ageDays} days old`);
      out.line(got.value);
    });
    return EXIT.ok;
  },
};

const totpUsage = `Usage: mailgent totp <name|id> [--json]

Prints the current code of a stored TOTP seed. With --json: {code, period, digits, expiresInSeconds}.

${IDENTITY}`;

const totp: ClientCommand = {
  summary: 'totp <name|id>             print the current 2FA code of a stored seed',
  usage: totpUsage,
  async run(args) {
    const { values, positionals: pos } = parse(args, { ...TOKEN_OPTION }, totpUsage);
    const [ref] = positionals(pos, ['name|id'], totpUsage);
    const api = new Api(baseUrl(values.url), identityToken(values.token));
    const code = await api.call('POST', '/v1/vault.totp', totpCode, refOf(ref!));
    const out = new Out(values.json);
    out.result(code, () => {
      out.note(`valid for ${code.expiresInSeconds} more seconds`);
      out.line(code.code);
    });
    return EXIT.ok;
  },
};

const leakUsage = `Usage: mailgent leak <name|id> [--version <n>] [--source <who>] [--details <text>] [--json]
       mailgent leak --fingerprint <sha256 hex> ...
       mailgent leak --value-file <path|-> ...

Reports a leaked credential: the security contacts and owners are told and it is rotated at once,
without a grace period. Name it, or give the SHA-256 of the leaked value (--fingerprint), or let the
CLI compute that hash from the value (--value-file; the value itself is never sent). Each matched
version is answered rotating, joined (a report of it is being answered), already-revoked, deleted or
no-policy (a deleted credential, or one without a rotation policy, is not rotated: the security
contacts and owners are told to revoke it by hand).

Options:
  --version <n>     the version of <name|id> that leaked (default: its current one)
  --source <who>    who found it (default mailgent-cli)
  --details <text>  what happened (must not contain the value)
  --admin           report with the admin token (any identity's credentials); --admin-token implies it
  --idempotency-key <key>
                    the report's Idempotency-Key (default: a new one). The report is sent up to
                    three times when its answer is lost or the API answers 503; if it still fails
                    after an answer was lost, the key is printed: run again with it to get the
                    report's answer instead of reporting again

${IDENTITY}
With --admin, the admin token: --admin-token, MAILGENT_ADMIN_TOKEN, ADMIN_TOKEN or DATA_DIR/admin-token.
${JSON_NOTE}`;

const leak: ClientCommand = {
  summary: 'leak <name|id>             report a leak: notify and rotate at once',
  usage: leakUsage,
  async run(args) {
    const { values, positionals: pos } = parse(
      args,
      {
        ...TOKEN_OPTION,
        ...ADMIN_TOKEN_OPTION,
        admin: { type: 'boolean', default: false },
        version: { type: 'string' },
        fingerprint: { type: 'string' },
        'value-file': { type: 'string' },
        source: { type: 'string', default: 'mailgent-cli' },
        details: { type: 'string' },
        'idempotency-key': { type: 'string' },
      },
      leakUsage,
    );
    const key = idempotencyKeyOption(values['idempotency-key'], leakUsage);
    const ways = [pos.length > 0, values.fingerprint !== undefined, values['value-file'] !== undefined].filter(Boolean).length;
    if (ways !== 1) throw usageError('name the credential, or give --fingerprint or --value-file (exactly one)', leakUsage);
    // An empty one (an unset shell variable) must not fall through to reading the value from stdin.
    if (pos[0] === '' || values.fingerprint === '' || values['value-file'] === '') throw usageError('the credential, --fingerprint or --value-file is empty', leakUsage);
    if (pos.length > 1) throw unexpectedArgument(2, leakUsage);
    const version = wholeNumber('version', values.version, leakUsage, 1);
    if (version !== undefined && !pos[0]) throw usageError('--version goes with a credential named (a fingerprint names its version itself)', leakUsage);
    // As for the admin commands, an admin token given is the one used (before, without --admin it
    // was dropped unseen and the report went out as MAILGENT_TOKEN's identity); a --token beside it
    // would be dropped in its turn, so the two are refused together.
    const asAdmin = values.admin || values['admin-token'] !== undefined;
    if (asAdmin && values.token !== undefined) throw usageError('give --token, or --admin/--admin-token to report with the admin token, not both', leakUsage);
    const token = asAdmin ? adminToken(values['admin-token']) : identityToken(values.token);
    const api = new Api(baseUrl(values.url), token);
    let target: { credential: string; version?: number } | { fingerprint: string };
    if (pos[0]) target = { credential: pos[0], ...(version !== undefined ? { version } : {}) };
    else if (values.fingerprint) target = { fingerprint: values.fingerprint };
    else target = { fingerprint: createHash('sha256').update(await readSecret({ file: values['value-file'], what: 'Leaked value' })).digest('hex') };
    const reported = await sendKeyed(api, '/v1/leaks', leakResults, { ...target, source: values.source, ...(values.details ? { details: values.details } : {}) }, key, {
      sent: 'the report',
      made: 'its answer instead of reporting again (by name, a report again would name the new value its rotation made)',
    });
    const out = new Out(values.json);
    out.result(reported, () => {
      out.line(
        table(
          ['CREDENTIAL', 'VERSION', 'ACTION', 'WORKFLOW'],
          reported.results.map((r) => [r.credentialId, String(r.version), r.action, r.workflowId ?? '']),
        ),
      );
    });
    return EXIT.ok;
  },
};

const auditUsage = `Usage: mailgent audit verify [--head SEQ:HASH] [--json]

Recomputes the audit log's hash chain. Exit 0 when it is intact; exit 1 when a row was edited or
removed (the first broken row is named). It prints the chain's head (its newest row's seq and
hash): keep it outside the database, and check a later verify against it with --head, which also
tells a rewrite whose hashes were recomputed, or a log cut back past it.
With --json: {ok, rows, firstBroken?: {seq, reason}, head?: {seq, hash}}.

${ADMIN}`;

const audit: ClientCommand = {
  summary: 'audit verify               check the audit log hash chain (admin)',
  usage: auditUsage,
  async run(args) {
    const { values, positionals: pos } = parse(args, { ...ADMIN_TOKEN_OPTION, head: { type: 'string' } }, auditUsage);
    if (pos[0] !== 'verify') throw usageError(pos[0] ? `unknown subcommand '${pos[0]}'` : 'missing subcommand: verify', auditUsage);
    positionals(pos, ['subcommand'], auditUsage);
    const api = new Api(baseUrl(values.url), adminToken(values['admin-token']));
    const report = await api.call('GET', `/v1/audit/verify${values.head === undefined ? '' : `?head=${encodeURIComponent(values.head)}`}`, chainReport);
    const out = new Out(values.json);
    out.result(report, () =>
      out.line(
        report.ok
          ? `audit chain intact: ${report.rows} rows${report.head ? `; head ${report.head.seq}:${report.head.hash}` : ''}`
          : `audit chain BROKEN at row ${report.firstBroken!.seq}: ${report.firstBroken!.reason} (${report.rows} rows intact before it)`,
      ),
    );
    return report.ok ? EXIT.ok : EXIT.failed;
  },
};

export const clientCommands: Record<string, ClientCommand> = { identities, store, get, totp, rotate, leak, audit };
