import type { Provider } from '../types';
import { generateValue } from './generate';
import { generatedSettings, type GeneratedSettings } from './schema';

/** Makes a new random value per the credential's password policy; nothing outside to verify or revoke. */
export const generated: Provider<GeneratedSettings> = {
  name: 'generated',
  settings: generatedSettings,
  async create({ settings }) {
    return { value: generateValue(settings) };
  },
};
