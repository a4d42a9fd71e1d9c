import { Router } from 'express';
import { NotFoundError, refWithheld } from '../../core/errors';
import type { Grants } from '../../vault/grants';
import { endpoint, type AuthDeps } from '../endpoint';
import { grantCreated, grantList, grantRevoked } from '../responses';
import { grantCreate } from '../schemas';
import { refOf } from './vault';
import { idOf } from '../../core/ids';

/** Owners grant another identity read access to one credential; the grantee reads it by id. */
export function grantRoutes(auth: AuthDeps, grants: Grants): Router {
  const router = Router();
  router.post(
    '/v1/grants',
    ...endpoint(auth, { who: 'identity', action: 'grant.create', summary: 'Let another identity read one credential by id', body: grantCreate, responses: { 201: grantCreated }, problems: [404, 409, 422] }, async ({ body, caller }) => ({
      status: 201,
      body: await grants.create(caller, refOf(body.credential), body.grantee),
    })),
  );
  router.get(
    '/v1/grants',
    ...endpoint(auth, { who: 'identity', action: 'grant.list', summary: 'Grants given and received', responses: { 200: grantList } }, async ({ caller }) => ({ body: await grants.list(caller.identityId) })),
  );
  router.delete(
    '/v1/grants/:id',
    ...endpoint(auth, { who: 'identity', action: 'grant.revoke', summary: 'Revoke a grant (takes effect at once)', responses: { 200: grantRevoked }, problems: [404] }, async ({ req, caller }) => {
      // In lower case, as the database spells ids: an id given in upper case is answered and audited as the same grant's.
      const id = idOf(String(req.params.id));
      // Text that is no id is not repeated (nor is the path, in the problem's instance or the request log): it may be anything pasted there.
      if (!id) throw refWithheld(new NotFoundError('no active grant with the id given (a grant id is a UUID)'));
      return { body: await grants.revoke(caller, id, String(req.params.id)) };
    }),
  );
  return router;
}
