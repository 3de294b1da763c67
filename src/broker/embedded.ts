import { createServer, type AddressInfo, type Server } from "node:net";
import type { Socket } from "node:net";
import aedes from "aedes";

/** The part of an aedes broker this module uses. */
interface Aedes {
  handle: (socket: Socket) => void;
  close: (callback: () => void) => void;
  on(event: "publish", listener: (packet: { topic: string; payload: Buffer | string }, client: unknown) => void): void;
}

/** Messages and payload bytes that clients published on one kind of topic. */
export interface TopicTraffic {
  messages: number;
  bytes: number;
}

/** aedes is CommonJS: its module object is the constructor, with `createBroker` attached. */
const createBroker = (aedes as unknown as { createBroker: (options?: object) => Aedes }).createBroker;

import type { Logger } from "../lib/log.js";

/**
 * An in-process MQTT 3.1.1 broker (aedes) on a loopback TCP port, for the demo and tests.
 * Production deployments use Mosquitto.
 */
export class EmbeddedBroker {
  private broker: Aedes | undefined;
  private server: Server | undefined;
  port = 0;
  /**
   * Client publishes per topic leaf (the part after `sortline/v1/<site>/<device>/`, or the whole
   * topic for other trees). Messages the broker generates itself are not counted.
   */
  readonly traffic = new Map<string, TopicTraffic>();

  constructor(
    private readonly host = "127.0.0.1",
    private readonly logger?: Logger,
  ) {}

  get url(): string {
    return `mqtt://${this.host}:${this.port}`;
  }

  async start(port = 0): Promise<void> {
    const broker = createBroker();
    this.broker = broker;
    broker.on("publish", (packet, client) => {
      if (!client) {
        return;
      }
      const parts = packet.topic.split("/");
      const leaf = parts[0] === "sortline" && parts.length > 4 ? parts.slice(4).join("/") : packet.topic;
      const entry = this.traffic.get(leaf) ?? { messages: 0, bytes: 0 };
      entry.messages++;
      entry.bytes += Buffer.byteLength(packet.payload);
      this.traffic.set(leaf, entry);
    });
    const server = createServer(broker.handle);
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, this.host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    this.port = (server.address() as AddressInfo).port;
    this.logger?.info({ url: this.url }, "embedded MQTT broker listening");
  }

  async stop(): Promise<void> {
    const server = this.server;
    const broker = this.broker;
    this.server = undefined;
    this.broker = undefined;
    if (broker) {
      await new Promise<void>((resolve) => broker.close(() => resolve()));
    }
    if (server) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  }
}
