import { UnprocessableError } from '../../core/errors';
import { EnvFileAbsent } from './files';

/**
 * One line of a dotenv file, cut around its value, so that everything but the value is kept byte
 * for byte. Lines are Buffers: other lines are never decoded, so their bytes cannot change.
 *
 * Values are written in the line's own style, and only when every common reader (the dotenv npm
 * package and Node's --env-file, python-dotenv, docker compose) reads them back the same:
 * - unquoted  KEY=value   no whitespace, quotes, #, $ or backslash;
 * - single    KEY='value' no ', backslash or line break; everything else is literal;
 * - double    KEY="value" no ", backslash, $ or `; a line break is written as \n (CR as \r),
 *                         the only escapes all of them decode the same way;
 * and in no style a control character other than tab (in quotes). A value outside its line's
 * rules is refused, never re-quoted: the style is the file owner's choice, and keeping it is what
 * makes apply followed by restore give back the original bytes.
 */
export type Quote = '' | "'" | '"';

export interface KeyLine {
  index: number;
  /** head + raw + tail + eol is the line. */
  head: string;
  quote: Quote;
  raw: string;
  tail: string;
  eol: string;
}

// eslint-disable-next-line no-control-regex -- finding control characters is the point
const CONTROL = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]/;
const FORBIDDEN: Record<Quote, RegExp> = { '': /[\s#'"`$\\]/, "'": /['\\\n\r]/, '"': /["\\$`]/ };
const NAMES: Record<Quote, string> = { '': 'unquoted', "'": 'single-quoted', '"': 'double-quoted' };
const STYLES: Record<Quote, string> = {
  '': 'an unquoted value (no whitespace, quotes, #, $ or backslash)',
  "'": "a single-quoted value (no ', backslash or line break)",
  '"': 'a double-quoted value (no ", backslash, $ or `)',
};
const ASSIGNMENT = /^(?:\xEF\xBB\xBF)?[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*(.*)$/s;

export function encodeValue(value: string, quote: Quote): string | null {
  if (CONTROL.test(value) || FORBIDDEN[quote].test(value)) return null;
  return quote === '"' ? value.replace(/\n/g, '\\n').replace(/\r/g, '\\r') : value;
}

export function decodeValue(raw: string, quote: Quote): string {
  return quote === '"' ? raw.replace(/\\([nr])/g, (_, c: string) => (c === 'n' ? '\n' : '\r')) : raw;
}

/** True when writing the line's current value back would give the same bytes. */
export function isCanonical(line: KeyLine): boolean {
  return encodeValue(decodeValue(line.raw, line.quote), line.quote) === line.raw;
}

export function describeStyle(quote: Quote): string {
  return STYLES[quote];
}

/** The styles (other than `quote`) in which `value` could be written. */
export function stylesThatFit(value: string, quote: Quote): string[] {
  return (['', "'", '"'] as Quote[]).filter((q) => q !== quote && encodeValue(value, q) !== null).map((q) => NAMES[q]);
}

/** Splits after every LF, so each piece keeps its own line ending (LF, CRLF or none). */
export function splitLines(content: Buffer): Buffer[] {
  const lines: Buffer[] = [];
  let start = 0;
  for (let nl = content.indexOf(10); nl !== -1; nl = content.indexOf(10, start)) {
    lines.push(content.subarray(start, nl + 1));
    start = nl + 1;
  }
  if (start < content.length) lines.push(content.subarray(start));
  return lines;
}

/** Finds the one line that sets `key`, skipping lines inside other keys' multi-line quoted values. */
export function findKeyLine(lines: Buffer[], key: string, file: string): KeyLine {
  const found: number[] = [];
  let open: string | null = null;
  lines.forEach((line, i) => {
    const text = withoutEol(line).toString('latin1');
    if (open) {
      if (closingQuote(text, open, 0) >= 0) open = null;
      return;
    }
    const m = ASSIGNMENT.exec(text);
    if (!m) return;
    const rest = m[2]!;
    const spans = /^["'`]/.test(rest) && closingQuote(rest, rest[0]!, 1) < 0;
    if (m[1] === key) {
      if (spans) throw new UnprocessableError(`${key} in ${file} has a value that spans several lines or lacks its closing quote; only one-line values are supported`);
      found.push(i);
    }
    if (spans) open = rest[0]!;
  });
  if (found.length === 0) throw new EnvFileAbsent(`${key} is not set in ${file}; the dependent is misconfigured: the file must already have one line ${key}=…`);
  if (found.length > 1) {
    throw new UnprocessableError(`${key} is set ${found.length} times in ${file} (lines ${found.map((i) => i + 1).join(', ')}); it must be set exactly once`);
  }
  return cutLine(lines[found[0]!]!, found[0]!, key, file);
}

export function joinLine(line: KeyLine, raw: string): Buffer {
  return Buffer.from(line.head + raw + line.tail + line.eol, 'utf8');
}

function cutLine(line: Buffer, index: number, key: string, file: string): KeyLine {
  const body = withoutEol(line);
  const eol = line.subarray(body.length).toString('latin1');
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(body);
  } catch {
    throw new UnprocessableError(`the line of ${key} in ${file} is not valid UTF-8`);
  }
  const m = new RegExp(`^(\\uFEFF?[ \\t]*(?:export[ \\t]+)?${key}[ \\t]*=)(.*)$`, 's').exec(text)!;
  const [, assign, rest] = m as unknown as [string, string, string];
  const quoted = /^[ \t]*(["'`])/.exec(rest);
  if (quoted) {
    const quote = quoted[1]!;
    if (quote === '`') throw new UnprocessableError(`${key} in ${file} is backtick-quoted; use no quotes, '…' or "…"`);
    const open = quoted[0].length;
    const close = closingQuote(rest, quote, open);
    if (!/^[ \t]*(?:#.*)?$/s.test(rest.slice(close + 1))) {
      throw new UnprocessableError(`${key} in ${file} has text after its closing quote that is not a comment`);
    }
    return { index, head: assign + rest.slice(0, open), quote: quote as Quote, raw: rest.slice(open, close), tail: rest.slice(close), eol };
  }
  // An inline comment needs whitespace before its #, as python-dotenv and compose read it.
  const u = /^([ \t]*)((?:[^\s#].*?)?)((?:[ \t]+#.*)?[ \t]*)$/s.exec(rest);
  if (!u) {
    throw new UnprocessableError(`${key} in ${file} cannot be read the same way by every dotenv parser (a # right after = or unusual whitespace); quote its value`);
  }
  return { index, head: assign + u[1], quote: '', raw: u[2]!, tail: u[3]!, eol };
}

function withoutEol(line: Buffer): Buffer {
  let end = line.length;
  if (line[end - 1] === 10) end--;
  if (line[end - 1] === 13) end--;
  return line.subarray(0, end);
}

/** Index of the first unescaped `quote` at or after `from`, or -1. */
function closingQuote(text: string, quote: string, from: number): number {
  for (let i = from; i < text.length; i++) {
    if (text[i] === '\\') i++;
    else if (text[i] === quote) return i;
  }
  return -1;
}
