/**
 * The API's port when PORT is not set; also where the CLI's client commands look by default. Here,
 * not in core/config.ts: a client command loads no configuration (nor the ESM zod it is checked with).
 */
export const DEFAULT_PORT = 8080;
