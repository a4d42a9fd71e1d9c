import { Router, type RequestHandler } from 'express';
import { z } from 'zod';
import type { DataConverter } from '@temporalio/common';
import { IntegrityError, UnprocessableError, ValidationError } from '../../core/errors';
import type { Pool } from '../../db/pool';
import { appendAudit } from '../../vault/audit';
import { payloadFromJson, payloadToJson } from '../../vault/payload-codec';
import { endpoint, type AuthDeps } from '../endpoint';

/**
 * The Temporal codec server protocol (https://docs.temporal.io/production-deployment/data-encryption):
 * the Web UI and `temporal workflow show --codec-endpoint … --codec-auth 'Bearer <admin token>'` send
 * `{payloads: [{metadata: {k: base64}, data: base64}]}` to /codec/decode (or /encode) and get the
 * same shape back. Admin token only, every call audited; browsers are answered only from the
 * origins in CODEC_CORS_ORIGINS.
 */
const base64 = z.string().max(4 * 1024 * 1024).regex(/^[A-Za-z0-9+/]*={0,2}$/, 'must be base64');
const payloadJson = z.strictObject({ metadata: z.record(z.string().max(256), base64).optional(), data: base64.optional() });
export const codecBody = z.strictObject({ payloads: z.array(payloadJson).max(10_000) });
export const codecReply = z.strictObject({ payloads: z.array(z.strictObject({ metadata: z.record(z.string(), z.string()), data: z.string() })) });

export function codecRoutes(
  auth: AuthDeps,
  deps: { pool: Pool; dataConverter: DataConverter; namespace: string; corsOrigins?: string[] },
): Router {
  const router = Router();
  router.use('/codec', cors(deps.corsOrigins ?? []));
  for (const op of ['encode', 'decode'] as const) {
    router.post(
      `/codec/${op}`,
      ...endpoint(
        auth,
        {
          who: 'admin',
          action: `codec.${op}`,
          summary: op === 'decode' ? 'Decrypt Temporal payloads (codec server, for the Web UI and CLI)' : 'Encrypt Temporal payloads (codec server)',
          body: codecBody,
          responses: { 200: codecReply },
          // decode: a payload this deployment cannot open (another deployment's key, altered, cut short).
          problems: op === 'decode' ? [422] : [],
        },
        async ({ req, body, requestId }) => {
        const namespace = req.get('x-namespace');
        if (namespace && namespace !== deps.namespace) {
          throw new ValidationError( `this codec serves namespace '${deps.namespace}', not '${namespace}'`);
        }
        let payloads = body.payloads.map(payloadFromJson);
        const codecs = deps.dataConverter.payloadCodecs ?? [];
        try {
          for (const codec of op === 'encode' ? codecs : [...codecs].reverse()) payloads = await codec[op](payloads);
        } catch (err) {
          // What the caller sent (another deployment's payload, or one altered or cut short), not a
          // fault of this server's: a 422, not a 500 logged as one.
          // (Only a payload's own failure: this deployment's codec key failing to load is the server's.)
          if (op === 'decode' && err instanceof IntegrityError && err.message.startsWith('a Temporal payload ')) {
            throw new UnprocessableError('a payload could not be decrypted: it was encrypted by another deployment or key, or altered');
          }
          throw err;
        }
        await appendAudit(deps.pool, { identityId: null, actor: 'admin', action: `codec.${op}`, outcome: 'ok', requestId, detail: { payloads: payloads.length } });
        return { body: { payloads: payloads.map(payloadToJson) } };
        },
      ),
    );
  }
  return router;
}

/** The Web UI calls the codec from the browser: allow exactly the configured origins, with credentials. */
function cors(origins: string[]): RequestHandler {
  return (req, res, next) => {
    const origin = req.get('origin');
    if (origin && origins.includes(origin)) {
      res.setHeader('Access-Control-Allow-Origin', origin);
      res.setHeader('Access-Control-Allow-Credentials', 'true');
      res.setHeader('Vary', 'Origin');
      if (req.method === 'OPTIONS') {
        res.setHeader('Access-Control-Allow-Methods', 'POST');
        res.setHeader('Access-Control-Allow-Headers', 'Authorization, Content-Type, X-Namespace');
        res.setHeader('Access-Control-Max-Age', '600');
        res.status(204).end();
        return;
      }
    }
    next();
  };
}
