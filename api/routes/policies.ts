import { Router } from 'express';
import type { Pool } from '../../db/pool';
import { NotFoundError } from '../../core/errors';
import { getPasswordPolicy, setPasswordPolicy } from '../../vault/password-policy';
import { findOrphans, listServiceAccounts } from '../../vault/service-accounts';
import { endpoint, type AuthDeps } from '../endpoint';
import { orphansQuery, passwordPolicy } from '../schemas';

/** Password policy per identity, the service-account inventory and the orphan report. */
export function policyRoutes(auth: AuthDeps, deps: { pool: Pool; orphanDays: number; clock?: () => Date }): Router {
  const router = Router();
  const now = () => (deps.clock ?? (() => new Date()))();

  router.put(
    '/v1/password-policy',
    ...endpoint(auth, { who: 'identity', action: 'password_policy.set', body: passwordPolicy }, async ({ body, caller }) => ({
      body: await setPasswordPolicy(deps.pool, caller, body),
    })),
  );
  router.get(
    '/v1/password-policy',
    ...endpoint(auth, { who: 'identity' }, async ({ caller }) => {
      const policy = await getPasswordPolicy(deps.pool, caller.identityId);
      if (!policy) throw new NotFoundError('this identity has no password policy');
      return { body: policy };
    }),
  );
  router.get(
    '/v1/service-accounts',
    ...endpoint(auth, { who: 'identity' }, async ({ caller }) => ({
      body: { items: await listServiceAccounts(deps.pool, { identityId: caller.identityId, asOf: now() }) },
    })),
  );
  router.get(
    '/v1/reports/orphans',
    ...endpoint(auth, { who: 'identity', query: orphansQuery }, async ({ caller, query }) => {
      const days = query.days ?? deps.orphanDays;
      return { body: { days, items: await findOrphans(deps.pool, { identityId: caller.identityId, asOf: now(), days }) } };
    }),
  );
  return router;
}
