/**
 * Commands from the trainer to one device: `CommandClient` publishes a CommandRequest on
 * `{base}/cmd`, and the device's `CommandServer` publishes exactly one CommandReply per request
 * on `{base}/reply`. A redelivered request (same id) gets the cached reply again.
 *
 * Authorisation: a server configured with trainer public keys runs only requests signed with
 * ed25519 over `signedRequestBytes`, which binds the request to the target site and device.
 */
import { createPrivateKey, createPublicKey, KeyObject, randomUUID, sign, verify } from "node:crypto";

import { Ajv, type ValidateFunction } from "ajv";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { MqttLink, Unsubscribe } from "./link.js";
import {
  decodeCommandReply,
  decodeCommandRequest,
  ID_PATTERN,
  parseJsonObject,
  PROTOCOL_VERSION,
  type CommandErrorCode,
  type CommandReply,
  type CommandRequest,
} from "./messages.js";
import { deviceTopic, fleetPattern, parseDeviceTopic } from "./topics.js";

/** An ed25519 key as a node:crypto KeyObject or a PEM string. */
export type KeyInput = KeyObject | string;

/** Thrown by a command handler to reply with a specific error code, e.g. "busy". */
export class CommandError extends SortlineError {
  constructor(
    readonly code: CommandErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** A request that got no reply within its timeout. */
export class CommandTimeoutError extends SortlineError {}

/** An ed25519 key that cannot be loaded. */
export class CommandKeyError extends SortlineError {}

// ---------------------------------------------------------------------------------------------
// Canonical JSON and signatures

/**
 * Serialises `value` as JSON with object keys sorted by UTF-16 code unit and no whitespace, so
 * equal values give equal bytes on every peer. Object entries whose value is undefined are left
 * out, as JSON.stringify does. Throws TypeError on non-finite numbers, bigint, functions and symbols.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value === "boolean" || typeof value === "string") {
    return JSON.stringify(value);
  }
  if (typeof value === "number") {
    if (!Number.isFinite(value)) {
      throw new TypeError(`canonical JSON cannot encode the number ${value}`);
    }
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) {
    return `[${value.map((item) => (item === undefined ? "null" : canonicalJson(item))).join(",")}]`;
  }
  if (typeof value === "object") {
    const record = value as Record<string, unknown>;
    const entries = Object.keys(record)
      .filter((key) => record[key] !== undefined)
      .sort()
      .map((key) => `${JSON.stringify(key)}:${canonicalJson(record[key])}`);
    return `{${entries.join(",")}}`;
  }
  throw new TypeError(`canonical JSON cannot encode a value of type ${typeof value}`);
}

/** The request fields a signature covers. */
export type SignedRequestFields = Pick<CommandRequest, "id" | "command" | "args" | "sentAt" | "expiresAt">;

/**
 * Returns the bytes a trainer signs: the canonical JSON of
 * {id, command, args, site, device, sentAt, expiresAt}, without expiresAt when the request has none.
 */
export function signedRequestBytes(request: SignedRequestFields, site: string, device: string): Buffer {
  const { id, command, args, sentAt, expiresAt } = request;
  return Buffer.from(canonicalJson({ id, command, args, site, device, sentAt, expiresAt }), "utf8");
}

/** Loads an ed25519 private key from a KeyObject or PEM string; throws CommandKeyError otherwise. */
export function loadPrivateKey(input: KeyInput): KeyObject {
  let key: KeyObject;
  try {
    key = input instanceof KeyObject ? input : createPrivateKey(input);
  } catch (error) {
    throw new CommandKeyError(`cannot read the private key: ${describeError(error)}`, { cause: error });
  }
  if (key.type !== "private" || key.asymmetricKeyType !== "ed25519") {
    throw new CommandKeyError(`expected an ed25519 private key, got a ${key.asymmetricKeyType ?? "symmetric"} ${key.type} key`);
  }
  return key;
}

/** Loads an ed25519 public key from a KeyObject or PEM string; a private key yields its public half. */
export function loadPublicKey(input: KeyInput): KeyObject {
  let key: KeyObject;
  try {
    if (input instanceof KeyObject && input.type === "public") {
      key = input;
    } else {
      key = createPublicKey(input);
    }
  } catch (error) {
    throw new CommandKeyError(`cannot read the public key: ${describeError(error)}`, { cause: error });
  }
  if (key.type !== "public" || key.asymmetricKeyType !== "ed25519") {
    throw new CommandKeyError(`expected an ed25519 public key, got a ${key.asymmetricKeyType ?? "symmetric"} ${key.type} key`);
  }
  return key;
}

/** Signs a request for one device and returns the base64 signature for `sig`. */
export function signCommandRequest(request: SignedRequestFields, site: string, device: string, privateKey: KeyInput): string {
  return sign(null, signedRequestBytes(request, site, device), loadPrivateKey(privateKey)).toString("base64");
}

/** Returns true when `signature` (base64) is a valid ed25519 signature of the request for this device. */
export function verifyCommandRequest(request: SignedRequestFields, site: string, device: string, signature: string, publicKey: KeyInput): boolean {
  const bytes = Buffer.from(signature, "base64");
  // ed25519 signatures are 64 bytes, so other lengths are rejected without calling verify().
  if (bytes.length !== 64) {
    return false;
  }
  return verify(null, signedRequestBytes(request, site, device), loadPublicKey(publicKey), bytes);
}

// ---------------------------------------------------------------------------------------------
// Device side

/** One command a device runs. `run` returns the reply's `result`; it may throw CommandError. */
export interface CommandHandler<Args extends Record<string, unknown> = Record<string, unknown>> {
  /** JSON schema for `args`, checked by ajv with defaults applied. Default: any object. */
  argsSchema?: object;
  /** When true, a request that arrives while another run of this command is in progress gets "busy". */
  exclusive?: boolean;
  run(args: Args, request: CommandRequest): Promise<Record<string, unknown> | void>;
}

export interface CommandServerOptions {
  /** An agent link; its site and device name the command topics. */
  link: MqttLink;
  /** Trainer public keys by keyId. When given and not empty, every request must be signed by one of them, and CommandClient sets expiresAt by default to limit replays. */
  trustedKeys?: Record<string, KeyInput> | Map<string, KeyInput>;
  /** Request ids whose replies are kept for redeliveries (default 1000). */
  replayCacheSize?: number;
  logger?: Logger;
  /** Clock for expiry checks, ms since the Unix epoch (default Date.now). */
  now?: () => number;
}

interface RegisteredHandler {
  handler: CommandHandler;
  validate: ValidateFunction;
  running: number;
}

const DEFAULT_REPLAY_CACHE_SIZE = 1_000;
const UNKNOWN_ID = "unknown";
const ID_REGEX = new RegExp(ID_PATTERN);

/**
 * Serves commands on `{base}/cmd` of the link's device. Every request gets exactly one reply,
 * and a request whose id is in the replay cache gets the cached reply without running again.
 * Unauthorised and malformed requests are not cached, so they cannot block a later valid request
 * with the same id.
 *
 * NOTE: the replay cache is in memory and bounded. A signed request copied off the broker runs
 * again once its id has left the cache or the agent has restarted, unless its expiresAt has passed.
 */
export class CommandServer {
  private readonly site: string;
  private readonly device: string;
  private readonly ajv = new Ajv({ allErrors: false, useDefaults: true, strict: false });
  private readonly handlers = new Map<string, RegisteredHandler>();
  private readonly replies = new Map<string, Promise<CommandReply>>();
  private readonly trustedKeys = new Map<string, KeyObject>();
  private readonly replayCacheSize: number;
  private readonly logger: Logger;
  private readonly now: () => number;
  private unsubscribe: Unsubscribe | undefined;

  constructor(private readonly options: CommandServerOptions) {
    const { link } = options;
    if (link.role !== "agent" || link.site === undefined || link.device === undefined) {
      throw new SortlineError("CommandServer needs an agent link with site and device");
    }
    this.site = link.site;
    this.device = link.device;
    const keys = options.trustedKeys instanceof Map ? [...options.trustedKeys] : Object.entries(options.trustedKeys ?? {});
    for (const [keyId, input] of keys) {
      this.trustedKeys.set(keyId, loadPublicKey(input));
    }
    this.replayCacheSize = options.replayCacheSize ?? DEFAULT_REPLAY_CACHE_SIZE;
    this.logger = (options.logger ?? silentLogger).child({ component: "command-server", site: this.site, device: this.device });
    this.now = options.now ?? Date.now;
  }

  /** Registers a command; throws on a duplicate name or an invalid schema. */
  handle<Args extends Record<string, unknown>>(name: string, handler: CommandHandler<Args>): this {
    if (this.handlers.has(name)) {
      throw new SortlineError(`command "${name}" is already registered`);
    }
    const validate = this.ajv.compile(handler.argsSchema ?? { type: "object" });
    this.handlers.set(name, { handler: handler as unknown as CommandHandler, validate, running: 0 });
    return this;
  }

  /** Subscribes to the device's command topic. */
  async start(): Promise<void> {
    this.unsubscribe ??= await this.options.link.subscribe(deviceTopic(this.site, this.device, "cmd"), (_topic, payload) => this.onRequest(payload));
    this.logger.info({ commands: [...this.handlers.keys()], signed: this.trustedKeys.size > 0 }, "command server started");
  }

  async stop(): Promise<void> {
    const unsubscribe = this.unsubscribe;
    this.unsubscribe = undefined;
    await unsubscribe?.();
  }

  private async onRequest(payload: Buffer): Promise<void> {
    const decoded = decodeCommandRequest(payload);
    if (!decoded.ok) {
      const id = readableId(payload);
      this.logger.warn({ id, err: decoded.error }, "malformed command request");
      await this.sendReply(this.failure(id, "malformed", `malformed request: ${decoded.error}`));
      return;
    }
    const request = decoded.value;

    const authError = this.authorise(request);
    if (authError !== undefined) {
      this.logger.warn({ id: request.id, command: request.command, keyId: request.keyId, err: authError }, "unauthorised command request");
      await this.sendReply(this.failure(request.id, "unauthorised", authError));
      return;
    }

    const cached = this.replies.get(request.id);
    if (cached) {
      // Refresh the entry's position, so the map's insertion order stays least recently used first.
      this.replies.delete(request.id);
      this.replies.set(request.id, cached);
      this.logger.info({ id: request.id, command: request.command }, "repeated command request; sending the cached reply");
      await this.sendReply(await cached);
      return;
    }

    const reply = this.execute(request);
    this.remember(request.id, reply);
    await this.sendReply(await reply);
  }

  /** Returns why the request is not authorised, or undefined when it is (or no keys are configured). */
  private authorise(request: CommandRequest): string | undefined {
    if (this.trustedKeys.size === 0) {
      return undefined;
    }
    if (request.keyId === undefined || request.sig === undefined) {
      return "request is not signed; this device requires keyId and sig";
    }
    const key = this.trustedKeys.get(request.keyId);
    if (!key) {
      return `unknown keyId "${request.keyId}"`;
    }
    let valid: boolean;
    try {
      valid = verifyCommandRequest(request, this.site, this.device, request.sig, key);
    } catch (error) {
      // canonicalJson throws on some args that JSON.parse accepts, such as 1e400 (parsed as
      // Infinity) or nesting deeper than the call stack allows.
      return `signature cannot be checked because args cannot be encoded as canonical JSON: ${describeError(error)}`;
    }
    if (!valid) {
      return `invalid signature for keyId "${request.keyId}"`;
    }
    return undefined;
  }

  private remember(id: string, reply: Promise<CommandReply>): void {
    this.replies.set(id, reply);
    while (this.replies.size > this.replayCacheSize) {
      const oldest = this.replies.keys().next().value as string;
      this.replies.delete(oldest);
    }
  }

  private async execute(request: CommandRequest): Promise<CommandReply> {
    const { id, command } = request;
    const now = this.now();
    if (request.expiresAt !== undefined && request.expiresAt <= now) {
      const message = `request expired at ${new Date(request.expiresAt).toISOString()}; device time is ${new Date(now).toISOString()} (check both clocks or allow more time)`;
      this.logger.warn({ id, command }, message);
      return this.failure(id, "expired", message);
    }

    const registered = this.handlers.get(command);
    if (!registered) {
      const known = [...this.handlers.keys()].sort().join(", ") || "none";
      this.logger.warn({ id, command }, "unknown command");
      return this.failure(id, "unknown-command", `unknown command "${command}"; this device handles: ${known}`);
    }

    // Validate a copy, because ajv writes defaults into the object it checks.
    let args: Record<string, unknown>;
    try {
      args = structuredClone(request.args);
    } catch (error) {
      // structuredClone throws RangeError on args nested deeper than the call stack allows.
      const message = `args cannot be copied: ${describeError(error)}`;
      this.logger.warn({ id, command, err: message }, "invalid command arguments");
      return this.failure(id, "invalid-args", message);
    }
    if (!registered.validate(args)) {
      const message = this.ajv.errorsText(registered.validate.errors, { dataVar: "args" });
      this.logger.warn({ id, command, err: message }, "invalid command arguments");
      return this.failure(id, "invalid-args", message);
    }

    if (registered.handler.exclusive && registered.running > 0) {
      this.logger.warn({ id, command }, "command busy");
      return this.failure(id, "busy", `command "${command}" is already running; retry when it has finished`);
    }

    registered.running++;
    this.logger.info({ id, command }, "running command");
    try {
      const result = await registered.handler.run(args, request);
      if (result !== undefined && (result === null || typeof result !== "object" || Array.isArray(result))) {
        throw new CommandError("failed", `handler of "${command}" returned ${Array.isArray(result) ? "an array" : typeof result}, expected an object`);
      }
      return { v: PROTOCOL_VERSION, id, site: this.site, device: this.device, ok: true, result: result ?? {} };
    } catch (error) {
      const code = error instanceof CommandError ? error.code : "failed";
      this.logger.warn({ id, command, code, err: describeError(error) }, "command failed");
      return this.failure(id, code, describeError(error));
    } finally {
      registered.running--;
    }
  }

  private failure(id: string, code: CommandErrorCode, message: string): CommandReply {
    return { v: PROTOCOL_VERSION, id, site: this.site, device: this.device, ok: false, error: { code, message } };
  }

  private async sendReply(reply: CommandReply): Promise<void> {
    try {
      await this.options.link.publish(deviceTopic(this.site, this.device, "reply"), reply, { qos: 1 });
    } catch (error) {
      this.logger.error({ id: reply.id, err: describeError(error) }, "command reply publish failed");
    }
  }
}

/** Returns the request id of a malformed request when one can be read, else "unknown". */
function readableId(payload: Buffer): string {
  const parsed = parseJsonObject(payload);
  const id = parsed.ok ? parsed.value.id : undefined;
  return typeof id === "string" && ID_REGEX.test(id) ? id : UNKNOWN_ID;
}

// ---------------------------------------------------------------------------------------------
// Trainer side

export interface CommandClientOptions {
  /** A trainer link. */
  link: MqttLink;
  /** Signs every request when given; the devices must trust the public key under `keyId`. */
  signingKey?: { keyId: string; privateKey: KeyInput };
  logger?: Logger;
}

export interface RequestOptions {
  /** Time to wait for the reply (default 10000 ms). */
  timeoutMs?: number;
  /** The request expires this long after sending (default: timeoutMs). Null sends no expiresAt. */
  expiresInMs?: number | null;
}

interface PendingRequest {
  resolve: (reply: CommandReply) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const DEFAULT_TIMEOUT_MS = 10_000;

/** Sends commands to devices and matches their replies, which arrive on `sortline/v1/+/+/reply`. */
export class CommandClient {
  private readonly pending = new Map<string, PendingRequest>();
  private readonly logger: Logger;
  private readonly signingKey: { keyId: string; privateKey: KeyObject } | undefined;
  private subscribed: Promise<Unsubscribe> | undefined;

  constructor(private readonly options: CommandClientOptions) {
    this.logger = (options.logger ?? silentLogger).child({ component: "command-client" });
    this.signingKey = options.signingKey && { keyId: options.signingKey.keyId, privateKey: loadPrivateKey(options.signingKey.privateKey) };
  }

  /** Subscribes to the reply topics; request() calls it too. */
  async start(): Promise<void> {
    this.subscribed ??= this.options.link.subscribe(fleetPattern("reply"), (topic, payload) => this.onReply(topic, payload));
    await this.subscribed;
  }

  /**
   * Sends one command and resolves with the device's reply, also when the reply reports an error.
   * Rejects with CommandTimeoutError when no reply arrives within `timeoutMs`.
   */
  async request(site: string, device: string, command: string, args: Record<string, unknown> = {}, options: RequestOptions = {}): Promise<CommandReply> {
    const topic = deviceTopic(site, device, "cmd");
    await this.start();
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const expiresInMs = options.expiresInMs === undefined ? timeoutMs : options.expiresInMs;
    const sentAt = Date.now();
    const request: CommandRequest = { v: PROTOCOL_VERSION, id: randomUUID(), command, args, sentAt };
    if (expiresInMs !== null) {
      request.expiresAt = sentAt + expiresInMs;
    }
    if (this.signingKey) {
      request.keyId = this.signingKey.keyId;
      request.sig = signCommandRequest(request, site, device, this.signingKey.privateKey);
    }

    const key = pendingKey(site, device, request.id);
    const reply = new Promise<CommandReply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(key);
        reject(new CommandTimeoutError(`command "${command}" to ${site}/${device} got no reply within ${timeoutMs} ms (request id ${request.id}); is the device online?`));
      }, timeoutMs);
      this.pending.set(key, { resolve, reject, timer });
    });
    this.logger.info({ id: request.id, command, site, device }, "sending command");
    this.options.link.publish(topic, request, { qos: 1 }).catch((error: unknown) => {
      this.settle(key, undefined, new SortlineError(`command "${command}" to ${site}/${device} could not be published: ${describeError(error)}`));
    });
    return reply;
  }

  /** Unsubscribes and rejects every pending request. */
  async close(): Promise<void> {
    for (const key of [...this.pending.keys()]) {
      this.settle(key, undefined, new SortlineError("command client closed before the reply arrived"));
    }
    const subscribed = this.subscribed;
    this.subscribed = undefined;
    if (subscribed) {
      await (await subscribed)();
    }
  }

  private onReply(topic: string, payload: Buffer): void {
    const parsedTopic = parseDeviceTopic(topic);
    const decoded = decodeCommandReply(payload);
    if (!parsedTopic || !decoded.ok) {
      this.logger.warn({ topic, err: decoded.ok ? "not a device topic" : decoded.error }, "ignoring an invalid command reply");
      return;
    }
    const reply = decoded.value;
    if (reply.site !== parsedTopic.site || reply.device !== parsedTopic.device) {
      this.logger.warn({ topic, site: reply.site, device: reply.device }, "ignoring a command reply whose site or device differs from its topic");
      return;
    }
    this.settle(pendingKey(reply.site, reply.device, reply.id), reply);
  }

  private settle(key: string, reply: CommandReply | undefined, error?: Error): void {
    const pending = this.pending.get(key);
    if (!pending) {
      return;
    }
    this.pending.delete(key);
    clearTimeout(pending.timer);
    if (reply) {
      pending.resolve(reply);
    } else {
      pending.reject(error ?? new SortlineError("request ended without a reply"));
    }
  }
}

function pendingKey(site: string, device: string, id: string): string {
  return `${site}/${device}/${id}`;
}
