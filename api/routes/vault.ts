import type { Client } from '@temporalio/client';
import { Router } from 'express';
import type { z } from 'zod';
import { checkDependents, type Dependent } from '../../dependents';
import { checkPolicy } from '../../providers';
import type { Pool } from '../../db/pool';
import { checkPassword, getPasswordPolicy } from '../../vault/password-policy';
import { TOTP_SEED_NOT_ROTATED, type Caller, type CredentialPolicy, type CredentialRef, type Vault } from '../../vault/vault';
import { endpoint, type AuthDeps } from '../endpoint';
import { credentialDeleted, credentialList, credentialMeta, secretRead, storedVersion, totpCode } from '../responses';
import { credentialDeleteQuery, credentialRef, credentialsQuery, credentialUpdate, vaultGet, vaultStore, vaultTotp } from '../schemas';
import { isUuid } from '../../core/ids';
import { ConflictError, refWithheld, UnavailableError, UnprocessableError, ValidationError } from '../../core/errors';
import { statusOf } from '../../core/run-chain';

export interface VaultRouteDeps {
  pool: Pool;
  vault: Vault;
  /** Temporal, to refuse destroying a credential whose rotation is running (absent: not checked). */
  client?: Client;
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
      { who: 'identity', action: 'credential.delete', summary: 'Delete a credential (restorable), or destroy it', query: credentialDeleteQuery, responses: { 200: credentialDeleted }, problems: [404, 409] },
      async ({ req, query, caller }) => {
      const ref = refOf(req.params.ref);
      if (query.destroy === 'true') return { body: await vault.destroy(caller, ref, { check: (id) => refuseWhileRotating(deps, id) }) };
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

/**
 * A credential whose rotation is running is not destroyed: the run still has a version to revoke at
 * the provider (the one it replaced, in grace) or an attempt to undo (dependents to restore, a pending
 * value to discard), and with the versions gone it could do neither, nor tell the owners. Deleting
 * (restorable) is allowed: the run goes on, and retention destroys the credential once it has ended.
 */
async function refuseWhileRotating(deps: VaultRouteDeps, credentialId: string): Promise<void> {
  if (!deps.client) return;
  let status: string | null;
  try {
    const client = deps.client;
    status = await client.connection.withDeadline(Date.now() + 5_000, () => statusOf(client.workflow.getHandle(`rotate:${credentialId}`)));
  } catch {
    throw new UnavailableError('whether the credential is being rotated could not be checked (Temporal is unavailable); nothing was destroyed: try again shortly');
  }
  if (status === 'RUNNING') {
    throw new ConflictError(
      `the credential is being rotated (workflow rotate:${credentialId}): destroying it now would leave the rotation unable to revoke or undo at the provider. Cancel the rotation or wait for it to end, or delete the credential without destroy (retention destroys it once the rotation has ended)`,
    );
  }
}

/** vault.store with the checks around it: the password policy, and the provider's and dependents' settings (HTTP and MCP). */
export async function storeCredential(deps: VaultRouteDeps, caller: Caller, body: z.output<typeof vaultStore>) {
  if (body.kind === 'totp_seed' && body.rotation) throw new UnprocessableError(TOTP_SEED_NOT_ROTATED);
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

/**
 * A path segment names a credential by id (a UUID) or by name; anything else is a 400 (credentialRef),
 * never looked up nor written into the audit row as the name it is not. (One that names nothing and
 * is a stored value is withheld where its 404 is decided: vault/withheld.ts.)
 */
export function refOf(segment: unknown): CredentialRef {
  const s = String(segment);
  if (isUuid(s)) return { id: s };
  const checked = credentialRef.safeParse(s);
  if (!checked.success) {
    const message = checked.error.issues[0]!.message;
    // Not in the request log nor the problem's instance either (refWithheld): it may be a value pasted there.
    throw refWithheld(new ValidationError(`the request path is not valid: ref: ${message}`, [{ path: 'ref', message }]));
  }
  return { name: s };
}
