import { describe, expect, it } from 'vitest';
import { inlineAction } from '../../cli/rekey';

/** What `mailgent rekey` tells an operator with an inline VAULT_MASTER_KEY to do once it has re-wrapped. */
describe('rekey advice for an inline keyring', () => {
  it('says the others may go only when nothing else wraps a key', () => {
    expect(inlineAction('mk-new', ['mk-old'], ['mk-new'])).toBe('every key is now wrapped by mk-new: remove the others from VAULT_MASTER_KEY (keep the first) and restart');
  });

  it('keeps a key that still wraps one (made under it after the re-wrap passed), and names the ones that may go', () => {
    // Before, the advice was to remove every other key: what mk-old wraps could no longer be opened.
    const advice = inlineAction('mk-new', ['mk-older'], ['mk-new', 'mk-old']);
    expect(advice).not.toMatch(/remove the others/);
    expect(advice).toBe('mk-old still wraps keys (a process still makes them under it): keep it in VAULT_MASTER_KEY, restart every API and worker with mk-new first, and run rekey again; mk-older may be removed');
    expect(inlineAction('mk-new', [], ['mk-a', 'mk-new', 'mk-b'])).toMatch(/^mk-a, mk-b still wrap keys .*keep them in VAULT_MASTER_KEY.*run rekey again$/);
  });
});
