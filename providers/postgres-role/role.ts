import { createHash, createHmac, pbkdf2Sync, randomBytes, randomInt } from 'node:crypto';
import saslprep from '@mongodb-js/saslprep';
import pg from 'pg';
import { UnprocessableError } from '../../core/errors';
import { GuardedSocket, OutboundRefusedError } from '../../core/outbound';

/** PostgreSQL role operations. Every error they raise is built here, without the passwords in play. */

const CLASSES = ['ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz', '0123456789'];
/** Symbols a URL carries as they are (RFC 3986's unreserved): a password put in a connection string by hand needs no escaping. */
export const URL_SAFE_SYMBOLS = '-._~';

/**
 * A uniformly random password of upper- and lower-case letters and digits (and, with `symbols`,
 * URL_SAFE_SYMBOLS), with one of each at least: it meets any password policy of its length.
 */
export function randomPassword(length: number, symbols = false): string {
  const classes = symbols ? [...CLASSES, URL_SAFE_SYMBOLS] : CLASSES;
  const alphabet = classes.join('');
  const chars = Array.from({ length }, () => alphabet[randomInt(alphabet.length)]!);
  // Each class at a distinct random position (length is 16 at least: room for every class).
  const positions = [...Array(length).keys()];
  classes.forEach((cls, i) => {
    const j = i + randomInt(length - i);
    [positions[i], positions[j]] = [positions[j]!, positions[i]!];
    chars[positions[i]!] = cls[randomInt(cls.length)]!;
  });
  return chars.join('');
}

/** A postgres:// URL split into what we need; null when the text is not one. */
export function parsePostgresUrl(text: string): { url: URL; user: string; password: string } | null {
  try {
    const url = new URL(text);
    if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') return null;
    return { url, user: decodeURIComponent(url.username), password: decodeURIComponent(url.password) };
  } catch {
    return null;
  }
}

/**
 * The connection parameters an admin URL may carry: TLS (`sslmode`, or `ssl=true|false`), the
 * connect timeout, server options and how the session names itself. pg's own URL parser takes every
 * query parameter as a client option over the ones given beside it (`user` and `password` over the
 * URL's, `host` for a socket path, `stream`, timeouts), and reads the files `sslrootcert`, `sslcert`
 * and `sslkey` name, synchronously, as the client is made: an identity's admin URL with
 * `?sslrootcert=/dev/zero` held the worker's event loop until it died, `?user=admin&password=…` made
 * every "does the new password log in" check log in as the admin. So no URL reaches pg: the client
 * is configured from these alone (a private CA goes in the worker's NODE_EXTRA_CA_CERTS). What the
 * URL leaves out (TLS, port, database) is pg's default, as before: the worker's PGSSLMODE, PGPORT
 * and PGDATABASE, else no TLS, 5432 and the user's name.
 */
const SSL_MODES: Record<string, pg.ClientConfig['ssl']> = {
  disable: false,
  prefer: {},
  require: {},
  'verify-ca': {},
  'verify-full': {},
  'no-verify': { rejectUnauthorized: false },
};
const SSL_FLAGS: Record<string, boolean> = { true: true, '1': true, false: false, '0': false };
const URL_PARAMETERS = ['sslmode', 'ssl', 'connect_timeout', 'options', 'application_name'];
/** The longest a connection attempt waits (connect_timeout may shorten it). */
const CONNECT_TIMEOUT_MS = 10_000;

/** Why an admin URL is not one the provider connects with (never quoting it), or null. */
export function adminUrlProblem(admin: URL): string | null {
  for (const [key, value] of admin.searchParams) {
    if (!URL_PARAMETERS.includes(key)) {
      return `carries a connection parameter other than ${URL_PARAMETERS.join(', ')} (a CA for TLS goes in the worker's NODE_EXTRA_CA_CERTS)`;
    }
    if (key === 'sslmode' && !(value in SSL_MODES)) return `has an sslmode other than ${Object.keys(SSL_MODES).join(', ')}`;
    if (key === 'ssl' && !(value in SSL_FLAGS)) return 'has an ssl other than true, false, 1 or 0';
    if (key === 'connect_timeout' && !/^\d{1,6}$/.test(value)) return 'has a connect_timeout that is not a whole number of seconds';
  }
  if (!admin.username) return 'names no user';
  return null;
}

/**
 * The client configuration of `role` on the admin URL's server: host, port, database and the
 * parameters above from the URL, the login given. The password is handed over as a function, so an
 * empty one is sent as it is, never replaced by the worker's PGPASSWORD or ~/.pgpass.
 */
function clientConfig(admin: URL, role: string, password: string): pg.ClientConfig {
  const param = (key: string) => admin.searchParams.get(key);
  const sslmode = param('sslmode');
  const ssl = sslmode !== null ? SSL_MODES[sslmode] : param('ssl') !== null ? SSL_FLAGS[param('ssl')!] : undefined;
  const timeout = param('connect_timeout');
  const database = decodeURIComponent(admin.pathname.slice(1));
  return {
    host: decodeURIComponent(admin.hostname).replace(/^\[(.+)\]$/, '$1'),
    ...(admin.port ? { port: Number(admin.port) } : {}),
    ...(database ? { database } : {}),
    user: role,
    password: () => password,
    ...(ssl !== undefined ? { ssl } : {}),
    connectionTimeoutMillis: timeout && Number(timeout) > 0 ? Math.min(Number(timeout) * 1000, CONNECT_TIMEOUT_MS) : CONNECT_TIMEOUT_MS,
    ...(param('options') ? { options: param('options')! } : {}),
    ...(param('application_name') ? { application_name: param('application_name')! } : {}),
  };
}

/**
 * The value consumers get in `url` format: host, port, database and connection options (sslmode …)
 * of the admin URL; never its user or password, in the userinfo or the query.
 */
export function consumerUrl(admin: URL, role: string, password: string): string {
  const query = new URLSearchParams(admin.search);
  for (const key of ['user', 'password', 'passfile']) query.delete(key);
  const search = query.size ? `?${query}` : '';
  return `postgresql://${role}:${encodeURIComponent(password)}@${admin.host}${admin.pathname}${search}`;
}

/**
 * An Error whose message is `what: <cause>` with every given secret cut out of the cause. A refusal
 * of our own (UnprocessableError: built here, no secret in it) stays what it is, a permanent error.
 */
export function safeError(what: string, err: unknown, secrets: string[]): Error {
  if (err instanceof UnprocessableError) return err;
  let detail = err instanceof Error ? err.message : String(err);
  for (const s of secrets) if (s) detail = detail.split(s).join('[redacted]');
  return new Error(`${what}: ${detail}`);
}

/**
 * A connection for one operation. It goes through the outbound guard (core/outbound.ts), as the http
 * provider's requests do: an identity's admin URL must not make the worker log in to, or probe, this
 * machine or its private network unless OUTBOUND_ALLOW lists the host.
 */
async function withClient<T>(config: pg.ClientConfig, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ ...config, query_timeout: 30_000, stream: () => new GuardedSocket() });
  client.on('error', () => undefined); // a dropped idle connection must not crash the worker
  try {
    try {
      await client.connect();
    } catch (err) {
      const host = config.host || 'a Unix socket';
      if (err instanceof OutboundRefusedError) throw new UnprocessableError(`PostgreSQL at ${host}: ${err.message}`);
      throw err;
    }
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Logs in as `role` and runs SELECT 1. Throws pg's own error (code 28P01: wrong password). */
export async function login(admin: URL, role: string, password: string): Promise<void> {
  await withClient(clientConfig(admin, role, password), (c) => c.query('SELECT 1'));
}

export async function setPassword(admin: URL, role: string, password: string): Promise<void> {
  const adminPassword = decodeURIComponent(admin.password);
  try {
    // The server gives up first (statement_timeout, lock_timeout under it, for this transaction
    // alone: as startup parameters a pooler such as PgBouncer refuses them): at query_timeout alone
    // the client stopped waiting while an ALTER ROLE waiting on a lock could still commit later, after
    // the undo that followed had put the role back, leaving it on a password only an abandoned version holds.
    await withClient(clientConfig(admin, decodeURIComponent(admin.username), adminPassword), async (c) => {
      await c.query('BEGIN');
      await c.query("SET LOCAL statement_timeout = '20s'");
      await c.query("SET LOCAL lock_timeout = '15s'");
      await c.query(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD ${pg.escapeLiteral(storedForm(password))}`);
      await c.query('COMMIT');
    });
  } catch (err) {
    throw safeError(`setting the password of role "${role}" failed`, err, [password, adminPassword]);
  }
}

/**
 * ALTER ROLE cannot take a bind parameter, so the password is in the statement text, which the
 * server may log (log_statement, or the STATEMENT line of a failed command). Sending the SCRAM
 * verifier instead, as psql's \password does, keeps the plaintext off the server, whatever the
 * password: the verifier is of the password as PostgreSQL prepares it (saslPrepared). Before, a
 * password with a character outside ASCII went as plaintext.
 */
function storedForm(password: string): string {
  return scramVerifier(saslPrepared(password));
}

/**
 * The password as PostgreSQL's SCRAM prepares it (pg_saslprep, RFC 4013), so the verifier made
 * here is the one the server would make of the plaintext: ASCII as it is; otherwise non-ASCII spaces
 * mapped to a space and the characters "commonly mapped to nothing" dropped, then NFKC. A password
 * SASLprep prohibits (a prohibited or unassigned character, a bidirectional mix, nothing left after
 * the mapping) is used as given, as PostgreSQL does. (node-postgres prepares a password it logs in with
 * too, without the prohibitions.) (PostgreSQL checks for prohibited characters before NFKC, the library after: they differ
 * only for a character assigned after Unicode 3.2 whose NFKC form is another, which PostgreSQL then
 * takes as given and this prepares.)
 */
export function saslPrepared(password: string): string {
  // eslint-disable-next-line no-control-regex
  if (/^[\x00-\x7f]*$/.test(password)) return password;
  try {
    const prepared = saslprep(password);
    return prepared === '' ? password : prepared;
  } catch {
    return password;
  }
}

function scramVerifier(password: string, iterations = 4096): string {
  const salt = randomBytes(16);
  const salted = pbkdf2Sync(password, salt, iterations, 32, 'sha256');
  const storedKey = createHash('sha256').update(createHmac('sha256', salted).update('Client Key').digest()).digest();
  const serverKey = createHmac('sha256', salted).update('Server Key').digest();
  return `SCRAM-SHA-256$${iterations}:${salt.toString('base64')}$${storedKey.toString('base64')}:${serverKey.toString('base64')}`;
}
