import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../core/config';
import { UnprocessableError } from '../../core/errors';
import { allowOutbound, checkOutbound, guardedLookup, outboundDispatcher, outboundRefusal, OutboundRefusedError } from '../../core/outbound';
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
      // NAT64 (10.0.0.7 and 127.0.0.1 behind it), and an IPv4-compatible loopback.
      'http://[64:ff9b::a00:7]/',
      'http://[64:ff9b:1::7f00:1]/',
      'http://[::7f00:1]/',
    ]) {
      expect(await refused(url), url).toBe(true);
    }
    await expect(checkOutbound('http://127.0.0.1:7243/x', 'POST http://127.0.0.1:7243/x')).rejects.toThrow(
      'POST http://127.0.0.1:7243/x: 127.0.0.1 is an address on this machine or a private network, which the worker does not call unless OUTBOUND_ALLOW lists it',
    );
    // A public IPv4 host behind NAT64 (DNS64's answer on an IPv6-only host) is reachable: only the IPv4 address it carries counts.
    for (const url of ['https://93.184.216.34/keys', 'http://[2606:4700::1111]/', 'http://[64:ff9b::808:808]/', 'http://[64:ff9b::5db8:d822]/']) {
      expect(await refused(url), url).toBe(false);
    }
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

  it('checks again the addresses a connection is made to, so a name that changes its answer (DNS rebinding) is refused', async () => {
    allowOutbound(['receiver.internal']);
    // A name that answered with a public address when checkOutbound looked, and with loopback now.
    const answers = [[{ address: '93.184.216.34', family: 4 }], [{ address: '127.0.0.1', family: 4 }, { address: '93.184.216.34', family: 4 }]];
    const lookup = guardedLookup((_host, callback) => callback(null, answers.shift()!));
    const look = (host: string, options: { all?: boolean; family?: number } = {}) =>
      new Promise<{ err: NodeJS.ErrnoException | null; address: unknown; family?: number }>((resolve) =>
        lookup(host, options as never, (err, address, family) => resolve({ err, address, family })),
      );
    expect(await look('rebinding.example')).toEqual({ err: null, address: '93.184.216.34', family: 4 });
    const second = await look('rebinding.example');
    expect(second.err).toBeInstanceOf(OutboundRefusedError);
    expect(second.err!.message).toBe('rebinding.example is at 127.0.0.1 on this machine or a private network, which the worker does not call unless OUTBOUND_ALLOW lists it');

    // Names OUTBOUND_ALLOW lists pass whatever they resolve to; `all` and `family` are honoured.
    const fixed = guardedLookup((_host, callback) => callback(null, [{ address: '10.0.0.7', family: 4 }, { address: 'fd00::7', family: 6 }]));
    const lookFixed = (host: string, options: object) => new Promise<unknown[]>((resolve) => fixed(host, options as never, (err, address, family) => resolve([err, address, family])));
    expect(await lookFixed('receiver.internal', { all: true })).toEqual([null, [{ address: '10.0.0.7', family: 4 }, { address: 'fd00::7', family: 6 }], undefined]);
    expect(await lookFixed('RECEIVER.internal', { family: 6 })).toEqual([null, 'fd00::7', 6]);
    expect(await lookFixed('receiver.internal', { family: 'IPv4' })).toEqual([null, '10.0.0.7', 4]);
    expect(((await lookFixed('elsewhere.internal', {}))[0] as Error).message).toMatch(/^elsewhere.internal is at 10.0.0.7 on this machine/);
  });

  it('the dispatcher of provider and webhook requests refuses the connection itself, before a byte is sent', async () => {
    let requests = 0;
    const server = createServer((_req, res) => {
      requests += 1;
      res.end('{}');
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const url = `http://localhost:${(server.address() as AddressInfo).port}/hook`;
    try {
      allowOutbound([]);
      const err = await fetch(url, { method: 'POST', body: '{}', dispatcher: outboundDispatcher } as RequestInit).then(() => undefined, (e: unknown) => e);
      expect((err as { cause?: unknown }).cause).toBeInstanceOf(OutboundRefusedError);
      const refusal = outboundRefusal(err, 'POST http://localhost/hook');
      expect(refusal).toBeInstanceOf(UnprocessableError);
      expect(refusal!.message).toMatch(/^POST http:\/\/localhost\/hook: localhost is at (127\.0\.0\.1|::1) on this machine or a private network/);
      expect(requests).toBe(0);

      allowOutbound(['127.0.0.1', '::1']);
      const ok = await fetch(url, { method: 'POST', body: '{}', dispatcher: outboundDispatcher } as RequestInit);
      expect(ok.status).toBe(200);
      await ok.text();
      expect(requests).toBe(1);
      expect(outboundRefusal(new Error('fetch failed'), 'x')).toBeUndefined();
    } finally {
      server.close();
    }
  });
});
