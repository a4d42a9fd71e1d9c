import type { z } from 'zod';
import type { Kind } from '../vault/vault';

/**
 * One contract for every rotation provider. A provider makes new secrets, proves they work, and
 * retires old ones. Calls are idempotent under the keys the workflow derives from the rotation id
 * and step: the same key never makes a second secret, and revoking twice is fine.
 */

/** Reads another credential of the same identity (e.g. an admin connection, an API token). Audited. */
export interface SecretReader {
  read(name: string): Promise<string>;
}

export interface ProviderContext<S> {
  settings: S;
  kind: Kind;
  identityId: string;
  credentialId: string;
  credentialName: string;
  secrets: SecretReader;
}

/** A version as the provider sees it: its value and the provider's own id for it, if any. */
export interface ProviderSecret {
  version: number;
  value: string;
  externalId?: string | null;
}

export interface CreateResult {
  value: string;
  /** The provider's id for the new secret (an API key id, the role name …); never secret. */
  externalId?: string;
  /** When the new secret stops working, if the provider says (ISO 8601): the credential's expiry once it is promoted. */
  expiresAt?: string;
}

export interface Provider<S = unknown> {
  name: string;
  settings: z.ZodType<S>;
  /** A policy's settings as they must be when it is written (stricter than `settings`, which every step parses); `settings` if absent. */
  newSettings?: z.ZodType<S>;
  /** Makes a new secret. The same idempotencyKey must yield the same secret, never a second one. */
  create(ctx: ProviderContext<S> & { idempotencyKey: string; current: ProviderSecret }): Promise<CreateResult>;
  /**
   * Proves the secret works (logs in with it, calls the API with it …); throws if it does not.
   * `madeAt` (ISO 8601): when a rotation's create step made it, for a provider that waits for a new
   * secret to start working (counted from then, not from each call of verify); absent outside a rotation.
   */
  verify(ctx: ProviderContext<S> & { secret: ProviderSecret; madeAt?: string }): Promise<void>;
  /** After a promotion: makes an old secret stop working. Idempotent. */
  revoke(ctx: ProviderContext<S> & { secret: ProviderSecret; idempotencyKey: string }): Promise<void>;
  /**
   * Compensation before promotion, and a rollback during the grace period (then `pending` is the
   * rotated version given up, `current` the previous one, current again): makes `pending` stop
   * working while `current` keeps working. Defaults to revoke(pending); a provider whose create replaced the live secret (a single
   * PostgreSQL role) puts `current` back instead. `pending` is absent when create may have taken
   * effect at the provider but its result never reached the vault (the step failed after the call);
   * `createKey`, the idempotency key that create was called with, then lets a provider find it again.
   */
  discard?(ctx: ProviderContext<S> & { pending?: ProviderSecret; current: ProviderSecret; idempotencyKey: string; createKey?: string }): Promise<void>;
  /**
   * Whether, under these settings, the provider holds one live secret (a single PostgreSQL role):
   * a version a rollback abandons cannot then be left working beside the current one. Absent: it
   * keeps versions apart.
   */
  holdsOneValue?(settings: S): boolean;
}
