import { readFileSync } from 'node:fs';
import { type CliError, usageError } from './errors';

/**
 * Where a secret value comes from. Never from a plain argv flag: argv is visible to every user in
 * `ps`. In order: --value-file (`-` = stdin), --value-env NAME, piped stdin, else a prompt that
 * does not echo. Stdin that is a terminal is read through that prompt, `--value-file -` too (read
 * as a pipe is, what was typed was echoed), which then takes every line, as a file does, up to
 * Ctrl-D (a PEM key pasted whole). One trailing newline (what `echo` and editors add) is dropped.
 * It must be UTF-8 text (see utf8).
 */
export async function readSecret(opts: { file?: string; envName?: string; what: string }): Promise<string> {
  let value: string;
  if (opts.file !== undefined && opts.envName !== undefined) throw usageError('give --value-file or --value-env, not both');
  // Neither the path nor the variable's name is repeated in an error: given by mistake as
  // "$STRIPE_KEY", either is the secret itself. Only the error code (ENOENT …), never its message,
  // which quotes the path.
  if (opts.file !== undefined && opts.file !== '-') {
    let bytes: Buffer;
    try {
      bytes = readFileSync(opts.file);
    } catch (err) {
      throw usageError(`cannot read the file named by --value-file (${(err as NodeJS.ErrnoException).code ?? 'unknown error'})`);
    }
    value = utf8(bytes, opts.what, 'the file named by --value-file');
  } else if (opts.envName !== undefined) {
    const fromEnv = process.env[opts.envName];
    if (!fromEnv) throw usageError(`the variable named by --value-env is not set or is empty (it takes the variable's name: --value-env STRIPE_KEY, not "$STRIPE_KEY")`);
    // Node has already decoded the variable, each byte that is not UTF-8 replaced by U+FFFD: that
    // mark is all that is left to tell a mangled value by.
    if (fromEnv.includes(REPLACEMENT)) throw notText(opts.what, 'the variable named by --value-env', ` (it holds U+FFFD, which stands in for such bytes)`);
    value = fromEnv;
  } else if (!process.stdin.isTTY) {
    // A pipe or a redirected file (`--value-file -`, or no source named): all of it, every line.
    value = utf8(await readStdin(), opts.what, 'stdin');
  } else {
    // A terminal (`--value-file -` on one too): never read in cooked mode, which echoes each key.
    // Asked for as a file, all its lines up to Ctrl-D: ended at the first line, a pasted key was
    // stored cut short, and its other lines went on to the shell.
    const lines = opts.file === '-';
    value = await prompt(`${opts.what}${lines ? ' (every line up to Ctrl-D)' : ''}: `, opts.what, lines);
  }
  value = value.replace(/\r?\n$/, '');
  if (!value) throw usageError(`the ${opts.what.toLowerCase()} is empty`);
  return value;
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

const REPLACEMENT = '\uFFFD';

/**
 * The value as text, refused unless it is UTF-8: decoding with replacement (readFileSync's 'utf8',
 * Buffer#toString) turned each byte of a Latin-1 `p\xe4ss` into U+FFFD, and the mangled password was
 * stored (or hashed, for `leak`) as if it were the value. The API refuses a body that is not UTF-8
 * for the same reason. The value itself is never repeated. A byte order mark is kept, as it was.
 */
function utf8(bytes: Uint8Array, what: string, from: string): string {
  try {
    return new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    throw notText(what, from);
  }
}

function notText(what: string, from: string, why = ''): CliError {
  return usageError(`the ${what.toLowerCase()} read from ${from} is not UTF-8 text${why}: convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) and try again`);
}

/**
 * Reads a line from the terminal without echoing it (`lines`: every line, up to Ctrl-D; a line break
 * typed or pasted, CR, LF or CRLF, is kept as LF). What is typed must be UTF-8 as well: a terminal
 * set to Latin-1 sends `ä` as the one byte 0xe4, which decoding with replacement (setEncoding) made
 * U+FFFD. Decoded as it comes (stream: a character's bytes may arrive apart), refused at the first
 * byte that cannot be UTF-8.
 */
function prompt(question: string, what: string, lines = false): Promise<string> {
  const { stdin, stderr } = process;
  stderr.write(question);
  stdin.setRawMode(true);
  stdin.resume();
  const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  let value = '';
  let afterCr = false;
  return new Promise((resolve, reject) => {
    const finish = () => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      stderr.write('\n');
    };
    const onData = (bytes: Buffer) => {
      let chunk: string;
      try {
        chunk = decoder.decode(bytes, { stream: true });
      } catch {
        finish();
        reject(notText(what, 'the prompt'));
        return;
      }
      for (const ch of chunk) {
        const crlf = afterCr && ch === '\n';
        afterCr = ch === '\r';
        if (lines && (ch === '\r' || ch === '\n')) {
          if (!crlf) value += '\n';
          continue;
        }
        if (ch === '\r' || ch === '\n' || ch === '\u0004') {
          finish();
          resolve(value);
          return;
        }
        if (ch === '\u0003') {
          finish();
          process.exit(130);
        }
        if (ch === '\u007f' || ch === '\b') value = value.slice(0, -1);
        else value += ch;
      }
    };
    stdin.on('data', onData);
  });
}
