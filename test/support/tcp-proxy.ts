import { once } from 'node:events';
import net from 'node:net';

/**
 * A TCP proxy on 127.0.0.1 between a service and one of the real servers (PostgreSQL, SMTP), so
 * a fault test can take that server away from one service without stopping it for everyone:
 *   down() — every open connection is cut and the port refuses new ones, until up();
 *   hold() — new connections are accepted but nothing is forwarded until release(), so the
 *            caller is stuck mid-call (a request "in flight") for as long as the test wants;
 *   stall() — the open connections stay open but nothing more crosses them, either way, and new
 *            ones are held: the server seems to have stopped answering (a blackholed network, a
 *            stalled disk), until down() cuts them (then up() and release()).
 */
export class TcpProxy {
  port = 0;
  /** Connections accepted since start (forwarded or not). */
  accepted = 0;
  private server?: net.Server;
  private readonly open = new Set<net.Socket>();
  private held: net.Socket[] = [];
  private holding = false;
  private readonly pairs = new Set<[net.Socket, net.Socket]>();

  constructor(private readonly target: { host: string; port: number }) {}

  async start(): Promise<this> {
    await this.listen(this.port);
    return this;
  }

  /** `host:port` of the proxy, for putting into a URL. */
  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Cuts every connection and closes the port: callers see resets, then ECONNREFUSED. */
  async down(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    for (const socket of this.open) socket.destroy();
    this.open.clear();
    this.held = [];
    if (server) await new Promise((resolve) => server.close(resolve));
  }

  /** Listens again on the same port. */
  async up(): Promise<void> {
    await this.listen(this.port);
  }

  hold(): void {
    this.holding = true;
  }

  stall(): void {
    this.holding = true;
    for (const [client, upstream] of this.pairs) {
      client.unpipe(upstream);
      upstream.unpipe(client);
      client.pause();
      upstream.pause();
    }
  }

  /** Forwards every new connection again, while those held so far stay held (until release() or down()). */
  admit(): void {
    this.holding = false;
  }

  /** Forwards the held connections (those still open) and every new one. */
  release(): void {
    this.holding = false;
    const held = this.held;
    this.held = [];
    for (const socket of held) if (!socket.destroyed) this.forward(socket);
  }

  async stop(): Promise<void> {
    await this.down();
  }

  private async listen(port: number): Promise<void> {
    const server = net.createServer((socket) => {
      this.accepted++;
      this.open.add(socket);
      socket.on('close', () => this.open.delete(socket));
      socket.on('error', () => socket.destroy());
      if (this.holding) this.held.push(socket);
      else this.forward(socket);
    });
    server.listen(port, '127.0.0.1');
    await once(server, 'listening');
    this.port = (server.address() as net.AddressInfo).port;
    this.server = server;
  }

  private forward(client: net.Socket): void {
    const upstream = net.connect(this.target.port, this.target.host);
    this.open.add(upstream);
    const pair: [net.Socket, net.Socket] = [client, upstream];
    this.pairs.add(pair);
    upstream.on('close', () => {
      this.open.delete(upstream);
      this.pairs.delete(pair);
      client.destroy();
    });
    upstream.on('error', () => upstream.destroy());
    client.on('close', () => upstream.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  }
}
