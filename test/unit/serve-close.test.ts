import { describe, expect, it } from 'vitest';
import { closeAll } from '../../cli/serve';

describe('stopping the service', () => {
  it('stops every part even after one fails, and says that one failed (the exit code is then 1, not 0)', async () => {
    const stopped: string[] = [];
    const logged: unknown[] = [];
    const logger = { error: (...args: unknown[]) => void logged.push(args) } as never;
    const part = (name: string, fails = false) => ({
      name,
      close: async () => {
        stopped.push(name);
        if (fails) throw new Error(`${name} did not drain in time`);
      },
    });
    expect(await closeAll([part('http'), part('worker', true), part('pool')], logger)).toBe(true);
    expect(stopped).toEqual(['http', 'worker', 'pool']);
    expect(logged).toEqual([[{ err: expect.any(Error), part: 'worker' }, 'failed to stop cleanly']]);
    expect(await closeAll([part('http'), part('pool')], logger)).toBe(false);
  });
});
