import { request } from 'node:http';

export interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  body: any;
}

/**
 * A request exactly as given: the path is not normalised (so `..`, `%2F` and `%00` reach the
 * server), headers may repeat (`[name, value]` pairs) and the source address can be chosen
 * (127.0.0.2 is another client of a server on 127.0.0.1).
 */
export function rawRequest(
  url: string,
  o: { method?: string; path: string; headers?: [string, string][]; body?: string | Buffer; localAddress?: string; timeoutMs?: number },
): Promise<RawResponse> {
  const { hostname, port, host } = new URL(url);
  // Raw (array) headers get no default Host: add it unless the caller sends its own.
  const headers = (o.headers ?? []).some(([k]) => k.toLowerCase() === 'host') ? o.headers! : [['host', host] as [string, string], ...(o.headers ?? [])];
  return new Promise((resolve, reject) => {
    const req = request(
      { host: hostname, port, method: o.method ?? 'GET', path: o.path, headers: headers.flat(), localAddress: o.localAddress, agent: false },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown;
          try {
            body = text ? JSON.parse(text) : undefined;
          } catch {
            body = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, body });
        });
        res.on('error', reject);
      },
    );
    req.setTimeout(o.timeoutMs ?? 15_000, () => req.destroy(new Error(`no answer to ${o.method ?? 'GET'} ${o.path.slice(0, 80)}`)));
    req.on('error', reject);
    req.end(o.body);
  });
}
