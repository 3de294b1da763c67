import { describe, expect, it } from "vitest";

import {
  decodeCommandReply,
  decodeCommandRequest,
  decodeStatusMessage,
  decodeTransferAck,
  PROTOCOL_VERSION,
  type Decoded,
} from "../../src/protocol/messages.js";

const SHA = "a".repeat(64);

function errorOf(result: Decoded<unknown>): string {
  expect(result.ok).toBe(false);
  return result.ok ? "" : result.error;
}

function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

describe("decoders on any message", () => {
  const decoders = { decodeStatusMessage, decodeCommandRequest, decodeCommandReply, decodeTransferAck };

  it.each(Object.entries(decoders))("%s rejects invalid JSON", (_name, decode) => {
    expect(errorOf(decode(Buffer.from("{not json")))).toMatch(/^invalid JSON: /);
    expect(errorOf(decode(Buffer.alloc(0)))).toMatch(/^invalid JSON: /);
  });

  it.each(Object.entries(decoders))("%s rejects non-objects", (_name, decode) => {
    expect(errorOf(decode("[1,2]"))).toBe("expected a JSON object, got an array");
    expect(errorOf(decode("null"))).toBe("expected a JSON object, got null");
    expect(errorOf(decode("7"))).toBe("expected a JSON object, got number");
  });

  it.each(Object.entries(decoders))("%s checks the version", (_name, decode) => {
    expect(errorOf(decode("{}"))).toBe('missing field "v" (protocol version)');
    expect(errorOf(decode('{"v":2}'))).toBe("unsupported protocol version 2; this build speaks version 1");
    expect(errorOf(decode('{"v":"1"}'))).toBe('unsupported protocol version "1"; this build speaks version 1');
  });
});

describe("decodeStatusMessage", () => {
  const valid = {
    v: PROTOCOL_VERSION,
    site: "plant-a",
    device: "line-3",
    state: "online",
    at: 1_714_550_400_000,
    agentVersion: "0.1.0",
    model: { name: "resnet50-waste", version: "1.2.0", sha256: SHA },
    stats: { frames: 10 },
  };

  it("accepts a full status", () => {
    expect(decodeStatusMessage(json(valid))).toEqual({ ok: true, value: valid });
  });

  it("accepts a minimal status and extra fields", () => {
    const minimal = { v: 1, site: "s", device: "d", state: "offline", at: 0, future: true };
    expect(decodeStatusMessage(json(minimal))).toEqual({ ok: true, value: minimal });
  });

  it("names each invalid field", () => {
    expect(errorOf(decodeStatusMessage(json({ ...valid, site: undefined })))).toBe('missing field "site"');
    expect(errorOf(decodeStatusMessage(json({ ...valid, state: "asleep" })))).toBe('field "state" must be one of "online", "offline", "paused"');
    expect(errorOf(decodeStatusMessage(json({ ...valid, at: -1 })))).toBe('field "at" must be >= 0');
    expect(errorOf(decodeStatusMessage(json({ ...valid, at: 1.5 })))).toBe('field "at" must be integer');
    expect(errorOf(decodeStatusMessage(json({ ...valid, device: "a/b" })))).toMatch(/^field "device" must match pattern/);
    expect(errorOf(decodeStatusMessage(json({ ...valid, model: { name: "m", version: "1" } })))).toBe('missing field "model.sha256"');
    expect(errorOf(decodeStatusMessage(json({ ...valid, model: { ...valid.model, sha256: "xyz" } })))).toMatch(/^field "model.sha256" must match pattern/);
    expect(errorOf(decodeStatusMessage(json({ ...valid, stats: [] })))).toBe('field "stats" must be object');
  });
});

describe("decodeCommandRequest", () => {
  const valid = { v: 1, id: "req-1", command: "ping", args: { a: 1 }, sentAt: 1000, expiresAt: 2000, keyId: "k1", sig: "c2ln" };

  it("accepts a full request", () => {
    expect(decodeCommandRequest(json(valid))).toEqual({ ok: true, value: valid });
  });

  it("defaults args to an empty object", () => {
    const result = decodeCommandRequest(json({ v: 1, id: "x", command: "ping", sentAt: 1 }));
    expect(result).toEqual({ ok: true, value: { v: 1, id: "x", command: "ping", sentAt: 1, args: {} } });
  });

  it("names each invalid field", () => {
    expect(errorOf(decodeCommandRequest(json({ ...valid, id: undefined })))).toBe('missing field "id"');
    expect(errorOf(decodeCommandRequest(json({ ...valid, id: "" })))).toMatch(/^field "id" must match pattern/);
    expect(errorOf(decodeCommandRequest(json({ ...valid, id: "a".repeat(65) })))).toMatch(/^field "id" must match pattern/);
    expect(errorOf(decodeCommandRequest(json({ ...valid, id: "a b" })))).toMatch(/^field "id" must match pattern/);
    expect(errorOf(decodeCommandRequest(json({ ...valid, command: undefined })))).toBe('missing field "command"');
    expect(errorOf(decodeCommandRequest(json({ ...valid, command: 5 })))).toBe('field "command" must be string');
    expect(errorOf(decodeCommandRequest(json({ ...valid, args: [1] })))).toBe('field "args" must be object');
    expect(errorOf(decodeCommandRequest(json({ ...valid, sentAt: undefined })))).toBe('missing field "sentAt"');
    expect(errorOf(decodeCommandRequest(json({ ...valid, expiresAt: "soon" })))).toBe('field "expiresAt" must be integer');
    expect(errorOf(decodeCommandRequest(json({ ...valid, sig: 3 })))).toBe('field "sig" must be string');
  });
});

describe("decodeCommandReply", () => {
  it("accepts success and failure replies", () => {
    const success = { v: 1, id: "r", site: "s", device: "d", ok: true, result: { pong: true } };
    const failure = { v: 1, id: "unknown", site: "s", device: "d", ok: false, error: { code: "malformed", message: "bad" } };
    expect(decodeCommandReply(json(success))).toEqual({ ok: true, value: success });
    expect(decodeCommandReply(json(failure))).toEqual({ ok: true, value: failure });
  });

  it("requires error when ok is false", () => {
    expect(errorOf(decodeCommandReply(json({ v: 1, id: "r", site: "s", device: "d", ok: false })))).toBe('missing field "error"');
  });

  it("names each invalid field", () => {
    const base = { v: 1, id: "r", site: "s", device: "d", ok: false, error: { code: "failed", message: "m" } };
    expect(errorOf(decodeCommandReply(json({ ...base, ok: "no" })))).toBe('field "ok" must be boolean');
    expect(errorOf(decodeCommandReply(json({ ...base, error: { code: "oops", message: "m" } })))).toMatch(/^field "error.code" must be one of "malformed", "unknown-command"/);
    expect(errorOf(decodeCommandReply(json({ ...base, error: { code: "failed" } })))).toBe('missing field "error.message"');
    expect(errorOf(decodeCommandReply(json({ ...base, device: undefined })))).toBe('missing field "device"');
  });
});

describe("decodeTransferAck", () => {
  it("accepts acks", () => {
    const ack = { v: 1, transferId: "t-1", state: "partial", have: [[0, 3], [5, 5]] };
    expect(decodeTransferAck(json(ack))).toEqual({ ok: true, value: ack });
    const failed = { v: 1, transferId: "t-1", state: "failed", have: [], error: "too large" };
    expect(decodeTransferAck(json(failed))).toEqual({ ok: true, value: failed });
  });

  it("names each invalid field", () => {
    const base = { v: 1, transferId: "t-1", state: "partial", have: [] };
    expect(errorOf(decodeTransferAck(json({ ...base, have: undefined })))).toBe('missing field "have"');
    expect(errorOf(decodeTransferAck(json({ ...base, state: "done" })))).toBe('field "state" must be one of "partial", "complete", "failed"');
    expect(errorOf(decodeTransferAck(json({ ...base, transferId: "../x" })))).toMatch(/^field "transferId" must match pattern/);
    expect(errorOf(decodeTransferAck(json({ ...base, have: [[0]] })))).toBe('field "have.0" must NOT have fewer than 2 items');
    expect(errorOf(decodeTransferAck(json({ ...base, have: [[0, -1]] })))).toBe('field "have.0.1" must be >= 0');
    expect(errorOf(decodeTransferAck(json({ ...base, have: [[3, 1]] })))).toBe('field "have.0" is [3, 1]; a range must have first <= last');
    expect(errorOf(decodeTransferAck(json({ ...base, have: [[0, 4], [4, 6]] })))).toMatch(/^field "have.1" overlaps or precedes/);
  });
});
