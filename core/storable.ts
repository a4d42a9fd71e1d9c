// PostgreSQL stores neither a NUL character nor half a surrogate pair (text and jsonb both refuse them).
// eslint-disable-next-line no-control-regex -- the NUL is exactly what this looks for
const UNSTORABLE = /\u0000|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
/** The cheap first look: only a string holding a NUL or a surrogate needs the exact check above. */
// eslint-disable-next-line no-control-regex -- as above
const SUSPECT = /[\u0000\ud800-\udfff]/;

/** Whether PostgreSQL can store the string as text or inside jsonb. */
export function storableText(s: string): boolean {
  return !SUSPECT.test(s) || !UNSTORABLE.test(s);
}
