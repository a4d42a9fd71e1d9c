import path from 'node:path';
import { z } from 'zod';

/** Which line of which file holds the credential. The path is checked again when the file is opened. */
export const envFileSettings = z.strictObject({
  file: z
    .string()
    .min(1)
    .max(1024)
    .refine((f) => !f.includes('\0'), 'must not contain a NUL character')
    .refine((f) => !path.isAbsolute(f), 'must be a path relative to the env files root')
    .refine((f) => !f.split(/[\\/]/).includes('..'), "must not contain '..'"),
  key: z
    .string()
    .max(256)
    .regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be an environment variable name: letters, digits and _, not starting with a digit'),
});

export type EnvFileSettings = z.infer<typeof envFileSettings>;
