import { UnprocessableError } from '../core/errors';
import { registered } from '../core/registry';
import { createEnvFileDependent } from './env-file';
import type { Dependent } from './types';
import { webhookDependent } from './webhook';

export type { Dependent, DependentContext, DependentTarget } from './types';
export { verifyWebhookSignature } from './webhook';

export interface DependentDeps {
  /** The only directory env-file dependents may write under. */
  envFilesRoot: string;
}

export interface DependentEntry {
  type: string;
  settings?: Record<string, unknown>;
}

/** Every dependent type, by type. Adding one adds a folder and a line here. */
export function createDependents(deps: DependentDeps): Record<string, Dependent<any>> {
  return {
    'env-file': createEnvFileDependent({ root: deps.envFilesRoot }),
    webhook: webhookDependent,
  };
}

/** Checks each entry's type and settings; returns the entries with their defaults filled in. */
export function checkDependents<E extends DependentEntry>(list: E[], registry: Record<string, Dependent<any>>): E[] {
  return list.map((entry, i) => {
    const dependent = registered(registry, entry.type);
    if (!dependent) {
      throw new UnprocessableError(`dependents.${i}.type '${entry.type}' is unknown; known types: ${Object.keys(registry).join(', ')}`);
    }
    const parsed = dependent.settings.safeParse(entry.settings ?? {});
    if (!parsed.success) {
      const why = parsed.error.issues.map((issue) => `${['dependents', i, 'settings', ...issue.path].join('.')}: ${issue.message}`).join('; ');
      throw new UnprocessableError(`dependents.${i} settings are not valid for type '${entry.type}': ${why}`);
    }
    return { ...entry, settings: parsed.data as Record<string, unknown> };
  });
}
