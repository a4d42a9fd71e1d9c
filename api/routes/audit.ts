import { Router } from 'express';
import type { Pool } from '../../db/pool';
import { appendAudit, listAudit, verifyAuditChain } from '../../vault/audit';
import type { Vault } from '../../vault/vault';
import { endpoint, type AuthDeps } from '../endpoint';
import { auditList, chainReport } from '../responses';
import { auditQuery, chainQuery } from '../schemas';
import { isUuid } from '../../core/ids';
import { type StoredValues, withholdStored } from '../../vault/withheld';

export function auditRoutes(auth: AuthDeps, deps: { pool: Pool; vault: Vault; secrets: StoredValues }): Router {
  const router = Router();

  router.get(
    '/v1/audit/verify',
    ...endpoint(
      auth,
      { who: 'admin', action: 'audit.verify', summary: 'Recompute the audit hash chain (against a head recorded earlier, with ?head=<seq>:<hash>)', query: chainQuery, responses: { 200: chainReport } },
      async ({ query }) => ({ body: await verifyAuditChain(deps.pool, query.head) }),
    ),
  );

  // An identity sees its own events (with ?credential= of its own: every event on it); the admin token sees everyone's.
  router.get(
    '/v1/audit',
    ...endpoint(auth, { who: 'identity-or-admin', action: 'audit.list', summary: 'Audit events (an identity’s own, or all with the admin token)', query: auditQuery, responses: { 200: auditList }, problems: [422] }, async ({ query, identity, caller }) => {
      let credentialId: string | undefined;
      let found: string | undefined;
      if (query.credential) {
        // Unknown (to this identity): an empty list, same as a credential with no events. The admin
        // names any identity's credential; by an id, also one whose row is gone.
        found = await deps.vault.resolveForAudit(identity?.id ?? null, query.credential);
        credentialId = found ?? (!identity && isUuid(query.credential) ? query.credential : '00000000-0000-0000-0000-000000000000');
        // The answer does not tell another identity's credential from none, but the log does: an
        // identity probing ids or names against others' trails leaves a denied row for each try,
        // naming what it tried: an id or a name of a credential's form (auditQuery refuses anything
        // else with a 400, its row saying only that; before, any text up to 200 characters was
        // written here as given, control characters and a value pasted by mistake included).
        // (The text tried is withheld if it is a value the caller can read: vault/withheld.ts.)
        if (!found && identity) {
          const detail: Record<string, unknown> = { credential: query.credential, error: 'not-found' };
          await withholdStored(deps.pool, deps.secrets, identity.id, detail, { credential: query.credential });
          await appendAudit(deps.pool, { ...caller, action: 'audit.list', outcome: 'denied', detail });
        }
      }
      const items = await listAudit(deps.pool, {
        // The trail of an identity's own credential is all of it: the reads of the identities it
        // granted access to too, not only its own calls. (A refused call names no credential.)
        identityId: found ? undefined : identity?.id,
        credentialId,
        since: query.since ? new Date(query.since) : undefined,
        afterSeq: query.after,
        limit: query.limit,
      });
      return { body: { items, nextCursor: items.length === query.limit ? items.at(-1)!.seq : null } };
    }),
  );

  return router;
}
