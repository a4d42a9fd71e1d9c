import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { verifyWebhookSignature, type WebhookEvent } from '../../dependents/webhook';

export interface ReceivedEvent {
  event: WebhookEvent;
  raw: string;
  headers: IncomingHttpHeaders;
}

/**
 * A real webhook receiver on 127.0.0.1: it checks every request's signature, records the events,
 * and answers credential.verify with the version it "runs". Tests steer it through its fields.
 */
export class WebhookReceiver {
  url = '';
  readonly events: ReceivedEvent[] = [];
  /** Raw bodies of requests whose signature did not verify (answered 401). */
  readonly rejected: string[] = [];
  /** The version verify reports; null reports the version the event asks about. */
  answerVersion: number | null = null;
  /** Answer every request with this status (and a body that must not be echoed) instead. */
  failWith: number | null = null;
  /** Delays each answer (after the event is recorded). */
  delayMs = 0;
  /** Runs for each verified event before the answer (e.g. to fetch the value through the API). */
  onEvent?: (received: ReceivedEvent) => Promise<void>;
  private server?: Server;

  constructor(public signingKey: string) {}

  async start(): Promise<string> {
    this.server = createServer((req, res) => {
      this.handle(req, res).catch(() => {
        if (!res.headersSent) res.writeHead(500);
        res.end();
      });
    });
    this.server.listen(0, '127.0.0.1');
    await once(this.server, 'listening');
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/hooks/mailgent`;
    return this.url;
  }

  async stop(): Promise<void> {
    if (!this.server) return;
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server!.close(resolve));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const raw = Buffer.concat(chunks).toString('utf8');
    if (!verifyWebhookSignature(req.headers['mailgent-signature'] as string | undefined, raw, this.signingKey)) {
      this.rejected.push(raw);
      return answer(res, 401, { error: 'bad signature' });
    }
    const received = { event: JSON.parse(raw) as WebhookEvent, raw, headers: req.headers };
    this.events.push(received);
    await this.onEvent?.(received);
    if (this.delayMs) await new Promise((r) => setTimeout(r, this.delayMs));
    if (this.failWith) return answer(res, this.failWith, { error: 'receiver-side failure details that must not be echoed' });
    if (received.event.type === 'credential.verify') return answer(res, 200, { version: this.answerVersion ?? received.event.version });
    answer(res, 200, { ok: true });
  }
}

function answer(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}
