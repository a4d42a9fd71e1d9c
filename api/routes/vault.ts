import { Router } from 'express';
import { checkPolicy } from '../../providers';
import type { Vault } from '../../vault/vault';
import { endpoint, type AuthDeps } from '../endpoint';
import { credentialsQuery, vaultGet, vaultStore, vaultTotp } from '../schemas';

export function vaultRoutes(auth: AuthDeps, vault: Vault): Router {
  const router = Router();

  router.post(
    '/v1/vault.store',
    ...endpoint(auth, { who: 'identity', action: 'vault.store', body: vaultStore }, async ({ body, caller }) => {
      const rotation = body.rotation ? checkPolicy(body.rotation) : body.rotation;
      return { status: 201, body: await vault.store(caller, { ...body, rotation }) };
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

  return router;
}
