/**
 * Binary frames on a transfer data topic: `[uint32 big-endian header length][header JSON][payload]`.
 * A `begin` frame announces a file and has an empty payload. A `chunk` frame carries one chunk.
 */
import { createHash } from "node:crypto";

import { Ajv, type ValidateFunction } from "ajv";

import { describeSchemaError, PROTOCOL_VERSION, type Decoded } from "./messages.js";

/** Largest header the decoder accepts, in bytes. */
export const MAX_HEADER_BYTES = 64 * 1024;
/** Largest chunk size a sender may announce, in bytes. */
export const MAX_CHUNK_SIZE = 8 * 1024 * 1024;
/** Largest chunk count a sender may announce (about 4 GiB at 64 KiB chunks). */
export const MAX_CHUNKS = 65_536;

/** Transfer ids: an ASCII letter or digit, then up to 63 letters, digits, dots, underscores or hyphens. */
export const TRANSFER_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
/** File names: an ASCII letter or digit, then up to 127 letters, digits, dots, underscores or hyphens. */
export const FILE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$";

/** Header of the frame that starts or resumes a transfer. */
export interface BeginHeader {
  v: typeof PROTOCOL_VERSION;
  type: "begin";
  transferId: string;
  /** File category, e.g. "hard-example" or "model-package". The receiver's onComplete acts on it. */
  kind: string;
  /** File name the receiver gives the file. */
  name: string;
  /** File size in bytes. */
  size: number;
  /** Hex sha256 of the whole file. */
  sha256: string;
  /** Bytes per chunk. Every chunk but the last has exactly this size. */
  chunkSize: number;
  /** Number of chunks, ceil(size / chunkSize). */
  chunks: number;
  meta: Record<string, unknown>;
  /** The sender's window, so the receiver can acknowledge before the sender stalls. Optional. */
  window?: number;
}

/** Header of a frame that carries one chunk. */
export interface ChunkHeader {
  v: typeof PROTOCOL_VERSION;
  type: "chunk";
  transferId: string;
  /** Chunk index, from 0. */
  index: number;
  /** Hex sha256 of this chunk's payload. */
  sha256: string;
}

export type FrameHeader = BeginHeader | ChunkHeader;

export interface Frame {
  header: FrameHeader;
  payload: Buffer;
}

const beginSchema = {
  type: "object",
  required: ["v", "type", "transferId", "kind", "name", "size", "sha256", "chunkSize", "chunks", "meta"],
  properties: {
    v: { const: PROTOCOL_VERSION },
    type: { const: "begin" },
    transferId: { type: "string", pattern: TRANSFER_ID_PATTERN },
    kind: { type: "string", minLength: 1, maxLength: 64 },
    name: { type: "string", pattern: FILE_NAME_PATTERN },
    size: { type: "integer", minimum: 0 },
    sha256: { type: "string", pattern: "^[0-9a-f]{64}$" },
    chunkSize: { type: "integer", minimum: 1, maximum: MAX_CHUNK_SIZE },
    chunks: { type: "integer", minimum: 0, maximum: MAX_CHUNKS },
    meta: { type: "object" },
    window: { type: "integer", minimum: 1 },
  },
} as const;

const chunkSchema = {
  type: "object",
  required: ["v", "type", "transferId", "index", "sha256"],
  properties: {
    v: { const: PROTOCOL_VERSION },
    type: { const: "chunk" },
    transferId: { type: "string", pattern: TRANSFER_ID_PATTERN },
    index: { type: "integer", minimum: 0 },
    sha256: { type: "string", pattern: "^[0-9a-f]{64}$" },
  },
} as const;

const ajv = new Ajv({ allErrors: false, strict: false });
const validators: Record<FrameHeader["type"], ValidateFunction> = {
  begin: ajv.compile(beginSchema),
  chunk: ajv.compile(chunkSchema),
};

export function sha256Hex(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Returns the number of chunks of a file: ceil(size / chunkSize). */
export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

/** Returns the byte length of chunk `index`: chunkSize, except for a shorter last chunk. */
export function chunkLength(begin: Pick<BeginHeader, "size" | "chunkSize">, index: number): number {
  return Math.min(begin.chunkSize, begin.size - index * begin.chunkSize);
}

/** Builds one frame. */
export function encodeFrame(header: FrameHeader, payload: Buffer = Buffer.alloc(0)): Buffer {
  const headerBytes = Buffer.from(JSON.stringify(header), "utf8");
  const prefix = Buffer.alloc(4);
  prefix.writeUInt32BE(headerBytes.length, 0);
  return Buffer.concat([prefix, headerBytes, payload]);
}

/** Parses and validates one frame without throwing. The payload is a view into `frame`. */
export function decodeFrame(frame: Buffer): Decoded<Frame> {
  if (frame.length < 4) {
    return { ok: false, error: `frame of ${frame.length} bytes is shorter than its 4-byte length prefix` };
  }

  const headerLength = frame.readUInt32BE(0);
  if (headerLength > MAX_HEADER_BYTES || headerLength > frame.length - 4) {
    return { ok: false, error: `header length ${headerLength} exceeds the frame (${frame.length - 4} bytes after the prefix) or the ${MAX_HEADER_BYTES}-byte limit` };
  }
  let header: unknown;
  try {
    header = JSON.parse(frame.subarray(4, 4 + headerLength).toString("utf8"));
  } catch (error) {
    return { ok: false, error: `header is not valid JSON: ${(error as Error).message}` };
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    return { ok: false, error: "header is not a JSON object" };
  }

  const record = header as Record<string, unknown>;
  if (record.v !== PROTOCOL_VERSION) {
    return { ok: false, error: `unsupported protocol version ${JSON.stringify(record.v)}; this build speaks version ${PROTOCOL_VERSION}` };
  }
  const type = record.type;
  if (type !== "begin" && type !== "chunk") {
    return { ok: false, error: `header type ${JSON.stringify(type)} is neither "begin" nor "chunk"` };
  }

  const validate = validators[type];
  if (!validate(header)) {
    return { ok: false, error: `${type} header: ${describeSchemaError(validate.errors)}` };
  }

  const payload = frame.subarray(4 + headerLength);
  const typed = header as FrameHeader;
  if (typed.type === "begin") {
    if (payload.length !== 0) {
      return { ok: false, error: `begin frame carries ${payload.length} payload bytes; it must carry none` };
    }
    if (typed.chunks !== chunkCount(typed.size, typed.chunkSize)) {
      return { ok: false, error: `begin header has chunks ${typed.chunks}, but size ${typed.size} at chunkSize ${typed.chunkSize} needs ${chunkCount(typed.size, typed.chunkSize)}` };
    }
  }
  return { ok: true, value: { header: typed, payload } };
}
