import type { z } from 'zod';
import type { SecretReader } from '../providers/types';

/**
 * One contract for every dependent: a system that uses a credential and must follow a rotation.
 * apply gives it the pending version, verify proves it uses it, restore puts it back on the
 * version it had. Every call is idempotent: applying or restoring twice leaves the same state.
 */
export interface DependentContext<S> {
  settings: S;
  identityId: string;
  credentialId: string;
  credentialName: string;
  secrets: SecretReader;
}

export interface DependentTarget {
  version: number;
  /** The version's value. A dependent that must never see values (a webhook) ignores it. */
  value: string;
}

export interface Dependent<S = unknown> {
  type: string;
  settings: z.ZodType<S>;
  apply(ctx: DependentContext<S> & { target: DependentTarget; idempotencyKey: string }): Promise<void>;
  verify(ctx: DependentContext<S> & { target: DependentTarget }): Promise<void>;
  /**
   * `unapplied`: the restore undoes an attempt whose apply to this dependent was refused (the
   * dependent's own answer, given before it changed anything); absent on a rollback, after an
   * apply that completed, and after one that failed otherwise (a worker lost mid-write, say).
   */
  restore(ctx: DependentContext<S> & { target: DependentTarget; idempotencyKey: string; unapplied?: boolean }): Promise<void>;
  /** Optional: told once the pending version has become current. */
  promoted?(ctx: DependentContext<S> & { target: DependentTarget; idempotencyKey: string }): Promise<void>;
}
