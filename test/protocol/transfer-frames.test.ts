import { describe, expect, it } from "vitest";

import { ChunkSet, chunkLength, decodeFrame, encodeFrame, sha256Hex, type BeginHeader, type ChunkHeader } from "../../src/protocol/transfer.js";

const begin: BeginHeader = {
  v: 1,
  type: "begin",
  transferId: "t-1",
  kind: "model-package",
  name: "model.tar",
  size: 10,
  sha256: "c".repeat(64),
  chunkSize: 4,
  chunks: 3,
  meta: { version: "1.3.0" },
};

function frameWithHeader(header: unknown, payload = Buffer.alloc(0)): Buffer {
  const json = Buffer.from(JSON.stringify(header));
  const prefix = Buffer.alloc(4);
  prefix.writeUInt32BE(json.length);
  return Buffer.concat([prefix, json, payload]);
}

function errorOf(frame: Buffer): string {
  const decoded = decodeFrame(frame);
  expect(decoded.ok).toBe(false);
  return decoded.ok ? "" : decoded.error;
}

describe("frames", () => {
  it("round-trips begin and chunk", () => {
    const payload = Buffer.from("abcd");
    const chunk: ChunkHeader = { v: 1, type: "chunk", transferId: "t-1", index: 0, sha256: sha256Hex(payload) };

    expect(decodeFrame(encodeFrame(begin))).toEqual({ ok: true, value: { header: begin, payload: Buffer.alloc(0) } });
    const decoded = decodeFrame(encodeFrame(chunk, payload));
    if (!decoded.ok) {
      throw new Error(decoded.error);
    }
    expect(decoded.value.header).toEqual(chunk);
    expect(decoded.value.payload.toString()).toBe("abcd");
  });

  it("starts with a big-endian header length", () => {
    const frame = encodeFrame(begin);

    expect(frame.readUInt32BE(0)).toBe(frame.length - 4);
    expect(JSON.parse(frame.subarray(4).toString())).toEqual(begin);
  });

  it("rejects truncated frames", () => {
    expect(errorOf(Buffer.from([0, 0]))).toBe("frame of 2 bytes is shorter than its 4-byte length prefix");
    expect(errorOf(Buffer.from([0, 0, 0, 9, 0x7b]))).toMatch(/^header length 9 exceeds the frame/);
    expect(errorOf(Buffer.from([0xff, 0xff, 0xff, 0xff]))).toMatch(/^header length 4294967295 exceeds/);
  });

  it("rejects invalid headers", () => {
    expect(errorOf(frameWithHeader("x").subarray(0, 6))).toMatch(/^header length/);
    expect(errorOf(Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from("{")]))).toMatch(/^header is not valid JSON/);
    expect(errorOf(frameWithHeader([1]))).toBe("header is not a JSON object");
    expect(errorOf(frameWithHeader({ ...begin, v: 2 }))).toBe("unsupported protocol version 2; this build speaks version 1");
    expect(errorOf(frameWithHeader({ ...begin, type: "end" }))).toBe('header type "end" is neither "begin" nor "chunk"');
    expect(errorOf(frameWithHeader({ ...begin, sha256: undefined }))).toBe('begin header: missing field "sha256"');
    expect(errorOf(frameWithHeader({ ...begin, name: "../etc/passwd" }))).toMatch(/^begin header: field "name" must match pattern/);
    expect(errorOf(frameWithHeader({ ...begin, transferId: "a/b" }))).toMatch(/^begin header: field "transferId" must match pattern/);
    expect(errorOf(frameWithHeader({ ...begin, chunkSize: 0 }))).toBe('begin header: field "chunkSize" must be >= 1');
    expect(errorOf(frameWithHeader({ ...begin, chunks: 4 }))).toBe("begin header has chunks 4, but size 10 at chunkSize 4 needs 3");
    expect(errorOf(frameWithHeader(begin, Buffer.from("x")))).toBe("begin frame carries 1 payload bytes; it must carry none");
    expect(errorOf(frameWithHeader({ v: 1, type: "chunk", transferId: "t", index: -1, sha256: "c".repeat(64) }))).toBe('chunk header: field "index" must be >= 0');
  });

  it("chunkLength shortens the last chunk", () => {
    expect([0, 1, 2].map((index) => chunkLength(begin, index))).toEqual([4, 4, 2]);
  });
});

describe("ChunkSet", () => {
  it("converts to and from ranges", () => {
    const set = new ChunkSet(10);
    for (const index of [0, 1, 2, 5, 7, 8, 9]) {
      set.add(index);
    }

    expect(set.toRanges()).toEqual([
      [0, 2],
      [5, 5],
      [7, 9],
    ]);
    expect(ChunkSet.fromRanges(10, set.toRanges()).toRanges()).toEqual(set.toRanges());
    expect(set.count).toBe(7);
    expect(set.complete).toBe(false);
  });

  it("ignores out-of-range and repeated indices", () => {
    const set = ChunkSet.fromRanges(3, [
      [2, 100],
      [-5, 0],
    ]);

    expect(set.toRanges()).toEqual([
      [0, 0],
      [2, 2],
    ]);
    expect(set.add(2)).toBe(false);
    expect(set.add(3)).toBe(false);
    expect(set.add(1.5)).toBe(false);
    expect(set.add(1)).toBe(true);
    expect(set.complete).toBe(true);
  });

  it("empty set of zero chunks is complete", () => {
    expect(new ChunkSet(0).complete).toBe(true);
    expect(new ChunkSet(0).toRanges()).toEqual([]);
  });

  it("replaceWith copies another set", () => {
    const set = ChunkSet.fromRanges(5, [[0, 4]]);
    set.replaceWith(ChunkSet.fromRanges(5, [[1, 1]]));

    expect(set.toRanges()).toEqual([[1, 1]]);
    expect(set.count).toBe(1);
    expect(() => set.replaceWith(new ChunkSet(4))).toThrow(RangeError);
  });
});
