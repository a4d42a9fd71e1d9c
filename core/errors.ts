/**
 * The few kinds of failure the service reports. Each maps to one RFC 9457 problem type in
 * api/problem.ts. Messages are written for the caller and never carry a secret value.
 */
export type ProblemSlug =
  | 'validation-failed'
  | 'malformed-json'
  | 'unsupported-media-type'
  | 'payload-too-large'
  | 'unauthorized'
  | 'forbidden'
  | 'not-found'
  | 'method-not-allowed'
  | 'version-conflict'
  | 'conflict'
  | 'secret-in-message'
  | 'idempotency-key-reused'
  | 'unprocessable'
  | 'integrity-failure'
  | 'too-many-requests'
  | 'request-header-too-large'
  | 'malformed-request'
  | 'unavailable'
  | 'audit-unavailable'
  | 'internal';

export interface FieldError {
  path: string;
  message: string;
}

export class AppError extends Error {
  constructor(
    readonly status: number,
    readonly slug: ProblemSlug,
    readonly title: string,
    detail: string,
    readonly extra: Record<string, unknown> = {},
  ) {
    super(detail);
    this.name = new.target.name;
  }
}

/**
 * Marks an error whose request gave a reference (a credential's name or id, in a path or a body) that
 * was withheld: a value the vault stores (vault/withheld.ts), or a path segment that names no
 * credential there could be. The error's message does not repeat it, and the API shows the route's
 * pattern (`/v1/credentials/:ref`) in place of the request's path, in the problem's `instance` and
 * in the request log. An own field, so it crosses from the vault thread with the error.
 */
export function refWithheld<E extends AppError>(err: E): E {
  return Object.assign(err, { refWithheld: true });
}

export function isRefWithheld(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { refWithheld?: unknown }).refWithheld === true;
}

/**
 * What an answer says in place of a reference it withholds because it is a stored value: why, and
 * what to give instead (`instead`: a credential's name or id, unless said otherwise).
 */
export function storedValueGiven(instead = "a credential's name or id"): string {
  return `it is a value stored in the vault, so it is neither repeated here nor written to the audit log: give ${instead}, never a value`;
}

export class ValidationError extends AppError {
  constructor(detail: string, readonly errors: FieldError[] = []) {
    super(400, 'validation-failed', 'The request is not valid', detail, { errors });
  }
}

export class NotFoundError extends AppError {
  constructor(detail: string) {
    super(404, 'not-found', 'Not found', detail);
  }
}

/** A path that exists, asked with a method none of its routes answers (the Allow header lists those that do). */
export class MethodNotAllowedError extends AppError {
  constructor(
    method: string,
    path: string,
    readonly allow: string[],
  ) {
    super(405, 'method-not-allowed', 'Method not allowed', `${path} does not answer ${method}; it answers ${allow.join(', ')}`);
  }
}

export class VersionConflictError extends AppError {
  constructor(detail: string, currentVersion: number | null) {
    super(409, 'version-conflict', 'Version conflict', detail, { currentVersion });
  }
}

export class ConflictError extends AppError {
  constructor(detail: string) {
    super(409, 'conflict', 'Conflict', detail);
  }
}

export class UnprocessableError extends AppError {
  constructor(detail: string, slug: ProblemSlug = 'unprocessable', title = 'The request cannot be carried out') {
    super(422, slug, title, detail);
  }
}

/** A ciphertext failed authentication: tampered, truncated, or moved to another row. */
export class IntegrityError extends AppError {
  constructor(detail: string) {
    super(500, 'integrity-failure', 'Stored data failed its integrity check', detail);
  }
}

/**
 * A key the vault needs (a data key, a service key) is missing, cannot be opened or failed its
 * integrity check. Its message names key ids and master key ids: for the operator (the log, the
 * `mailgent` commands). An API caller gets PUBLIC_DETAIL instead, and the request id.
 */
export class KeyIntegrityError extends IntegrityError {
  static readonly PUBLIC_DETAIL = "a key the vault needs for this request failed its integrity check; the request id identifies it in the server's log";
}

export class UnavailableError extends AppError {
  constructor(detail: string, extra: Record<string, unknown> = {}) {
    super(503, 'unavailable', 'Service unavailable', detail, extra);
  }
}

/**
 * A change whose COMMIT was sent but not confirmed: it may be durable. Still a 503, but its problem
 * says `unconfirmed: true`, so a client (the CLI's exit 1, not 4) checks before repeating it.
 */
export function unconfirmedChange(detail: string): UnavailableError {
  return new UnavailableError(detail, { unconfirmed: true });
}

/**
 * The audit row of an action could not be written. The action is rolled back and nothing it
 * produced (a secret above all) is returned: the vault fails closed rather than answer unaudited.
 */
export class AuditUnavailableError extends AppError {
  constructor() {
    super(503, 'audit-unavailable', 'Audit log unavailable', 'the audit log could not be written, so the request was not carried out; try again shortly');
  }
}

/** A client that failed authentication too often in the current window. */
export class TooManyRequestsError extends AppError {
  constructor(readonly retryAfterSeconds: number) {
    super(429, 'too-many-requests', 'Too many failed authentications', `too many requests with an invalid token from this client; try again in ${retryAfterSeconds} s`);
  }
}
