import { Router } from 'express';
import type { Identities } from '../../vault/identities';
import { endpoint, type AuthDeps } from '../endpoint';
import { identityCreate } from '../schemas';

export function identityRoutes(auth: AuthDeps, identities: Identities): Router {
  const router = Router();
  router.post(
    '/v1/identities',
    ...endpoint(auth, { who: 'admin', action: 'identity.create', body: identityCreate }, async ({ body, requestId }) => ({
      status: 201,
      body: await identities.create(body, { actor: 'admin', requestId }),
    })),
  );
  return router;
}
