import { createHash, createHmac, pbkdf2Sync, randomBytes, randomInt } from 'node:crypto';
import pg from 'pg';
import { UnprocessableError } from '../../core/errors';
import { GuardedSocket, OutboundRefusedError } from '../../core/outbound';

/** PostgreSQL role operations. Every error they raise is built here, without the passwords in play. */

const ALPHANUMERIC = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

export function randomPassword(length: number): string {
  return Array.from({ length }, () => ALPHANUMERIC[randomInt(ALPHANUMERIC.length)]!).join('');
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

/** The admin URL with another role's login: same host, port, database and options. */
function loginUrl(admin: URL, role: string, password: string): string {
  const url = new URL(admin.href);
  url.username = role;
  url.password = encodeURIComponent(password);
  return url.href;
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
async function withClient<T>(connectionString: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString, connectionTimeoutMillis: 10_000, query_timeout: 30_000, stream: () => new GuardedSocket() });
  client.on('error', () => undefined); // a dropped idle connection must not crash the worker
  try {
    try {
      await client.connect();
    } catch (err) {
      const host = new URL(connectionString).hostname || 'a Unix socket';
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
  await withClient(loginUrl(admin, role, password), (c) => c.query('SELECT 1'));
}

export async function setPassword(admin: URL, role: string, password: string): Promise<void> {
  const adminPassword = decodeURIComponent(admin.password);
  try {
    await withClient(admin.href, (c) => c.query(`ALTER ROLE ${pg.escapeIdentifier(role)} PASSWORD ${pg.escapeLiteral(storedForm(password))}`));
  } catch (err) {
    throw safeError(`setting the password of role "${role}" failed`, err, [password, adminPassword]);
  }
}

/**
 * ALTER ROLE cannot take a bind parameter, so the password is in the statement text, which the
 * server may log (log_statement, or the STATEMENT line of a failed command). Sending the SCRAM
 * verifier instead, as psql's \password does, keeps the plaintext off the server. SASLprep leaves
 * ASCII unchanged; anything else goes as is for the server to normalise.
 */
function storedForm(password: string): string {
  // eslint-disable-next-line no-control-regex
  return /^[\x00-\x7f]*$/.test(password) ? scramVerifier(password) : password;
}

function scramVerifier(password: string, iterations = 4096): string {
  const salt = randomBytes(16);
  const salted = pbkdf2Sync(password, salt, iterations, 32, 'sha256');
  const storedKey = createHash('sha256').update(createHmac('sha256', salted).update('Client Key').digest()).digest();
  const serverKey = createHmac('sha256', salted).update('Server Key').digest();
  return `SCRAM-SHA-256$${iterations}:${salt.toString('base64')}$${storedKey.toString('base64')}:${serverKey.toString('base64')}`;
}
