import { copyFile, mkdir, readdir, readFile, rename } from "node:fs/promises";
import path from "node:path";

import type { FleetConfig } from "../config/schema.js";
import { resolveSecret } from "../config/load.js";
import { describeError } from "../lib/errors.js";
import type { Logger } from "../lib/log.js";
import type { Outbox, OutboxItem } from "../mining/outbox.js";
import { Uplink } from "../mining/uplink.js";
import { keyIdOf, type TrustedKey } from "../models/signing.js";
import { CommandServer } from "../protocol/commands.js";
import { MqttLink, type StatusExtras } from "../protocol/link.js";
import { deviceTopic } from "../protocol/topics.js";
import { TransferReceiver, TransferSender, type BeginHeader } from "../protocol/transfer.js";
import { fsyncDir } from "../update/durable.js";

/** Transfer kinds on the fleet connection. */
export const EXAMPLE_KIND = "example";
export const MODEL_KIND = "model";

/** Reads PEM public keys; the key id is derived from each key, so a file name cannot claim another id. */
export async function loadTrustedKeys(files: readonly string[]): Promise<TrustedKey[]> {
  const keys: TrustedKey[] = [];
  for (const file of files) {
    let pem: string;
    try {
      pem = await readFile(file, "utf8");
    } catch (error) {
      throw new Error(`trusted key ${file} cannot be read: ${describeError(error)}`);
    }
    try {
      keys.push({ keyId: keyIdOf(pem), publicKeyPem: pem });
    } catch (error) {
      throw new Error(`trusted key ${file} is not a PEM public key: ${describeError(error)}`);
    }
  }
  return keys;
}

/** A model bundle the device received and keeps until it is deployed or replaced. */
export interface ReceivedModel {
  file: string;
  name: string;
  version: string;
  sha256?: string;
  deploy: boolean;
}

export interface DeviceFleetOptions {
  config: FleetConfig;
  device: { id: string; site: string };
  stateDir: string;
  trustedKeys: readonly TrustedKey[];
  /** Outbox of hard examples for the uplink; without it nothing is uploaded. */
  outbox?: Outbox;
  /** Called after a model bundle was received and stored under `received/`. */
  onModel: (model: ReceivedModel) => void;
  statusExtras: () => StatusExtras;
  logger: Logger;
  agentVersion?: string;
}

const BUNDLE_NAME = /^[A-Za-z0-9._-]{1,128}$/;

/**
 * The device side of the fleet protocol: one MQTT connection with the retained status and last
 * will, the command server, the hard-example uplink and the model download receiver.
 */
export class DeviceFleet {
  readonly link: MqttLink;
  readonly commands: CommandServer;
  readonly uplink: Uplink | undefined;
  private readonly sender: TransferSender;
  private readonly receiver: TransferReceiver;
  private statusTimer: NodeJS.Timeout | undefined;
  private readonly logger: Logger;

  private constructor(private readonly options: DeviceFleetOptions, password: string | undefined) {
    const { config, device, logger } = options;
    this.logger = logger.child({ component: "fleet" });
    this.link = new MqttLink({
      url: config.url,
      role: "agent",
      site: device.site,
      device: device.id,
      clientId: config.clientId,
      protocolVersion: config.protocolVersion,
      tls: config.tls,
      username: config.username,
      password,
      logger: this.logger,
      statusProvider: () => ({ agentVersion: options.agentVersion, ...options.statusExtras() }),
    });
    const trusted = options.config.requireSignedCommands ? Object.fromEntries(options.trustedKeys.map((k) => [k.keyId, k.publicKeyPem])) : undefined;
    this.commands = new CommandServer({ link: this.link, trustedKeys: trusted, logger: this.logger });
    this.sender = new TransferSender({ link: this.link, logger: this.logger });
    if (options.outbox) {
      this.uplink = new Uplink({ outbox: options.outbox, send: (item) => this.sendExample(item), logger: this.logger, sendTimeoutMs: 120_000 });
    }
    this.receiver = new TransferReceiver({
      link: this.link,
      dataTopic: deviceTopic(device.site, device.id, "down/data"),
      dir: path.join(options.stateDir, "downloads"),
      maxBytes: config.maxDownloadBytes,
      maxConcurrent: 2,
      onComplete: (file, begin) => this.received(file, begin),
      logger: this.logger,
    });
  }

  static async create(options: DeviceFleetOptions): Promise<DeviceFleet> {
    if (options.config.requireSignedCommands && options.trustedKeys.length === 0) {
      throw new Error("fleet.requireSignedCommands is on but fleet.trustedKeys lists no key; add the trainer's public key or turn it off");
    }
    const password = options.config.password ? await resolveSecret(options.config.password, "fleet.password") : undefined;
    await mkdir(path.join(options.stateDir, "received"), { recursive: true });
    return new DeviceFleet(options, password);
  }

  get receivedDir(): string {
    return path.join(this.options.stateDir, "received");
  }

  /**
   * Connects and starts the services. When the broker is unreachable the agent still starts:
   * the link keeps reconnecting and the outbox keeps the examples.
   */
  async start(): Promise<void> {
    try {
      await this.link.connect({ timeoutMs: 10_000 });
    } catch (error) {
      this.logger.warn({ err: describeError(error) }, "fleet broker unreachable at start; reconnecting in the background");
    }
    await this.commands.start();
    await this.receiver.start();
    this.uplink?.start();
    this.statusTimer = setInterval(() => {
      if (this.link.connected) {
        this.link.publishStatus().catch((error: unknown) => this.logger.debug({ err: describeError(error) }, "status publish failed"));
      }
    }, this.options.config.statusIntervalSeconds * 1000);
    this.statusTimer.unref();
  }

  /** Publishes the retained status now, for example after a model switch or a pause. */
  async publishStatus(state?: "online" | "paused"): Promise<void> {
    if (this.link.connected) {
      await this.link.publishStatus(state).catch((error: unknown) => this.logger.debug({ err: describeError(error) }, "status publish failed"));
    }
  }

  private async sendExample(item: OutboxItem): Promise<void> {
    const { device } = this.options;
    const meta = { ...item.meta, priority: item.priority, embedding: Buffer.from(item.embedding.buffer, item.embedding.byteOffset, item.embedding.byteLength).toString("base64") };
    await this.sender.send({
      dataTopic: deviceTopic(device.site, device.id, "up/data"),
      ackTopic: deviceTopic(device.site, device.id, "up/ack"),
      transferId: `ex-${item.id}-${item.createdAt}`,
      kind: EXAMPLE_KIND,
      name: `example-${item.id}.jpg`,
      data: item.jpeg,
      meta,
      ackTimeoutMs: 10_000,
      maxAttempts: 3,
    });
  }

  /** Stores a completed model download under received/; deployment is the agent's decision. */
  private async received(file: string, begin: BeginHeader): Promise<void> {
    if (begin.kind !== MODEL_KIND) {
      throw new Error(`transfer kind "${begin.kind}" is not accepted on the download topic; expected "${MODEL_KIND}"`);
    }
    const meta = (begin.meta ?? {}) as Record<string, unknown>;
    const name = typeof meta.name === "string" ? meta.name : "";
    const version = typeof meta.version === "string" ? meta.version : "";
    if (!BUNDLE_NAME.test(name) || !BUNDLE_NAME.test(version)) {
      throw new Error("model download lacks a valid name and version in its metadata");
    }
    const target = path.join(this.receivedDir, `${name}-${version}.slpkg`);
    const partial = `${target}.partial`;
    await copyFile(file, partial);
    await rename(partial, target);
    await fsyncDir(this.receivedDir);
    this.logger.info({ model: name, modelVersion: version, bytes: begin.size }, "model bundle received");
    this.options.onModel({ file: target, name, version, sha256: typeof meta.sha256 === "string" ? meta.sha256 : undefined, deploy: meta.deploy === true });
  }

  /** Finds a received bundle by version (and name when given). */
  async findReceived(version: string, name?: string): Promise<string | undefined> {
    const files = await readdir(this.receivedDir).catch(() => [] as string[]);
    const suffix = `-${version}.slpkg`;
    const match = files.filter((f) => f.endsWith(suffix) && (!name || f === `${name}${suffix}`)).sort();
    return match.length ? path.join(this.receivedDir, match[match.length - 1]!) : undefined;
  }

  async stop(): Promise<void> {
    if (this.statusTimer) {
      clearInterval(this.statusTimer);
    }
    // Closing the sender first ends in-flight uploads at once; their examples stay in the outbox.
    const uplinkStopped = this.uplink?.stop();
    await this.sender.close();
    await uplinkStopped;
    await this.receiver.close();
    await this.commands.stop();
    await this.link.close();
  }
}
