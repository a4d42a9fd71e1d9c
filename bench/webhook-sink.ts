import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { verifyWebhookSignature, type WebhookEvent } from '../dependents/webhook';

/**
 * The rotation benchmark's dependent: a local webhook receiver that checks each signature and
 * answers credential.verify with the version it was asked about (it "runs" every new version).
 */
export async function startWebhookSink(signingKey: string): Promise<{ url: string; events: () => number; rejected: () => number; stop(): Promise<void> }> {
  let events = 0;
  let rejected = 0;
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8');
      if (!verifyWebhookSignature(req.headers['mailgent-signature'] as string | undefined, raw, signingKey)) {
        rejected += 1;
        res.writeHead(401).end();
        return;
      }
      events += 1;
      const event = JSON.parse(raw) as WebhookEvent;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(event.type === 'credential.verify' ? { version: event.version } : { ok: true }));
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hooks/mailgent`,
    events: () => events,
    rejected: () => rejected,
    async stop() {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
