import { UnprocessableError } from '../../core/errors';
import type { Provider, ProviderContext, ProviderSecret } from '../types';
import { adminUrlProblem, consumerUrl, login, parsePostgresUrl, randomPassword, safeError, setPassword } from './role';
import { postgresRoleSettings, type PostgresRoleSettings } from './schema';

/**
 * Changes a PostgreSQL role's password with ALTER ROLE, through an admin connection whose URL is
 * another credential of the same identity.
 *
 * Single role (`role`): create replaces the live password at once, so consumers still holding the
 * old one fail until they get the new one; revoke has nothing left to do, and discard puts the
 * current password back (before promotion, and on a rollback in the grace period, when the
 * previous version is current again). Alternating roles (`roles: [a, b]`): create sets a new password on the
 * idle role and leaves the live one alone, so there is no window; revoke and discard give the
 * retired role a random password nobody knows.
 *
 * Idempotency: a retried create makes a fresh password rather than the same one. ALTER ROLE
 * replaces, so a role only ever accepts its last create's password, never two. The activity calls
 * create only when the vault has nothing staged under the key, so a retry after a crash stores the
 * password the role really has. Should two attempts ever overlap (one timed out but still running),
 * the vault keeps the first result while the role may have the second: verify then fails and
 * discard restores a consistent state. Passwords derived from the key were rejected: they need a
 * secret seed, and the only one at hand (the admin password) may be empty.
 */
export const postgresRole: Provider<PostgresRoleSettings> = {
  name: 'postgres-role',
  settings: postgresRoleSettings,

  async create(ctx) {
    const { settings: s } = ctx;
    const admin = await adminConnection(ctx);
    const role = s.roles ? idleRole(s.roles, ctx.current) : s.role!;
    // One role: an undo puts the current version's password back (discard), so it must be one that
    // can be read back before the live password is replaced. Found out only at the undo, the role
    // was left on a password the vault no longer held as current, and no retry could mend it.
    if (!s.roles) loginOf(s, ctx.current);
    const password = randomPassword(s.passwordLength, s.symbols);
    await setPassword(admin.url, role, password);
    return { value: s.format === 'url' ? consumerUrl(admin.url, role, password) : password, externalId: role };
  },

  async verify(ctx) {
    const admin = await adminConnection(ctx);
    const { role, password } = loginOf(ctx.settings, ctx.secret);
    try {
      await login(admin.url, role, password);
    } catch (err) {
      throw safeError(`version ${ctx.secret.version} does not log in as role "${role}"`, err, [password, admin.password]);
    }
  },

  async revoke(ctx) {
    // A single role's old password was replaced by create already.
    if (ctx.settings.roles) await retire(ctx, ctx.secret);
  },

  // Also a rollback's: `pending` is then the abandoned rotated version, `current` the previous one.
  holdsOneValue: (settings) => !settings.roles,
  async discard(ctx) {
    if (ctx.settings.roles) {
      if (ctx.pending) return retire(ctx, ctx.pending);
      // Create may have set a password on the idle role that nobody recorded: replace it with an unknown one.
      const admin = await adminConnection(ctx);
      return setPassword(admin.url, idleRole(ctx.settings.roles, ctx.current), randomPassword(ctx.settings.passwordLength, ctx.settings.symbols));
    }
    const admin = await adminConnection(ctx);
    const { role, password } = loginOf(ctx.settings, ctx.current);
    await setPassword(admin.url, role, password);
  },
};

type Ctx = ProviderContext<PostgresRoleSettings>;

async function adminConnection(ctx: Ctx) {
  const { adminCredential: name, roles, role } = ctx.settings;
  if (name === ctx.credentialName) throw new UnprocessableError(`settings.adminCredential must name a credential other than '${name}' itself`);
  const admin = parsePostgresUrl(await ctx.secrets.read(name));
  if (!admin) throw new UnprocessableError(`the admin credential '${name}' is not a postgres:// URL`);
  const problem = adminUrlProblem(admin.url);
  if (problem) throw new UnprocessableError(`the admin credential '${name}' ${problem}`);
  if ((roles ?? [role]).includes(admin.user)) throw new UnprocessableError(`the admin credential '${name}' logs in as a role this rotation changes`);
  return admin;
}

/** The role and password a version holds. Messages never echo the value, nor the user parsed from it. */
function loginOf(s: PostgresRoleSettings, secret: ProviderSecret): { role: string; password: string } {
  if (s.format === 'password') {
    if (!secret.value) throw new UnprocessableError(`version ${secret.version} has an empty value`);
    return { role: s.role!, password: secret.value };
  }
  const parsed = parsePostgresUrl(secret.value);
  if (!parsed?.password) throw new UnprocessableError(`version ${secret.version} is not a postgresql://<role>:<password>@host/db URL`);
  const roles: string[] = s.roles ?? [s.role!];
  if (!roles.includes(parsed.user)) throw new UnprocessableError(`version ${secret.version} names a role other than ${roles.join(' or ')}`);
  return { role: parsed.user, password: parsed.password };
}

/** The role that is not live. The live one is the user of the current URL (or its externalId). */
function idleRole(roles: [string, string], current: ProviderSecret): string {
  const live = parsePostgresUrl(current.value)?.user || current.externalId;
  const i = roles.indexOf(live ?? '');
  if (i < 0) {
    throw new UnprocessableError(
      `the current version (${current.version}) must be a postgresql://<role>:<password>@host/db URL with role ${roles.join(' or ')}`,
    );
  }
  return roles[1 - i]!;
}

/**
 * Gives a role a random password nobody knows, but only while `secret` still logs in: if it does
 * not, the role was retired already, or a later rotation gave it a password that must keep working.
 */
async function retire(ctx: Ctx, secret: ProviderSecret): Promise<void> {
  const admin = await adminConnection(ctx);
  const { role, password } = loginOf(ctx.settings, secret);
  try {
    await login(admin.url, role, password);
  } catch (err) {
    if ((err as { code?: unknown }).code === '28P01') return; // invalid_password
    throw safeError(`checking version ${secret.version} of role "${role}" before retiring it failed`, err, [password, admin.password]);
  }
  await setPassword(admin.url, role, randomPassword(ctx.settings.passwordLength, ctx.settings.symbols));
}
