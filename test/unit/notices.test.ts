import { describe, expect, it } from 'vitest';
import { composeRotationNotice } from '../../activities/notices';
import type { RotationNotice } from '../../workflows/types';

/** The notices' text, composed from metadata alone (no value ever reaches them): what each outcome tells its readers. */
describe('rotation notices', () => {
  type Meta = Parameters<typeof composeRotationNotice>[1];
  const meta = { name: 'stripe', kind: 'api_key', nextRotationAt: null, version: 1, deletedAt: null, policy: { provider: 'generated', periodDays: 90 } } as Meta;
  const rolledBack: RotationNotice = { rotationId: 'r', identityId: 'i', credentialId: 'c', workflowId: 'w', outcome: 'rolled_back', mode: 'requested', fromVersion: 1, toVersion: 2, restoresFailed: false };
  const text = (n: Partial<RotationNotice>, m: Partial<Meta> = {}) => composeRotationNotice({ ...rolledBack, ...n }, { ...meta, ...m }, null).text;

  it('a rolled-back run that heard a leak says the credential is rotated again (before: nothing of the leak), or why it is not', () => {
    expect(text({})).not.toMatch(/leak/i);
    expect(text({ mode: 'leak' })).toMatch(/A leak of this credential was reported, and a cancel or a rollback does not stop the answer to it: it is being rotated again now, in leak mode\./);
    expect(text({ mode: 'leak' }, { deletedAt: '2026-12-01T00:00:00.000Z' })).toMatch(/the credential was deleted while it was being rotated/);
    expect(text({ mode: 'leak' }, { policy: null })).toMatch(/its rotation policy was taken away while it was being rotated/);
  });
});
