import dns, { type LookupAddress, type LookupOptions } from 'node:dns';
import { lookup } from 'node:dns/promises';
import { BlockList, isIP, Socket } from 'node:net';
import { Agent } from 'undici';
import { UnprocessableError } from './errors';

/**
 * Where the worker may send the requests an identity configures (an `http` provider, a webhook):
 * not, unless the operator allows it, to this machine or the private network it sits in. Without
 * this an identity could make the worker call internal services in its name and, through a
 * provider's `valuePath`, read their answers back with vault.get; or reach the Temporal server's
 * HTTP API and end every other identity's rotations.
 *
 * The check resolves the host and refuses loopback, private, link-local (cloud metadata), shared,
 * multicast and reserved addresses; OUTBOUND_ALLOW lists host names, addresses and CIDR ranges that
 * may be reached all the same (a provider or webhook receiver on the internal network). The check
 * runs twice: before the request, for a clear permanent error, and again on the addresses the
 * connection is made to (`outboundDispatcher`: the request's own DNS lookup goes through it), so a
 * name whose DNS answer changes between the two (DNS rebinding) is refused as well.
 */
const BLOCKED = new BlockList();
for (const [net, prefix] of [
  ['0.0.0.0', 8], ['10.0.0.0', 8], ['100.64.0.0', 10], ['127.0.0.0', 8], ['169.254.0.0', 16], ['172.16.0.0', 12],
  ['192.0.0.0', 24], ['192.168.0.0', 16], ['198.18.0.0', 15], ['224.0.0.0', 4], ['240.0.0.0', 4],
] as const) BLOCKED.addSubnet(net, prefix, 'ipv4');
// IPv6: unspecified, loopback and the old IPv4-compatible form (::/96), NAT64's local-use prefix
// (64:ff9b:1::/48, which a network may map as it likes), unique-local, link-local and multicast.
// NAT64's well-known prefix (64:ff9b::/96: what DNS64 answers for an IPv4-only host) is checked by
// the IPv4 address it carries (refusedAddress): 64:ff9b::a00:7 is 10.0.0.7, 64:ff9b::808:808 8.8.8.8.
for (const [net, prefix] of [['::', 96], ['64:ff9b:1::', 48], ['fc00::', 7], ['fe80::', 10], ['ff00::', 8]] as const) {
  BLOCKED.addSubnet(net, prefix, 'ipv6');
}

let allowedHosts = new Set<string>();
let allowed = new BlockList();

/** Sets OUTBOUND_ALLOW for this process: host names, IP addresses and CIDR ranges (`10.1.0.0/16`). */
export function allowOutbound(entries: string[]): void {
  allowedHosts = new Set();
  allowed = new BlockList();
  for (const entry of entries) {
    const [address, prefix] = entry.split('/');
    const family = isIP(address ?? '');
    if (family === 0) allowedHosts.add(entry.toLowerCase());
    else if (prefix === undefined) allowed.addAddress(address!, family === 4 ? 'ipv4' : 'ipv6');
    else allowed.addSubnet(address!, Number(prefix), family === 4 ? 'ipv4' : 'ipv6');
  }
}

/** Refuses (a permanent error naming host and address) a URL whose host is not one the worker may reach. */
export async function checkOutbound(url: string, what: string): Promise<void> {
  const host = new URL(url).hostname.replace(/^\[|\]$/g, '');
  if (allowedHosts.has(host.toLowerCase())) return;
  let addresses: { address: string; family: number }[];
  try {
    addresses = isIP(host) ? [{ address: host, family: isIP(host) }] : await lookup(host, { all: true });
  } catch {
    // Not resolvable now: the request itself fails with its own error (and may succeed on a retry).
    return;
  }
  const refused = refusedAddress(addresses);
  if (refused) throw new UnprocessableError(`${what}: ${refusal(host, refused)}`);
}

/** The first address the worker may not connect to, if any. */
function refusedAddress(addresses: { address: string; family: number }[]): string | undefined {
  for (const { address, family } of addresses) {
    const type: 'ipv4' | 'ipv6' = family === 4 ? 'ipv4' : 'ipv6';
    // An IPv4 address written as IPv6 (::ffff:127.0.0.1), or behind NAT64's well-known prefix, is that IPv4 address.
    const v4 = type === 'ipv6' ? embeddedIpv4(address) : undefined;
    const checked = v4 ?? address;
    const checkedType: 'ipv4' | 'ipv6' = v4 ? 'ipv4' : type;
    if (allowed.check(checked, checkedType)) continue;
    if (BLOCKED.check(checked, checkedType)) return address;
  }
  return undefined;
}

/** The IPv4 address an IPv4-mapped (::ffff:0:0/96) or NAT64 well-known-prefix (64:ff9b::/96) address carries in its last 32 bits, if it is one. */
function embeddedIpv4(address: string): string | undefined {
  const groups = ipv6Groups(address);
  if (!groups) return undefined;
  const mapped = groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff;
  const nat64 = groups[0] === 0x64 && groups[1] === 0xff9b && groups.slice(2, 6).every((g) => g === 0);
  if (!mapped && !nat64) return undefined;
  return [groups[6]! >> 8, groups[6]! & 0xff, groups[7]! >> 8, groups[7]! & 0xff].join('.');
}

/** An IPv6 address's eight 16-bit groups (a dotted IPv4 tail and `::` expanded), or undefined. */
function ipv6Groups(address: string): number[] | undefined {
  let text = address.replace(/%.*$/, '');
  const dotted = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted.slice(1).map(Number) as [number, number, number, number];
    text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail, extra] = text.split('::');
  if (extra !== undefined) return undefined;
  const parse = (part: string | undefined) => (part ? part.split(':').map((g) => parseInt(g, 16)) : []);
  const [h, t] = [parse(head), parse(tail)];
  const groups = tail === undefined ? h : [...h, ...Array<number>(8 - h.length - t.length).fill(0), ...t];
  return groups.length === 8 && groups.every((g) => Number.isInteger(g) && g >= 0 && g <= 0xffff) ? groups : undefined;
}

function refusal(host: string, address: string): string {
  return `${host} is ${host === address ? 'an address' : `at ${address}`} on this machine or a private network, which the worker does not call unless OUTBOUND_ALLOW lists it`;
}

/** The error a connection refused by the guard fails with (the request's `cause`). */
export class OutboundRefusedError extends Error {
  readonly code = 'EOUTBOUNDREFUSED';
}

type Resolve = (host: string, callback: (err: NodeJS.ErrnoException | null, addresses: LookupAddress[]) => void) => void;
const resolveAll: Resolve = (host, callback) => dns.lookup(host, { all: true }, callback);

/**
 * A `dns.lookup` for connections: resolves the host and refuses (OutboundRefusedError) if any of
 * its addresses may not be reached, so the addresses checked are the ones connected to.
 * `resolve` is for tests.
 */
export function guardedLookup(resolve: Resolve = resolveAll) {
  return (host: string, options: LookupOptions, callback: (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void): void => {
    resolve(host, (err, addresses) => {
      if (err) return callback(err, '');
      const refused = allowedHosts.has(host.toLowerCase()) ? undefined : refusedAddress(addresses);
      if (refused) return callback(new OutboundRefusedError(refusal(host, refused)), '');
      // `family` may come as 4/6 (0: any) or as 'IPv4'/'IPv6'.
      const family = options.family === 'IPv4' ? 4 : options.family === 'IPv6' ? 6 : options.family;
      const usable = addresses.filter((a) => !family || a.family === family);
      if (usable.length === 0) return callback(Object.assign(new Error(`no IPv${family} address for ${host}`), { code: 'ENOTFOUND' }), '');
      if (options.all) return callback(null, usable);
      callback(null, usable[0]!.address, usable[0]!.family);
    });
  };
}

/** The dispatcher every provider and webhook request goes through (see guardedLookup). */
export const outboundDispatcher = new Agent({ connect: { lookup: guardedLookup() } });

/**
 * A socket for other clients (the postgres-role provider's PostgreSQL connections) with the same
 * guard: a host name is resolved through guardedLookup, an address is checked as it is, and a Unix
 * socket (a path: this machine) is refused. The refusal is the socket's error, OutboundRefusedError.
 */
export class GuardedSocket extends Socket {
  override connect(...args: unknown[]): this {
    const [port, host] = args;
    if (typeof port !== 'number' && !(typeof port === 'string' && /^\d+$/.test(port))) {
      return this.refuse('a Unix socket is on this machine, which the worker does not call');
    }
    const name = typeof host === 'string' && host ? host : 'localhost';
    const literal = name.replace(/^\[|\]$/g, '');
    if (isIP(literal) && !allowedHosts.has(literal.toLowerCase())) {
      const refused = refusedAddress([{ address: literal, family: isIP(literal) }]);
      if (refused) return this.refuse(refusal(literal, refused));
    }
    return super.connect({ port: Number(port), host: name, lookup: guardedLookup() });
  }

  private refuse(message: string): this {
    process.nextTick(() => this.destroy(new OutboundRefusedError(message)));
    return this;
  }
}

/** The guard's refusal in a request's failure, as a permanent error; undefined for any other failure. */
export function outboundRefusal(err: unknown, what: string): UnprocessableError | undefined {
  const cause = (err as { cause?: unknown })?.cause;
  return cause instanceof OutboundRefusedError ? new UnprocessableError(`${what}: ${cause.message}`) : undefined;
}
