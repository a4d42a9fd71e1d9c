import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * The first stores after the service starts, several at once, each running alone (a store with a
 * rotation policy does) on the vault thread's three connections. Each computes its value's keyed
 * fingerprint, whose service key is made on first use.
 */
describe('the first stores after start', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('several at once, each in a transaction of its own, all go through', async () => {
    const agent = await h.createIdentity(`first-${randomUUID().slice(0, 8)}`);
    const stores = await Promise.all(
      ['a', 'b', 'c', 'd'].map((name) =>
        h.api('POST', '/v1/vault.store', {
          token: agent.token,
          body: { name, kind: 'api_key', value: h.secret(`sk_first_${randomUUID()}`), rotation: { provider: 'generated', periodDays: 30, graceHours: 0 } },
        }),
      ),
    );
    // Before, the transactions held every connection while each waited for one more, to look up (or
    // make) the fingerprint key: a 503 after the 5 s connect timeout.
    expect(stores.map((s) => s.status)).toEqual([201, 201, 201, 201]);
  });
});
