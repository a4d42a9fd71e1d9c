import { Router } from 'express';
import type { Pool } from '../../db/pool';
import { NotFoundError } from '../../core/errors';
import { getPasswordPolicy, setPasswordPolicy } from '../../vault/password-policy';
import { findOrphans, listServiceAccounts } from '../../vault/service-accounts';
import { endpoint, type AuthDeps } from '../endpoint';
import { orphanReport, passwordPolicyBody, serviceAccounts } from '../responses';
import { orphansQuery, passwordPolicy } from '../schemas';

/** Password policy per identity, the service-account inventory and the orphan report. */
export function policyRoutes(auth: AuthDeps, deps: { pool: Pool; orphanDays: number; clock?: () => Date }): Router {
  const router = Router();
  const now = () => (deps.clock ?? (() => new Date()))();

  router.put(
    '/v1/password-policy',
    ...endpoint(auth, { who: 'identity', action: 'password_policy.set', summary: 'Set this identity’s password policy', body: passwordPolicy, responses: { 200: passwordPolicyBody } }, async ({ body, caller }) => ({
      body: await setPasswordPolicy(deps.pool, caller, body),
    })),
  );
  router.get(
    '/v1/password-policy',
    ...endpoint(auth, { who: 'identity', action: 'password-policy.get', summary: 'This identity’s password policy', responses: { 200: passwordPolicyBody }, problems: [404] }, async ({ caller }) => {
      const policy = await getPasswordPolicy(deps.pool, caller.identityId);
      if (!policy) throw new NotFoundError('this identity has no password policy');
      return { body: policy };
    }),
  );
  router.get(
    '/v1/service-accounts',
    ...endpoint(auth, { who: 'identity', action: 'service-account.list', summary: 'Service-account inventory', responses: { 200: serviceAccounts } }, async ({ caller }) => ({
      body: { items: await listServiceAccounts(deps.pool, { identityId: caller.identityId, asOf: now() }) },
    })),
  );
  router.get(
    '/v1/reports/orphans',
    ...endpoint(auth, { who: 'identity', action: 'report.orphans', summary: 'Service accounts with no dependents and no recent read', query: orphansQuery, responses: { 200: orphanReport } }, async ({ caller, query }) => {
      const days = query.days ?? deps.orphanDays;
      return { body: { days, items: await findOrphans(deps.pool, { identityId: caller.identityId, asOf: now(), days }) } };
    }),
  );
  return router;
}
