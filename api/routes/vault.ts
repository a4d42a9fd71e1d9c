import { Router } from 'express';
import { checkDependents, type Dependent } from '../../dependents';
import { checkPolicy } from '../../providers';
import type { Pool } from '../../db/pool';
import { checkPassword, getPasswordPolicy } from '../../vault/password-policy';
import type { CredentialPolicy, CredentialRef, Vault } from '../../vault/vault';
import { endpoint, type AuthDeps } from '../endpoint';
import { credentialsQuery, credentialUpdate, vaultGet, vaultStore, vaultTotp } from '../schemas';

export interface VaultRouteDeps {
  pool: Pool;
  vault: Vault;
  /** The dependent types this deployment knows, for validating settings at store time. */
  dependentTypes: Record<string, Dependent<any>>;
}

export function vaultRoutes(auth: AuthDeps, deps: VaultRouteDeps): Router {
  const router = Router();
  const { vault } = deps;

  /** Provider and dependent settings are checked by their own schemas before anything is stored. */
  const checked = <P extends CredentialPolicy>(policy: P): P => ({
    ...policy,
    ...(policy.rotation ? { rotation: checkPolicy(policy.rotation) } : {}),
    ...(policy.dependents ? { dependents: checkDependents(policy.dependents, deps.dependentTypes) } : {}),
  });

  router.post(
    '/v1/vault.store',
    ...endpoint(auth, { who: 'identity', action: 'vault.store', body: vaultStore }, async ({ body, caller }) => {
      if (body.kind === 'password') {
        const policy = await getPasswordPolicy(deps.pool, caller.identityId);
        if (policy) checkPassword(body.value!, policy);
      }
      return { status: 201, body: await vault.store(caller, checked(body)) };
    }),
  );

  router.post(
    '/v1/vault.get',
    ...endpoint(auth, { who: 'identity', action: 'vault.get', body: vaultGet }, async ({ body, caller }) => ({
      body: await vault.get(caller, body.id ? { id: body.id } : { name: body.name! }, body.version),
    })),
  );

  router.post(
    '/v1/vault.totp',
    ...endpoint(auth, { who: 'identity', action: 'vault.totp', body: vaultTotp }, async ({ body, caller }) => ({
      body: await vault.totp(caller, body.id ? { id: body.id } : { name: body.name! }),
    })),
  );

  router.get(
    '/v1/credentials',
    ...endpoint(auth, { who: 'identity', query: credentialsQuery }, async ({ query, caller }) => {
      const items = await vault.list(caller.identityId, query);
      return { body: { items, nextCursor: items.length === query.limit ? items.at(-1)!.name : null } };
    }),
  );

  router.patch(
    '/v1/credentials/:ref',
    ...endpoint(auth, { who: 'identity', action: 'credential.update', body: credentialUpdate }, async ({ req, body, caller }) => ({
      body: await vault.update(caller, refOf(req.params.ref), checked(body)),
    })),
  );

  // ?destroy=true deletes every version's ciphertext for good; otherwise the delete can be undone.
  router.delete(
    '/v1/credentials/:ref',
    ...endpoint(auth, { who: 'identity', action: 'credential.delete' }, async ({ req, caller }) => {
      const ref = refOf(req.params.ref);
      if (req.query.destroy === 'true') return { body: await vault.destroy(caller, ref) };
      return { body: await vault.remove(caller, ref) };
    }),
  );

  router.post(
    '/v1/credentials/:ref/restore',
    ...endpoint(auth, { who: 'identity', action: 'credential.restore' }, async ({ req, caller }) => ({
      body: await vault.restore(caller, refOf(req.params.ref)),
    })),
  );

  return router;
}

/** A path segment names a credential by id (a UUID) or by name. */
export function refOf(segment: unknown): CredentialRef {
  const s = String(segment);
  return /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(s) ? { id: s } : { name: s };
}
