import { randomUUID } from 'node:crypto';
import { createWriteStream, mkdirSync, renameSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { SMTPServer } from 'smtp-server';
import type { Logger } from '../core/logger';

/**
 * A local SMTP server that accepts every message and keeps it as an .eml file in `mailDir`.
 * Files appear atomically (written under a temporary name, then renamed).
 */
export interface SmtpSink {
  url: string;
  port: number;
  mailDir: string;
  stop(): Promise<void>;
}

export async function startSmtpSink(opts: { mailDir: string; port?: number; logger?: Logger }): Promise<SmtpSink> {
  mkdirSync(opts.mailDir, { recursive: true });
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    banner: 'mailgent local sink',
    size: 10 * 1024 * 1024,
    logger: false,
    async onData(stream, session, callback) {
      const id = `${new Date().toISOString().replace(/[:.]/g, '-')}-${randomUUID().slice(0, 8)}`;
      const tmp = path.join(opts.mailDir, `.${id}.tmp`);
      try {
        await pipeline(stream, createWriteStream(tmp, { mode: 0o600 }));
        renameSync(tmp, path.join(opts.mailDir, `${id}.eml`));
        opts.logger?.debug({ file: `${id}.eml`, recipients: session.envelope.rcptTo.length }, 'mail sink stored a message');
        callback();
      } catch (err) {
        callback(err as Error);
      }
    },
  });
  server.on('error', (err) => opts.logger?.warn({ err }, 'mail sink error'));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, '127.0.0.1', () => resolve());
  });
  const { port } = server.server.address() as AddressInfo;
  opts.logger?.info({ port, mailDir: opts.mailDir }, 'embedded SMTP sink ready');
  return {
    url: `smtp://127.0.0.1:${port}`,
    port,
    mailDir: opts.mailDir,
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
