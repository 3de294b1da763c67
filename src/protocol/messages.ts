/**
 * JSON messages of the fleet protocol and their decoders. Each decoder takes the raw MQTT payload,
 * never throws, and returns either the typed value or one sentence that describes what is wrong.
 * Unknown extra fields are accepted, so a newer peer can add optional fields within version 1.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from "ajv";

/** Version of the JSON messages and of the topic prefix `sortline/v1`. */
export const PROTOCOL_VERSION = 1;

/** Command ids: 1 to 64 ASCII letters, digits, dots, underscores or hyphens. */
export const ID_PATTERN = "^[A-Za-z0-9._-]{1,64}$";

/** Site, device and transfer names, as topics.ts NAME_PATTERN. */
const NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";

const SHA256_PATTERN = "^[0-9a-f]{64}$";

export type DeviceState = "online" | "offline" | "paused";

/** Identity of the model an agent runs. */
export interface ModelInfo {
  name: string;
  version: string;
  /** Hex sha256 of the model file. */
  sha256: string;
}

/** Device state on `{base}/status`, retained. */
export interface StatusMessage {
  v: typeof PROTOCOL_VERSION;
  site: string;
  device: string;
  state: DeviceState;
  /** Milliseconds since the Unix epoch. */
  at: number;
  agentVersion?: string;
  model?: ModelInfo;
  /** Free-form counters and gauges of the agent. */
  stats?: Record<string, unknown>;
}

/** A command from the trainer on `{base}/cmd`. */
export interface CommandRequest {
  v: typeof PROTOCOL_VERSION;
  /** Unique per request. The device replies to a repeated id with its cached reply. */
  id: string;
  command: string;
  /** Command arguments. An absent `args` decodes as {}. */
  args: Record<string, unknown>;
  /** Milliseconds since the Unix epoch, set by the trainer. */
  sentAt: number;
  /** The device rejects the request with "expired" once its clock passes this time (ms since the epoch). */
  expiresAt?: number;
  /** Name of the trainer key that made `sig`. */
  keyId?: string;
  /** Base64 ed25519 signature, see signedRequestBytes in commands.ts. */
  sig?: string;
}

export const COMMAND_ERROR_CODES = ["malformed", "unknown-command", "invalid-args", "unauthorised", "expired", "busy", "failed"] as const;

export type CommandErrorCode = (typeof COMMAND_ERROR_CODES)[number];

/** The device's reply on `{base}/reply`. `error` is present exactly when `ok` is false. */
export interface CommandReply {
  v: typeof PROTOCOL_VERSION;
  /** The request id, or "unknown" when the request was too malformed to read one. */
  id: string;
  site: string;
  device: string;
  ok: boolean;
  result?: Record<string, unknown>;
  error?: { code: CommandErrorCode; message: string };
}

export type TransferState = "partial" | "complete" | "failed";

/** Inclusive range [first, last] of chunk indices. */
export type ChunkRange = [number, number];

/** The receiver's acknowledgement on the ack topic of a transfer. */
export interface TransferAck {
  v: typeof PROTOCOL_VERSION;
  transferId: string;
  state: TransferState;
  /** Chunks the receiver has stored durably, as sorted, non-overlapping inclusive ranges. */
  have: ChunkRange[];
  /** Reason for state "failed". */
  error?: string;
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; error: string };

const timestamp = { type: "integer", minimum: 0 } as const;

const statusSchema = {
  type: "object",
  required: ["v", "site", "device", "state", "at"],
  properties: {
    v: { const: PROTOCOL_VERSION },
    site: { type: "string", pattern: NAME_PATTERN },
    device: { type: "string", pattern: NAME_PATTERN },
    state: { enum: ["online", "offline", "paused"] },
    at: timestamp,
    agentVersion: { type: "string", maxLength: 64 },
    model: {
      type: "object",
      required: ["name", "version", "sha256"],
      properties: {
        name: { type: "string", minLength: 1 },
        version: { type: "string", minLength: 1 },
        sha256: { type: "string", pattern: SHA256_PATTERN },
      },
    },
    stats: { type: "object" },
  },
} as const;

const commandRequestSchema = {
  type: "object",
  required: ["v", "id", "command", "sentAt"],
  properties: {
    v: { const: PROTOCOL_VERSION },
    id: { type: "string", pattern: ID_PATTERN },
    command: { type: "string", minLength: 1, maxLength: 64 },
    args: { type: "object", default: {} },
    sentAt: timestamp,
    expiresAt: timestamp,
    keyId: { type: "string", minLength: 1, maxLength: 64 },
    sig: { type: "string", minLength: 1, maxLength: 256 },
  },
} as const;

const commandReplySchema = {
  type: "object",
  required: ["v", "id", "site", "device", "ok"],
  properties: {
    v: { const: PROTOCOL_VERSION },
    id: { type: "string", pattern: ID_PATTERN },
    site: { type: "string", pattern: NAME_PATTERN },
    device: { type: "string", pattern: NAME_PATTERN },
    ok: { type: "boolean" },
    result: { type: "object" },
    error: {
      type: "object",
      required: ["code", "message"],
      properties: {
        code: { enum: [...COMMAND_ERROR_CODES] },
        message: { type: "string" },
      },
    },
  },
  if: { properties: { ok: { const: false } } },
  then: { required: ["error"] },
} as const;

const transferAckSchema = {
  type: "object",
  required: ["v", "transferId", "state", "have"],
  properties: {
    v: { const: PROTOCOL_VERSION },
    transferId: { type: "string", pattern: NAME_PATTERN },
    state: { enum: ["partial", "complete", "failed"] },
    have: {
      type: "array",
      items: {
        type: "array",
        minItems: 2,
        maxItems: 2,
        items: { type: "integer", minimum: 0 },
      },
    },
    error: { type: "string" },
  },
} as const;

const ajv = new Ajv({ allErrors: false, useDefaults: true, strict: false });

/** Converts an ajv instance path such as `/model/sha256` to `model.sha256`. */
function fieldName(instancePath: string, child?: string): string {
  const parts = instancePath.split("/").slice(1);
  if (child !== undefined) {
    parts.push(child);
  }
  return parts.map((part) => part.replace(/~1/g, "/").replace(/~0/g, "~")).join(".");
}

/** Turns the first ajv error into a sentence such as `missing field "id"`. */
export function describeSchemaError(errors: ErrorObject[] | null | undefined): string {
  const error = errors?.[0];
  if (!error) {
    return "invalid message";
  }
  const params = error.params as Record<string, unknown>;
  if (error.keyword === "required") {
    return `missing field "${fieldName(error.instancePath, String(params.missingProperty))}"`;
  }
  const field = error.instancePath ? `field "${fieldName(error.instancePath)}"` : "message";
  if (error.keyword === "enum") {
    const allowed = (params.allowedValues as unknown[]).map((value) => JSON.stringify(value)).join(", ");
    return `${field} must be one of ${allowed}`;
  }
  return `${field} ${error.message ?? "is invalid"}`;
}

/** Parses a payload as a JSON object. The error names the problem: invalid JSON or not an object. */
export function parseJsonObject(payload: Buffer | string): Decoded<Record<string, unknown>> {
  const text = typeof payload === "string" ? payload : payload.toString("utf8");
  let document: unknown;
  try {
    document = JSON.parse(text);
  } catch (error) {
    return { ok: false, error: `invalid JSON: ${(error as Error).message}` };
  }
  if (document === null || typeof document !== "object" || Array.isArray(document)) {
    const kind = document === null ? "null" : Array.isArray(document) ? "an array" : typeof document;
    return { ok: false, error: `expected a JSON object, got ${kind}` };
  }
  return { ok: true, value: document as Record<string, unknown> };
}

function makeDecoder<T>(schema: object, check?: (value: T) => string | undefined): (payload: Buffer | string) => Decoded<T> {
  const validate: ValidateFunction = ajv.compile(schema);
  return (payload) => {
    const parsed = parseJsonObject(payload);
    if (!parsed.ok) {
      return parsed;
    }
    const document = parsed.value;
    // The version is checked first so a message from a newer protocol reads as such, not as a schema error.
    if (!("v" in document)) {
      return { ok: false, error: 'missing field "v" (protocol version)' };
    }
    if (document.v !== PROTOCOL_VERSION) {
      return { ok: false, error: `unsupported protocol version ${JSON.stringify(document.v)}; this build speaks version ${PROTOCOL_VERSION}` };
    }
    if (!validate(document)) {
      return { ok: false, error: describeSchemaError(validate.errors) };
    }
    const value = document as unknown as T;
    const problem = check?.(value);
    if (problem !== undefined) {
      return { ok: false, error: problem };
    }
    return { ok: true, value };
  };
}

function checkRanges(ack: TransferAck): string | undefined {
  let previousEnd = -1;
  for (const [index, [first, last]] of ack.have.entries()) {
    if (first > last) {
      return `field "have.${index}" is [${first}, ${last}]; a range must have first <= last`;
    }
    if (first <= previousEnd) {
      return `field "have.${index}" overlaps or precedes the range before it; ranges must be sorted and disjoint`;
    }
    previousEnd = last;
  }
  return undefined;
}

export const decodeStatusMessage = makeDecoder<StatusMessage>(statusSchema);
export const decodeCommandRequest = makeDecoder<CommandRequest>(commandRequestSchema);
export const decodeCommandReply = makeDecoder<CommandReply>(commandReplySchema);
export const decodeTransferAck = makeDecoder<TransferAck>(transferAckSchema, checkRanges);
