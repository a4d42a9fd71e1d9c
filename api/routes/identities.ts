import { Router } from 'express';
import { NotFoundError, refWithheld } from '../../core/errors';
import type { Identities } from '../../vault/identities';
import { endpoint, type AuthDeps } from '../endpoint';
import { identityBody, identityCreated, identitySettings } from '../responses';
import { IDENTITY_NAME, identityCreate, identityUpdate } from '../schemas';
import { isUuid } from '../../core/ids';

export function identityRoutes(auth: AuthDeps, identities: Identities): Router {
  const router = Router();
  router.post(
    '/v1/identities',
    ...endpoint(auth, { who: 'admin', action: 'identity.create', summary: 'Create an identity (its token is shown once)', body: identityCreate, responses: { 201: identityCreated }, problems: [409] }, async ({ body, requestId }) => ({
      status: 201,
      body: await identities.create(body, { actor: 'admin', requestId }),
    })),
  );
  // A new token in place of the old one (lost, or leaked): shown once, the old one stops working.
  router.post(
    '/v1/identities/:ref/token',
    ...endpoint(
      auth,
      { who: 'admin', action: 'identity.token', summary: 'Issue an identity a new token in place of its old one (shown once)', responses: { 201: identityCreated }, problems: [404, 409] },
      async ({ req, requestId }) => {
        const ref = String(req.params.ref);
        // Text that is no identity's name or id cannot name one: not looked up, nor repeated (a line
        // break, a bidi override, anything pasted there went back in the 404 as given).
        if (!isUuid(ref) && !IDENTITY_NAME.test(ref)) throw refWithheld(new NotFoundError('no identity with the name or id given (a name is 1-100 letters, digits and . _ @ -; an id a UUID)'));
        return { status: 201, body: await identities.reissueToken(isUuid(ref) ? { id: ref } : { name: ref }, { actor: 'admin', requestId }) };
      },
    ),
  );
  // Who the bearer token belongs to. Does no vault work, so it is also the HTTP floor of `npm run bench`.
  router.get(
    '/v1/whoami',
    ...endpoint(auth, { who: 'identity', action: 'identity.whoami', summary: 'Who this bearer token belongs to', responses: { 200: identityBody } }, async ({ identity }) => ({
      body: { id: identity!.id, name: identity!.name, email: identity!.email },
    })),
  );
  // The admin switches how an identity's MCP calls treat values (masking, and the separate unmasked-read permission).
  router.patch(
    '/v1/identities/:id',
    ...endpoint(auth, { who: 'admin', action: 'identity.update', summary: 'Change how an identity’s MCP calls treat values', body: identityUpdate, responses: { 200: identitySettings }, problems: [404] }, async ({ req, body, requestId }) => {
      const id = String(req.params.id);
      // Text that is no id is not repeated (nor is the path, in the problem's instance or the request log): it may be anything pasted there.
      if (!isUuid(id)) throw refWithheld(new NotFoundError('no identity with the id given (an identity id is a UUID)'));
      return { body: await identities.updateSettings(id, body, { actor: 'admin', requestId }) };
    }),
  );
  return router;
}
