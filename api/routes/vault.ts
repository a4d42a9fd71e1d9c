import { Router } from 'express';
import type { z } from 'zod';
import { checkDependents, type Dependent } from '../../dependents';
import { checkPolicy } from '../../providers';
import type { Pool } from '../../db/pool';
import { checkPassword, getPasswordPolicy } from '../../vault/password-policy';
import type { Caller, CredentialPolicy, CredentialRef, Vault } from '../../vault/vault';
import { endpoint, type AuthDeps } from '../endpoint';
import { credentialDeleted, credentialList, credentialMeta, secretRead, storedVersion, totpCode } from '../responses';
import { credentialDeleteQuery, credentialsQuery, credentialUpdate, vaultGet, vaultStore, vaultTotp } from '../schemas';
import { isUuid } from '../../core/ids';

export interface VaultRouteDeps {
  pool: Pool;
  vault: Vault;
  /** The dependent types this deployment knows, for validating settings at store time. */
  dependentTypes: Record<string, Dependent<any>>;
}

export function vaultRoutes(auth: AuthDeps, deps: VaultRouteDeps): Router {
  const router = Router();
  const { vault } = deps;

  const checked = <P extends CredentialPolicy>(policy: P): P => checkedPolicy(deps, policy);

  router.post(
    '/v1/vault.store',
    ...endpoint(auth, {
        who: 'identity',
        action: 'vault.store',
        summary: 'Store a credential, or a new current version of it',
        body: vaultStore,
        responses: { 201: storedVersion },
        problems: [409, 422],
      }, async ({ body, caller }) => ({ status: 201, body: await storeCredential(deps, caller, body) })),
  );

  router.post(
    '/v1/vault.get',
    ...endpoint(auth, { who: 'identity', action: 'vault.get', summary: 'Read a credential’s value', body: vaultGet, responses: { 200: secretRead }, problems: [404] }, async ({ body, caller }) => ({
      body: await vault.get(caller, body.id ? { id: body.id } : { name: body.name! }, body.version),
    })),
  );

  router.post(
    '/v1/vault.totp',
    ...endpoint(auth, { who: 'identity', action: 'vault.totp', summary: 'The current code of a stored TOTP seed', body: vaultTotp, responses: { 200: totpCode }, problems: [404, 422] }, async ({ body, caller }) => ({
      body: await vault.totp(caller, body.id ? { id: body.id } : { name: body.name! }),
    })),
  );

  router.get(
    '/v1/credentials',
    ...endpoint(auth, { who: 'identity', action: 'credential.list', summary: 'List credentials (metadata only)', query: credentialsQuery, responses: { 200: credentialList } }, async ({ query, caller }) => {
      const items = await vault.list(caller.identityId, query);
      return { body: { items, nextCursor: items.length === query.limit ? items.at(-1)!.name : null } };
    }),
  );

  router.patch(
    '/v1/credentials/:ref',
    ...endpoint(auth, { who: 'identity', action: 'credential.update', summary: 'Change a credential’s policy (never rotates)', body: credentialUpdate, responses: { 200: credentialMeta }, problems: [404, 422] }, async ({ req, body, caller }) => ({
      body: await vault.update(caller, refOf(req.params.ref), checked(body)),
    })),
  );

  // ?destroy=true deletes every version's ciphertext for good; otherwise the delete can be undone.
  router.delete(
    '/v1/credentials/:ref',
    ...endpoint(
      auth,
      { who: 'identity', action: 'credential.delete', summary: 'Delete a credential (restorable), or destroy it', query: credentialDeleteQuery, responses: { 200: credentialDeleted }, problems: [404] },
      async ({ req, query, caller }) => {
      const ref = refOf(req.params.ref);
      if (query.destroy === 'true') return { body: await vault.destroy(caller, ref) };
      return { body: await vault.remove(caller, ref) };
    }),
  );

  router.post(
    '/v1/credentials/:ref/restore',
    ...endpoint(auth, { who: 'identity', action: 'credential.restore', summary: 'Undo a soft delete', responses: { 200: credentialMeta }, problems: [404, 409] }, async ({ req, caller }) => ({
      body: await vault.restore(caller, refOf(req.params.ref)),
    })),
  );

  return router;
}

/** vault.store with the checks around it: the password policy, and the provider's and dependents' settings (HTTP and MCP). */
export async function storeCredential(deps: VaultRouteDeps, caller: Caller, body: z.output<typeof vaultStore>) {
  if (body.kind === 'password') {
    const policy = await getPasswordPolicy(deps.pool, caller.identityId);
    if (policy) checkPassword(body.value!, policy);
  }
  return deps.vault.store(caller, checkedPolicy(deps, body));
}

/** Provider and dependent settings are checked by their own schemas before anything is stored. */
function checkedPolicy<P extends CredentialPolicy>(deps: VaultRouteDeps, policy: P): P {
  return {
    ...policy,
    ...(policy.rotation ? { rotation: checkPolicy(policy.rotation) } : {}),
    ...(policy.dependents ? { dependents: checkDependents(policy.dependents, deps.dependentTypes) } : {}),
  };
}

/** A path segment names a credential by id (a UUID) or by name. */
export function refOf(segment: unknown): CredentialRef {
  const s = String(segment);
  return isUuid(s) ? { id: s } : { name: s };
}
