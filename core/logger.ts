import { pino, type Logger, type DestinationStream } from 'pino';

export type { Logger };

/**
 * Structured JSON logs. Nothing logs a secret on purpose; redaction is the net under that:
 * any field with a secret-sounding name is replaced wherever it sits, two levels deep.
 */
const SECRET_KEYS = ['value', 'token', 'secret', 'password', 'authorization', 'cookie', 'key', 'masterKey', 'plaintext', 'otpauthUri', 'code'];

export const REDACT_PATHS = [
  ...SECRET_KEYS,
  ...SECRET_KEYS.map((k) => `*.${k}`),
  ...SECRET_KEYS.map((k) => `*.*.${k}`),
  'req.headers.authorization',
  'req.headers.cookie',
];

export function createLogger(options: { level?: string; destination?: DestinationStream } = {}): Logger {
  return pino(
    {
      level: options.level ?? 'info',
      base: { service: 'mailgent' },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      serializers: { err: pino.stdSerializers.err },
    },
    options.destination,
  );
}
