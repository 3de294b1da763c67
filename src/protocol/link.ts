/**
 * MqttLink: one MQTT connection of an agent or the trainer, a thin wrapper over mqtt.js 5.
 *
 * - Subscriptions are kept by the link and sent again after every reconnect, because the link
 *   connects with a clean session and the broker drops them on disconnect.
 * - An agent link registers a retained "offline" status as its last will and publishes a retained
 *   status (by default "online") after every connect, so `{base}/status` always shows whether the
 *   device is reachable.
 * - QoS 1 publishes made while the broker is unreachable stay in mqtt.js's in-memory store and are
 *   sent after the reconnect. Their promises resolve only then.
 */
import { randomBytes } from "node:crypto";
import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import { hostname } from "node:os";

import mqtt, { ErrorWithReasonCode, type IClientOptions, type IClientPublishOptions, type MqttClient } from "mqtt";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { PROTOCOL_VERSION, type DeviceState, type StatusMessage } from "./messages.js";
import { assertValidName, deviceTopic, topicMatches } from "./topics.js";

/** A link that cannot connect, publish or subscribe. */
export class LinkError extends SortlineError {}

export type LinkRole = "agent" | "trainer";

/** Fields an agent adds to each status message it publishes. */
export type StatusExtras = Pick<StatusMessage, "agentVersion" | "model" | "stats">;

export interface MqttLinkOptions {
  /** Broker URL: mqtt://, mqtts://, ws:// or wss://. */
  url: string;
  role: LinkRole;
  /** Site of the device. Required for role "agent". */
  site?: string;
  /** Device name. Required for role "agent". */
  device?: string;
  /** Default: `sortline-${role}-${device or host name}-${8 random hex digits}`. */
  clientId?: string;
  /** MQTT 5 (default) or 3.1.1. aedes speaks only 3.1.1 (4). */
  protocolVersion?: 4 | 5;
  /** PEM file paths for mqtts:// and wss:// URLs; `cert` and `key` enable client certificates. */
  tls?: { ca?: string; cert?: string; key?: string };
  username?: string;
  password?: string;
  logger?: Logger;
  /** Delay between reconnect attempts (default 1000 ms). */
  reconnectPeriodMs?: number;
  /** Time allowed for one TCP + CONNECT/CONNACK exchange (default 10000 ms). */
  connectTimeoutMs?: number;
  /** MQTT keep-alive interval (default 30 s). The broker publishes the last will after 1.5 times this without traffic. */
  keepaliveSec?: number;
  /** Agent only: called before each status publish for agentVersion, model and stats. */
  statusProvider?: () => StatusExtras | Promise<StatusExtras>;
}

export interface PublishOptions {
  /** Default 1. */
  qos?: 0 | 1 | 2;
  /** Default false. */
  retain?: boolean;
}

/** Receives each message whose topic matches the subscribed pattern. A thrown error or a rejected promise is logged. */
export type MessageHandler = (topic: string, payload: Buffer) => void | Promise<void>;

/** Removes a handler, and the broker subscription when it was the pattern's last handler. */
export type Unsubscribe = () => Promise<void>;

interface LinkEvents {
  /** After each CONNACK, once subscriptions are restored. */
  connect: [];
  /** After the connection to the broker is lost. */
  offline: [];
}

interface Subscription {
  qos: 0 | 1 | 2;
  handlers: Set<MessageHandler>;
}

const DEFAULT_RECONNECT_PERIOD_MS = 1_000;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_KEEPALIVE_SEC = 30;
/** Time close() waits for the offline status and the DISCONNECT before it drops the socket. */
const CLOSE_TIMEOUT_MS = 3_000;
/** Repeated identical connection errors are logged at most this often. */
const ERROR_LOG_INTERVAL_MS = 30_000;

function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new LinkError(message)), ms);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}

/** Serialises an object payload as JSON; Buffers and strings pass unchanged. */
function encodePayload(payload: Buffer | string | object): Buffer | string {
  if (Buffer.isBuffer(payload) || typeof payload === "string") {
    return payload;
  }
  return JSON.stringify(payload);
}

export class MqttLink extends EventEmitter<LinkEvents> {
  readonly role: LinkRole;
  readonly clientId: string;
  readonly site: string | undefined;
  readonly device: string | undefined;
  private readonly logger: Logger;
  private readonly subscriptions = new Map<string, Subscription>();
  private client: MqttClient | undefined;
  private connecting: Promise<void> | undefined;
  private online = false;
  private closed = false;
  private state: DeviceState = "online";
  private lastErrorLog = { message: "", at: 0 };

  constructor(private readonly options: MqttLinkOptions) {
    super();
    this.role = options.role;
    if (options.role === "agent") {
      assertValidName("site", options.site);
      assertValidName("device", options.device);
    }
    if (options.tls && !/^(mqtts|wss):/.test(options.url)) {
      throw new LinkError(`tls is set but url ${options.url} does not start with mqtts:// or wss://; change the url or remove tls`);
    }
    this.site = options.site;
    this.device = options.device;
    this.clientId = options.clientId ?? `sortline-${options.role}-${options.device ?? hostname()}-${randomBytes(4).toString("hex")}`;
    this.logger = (options.logger ?? silentLogger).child({ component: "mqtt-link", clientId: this.clientId });
  }

  /** True while the broker connection is up. */
  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  /** The underlying mqtt.js client, for features this class does not wrap; undefined before connect(). */
  get mqttClient(): MqttClient | undefined {
    return this.client;
  }

  /**
   * Connects and resolves after the first CONNACK and the restored subscriptions. After that the
   * link keeps reconnecting until close(). Rejects when the broker refuses the first CONNECT (bad
   * credentials, not authorised), when `timeoutMs` passes without a connection, or on close().
   * Any rejection ends the client.
   */
  connect(options: { timeoutMs?: number } = {}): Promise<void> {
    if (this.closed) {
      return Promise.reject(new LinkError("link is closed"));
    }
    this.connecting ??= this.start(options.timeoutMs);
    return this.connecting;
  }

  private start(timeoutMs: number | undefined): Promise<void> {
    const client = mqtt.connect(this.options.url, this.clientOptions());
    this.client = client;
    this.logger.info({ url: this.options.url, role: this.role }, "connecting to the MQTT broker");

    return new Promise<void>((resolve, reject) => {
      let settled = false;
      let lastError = "";
      const timer =
        timeoutMs === undefined
          ? undefined
          : setTimeout(() => fail(new LinkError(`could not connect to ${this.options.url} within ${timeoutMs} ms${lastError ? `: ${lastError}` : ""}`)), timeoutMs);

      const fail = (error: Error): void => {
        if (settled) {
          return;
        }
        settled = true;
        clearTimeout(timer);
        client.end(true);
        reject(error);
      };

      client.on("connect", () => {
        void this.onConnack(client).then(() => {
          if (!settled) {
            settled = true;
            clearTimeout(timer);
            resolve();
          }
          this.emit("connect");
        });
      });
      client.on("close", () => {
        // close() sets `closed` before it ends the client, so a deliberate disconnect is not reported as lost.
        if (this.online && !this.closed) {
          this.online = false;
          this.logger.warn("lost the MQTT broker; reconnecting");
          this.emit("offline");
        }
        if (this.closed) {
          fail(new LinkError("link closed before it connected"));
        }
      });
      client.on("reconnect", () => this.refreshWill(client));
      client.on("error", (error) => {
        lastError = describeError(error);
        if (error instanceof ErrorWithReasonCode && !settled) {
          fail(new LinkError(`broker at ${this.options.url} refused the connection: ${lastError}`, { cause: error }));
          return;
        }
        this.logConnectionError(lastError);
      });
      client.on("message", (topic, payload) => this.dispatch(topic, payload));
    });
  }

  private clientOptions(): IClientOptions {
    const { options } = this;
    const tls = options.tls;
    const clientOptions: IClientOptions = {
      clientId: this.clientId,
      protocolVersion: options.protocolVersion ?? 5,
      clean: true,
      resubscribe: false,
      reconnectPeriod: options.reconnectPeriodMs ?? DEFAULT_RECONNECT_PERIOD_MS,
      reconnectOnConnackError: true,
      connectTimeout: options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS,
      keepalive: options.keepaliveSec ?? DEFAULT_KEEPALIVE_SEC,
      username: options.username,
      password: options.password,
      ca: tls?.ca ? readFileSync(tls.ca) : undefined,
      cert: tls?.cert ? readFileSync(tls.cert) : undefined,
      key: tls?.key ? readFileSync(tls.key) : undefined,
    };
    if (this.role === "agent") {
      clientOptions.will = {
        topic: this.statusTopic(),
        payload: Buffer.from(JSON.stringify(this.offlineStatus())),
        qos: 1,
        retain: true,
      };
    }
    return clientOptions;
  }

  private statusTopic(): string {
    return deviceTopic(this.site!, this.device!, "status");
  }

  private offlineStatus(): StatusMessage {
    return { v: PROTOCOL_VERSION, site: this.site!, device: this.device!, state: "offline", at: Date.now() };
  }

  /**
   * Updates the will's timestamp before each reconnect, since mqtt.js rebuilds the CONNECT packet
   * from client.options. The broker publishes the will unchanged, so its `at` is the time the
   * connection was opened, not the time it was lost.
   */
  private refreshWill(client: MqttClient): void {
    if (this.role === "agent" && client.options.will) {
      client.options.will.payload = Buffer.from(JSON.stringify(this.offlineStatus()));
    }
  }

  private async onConnack(client: MqttClient): Promise<void> {
    this.online = true;
    this.lastErrorLog = { message: "", at: 0 };
    this.logger.info({ url: this.options.url }, "connected to the MQTT broker");
    await Promise.all(
      [...this.subscriptions.entries()].map(async ([pattern, subscription]) => {
        try {
          await this.sendSubscribe(client, pattern, subscription.qos);
        } catch (error) {
          this.logger.error({ pattern, err: describeError(error) }, "restoring a subscription failed");
        }
      }),
    );
    if (this.role === "agent") {
      this.publishStatus(this.state).catch((error: unknown) => {
        this.logger.warn({ err: describeError(error) }, "status publish after connect failed");
      });
    }
  }

  private logConnectionError(message: string): void {
    const now = Date.now();
    if (message !== this.lastErrorLog.message || now - this.lastErrorLog.at >= ERROR_LOG_INTERVAL_MS) {
      this.lastErrorLog = { message, at: now };
      this.logger.warn({ url: this.options.url, err: message }, "MQTT connection error; retrying");
    }
  }

  private dispatch(topic: string, payload: Buffer): void {
    for (const [pattern, subscription] of this.subscriptions) {
      if (!topicMatches(pattern, topic)) {
        continue;
      }
      for (const handler of subscription.handlers) {
        try {
          const result = handler(topic, payload);
          if (result instanceof Promise) {
            result.catch((error: unknown) => this.logger.error({ topic, err: describeError(error) }, "message handler failed"));
          }
        } catch (error) {
          this.logger.error({ topic, err: describeError(error) }, "message handler failed");
        }
      }
    }
  }

  private requireClient(): MqttClient {
    if (this.closed) {
      throw new LinkError("link is closed");
    }
    if (!this.client) {
      throw new LinkError("link is not started; call connect() first");
    }
    return this.client;
  }

  /**
   * Publishes a Buffer, a string, or an object as JSON. With QoS 1 or 2 the promise resolves when
   * the broker acknowledged the message, which waits for a reconnect while the broker is
   * unreachable. With QoS 0 it resolves once the packet is written or queued.
   */
  async publish(topic: string, payload: Buffer | string | object, options: PublishOptions = {}): Promise<void> {
    const client = this.requireClient();
    const publishOptions: IClientPublishOptions = { qos: options.qos ?? 1, retain: options.retain ?? false };
    await client.publishAsync(topic, encodePayload(payload), publishOptions);
  }

  /**
   * Adds a handler for a pattern with `+` and `#` wildcards. Resolves after the SUBACK when
   * connected, otherwise at once, and the link subscribes on the next connect. Returns a function
   * that removes this handler again.
   */
  async subscribe(pattern: string, handler: MessageHandler, options: { qos?: 0 | 1 | 2 } = {}): Promise<Unsubscribe> {
    const client = this.requireClient();
    const qos = options.qos ?? 1;
    let subscription = this.subscriptions.get(pattern);
    const isNew = subscription === undefined;
    if (!subscription) {
      subscription = { qos, handlers: new Set() };
      this.subscriptions.set(pattern, subscription);
    }
    subscription.handlers.add(handler);
    if (isNew && client.connected) {
      await this.sendSubscribe(client, pattern, qos);
    }
    return () => this.removeHandler(pattern, handler);
  }

  private async sendSubscribe(client: MqttClient, pattern: string, qos: 0 | 1 | 2): Promise<void> {
    const granted = await client.subscribeAsync(pattern, { qos });
    const rejected = granted.find((grant) => grant.qos >= 0x80);
    if (rejected) {
      throw new LinkError(`broker rejected the subscription to ${pattern} (reason code ${rejected.qos}); check the broker ACL`);
    }
  }

  private async removeHandler(pattern: string, handler: MessageHandler): Promise<void> {
    const subscription = this.subscriptions.get(pattern);
    if (!subscription?.handlers.delete(handler) || subscription.handlers.size > 0) {
      return;
    }
    this.subscriptions.delete(pattern);
    const client = this.client;
    if (client?.connected && !this.closed) {
      await client.unsubscribeAsync(pattern);
    }
  }

  /**
   * Agent only: publishes a retained status with the current time and the status provider's fields.
   * The state is remembered and published again after each reconnect; "offline" is not remembered.
   */
  async publishStatus(state: DeviceState = this.state): Promise<void> {
    if (this.role !== "agent") {
      throw new LinkError("only an agent link publishes a device status");
    }
    if (state !== "offline") {
      this.state = state;
    }
    let extras: StatusExtras = {};
    if (this.options.statusProvider) {
      try {
        extras = await this.options.statusProvider();
      } catch (error) {
        this.logger.warn({ err: describeError(error) }, "status provider failed; publishing the status without its fields");
      }
    }
    const status: StatusMessage = { ...extras, v: PROTOCOL_VERSION, site: this.site!, device: this.device!, state, at: Date.now() };
    await this.publish(this.statusTopic(), status, { qos: 1, retain: true });
  }

  /**
   * Disconnects. An agent link that is connected first publishes a retained "offline" status,
   * because a clean DISCONNECT makes the broker discard the last will. Waits at most about
   * 3 s for each step, then drops the socket.
   */
  async close(): Promise<void> {
    if (this.closed) {
      return;
    }
    const client = this.client;
    if (client?.connected && this.role === "agent") {
      try {
        await withTimeout(this.publishStatus("offline"), CLOSE_TIMEOUT_MS, "offline status not acknowledged in time");
      } catch (error) {
        this.logger.warn({ err: describeError(error) }, "offline status publish failed on close");
      }
    }
    this.closed = true;
    this.subscriptions.clear();
    if (!client) {
      return;
    }
    if (client.connected) {
      await withTimeout(client.endAsync(false), CLOSE_TIMEOUT_MS, "disconnect timed out").catch(() => client.end(true));
    } else {
      client.end(true);
    }
    this.online = false;
    this.logger.info("MQTT link closed");
  }
}
