/**
 * Fuzzes the fleet command topic of a running Agent. The Agent runs the real model on a directory
 * replay of demo/photos, with its fleet connection on a Mosquitto child process and one trusted
 * trainer key. A plain MQTT client publishes thousands of raw messages on its `{base}/cmd` topic.
 * The messages are random bytes, truncated and mutated JSON, wrong types, huge strings, deep
 * nesting and non-finite numbers. They also include unknown commands, signatures over changed
 * bodies, unsigned and expired requests, and replayed and reused ids. The rest are valid signed
 * requests with mutated arguments for every command.
 *
 * Checked:
 * - every request gets exactly one reply, by id, or with id "unknown" when no id can be read;
 * - each reply has the expected error code;
 * - only valid signed requests change the pause state, the model or the persisted settings;
 * - Object.prototype stays clean;
 * - the agent still decides afterwards, and RSS stays bounded.
 *
 * SORTLINE_FUZZ_SEED repeats a run and SORTLINE_FUZZ_SCALE multiplies the message count.
 */
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { isDeepStrictEqual } from "node:util";

import mqtt, { type MqttClient } from "mqtt";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stringify } from "yaml";

import { Agent } from "../../src/agent/agent.js";
import { OVERRIDES_FILE } from "../../src/agent/overrides.js";
import { loadAgentConfig } from "../../src/config/load.js";
import { generateKeyPair, type SigningKeyPair } from "../../src/models/signing.js";
import { canonicalJson, CommandClient, signCommandRequest } from "../../src/protocol/commands.js";
import { MqttLink } from "../../src/protocol/link.js";
import { decodeCommandReply, decodeCommandRequest, ID_PATTERN, type CommandErrorCode, type CommandReply, type CommandRequest } from "../../src/protocol/messages.js";
import { deviceTopic } from "../../src/protocol/topics.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { repoRoot } from "../agent/helpers.js";
import { fuzzScale, fuzzSeed, pollUntil, Prng, RssSampler } from "./helpers.js";

const SITE = "plant-fuzz";
const DEVICE = "line-fuzz";
const CMD_TOPIC = deviceTopic(SITE, DEVICE, "cmd");
const REPLY_TOPIC = deviceTopic(SITE, DEVICE, "reply");
const COMMANDS = ["status", "deploy", "rollback", "set-config", "pause", "resume", "upload-now", "snapshot"] as const;
const SCALE = fuzzScale();
const SEED = fuzzSeed();
const MESSAGES = Math.max(200, Math.round(3_000 * SCALE));
/** Requests in flight at once for the kinds that need no reply before the next message. */
const WINDOW = 32;
/** Replay targets are drawn from the ids cached at most this many requests ago, because the server caches only 1000. */
const REPLAY_HORIZON = 500;
/** RSS may grow by at most this much over the run, which catches a leak of about 170 KiB per message at 3000 messages. */
const MAX_RSS_GROWTH_MIB = 512;
const ID_REGEX = new RegExp(ID_PATTERN);

type Expectation =
  /** Must be an error reply with one of these codes. */
  | { type: "reject"; codes: readonly CommandErrorCode[] }
  /** A fresh, valid, signed request: it runs, and its reply drives the expected state. */
  | { type: "valid"; command: string; args: Record<string, unknown> }
  /** Must receive exactly the reply that `originalId` received, without running again. */
  | { type: "cached"; originalId: string };

interface FuzzMessage {
  kind: string;
  payload: Buffer;
  expect: Expectation;
}

interface SentMessage extends FuzzMessage {
  /** The id the server can read from the payload, or "unknown". */
  replyId: string;
}

/** A valid request whose reply arrived, kept for replays. */
interface CachedRequest {
  id: string;
  payload: Buffer;
  reply: CommandReply;
  /** Value of `authorisedFresh` when it was sent, to tell whether its id is still cached. */
  cacheSeq: number;
}

/** Returns the id the command server reads from a payload: a string id matching ID_PATTERN, else "unknown". */
function readableId(payload: Buffer): string {
  let document: unknown;
  try {
    document = JSON.parse(payload.toString("utf8"));
  } catch {
    return "unknown";
  }
  if (document === null || typeof document !== "object" || Array.isArray(document)) {
    return "unknown";
  }
  const id = (document as Record<string, unknown>).id;
  return typeof id === "string" && ID_REGEX.test(id) ? id : "unknown";
}

/** Collects replies by id and wakes the one waiter per id that a serial send registers. */
class ReplyCollector {
  readonly byId = new Map<string, CommandReply[]>();
  received = 0;
  invalid: string[] = [];
  private readonly waiters = new Map<string, (reply: CommandReply) => void>();

  onMessage(payload: Buffer): void {
    this.received++;
    const decoded = decodeCommandReply(payload);
    if (!decoded.ok) {
      this.invalid.push(decoded.error);
      return;
    }
    const reply = decoded.value;
    if (reply.site !== SITE || reply.device !== DEVICE) {
      this.invalid.push(`reply names ${reply.site}/${reply.device}`);
    }
    const list = this.byId.get(reply.id) ?? [];
    list.push(reply);
    this.byId.set(reply.id, list);
    const waiter = this.waiters.get(reply.id);
    if (waiter) {
      this.waiters.delete(reply.id);
      waiter(reply);
    }
  }

  /** Resolves with the next reply for `id`, or undefined after `timeoutMs`. Register before publishing. */
  next(id: string, timeoutMs: number): Promise<CommandReply | undefined> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiters.delete(id);
        resolve(undefined);
      }, timeoutMs);
      this.waiters.set(id, (reply) => {
        clearTimeout(timer);
        resolve(reply);
      });
    });
  }
}

/** Counts the agent's log lines by message and keeps the first error lines. */
class LogSink {
  readonly byMessage = new Map<string, number>();
  readonly errorLines: string[] = [];
  lines = 0;

  write(line: string): void {
    this.lines++;
    const entry = JSON.parse(line) as { level: number; msg?: string };
    const msg = entry.msg ?? "";
    this.byMessage.set(msg, (this.byMessage.get(msg) ?? 0) + 1);
    if (entry.level >= 50 && this.errorLines.length < 50) {
      this.errorLines.push(line.slice(0, 2_000));
    }
  }

  count(msg: string): number {
    return this.byMessage.get(msg) ?? 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Message generators

/** Keys tried by set-config: live, restart-only, forbidden, malformed and prototype paths. */
const CONFIG_KEYS = [
  "decisions.defaultMinConfidence",
  "decisions.minConfidence.glass",
  "decisions.bins.wood",
  "decisions.bins.glass",
  "decisions.rejectBin",
  "decisions.topK",
  "decisions.deadlineMs",
  "logging.level",
  "mining.lowConfidence",
  "mining.perHour",
  "mining.enabled",
  "mining.randomRate",
  "pipeline.maxBatch",
  "pipeline.maxWaitMs",
  "update.shadowFrames",
  "mining.outbox.maxItems",
  "audit.maxAgeDays",
  "health.port",
  "fleet.statusIntervalSeconds",
  "device.id",
  "device.site",
  "model.dir",
  "sources",
  "actuators",
  "fleet.url",
  "fleet.trustedKeys",
  "fleet.requireSignedCommands",
  "fleet.password",
  "",
  ".",
  "decisions.",
  "decisions..bins",
  "1decisions.topK",
  "decisions.bins.wo od",
  "decisions.bins.\u0000",
  `decisions.bins.${"w".repeat(300)}`,
  "décisions.topK",
  "decisions.__proto__",
  "decisions.__proto__.polluted",
  "decisions.constructor.prototype.polluted",
  "decisions.bins.__proto__.polluted",
  "mining.__proto__.polluted",
  "decisions.minConfidence.__proto__",
  "logging.__proto__.level",
];

const CONFIG_VALUES: readonly unknown[] = [
  0, 0.25, 0.5, 0.9, 1, -1, 2, 7, 1e9, 0.0001, 3, 5_000, 60_001, "", "x", "wood", "reject", "trace", "debug", "info", "warn", "silent",
  true, false, null, [], {}, { a: 1 }, [1, 2], "9".repeat(1_000), { polluted: "yes" },
];

/** Changes the agent accepts, so some set-config requests succeed and the persisted file changes. */
const VALID_CHANGES: readonly [string, unknown][] = [
  ["decisions.defaultMinConfidence", 0.4],
  ["decisions.defaultMinConfidence", 0.6],
  ["decisions.minConfidence.glass", 0.7],
  ["decisions.bins.wood", "wood"],
  ["decisions.topK", 5],
  ["mining.perHour", 10],
  ["mining.lowConfidence", 0.5],
  ["pipeline.maxWaitMs", 20],
  ["update.shadowFrames", 16],
  ["decisions.minConfidence.glass", null],
];

const JSON_VALUES: readonly unknown[] = [0, -1, 1.5, 2 ** 53, "", "x", "1.0.0", true, false, null, [], [1], {}, { a: {} }];

function nestedValue(depth: number, kind: "array" | "object"): unknown {
  let value: unknown = 1;
  for (let i = 0; i < depth; i++) {
    value = kind === "array" ? [value] : { d: value };
  }
  return value;
}

/** Builds JSON text of `depth` nested arrays or objects without recursion. */
function nestedText(depth: number, kind: "array" | "object"): string {
  return kind === "array" ? `${"[".repeat(depth)}1${"]".repeat(depth)}` : `${'{"d":'.repeat(depth)}1${"}".repeat(depth)}`;
}

class MessageFactory {
  private counter = 0;
  /** Authorised requests with fresh ids sent so far; each one adds an entry to the server's reply cache. */
  authorisedFresh = 0;
  readonly cache: CachedRequest[] = [];

  constructor(
    private readonly prng: Prng,
    private readonly trusted: SigningKeyPair,
    private readonly untrusted: SigningKeyPair,
  ) {}

  nextId(): string {
    this.counter++;
    return `fz${this.counter}-${this.prng.text(6)}`;
  }

  /** Builds a request signed for this device by the trusted key, or by the signer that `signer` names. */
  request(
    command: string,
    args: Record<string, unknown>,
    options: { id?: string; sentAt?: number; expiresAt?: number | null; signer?: "trusted" | "untrusted" | "untrusted-as-trusted" | "none"; site?: string; device?: string } = {},
  ): CommandRequest {
    const sentAt = options.sentAt ?? Date.now();
    const request: CommandRequest = { v: 1, id: options.id ?? this.nextId(), command, args, sentAt };
    const expiresAt = options.expiresAt === undefined ? sentAt + 120_000 : options.expiresAt;
    if (expiresAt !== null) {
      request.expiresAt = expiresAt;
    }
    const signer = options.signer ?? "trusted";
    const site = options.site ?? SITE;
    const device = options.device ?? DEVICE;
    if (signer === "trusted") {
      request.keyId = this.trusted.keyId;
      request.sig = signCommandRequest(request, site, device, this.trusted.privateKeyPem);
    } else if (signer === "untrusted") {
      request.keyId = this.untrusted.keyId;
      request.sig = signCommandRequest(request, site, device, this.untrusted.privateKeyPem);
    } else if (signer === "untrusted-as-trusted") {
      request.keyId = this.trusted.keyId;
      request.sig = signCommandRequest(request, site, device, this.untrusted.privateKeyPem);
    }
    return request;
  }

  /** Returns base64 of 64 random bytes, which passes the signature length check and fails verification. */
  garbageSig(): string {
    return this.prng.bytes(64).toString("base64");
  }

  validArgs(command: string): Record<string, unknown> {
    const p = this.prng;
    if (command === "set-config") {
      const args: Record<string, unknown> = {};
      if (p.chance(0.3)) {
        const [key, value] = p.pick(VALID_CHANGES);
        args[key] = value;
        return args;
      }
      const keys = p.chance(0.05) ? 0 : p.between(1, 4);
      for (let i = 0; i < keys; i++) {
        // Computed keys, so "__proto__" becomes an own property as JSON.parse makes it.
        args[p.pick(CONFIG_KEYS)] = p.chance(0.05) ? nestedValue(p.between(2, 400), p.chance(0.5) ? "array" : "object") : p.pick(CONFIG_VALUES);
      }
      return args;
    }
    if (command === "deploy") {
      const variant = p.int(8);
      const version = `${p.int(3)}.${p.int(3)}.${p.int(12)}`;
      switch (variant) {
        case 0:
          return { version: "1.0.0" };
        case 1:
          return { version };
        case 2:
          return { version, name: p.pick(["sortline-trashnet", "../escape", "", "x".repeat(200), "a/b"]) };
        case 3:
          return { version, sha256: p.chance(0.5) ? randomBytes(32).toString("hex") : p.text(64, "0123456789abcdefABCDEFg") };
        case 4:
          return { version: p.pick(JSON_VALUES) };
        case 5:
          return {};
        case 6:
          return { version: p.pick(["latest", "1.0", "1.0.0-", "1.0.0\n", "01.0.0", "1.0.0+../../x", `1.0.0-${"a".repeat(2_000)}`]) };
        default:
          return { version, extra: p.pick(JSON_VALUES) };
      }
    }
    if (p.chance(0.7)) {
      return {};
    }
    return { [p.pick(["verbose", "seconds", "force", "__proto__", "constructor", p.text(8)])]: p.pick(JSON_VALUES) };
  }

  randomCommand(): string {
    return this.prng.pick(COMMANDS);
  }

  /** Builds a fresh, valid, signed request with mutated arguments. */
  valid(kind = "valid-args"): FuzzMessage {
    const command = this.randomCommand();
    const args = this.validArgs(command);
    const request = this.request(command, args);
    return { kind, payload: Buffer.from(JSON.stringify(request)), expect: { type: "valid", command, args } };
  }

  randomBytes(): FuzzMessage {
    const length = this.prng.pick([0, 1, 2, 3, 16, 200, 2_000, 20_000]);
    let payload = this.prng.bytes(length);
    if (this.prng.chance(0.3) && length > 0) {
      payload = Buffer.concat([Buffer.from("{"), payload]);
    }
    return { kind: "random-bytes", payload, expect: { type: "reject", codes: ["malformed"] } };
  }

  truncated(): FuzzMessage {
    const text = JSON.stringify(this.request(this.randomCommand(), this.validArgs("status")));
    return { kind: "truncated-json", payload: Buffer.from(text.slice(0, this.prng.int(text.length))), expect: { type: "reject", codes: ["malformed"] } };
  }

  mutated(): FuzzMessage {
    const command = this.randomCommand();
    const args = this.validArgs(command);
    const base = this.request(command, args);
    let bytes = Buffer.from(JSON.stringify(base));
    const steps = this.prng.between(1, 4);
    for (let i = 0; i < steps; i++) {
      bytes = this.mutateBytes(bytes);
    }
    if (equivalentRequest(base, bytes)) {
      return { kind: "mutated-json-equivalent", payload: bytes, expect: { type: "valid", command, args } };
    }
    return { kind: "mutated-json", payload: bytes, expect: { type: "reject", codes: ["malformed", "unauthorised"] } };
  }

  private mutateBytes(bytes: Buffer): Buffer {
    const p = this.prng;
    if (bytes.length === 0) {
      return p.bytes(1);
    }
    const at = p.int(bytes.length);
    const copy = Buffer.from(bytes);
    switch (p.int(7)) {
      case 0:
        copy[at] = copy[at]! ^ (1 << p.int(8));
        return copy;
      case 1:
        copy[at] = p.int(256);
        return copy;
      case 2:
        return Buffer.concat([bytes.subarray(0, at), p.bytes(p.between(1, 4)), bytes.subarray(at)]);
      case 3:
        return Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + p.between(1, 8))]);
      case 4: {
        const end = Math.min(bytes.length, at + p.between(1, 40));
        return Buffer.concat([bytes.subarray(0, end), bytes.subarray(at, end), bytes.subarray(end)]);
      }
      case 5:
        return Buffer.concat([bytes.subarray(0, at), Buffer.from(p.pick([" ", "\n", "\t", "\u00a0", "\u0000", "\\", '"', "\ufeff"])), bytes.subarray(at)]);
      default: {
        const other = p.int(bytes.length);
        const swapped = Buffer.from(bytes);
        swapped[at] = bytes[other]!;
        swapped[other] = bytes[at]!;
        return swapped;
      }
    }
  }

  wrongTypes(): FuzzMessage {
    const p = this.prng;
    const command = this.randomCommand();
    const original = this.request(command, {});
    const request = { ...original } as unknown as Record<string, unknown>;
    const field = p.pick(["v", "id", "command", "args", "sentAt", "expiresAt", "keyId", "sig"]);
    const raw = p.chance(0.2);
    const replacement = raw ? "\u0000RAW\u0000" : p.pick([...JSON_VALUES, -5, 1.0000001, 2 ** 64, "2024-01-01", [null], { v: 1 }]);
    request[field] = replacement;
    let text = JSON.stringify(request);
    if (raw) {
      text = text.replace(JSON.stringify("\u0000RAW\u0000"), p.pick(["1e400", "-1e400", "-0", "1E+2", "0.0", "1e-400", "123456789012345678901234567890"]));
    }
    const payload = Buffer.from(text);
    if (equivalentRequest(original, payload)) {
      // Replacing a field with an equal value (args {} with {}) leaves a valid request.
      return { kind: "wrong-types-equivalent", payload, expect: { type: "valid", command, args: {} } };
    }
    return { kind: "wrong-types", payload, expect: { type: "reject", codes: ["malformed", "unauthorised"] } };
  }

  hugeStrings(): FuzzMessage {
    const p = this.prng;
    const size = p.pick(SCALE >= 2 ? [1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20] : [1 << 10, 1 << 14, 1 << 16, 1 << 18]);
    const huge = p.chance(0.5) ? "A".repeat(size) : p.text(size, "abcdefghijklmnopqrstuvwxyz0123456789\u00e9\u4e2d\ud83d\ude00\\\"");
    const request = this.request(this.randomCommand(), {}, { signer: "none" }) as unknown as Record<string, unknown>;
    const where = p.pick(["id", "command", "keyId", "sig", "args-value", "args-key", "extra-field"]);
    if (where === "args-value") {
      request.args = { version: huge };
    } else if (where === "args-key") {
      request.args = { [huge]: 1 };
    } else if (where === "extra-field") {
      request.note = huge;
    } else {
      request[where] = huge;
    }
    if (where !== "keyId" && where !== "sig") {
      request.keyId = this.trusted.keyId;
      request.sig = this.garbageSig();
    }
    return { kind: "huge-strings", payload: Buffer.from(JSON.stringify(request)), expect: { type: "reject", codes: ["malformed", "unauthorised"] } };
  }

  deepNesting(): FuzzMessage {
    const p = this.prng;
    const depth = p.pick([64, 1_000, 10_000, 100_000]);
    const shape = p.chance(0.5) ? "array" : "object";
    const deep = nestedText(depth, shape);
    const id = this.nextId();
    const where = p.pick(["args-signed", "args-unsigned", "id", "sig", "top-level", "args-root"]);
    let text: string;
    const head = `{"v":1,"id":"${id}","command":"${this.randomCommand()}","sentAt":${Date.now()},"expiresAt":${Date.now() + 60_000}`;
    switch (where) {
      case "args-signed":
        text = `${head},"args":{"x":${deep}},"keyId":"${this.trusted.keyId}","sig":"${this.garbageSig()}"}`;
        break;
      case "args-unsigned":
        text = `${head},"args":{"x":${deep}}}`;
        break;
      case "id":
        text = `{"v":1,"id":${deep},"command":"status","args":{},"sentAt":1}`;
        break;
      case "sig":
        text = `${head},"args":{},"keyId":"${this.trusted.keyId}","sig":${deep}}`;
        break;
      case "top-level":
        text = deep;
        break;
      default:
        // args itself is the nested object, so the signature check walks it from the root.
        text = `${head},"args":${nestedText(depth, "object")},"keyId":"${this.trusted.keyId}","sig":"${this.garbageSig()}"}`;
    }
    return { kind: `deep-nesting-${where}`, payload: Buffer.from(text), expect: { type: "reject", codes: ["malformed", "unauthorised"] } };
  }

  nonFinite(): FuzzMessage {
    const p = this.prng;
    const token = p.pick(["1e400", "-1e400", "1e309"]);
    const signed = p.chance(0.7);
    const tail = signed ? `,"keyId":"${this.trusted.keyId}","sig":"${this.garbageSig()}"` : "";
    const text = `{"v":1,"id":"${this.nextId()}","command":"set-config","args":{"decisions.topK":${token}},"sentAt":${Date.now()},"expiresAt":${Date.now() + 60_000}${tail}}`;
    return { kind: signed ? "non-finite-signed" : "non-finite-unsigned", payload: Buffer.from(text), expect: { type: "reject", codes: ["unauthorised"] } };
  }

  unknownCommand(): FuzzMessage {
    const p = this.prng;
    const command = p.pick(["self-destruct", "STATUS", "status ", " pause", "reboot", "__proto__", "constructor", "toString", "hasOwnProperty", "valueOf", p.text(p.between(1, 64))]);
    const request = this.request(command, this.validArgs("status"));
    return { kind: "unknown-command", payload: Buffer.from(JSON.stringify(request)), expect: { type: "reject", codes: ["unknown-command"] } };
  }

  signatureMismatch(): FuzzMessage {
    const p = this.prng;
    const command = p.pick(["pause", "resume", "set-config", "deploy", "rollback", "status"]);
    const args = this.validArgs(command);
    const variant = p.int(11);
    let request: CommandRequest;
    switch (variant) {
      case 0:
        request = this.request(command, args, { site: "plant-other" });
        break;
      case 1:
        request = this.request(command, args, { device: "line-other" });
        break;
      case 2:
        request = this.request(command, args, { signer: "untrusted" });
        break;
      case 3:
        request = this.request(command, args, { signer: "untrusted-as-trusted" });
        break;
      default: {
        request = this.request(command, args);
        const original = { ...request };
        if (variant === 4) {
          request.command = p.pick(COMMANDS.filter((name) => name !== command));
        } else if (variant === 5) {
          request.args = { ...args, injected: p.pick(JSON_VALUES) };
        } else if (variant === 6) {
          request.id = this.nextId();
        } else if (variant === 7) {
          request.sentAt += p.pick([-1, 1, 1_000]);
        } else if (variant === 8) {
          if (p.chance(0.5)) {
            delete request.expiresAt;
          } else {
            request.expiresAt = request.expiresAt! + 86_400_000;
          }
        } else if (variant === 9) {
          const sig = Buffer.from(request.sig!, "base64");
          const at = p.int(sig.length);
          sig[at] = sig[at]! ^ (1 << p.int(8));
          request.sig = sig.toString("base64");
        } else {
          request.sig = p.pick([request.sig!.slice(0, -4), `${request.sig!}AAAA`, "", "=", request.sig!.replace(/[A-Za-z]/, "!")]);
        }
        const payload = Buffer.from(JSON.stringify(request));
        if (equivalentRequest(original, payload)) {
          // Base64 decoding skips characters after the padding, so `${sig}AAAA` decodes to the
          // same 64 bytes and the request stays valid.
          return { kind: "signature-equivalent", payload, expect: { type: "valid", command, args } };
        }
      }
    }
    const payload = Buffer.from(JSON.stringify(request));
    return { kind: "signature-mismatch", payload, expect: { type: "reject", codes: ["unauthorised", "malformed"] } };
  }

  unsigned(): FuzzMessage {
    const p = this.prng;
    const command = p.pick(["pause", "resume", "set-config", "deploy", "rollback", "status"]);
    const request = this.request(command, this.validArgs(command), { signer: "none" });
    const variant = p.int(3);
    if (variant === 1) {
      request.keyId = this.trusted.keyId;
    } else if (variant === 2) {
      request.sig = this.garbageSig();
    }
    return { kind: "unsigned", payload: Buffer.from(JSON.stringify(request)), expect: { type: "reject", codes: ["unauthorised"] } };
  }

  expired(): FuzzMessage {
    const p = this.prng;
    const command = p.pick(["pause", "resume", "set-config", "deploy", "rollback", "status", "snapshot"]);
    const now = Date.now();
    const expiresAt = p.pick([0, 1, now - 1, now - 1_000, now - p.int(1e9)]);
    const request = this.request(command, this.validArgs(command), { sentAt: Math.max(0, expiresAt - p.int(60_000)), expiresAt });
    return { kind: "expired", payload: Buffer.from(JSON.stringify(request)), expect: { type: "reject", codes: ["expired"] } };
  }

  /** Picks a valid request whose id is still in the server's reply cache, or undefined. */
  private replayTarget(): CachedRequest | undefined {
    const recent = this.cache.filter((entry) => this.authorisedFresh - entry.cacheSeq < REPLAY_HORIZON);
    return recent.length ? this.prng.pick(recent) : undefined;
  }

  replay(): FuzzMessage {
    const target = this.replayTarget();
    if (!target) {
      return this.valid();
    }
    return { kind: "replay", payload: target.payload, expect: { type: "cached", originalId: target.id } };
  }

  reusedId(): FuzzMessage {
    const target = this.replayTarget();
    if (!target) {
      return this.valid();
    }
    const command = this.prng.pick(["pause", "resume", "set-config", "rollback"]);
    const request = this.request(command, this.validArgs(command), { id: target.id });
    return { kind: "reused-id", payload: Buffer.from(JSON.stringify(request)), expect: { type: "cached", originalId: target.id } };
  }

  generate(): FuzzMessage {
    const kind = this.prng.weighted({
      randomBytes: 8,
      truncated: 8,
      mutated: 14,
      wrongTypes: 10,
      hugeStrings: 4,
      deepNesting: 4,
      nonFinite: 2,
      unknownCommand: 5,
      signatureMismatch: 10,
      unsigned: 5,
      expired: 5,
      replay: 5,
      reusedId: 3,
      valid: 17,
    });
    const message = this[kind]();
    if (message.kind === "unknown-command" || message.kind === "expired") {
      // Authorised with a fresh id, so the server caches the error reply.
      this.authorisedFresh++;
    }
    return message;
  }
}

/** True when `payload` decodes to the same signed fields, key id and signature bytes as `base`. */
function equivalentRequest(base: CommandRequest, payload: Buffer): boolean {
  const decoded = decodeCommandRequest(payload);
  if (!decoded.ok) {
    return false;
  }
  const other = decoded.value;
  const fields = (request: CommandRequest): string => {
    try {
      return canonicalJson({ id: request.id, command: request.command, args: request.args ?? {}, sentAt: request.sentAt, expiresAt: request.expiresAt, keyId: request.keyId });
    } catch {
      return `unencodable ${Math.random()}`;
    }
  };
  const sigBytes = (request: CommandRequest): string => (request.sig === undefined ? "" : Buffer.from(request.sig, "base64").toString("hex"));
  return fields(base) === fields(other) && sigBytes(base) === sigBytes(other);
}

// ---------------------------------------------------------------------------------------------
// Harness

interface Harness {
  dir: string;
  broker: MosquittoBroker;
  trusted: SigningKeyPair;
  agent: Agent;
  logs: LogSink;
  decisions: { count: number };
  raw: MqttClient;
  replies: ReplyCollector;
  trainer: MqttLink;
  client: CommandClient;
}

let h: Harness;

beforeAll(async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "sortline-fuzz-commands-"));
  const broker = await startMosquitto();
  const trusted = generateKeyPair();
  await writeFile(path.join(dir, "trainer.pub"), trusted.publicKeyPem);
  const configFile = path.join(dir, "agent.yaml");
  await writeFile(
    configFile,
    stringify({
      device: { id: DEVICE, site: SITE },
      model: { dir: path.join(repoRoot, "models", "default"), providers: ["cpu"], threads: 1 },
      sources: [{ type: "directory", name: "replay", path: path.join(repoRoot, "demo", "photos"), fps: 4, loop: true, shuffleSeed: 5 }],
      pipeline: { maxBatch: 4 },
      actuators: [{ type: "fleet" }],
      audit: { path: path.join(dir, "state", "audit.db") },
      health: { host: "127.0.0.1", port: 0 },
      fleet: { url: broker.url, protocolVersion: 5, trustedKeys: ["trainer.pub"], statusIntervalSeconds: 5 },
      mining: { perHour: 30 },
      update: { shadowFrames: 8, regression: false },
    }),
  );
  const config = await loadAgentConfig(configFile);
  const logs = new LogSink();
  const logger = pino({ level: "info" }, { write: (line: string) => logs.write(line) });
  const decisions = { count: 0 };
  const agent = new Agent({ config, logger, configFile, overrides: {}, onDecision: () => decisions.count++ });
  await agent.start();

  const replies = new ReplyCollector();
  const raw = await mqtt.connectAsync(broker.url, { protocolVersion: 5, clientId: `sortline-fuzz-${process.pid}`, clean: true, reconnectPeriod: 0 });
  raw.on("message", (_topic, payload) => replies.onMessage(payload));
  await raw.subscribeAsync(REPLY_TOPIC, { qos: 1 });

  const trainer = new MqttLink({ url: broker.url, role: "trainer", protocolVersion: 5 });
  await trainer.connect();
  const client = new CommandClient({ link: trainer, signingKey: { keyId: trusted.keyId, privateKey: trusted.privateKeyPem } });
  h = { dir, broker, trusted, agent, logs, decisions, raw, replies, trainer, client };
}, 180_000);

afterAll(async () => {
  await h?.agent.stop();
  await h?.client.close();
  await h?.trainer.close();
  await h?.raw.endAsync();
  await h?.broker.close();
  if (h) {
    await rm(h.dir, { recursive: true, force: true });
  }
}, 60_000);

/** Returns own enumerable keys added to Object.prototype, which a clean process has none of. */
function prototypeKeys(): string[] {
  return Object.keys(Object.prototype);
}

async function readOverridesFile(dir: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(path.join(dir, "state", OVERRIDES_FILE), "utf8"));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      return undefined;
    }
    throw error;
  }
}

describe("fleet command fuzzing", () => {
  it("replies once per fuzzed request", async () => {
    console.log(`fleet command fuzz: seed ${SEED} (SORTLINE_FUZZ_SEED=${SEED} repeats it), ${MESSAGES} messages`);
    const prng = new Prng(SEED);
    const factory = new MessageFactory(prng, h.trusted, generateKeyPair());
    const rss = new RssSampler();
    rss.begin(100);
    await pollUntil(() => h.decisions.count > 0, 60_000);
    const decisionsAtStart = h.decisions.count;

    const sent: SentMessage[] = [];
    const violations: string[] = [];
    const pollution: string[] = [];
    const histogram = new Map<string, Map<string, number>>();
    let expectedPaused = false;
    let expectedOverrides: Record<string, unknown> | undefined;
    /** Replies given up on while sending, so the window does not wait for them again. */
    let givenUp = 0;
    let stalls = 0;

    const count = (kind: string, outcome: string): void => {
      const row = histogram.get(kind) ?? new Map<string, number>();
      row.set(outcome, (row.get(outcome) ?? 0) + 1);
      histogram.set(kind, row);
    };
    const outstanding = (): number => sent.length - givenUp - h.replies.received;
    const publish = async (message: FuzzMessage): Promise<SentMessage> => {
      const entry: SentMessage = { ...message, replyId: readableId(message.payload) };
      sent.push(entry);
      await h.raw.publishAsync(CMD_TOPIC, message.payload, { qos: 1 });
      return entry;
    };
    const drain = async (limit: number, timeoutMs: number): Promise<void> => {
      if (!(await pollUntil(() => outstanding() <= limit, timeoutMs, 2))) {
        stalls++;
        givenUp += outstanding() - limit;
      }
    };
    const checkPrototype = (kind: string, args: unknown): void => {
      const keys = prototypeKeys();
      if (keys.length > 0) {
        pollution.push(`${kind} ${JSON.stringify(args)} added ${keys.join(", ")} to Object.prototype`);
        for (const key of keys) {
          delete (Object.prototype as Record<string, unknown>)[key];
        }
      }
    };

    for (let index = 0; index < MESSAGES; index++) {
      const message = factory.generate();
      const serial = message.expect.type !== "reject";
      if (!serial) {
        await drain(WINDOW - 1, 5_000);
        await publish(message);
        continue;
      }

      await drain(0, 5_000);
      const id = readableId(message.payload);
      const next = h.replies.next(id, 30_000);
      await publish(message);
      const reply = await next;
      if (!reply) {
        // Counted as missing in the final check; the window moves on.
        givenUp++;
        continue;
      }
      const expectation = message.expect;
      if (expectation.type === "cached") {
        const original = factory.cache.find((entry) => entry.id === expectation.originalId)!;
        count(message.kind, isDeepStrictEqual(reply, original.reply) ? "cached reply" : "different reply");
        if (!isDeepStrictEqual(reply, original.reply)) {
          violations.push(`${message.kind} ${id}: expected the cached reply ${JSON.stringify(original.reply).slice(0, 300)}, got ${JSON.stringify(reply).slice(0, 300)}`);
        }
      } else if (expectation.type === "valid") {
        count(message.kind, reply.ok ? `${expectation.command} ok` : `${expectation.command} ${reply.error?.code}`);
        factory.authorisedFresh++;
        factory.cache.push({ id, payload: message.payload, reply, cacheSeq: factory.authorisedFresh });
        if (!reply.ok && ["malformed", "unauthorised", "expired"].includes(reply.error!.code)) {
          violations.push(`${message.kind} ${id} (${expectation.command}): a valid signed request got ${reply.error!.code}: ${reply.error!.message}`);
        }
        if (reply.ok && expectation.command === "pause") {
          expectedPaused = true;
        } else if (reply.ok && expectation.command === "resume") {
          expectedPaused = false;
        } else if (reply.ok && expectation.command === "set-config") {
          expectedOverrides = { ...expectedOverrides, ...expectation.args };
        }
        checkPrototype(`${message.kind} ${expectation.command}`, expectation.args);
      }
      if (h.agent.pipeline!.paused !== expectedPaused) {
        violations.push(`${message.kind} ${id}: pipeline paused=${h.agent.pipeline!.paused}, expected ${expectedPaused}`);
        expectedPaused = h.agent.pipeline!.paused;
      }
    }
    await drain(0, 30_000);
    checkPrototype("after the run", null);

    // Exact accounting: each readable id gets as many replies as requests carried it, and the
    // requests without a readable id get as many replies with id "unknown".
    const sentById = new Map<string, SentMessage[]>();
    for (const message of sent) {
      const list = sentById.get(message.replyId) ?? [];
      list.push(message);
      sentById.set(message.replyId, list);
    }
    const missing: string[] = [];
    for (const [id, messages] of sentById) {
      const replies = h.replies.byId.get(id) ?? [];
      if (replies.length !== messages.length) {
        const kinds = [...new Set(messages.map((message) => message.kind))].join(", ");
        missing.push(`${id}: ${messages.length} request(s) (${kinds}), ${replies.length} reply(ies)`);
      }
      if (id === "unknown") {
        for (const reply of replies) {
          count("(id unknown)", reply.error?.code ?? "ok");
        }
        continue;
      }
      for (const [position, message] of messages.entries()) {
        const reply = replies[position];
        if (message.expect.type !== "reject") {
          continue;
        }
        const outcome = reply === undefined ? "no reply" : reply.ok ? "ok" : reply.error!.code;
        count(message.kind, outcome);
        if (reply && (reply.ok || !message.expect.codes.includes(reply.error!.code))) {
          violations.push(`${message.kind} ${id}: expected ${message.expect.codes.join(" or ")}, got ${reply.ok ? "ok" : `${reply.error!.code}: ${reply.error!.message}`}`);
        }
      }
    }
    for (const id of h.replies.byId.keys()) {
      if (!sentById.has(id)) {
        missing.push(`reply for id ${id}, which no request carried`);
      }
    }

    const savedOverrides = await readOverridesFile(h.dir);
    const version = h.agent.activeRunner!.manifest.version;
    const handlerFailures = h.logs.count("message handler failed");

    // The line must still decide: resume if the fuzz left it paused, then wait for new decisions.
    if (h.agent.pipeline!.paused) {
      const resumed = await h.client.request(SITE, DEVICE, "resume", {}, { timeoutMs: 10_000 });
      expect(resumed.ok).toBe(true);
    }
    const decisionsBefore = h.decisions.count;
    const stillDeciding = await pollUntil(() => h.decisions.count >= decisionsBefore + 4, 60_000, 50);
    const memory = rss.end();

    const table = Object.fromEntries([...histogram].sort(([a], [b]) => a.localeCompare(b)).map(([kind, row]) => [kind, Object.fromEntries(row)]));
    console.log(
      JSON.stringify(
        {
          seed: SEED,
          messages: sent.length,
          repliesReceived: h.replies.received,
          repliesById: sentById.size,
          unknownIdRequests: sentById.get("unknown")?.length ?? 0,
          stalls,
          decisionsDuringRun: h.decisions.count - decisionsAtStart,
          logLines: h.logs.lines,
          rssMiB: memory,
          outcomes: table,
        },
        null,
        1,
      ),
    );

    expect(handlerFailures, `message handler failures; first error log lines:\n${h.logs.errorLines.slice(0, 5).join("\n")}`).toBe(0);
    expect(missing.slice(0, 20)).toEqual([]);
    expect(h.replies.invalid.slice(0, 10)).toEqual([]);
    expect(violations.slice(0, 20)).toEqual([]);
    expect(pollution.slice(0, 10)).toEqual([]);
    expect(h.agent.pipeline!.paused).toBe(false);
    expect(version).toBe("1.0.0");
    expect(savedOverrides).toEqual(expectedOverrides);
    expect(stillDeciding).toBe(true);
    expect(memory.peakMiB - memory.startMiB).toBeLessThan(MAX_RSS_GROWTH_MIB);
  }, 20 * 60_000 * SCALE);
});
