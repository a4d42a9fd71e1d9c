import { randomUUID } from 'node:crypto';
import type { Pool } from '../db/pool';
import { ConflictError, NotFoundError, refWithheld, storedValueGiven, UnprocessableError } from '../core/errors';
import { isUuid } from '../core/ids';
import { audited } from './audited';
import { refDetail } from './vault';
import type { Caller, CredentialRef } from './types';
import { type StoredValues, withholdStored } from './withheld';

/**
 * Read access to one credential, given by its owner to another identity (a webhook dependent
 * fetches the new value with its own token). The grantee reads it by id through vault.get and
 * vault.totp; revoking takes effect on the next read. Both are audited.
 */
export interface Grant {
  id: string;
  credentialId: string;
  credentialName: string;
  ownerId: string;
  granteeId: string;
  granteeName: string;
  createdAt: string;
}

export class Grants {
  constructor(
    private readonly pool: Pool,
    /** For references that name nothing: withheld from the answer and the row if they are values the caller can read (vault/withheld.ts). */
    private readonly secrets: StoredValues,
  ) {}

  create(caller: Caller, credential: CredentialRef, grantee: string): Promise<Grant> {
    // The credential as given (`name`, or `ref` for an id), as the other changes write it, and the
    // grantee: both unchecked until their lookups have decided (AuditNote.unchecked), so a statement
    // failing before then does not write a value pasted there as given.
    const ref = refDetail(credential);
    const refField = Object.keys(ref)[0]!;
    return audited(this.pool, caller, 'grant.create', { ...ref, grantee }, async (tx, note) => {
      const byId = 'id' in credential;
      // FOR SHARE: a delete in progress (which revokes the grants it sees) is waited for, and its
      // row then read again, deleted: a 404. Without it, the grant's insert (whose foreign key
      // takes only a key-share lock) went in unseen by the delete's revoke, and a restore brought it back.
      const cred = (
        await tx.query(
          `SELECT id, name FROM credentials WHERE identity_id = $1 AND deleted_at IS NULL AND ${byId ? 'id = $2::uuid' : 'name = $2'} FOR SHARE`,
          [caller.identityId, byId ? credential.id : credential.name],
        )
      ).rows[0];
      if (!cred) {
        // The credential found nothing (the grantee, in the row from the start, not looked for yet):
        // each that is a value the caller can read is withheld (vault/withheld.ts), the others written as given.
        const withheld = await withholdStored(tx, this.secrets, caller.identityId, note.detail, { ...ref, grantee });
        note.unchecked.clear();
        if (withheld.has(refField)) throw refWithheld(new NotFoundError(`no credential with the ${byId ? 'id' : 'name'} given (${storedValueGiven()})`));
        throw new NotFoundError(`no credential with ${byId ? `id ${credential.id}` : `name '${credential.name}'`}`);
      }
      note.unchecked.delete(refField); // one of the caller's credentials
      note.credentialId = cred.id;
      // By id when it has that form (no identity name does), else by name: never both at once.
      const who = (await tx.query(`SELECT id, name FROM identities WHERE ${isUuid(grantee) ? 'id = $1::uuid' : 'name = $1'}`, [grantee])).rows[0];
      if (!who) {
        const withheld = await withholdStored(tx, this.secrets, caller.identityId, note.detail, { grantee });
        note.unchecked.clear();
        if (withheld.size > 0) throw refWithheld(new NotFoundError(`no identity with the grantee given (${storedValueGiven("an identity's name or id")})`));
        throw new NotFoundError(`no identity '${grantee}'`);
      }
      note.unchecked.clear(); // an identity
      if (who.id === caller.identityId) throw new UnprocessableError('an identity already reads its own credentials');
      const id = randomUUID();
      const inserted = await tx.query(
        `INSERT INTO grants (id, credential_id, grantee_id) VALUES ($1, $2, $3)
         ON CONFLICT (credential_id, grantee_id) WHERE revoked_at IS NULL DO NOTHING RETURNING created_at`,
        [id, cred.id, who.id],
      );
      if (!inserted.rows[0]) throw new ConflictError(`identity '${who.name}' can already read '${cred.name}'`);
      note.detail.grantId = id;
      note.detail.granteeId = who.id;
      return {
        id,
        credentialId: cred.id,
        credentialName: cred.name,
        ownerId: caller.identityId,
        granteeId: who.id,
        granteeName: who.name,
        createdAt: inserted.rows[0].created_at.toISOString(),
      };
    }, undefined, [refField, 'grantee']);
  }

  /**
   * Only the owner revokes; the grantee loses access at once. `given`: the id as the caller wrote it
   * (`grantId` is its lower case), checked as written when it names no grant.
   */
  revoke(caller: Caller, grantId: string, given = grantId): Promise<{ id: string; revokedAt: string }> {
    // The id unchecked until the UPDATE has found its grant or the check has run (AuditNote.unchecked).
    return audited(this.pool, caller, 'grant.revoke', { grantId }, async (tx, note) => {
      const { rows } = await tx.query(
        `UPDATE grants g SET revoked_at = now()
           FROM credentials c
          WHERE g.id = $1 AND c.id = g.credential_id AND c.identity_id = $2 AND g.revoked_at IS NULL
          RETURNING g.credential_id, g.revoked_at`,
        [grantId, caller.identityId],
      );
      if (!rows[0]) {
        // A value the caller can read (many keys are UUIDs) pasted where a grant id goes is neither
        // written into its denied row nor repeated (vault/withheld.ts): before, both held it as given.
        // As written and in lower case: the id is looked up in either, a value stored in either.
        const withheld = await withholdStored(tx, this.secrets, caller.identityId, note.detail, { grantId: [given, grantId] });
        note.unchecked.clear();
        if (withheld.size > 0) throw refWithheld(new NotFoundError(`no active grant with the id given (${storedValueGiven('a grant id, from GET /v1/grants')})`));
        throw new NotFoundError(`no active grant with id ${grantId}`);
      }
      note.unchecked.clear(); // a grant of the caller's
      note.credentialId = rows[0].credential_id;
      return { id: grantId, revokedAt: rows[0].revoked_at.toISOString() };
    }, undefined, ['grantId']);
  }

  /** Grants the identity gave and grants it holds. */
  async list(identityId: string): Promise<{ given: Grant[]; received: Grant[] }> {
    const { rows } = await this.pool.query(
      `SELECT g.id, g.credential_id, c.name AS credential_name, c.identity_id AS owner_id, g.grantee_id, i.name AS grantee_name, g.created_at
         FROM grants g JOIN credentials c ON c.id = g.credential_id JOIN identities i ON i.id = g.grantee_id
        WHERE g.revoked_at IS NULL AND c.deleted_at IS NULL AND (c.identity_id = $1 OR g.grantee_id = $1)
        ORDER BY g.created_at`,
      [identityId],
    );
    const all: Grant[] = rows.map((r) => ({
      id: r.id,
      credentialId: r.credential_id,
      credentialName: r.credential_name,
      ownerId: r.owner_id,
      granteeId: r.grantee_id,
      granteeName: r.grantee_name,
      createdAt: r.created_at.toISOString(),
    }));
    return { given: all.filter((g) => g.ownerId === identityId), received: all.filter((g) => g.granteeId === identityId) };
  }
}
