import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { simpleParser, type ParsedMail } from 'mailparser';
import { inject } from 'vitest';

/** Messages the SMTP sink has stored, parsed. */
export interface StoredMail {
  file: string;
  raw: string;
  mail: ParsedMail;
}

/** The run's shared sink by default, or the mail directory of a sink a test started itself. */
export async function readMailbox(dir = inject('mailDir')): Promise<StoredMail[]> {
  const files = readdirSync(dir).filter((f) => f.endsWith('.eml')).sort();
  return Promise.all(
    files.map(async (file) => {
      const raw = readFileSync(path.join(dir, file), 'utf8');
      return { file, raw, mail: await simpleParser(raw) };
    }),
  );
}

export function recipients(m: ParsedMail): string[] {
  const to = Array.isArray(m.to) ? m.to : m.to ? [m.to] : [];
  return to.flatMap((a) => a.value.map((v) => v.address ?? ''));
}

/** Waits until `count` messages addressed to `address` have arrived; returns them. */
export async function waitForMail(address: string, count = 1, timeoutMs = 20_000): Promise<StoredMail[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = (await readMailbox()).filter((m) => recipients(m.mail).includes(address));
    if (found.length >= count || Date.now() > deadline) return found;
    await new Promise((r) => setTimeout(r, 200));
  }
}
