import { randomBytes } from "node:crypto";
import mqtt, { type MqttClient } from "mqtt";

import type { ActuatorConfig } from "../config/schema.js";
import { resolveSecret } from "../config/load.js";
import { describeError } from "../lib/errors.js";
import type { Logger } from "../lib/log.js";

/** The message a line's PLC gateway receives for one frame. */
export interface ActuatorMessage {
  frameId: string;
  source: string;
  device: string;
  bin: string;
  label: string | null;
  confidence: number | null;
  reason: string | null;
  /** Milliseconds since the Unix epoch. */
  capturedAt: number;
  decidedAt: number;
  /** The actuator must act before this time (capture time plus the configured deadline), else skip. */
  deadline: number;
  model: { name: string; version: string };
}

export interface Actuator {
  readonly kind: string;
  start(): Promise<void>;
  send(messages: readonly ActuatorMessage[]): void;
  stop(): Promise<void>;
  /** Messages given up on (broker unreachable and the offline allowance used up). */
  readonly dropped: number;
}

/** Writes each decision as a log line; useful on a bench and as a second channel next to MQTT. */
export class LogActuator implements Actuator {
  readonly kind = "log";
  readonly dropped = 0;

  constructor(private readonly logger: Logger) {}

  async start(): Promise<void> {}

  send(messages: readonly ActuatorMessage[]): void {
    for (const message of messages) {
      this.logger.info({ frame: message.frameId, source: message.source, bin: message.bin, label: message.label, confidence: message.confidence, reason: message.reason }, "decision");
    }
  }

  async stop(): Promise<void> {}
}

export interface MqttActuatorOptions {
  url: string;
  topic: string;
  qos: 0 | 1 | 2;
  clientId: string;
  username?: string;
  password?: string;
  maxQueued: number;
  logger: Logger;
}

/**
 * Publishes one JSON decision message per frame. While the broker is unreachable, mqtt.js keeps
 * messages in memory. This actuator caps that at `maxQueued` and drops the rest, because a
 * decision delivered after its deadline cannot move an item that has passed the actuator.
 */
export class MqttActuator implements Actuator {
  readonly kind = "mqtt";
  private client: MqttClient | undefined;
  private offlineQueued = 0;
  private lastDropLog = 0;
  dropped = 0;

  constructor(private readonly options: MqttActuatorOptions) {}

  async start(): Promise<void> {
    const { url, clientId, username, password, logger } = this.options;
    const client = mqtt.connect(url, {
      clientId,
      username,
      password,
      protocolVersion: 4,
      reconnectPeriod: 1000,
      connectTimeout: 10_000,
      clean: true,
    });
    this.client = client;
    client.on("connect", () => {
      this.offlineQueued = 0;
      logger.info({ actuator: "mqtt", clientId }, "actuator connected to the broker");
    });
    client.on("offline", () => logger.warn({ actuator: "mqtt", clientId }, "actuator lost the broker; reconnecting"));
    client.on("error", (error) => logger.warn({ actuator: "mqtt", err: describeError(error) }, "actuator MQTT error"));
  }

  send(messages: readonly ActuatorMessage[]): void {
    const client = this.client;
    if (!client) {
      return;
    }
    for (const message of messages) {
      if (!client.connected) {
        if (this.offlineQueued >= this.options.maxQueued) {
          this.dropped++;
          this.logDrop();
          continue;
        }
        this.offlineQueued++;
      }
      client.publish(this.options.topic, JSON.stringify(message), { qos: this.options.qos }, (error) => {
        if (error) {
          this.dropped++;
          this.options.logger.warn({ actuator: "mqtt", frame: message.frameId, err: describeError(error) }, "decision publish failed");
        }
      });
    }
  }

  private logDrop(): void {
    const now = Date.now();
    if (now - this.lastDropLog > 10_000) {
      this.lastDropLog = now;
      this.options.logger.warn({ actuator: "mqtt", dropped: this.dropped }, "broker unreachable; decisions dropped");
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client) {
      await client.endAsync(false).catch(() => client.end(true));
    }
  }
}

/** The part of the fleet connection a FleetActuator needs; MqttLink provides it. */
export interface FleetPublisher {
  readonly connected: boolean;
  publish(topic: string, payload: string, options: { qos: 0 | 1 | 2 }): Promise<void>;
}

/**
 * Publishes decisions on the device's decision topic over the fleet connection, so that a broker
 * that allows one connection per device certificate gets one client. While the connection is down
 * it holds at most `maxQueued` decisions and drops the rest, as MqttActuator does.
 */
export class FleetActuator implements Actuator {
  readonly kind = "fleet";
  private pending = 0;
  private lastDropLog = 0;
  dropped = 0;

  constructor(
    private readonly link: FleetPublisher,
    private readonly options: { topic: string; qos: 0 | 1 | 2; maxQueued: number; logger: Logger },
  ) {}

  async start(): Promise<void> {}

  send(messages: readonly ActuatorMessage[]): void {
    for (const message of messages) {
      if (!this.link.connected && this.pending >= this.options.maxQueued) {
        this.dropped++;
        const now = Date.now();
        if (now - this.lastDropLog > 10_000) {
          this.lastDropLog = now;
          this.options.logger.warn({ actuator: "fleet", dropped: this.dropped }, "broker unreachable; decisions dropped");
        }
        continue;
      }
      this.pending++;
      this.link
        .publish(this.options.topic, JSON.stringify(message), { qos: this.options.qos })
        .catch((error: unknown) => {
          this.dropped++;
          this.options.logger.warn({ actuator: "fleet", frame: message.frameId, err: describeError(error) }, "decision publish failed");
        })
        .finally(() => {
          this.pending--;
        });
    }
  }

  async stop(): Promise<void> {}
}

/** Fills `{site}` and `{device}` in a topic template. */
export function expandTopic(template: string, site: string, device: string): string {
  return template.replaceAll("{site}", site).replaceAll("{device}", device);
}

/** Builds the actuators of a configuration; secrets are read here, never logged. */
export async function createActuators(
  configs: readonly ActuatorConfig[],
  device: { id: string; site: string },
  logger: Logger,
  fleet?: FleetPublisher,
): Promise<Actuator[]> {
  const actuators: Actuator[] = [];
  for (const [index, config] of configs.entries()) {
    if (config.type === "log") {
      actuators.push(new LogActuator(logger.child({ actuator: "log" })));
      continue;
    }
    if (config.type === "fleet") {
      if (!fleet) {
        throw new Error(`actuators[${index}] publishes over the fleet connection, but the agent has none`);
      }
      const topic = `sortline/v1/${device.site}/${device.id}/decision`;
      actuators.push(new FleetActuator(fleet, { topic, qos: config.qos, maxQueued: config.maxQueued, logger }));
      continue;
    }
    const password = config.password ? await resolveSecret(config.password, `actuators[${index}].password`) : undefined;
    actuators.push(
      new MqttActuator({
        url: config.url,
        topic: expandTopic(config.topic, device.site, device.id),
        qos: config.qos,
        clientId: config.clientId ?? `sortline-${device.id}-actuator-${randomBytes(4).toString("hex")}`,
        username: config.username,
        password,
        maxQueued: config.maxQueued,
        logger,
      }),
    );
  }
  return actuators;
}
