import type { Application, RequestHandler } from 'express';
import { z } from 'zod';
import pkg from '../package.json' with { type: 'json' };
import { problemSchema } from './responses';

/**
 * The OpenAPI 3.1 document is generated from the running app: every route express answers is
 * found by walking its router stack, and its documentation is whatever the route's handlers carry.
 * `endpoint()` attaches it from its spec (auth, body, query, response schemas); any other route
 * puts `documented({...})` first in its handler list. A route without it is left out of the
 * document, which test/openapi.test.ts reports.
 */

export type Auth = 'none' | 'identity' | 'admin' | 'identity-or-admin';

/** A response: a zod schema (JSON), or a description with another media type. */
export type ResponseDoc = z.ZodType | { description: string; contentType?: string; schema?: z.ZodType | Record<string, unknown> };

export interface RouteDoc {
  summary: string;
  description?: string;
  auth: Auth;
  /** JSON request body (validated as this schema's input). */
  body?: z.ZodType;
  /** A non-JSON request body. */
  requestBody?: { contentType: string; description?: string; schema?: Record<string, unknown> };
  /** Query parameters: an object schema, one parameter per property. */
  query?: z.ZodType;
  responses: Record<number, ResponseDoc>;
  /** Statuses answered with an RFC 9457 problem (also, if `responses` documents the status, besides its media type). */
  problems?: number[];
  /** Only for `app.all(...)` or `app.use(path, ...)`: the methods the route really serves. */
  methods?: string[];
}

const ROUTE_DOC = Symbol.for('mailgent.routeDoc');

type Documented = RequestHandler & { [ROUTE_DOC]?: RouteDoc };

/** Attaches documentation to a handler (used by endpoint()). */
export function withDoc<H extends RequestHandler>(handler: H, doc: RouteDoc): H {
  (handler as Documented)[ROUTE_DOC] = doc;
  return handler;
}

/**
 * Documentation for a route that is not an endpoint(): put it first in the handler list,
 * e.g. `app.get('/metrics', documented({ summary, auth: 'none', responses: {...} }), handler)`.
 */
export function documented(doc: RouteDoc): RequestHandler {
  return withDoc((_req, _res, next) => next(), doc);
}

export interface RouteInfo {
  /** Upper case; `USE` for a middleware mounted at a path (it answers every method). */
  method: string;
  /** The express pattern, mount prefixes included. */
  path: string;
  doc?: RouteDoc;
}

interface Layer {
  route?: { path: string | string[]; methods: Record<string, boolean>; stack: Layer[] };
  handle: Documented & { stack?: Layer[] };
  rawPath?: unknown;
}

/** Every method and path the app answers, from express's own router stack. */
export function listRoutes(app: Application): RouteInfo[] {
  const out: RouteInfo[] = [];
  walk((app as unknown as { router: { stack: Layer[] } }).router.stack, '', out);
  return out;
}

function walk(stack: Layer[], prefix: string, out: RouteInfo[]): void {
  for (const layer of stack) {
    if (layer.route) {
      const doc = layer.route.stack.map((l) => l.handle[ROUTE_DOC]).find(Boolean);
      const declared = Object.keys(layer.route.methods).filter((m) => layer.route!.methods[m] && m !== '_all');
      const methods = layer.route.methods._all ? (doc?.methods ?? ['ALL']) : declared;
      for (const path of ([] as string[]).concat(layer.route.path)) {
        for (const method of methods) out.push({ method: method.toUpperCase(), path: prefix + path, doc });
      }
    } else if (Array.isArray(layer.handle.stack)) {
      walk(layer.handle.stack, prefix + mountPath(layer), out);
    } else if (mountPath(layer)) {
      const doc = layer.handle[ROUTE_DOC];
      for (const method of doc?.methods ?? ['USE']) out.push({ method: method.toUpperCase(), path: prefix + mountPath(layer), doc });
    }
  }
}

function mountPath(layer: Layer): string {
  return typeof layer.rawPath === 'string' && layer.rawPath !== '/' ? layer.rawPath : '';
}

/** `/v1/credentials/:ref` → `/v1/credentials/{ref}`. */
export function openApiPath(expressPath: string): string {
  if (/[*?(){}]/.test(expressPath)) throw new Error(`cannot document the route pattern ${expressPath}: use plain segments and :params`);
  return expressPath.replace(/:([A-Za-z_][A-Za-z0-9_]*)/g, '{$1}');
}

const documents = new WeakMap<Application, object>();

/** The app's OpenAPI document, built once (after every route is registered). */
export function openApiDocument(app: Application): object {
  let doc = documents.get(app);
  if (!doc) {
    doc = buildDocument(listRoutes(app));
    documents.set(app, doc);
  }
  return doc;
}

const STATUS_TEXT: Record<number, string> = {
  200: 'OK',
  201: 'Created',
  202: 'Accepted',
  400: 'The request is not valid (the problem names each field)',
  401: 'No bearer token, or not a valid one',
  403: 'The token is valid but not allowed here (an admin route given an identity’s token, or an identity’s route given the admin token)',
  404: 'Not found (another identity’s record is not found either)',
  409: 'Conflicts with the current state',
  413: 'The request body is larger than 256 KiB',
  415: 'The request body is not application/json',
  422: 'Well-formed but cannot be carried out',
  429: 'Too many invalid tokens from this client; try again after Retry-After seconds',
  500: 'Internal error, or stored data failed its integrity check',
  503: 'The database or Temporal is unavailable; try again (Retry-After)',
};

/** Problems every endpoint can answer, by what it takes. */
function implicitProblems(doc: RouteDoc): number[] {
  if (doc.auth === 'none') return [];
  const statuses = [401, 429, 500, 503];
  // The admin token on an identity's route acts for no identity; an identity's token on an admin route is not enough.
  if (doc.auth === 'admin' || doc.auth === 'identity') statuses.push(403);
  if (doc.body || doc.query) statuses.push(400);
  if (doc.body) statuses.push(413, 415);
  return statuses;
}

const SECURITY: Record<Auth, Record<string, string[]>[]> = {
  none: [],
  identity: [{ identityToken: [] }],
  admin: [{ adminToken: [] }],
  'identity-or-admin': [{ identityToken: [] }, { adminToken: [] }],
};

function buildDocument(routes: RouteInfo[]): object {
  const paths: Record<string, Record<string, object>> = {};
  for (const route of routes) {
    if (!route.doc || route.method === 'USE' || route.method === 'ALL') continue;
    const path = openApiPath(route.path);
    const method = route.method.toLowerCase();
    paths[path] ??= {};
    paths[path][method] ??= operation(route.method, route.path, route.doc);
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'Mailgent',
      version: pkg.version,
      description: 'Credential lifecycle for AI agents: an encrypted, audited vault, TOTP, mail and durable rotation workflows. Errors are RFC 9457 application/problem+json.',
    },
    servers: [{ url: '/' }],
    paths,
    components: {
      securitySchemes: {
        identityToken: { type: 'http', scheme: 'bearer', description: 'An identity’s token (POST /v1/identities shows it once).' },
        adminToken: { type: 'http', scheme: 'bearer', description: 'The admin token (ADMIN_TOKEN).' },
      },
      schemas: { Problem: jsonSchema(problemSchema, 'output') },
    },
  };
}

function operation(method: string, path: string, doc: RouteDoc): object {
  const parameters: object[] = [...path.matchAll(/:([A-Za-z_][A-Za-z0-9_]*)/g)].map((m) => ({ name: m[1], in: 'path', required: true, schema: { type: 'string' } }));
  if (doc.query) {
    const schema = jsonSchema(doc.query, 'input') as { properties?: Record<string, object>; required?: string[] };
    for (const [name, s] of Object.entries(schema.properties ?? {})) {
      parameters.push({ name, in: 'query', required: schema.required?.includes(name) ?? false, schema: s });
    }
  }
  const responses: Record<string, object> = {};
  for (const [status, response] of Object.entries(doc.responses)) {
    if (response instanceof z.ZodType) {
      responses[status] = { description: STATUS_TEXT[Number(status)] ?? 'Response', content: { 'application/json': { schema: jsonSchema(response, 'output') } } };
    } else {
      const schema = response.schema instanceof z.ZodType ? jsonSchema(response.schema, 'output') : response.schema;
      responses[status] = { description: response.description, ...(response.contentType ? { content: { [response.contentType]: schema ? { schema } : {} } } : {}) };
    }
  }
  for (const status of new Set([...implicitProblems(doc), ...(doc.problems ?? [])].sort())) {
    const problem = { 'application/problem+json': { schema: { $ref: '#/components/schemas/Problem' } } };
    const given = responses[status] as { description: string; content?: Record<string, object> } | undefined;
    // A status the route documents itself and also answers with a problem (/mcp's 400: a problem, or
    // the MCP transport's JSON-RPC error) lists both media types.
    responses[status] = given ? { ...given, content: { ...problem, ...given.content } } : { description: STATUS_TEXT[status] ?? 'Problem', content: problem };
  }
  const segment = path.split('/').filter(Boolean);
  return {
    operationId: operationId(method, path),
    summary: doc.summary,
    ...(doc.description ? { description: doc.description } : {}),
    tags: [segment[0] === 'v1' ? (segment[1] ?? 'v1').split('.')[0] : 'operations'],
    security: SECURITY[doc.auth],
    ...(parameters.length ? { parameters } : {}),
    ...(doc.body
      ? { requestBody: { required: true, content: { 'application/json': { schema: jsonSchema(doc.body, 'input') } } } }
      : doc.requestBody
        ? { requestBody: { required: true, ...(doc.requestBody.description ? { description: doc.requestBody.description } : {}), content: { [doc.requestBody.contentType]: doc.requestBody.schema ? { schema: doc.requestBody.schema } : {} } } }
        : {}),
    responses,
  };
}

function operationId(method: string, path: string): string {
  const words = path.split(/[^A-Za-z0-9]+/).filter(Boolean);
  return method.toLowerCase() + words.map((w) => w[0]!.toUpperCase() + w.slice(1)).join('');
}

// Formats JSON Schema 2020-12 defines; zod adds others (e.g. "starts_with") whose meaning the pattern already carries.
const STANDARD_FORMATS = new Set(['date-time', 'date', 'time', 'duration', 'email', 'idn-email', 'hostname', 'idn-hostname', 'ipv4', 'ipv6', 'uri', 'uri-reference', 'iri', 'iri-reference', 'uuid', 'uri-template', 'json-pointer', 'relative-json-pointer', 'regex']);

/** A zod schema as an OpenAPI 3.1 Schema Object (JSON Schema 2020-12): requests as their input, responses as their output. */
export function jsonSchema(schema: z.ZodType, io: 'input' | 'output'): Record<string, unknown> {
  const { $schema: _dialect, ...rest } = z.toJSONSchema(schema, {
    target: 'draft-2020-12',
    io,
    unrepresentable: 'any',
    override: ({ jsonSchema: s }) => {
      if (typeof s.format === 'string' && !STANDARD_FORMATS.has(s.format)) delete s.format;
    },
  });
  return rest;
}
