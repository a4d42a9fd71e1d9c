import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import type { z } from 'zod';
import { AppError, ValidationError } from '../core/errors';
import { hashToken } from '../vault/identities';
import type { Identities, Identity } from '../vault/identities';
import type { Caller } from '../vault/vault';
import { timingSafeEqual } from 'node:crypto';
import { MAX_REQUEST_BYTES } from './schemas';

/**
 * One endpoint = who may call it, the audit action it records, and the schemas of its body and
 * query. Authentication runs before the body is read, so even a malformed body is attributed.
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
}

// Not strict: a top-level string or number is valid JSON and gets the clearer "must be a JSON object" error.
const jsonParser = express.json({ limit: MAX_REQUEST_BYTES, strict: false });

export function endpoint<BS extends z.ZodType | undefined = undefined, QS extends z.ZodType | undefined = undefined>(
  auth: AuthDeps,
  spec: { who: Who; action?: string; body?: BS; query?: QS },
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
  if (spec.body) chain.push(requireJson, jsonParser);
  chain.push(async (req: Request, res: Response) => {
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
  });
  return chain;
}

function parse<S extends z.ZodType>(schema: S, input: unknown, where: 'body' | 'query'): z.output<S> {
  if (where === 'body' && (typeof input !== 'object' || input === null || Array.isArray(input))) {
    throw new ValidationError('the request body must be a JSON object');
  }
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const errors = result.error.issues.flatMap((i) =>
    i.code === 'unrecognized_keys'
      ? i.keys.map((key) => ({ path: [...i.path, key].join('.'), message: 'is not a known field' }))
      : [{ path: i.path.length ? i.path.join('.') : where, message: i.message }],
  );
  throw new ValidationError(`the request ${where} is not valid: ${errors.map((e) => `${e.path}: ${e.message}`).join('; ')}`, errors);
}

function requireJson(req: Request, _res: Response, next: NextFunction): void {
  if (!req.is(['application/json', 'application/*+json'])) {
    throw new AppError(415, 'unsupported-media-type', 'Unsupported media type', 'send the request body as application/json');
  }
  next();
}

function authenticate(auth: AuthDeps, who: Who): RequestHandler {
  return async (req, res, next) => {
    const header = req.get('authorization');
    const match = header ? /^Bearer ([\x21-\x7e]{1,512})$/i.exec(header) : null;
    if (!match) {
      throw new AppError(401, 'unauthorized', 'Authentication required', 'send Authorization: Bearer <token>');
    }
    const token = match[1]!;
    if (who !== 'identity' && timingSafeEqual(hashToken(token), auth.adminTokenHash)) {
      res.locals.admin = true;
      return next();
    }
    const identity = await auth.identities.authenticate(token);
    if (identity && who !== 'admin') {
      res.locals.identity = identity;
      return next();
    }
    if (identity) {
      res.locals.identity = identity;
      throw new AppError(403, 'forbidden', 'Forbidden', 'this route needs the admin token');
    }
    throw new AppError(401, 'unauthorized', 'Authentication required', 'the bearer token is not valid');
  };
}
