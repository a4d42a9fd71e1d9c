import type { z } from 'zod';
import type { Kind } from '../vault/vault';

/**
 * One contract for every rotation provider: make a new secret (idempotent under the key the
 * workflow derives from rotation id and step), and later verify and revoke it.
 */
export interface ProviderContext<S> {
  settings: S;
  kind: Kind;
  credentialId: string;
  idempotencyKey: string;
}

export interface Provider<S = unknown> {
  name: string;
  settings: z.ZodType<S>;
  create(ctx: ProviderContext<S>): Promise<{ value: string }>;
}
