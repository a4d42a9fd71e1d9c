import type { Db } from '../db/pool';
import type { SecretStore } from './secret-store';

/**
 * A reference a caller gives (a credential's name or id, a grantee's name) that names nothing is
 * written into the call's denied row as given: the trail of what was tried. Unless it is a value the
 * caller can read (a version of one of its own credentials, or of one granted to it): a secret
 * pasted where a name goes (`sk_live_…` and `ghp_…` are name-shaped, and many keys are UUIDs) would
 * stay in the append-only, hash-chained log for good. Such a reference is withheld: left out of the
 * row, `<field>Withheld: 'stored-value'` in its place; the error does not repeat it either
 * (core/errors.ts, refWithheld). Found by the keyed fingerprint each version keeps
 * (SecretStore.readableAmong: one statement, nothing decrypted), and looked for only once a
 * reference has found nothing: a call that finds its credential pays nothing.
 *
 * Only the caller's own and granted values: the mark is seen by the caller (its error, its own audit
 * rows), and checked against every identity's values it would confirm a guess at another identity's
 * (a password, say), one audited call per guess. Another identity's value pasted by mistake is
 * written as given, as any other name that finds nothing.
 */
export const STORED_VALUE = 'stored-value';

export type StoredValues = Pick<SecretStore, 'readableAmong'>;

/** The references among `given` that are values `readerId` can read: one statement for them all (none for none). */
export async function storedRefs(db: Db, secrets: StoredValues, readerId: string, given: string[]): Promise<Set<string>> {
  const unique = [...new Set(given)];
  const readable = await secrets.readableAmong(db, unique.map((text) => ({ readerId, text })));
  return new Set(unique.filter((_, i) => readable[i]));
}

/** The mark of a reference withheld because the check could not be made (the database failed it): never written as given unchecked. */
export const UNCHECKED = 'unchecked';

/** Withholds `field` from an audit row's `detail`: left out, and `<field>Withheld` says why. */
export function withhold(detail: Record<string, unknown>, field: string, why: typeof STORED_VALUE | typeof UNCHECKED = STORED_VALUE): void {
  delete detail[field];
  detail[`${field}Withheld`] = why;
}

/**
 * The check where a denied row is written for references that named nothing: `refs` holds each as
 * given, by the field of `detail` it is written under (or would be). Each that is a value `readerId`
 * can read is withheld from `detail` (one statement for them all); answers their fields. The
 * caller's error then says storedValueGiven() in place of a withheld one, and is marked refWithheld.
 * A check that fails withholds them all (UNCHECKED) and throws.
 */
export async function withholdStored(db: Db, secrets: StoredValues, readerId: string, detail: Record<string, unknown>, refs: Record<string, unknown>): Promise<Set<string>> {
  // A field may give several forms of its reference (a grant id as written and in lower case): withheld if any is a value.
  const given = Object.entries(refs)
    .map(([field, ref]): [string, string[]] => [field, (Array.isArray(ref) ? ref : [ref]).filter((r): r is string => typeof r === 'string')])
    .filter(([, forms]) => forms.length > 0);
  let stored = new Set<string>();
  try {
    if (given.length > 0) stored = await storedRefs(db, secrets, readerId, given.flatMap(([, forms]) => forms));
  } catch (err) {
    // Failed closed: the call fails (its failure row is written from `detail`), none of them as given.
    for (const [field] of given) withhold(detail, field, UNCHECKED);
    throw err;
  }
  const withheld = new Set(given.filter(([, forms]) => forms.some((f) => stored.has(f))).map(([field]) => field));
  for (const field of withheld) withhold(detail, field);
  return withheld;
}
