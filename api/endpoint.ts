import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import type { z } from 'zod';
import { AppError, ValidationError } from '../core/errors';
import { hashToken } from '../vault/identities';
import type { Identities, Identity } from '../vault/identities';
import type { Caller } from '../vault/vault';
import { timingSafeEqual } from 'node:crypto';
import { withDoc, type ResponseDoc } from './openapi';
import type { AuthGuard } from './auth-guard';
import { MAX_REQUEST_BYTES } from './schemas';
import { storableText } from '../core/storable';

/**
 * One endpoint = who may call it, the audit action it records, the schemas of its body and
 * query, and what it answers (its response schemas by status and the problems particular to it;
 * the common ones (400, 401, 403, 413, 415, 429, 500, 503) follow from the rest). The spec is also the
 * endpoint's OpenAPI documentation (api/openapi.ts). Authentication runs before the body is read,
 * so even a malformed body is attributed.
 */
export type Who = 'identity' | 'admin' | 'identity-or-admin';

export interface Reply {
  status?: number;
  body: unknown;
}

export interface EndpointContext<B, Q> {
  req: Request;
  res: Response;
  body: B;
  query: Q;
  requestId: string;
  identity?: Identity;
  admin: boolean;
  /** The calling identity as the vault sees it (only on identity routes). */
  caller: Caller;
}

export interface AuthDeps {
  identities: Pick<Identities, 'authenticate'>;
  adminTokenHash: Buffer;
  /** Throttles clients that present too many invalid tokens (absent: no throttling). */
  guard?: AuthGuard;
}

/** JSON nested deeper than this is refused before validation (no recursion over attacker-chosen depth). */
export const MAX_JSON_DEPTH = 32;

// Not strict: a top-level string or number is valid JSON and gets the clearer "must be a JSON object" error.
export const jsonParser = express.json({ limit: MAX_REQUEST_BYTES, strict: false });

export interface EndpointSpec<BS, QS> {
  who: Who;
  summary: string;
  description?: string;
  /** The audit action a refused or failed call is written under (a success is audited by the vault, where it is at all). */
  action: string;
  body?: BS;
  query?: QS;
  responses: Record<number, ResponseDoc>;
  /** Problem statuses particular to this endpoint (e.g. 404, 409, 422). */
  problems?: number[];
}

export function endpoint<BS extends z.ZodType | undefined = undefined, QS extends z.ZodType | undefined = undefined>(
  auth: AuthDeps,
  spec: EndpointSpec<BS, QS>,
  handler: (
    ctx: EndpointContext<BS extends z.ZodType ? z.output<BS> : undefined, QS extends z.ZodType ? z.output<QS> : undefined>,
  ) => Promise<Reply>,
): RequestHandler[] {
  const chain: RequestHandler[] = [
    (_req, res, next) => {
      res.locals.action = spec.action;
      next();
    },
    authenticate(auth, spec.who),
  ];
  if (spec.body) chain.push(requireJson, jsonParser, limitDepth);
  const run: RequestHandler = async (req: Request, res: Response) => {
    refuseUnstorable(req.params, 'path');
    refuseUnstorable(req.query, 'query');
    const body = spec.body ? parse(spec.body, req.body, 'body') : undefined;
    const query = spec.query ? parse(spec.query, { ...req.query }, 'query') : undefined;
    const identity: Identity | undefined = res.locals.identity;
    const requestId: string = res.locals.requestId;
    const reply = await handler({
      req,
      res,
      body: body as never,
      query: query as never,
      requestId,
      identity,
      admin: res.locals.admin === true,
      caller: { identityId: identity?.id ?? '', actor: identity ? `identity:${identity.id}` : 'admin', requestId },
    });
    res.status(reply.status ?? 200).json(reply.body);
  };
  const { who, action: _action, ...doc } = spec;
  // Any endpoint can answer 400: its path and query are checked for unstorable strings even without a schema.
  chain.push(withDoc(run, { ...doc, auth: who, problems: [400, ...(doc.problems ?? [])] }));
  return chain;
}

export function parse<S extends z.ZodType>(schema: S, input: unknown, where: 'body' | 'query'): z.output<S> {
  if (where === 'body' && (typeof input !== 'object' || input === null || Array.isArray(input))) {
    throw new ValidationError('the request body must be a JSON object');
  }
  // Here, not only in the HTTP chain: MCP tool arguments are parsed with this too, and must be refused alike.
  if (where === 'body') refuseUnstorable(input, 'body');
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const errors = result.error.issues.flatMap((i) =>
    i.code === 'unrecognized_keys'
      ? i.keys.map((key) => ({ path: [...i.path, key].join('.'), message: 'is not a known field' }))
      : [{ path: i.path.length ? i.path.join('.') : where, message: i.message }],
  );
  throw new ValidationError(`the request ${where} is not valid: ${errors.map((e) => `${e.path}: ${e.message}`).join('; ')}`, errors);
}

export function requireJson(req: Request, _res: Response, next: NextFunction): void {
  if (!req.is(['application/json', 'application/*+json'])) {
    throw new AppError(415, 'unsupported-media-type', 'Unsupported media type', 'send the request body as application/json');
  }
  next();
}

export function limitDepth(req: Request, _res: Response, next: NextFunction): void {
  if (depthExceeds(req.body, MAX_JSON_DEPTH)) {
    throw new ValidationError(`the request body is nested more than ${MAX_JSON_DEPTH} levels deep`);
  }
  next();
}

/** Refuses input whose strings (or keys) could never be stored, before any of it reaches the database. */
function refuseUnstorable(value: unknown, where: 'body' | 'query' | 'path'): void {
  const stack: [unknown, string][] = [[value, '']];
  while (stack.length) {
    const [v, path] = stack.pop()!;
    if (typeof v === 'string' && !storableText(v)) {
      throw new ValidationError(`the request ${where} contains a NUL character or an unpaired UTF-16 surrogate`, [
        { path: path || where, message: 'contains a NUL character or an unpaired UTF-16 surrogate' },
      ]);
    }
    if (typeof v !== 'object' || v === null) continue;
    for (const [key, child] of Object.entries(v)) {
      const at = path ? `${path}.${key}` : key;
      if (!storableText(key)) stack.push([key, at]);
      stack.push([child, at]);
    }
  }
}

/** Iterative, so a hostile depth cannot overflow the stack here. */
export function depthExceeds(value: unknown, max: number): boolean {
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length) {
    const [v, depth] = stack.pop()!;
    if (typeof v !== 'object' || v === null) continue;
    if (depth >= max) return true;
    for (const child of Object.values(v)) stack.push([child, depth + 1]);
  }
  return false;
}

export function authenticate(auth: AuthDeps, who: Who): RequestHandler {
  return async (req, res, next) => {
    const header = req.get('authorization');
    const match = header ? /^Bearer ([\x21-\x7e]{1,512})$/i.exec(header) : null;
    if (!match) {
      throw new AppError(401, 'unauthorized', 'Authentication required', 'send Authorization: Bearer <token>');
    }
    const token = match[1]!;
    const hash = hashToken(token);
    // A throttled client is refused before its token is checked, so a guess teaches nothing.
    await auth.guard?.check(req, hash);
    // Fixed-length hashes compared in constant time: neither the token nor its length leaks by timing.
    const isAdmin = timingSafeEqual(hash, auth.adminTokenHash);
    if (isAdmin && who !== 'identity') {
      res.locals.admin = true;
      auth.guard?.succeeded(req, hash);
      return next();
    }
    const identity = isAdmin ? undefined : await auth.identities.authenticate(token);
    if (identity) {
      auth.guard?.succeeded(req, hash);
      res.locals.identity = identity;
      if (who !== 'admin') return next();
      throw new AppError(403, 'forbidden', 'Forbidden', 'this route needs the admin token');
    }
    // The admin token on an identity route is a valid token in the wrong place, not a guess.
    if (isAdmin) throw new AppError(403, 'forbidden', 'Forbidden', 'this route needs an identity’s token; the admin token acts for no identity');
    await auth.guard?.failed(req);
    throw new AppError(401, 'unauthorized', 'Authentication required', 'the bearer token is not valid');
  };
}
