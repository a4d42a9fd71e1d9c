import { z } from 'zod';
import { AppError, UnprocessableError } from '../core/errors';
import { appendAudit, errorDetail, markAudited } from '../vault/audit';
import type { Identities } from '../vault/identities';
import { withholdStored } from '../vault/withheld';
import { refDetail, type Caller, type CredentialRef } from '../vault/vault';
import { credentialsQuery, leakReport, mailSend, rotationsStart, vaultGet, vaultStore, vaultTotp } from '../api/schemas';
import { reportLeak, type LeakDeps } from '../api/routes/leaks';
import { sendMail, type MailDeps } from '../api/routes/mail';
import { rotationStatus, startRotation, type RotationDeps } from '../api/routes/rotations';
import { storeCredential, type VaultRouteDeps } from '../api/routes/vault';

/**
 * The MCP tools. Each is the HTTP endpoint of the same name seen through MCP: its input schema is
 * the endpoint's body schema (plus, where it helps an agent, a handle or an explicit reveal), and
 * it calls the same function the route calls, with the caller's identity, so scoping, audit rows
 * and errors are the API's own. What MCP adds is masking: vault_get answers a handle, not the value.
 */
export type McpDeps = VaultRouteDeps & MailDeps & RotationDeps & LeakDeps & { identities: Pick<Identities, 'mcpSettings'> };

export interface Tool<S extends z.ZodType = z.ZodType> {
  name: string;
  title: string;
  description: string;
  input: S;
  /** The HTTP endpoint's audit action: a failure the vault did not audit itself is written with it. */
  action: string;
  /** MCP tool annotations: hints for the client, never relied on for security. */
  hints: { readOnlyHint: boolean; destructiveHint?: boolean; idempotentHint?: boolean; openWorldHint?: boolean };
  run(caller: Caller, input: z.output<S>): Promise<Record<string, unknown>>;
}

/**
 * A handle names one version of a credential without its value: `mailgent://credentials/<id>@<version>`.
 * It carries the id, not the name, because a credential granted by another identity is reachable by
 * id only. It is a reference, not a capability: every tool still checks the caller's scope.
 */
// Without flags: the JSON Schema pattern the tool advertises is this regex's source, and must accept what it accepts.
// So the id's hex digits are taken in either case (as ids are everywhere) by its classes, not by an `i` flag.
const HANDLE = /^mailgent:\/\/credentials\/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})@([1-9][0-9]{0,8})$/;

export function handleOf(id: string, version: number): string {
  return `mailgent://credentials/${id}@${version}`;
}

export function parseHandle(s: string): { id: string; version: number } | undefined {
  const m = HANDLE.exec(s);
  return m ? { id: m[1]!.toLowerCase(), version: Number(m[2]) } : undefined;
}

/** A credential reference in a tool's string field: a handle stands for the credential's id. */
const refString = (s: string): string => parseHandle(s)?.id ?? s;

/**
 * A leak report naming a credential by handle reports the handle's version: the agent, which never
 * saw the value under masking, cannot give its fingerprint, and the version it read may be an older
 * one a stored value replaced (still working at the provider), not the current one.
 */
function leakOf(input: z.output<typeof leakReport>): z.output<typeof leakReport> {
  const handle = input.credential === undefined ? undefined : parseHandle(input.credential);
  if (!handle) return input;
  if (input.version !== undefined && input.version !== handle.version) {
    throw new UnprocessableError(`the handle names version ${handle.version}, and version says ${input.version}: give one of them`);
  }
  // In the order the request schema gives a report's fields (credential, version, then the rest), as
  // the same report by id and version has them: a report's Idempotency-Key matches its request's
  // JSON, and the handle's report repeated by id under its key was refused as another request.
  const { credential: _credential, version: _version, ...rest } = input;
  return { credential: handle.id, version: handle.version, ...rest };
}

const handle = z.string().max(200).regex(HANDLE, 'must be a handle from vault_get or list_credentials: mailgent://credentials/<id>@<version>');

const exactlyOne =
  (keys: string[]) =>
  (body: Record<string, unknown>, ctx: z.RefinementCtx): void => {
    if (keys.filter((k) => body[k] !== undefined).length !== 1) ctx.addIssue({ code: 'custom', path: [keys[0]!], message: `give exactly one of ${keys.join(', ')}` });
  };

const vaultGetInput = z
  .strictObject({
    ...vaultGet.shape,
    handle: handle.optional().describe('a handle from vault_get or list_credentials; names its version unless version is given'),
    reveal: z.boolean().optional().describe('return the value itself; needs the allowUnmaskedRead permission and is audited as an unmasked read'),
  })
  .superRefine(exactlyOne(['name', 'id', 'handle']));

const vaultTotpInput = z
  .strictObject({ ...vaultTotp.shape, handle: handle.optional().describe('a handle from vault_get or list_credentials') })
  .superRefine(exactlyOne(['name', 'id', 'handle']));

const rotationStatusInput = z.strictObject({ rotationId: z.string().min(1).max(100).describe('the rotationId rotate_credentials answered') });

function target(input: { name?: string; id?: string; handle?: string; version?: number }): { ref: CredentialRef; version?: number } {
  const h = input.handle ? parseHandle(input.handle) : undefined;
  if (h) return { ref: { id: h.id }, version: input.version ?? h.version };
  return { ref: input.id ? { id: input.id } : { name: input.name! }, version: input.version };
}

const define = <S extends z.ZodType>(t: Tool<S>): Tool => t as unknown as Tool;

export function mcpTools(deps: McpDeps): Tool[] {
  return [
    define({
      name: 'vault_store',
      title: 'Store a credential',
      description:
        'Store an API key, password, token or TOTP seed (kind totp_seed with totp), encrypted; every store makes a new version. ' +
        'Optional policy: owners, rotation {provider, settings, periodDays}, dependents, notify, expiresAt. Answers the new version and its handle.',
      input: vaultStore,
      action: 'vault.store',
      hints: { readOnlyHint: false, destructiveHint: false, openWorldHint: false },
      run: async (caller, input) => {
        const stored = await storeCredential(deps, caller, input);
        return { ...stored, handle: handleOf(stored.id, stored.version) };
      },
    }),
    define({
      name: 'vault_get',
      title: 'Read a credential (masked)',
      description:
        'Look up a credential by name, id or handle. With masking on (the default) it answers a handle and metadata, never the value: ' +
        'pass the handle to vault_totp, rotate_credentials or report_leak. reveal: true returns the value only if an admin allowed ' +
        'unmasked reads for this identity; each such read is audited as unmasked.',
      input: vaultGetInput,
      action: 'vault.get',
      hints: { readOnlyHint: true, openWorldHint: false },
      run: async (caller, input) => {
        const { ref, version } = target(input);
        const settings = await deps.identities.mcpSettings(caller.identityId);
        if (input.reveal && settings.mcpMasking && !settings.allowUnmaskedRead) {
          // Refused before the credential is looked up, so the answer says nothing about whether it exists.
          const err = new AppError(
            403,
            'forbidden',
            'Forbidden',
            'this identity may not read values unmasked over MCP; use the handle with the other tools, or ask an admin to set allowUnmaskedRead',
          );
          const detail: Record<string, unknown> = { ...refDetail(ref), unmasked: true, ...errorDetail(err) };
          // Not looked up, so not known to name nothing: a stored value is withheld all the same (vault/withheld.ts).
          await withholdStored(deps.pool, deps.secrets, caller.identityId, detail, refDetail(ref));
          await appendAudit(deps.pool, { ...caller, action: 'vault.get', outcome: 'denied', detail });
          throw markAudited(err);
        }
        if (input.reveal || !settings.mcpMasking) {
          const read = await deps.vault.get(caller, ref, version, { unmasked: true });
          return { ...read, handle: handleOf(read.id, read.version), masked: false };
        }
        const meta = await deps.vault.getMasked(caller, ref, version);
        return { ...meta, handle: handleOf(meta.id, meta.version), masked: true };
      },
    }),
    define({
      name: 'vault_totp',
      title: 'Current TOTP code',
      description:
        "The current code of a stored TOTP seed (by name, id or handle: a handle stands for its credential here, the code is always its current seed's), for a login step; the seed itself is never returned.",
      input: vaultTotpInput,
      action: 'vault.totp',
      hints: { readOnlyHint: true, openWorldHint: false },
      run: async (caller, input) => ({ ...(await deps.vault.totp(caller, target(input).ref)) }),
    }),
    define({
      name: 'mail_send',
      title: 'Send a message',
      description:
        'Send an email (a notice to a team). Refused if it carries any value this identity stores, raw or encoded (or a subject encoded in a charset other than UTF-8 and the common single-byte ones). Give an idempotencyKey (a new one per message) to repeat a call whose answer was lost without sending twice.',
      input: mailSend,
      action: 'mail.send',
      hints: { readOnlyHint: false, destructiveHint: false, openWorldHint: true },
      run: (caller, input) => sendMail(deps, caller, input),
    }),
    define({
      name: 'list_credentials',
      title: 'List credentials',
      description: 'Metadata of this identity’s credentials (never values), each with a handle; filter by kind, age or due rotation; page with after.',
      input: credentialsQuery,
      action: 'credential.list',
      hints: { readOnlyHint: true, openWorldHint: false },
      run: async (caller, input) => {
        const items = await deps.vault.list(caller.identityId, input);
        return {
          items: items.map((c) => ({ ...c, handle: handleOf(c.id, c.version) })),
          nextCursor: items.length === input.limit ? items.at(-1)!.name : null,
        };
      },
    }),
    define({
      name: 'rotate_credentials',
      title: 'Rotate credentials',
      description:
        'Start a rotation (a durable workflow per credential: new value from the provider, dependents updated and verified, promoted, owners told) ' +
        'of credentials given by name, id or handle, or by filter; only credentials with a rotation policy (one named without is refused). Answers a rotationId for rotation_status. Give an idempotencyKey (a new one per request) to repeat a call whose answer was lost without rotating twice.',
      input: rotationsStart,
      action: 'rotation.start',
      hints: { readOnlyHint: false, destructiveHint: true, openWorldHint: true },
      run: (caller, input) => startRotation(deps, caller, { ...input, credentials: input.credentials?.map(refString) }),
    }),
    define({
      name: 'rotation_status',
      title: 'Rotation status',
      description:
        'State of a rotation (running, grace, succeeded, partial, failed) and each credential’s steps: one you started, or a scheduled sweep’s (the rotation id its notices give), of which you see your own credentials’ runs.',
      input: rotationStatusInput,
      action: 'rotation.describe',
      hints: { readOnlyHint: true, openWorldHint: false },
      run: (caller, input) => rotationStatus(deps, caller, input.rotationId),
    }),
    define({
      name: 'report_leak',
      title: 'Report a leak',
      description:
        'Report a leaked credential (by name, id or handle), or a leaked value by its SHA-256 fingerprint: it is rotated at once, ' +
        'without a grace period, and the security contacts and owners are told (a deleted credential, or one without a rotation policy, ' +
        'is not rotated: answered deleted or no-policy, and they are told to revoke it by hand). Answers a rotationId for rotation_status. Never put the value in details.',
      input: leakReport,
      action: 'leak.report',
      hints: { readOnlyHint: false, destructiveHint: true, openWorldHint: true },
      run: (caller, input) => reportLeak(deps, caller, caller.identityId, leakOf(input)),
    }),
  ];
}
