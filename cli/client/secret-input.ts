import { readFileSync } from 'node:fs';
import { usageError } from './errors';

/**
 * Where a secret value comes from. Never from a plain argv flag: argv is visible to every user in
 * `ps`. In order: --value-file (`-` = stdin), --value-env NAME, piped stdin, else a prompt that
 * does not echo. One trailing newline (what `echo` and editors add) is dropped.
 */
export async function readSecret(opts: { file?: string; envName?: string; what: string }): Promise<string> {
  let value: string;
  if (opts.file !== undefined && opts.envName !== undefined) throw usageError('give --value-file or --value-env, not both');
  // Neither the path nor the variable's name is repeated in an error: given by mistake as
  // "$STRIPE_KEY", either is the secret itself. Only the error code (ENOENT …), never its message,
  // which quotes the path.
  if (opts.file !== undefined && opts.file !== '-') {
    try {
      value = readFileSync(opts.file, 'utf8');
    } catch (err) {
      throw usageError(`cannot read the file named by --value-file (${(err as NodeJS.ErrnoException).code ?? 'unknown error'})`);
    }
  } else if (opts.envName !== undefined) {
    const fromEnv = process.env[opts.envName];
    if (!fromEnv) throw usageError(`the variable named by --value-env is not set or is empty (it takes the variable's name: --value-env STRIPE_KEY, not "$STRIPE_KEY")`);
    value = fromEnv;
  } else if (opts.file === '-' || !process.stdin.isTTY) {
    value = await readStdin();
  } else {
    value = await prompt(`${opts.what}: `);
  }
  value = value.replace(/\r?\n$/, '');
  if (!value) throw usageError(`the ${opts.what.toLowerCase()} is empty`);
  return value;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** Reads a line from the terminal without echoing it. */
function prompt(question: string): Promise<string> {
  const { stdin, stderr } = process;
  stderr.write(question);
  stdin.setRawMode(true);
  stdin.setEncoding('utf8');
  stdin.resume();
  let value = '';
  return new Promise((resolve) => {
    const finish = () => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      stderr.write('\n');
    };
    const onData = (chunk: string) => {
      for (const ch of chunk) {
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
