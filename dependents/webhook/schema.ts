import { z } from 'zod';

/** The longest a webhook dependent's call may take (its `timeoutMs`): workflows/options.ts sizes the steps that make them by it. */
export const MAX_TIMEOUT_MS = 60_000;

/** Where events go and which credential of the same identity holds the HMAC signing key. */
export const webhookSettings = z.strictObject({
  url: z
    .url({ protocol: /^https?$/, message: 'must be an http or https URL' })
    .max(2048)
    .refine(withoutUserinfo, 'must not carry a user or password (they would be stored in plain settings)'),
  signingKeyCredential: z
    .string()
    .min(1)
    .max(200)
    .regex(/^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$/, 'must be a credential name'),
  timeoutMs: z.number().int().min(100).max(MAX_TIMEOUT_MS).default(10_000),
});

export type WebhookSettings = z.infer<typeof webhookSettings>;

function withoutUserinfo(url: string): boolean {
  try {
    const u = new URL(url);
    return !u.username && !u.password;
  } catch {
    return true; // the URL check reports it
  }
}
