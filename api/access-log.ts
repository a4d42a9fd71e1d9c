import type { Request, RequestHandler } from 'express';
import type { Logger } from '../core/logger';

/**
 * One line per request once it is answered: method, path (never the query string), status, time
 * taken, request id and identity; never headers (tokens) or bodies (values). Server errors are
 * logged at error level (the problem handler logs their cause), requests the client abandoned at
 * warn, the rest at info. A request that failed on a route with parameters shows the route's pattern
 * (`/v1/credentials/:ref`), not its path: a parameter that found nothing, or was refused before it
 * was looked up, is the caller's text unvetted, and may be a secret pasted where a name goes
 * (vault/withheld.ts). Its request id finds its audit row, which says what was tried.
 *
 * The line is built only if its level is enabled. pino-http, used before, made two child loggers
 * per request whatever the level, each serialising and redacting its bindings: about 15% of the
 * API's CPU per request, and short-lived objects that lived just long enough to be promoted, so
 * the old generation filled and was collected several times a second under load.
 */
export function accessLog(logger: Logger): RequestHandler {
  return (req, res, next) => {
    const started = performance.now();
    const done = () => {
      res.off('finish', done);
      res.off('close', done);
      const status = res.statusCode;
      const level = status >= 500 ? 'error' : res.writableFinished ? 'info' : 'warn';
      if (!logger.isLevelEnabled(level)) return;
      logger[level](
        {
          // (Its path as sent only once answered below 400: before, a request the client abandoned,
          // its status still the default 200, logged the caller's text, a value pasted into the path included.)
          req: { id: res.locals.requestId, method: req.method, path: res.writableFinished && status < 400 ? req.originalUrl.split('?')[0] : shownPath(req) },
          res: { statusCode: status },
          responseTime: Math.round(performance.now() - started),
          identity: res.locals.identity?.id,
        },
        level === 'warn' ? 'request aborted' : 'request completed',
      );
    };
    res.on('finish', done);
    res.on('close', done);
    next();
  };
}

/**
 * A failed request's path as the service shows it (the request log; a problem whose reference was
 * withheld, as its `instance`): the pattern of the route it matched, its parameters left out, or
 * the path as sent when the route has none, or when it matched none and the app named no pattern
 * for it (the service's 404 names the path with the segments no route has as …: api/app.ts).
 */
export function shownPath(req: Request): string {
  const pattern: unknown = req.route?.path;
  if (typeof pattern === 'string' && pattern.includes(':')) return req.baseUrl + pattern;
  // A method no route at the path answers: the pattern of one that matched it (api/app.ts, otherMethods).
  const other: unknown = req.res?.locals.routePattern;
  if (typeof other === 'string') return other;
  // A route without parameters: its path is the route's own text.
  if (req.route) return req.originalUrl.split('?')[0]!;
  // None matched yet (a path whose percent-encoding failed while matching, a request abandoned
  // before its route ran): the segments no route has shown as …, as the service's 404 shows them.
  const mask: unknown = req.app?.locals.maskPath;
  return typeof mask === 'function' ? (mask as (path: string) => string)(req.path) : '…';
}
