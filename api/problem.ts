import type { ErrorRequestHandler, Response } from 'express';
import { AppError, KeyIntegrityError, refWithheld, MethodNotAllowedError, TooManyRequestsError, unconfirmedChange, UnavailableError, ValidationError, type FieldError } from '../core/errors';
import type { Logger } from '../core/logger';
import { isCommitUnconfirmed, isDatabaseUnavailable } from '../db/pool';
import { shownPath } from './access-log';

/** RFC 9457 problem details: the one place errors become HTTP responses. */
export const PROBLEM_BASE = 'https://mailgent.dev/problems/';

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  instance?: string;
  requestId?: string;
  errors?: FieldError[];
  [extra: string]: unknown;
}

/** Maps any thrown value to an AppError; unknown errors become a 500 that says nothing internal. */
export function toAppError(err: unknown): AppError {
  if (err instanceof AppError) return err;
  const e = err as { code?: string; message?: string; type?: string; status?: number };
  if (e?.type === 'entity.parse.failed') return new AppError(400, 'malformed-json', 'Malformed JSON', 'the request body is not valid JSON');
  if (e?.type === 'entity.too.large') return new AppError(413, 'payload-too-large', 'Request too large', 'the request body is larger than 256 KiB');
  if (e?.type === 'encoding.unsupported' || e?.type === 'charset.unsupported') {
    return new AppError(415, 'unsupported-media-type', 'Unsupported media type', 'the request body must be UTF-8 JSON');
  }
  // A path whose percent-encoding does not decode (the router decodes it while matching, before any
  // handler): said as such. Any other client error of a library's: the type's one title either way.
  // (Its path withheld, shown as the service's 404 shows one: a password with a % in it pasted into the path does not decode.)
  if (err instanceof URIError && e.status === 400) return refWithheld(new ValidationError('the request path is not valid percent-encoding'));
  if (e?.status && e.status >= 400 && e.status < 500) return new ValidationError('the request could not be read');
  // A COMMIT sent and not answered (a route's own transaction: mail.send, a rotation's start, a leak
  // report …): it may be durable, so not "try again" (README, "unconfirmed").
  if (isCommitUnconfirmed(err)) {
    return unconfirmedChange('the request could not be confirmed: it may have been carried out before the database connection failed; check its result before trying again');
  }
  if (isDatabaseUnavailable(err)) {
    return new UnavailableError('the database is unavailable; try again shortly');
  }
  return new AppError(500, 'internal', 'Internal error', 'the server failed to handle this request; the request id identifies it in the logs');
}

export function problemOf(err: AppError, instance?: string, requestId?: string): Problem {
  return {
    type: PROBLEM_BASE + err.slug,
    title: err.title,
    status: err.status,
    // Key and master key ids are for the operator's log, not for callers.
    detail: err instanceof KeyIntegrityError ? KeyIntegrityError.PUBLIC_DETAIL : err.message,
    ...(instance ? { instance } : {}),
    ...(requestId ? { requestId } : {}),
    ...err.extra,
  };
}

export function sendProblem(res: Response, err: AppError): void {
  // The path as the request log shows it (a route's pattern where it has parameters; segments no
  // route has shown as …), never as sent: a value pasted where a reference goes is not echoed, by
  // the lookup's 404 (refWithheld) nor by any error before the lookup (401, 403, 400, 413, 415, 429).
  const problem = problemOf(err, shownPath(res.req), res.locals.requestId);
  if (err.status === 401) res.setHeader('WWW-Authenticate', 'Bearer realm="mailgent"');
  // (Not on a change that may have been carried out, `unconfirmed`: a client or proxy honouring Retry-After would repeat it.)
  if (err.status === 503 && err.extra.unconfirmed !== true) res.setHeader('Retry-After', '5');
  if (err instanceof TooManyRequestsError) res.setHeader('Retry-After', String(err.retryAfterSeconds));
  if (err instanceof MethodNotAllowedError) res.setHeader('Allow', err.allow.join(', '));
  res.status(err.status).type('application/problem+json').send(JSON.stringify(problem));
}

/** How long a server error's answer waits for its audit row. */
export const AUDIT_WAIT_MS = 3_000;

export function problemHandler(logger: Logger, audit: (res: Response, err: AppError, original: unknown) => Promise<void>): ErrorRequestHandler {
  return async (err, _req, res, _next) => {
    const appErr = toAppError(err);
    if (appErr.status >= 500) logger.error({ err, requestId: res.locals.requestId }, 'request failed');
    // The error's audit row is awaited; a server error's not past AUDIT_WAIT_MS: a database that
    // stopped answering (the usual cause of a 503) must not hold the answer too. The row is still
    // written if the database answers later; a failure to is logged. (No value is in an error.)
    const audited = audit(res, appErr, err).catch((auditErr) => logger.error({ err: auditErr, requestId: res.locals.requestId }, 'could not audit a failed request'));
    if (appErr.status < 500) {
      await audited; // a refusal is answered once its row is in
    } else {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([audited, new Promise((resolve) => (timer = setTimeout(resolve, AUDIT_WAIT_MS)))]);
      clearTimeout(timer);
    }
    if (res.headersSent) return;
    sendProblem(res, appErr);
  };
}
