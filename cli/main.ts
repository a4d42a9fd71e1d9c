import { ConfigError } from '../core/defaults';
import { clientCommands } from './client/commands';
import { CliError, EXIT, HelpRequested, unexpectedArgument, usageError } from './client/errors';
import { helpAsked, reportError } from './client/context';
import { MCP_USAGE, mcpCommand } from './mcp';

/**
 * The `mailgent` command (bin/mailgent.js runs this file through tsx). Service commands read their
 * configuration from the environment and load the server code only when run; client commands
 * talk to a running service over its HTTP API. Exit codes are documented in the README ("CLI").
 */
interface Command {
  /** The line in the usage text. */
  summary: string;
  usage?: string;
  run(args: string[]): Promise<number>;
}

const serviceCommand = (summary: string, run: () => Promise<number>): Command => ({
  summary,
  async run(args) {
    if (helpAsked(args)) throw new HelpRequested();
    if (args.length) throw unexpectedArgument(1, USAGE, ': configuration comes from the environment');
    return run();
  },
});

async function service(parts?: ('api' | 'worker')[]) {
  const { createLogger } = await import('../core/logger');
  // Loaded here, not at the top: a client command needs no configuration (nor zod's ESM modules).
  const { loadConfig } = await import('../core/config');
  const config = loadConfig(process.env, parts);
  return { config, logger: createLogger({ level: config.LOG_LEVEL }) };
}

async function serveParts(parts: ('api' | 'worker')[]): Promise<number> {
  const { config, logger } = await service(parts);
  const { serve } = await import('./serve');
  await serve(config, logger, parts);
  return EXIT.ok;
}

const COMMANDS: Record<string, Command> = {
  serve: serviceCommand('serve                      run the API and a worker, embedding what is not configured (default)', () => serveParts(['api', 'worker'])),
  api: serviceCommand('api                        run only the HTTP API', () => serveParts(['api'])),
  worker: serviceCommand('worker                     run only a Temporal worker', () => serveParts(['worker'])),
  migrate: serviceCommand('migrate                    bring the database schema up to date and exit', async () => {
    const { config, logger } = await service();
    if (!config.DATABASE_URL) throw usageError('migrate needs DATABASE_URL (serve migrates the embedded database itself)');
    const { migrate } = await import('../db/pool');
    await migrate(config.DATABASE_URL, logger);
    process.stdout.write('schema is up to date\n');
    return EXIT.ok;
  }),
  rekey: serviceCommand('rekey                      re-wrap every data key under a new master key and exit', async () => {
    const { config, logger } = await service();
    const { rekey } = await import('./rekey');
    process.stdout.write(`${JSON.stringify(await rekey(config, logger), null, 2)}\n`);
    return EXIT.ok;
  }),
  ...clientCommands,
  mcp: { summary: 'mcp                        MCP over stdio for an agent, bridged to the running service', usage: MCP_USAGE, run: mcpCommand },
};

const USAGE = `Usage: mailgent <command> [options]     (mailgent <command> --help for its options)

Service (configured by environment variables, see the README):
${['serve', 'api', 'worker', 'migrate', 'rekey'].map((c) => `  ${COMMANDS[c]!.summary}`).join('\n')}

Client (talk to a running service: MAILGENT_URL, MAILGENT_TOKEN, MAILGENT_ADMIN_TOKEN):
${Object.keys(COMMANDS)
  .filter((c) => !['serve', 'api', 'worker', 'migrate', 'rekey'].includes(c))
  .map((c) => `  ${COMMANDS[c]!.summary}`)
  .join('\n')}

Client options: --url <url>, --token <token> (or --admin-token), --json (one JSON document on stdout).
Exit codes: 0 ok, 1 the operation failed, 2 usage or configuration error,
            3 not authorised or not found, 4 service unreachable or busy (retry later).`;

async function main(argv: string[]): Promise<number> {
  const [name = 'serve', ...args] = argv;
  if (name === 'help' || name === '--help' || name === '-h') {
    const topic = name === 'help' && args[0] ? COMMANDS[args[0]] : undefined;
    process.stdout.write(`${topic?.usage ?? USAGE}\n`);
    return EXIT.ok;
  }
  const command = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (!command) throw usageError(`unknown command '${name}'`, USAGE);
  if (!['serve', 'api', 'worker'].includes(name)) exitQuietlyOnClosedStdout();
  try {
    return await command.run(args);
  } catch (err) {
    // Decided by each command's parse, with its options: `--details -h` gives -h as the value.
    if (!(err instanceof HelpRequested)) throw err;
    process.stdout.write(`${command.usage ?? USAGE}\n`);
    return EXIT.ok;
  }
}

/** A reader that stops early (`mailgent get x --json | true`) is not our error: no stack trace, the code so far. */
function exitQuietlyOnClosedStdout(): void {
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    process.exit(process.exitCode ?? EXIT.ok);
  });
}

const argv = process.argv.slice(2);
main(argv).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (err) => {
    if (err instanceof CliError) {
      // `mcp`'s stdout is the MCP channel: its errors go to stderr only, --json or not.
      reportError(err, argv[0] ?? 'serve', argv.includes('--json') && argv[0] !== 'mcp');
      process.exitCode = err.exitCode;
    } else if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exitCode = EXIT.usage;
    } else {
      process.stderr.write(`mailgent: ${(err as Error).message}\n`);
      process.exitCode = EXIT.failed;
    }
  },
);
