import { decodeHTML, decodeHTMLAttribute } from 'entities';
import { decodeBase32 } from '../core/base32';
import { UnprocessableError } from '../core/errors';

/**
 * Finds a stored secret inside an outgoing message: the value itself (also reversed, and in Unicode's
 * compatibility form) or its common encodings (base64, base64url, hex, URL-encoding in any of its
 * spellings, HTML character references), and for TOTP seeds the bare base32 secret and the hex of
 * its bytes. The subject is also read as a mail client shows it (RFC 2047 encoded words decoded),
 * the subject and text without the characters a client shows as nothing (U+200B, soft hyphen,
 * variation selectors: \p{Cf} and the default ignorables), each text in the order its right-to-left
 * overrides show it (RLO … PDF, `<bdo dir="rtl">`: see Display), the html's text (markup dropped,
 * references decoded, any case), the html as a client shows it, with scripting off and images
 * blocked (noscript's content rendered, an image's alt text in its place: see shownHtml), and the
 * values of the attributes a client shows (SHOWN_ATTRIBUTES: alt, title, placeholder, …), each a
 * text of its own. Encodings that tools wrap (base64) are also found with whitespace between their
 * characters, and the caseless forms that are written in groups (hex, a TOTP seed: `JBSW Y3DP EHPK
 * 3PXP`, `JBSW-Y3DP-…`, `6b:73:5f…`) with whitespace, `-`, `.`, `_` or `:` between them.
 * Values shorter than MIN_SCANNED_LENGTH are not matched: they would block ordinary words.
 * A subject with an encoded word in a charset the scan cannot read as a mail client does (see
 * READABLE_CHARSETS) is refused with an UnprocessableError (422), if no value is found in it first.
 * What it does not stop (a value disguised on purpose: hidden markup, a split, a cipher) is in the README.
 */
export const MIN_SCANNED_LENGTH = 6;

export interface ScannedMessage {
  to?: string[];
  subject: string;
  text: string;
  html?: string | null;
}

export function findStoredValue(message: ScannedMessage, stored: { name: string; value: string }[]): string | undefined {
  const texts = prepared(message);
  return searchIn(texts, stored) ?? refusedUnread(texts);
}

/** findStoredValue over pages of values (Vault.storedValues), stopping at the first page with a hit; the message is read once. */
export async function findStoredValueIn(message: ScannedMessage, pages: AsyncIterable<{ name: string; value: string }[]>): Promise<string | undefined> {
  const texts = prepared(message);
  for await (const page of pages) {
    const hit = searchIn(texts, page);
    if (hit) return hit;
  }
  return refusedUnread(texts);
}

/**
 * A message the scan could not read whole is refused once no value is found in it: a value found is
 * the more useful answer, and by then the charset quoted back is known to hold none the scan matches
 * (the subject is searched as written too), so the refusal does not echo a stored value.
 */
function refusedUnread({ unread }: Prepared): undefined {
  if (unread === undefined) return undefined;
  const label = unread.length > 40 ? `${unread.slice(0, 40)}…` : unread;
  throw new UnprocessableError(`charset '${label}' in the subject is not accepted (the check for stored values cannot read it as a mail client would): send the subject as UTF-8 text`);
}

interface Prepared {
  /** Every text of the message (as written, as shown, in compatibility form, decoded), one after another. */
  haystack: Searchable;
  lower: Searchable;
  renderedLower: Searchable;
  unwrapped: Searchable;
  ungroupedLower: Searchable;
  /** The charset of an encoded word in the subject that the scan cannot read (the first), if any. */
  unread?: string;
}

/**
 * A text to search for many values' forms: which of its MIN_SCANNED_LENGTH-character runs it holds,
 * hashed into a bitmap made once per message, so that a form whose first and last runs it cannot
 * hold is passed over without reading the text. A scan reads every version an identity can see:
 * each form searched for in the whole text cost ~70 µs a value on a 10 KB message.
 */
/** Searches of one text before it is indexed. */
const INDEX_AFTER_SEARCHES = 64;

class Searchable {
  private seen?: Uint8Array;
  private mask = 0;
  private searches = 0;

  constructor(readonly text: string) {}

  includes(form: string): boolean {
    // The bitmap costs about as much as reading the text a few dozen times: made only for a scan
    // of more values than that (a message checked against a handful reads the text directly).
    if (!this.seen && ++this.searches > INDEX_AFTER_SEARCHES) this.index();
    if (this.seen && !(this.holds(form, 0) && this.holds(form, form.length - MIN_SCANNED_LENGTH))) return false;
    return this.text.includes(form);
  }

  private index(): void {
    const text = this.text;
    const bits = Math.min(1 << 24, Math.max(1 << 10, 2 ** Math.ceil(Math.log2(text.length * 16 + 1))));
    this.mask = bits - 1;
    const seen = new Uint8Array(bits >>> 3);
    for (let i = 0; i + MIN_SCANNED_LENGTH <= text.length; i++) {
      const h = this.hash(text, i);
      seen[h >>> 3]! |= 1 << (h & 7);
    }
    this.seen = seen;
  }

  private holds(form: string, at: number): boolean {
    const h = this.hash(form, at);
    return (this.seen![h >>> 3]! & (1 << (h & 7))) !== 0;
  }

  /** FNV-1a over the UTF-16 code units of text[at, at + MIN_SCANNED_LENGTH). */
  private hash(text: string, at: number): number {
    let h = 0x811c9dc5;
    for (let j = at; j < at + MIN_SCANNED_LENGTH; j++) h = Math.imul(h ^ text.charCodeAt(j), 0x01000193);
    return (h ^ (h >>> 15)) & this.mask;
  }
}

/** The message's texts to search, made once per message, not per value or page of values. */
function prepared(message: ScannedMessage): Prepared {
  // What the recipient reads: a client decodes the subject's encoded words and renders the html.
  // Invisible format characters (zero-width space, soft hyphen) show as nothing in the subject and
  // the text part as they do in the html: `sk_live_\u200b51HxYz` reads as the value.
  const unread: string[] = [];
  const readSubject = decodedSubject(message.subject, unread);
  const subject = visible(readSubject);
  const text = visible(message.text);
  const html = message.html ? htmlTexts(message.html) : [];
  // And in the order a right-to-left override shows them: `sk_live_51HxYz\u202EfEdCbA` reads as the
  // value, which neither the text as written nor the value reversed holds. Made from the texts with
  // their controls, before they are dropped as invisible (the html's in htmlTexts).
  const shown = [subject === message.subject ? '' : subject, text === message.text ? '' : text, displayed(readSubject), displayed(message.text), ...html.filter((t) => t !== message.html)].filter(Boolean);
  const joined = [...(message.to ?? []), message.subject, message.text, message.html ?? '', ...shown].join('\n');
  // Its line breaks as any one kind: SMTP sends every line break as CRLF (nodemailer rewrites them),
  // so a multi-line value (a PEM key, a JSON key file) stored with LF and sent with CRLF is the
  // same mail on the wire as the one sent with LF. (A value stored with CRLF: its forms, below.)
  const lf = joined.replace(/\r\n?/g, '\n');
  const written = lf === joined ? joined : `${joined}\n${lf}`;
  // Unicode's compatibility form too: a value in another normal form (`é` as e and a combining
  // accent) or in compatibility characters (fullwidth `ｓｋ＿ｌｉｖｅ`) reads the same.
  const compatible = written.normalize('NFKC');
  const text0 = compatible === written ? written : `${written}\n${compatible}`;
  // Escaped text decoded, to look for the value and its encodings: percent-escapes in either case,
  // `+` for a space (a form or a query string: URLSearchParams, quote_plus, QueryEscape; base64 in a
  // query string has its `+`, `/` and `=` escaped), HTML character references.
  const htmlDecoded = decodeHTML(text0);
  const decoded = new Set([percentDecoded(text0), percentDecoded(text0.replaceAll('+', ' ')), htmlDecoded, percentDecoded(htmlDecoded)]);
  decoded.delete(text0);
  const haystack = [text0, ...decoded].join('\n');
  // Grouped or wrapped encodings in the decoded texts too: a setup key put in a query string is
  // grouped and escaped (`?key=JBSW+Y3DP+EHPK+3PXP`).
  const unwrapped = haystack.replace(/\s+/g, '');
  // The caseless forms' groups are also set apart with `-` (as vault/totp.ts takes a seed when it is
  // stored: `JBSW-Y3DP-…` is the same seed to the vault), `.`, `_` or `:` (`6b:73:5f`, as openssl
  // and fingerprints write hex). None of these is in the hex or base32 alphabet, so dropping them
  // joins only groups; base64url has `-` and `_` in its alphabet, so base64 keeps `unwrapped`.
  const ungrouped = unwrapped.replace(/[-._:]+/g, '');
  const htmlText = html.join('\n');
  return {
    haystack: new Searchable(haystack),
    lower: new Searchable(haystack.toLowerCase()),
    // CSS (text-transform, small-caps) may show the html's text in another case than it is written in.
    renderedLower: new Searchable(`${htmlText}\n${htmlText.normalize('NFKC')}`.toLowerCase()),
    // base64 tools wrap their output (`base64` at 76 columns, PEM at 64): a long value's encoding may
    // be split across lines. Hex and TOTP seeds are written in groups (`JBSW Y3DP EHPK 3PXP`, as
    // authenticator apps show a setup key and take it back), in either case.
    unwrapped: new Searchable(unwrapped),
    ungroupedLower: new Searchable(ungrouped.toLowerCase()),
    unread: unread[0],
  };
}

function searchIn({ haystack, lower, renderedLower, unwrapped, ungroupedLower }: Prepared, stored: { name: string; value: string }[]): string | undefined {
  for (const { name, value } of stored) {
    if (value.length < MIN_SCANNED_LENGTH) continue;
    for (const { form, caseless, wraps, shown, renderedOnly } of variants(value).flatMap(forms)) {
      if (form.length < MIN_SCANNED_LENGTH) continue;
      if (renderedOnly) {
        if (renderedLower.includes(form.toLowerCase())) return name;
        continue;
      }
      if (haystack.includes(form) || (shown && renderedLower.includes(form.toLowerCase()))) return name;
      if (caseless ? lower.includes(form.toLowerCase()) || (wraps && ungroupedLower.includes(form.toLowerCase())) : wraps && unwrapped.includes(form)) return name;
    }
  }
  return undefined;
}

/**
 * A value, and a multi-line one with its line breaks as the other kind (LF, CRLF): the message's
 * texts are searched with LF (see prepared), and an encoding of the value (base64, say) may have
 * been made of either.
 */
function variants(value: string): string[] {
  const out = [value];
  if (/[\r\n]/.test(value)) {
    const lf = value.replace(/\r\n?/g, '\n');
    out.push(lf, lf.replaceAll('\n', '\r\n'));
  }
  // The secret inside a URL that carries one (`postgresql://app:PASSWORD@db/app`, as the
  // postgres-role provider's `format: url` stores it): the password alone, in every form a value has.
  // (Of a length a word is not: `postgres://app:postgres@…`'s password would refuse every mail that names PostgreSQL.)
  const password = urlPassword(value);
  if (password !== undefined && password.length >= MIN_URL_PASSWORD_LENGTH) out.push(password);
  return [...new Set(out)];
}

/** The shortest password of a URL searched for alone: a longer one is no word of ordinary mail. */
const MIN_URL_PASSWORD_LENGTH = 12;

/** The password of a URL with one (`scheme://user:password@host…`), decoded; undefined for anything else. */
function urlPassword(value: string): string | undefined {
  if (!/^[a-z][a-z0-9+.-]*:\/\/[^/?#]*:[^/?#]*@/i.test(value)) return undefined;
  try {
    const password = new URL(value).password;
    return password ? decodeURIComponent(password) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The base64 bodies of the private-key PEM blocks in a value, their line breaks dropped. Not a
 * certificate's (public: a bundle's certificate may be mailed).
 */
function pemBodies(value: string): string[] {
  const blocks = value.matchAll(/-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----([\s\S]*?)-----END \1-----/g);
  // Headers inside a block (`Proc-Type: …`) are not the key: only lines of base64 are kept.
  return [...blocks].map((m) => m[2]!.split(/\r?\n/).filter((line) => /^[A-Za-z0-9+/=]+$/.test(line.trim())).map((l) => l.trim()).join('')).filter((body) => body.length >= 16);
}

/**
 * The forms a value may take in a message. Hex and a TOTP seed's base32 mean the same in either case
 * (authenticator apps take `jbswy3dp…` as readily as `JBSWY3DP…`), so they match caselessly; both
 * are written in groups (`jbsw y3dp ehpk 3pxp`, `JBSW-Y3DP-…`, `6b73 5f6c`, `6b:73:5f`), and base64
 * wrapped, so those match with whitespace between their characters too (`wraps`), and the caseless
 * ones with `-`, `.`, `_` or `:`. The value itself does not: a short one (a PIN, a word) would match
 * across the spaces and punctuation between unrelated words and numbers (`482-913`, `sk-live`).
 */
function forms(value: string): Form[] {
  const bytes = Buffer.from(value, 'utf8');
  const caseless = /^[0-9a-f]+$/i.test(value);
  // The value as the recipient reads it (`shown`: also in the html's text in any case): as stored,
  // in compatibility form (the message's texts are searched in it too), and reversed, which a
  // right-to-left override (U+202E, `<bdo dir="rtl">`) shows in its order.
  const out: Form[] = [...new Set([value, value.normalize('NFKC'), [...value].reverse().join('')])].map((form) => ({ form, caseless, shown: true }));
  // With spaces in it, as html shows it (each run of white space one space), in the html's text alone.
  const collapsed = collapsedSpace(value);
  if (collapsed !== value) out.push({ form: collapsed, caseless, renderedOnly: true });
  out.push({ form: bytes.toString('hex'), caseless: true, wraps: true }, { form: encodeURIComponent(value), caseless: false });
  for (const form of base64Cores(bytes)) out.push({ form, caseless: false, wraps: true }, { form: toBase64url(form), caseless: false, wraps: true });
  // A PEM block's body alone, wrapped at any width: the key without its BEGIN and END lines.
  for (const body of pemBodies(value)) out.push({ form: body, caseless: false, wraps: true });
  // A TOTP seed: its base32 (in an otpauth:// URI, or the value itself), and the bytes it stands
  // for in hex, as `oathtool --totp <hex>` and some authenticators take them.
  const seed = /^otpauth:\/\/.*[?&]secret=([A-Z2-7]+)/i.exec(value)?.[1] ?? (/^[A-Z2-7]{16,}=*$/i.test(value) ? value.replace(/=+$/, '') : undefined);
  if (seed) out.push({ form: seed, caseless: true, wraps: true }, { form: decodeBase32(seed)!.toString('hex'), caseless: true, wraps: true });
  return out;
}

interface Form {
  form: string;
  /** Matched in any case (hex, base32). */
  caseless: boolean;
  /** Matched with whitespace between its characters (base64, hex, base32: wrapped or grouped); if caseless (hex, base32), with `-`, `.`, `_` or `:` too. */
  wraps?: boolean;
  /** The value as read: also matched in the html's text in any case (CSS may change it). */
  shown?: boolean;
  /** Matched in the html's text alone (in any case): the value with its white space as html shows it. */
  renderedOnly?: boolean;
}


/**
 * base64 of the value wherever it stands in what was encoded: `echo "$KEY" | base64` encodes a
 * newline after it, a Basic auth header `user:` before it, a file the bytes around it. Each of
 * the three alignments (0, 1 or 2 bytes before it within a 3-byte group) encodes the value to a
 * different text; of each, only the characters every one of whose bits comes from the value are
 * the same whatever surrounds it.
 */
function base64Cores(bytes: Buffer): string[] {
  return [0, 1, 2].map((shift) => {
    const encoded = Buffer.concat([Buffer.alloc(shift), bytes]).toString('base64');
    return encoded.slice(Math.ceil((8 * shift) / 6), Math.floor((8 * (shift + bytes.length)) / 6));
  });
}

/** Runs of percent-escapes decoded as UTF-8 (a byte that is no valid UTF-8 becomes U+FFFD, the rest decoded all the same). */
function percentDecoded(text: string): string {
  return text.replace(/(?:%[0-9a-f]{2})+/gi, (run) => Buffer.from(run.replaceAll('%', ''), 'hex').toString('utf8'));
}

/** An RFC 2047 encoded word: charset (an RFC 2231 language after `*` dropped), B or Q, the encoded text. */
const ENCODED_WORD = /=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bq])\?([^?\s]*)\?=/gi;
const ENCODED_WORDS = new RegExp(`${ENCODED_WORD.source}(?:\\s*${ENCODED_WORD.source})*`, 'gi');

/**
 * The subject as a mail client shows it: encoded words decoded and adjacent ones joined across the
 * whitespace between them (RFC 2047 §6.2), so a value split over several words reads whole. Adjacent
 * words in one charset are decoded as one run of bytes, as clients do, so a character split between
 * words survives. nodemailer sends a subject of valid encoded words unchanged. The charset of a word
 * the scan cannot read is added to `unread` (the message is refused); its bytes are still read as
 * UTF-8, so that a value in them as ASCII is found, and refused as the value it is.
 */
function decodedSubject(subject: string, unread: string[]): string {
  const read = (bytes: Buffer[], charset: string) => {
    const joined = Buffer.concat(bytes);
    const shown = inCharset(joined, charset);
    if (shown !== undefined) return shown;
    unread.push(charset);
    return joined.toString('utf8');
  };
  return subject.replace(ENCODED_WORDS, (run) => {
    let shown = '';
    let charset = '';
    let bytes: Buffer[] = [];
    for (const [, label = '', kind = '', text = ''] of run.matchAll(ENCODED_WORD)) {
      if (label.toLowerCase() !== charset) {
        shown += read(bytes, charset);
        charset = label.toLowerCase();
        bytes = [];
      }
      bytes.push(kind.toLowerCase() === 'b' ? Buffer.from(text, 'base64') : qDecoded(text));
    }
    return shown + read(bytes, charset);
  });
}

/** Q encoding: `_` for a space, `=XX` for a byte (either case of hex, as clients accept), the rest as it is. */
function qDecoded(text: string): Buffer {
  return Buffer.concat(text.replaceAll('_', ' ').split(/(=[0-9a-f]{2})/i).map((part, i) => (i % 2 ? Buffer.from(part.slice(1), 'hex') : Buffer.from(part))));
}

/**
 * The charsets whose encoded words the scan reads as a mail client does, as TextDecoder names them
 * (to it `us-ascii`, `latin1` and `iso-8859-1` are `windows-1252`, `iso-8859-9` is `windows-1254`):
 * UTF-8, and single-byte charsets, in which each byte is one character and the ASCII bytes are
 * ASCII, so a value reads the same whichever variant of a table a client holds; and UTF-16 in the
 * byte order its label states. Any other is refused, not read as UTF-8 as it was, which let values
 * through: UTF-7 (`+AHMAaw-` is `sk`), which TextDecoder does not know; the multi-byte charsets it
 * does know (GBK under the label `gb2312`, Big5, Shift_JIS, EUC, ISO-2022-JP), whose tables and
 * escapes differ between decoders, so that a byte pair it reads as one character may be, to a client,
 * a byte it cannot show and the ASCII letter of a value; `ibm866`, whose control bytes ICU maps
 * otherwise than WHATWG. A sender can always write the subject as UTF-8 text.
 */
const READABLE_CHARSETS = new Set([
  'utf-8',
  'utf-16le',
  'utf-16be',
  'windows-874',
  ...[0, 1, 2, 3, 4, 5, 6, 7, 8].map((n) => `windows-125${n}`),
  ...['2', '3', '4', '5', '6', '7', '8', '8-i', '10', '13', '14', '15', '16'].map((part) => `iso-8859-${part}`),
  'koi8-r',
  'koi8-u',
  'macintosh',
  'x-mac-cyrillic',
]);

/**
 * Bytes in a charset of READABLE_CHARSETS; undefined for any other. UTF-16 only under a label that
 * states its byte order: TextDecoder reads `utf-16`, `unicode` and `ucs-2` as little-endian, while
 * RFC 2781 and other decoders read them as big-endian, and the value's bytes swapped would pass.
 */
function inCharset(bytes: Buffer, charset: string): string | undefined {
  if (!bytes.length) return '';
  const decoder = decoderOf(charset);
  if (!decoder || !READABLE_CHARSETS.has(decoder.encoding) || (decoder.encoding.startsWith('utf-16') && charset !== decoder.encoding)) return undefined;
  return decoder.decode(bytes);
}

/** TextDecoder of a charset label, or undefined for a label it does not know (`utf-7`). */
function decoderOf(charset: string) {
  try {
    return new TextDecoder(charset);
  } catch {
    return undefined;
  }
}

/** The rest of a tag after its name, attribute by attribute: a quoted value may hold `>`; unclosed, it runs to the end, as in a browser. */
const TAG_REST = String.raw`(?:[\s/]+|[^\s/>][^\s/>=]*(?:\s*=\s*(?:"[^"]*(?:"|$)|'[^']*(?:'|$)|[^\s>]*))?)*(?:>|$)`;

/**
 * Markup, read in one pass left to right as the HTML tokenizer reads it, so that none hides in another:
 * an element whose content is text (`<textarea><!--</textarea>` holds no comment; the content is kept,
 * shown or not: refusing is the safe direction), a comment (`<!-->` and `--!>` end one too), a bogus
 * comment (`<!x>`, `<?x>`, `</1>`, which end at the first `>`), a tag. The element's name is group 1,
 * its text group 2, `<plaintext>`'s group 3.
 */
function markupOf(textElements: string): RegExp {
  return new RegExp(
    [
      String.raw`<(${textElements})(?=[\s/>])${TAG_REST}([\s\S]*?)(?=<\/\1[\s/>]|$)`,
      String.raw`<plaintext(?=[\s/>])${TAG_REST}([\s\S]*)`,
      String.raw`<!--(?:-?>|[\s\S]*?(?:--!?>|$))`,
      String.raw`<(?:[!?]|\/(?![a-z]))[^>]*(?:>|$)`,
      String.raw`<\/?[a-z][^\s/>]*${TAG_REST}`,
    ].join('|'),
    'gi',
  );
}

/** As a browser with scripting on reads it: `<noscript>`'s content is text (and not shown). */
const MARKUP = markupOf('script|style|textarea|title|xmp|iframe|noembed|noframes|noscript');
/**
 * As a mail client reads it: clients run no scripts, so `<noscript>`'s content is markup, rendered as
 * the rest is (`sk_live_51<noscript><b>Hx</b></noscript>YzAbCdEf` shows the value).
 */
const MARKUP_SHOWN = markupOf('script|style|textarea|title|xmp|iframe|noembed|noframes');

/**
 * The html's text as it renders: markup dropped (`sk_<b></b>live`, `sk_<!-- -->live` show the value
 * whole), then every HTML5 character reference decoded, the legacy forms without `;` too (`&#115k`,
 * `&lowbar;`, `&UnderBar;`), and invisible format characters (soft hyphen, zero-width space) dropped.
 */
function renderedText(html: string): string {
  return visible(decodeHTML(html.replace(MARKUP, (_markup, _element, text?: string, plain?: string) => text ?? plain ?? '')));
}

/**
 * The html's texts to search, each without invisible characters: its rendered text (read with
 * scripting on, noscript's content as text); as a client shows it, where that may differ (see
 * shownHtml); and the attributes a client shows, each a text of its own, so that none joins the text
 * around its element into a value it does not show.
 */
function htmlTexts(html: string): string[] {
  const shown = shownHtml(html);
  const texts = [renderedText(html), ...(shown.differs ? [shown.text] : [])];
  // And with each run of white space shown as the one space a client shows (outside `<pre>`): a
  // value with spaces in it (a passphrase) wrapped across the html's source lines reads whole.
  const collapsed = texts.map(collapsedSpace).filter((t, i) => t !== texts[i]);
  return [...texts, ...collapsed, ...shown.attributes];
}

/** Each run of HTML's white space (space, tab, line feed, form feed, carriage return) as one space. */
function collapsedSpace(text: string): string {
  return text.replace(/[\t\n\f\r ]+/g, ' ');
}

/**
 * Attributes whose values a client shows or reads out: an image's alt text (with images blocked,
 * as most clients start), a tooltip, a field's value or placeholder, an option's label, what a screen
 * reader says. Values it does not show (href, src, data-*) are searched as written only.
 */
const SHOWN_ATTRIBUTES = new Set(['alt', 'title', 'placeholder', 'value', 'label', 'aria-label', 'aria-description']);

/** One attribute of a tag: name, then a value in double, single or no quotes (unclosed, to the end, as TAG_REST reads it). */
const ATTRIBUTE = /([^\s/>][^\s/>=]*)(?:\s*=\s*(?:"([^"]*)"?|'([^']*)'?|([^\s>]*)))?/g;

/** A tag's attributes by lowercase name, the first of a name kept (as a browser keeps it), values as written. */
function attributesOf(tag: string): Map<string, string> {
  const out = new Map<string, string>();
  ATTRIBUTE.lastIndex = 0;
  for (let match = ATTRIBUTE.exec(tag); match; match = ATTRIBUTE.exec(tag)) {
    const [, name = '', double, single, bare] = match;
    const key = name.toLowerCase();
    if (!out.has(key)) out.set(key, double ?? single ?? bare ?? '');
  }
  return out;
}

/**
 * Elements that are lines of their own (blocks; each is a bidi paragraph, which an override around it
 * does not reach), as a browser's style sheet has them; an element that CSS makes a block is not known.
 */
const BLOCKS = new Set(
  'address article aside blockquote body caption center dd details dialog dir div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 head header hgroup hr html legend li listing main menu nav ol optgroup option p plaintext pre search section summary table tbody td textarea tfoot th thead tr ul xmp'.split(' '),
);

/**
 * The html as a mail client shows it: no scripts run (noscript's content is markup, MARKUP_SHOWN),
 * images blocked (an `<img>`'s or image button's alt text stands in its place, a unit of its own, as
 * a broken image's box is), and `<bdo>` elements and bidi controls laid out (Display), each block,
 * `<br>` and line of the source a line of its own. Its text (`differs`) is searched only where it can
 * show what the rendered text does not: an override reversed a run, an alt text stood in, or noscript
 * was read as markup. Where a `<bdo>` ends follows the tree builder roughly: at its end tag, unless a
 * block opened inside it is still open, or when a block it is in ends (a block's start tag ends an
 * open `<p>`, as in standards mode); inside a block opened within it, it has no effect (the block is
 * a paragraph of its own, and the override is not inherited). An element that CSS makes a block, or
 * makes an override (`unicode-bidi: bidi-override`), is not known. Also the values of
 * SHOWN_ATTRIBUTES in every tag, references decoded as in an attribute.
 */
function shownHtml(html: string): { text: string; attributes: string[]; differs: boolean } {
  // The open blocks and `<bdo>` elements, innermost last (other elements do not change the order of the text).
  const open: { name: string; opening?: Opening }[] = [];
  const counts = new Map<string, number>();
  let ignoredBdo = 0;
  // A line starts inside the `<bdo>` elements opened in its block (a block's own line is not overridden).
  let inside: Opening[] | undefined;
  const overrides = (): Opening[] => {
    if (inside) return inside;
    let i = open.length;
    while (i > 0 && open[i - 1]!.opening) i--;
    return (inside = open.slice(i).map((entry) => entry.opening!));
  };
  const push = (entry: { name: string; opening?: Opening }) => {
    open.push(entry);
    counts.set(entry.name, (counts.get(entry.name) ?? 0) + 1);
    inside = undefined;
  };
  const popTo = (name: string) => {
    if (!counts.get(name)) return;
    inside = undefined;
    for (let entry = open.pop(); entry; entry = open.pop()) {
      counts.set(entry.name, counts.get(entry.name)! - 1);
      if (entry.name === name) return;
    }
  };
  const display = new Display(overrides);
  const attributes = new Set<string>();
  let differs = false;
  let pending = '';
  const flush = () => {
    if (pending) display.write(pending.includes('&') ? decodeHTML(pending) : pending);
    pending = '';
  };
  let at = 0;
  for (const match of html.matchAll(MARKUP_SHOWN)) {
    const [markup] = match;
    const content = match[2] ?? match[3];
    pending += html.slice(at, match.index);
    at = match.index + markup.length;
    const tag = /^<(\/?)([a-z][^\s/>]*)/i.exec(markup);
    if (tag) {
      const closing = tag[1] === '/';
      const name = tag[2]!.toLowerCase();
      const attrs = closing ? new Map<string, string>() : attributesOf(markup.slice(tag[0].length, markup.length - (content?.length ?? 0)));
      for (const [key, value] of attrs) {
        if (!SHOWN_ATTRIBUTES.has(key)) continue;
        // As shown: its right-to-left overrides laid out too (a title of `sk_live_51HxYz&#x202E;fEdCbA` reads as the value).
        const decoded = decodeHTMLAttribute(value);
        attributes.add(visible(decoded));
        const shown = displayed(decoded);
        if (shown) attributes.add(shown);
      }
      if (name === 'noscript') differs = true;
      if (name === 'bdo') {
        flush();
        if (!closing) {
          // Nested deeper than Unicode's 125 levels, further ones are not followed (nor their end tags).
          if (overrides().length >= MAX_BIDI_DEPTH) ignoredBdo++;
          else {
            const opening = { reversed: decodeHTMLAttribute(attrs.get('dir') ?? '').toLowerCase() === 'rtl', isolate: true, element: true };
            push({ name, opening });
            display.enter(opening);
          }
        } else if (ignoredBdo) ignoredBdo--;
        else if (open.at(-1)?.name === 'bdo') {
          popTo(name);
          display.closeElement();
        }
      } else if (name === 'br' || BLOCKS.has(name)) {
        flush();
        if (closing && name !== 'br') popTo(name);
        else if (name !== 'br') {
          popTo('p');
          if (name !== 'hr') push({ name });
        }
        display.break();
      } else if (!closing && (name === 'img' || (name === 'input' && attrs.get('type')?.toLowerCase() === 'image')) && attrs.get('alt')) {
        flush();
        display.enter({ reversed: false, isolate: true, element: true });
        display.write(decodeHTMLAttribute(attrs.get('alt')!).replace(LINE_BREAKS, ' '));
        display.closeElement();
        differs = true;
      }
    }
    if (content) pending += content;
  }
  pending += html.slice(at);
  flush();
  attributes.delete('');
  return { text: visible(display.done()), attributes: [...attributes], differs: differs || display.reorders };
}

/**
 * The text in the order a right-to-left override shows it, without invisible characters; '' if no
 * override is in it (the text as written and without them is searched already).
 */
function displayed(text: string): string {
  if (!/[\u202a-\u202e\u2066-\u2069]/.test(text)) return '';
  // A paragraph separator ends every embedding, override and isolate; U+2028 ends only the line.
  const display = new Display((separator, open) => (separator === '\u2028' ? open : []));
  display.write(text);
  return display.reorders ? visible(display.done()) : '';
}

/** Unicode's limit on nested embeddings, overrides and isolates (UAX #9 max_depth). */
const MAX_BIDI_DEPTH = 125;
/** Line and paragraph separators: `\r\n`, `\n`, `\r`, NEL, the information separators (bidi class B), U+2028, U+2029. */
// eslint-disable-next-line no-control-regex -- the information separators end a bidi paragraph
const LINE_BREAK = /(\r\n?|[\n\x1c-\x1e\x85\u2028\u2029])/;
const LINE_BREAKS = new RegExp(LINE_BREAK.source, 'g');
/** Bidi controls that open or close a span: LRE RLE PDF LRO RLO, LRI RLI FSI PDI. */
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

/** How a span of text is laid out. */
interface Opening {
  /** A right-to-left override (RLO, `<bdo dir="rtl">`): what is in it shows in reverse order. */
  reversed: boolean;
  /** An isolate (LRI, RLI, FSI, an element): a PDF inside it does not end what is around it. */
  isolate: boolean;
  /** Opened by an element (`<bdo>`, an alt text): only its end ends it, no control in its text. */
  element: boolean;
}

/** The line's outermost span: left to right, not ended by any control. */
const ROOT: Opening = { reversed: false, isolate: false, element: false };

interface Span extends Opening {
  parts: (string | Span)[];
}

function spanOf({ reversed, isolate, element }: Opening): Span {
  return { reversed, isolate, element, parts: [] };
}

/**
 * Text laid out line by line in the order its overrides show it. Of the Unicode bidirectional
 * algorithm (UAX #9) it follows what reorders Latin text: a right-to-left override (RLO … PDF, or
 * `<bdo dir="rtl">`) shows what it holds in reverse order, characters and nested spans alike, each
 * nested span laid out by its own direction (`\u202Eab\u202Dcd\u202Cef` shows `fecdba`). Embeddings
 * (LRE, RLE), left-to-right overrides and isolates keep their content's order; within an override
 * they stand as a unit. PDF ends the innermost span if it is an embedding or override (not an
 * isolate), PDI the innermost isolate with the spans open inside it, neither an element's span; an
 * unterminated span runs to the end of its line or paragraph (`reopened` says which spans a new line
 * starts inside). Spans nested deeper than Unicode's 125 levels are not followed. What it does not
 * follow: the reordering of runs by the direction of their letters (Hebrew, Arabic, RLM) and of the
 * paragraph, which moves words, not the characters of one.
 */
class Display {
  private readonly lines: string[] = [];
  private root = spanOf(ROOT);
  /** The spans the line started inside (see top), the first `carriedOpen` of them still open, and the innermost one's Span once made. */
  private carried: Opening[] = [];
  private carriedOpen = 0;
  private carriedSpan?: Span;
  /** The spans opened in the line, innermost last: inside the carried ones. */
  private spans: Span[] = [];
  private overflow = 0;
  /** Whether a right-to-left override was opened: else the text shows in the order it is written. */
  reorders = false;

  /** reopened: the spans a line starts inside, given the separator that ended the last and the spans open at its end. */
  constructor(private readonly reopened: (separator: string, open: Opening[]) => Opening[]) {}

  /** Text with bidi controls and line breaks in it. */
  write(text: string): void {
    const pieces = text.split(LINE_BREAK);
    for (let i = 0; i < pieces.length; i++) {
      if (i % 2) this.break(pieces[i]!);
      else this.line(pieces[i]!);
    }
  }

  /** Ends the line (`<br>`, a block, a line break in the text). */
  break(separator = '\n'): void {
    const open = this.carriedOpen === this.carried.length && !this.spans.length ? this.carried : [...this.carried.slice(0, this.carriedOpen), ...this.spans];
    const carried = this.reopened(separator, open);
    this.lines.push(this.shown());
    this.root = spanOf(ROOT);
    this.carried = carried;
    this.carriedOpen = Math.min(carried.length, MAX_BIDI_DEPTH);
    this.carriedSpan = undefined;
    this.spans = [];
    this.overflow = 0;
  }

  enter(opening: Opening): void {
    if (1 + this.carriedOpen + this.spans.length > MAX_BIDI_DEPTH) {
      this.overflow++;
      return;
    }
    const span = spanOf(opening);
    this.top().parts.push(span);
    this.spans.push(span);
    if (opening.reversed) this.reorders = true;
  }

  /** Ends the innermost element's span, and any span opened inside it. */
  closeElement(): void {
    if (this.overflow) this.overflow--;
    else this.close((span) => span.element);
  }

  /** The lines laid out, one after another. */
  done(): string {
    this.lines.push(this.shown());
    return this.lines.join('\n');
  }

  /**
   * The innermost open span. One carried from the line before is made only when something is put in
   * it (a line inside 125 spans would make them all, on every line): until then it holds nothing,
   * and those carried around it hold nothing but it, which shows as it does, so each made one stands
   * in the root in their place.
   */
  private top(): Span {
    if (this.spans.length) return this.spans.at(-1)!;
    if (!this.carriedOpen) return this.root;
    if (!this.carriedSpan) {
      const span = spanOf(this.carried[this.carriedOpen - 1]!);
      if (this.root.parts.length) span.parts.push(this.root.parts.pop()!);
      this.root.parts.push(span);
      this.carriedSpan = span;
    }
    return this.carriedSpan;
  }

  private line(text: string): void {
    let from = 0;
    BIDI_CONTROLS.lastIndex = 0;
    for (let match = BIDI_CONTROLS.exec(text); match; match = BIDI_CONTROLS.exec(text)) {
      const [control] = match;
      this.text(text.slice(from, match.index));
      from = match.index + 1;
      if (control === '\u202c' || control === '\u2069') {
        if (this.overflow) this.overflow--;
        // PDF ends the innermost embedding or override, if no isolate is opened inside it.
        else if (control === '\u202c') this.close((span) => !span.isolate, true);
        else this.close((span) => span.isolate && !span.element);
      } else this.enter({ reversed: control === '\u202e', isolate: control >= '\u2066', element: false });
    }
    this.text(text.slice(from));
  }

  /**
   * Ends the innermost span `stop` picks (the innermost only, if `innermost`), with the spans opened
   * inside it; none outside an element's span, unless it is the one picked: an element ends at its
   * end tag, no control in its text.
   */
  private close(stop: (span: Opening) => boolean, innermost = false): void {
    for (let i = this.spans.length - 1; i >= 0; i--) {
      const span = this.spans[i]!;
      if (stop(span)) {
        this.spans.length = i;
        return;
      }
      if (span.element || innermost) return;
    }
    for (let i = this.carriedOpen - 1; i >= 0; i--) {
      const span = this.carried[i]!;
      if (stop(span)) {
        this.spans.length = 0;
        this.carriedOpen = i;
        this.carriedSpan = undefined;
        return;
      }
      if (span.element || innermost) return;
    }
  }

  private text(text: string): void {
    if (text) this.top().parts.push(text);
  }

  private shown(): string {
    const out: string[] = [];
    this.lay(this.root, out);
    return out.join('');
  }

  private lay({ reversed, parts }: Span, out: string[]): void {
    for (let i = 0; i < parts.length; i++) {
      const part = parts[reversed ? parts.length - 1 - i : i]!;
      if (typeof part !== 'string') this.lay(part, out);
      else out.push(reversed ? [...part].reverse().join('') : part);
    }
  }
}


/**
 * Text without the characters a client shows as nothing: format characters (\p{Cf}: soft hyphen,
 * zero-width space and joiners, BOM, bidirectional controls) and the rest of Unicode's default
 * ignorables (variation selectors, the combining grapheme joiner, Hangul fillers).
 */
function visible(text: string): string {
  return text.replace(/[\p{Cf}\p{Default_Ignorable_Code_Point}]/gu, '');
}

function toBase64url(base64: string): string {
  return base64.replaceAll('+', '-').replaceAll('/', '_');
}
