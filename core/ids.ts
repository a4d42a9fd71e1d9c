/** A UUID in its canonical 8-4-4-4-12 form (any version). Anything else never reaches a uuid column. */
export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function isUuid(s: string): boolean {
  return UUID.test(s);
}

/**
 * The credential id a ref gives, if it has an id's form (any 8-4-4-4-12 hex string, in either case),
 * spelt as the database returns ids: in lower case. A look-up by id compares it as a uuid, never as
 * text (`id::text = $1` misses an id given in upper case).
 */
export function idOf(ref: string): string | undefined {
  return UUID.test(ref) ? ref.toLowerCase() : undefined;
}
