import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../core/config';
import { allowOutbound, checkOutbound } from '../../core/outbound';
import { TEST_OUTBOUND_ALLOW } from '../support/harness';

describe('where providers and webhooks may call', () => {
  afterAll(() => allowOutbound(TEST_OUTBOUND_ALLOW));
  const refused = (url: string) => checkOutbound(url, 'POST x').then(() => false, (err: Error) => /OUTBOUND_ALLOW/.test(err.message));

  it('not this machine, a private network, link-local (cloud metadata) or reserved addresses, by default', async () => {
    allowOutbound([]);
    for (const url of [
      'http://127.0.0.1:7243/api/v1/namespaces',
      'http://localhost:8080/',
      'http://[::1]/',
      'http://[::ffff:127.0.0.1]/',
      'http://169.254.169.254/latest/meta-data/',
      'https://10.0.0.1/keys',
      'http://172.16.5.4/',
      'http://192.168.1.1/',
      'http://100.64.0.1/',
      'http://0.0.0.0/',
      'http://[fd00::1]/',
      'http://[fe80::1]/',
    ]) {
      expect(await refused(url), url).toBe(true);
    }
    await expect(checkOutbound('http://127.0.0.1:7243/x', 'POST http://127.0.0.1:7243/x')).rejects.toThrow(
      'POST http://127.0.0.1:7243/x: 127.0.0.1 is an address on this machine or a private network, which the worker does not call unless OUTBOUND_ALLOW lists it',
    );
    for (const url of ['https://93.184.216.34/keys', 'http://[2606:4700::1111]/']) expect(await refused(url), url).toBe(false);
  });

  it('what OUTBOUND_ALLOW lists: host names, addresses and CIDR ranges, nothing next to them', async () => {
    allowOutbound(['127.0.0.1', '10.1.0.0/16', 'receiver.internal']);
    expect(await refused('http://127.0.0.1:9000/')).toBe(false);
    expect(await refused('http://127.0.0.2:9000/')).toBe(true);
    expect(await refused('http://10.1.200.3/')).toBe(false);
    expect(await refused('http://10.2.0.1/')).toBe(true);
    expect(await refused('http://RECEIVER.internal/hook')).toBe(false);
    expect(loadConfig({ OUTBOUND_ALLOW: '127.0.0.1, 10.1.0.0/16,receiver.internal' }).OUTBOUND_ALLOW).toEqual(['127.0.0.1', '10.1.0.0/16', 'receiver.internal']);
    expect(() => loadConfig({ OUTBOUND_ALLOW: '10.0.0.0/99' })).toThrow(ConfigError);
    expect(() => loadConfig({ OUTBOUND_ALLOW: 'http://x' })).toThrow(/OUTBOUND_ALLOW: 'http:\/\/x' is not a host, an address or a CIDR range/);
  });
});
