import type { Provider } from '../types';
import { generateValue } from './generate';
import { generatedSettings, type GeneratedSettings } from './schema';

/**
 * A new random value per the credential's password policy. Nothing outside the vault holds it,
 * so there is nothing to verify against or revoke; a retried create simply makes another value
 * (the vault keeps the first one stored under the same idempotency key).
 */
export const generated: Provider<GeneratedSettings> = {
  name: 'generated',
  settings: generatedSettings,
  async create({ settings }) {
    return { value: generateValue(settings) };
  },
  async verify({ secret }) {
    if (!secret.value) throw new Error('the generated value is empty');
  },
  async revoke() {},
};
