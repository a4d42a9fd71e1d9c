import { describe, expect, it } from 'vitest';
import { generateValue } from '../../providers/generated/generate';
import { generatedSettings } from '../../providers/generated/schema';
import { checkPolicy } from '../../providers';

describe('generated provider', () => {
  it('makes values of the policy length with every enabled class, all different', () => {
    const s = generatedSettings.parse({ length: 12, symbols: true });
    const values = new Set<string>();
    for (let i = 0; i < 500; i++) {
      const v = generateValue(s);
      expect(v).toHaveLength(12);
      expect(v).toMatch(/[a-z]/);
      expect(v).toMatch(/[A-Z]/);
      expect(v).toMatch(/[0-9]/);
      expect(v).toMatch(/[^A-Za-z0-9]/);
      values.add(v);
    }
    expect(values.size).toBe(500);
  });

  it('honours a single class and a prefix', () => {
    const v = generateValue(generatedSettings.parse({ length: 20, lowercase: false, uppercase: false, prefix: 'sk_' }));
    expect(v).toMatch(/^sk_[0-9]{20}$/);
  });

  it('rejects unknown providers, unknown settings and impossible policies', () => {
    expect(() => checkPolicy({ provider: 'nope', settings: {}, periodDays: 90 })).toThrow(/unknown; known providers: generated/);
    expect(() => checkPolicy({ provider: 'generated', settings: { length: 4 }, periodDays: 90 })).toThrow(/rotation.settings.length/);
    expect(() => checkPolicy({ provider: 'generated', settings: { colour: 'red' }, periodDays: 90 })).toThrow(/settings/);
    expect(() =>
      checkPolicy({ provider: 'generated', settings: { lowercase: false, uppercase: false, digits: false }, periodDays: 90 }),
    ).toThrow(/at least one character class/);
    expect(checkPolicy({ provider: 'generated', settings: {}, periodDays: 30 }).settings).toMatchObject({ length: 32 });
  });
});
