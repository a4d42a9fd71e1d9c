import { z } from 'zod';

/** A role name we quote ourselves: no case folding surprises, nothing to escape. */
const roleName = z
  .string()
  .regex(/^[A-Za-z_][A-Za-z0-9_]{0,62}$/, 'must be a role name: letters, digits and _, starting with a letter or _, at most 63 characters');

/** The name of another credential of the same identity (as the API accepts it). */
const credentialName = z
  .string()
  .min(1)
  .max(200)
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$/, 'must be a credential name');

/**
 * `role`: one role whose password is replaced in place. `roles`: two roles that take turns, so the
 * live one keeps working while the idle one gets the new password; the value is then a URL naming
 * the live role.
 */
export const postgresRoleSettings = z
  .strictObject({
    adminCredential: credentialName,
    role: roleName.optional(),
    roles: z.tuple([roleName, roleName]).optional(),
    format: z.enum(['password', 'url']).default('password'),
    passwordLength: z.number().int().min(16).max(256).default(32),
    /** Symbols in the password too (- . _ ~, which a URL carries as they are); letters and digits always. */
    symbols: z.boolean().default(false),
  })
  .superRefine((s, ctx) => {
    if ((s.role === undefined) === (s.roles === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['role'], message: 'give exactly one of role (one role) or roles (two roles that alternate)' });
    }
    if (s.roles && s.roles[0] === s.roles[1]) {
      ctx.addIssue({ code: 'custom', path: ['roles'], message: 'the two roles must differ' });
    }
    if (s.roles && s.format !== 'url') {
      ctx.addIssue({ code: 'custom', path: ['format'], message: "must be 'url' with alternating roles: consumers learn the live role from the value" });
    }
  });

export type PostgresRoleSettings = z.infer<typeof postgresRoleSettings>;
