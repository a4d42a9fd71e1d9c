// Here, not in core/config.ts, what needs none of the configuration's checks (nor the zod they are
// written with): a client command of the CLI, the workflow bundler.

/** The API's port when PORT is not set; also where the CLI's client commands look by default. */
export const DEFAULT_PORT = 8080;

/** A setting, or several, the service cannot start with: each problem names its variable. */
export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid configuration:\n${problems.map((p) => `  ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}
