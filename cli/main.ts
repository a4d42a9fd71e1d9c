import { ConfigError, loadConfig } from '../core/config';
import { createLogger } from '../core/logger';
import { migrate } from '../db/pool';
import { rekey } from './rekey';
import { serve } from './serve';

const USAGE = `Usage: mailgent <command>

Commands:
  serve     run the API and a worker, embedding Postgres, Temporal and an SMTP sink
            for whatever DATABASE_URL, TEMPORAL_ADDRESS and SMTP_URL do not name (default)
  api       run only the HTTP API
  worker    run only a Temporal worker
  migrate   bring the database schema up to date and exit
  rekey     re-wrap every data key under a new master key and exit

Configuration is read from the environment; see the README.`;

async function main(argv: string[]): Promise<number> {
  const command = argv[0] ?? 'serve';
  if (command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const config = loadConfig();
  const logger = createLogger({ level: config.LOG_LEVEL });
  switch (command) {
    case 'serve':
      await serve(config, logger, ['api', 'worker']);
      return 0;
    case 'api':
      await serve(config, logger, ['api']);
      return 0;
    case 'worker':
      await serve(config, logger, ['worker']);
      return 0;
    case 'migrate': {
      if (!config.DATABASE_URL) throw new Error('migrate needs DATABASE_URL (serve migrates the embedded database itself)');
      await migrate(config.DATABASE_URL, logger);
      process.stdout.write('schema is up to date\n');
      return 0;
    }
    case 'rekey': {
      const result = await rekey(config, logger);
      process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      return 0;
    }
    default:
      process.stderr.write(`unknown command '${command}'\n\n${USAGE}\n`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (err) => {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`mailgent: ${(err as Error).message}\n`);
      process.exitCode = 1;
    }
  },
);
