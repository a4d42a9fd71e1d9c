import { z } from 'zod';

export const DEFAULT_SYMBOLS = '!#$%&()*+,-.:;<=>?@[]^_{}~';

/** Password policy of the `generated` provider: length and the character classes that must appear. */
export const generatedSettings = z
  .strictObject({
    length: z.number().int().min(8).max(4096).default(32),
    lowercase: z.boolean().default(true),
    uppercase: z.boolean().default(true),
    digits: z.boolean().default(true),
    symbols: z.boolean().default(false),
    symbolSet: z.string().min(1).max(64).regex(/^[\x21-\x7e]+$/, 'printable ASCII without spaces').default(DEFAULT_SYMBOLS),
    prefix: z.string().max(32).regex(/^[A-Za-z0-9_-]*$/).default(''),
  })
  .refine((s) => s.lowercase || s.uppercase || s.digits || s.symbols, { message: 'at least one character class must be enabled' });

export type GeneratedSettings = z.infer<typeof generatedSettings>;
