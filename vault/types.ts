import type { TotpInput } from './totp';

/** The vault's vocabulary, shared by the API, the activities and the workflows' activity results. */

export const KINDS = ['api_key', 'password', 'token', 'totp_seed', 'service_account', 'generic'] as const;
export type Kind = (typeof KINDS)[number];

/** A kind with its article, for messages: "an api_key", "a password". */
export function aKind(kind: string): string {
  return `${/^[aeiou]/.test(kind) ? 'an' : 'a'} ${kind}`;
}
/** Why a totp_seed takes no rotation policy (vault.store and PATCH refuse one). */
export const TOTP_SEED_NOT_ROTATED =
  'a totp_seed takes no rotation policy: no provider makes TOTP seeds (enrol a new seed with its service and store it with vault.store)';
export type VersionLabel = 'current' | 'previous' | 'pending' | null;

/** Who is acting, for scoping and for the audit row. */
export interface Caller {
  identityId: string;
  actor: string;
  requestId?: string;
  /** The interface the call came through when it is not the REST API (recorded in its audit rows). */
  via?: 'mcp';
}

export type CredentialRef = { id: string } | { name: string };

/** Days of the week (0 = Sunday) and an hour range in a time zone when automatic rotation may run. */
export interface RotationWindow {
  days: number[];
  startHour: number;
  endHour: number;
  timezone: string;
}

/** A rotation policy's grace period when it names none. */
export const DEFAULT_GRACE_HOURS = 24;

export interface RotationPolicy {
  provider: string;
  settings: Record<string, unknown>;
  periodDays: number;
  /** How long the previous version keeps working after promotion, then it is revoked (DEFAULT_GRACE_HOURS); shorter than the period. */
  graceHours?: number;
  /** Attempts of create → apply → verify before the rotation is marked failed. */
  maxAttempts?: number;
  window?: RotationWindow;
}

export interface DependentSpec {
  type: string;
  settings: Record<string, unknown>;
}

/** Everything about a credential that is not its value. */
export interface CredentialPolicy {
  metadata?: Record<string, unknown>;
  owners?: string[];
  service?: string | null;
  tags?: string[];
  rotation?: RotationPolicy | null;
  dependents?: DependentSpec[];
  notify?: string[];
  expiresAt?: string | null;
}

export interface StoreInput extends CredentialPolicy {
  name: string;
  kind: Kind;
  value?: string;
  totp?: TotpInput;
  expectedVersion?: number;
  /** The provider's id for this value, kept so a later rotation can revoke it there. */
  externalId?: string;
}

export interface StoredVersion {
  id: string;
  name: string;
  version: number;
  createdAt: string;
}

export interface SecretRead {
  id: string;
  name: string;
  kind: Kind;
  version: number;
  label: VersionLabel;
  value: string;
  createdAt: string;
  ageDays: number;
}

export interface CredentialMeta {
  id: string;
  identityId: string;
  name: string;
  kind: Kind;
  version: number;
  previousVersion: number | null;
  pendingVersion: number | null;
  ageDays: number;
  createdAt: string;
  versionCreatedAt: string;
  metadata: Record<string, unknown>;
  owners: string[];
  service: string | null;
  tags: string[];
  policy: RotationPolicy | null;
  dependents: DependentSpec[];
  notify: string[];
  nextRotationAt: string | null;
  expiresAt: string | null;
  lastAccessedAt: string | null;
  deletedAt: string | null;
  status: string;
}
