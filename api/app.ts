import { randomUUID } from 'node:crypto';
import express, { type Express, type RequestHandler, Router } from 'express';
import helmet from 'helmet';
import type { Client } from '@temporalio/client';
import type { DataConverter } from '@temporalio/common';
import { AppError, MethodNotAllowedError, NotFoundError, refWithheld } from '../core/errors';
import type { Logger } from '../core/logger';
import type { Pool } from '../db/pool';
import { appendAudit, errorDetail, isAudited, outcomeOf } from '../vault/audit';
import { hashToken, type Identities } from '../vault/identities';
import type { ReadThread } from '../vault/read-thread';
import type { Vault } from '../vault/vault';
import { accessLog } from './access-log';
import { AuthGuard, type AuthGuardLimits } from './auth-guard';
import type { AuthDeps } from './endpoint';
import { createMetrics } from './metrics';
import { documented, openApiDocument } from './openapi';
import { problemHandler } from './problem';
import type { Dependent } from '../dependents/types';
import type { Grants } from '../vault/grants';
import type { SecretStore } from '../vault/secret-store';
import { auditRoutes } from './routes/audit';
import { codecRoutes } from './routes/codec';
import { grantRoutes } from './routes/grants';
import { leakRoutes } from './routes/leaks';
import { policyRoutes } from './routes/policies';
import { healthRoutes } from './routes/health';
import { identityRoutes } from './routes/identities';
import { mailRoutes } from './routes/mail';
import { mcpRoutes } from './routes/mcp';
import { rotationRoutes } from './routes/rotations';
import { vaultRoutes } from './routes/vault';

export interface ApiDeps {
  pool: Pool;
  vault: Vault;
  identities: Identities;
  grants: Grants;
  secrets: SecretStore;
  /** Dependent types this deployment runs, for validating settings when a credential is stored. */
  dependentTypes: Record<string, Dependent<any>>;
  securityNotify?: string[];
  orphanDays?: number;
  clock?: () => Date;
  client: Client;
  namespace: string;
  taskQueue: string;
  /** Encrypts Temporal payloads; the codec server (/codec) decodes them for operators. */
  dataConverter: DataConverter;
  /** Browser origins (the Temporal Web UI) allowed to call the codec server. */
  codecCorsOrigins?: string[];
  adminToken: string;
  logger: Logger;
  /** Invalid bearer tokens a client may present per window before it gets 429s. */
  authFailures?: AuthGuardLimits;
  /** The vault thread, when the primitives run in one (READ_THREAD): /readyz checks it. */
  readThread?: ReadThread;
}

export const DEFAULT_AUTH_FAILURES: AuthGuardLimits = { maxFailures: 50, windowMs: 5 * 60_000 };

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/**
 * The route modules' routes, in their order, in one router. Each module builds a Router of its own;
 * mounted one by one at '/', every router a request passed was entered and left (its mount path
 * matched, the request's URL trimmed and restored, closures made). Under vault.get the API allocated
 * ~50 KB a request, ~14 KB of it in the router package; in one router ~46 KB. In paired runs
 * (bench:compare, 6 and 8 rounds): the floor −3.1% and +4.9%, vault.get +2.6% and +2.1%, vault.totp
 * +3.0% and +7.3%, p99 ~1.5 ms lower in the second.
 */
function oneRouter(routers: Router[]): Router {
  const all = Router();
  for (const r of routers) {
    // Only the routes move: a module's router.param() handlers would stay behind with its router.
    if (Object.keys((r as unknown as { params: object }).params).length > 0) throw new Error('a route module uses router.param(); oneRouter cannot move it');
    all.stack.push(...r.stack);
  }
  return all;
}

interface RouteLayer {
  route?: { path: unknown; methods: Record<string, boolean>; _methods(): string[] };
  handle: { stack?: RouteLayer[] };
  slash?: boolean;
  match(path: string): unknown;
}

/** The app's route layers, in order, those of routers mounted at '/' included. */
function* routeLayers(stack: RouteLayer[]): Generator<RouteLayer & { route: NonNullable<RouteLayer['route']> }> {
  for (const layer of stack) {
    if (layer.route) yield layer as RouteLayer & { route: NonNullable<RouteLayer['route']> };
    else if (layer.slash && Array.isArray(layer.handle.stack)) yield* routeLayers(layer.handle.stack);
  }
}

/**
 * The methods the app's routes answer at `path`, OPTIONS last, and the pattern of the first route
 * that matched it (`/v1/credentials/:ref`).
 */
function methodsAt(stack: RouteLayer[], path: string) {
  const into = { methods: new Set<string>(), pattern: undefined as string | undefined };
  for (const layer of routeLayers(stack)) {
    if (!layer.match(path)) continue;
    for (const m of layer.route._methods()) into.methods.add(m);
    if (into.pattern === undefined && typeof layer.route.path === 'string') into.pattern = layer.route.path;
  }
  return into;
}

/**
 * A path the app answers, asked with a method none of its routes answers: a 405 problem with the
 * Allow header (RFC 9110), not a 404 that says the path is not there; OPTIONS is answered 204 with
 * the same header and no body. (Express's router would answer OPTIONS itself, 200 with the methods
 * as text; this runs first as the router's last layer.) Routes that take every method (MCP's)
 * answer their own; a middleware that answers OPTIONS for its paths (the codec's CORS) still does,
 * being earlier. A path no route answers falls through to the 404.
 */
const otherMethods: RequestHandler = (req, res, next) => {
  const { methods, pattern } = methodsAt((req.app as unknown as { router: { stack: RouteLayer[] } }).router.stack, req.path);
  if (methods.size === 0) return next();
  const allow = [...methods, 'OPTIONS'].filter((m, i, all) => all.indexOf(m) === i);
  if (req.method !== 'OPTIONS') {
    // A path with parameters is the caller's text (a value pasted where a name goes, say): its
    // route's pattern is what the answer, its instance and the request log show (shownPath).
    if (pattern?.includes(':')) {
      res.locals.routePattern = pattern;
      throw refWithheld(new MethodNotAllowedError(req.method, pattern, allow));
    }
    throw new MethodNotAllowedError(req.method, req.path, allow);
  }
  res.setHeader('Allow', allow.join(', '));
  res.status(204).end();
};

/** The literal segments of the routes' paths (`v1`, `credentials`, `vault.get`; not `:ref`). */
function segmentsOf(stack: RouteLayer[]): Set<string> {
  const into = new Set<string>();
  for (const { route } of routeLayers(stack)) {
    if (typeof route.path === 'string') for (const s of route.path.split('/')) if (s && !s.startsWith(':')) into.add(s);
  }
  return into;
}

export function createApp(deps: ApiDeps): Express {
  let routeSegments: Set<string> | undefined;
  const app = express();
  /** A path with every segment no route has shown as …: the caller's text may be a value pasted into it. */
  const maskPath = (path: string): string => {
    const known = (routeSegments ??= segmentsOf((app as unknown as { router: { stack: RouteLayer[] } }).router.stack));
    return path.split('/').map((s) => (s === '' || known.has(s) ? s : '…')).join('/');
  };
  app.locals.maskPath = maskPath;
  app.disable('x-powered-by');
  // Express's default ETag is a SHA-1 of the body: of a vault.get answer, a fingerprint of the secret
  // in a header that proxies log, against which a guessed password can be checked. Nothing is cached anyway.
  app.set('etag', false);
  app.set('query parser', 'simple');
  const auth: AuthDeps = {
    identities: deps.identities,
    adminTokenHash: hashToken(deps.adminToken),
    guard: new AuthGuard(deps.authFailures ?? DEFAULT_AUTH_FAILURES),
  };

  // JSON only, never framed, no referrer, HTTPS remembered by browsers that reach it over TLS.
  app.use(
    helmet({
      contentSecurityPolicy: { useDefaults: false, directives: { defaultSrc: ["'none'"], frameAncestors: ["'none'"] } },
      strictTransportSecurity: { maxAge: 31_536_000, includeSubDomains: true },
      xFrameOptions: { action: 'deny' },
      referrerPolicy: { policy: 'no-referrer' },
      crossOriginResourcePolicy: { policy: 'same-origin' },
    }),
  );

  app.use((req, res, next) => {
    const given = req.get('x-request-id');
    res.locals.requestId = given && REQUEST_ID.test(given) ? given : randomUUID();
    res.setHeader('X-Request-Id', res.locals.requestId);
    // Responses may carry secrets: never cache them anywhere.
    res.setHeader('Cache-Control', 'no-store');
    next();
  });
  app.use(accessLog(deps.logger));

  const metrics = createMetrics({ readBatches: () => deps.vault.readBatchStats(), storeBatches: () => deps.vault.storeBatchStats() });
  app.use(metrics.middleware);
  app.get(
    '/metrics',
    documented({ summary: 'Prometheus metrics', auth: 'none', responses: { 200: { description: 'Prometheus text exposition format', contentType: 'text/plain' } } }),
    async (_req, res) => {
      res.type(metrics.registry.contentType).send(await metrics.registry.metrics());
    },
  );
  // Generated from the routes themselves (api/openapi.ts); holds no secrets, so no token.
  app.get(
    '/openapi.json',
    documented({ summary: 'This OpenAPI 3.1 document', auth: 'none', responses: { 200: { description: 'OpenAPI 3.1 document', contentType: 'application/json', schema: { type: 'object' } } } }),
    (req, res) => {
      res.json(openApiDocument(req.app));
    },
  );
  const routers = [
    healthRoutes({ pool: deps.pool, client: deps.client, namespace: deps.namespace, logger: deps.logger, readThread: deps.readThread }),
    identityRoutes(auth, deps.identities),
    vaultRoutes(auth, deps),
    grantRoutes(auth, deps.grants),
    mailRoutes(auth, deps),
    rotationRoutes(auth, deps),
    leakRoutes(auth, deps),
    policyRoutes(auth, { pool: deps.pool, orphanDays: deps.orphanDays ?? 30, clock: deps.clock }),
    auditRoutes(auth, deps),
    codecRoutes(auth, { pool: deps.pool, dataConverter: deps.dataConverter, namespace: deps.namespace, corsOrigins: deps.codecCorsOrigins }),
    mcpRoutes(auth, deps),
  ];
  const routes = oneRouter(routers);
  routes.use(otherMethods);
  app.use(routes);

  app.use((req, res) => {
    // The path is the caller's text: a segment no route has (a typo, or a value pasted into the
    // path) is shown as … in the answer, its instance and the request log (shownPath).
    const shown = maskPath(req.path);
    res.locals.routePattern = shown;
    throw refWithheld(new NotFoundError(`no route ${req.method} ${shown}`));
  });
  app.use(
    problemHandler(deps.logger, async (res, err: AppError, original) => {
      const action: string | undefined = res.locals.action;
      // A throttled client's 429s are not written: its invalid tokens up to the limit were, and a
      // flood must not turn into a flood of database writes. Nor are a client's requests without a
      // token past the same limit (res.locals.unaudited; see AuthGuard.anonymousAudited).
      if (!action || isAudited(original) || err.status === 429 || res.locals.unaudited) return;
      await appendAudit(deps.pool, {
        identityId: res.locals.identity?.id ?? null,
        actor: res.locals.identity ? `identity:${res.locals.identity.id}` : res.locals.admin ? 'admin' : 'anonymous',
        action,
        outcome: outcomeOf(err),
        requestId: res.locals.requestId,
        // The interface, where the route named one (MCP's refusals before a tool: a bad token, a body too large).
        via: res.locals.via,
        detail: errorDetail(err),
      });
    }),
  );
  return app;
}
