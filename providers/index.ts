import { UnprocessableError } from '../core/errors';
import { registered } from '../core/registry';
import type { RotationPolicy } from '../vault/vault';
import { generated } from './generated';
import { httpApi } from './http';
import { postgresRole } from './postgres-role';
import type { Provider } from './types';

export type { Provider } from './types';

/** Every rotation provider, by name. Adding a provider adds one folder and one line here. */
export const providers: Record<string, Provider<any>> = {
  [generated.name]: generated,
  [postgresRole.name]: postgresRole,
  [httpApi.name]: httpApi,
};

export const DEFAULT_POLICY: RotationPolicy = { provider: 'generated', settings: {}, periodDays: 90 };

/** Checks a policy's provider and settings; returns the policy with the provider's defaults filled in. */
export function checkPolicy(policy: RotationPolicy): RotationPolicy {
  const provider = registered(providers, policy.provider);
  if (!provider) {
    throw new UnprocessableError(`rotation.provider '${policy.provider}' is unknown; known providers: ${Object.keys(providers).join(', ')}`);
  }
  const parsed = (provider.newSettings ?? provider.settings).safeParse(policy.settings ?? {});
  if (!parsed.success) {
    const why = parsed.error.issues.map((i) => `${['rotation', 'settings', ...i.path].join('.')}: ${i.message}`).join('; ');
    throw new UnprocessableError(`rotation settings are not valid for provider '${policy.provider}': ${why}`);
  }
  return { ...policy, settings: parsed.data as Record<string, unknown> };
}
