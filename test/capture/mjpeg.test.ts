import { createHash } from "node:crypto";

import sharp from "sharp";
import { beforeAll, describe, expect, it } from "vitest";

import { MjpegSplitter } from "../../src/capture/mjpeg.js";
import { ConfigError } from "../../src/lib/errors.js";
import { trashnetSamples } from "./helpers.js";

let photos: Buffer[] = [];

beforeAll(async () => {
  const samples = await trashnetSamples(["cardboard", "glass", "metal", "plastic"], 2);
  photos = samples.map((sample) => sample.data);
  // TrashNet files are progressive JPEGs; cameras write baseline ones, so add two of those.
  photos.push(await sharp(photos[0]).jpeg({ progressive: false, quality: 80 }).toBuffer());
  photos.push(await sharp(photos[1]).jpeg({ progressive: false, quality: 95 }).toBuffer());
});

/** Names each buffer by length and SHA-256, so comparisons are fast and failures readable. */
function digests(buffers: readonly Buffer[]): string[] {
  return buffers.map((buffer) => `${buffer.length}:${createHash("sha256").update(buffer).digest("hex").slice(0, 16)}`);
}

/** Splits `stream` into chunks of the given sizes, repeating the last size. */
function chunked(stream: Buffer, sizes: readonly number[]): Buffer[] {
  const chunks: Buffer[] = [];
  let offset = 0;
  for (let index = 0; offset < stream.length; index += 1) {
    const size = sizes[Math.min(index, sizes.length - 1)]!;
    chunks.push(stream.subarray(offset, offset + size));
    offset += size;
  }
  return chunks;
}

function pushAll(splitter: MjpegSplitter, chunks: readonly Buffer[]): Buffer[] {
  return chunks.flatMap((chunk) => splitter.push(chunk));
}

/** Deterministic bytes without 0xFF, so they cannot contain a JPEG marker. */
function garbage(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  let state = seed;
  for (let i = 0; i < length; i += 1) {
    state = (state * 1103515245 + 12345) % 2147483648;
    bytes[i] = state % 255;
  }
  return bytes;
}

/** Inserts an APP1 (EXIF) segment holding `thumbnail`, a complete JPEG with its own SOI and EOI. */
function withThumbnail(jpeg: Buffer, thumbnail: Buffer): Buffer {
  const payload = Buffer.concat([Buffer.from("Exif\0\0", "latin1"), thumbnail]);
  const header = Buffer.alloc(4);
  header.writeUInt16BE(0xffe1, 0);
  header.writeUInt16BE(payload.length + 2, 2);
  return Buffer.concat([jpeg.subarray(0, 2), header, payload, jpeg.subarray(2)]);
}

describe("MjpegSplitter", () => {
  it("splits back-to-back frames in one chunk", () => {
    const splitter = new MjpegSplitter();

    const frames = splitter.push(Buffer.concat(photos));

    expect(digests(frames)).toEqual(digests(photos));
    expect(splitter.stats.frames).toBe(photos.length);
    expect(splitter.stats.droppedBytes).toBe(0);
    expect(splitter.bufferedBytes).toBe(0);
  });

  it.each([
    ["1-byte chunks", [1]],
    ["7-byte chunks", [7]],
    ["mixed chunk sizes", [3, 1, 500, 2, 4096, 1, 9000]],
    ["chunks larger than frames", [100_000]],
  ])("reassembles frames from %s", (_name, sizes) => {
    const splitter = new MjpegSplitter();

    const frames = pushAll(splitter, chunked(Buffer.concat(photos), sizes));

    expect(digests(frames)).toEqual(digests(photos));
    expect(splitter.stats.corruptFrames).toBe(0);
  });

  it("discards garbage between frames", () => {
    const splitter = new MjpegSplitter();
    const parts = photos.flatMap((photo, index) => [garbage(100 + index * 37, index + 1), photo]);
    parts.push(garbage(50, 99));
    const stream = Buffer.concat(parts);

    const frames = pushAll(splitter, chunked(stream, [333]));

    expect(digests(frames)).toEqual(digests(photos));
    const garbageBytes = stream.length - photos.reduce((sum, photo) => sum + photo.length, 0);
    expect(splitter.stats.droppedBytes).toBe(garbageBytes);
  });

  it("keeps an SOI split after a lone 0xFF", () => {
    const splitter = new MjpegSplitter();
    const stream = Buffer.concat([Buffer.from([0x00, 0xff]), photos[0]!]);

    const frames = pushAll(splitter, [stream.subarray(0, 2), stream.subarray(2, 3), stream.subarray(3)]);

    expect(digests(frames)).toEqual(digests([photos[0]!]));
  });

  it("drops a truncated frame when the next SOI arrives", () => {
    const splitter = new MjpegSplitter();
    const truncated = photos[2]!.subarray(0, photos[2]!.length - 200);

    const frames = pushAll(splitter, chunked(Buffer.concat([photos[0]!, truncated, photos[1]!]), [1000]));

    expect(digests(frames)).toEqual(digests([photos[0]!, photos[1]!]));
    expect(splitter.stats.corruptFrames).toBe(1);
    expect(splitter.stats.droppedBytes).toBe(truncated.length);
  });

  it("ignores the EOI of an EXIF thumbnail", () => {
    const splitter = new MjpegSplitter();
    const outer = withThumbnail(photos[0]!, photos[1]!);

    const frames = pushAll(splitter, chunked(Buffer.concat([outer, photos[2]!]), [512]));

    expect(digests(frames)).toEqual(digests([outer, photos[2]!]));
  });

  it("drops oversize frames and keeps smaller ones", () => {
    const small = photos.reduce((a, b) => (a.length <= b.length ? a : b));
    const large = photos.reduce((a, b) => (a.length >= b.length ? a : b));
    const splitter = new MjpegSplitter({ maxFrameBytes: small.length + 10 });
    expect(large.length).toBeGreaterThan(small.length + 10);
    let maxBuffered = 0;

    const frames: Buffer[] = [];
    for (const chunk of chunked(Buffer.concat([small, large, small, large, small]), [256])) {
      frames.push(...splitter.push(chunk));
      maxBuffered = Math.max(maxBuffered, splitter.bufferedBytes);
    }

    expect(digests(frames)).toEqual(digests([small, small, small]));
    expect(splitter.stats.oversizeFrames).toBe(2);
    expect(splitter.stats.droppedBytes).toBe(2 * large.length);
    expect(maxBuffered).toBeLessThanOrEqual(small.length + 10 + 256);
  });

  it("bounds memory on a frame that never ends", () => {
    const splitter = new MjpegSplitter({ maxFrameBytes: 64 * 1024 });
    // SOI, then an SOS header, then entropy data without any marker for 1 MiB.
    const header = Buffer.from([0xff, 0xd8, 0xff, 0xda, 0x00, 0x02]);
    const body = garbage(1024 * 1024, 7);

    const frames = pushAll(splitter, chunked(Buffer.concat([header, body]), [4096]));

    expect(frames).toHaveLength(0);
    expect(splitter.stats.oversizeFrames).toBe(1);
    expect(splitter.bufferedBytes).toBeLessThanOrEqual(64 * 1024 + 4096);
  });

  it("holds no garbage between frames", () => {
    const splitter = new MjpegSplitter();

    for (const chunk of chunked(garbage(2 * 1024 * 1024, 3), [65536])) {
      splitter.push(chunk);
      expect(splitter.bufferedBytes).toBe(0);
    }

    expect(splitter.stats.droppedBytes).toBe(2 * 1024 * 1024);
    expect(digests(splitter.push(photos[0]!))).toEqual(digests([photos[0]!]));
  });

  it("drops a frame with a broken segment", () => {
    const splitter = new MjpegSplitter();
    // After SOI, a byte other than 0xFF where a marker must start.
    const broken = Buffer.concat([Buffer.from([0xff, 0xd8, 0x12, 0x34]), garbage(300, 5)]);

    const frames = splitter.push(Buffer.concat([broken, photos[0]!]));

    expect(digests(frames)).toEqual(digests([photos[0]!]));
    expect(splitter.stats.corruptFrames).toBe(1);
  });

  it("reset discards a partial frame", () => {
    const splitter = new MjpegSplitter();
    splitter.push(photos[0]!.subarray(0, 1000));

    splitter.reset();
    const frames = splitter.push(Buffer.concat([photos[0]!.subarray(1000), photos[1]!]));

    expect(digests(frames)).toEqual(digests([photos[1]!]));
    expect(splitter.stats.droppedBytes).toBe(photos[0]!.length);
  });

  it("rejects a maximum below four bytes", () => {
    expect(() => new MjpegSplitter({ maxFrameBytes: 3 })).toThrow(ConfigError);
  });
});
