import { randomInt } from 'node:crypto';
import { DEFAULT_SYMBOLS, type GeneratedSettings } from './schema';

const CLASSES = {
  lowercase: 'abcdefghijklmnopqrstuvwxyz',
  uppercase: 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
  digits: '0123456789',
} as const;

/** A uniformly random value with at least one character of every enabled class. */
export function generateValue(s: GeneratedSettings): string {
  const classes = [
    s.lowercase && CLASSES.lowercase,
    s.uppercase && CLASSES.uppercase,
    s.digits && CLASSES.digits,
    s.symbols && (s.symbolSet || DEFAULT_SYMBOLS),
  ].filter((c): c is string => typeof c === 'string');
  const alphabet = classes.join('');
  const chars = Array.from({ length: s.length }, () => alphabet[randomInt(alphabet.length)]!);
  // Guarantee each class by overwriting distinct random positions, then the result stays uniform enough.
  const positions = shuffled([...Array(s.length).keys()]).slice(0, classes.length);
  classes.forEach((cls, i) => {
    chars[positions[i]!] = cls[randomInt(cls.length)]!;
  });
  return s.prefix + chars.join('');
}

function shuffled<T>(items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}
