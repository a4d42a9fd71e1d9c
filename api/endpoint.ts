import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import { z } from 'zod';
import { AppError, ValidationError } from '../core/errors';
import { hashToken } from '../vault/identities';
import type { Identities, Identity } from '../vault/identities';
import type { Caller } from '../vault/vault';
import { isUtf8 } from 'node:buffer';
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

const JSON_TYPES = ['application/json', 'application/*+json'];

/** JSON nested deeper than this is refused before validation (no recursion over attacker-chosen depth). */
export const MAX_JSON_DEPTH = 32;

// Not strict: a top-level string or number is valid JSON and gets the clearer "must be a JSON object" error.
// Every type the general path admits: with body-parser's default (application/json only) an application/*+json
// body passed the type check and was then left unread ("the request body must be a JSON object").
// verify sees the body's bytes before they are decoded: the charset body-parser found (any "utf-" one
// passes its own check: utf-16le was decoded as such) must be UTF-8, and the bytes must be UTF-8
// (its decoder put U+FFFD for an invalid sequence, and a mangled secret was stored).
const jsonParser = express.json({
  limit: MAX_REQUEST_BYTES,
  strict: false,
  type: JSON_TYPES,
  verify: (_req, _res, buf, encoding) => {
    if (encoding !== 'utf-8') throw Object.assign(new Error('the request body must be UTF-8 JSON'), { status: 415, type: 'charset.unsupported' });
    if (!isUtf8(buf)) throw Object.assign(new Error('the request body is not valid UTF-8'), { status: 400, type: NOT_UTF8 });
  },
});

/** The error type jsonParser's verify gives a body that is not UTF-8 (general() answers it). */
const NOT_UTF8 = 'mailgent.not-utf8';
/** A body that is not UTF-8: malformed JSON (RFC 8259 §8.1), said as such. */
const notUtf8 = () => new AppError(400, 'malformed-json', 'Malformed JSON', 'the request body is not valid UTF-8');
/** Decodes the fast path's bodies: `fatal`, so invalid UTF-8 is refused, not replaced with U+FFFD; it drops a byte order mark as body-parser does. */
const UTF8 = new TextDecoder('utf-8', { fatal: true });

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
  chain.push(spec.body ? jsonBody : noBody);
  const run: RequestHandler = async (req: Request, res: Response) => {
    refuseUnstorable(req.params, 'path');
    refuseUnstorable(req.query, 'query');
    const body = spec.body ? parse(spec.body, req.body, 'body') : undefined;
    const query = spec.query ? parse(spec.query, { ...req.query }, 'query') : undefined;
    // An endpoint that takes no query refuses one it is given (each parameter named), as unknown fields are refused.
    if (!spec.query && Object.keys(req.query).length > 0) parse(NO_QUERY, { ...req.query }, 'query');
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

/** The query of an endpoint that takes none. */
const NO_QUERY = z.strictObject({});

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

/**
 * An endpoint's JSON body: its media type checked, parsed and its depth limited, in one step. The request
 * nearly every client sends (application/json, UTF-8 or no charset, a Content-Length within the
 * limit, no Content-Encoding) is read here directly: its chunks joined and parsed, with the same
 * checks and the same errors as body-parser's. body-parser's way (type-is twice, a raw-body stream,
 * an iconv-lite decoder, on-finished) was ~5% of the API's main-thread CPU under vault.get; read
 * directly, vault.get went +9.8% and +12.9% req/s in paired runs (bench:compare). Anything else
 * (another media type, a charset, a compressed or chunked body, one over the limit) takes the
 * general path, which knows every case and answers it as before.
 */
export function jsonBody(req: Request, res: Response, next: NextFunction): void {
  const h = req.headers;
  const declared = h['content-length'];
  const length = declared === undefined ? NaN : Number(declared);
  if (!PLAIN_JSON.has(h['content-type'] ?? '') || h['content-encoding'] !== undefined || h['transfer-encoding'] !== undefined || !(length > 0 && length <= MAX_REQUEST_BYTES)) {
    return general(req, res, next);
  }
  const chunks: Buffer[] = [];
  const done = (err?: unknown) => {
    req.off('data', onData);
    req.off('end', onEnd);
    req.off('error', onError);
    req.off('close', onClose);
    if (err) return next(err);
    let text: string;
    try {
      // body-parser's UTF-8 decoding drops a byte order mark (JSON.parse would refuse it): so does UTF8.
      text = UTF8.decode(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks));
    } catch {
      return next(notUtf8());
    }
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      return next(Object.assign(new SyntaxError('the request body is not valid JSON'), { status: 400, type: 'entity.parse.failed' }));
    }
    req.body = body;
    next(tooDeep(body));
  };
  const onData = (chunk: Buffer) => chunks.push(chunk);
  const onEnd = () => done();
  const onError = (err: Error) => done(Object.assign(err, { status: 400, type: 'request.aborted' }));
  // Closed before its end: the client went away (Node's parser never passes more or fewer bytes than Content-Length).
  const onClose = () => done(Object.assign(new Error('the request was aborted'), { status: 400, type: 'request.aborted' }));
  req.on('data', onData);
  req.on('end', onEnd);
  req.on('error', onError);
  req.on('close', onClose);
}

/**
 * An endpoint that takes no body refuses one it is given, as it refuses a query it does not take:
 * before, it was ignored, and the call went ahead (`DELETE` with `{"destroy":true}` only soft-deleted
 * the credential; a rollback given `credentials` rolled back every run). An empty body is none; one
 * over the size limit is a 413, as on any endpoint.
 */
function noBody(req: Request, _res: Response, next: NextFunction): void {
  const declared = req.headers['content-length'];
  if (req.headers['transfer-encoding'] === undefined) {
    const length = declared === undefined ? 0 : Number(declared);
    if (length === 0) return next();
    return next(length > MAX_REQUEST_BYTES ? Object.assign(new Error('request entity too large'), { status: 413, type: 'entity.too.large' }) : takesNoBody());
  }
  // Chunked: read (as far as the limit) to learn whether anything came.
  let bytes = 0;
  let answered = false;
  const answer = (err?: unknown) => {
    if (answered) return;
    answered = true;
    req.off('data', onData);
    next(err);
  };
  const onData = (chunk: Buffer) => {
    bytes += chunk.length;
    if (bytes > MAX_REQUEST_BYTES) answer(Object.assign(new Error('request entity too large'), { status: 413, type: 'entity.too.large' }));
  };
  req.on('data', onData);
  req.once('end', () => answer(bytes > 0 ? takesNoBody() : undefined));
  req.once('error', (err) => answer(Object.assign(err, { status: 400, type: 'request.aborted' })));
}

function takesNoBody(): ValidationError {
  return new ValidationError('this endpoint takes no request body (what it needs goes in its path and query string); send none', [{ path: 'body', message: 'is not taken here' }]);
}

const PLAIN_JSON = new Set(['application/json', 'application/json; charset=utf-8', 'application/json; charset=UTF-8', 'application/json;charset=utf-8', 'application/json;charset=UTF-8']);

/** The general path of jsonBody: the media type, body-parser, the depth. */
function general(req: Request, res: Response, next: NextFunction): void {
  if (!req.is(JSON_TYPES)) {
    return next(new AppError(415, 'unsupported-media-type', 'Unsupported media type', 'send the request body as application/json'));
  }
  jsonParser(req, res, (err?: unknown) => next((err as { type?: unknown } | undefined)?.type === NOT_UTF8 ? notUtf8() : (err ?? tooDeep(req.body))));
}

/** The error for a body nested deeper than MAX_JSON_DEPTH, if it is. */
function tooDeep(body: unknown): ValidationError | undefined {
  return depthExceeds(body, MAX_JSON_DEPTH) ? new ValidationError(`the request body is nested more than ${MAX_JSON_DEPTH} levels deep`) : undefined;
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
      // JSON.parse makes `__proto__` an own key, which zod's records drop without a word (a
      // credential's metadata `{"__proto__": …}` was answered 200 and stored as {}): refused wherever it is.
      if (key === '__proto__') throw new ValidationError(`the request ${where} has a key named __proto__ at ${at}, which is not accepted`, [{ path: at, message: 'is not accepted as a key' }]);
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
      if (auth.guard && !auth.guard.anonymousAudited(req)) res.locals.unaudited = true;
      throw new AppError(401, 'unauthorized', 'Authentication required', 'send Authorization: Bearer <token>');
    }
    const token = match[1]!;
    const hash = hashToken(token);
    // A throttled client is refused before its token is checked, so a guess teaches nothing.
    const admission = await auth.guard?.admit(req, hash);
    // Fixed-length hashes compared in constant time: neither the token nor its length leaks by timing.
    const isAdmin = timingSafeEqual(hash, auth.adminTokenHash);
    let identity: Awaited<ReturnType<typeof auth.identities.authenticate>>;
    try {
      identity = isAdmin ? undefined : await auth.identities.authenticate(hash);
    } catch (err) {
      admission?.settle('error');
      throw err;
    }
    // The admin token on an identity route is a valid token in the wrong place, not a guess.
    admission?.settle(isAdmin || identity ? 'valid' : 'invalid');
    if (isAdmin && who !== 'identity') {
      res.locals.admin = true;
      return next();
    }
    if (identity) {
      res.locals.identity = identity;
      if (who !== 'admin') return next();
      throw new AppError(403, 'forbidden', 'Forbidden', 'this route needs the admin token');
    }
    if (isAdmin) {
      // Its refusal is the admin's (audited as such), not an anonymous caller's.
      res.locals.admin = true;
      throw new AppError(403, 'forbidden', 'Forbidden', 'this route needs an identity’s token; the admin token acts for no identity');
    }
    throw new AppError(401, 'unauthorized', 'Authentication required', 'the bearer token is not valid');
  };
}
