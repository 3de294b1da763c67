/**
 * Fuzzes the image path. Thousands of mutated JPEGs and other inputs go through a Pipeline with the
 * real model. The mutations are bit flips, overwritten runs, truncations, corrupted headers and
 * rewritten SOF dimensions. The other inputs are zero-length and tiny buffers, PNG, WebP, GIF,
 * TIFF, AVIF and SVG images, PNGs and SVGs that declare huge sizes, and random bytes behind image
 * magic numbers. A Motion JPEG byte stream of valid, mutated, truncated and oversized frames and
 * garbage goes through MjpegSplitter in random chunks, and the same kind of pipeline decides the
 * frames it returns.
 *
 * Checked:
 * - nothing throws or hangs, and every frame gets exactly one decision;
 * - a frame that prepareImage cannot decode becomes an error decision in the reject bin, and no
 *   other frame does;
 * - the splitter accounts for every byte and keeps its buffer bounded;
 * - RSS stays bounded.
 *
 * SORTLINE_FUZZ_SEED repeats a run and SORTLINE_FUZZ_SCALE multiplies the input counts.
 */
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { crc32 } from "node:zlib";

import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { AuditStore } from "../../src/audit/store.js";
import type { DecisionRecord } from "../../src/audit/types.js";
import { MjpegSplitter } from "../../src/capture/mjpeg.js";
import type { Frame } from "../../src/capture/types.js";
import type { Actuator, ActuatorMessage } from "../../src/decision/actuators.js";
import { DecisionPolicy } from "../../src/decision/policy.js";
import { ModelRunner } from "../../src/inference/runner.js";
import { ImageDecodeError } from "../../src/lib/errors.js";
import { Pipeline } from "../../src/pipeline/pipeline.js";
import { prepareImage } from "../../src/preprocess/image.js";
import { makeTempDir } from "../audit/helpers.js";
import { repoRoot } from "../agent/helpers.js";
import { fuzzScale, fuzzSeed, pollUntil, Prng, RssSampler } from "./helpers.js";

const SCALE = fuzzScale();
const SEED = fuzzSeed();
const FRAMES = Math.max(100, Math.round(2_000 * SCALE));
const STREAM_SEGMENTS = Math.max(100, Math.round(1_500 * SCALE));
/** Frames submitted before waiting for their decisions. It is below queueSize, so no frame is dropped. */
const WAVE = 64;
const REJECT_BIN = "reject";
const BINS: Record<string, string> = { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" };
/** Splitter frame limit for the stream. The oversized frames are built above it. */
const MAX_FRAME_BYTES = 256 * 1024;
/**
 * Peak RSS growth allowed during a run. A progressive JPEG whose SOF declares 10000x10000 makes
 * libjpeg hold the whole coefficient buffer (240 to 330 MiB measured), and the pipeline decodes two
 * frames at once. Two such decodes plus the freed buffers the allocator keeps (up to about 400 MiB
 * measured) stay under this.
 */
const MAX_PEAK_GROWTH_MIB = 1_280;
/**
 * RSS growth allowed over the second half of a run. RSS climbs in the first waves because the
 * allocator keeps freed decode buffers, then levels off. A leak keeps it climbing.
 */
const MAX_SECOND_HALF_GROWTH_MIB = 128;
/** Peak RSS growth allowed while prepareImage decodes one input. */
const MAX_SINGLE_DECODE_MIB = 512;

/** An input and what must happen to it. */
interface FuzzImage {
  kind: string;
  data: Buffer;
  /** "error": must become an error decision; "decision": must be classified; "either": no claim. */
  outcome: "error" | "decision" | "either";
}

class RecordingActuator implements Actuator {
  readonly kind = "recording";
  readonly dropped = 0;
  readonly byFrame = new Map<string, ActuatorMessage[]>();
  count = 0;

  async start(): Promise<void> {}

  async stop(): Promise<void> {}

  send(messages: readonly ActuatorMessage[]): void {
    for (const message of messages) {
      this.count++;
      const list = this.byFrame.get(message.frameId) ?? [];
      list.push(message);
      this.byFrame.set(message.frameId, list);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Inputs

interface Bases {
  photos: Buffer[];
  /** Baseline JPEGs at 640x480, as cameras write them. */
  camera: Buffer[];
  /** Valid images in other formats that prepareImage decodes. */
  otherFormats: { kind: string; data: Buffer }[];
  /** A 16x16 JPEG, far below the model's input size. */
  tiny: Buffer;
}

async function loadBases(): Promise<Bases> {
  const photosDir = path.join(repoRoot, "demo", "photos");
  const photos = readdirSync(photosDir)
    .sort()
    .flatMap((label) =>
      readdirSync(path.join(photosDir, label))
        .filter((file) => file.endsWith(".jpg"))
        .sort()
        .map((file) => readFileSync(path.join(photosDir, label, file))),
    );
  const camera = await Promise.all(photos.slice(0, 12).map((photo, index) => sharp(photo).resize(640, 480, { fit: "fill" }).jpeg({ quality: 70 + index, progressive: false }).toBuffer()));
  const source = sharp(photos[0]!).resize(400, 300, { fit: "fill" });
  const otherFormats = [
    { kind: "png", data: await source.clone().png().toBuffer() },
    { kind: "png-alpha", data: await source.clone().ensureAlpha(0.5).png().toBuffer() },
    { kind: "webp", data: await source.clone().webp().toBuffer() },
    { kind: "gif", data: await source.clone().gif().toBuffer() },
    { kind: "tiff", data: await source.clone().tiff().toBuffer() },
    { kind: "avif", data: await source.clone().avif({ effort: 0 }).toBuffer() },
    { kind: "jpeg-cmyk", data: await source.clone().toColourspace("cmyk").jpeg().toBuffer() },
    { kind: "jpeg-grey", data: await source.clone().greyscale().jpeg().toBuffer() },
  ];
  const tiny = await sharp(photos[0]!).resize(16, 16).jpeg().toBuffer();
  return { photos, camera, otherFormats, tiny };
}

/** Returns the offset of the first SOFn marker (baseline, extended or progressive), or -1. */
function findSof(jpeg: Buffer): number {
  let at = 2;
  while (at + 4 < jpeg.length && jpeg[at] === 0xff) {
    const code = jpeg[at + 1]!;
    if (code === 0xc0 || code === 0xc1 || code === 0xc2) {
      return at;
    }
    at += 2 + jpeg.readUInt16BE(at + 2);
  }
  return -1;
}

/** Builds a PNG signature plus an IHDR chunk with a correct CRC that declares `width` x `height`. */
function pngHeader(width: number, height: number): Buffer {
  const body = Buffer.alloc(17);
  body.write("IHDR", 0, "latin1");
  body.writeUInt32BE(width, 4);
  body.writeUInt32BE(height, 8);
  body.set([8, 2, 0, 0, 0], 12);
  const chunk = Buffer.alloc(4 + 17 + 4);
  chunk.writeUInt32BE(13, 0);
  body.copy(chunk, 4);
  chunk.writeUInt32BE(crc32(body), 21);
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk]);
}

function flipBits(prng: Prng, data: Buffer, count: number, from = 2): Buffer {
  const copy = Buffer.from(data);
  for (let i = 0; i < count; i++) {
    const at = from + prng.int(Math.max(1, copy.length - from));
    copy[at] = copy[at]! ^ (1 << prng.int(8));
  }
  return copy;
}

function overwriteRun(prng: Prng, data: Buffer): Buffer {
  const copy = Buffer.from(data);
  const length = prng.between(1, 64);
  const at = prng.int(Math.max(1, copy.length - length));
  prng.bytes(length).copy(copy, at);
  return copy;
}

/** Generates one fuzz input; `bases` supplies the valid images it starts from. */
function generateImage(prng: Prng, bases: Bases): FuzzImage {
  const jpeg = prng.chance(0.5) ? prng.pick(bases.photos) : prng.pick(bases.camera);
  const kind = prng.weighted({
    valid: 5,
    bitFlips: 22,
    overwriteRun: 12,
    truncated: 12,
    header: 12,
    sofDimensions: 8,
    zeroLength: 2,
    tinyBuffer: 3,
    garbage: 4,
    magicGarbage: 4,
    otherFormat: 4,
    otherFormatMutated: 4,
    pngHugeHeader: 2,
    svg: 2,
    tooSmall: 2,
    concatenated: 2,
  });
  switch (kind) {
    case "valid":
      return { kind: "valid-jpeg", data: jpeg, outcome: "decision" };
    case "bitFlips":
      return { kind: "bit-flips", data: flipBits(prng, jpeg, prng.pick([1, 2, 4, 8, 32])), outcome: "either" };
    case "overwriteRun":
      return { kind: "overwrite-run", data: overwriteRun(prng, jpeg), outcome: "either" };
    case "truncated":
      // A baseline JPEG cut off in its last rows still decodes, because the centre crop never
      // reads those rows, so truncation is not always an error.
      return { kind: "truncated", data: jpeg.subarray(0, prng.between(0, jpeg.length - 3)), outcome: "either" };
    case "header": {
      const headerLength = Math.min(jpeg.length, 700);
      const copy = Buffer.from(jpeg);
      for (let i = prng.between(1, 8); i > 0; i--) {
        copy[2 + prng.int(headerLength - 2)] = prng.int(256);
      }
      return { kind: "header-corruption", data: copy, outcome: "either" };
    }
    case "sofDimensions": {
      const sof = findSof(jpeg);
      const copy = Buffer.from(jpeg);
      const [height, width] = prng.pick([
        [65_535, 65_535],
        [0, 640],
        [480, 0],
        [60_000, 60_000],
        [10_000, 10_000],
        [1, 1],
        [65_535, 1],
      ]);
      copy.writeUInt16BE(height, sof + 5);
      copy.writeUInt16BE(width, sof + 7);
      // Zero sizes and sizes above MAX_INPUT_PIXELS must fail, but a small declared size may decode.
      const outcome = width === 0 || height === 0 || width * height > 100_000_000 ? "error" : "either";
      return { kind: `sof-${width}x${height}`, data: copy, outcome };
    }
    case "zeroLength":
      return { kind: "zero-length", data: Buffer.alloc(0), outcome: "error" };
    case "tinyBuffer":
      return { kind: "tiny-buffer", data: Buffer.concat([Buffer.from([0xff, 0xd8]), prng.bytes(prng.between(0, 6))]), outcome: "error" };
    case "garbage":
      return { kind: "garbage", data: prng.bytes(prng.pick([16, 1_000, 100_000])), outcome: "error" };
    case "magicGarbage": {
      const magic = prng.pick([
        Buffer.from([0xff, 0xd8, 0xff, 0xe0]),
        Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
        Buffer.from("RIFF\u0000\u0010\u0000\u0000WEBPVP8 ", "latin1"),
        Buffer.from("GIF89a", "latin1"),
        Buffer.from([0x49, 0x49, 0x2a, 0x00]),
        Buffer.from("<svg", "latin1"),
      ]);
      return { kind: "magic-garbage", data: Buffer.concat([magic, prng.bytes(prng.pick([8, 500, 20_000]))]), outcome: "error" };
    }
    case "otherFormat": {
      const other = prng.pick(bases.otherFormats);
      return { kind: `format-${other.kind}`, data: other.data, outcome: "decision" };
    }
    case "otherFormatMutated": {
      const other = prng.pick(bases.otherFormats);
      return { kind: `format-${other.kind}-mutated`, data: prng.chance(0.5) ? flipBits(prng, other.data, prng.pick([1, 4, 16])) : other.data.subarray(0, prng.int(other.data.length)), outcome: "either" };
    }
    case "pngHugeHeader": {
      const [width, height] = prng.pick([
        [100_000, 100_000],
        [2 ** 31 - 1, 1],
        [20_000, 5_001],
        [0, 10],
      ]);
      return { kind: "png-huge-header", data: Buffer.concat([pngHeader(width, height), prng.bytes(prng.pick([0, 100, 10_000]))]), outcome: "error" };
    }
    case "svg": {
      const huge = prng.chance(0.5);
      const size = huge ? 'width="100000" height="100000"' : 'width="600" height="400"';
      const svg = `<svg xmlns="http://www.w3.org/2000/svg" ${size}><rect width="100%" height="100%" fill="#3a6"/></svg>`;
      // The namespace URI is an identifier, and librsvg does not fetch it.
      return { kind: huge ? "svg-huge" : "svg", data: Buffer.from(svg), outcome: huge ? "error" : "either" };
    }
    case "tooSmall":
      // prepareImage scales the short side up to the model's size, so a 16x16 JPEG is classified.
      return { kind: "tiny-jpeg", data: bases.tiny, outcome: "decision" };
    default:
      return { kind: "concatenated", data: Buffer.concat([jpeg, prng.pick(bases.camera)]), outcome: "either" };
  }
}

// ---------------------------------------------------------------------------------------------
// Pipeline harness

let runner: ModelRunner;
let policy: DecisionPolicy;
let bases: Bases;
let temp: ReturnType<typeof makeTempDir>;

beforeAll(async () => {
  runner = await ModelRunner.load(path.join(repoRoot, "models", "default"), { threads: 1 });
  policy = new DecisionPolicy({ bins: BINS, rejectBin: REJECT_BIN, minConfidence: {}, defaultMinConfidence: 0, topK: 3 }, runner.manifest.labels);
  bases = await loadBases();
  temp = makeTempDir("fuzz-frames");
}, 120_000);

afterAll(async () => {
  await runner?.release();
  temp?.remove();
});

interface RunResult {
  /** RSS in MiB after each wave. */
  rssByWave: number[];
  records: Map<string, DecisionRecord[]>;
  actuator: RecordingActuator;
  pipeline: Pipeline;
  audit: AuditStore;
}

/** Runs `inputs` through a fresh Pipeline in waves and returns every decision by frame id. */
async function decideAll(name: string, inputs: readonly Buffer[]): Promise<RunResult> {
  const audit = AuditStore.open(path.join(temp.dir, `${name}.db`), { synchronous: "NORMAL" });
  const actuator = new RecordingActuator();
  const records = new Map<string, DecisionRecord[]>();
  const rssByWave: number[] = [];
  const pipeline = new Pipeline({
    runner,
    policy,
    device: { id: "line-fuzz", site: "plant-fuzz" },
    maxBatch: 8,
    maxWaitMs: 5,
    queueSize: WAVE * 2,
    deadlineMs: 60_000,
    audit,
    actuators: [actuator],
    onDecision: (record) => {
      const list = records.get(record.frameId) ?? [];
      list.push(record);
      records.set(record.frameId, list);
    },
  });
  pipeline.start();
  for (let start = 0; start < inputs.length; start += WAVE) {
    const wave = inputs.slice(start, start + WAVE);
    wave.forEach((data, offset) => {
      const sequence = start + offset;
      const frame: Frame = { id: `${name}-${sequence}`, source: name, sequence, data, capturedAt: Date.now() };
      pipeline.submit(frame);
    });
    const target = start + wave.length;
    if (!(await pollUntil(() => pipeline.stats.decided >= target, 120_000, 5))) {
      throw new Error(`pipeline decided ${pipeline.stats.decided} of ${target} frames within 120 s`);
    }
    rssByWave.push(Math.round(process.memoryUsage().rss / 1024 / 1024));
  }
  await pipeline.stop();
  return { rssByWave, records, actuator, pipeline, audit };
}

/** Decodes each input with prepareImage and returns the error class name per input, or null when it decodes. */
async function decodeOutcomes(inputs: readonly Buffer[]): Promise<(string | null)[]> {
  const outcomes: (string | null)[] = [];
  for (const data of inputs) {
    try {
      await prepareImage(data, runner.manifest.preprocess);
      outcomes.push(null);
    } catch (error) {
      outcomes.push(error instanceof Error ? error.constructor.name : typeof error);
    }
  }
  return outcomes;
}

/** Returns the RSS growth in MiB from the middle wave to the highest of the later waves. */
function secondHalfGrowth(rssByWave: readonly number[]): number {
  const middle = Math.floor(rssByWave.length / 2);
  return Math.max(...rssByWave.slice(middle)) - rssByWave[middle]!;
}

/**
 * Checks each frame's single decision against prepareImage's outcome and the input's claim.
 * Returns the violations and a table of outcomes by kind.
 */
function checkDecisions(name: string, images: readonly FuzzImage[], decodeErrors: readonly (string | null)[], result: RunResult) {
  const violations: string[] = [];
  const table: Record<string, Record<string, number>> = {};
  images.forEach((image, index) => {
    const id = `${name}-${index}`;
    const records = result.records.get(id) ?? [];
    const messages = result.actuator.byFrame.get(id) ?? [];
    if (records.length !== 1 || messages.length !== 1) {
      violations.push(`${id} (${image.kind}): ${records.length} decisions, ${messages.length} actuator messages`);
      return;
    }
    const record = records[0]!;
    const isError = record.error !== null;
    const row = (table[image.kind] ??= {});
    const outcome = isError ? "error → reject" : `decided → ${record.bin}`;
    row[outcome] = (row[outcome] ?? 0) + 1;
    if (isError && (record.bin !== REJECT_BIN || record.reason !== "error" || record.label !== null || messages[0]!.bin !== REJECT_BIN)) {
      violations.push(`${id} (${image.kind}): error decision outside the reject bin: ${JSON.stringify({ bin: record.bin, reason: record.reason, label: record.label })}`);
    }
    if (!isError && (record.bin === REJECT_BIN || record.reason === "error")) {
      // defaultMinConfidence is 0 and every label has a bin, so only errors reach the reject bin.
      violations.push(`${id} (${image.kind}): decoded frame in the reject bin: ${JSON.stringify({ bin: record.bin, reason: record.reason })}`);
    }
    const decodeError = decodeErrors[index];
    if (decodeError !== null && decodeError !== ImageDecodeError.name) {
      violations.push(`${id} (${image.kind}): prepareImage threw ${decodeError}, expected ImageDecodeError`);
    }
    if ((decodeError !== null) !== isError) {
      violations.push(`${id} (${image.kind}): prepareImage ${decodeError === null ? "decoded it" : `threw ${decodeError}`}, but the pipeline ${isError ? `recorded error "${record.error}"` : "classified it"}`);
    }
    if (image.outcome === "error" && !isError) {
      violations.push(`${id} (${image.kind}): expected an error decision, got ${record.label} (${record.confidence})`);
    }
    if (image.outcome === "decision" && isError) {
      violations.push(`${id} (${image.kind}): expected a classification, got error "${record.error}"`);
    }
  });
  return { violations, table };
}

describe("image frame fuzzing", () => {
  it("rejects each undecodable frame once", async () => {
    console.log(`frame fuzz: seed ${SEED} (SORTLINE_FUZZ_SEED=${SEED} repeats it), ${FRAMES} frames`);
    const prng = new Prng(SEED);
    const images = Array.from({ length: FRAMES }, () => generateImage(prng, bases));
    const rss = new RssSampler();
    rss.begin(50);

    const decodeErrors = await decodeOutcomes(images.map((image) => image.data));
    const result = await decideAll("frames", images.map((image) => image.data));
    const memory = rss.end();
    const { violations, table } = checkDecisions("frames", images, decodeErrors, result);
    const errors = [...result.records.values()].filter((records) => records[0]!.error !== null).length;
    const auditRows = result.audit.stats().rows;
    result.audit.close();

    console.log(JSON.stringify({ seed: SEED, frames: FRAMES, errorDecisions: errors, classified: FRAMES - errors, stats: result.pipeline.stats, auditRows, rssMiB: memory, rssMiBByWave: result.rssByWave.join(" "), outcomes: table }, null, 1));
    expect(violations.slice(0, 20)).toEqual([]);
    expect(result.actuator.count).toBe(FRAMES);
    expect(result.pipeline.stats.decided).toBe(FRAMES);
    expect(result.pipeline.stats.dropped).toBe(0);
    expect(result.pipeline.stats.errors).toBe(errors);
    expect(auditRows).toBe(FRAMES);
    expect(memory.peakMiB - memory.startMiB).toBeLessThan(MAX_PEAK_GROWTH_MIB);
    expect(secondHalfGrowth(result.rssByWave)).toBeLessThan(MAX_SECOND_HALF_GROWTH_MIB);
  }, 30 * 60_000 * SCALE);
});

/** Returns a copy of `jpeg` whose SOF declares `width` x `height`. */
function withDeclaredSize(jpeg: Buffer, width: number, height: number): Buffer {
  const copy = Buffer.from(jpeg);
  const sof = findSof(copy);
  copy.writeUInt16BE(height, sof + 5);
  copy.writeUInt16BE(width, sof + 7);
  return copy;
}

describe("huge declared image sizes", () => {
  it("decodes each within bounded memory", async () => {
    const svg = (size: number): Buffer => Buffer.from(`<svg xmlns="http://www.w3.org/2000/svg" width="${size}" height="${size}"><rect width="100%" height="100%" fill="#3a6"/></svg>`);
    const cases: [string, Buffer][] = [
      ["progressive JPEG, SOF 10000x10000", withDeclaredSize(bases.photos[0]!, 10_000, 10_000)],
      ["baseline JPEG, SOF 10000x10000", withDeclaredSize(bases.camera[0]!, 10_000, 10_000)],
      ["baseline JPEG, SOF 65535x65535", withDeclaredSize(bases.camera[0]!, 65_535, 65_535)],
      ["PNG, IHDR 20000x5000 and no image data", Buffer.concat([pngHeader(20_000, 5_000), Buffer.alloc(10_000, 7)])],
      ["SVG 10000x10000", svg(10_000)],
      ["SVG 100000x100000", svg(100_000)],
    ];
    const table: Record<string, { outcome: string; ms: number; peakGrowthMiB: number }> = {};
    for (const [name, data] of cases) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      const rss = new RssSampler();
      rss.begin(5);
      const started = Date.now();
      const outcome = await prepareImage(data, runner.manifest.preprocess).then(
        (prepared) => `decoded as ${prepared.sourceWidth}x${prepared.sourceHeight}`,
        (error: unknown) => `${(error as Error).constructor.name}: ${(error as Error).message.slice(0, 80)}`,
      );
      const memory = rss.end();
      table[name] = { outcome, ms: Date.now() - started, peakGrowthMiB: Math.round((memory.peakMiB - memory.startMiB) * 10) / 10 };
    }
    console.log(JSON.stringify(table, null, 1));
    for (const [name, row] of Object.entries(table)) {
      expect(row.peakGrowthMiB, name).toBeLessThan(MAX_SINGLE_DECODE_MIB);
    }
    expect(table["baseline JPEG, SOF 65535x65535"]!.outcome).toMatch(/^ImageDecodeError/);
    expect(table["SVG 100000x100000"]!.outcome).toMatch(/^ImageDecodeError: .*pixel limit/);
  }, 120_000);
});

// ---------------------------------------------------------------------------------------------
// Motion JPEG stream

interface Segment {
  kind: "valid" | "mutated" | "truncated" | "oversize" | "garbage" | "garbage-no-ff";
  data: Buffer;
}

/** Inserts an APP1 segment after SOI whose payload contains SOI and EOI bytes, as an EXIF thumbnail does. */
function withThumbnailMarkers(jpeg: Buffer, tag: number): Buffer {
  const payload = Buffer.concat([Buffer.from(`Exif\u0000\u0000${tag}`, "latin1"), Buffer.from([0xff, 0xd8, 0xff, 0xdb, 0x00, 0x01, 0xff, 0xd9])]);
  const header = Buffer.alloc(4);
  header.writeUInt16BE(0xffe1, 0);
  header.writeUInt16BE(payload.length + 2, 2);
  return Buffer.concat([jpeg.subarray(0, 2), header, payload, jpeg.subarray(2)]);
}

/** Pads a JPEG with APP15 segments of 65533 payload bytes until it exceeds `bytes`. */
function padBeyond(jpeg: Buffer, bytes: number): Buffer {
  const parts: Buffer[] = [jpeg.subarray(0, 2)];
  let size = jpeg.length;
  while (size <= bytes) {
    const segment = Buffer.alloc(4 + 65_533, 0x20);
    segment.writeUInt16BE(0xffef, 0);
    segment.writeUInt16BE(65_535, 2);
    parts.push(segment);
    size += segment.length;
  }
  parts.push(jpeg.subarray(2));
  return Buffer.concat(parts);
}

function generateSegment(prng: Prng, camera: readonly Buffer[], index: number): Segment {
  const kind = prng.weighted({ valid: 40, mutated: 25, truncated: 12, oversize: 3, garbage: 12, garbageNoFf: 8 });
  // A unique tag per valid frame, so a recovered frame can be matched to its segment by content.
  const base = withThumbnailMarkers(prng.pick(camera), index);
  switch (kind) {
    case "valid":
      return { kind: "valid", data: base };
    case "mutated":
      return { kind: "mutated", data: prng.chance(0.6) ? flipBits(prng, base, prng.pick([1, 3, 10])) : overwriteRun(prng, base) };
    case "truncated":
      return { kind: "truncated", data: base.subarray(0, prng.between(2, base.length - 3)) };
    case "oversize":
      return { kind: "oversize", data: padBeyond(base, MAX_FRAME_BYTES) };
    case "garbage":
      return { kind: "garbage", data: prng.bytes(prng.pick([1, 2, 50, 5_000, 70_000])) };
    default: {
      const bytes = prng.bytes(prng.pick([1, 100, 3_000]));
      for (let i = 0; i < bytes.length; i++) {
        if (bytes[i] === 0xff) {
          bytes[i] = 0x00;
        }
      }
      return { kind: "garbage-no-ff", data: bytes };
    }
  }
}

describe("MJPEG stream fuzzing", () => {
  it("accounts for every stream byte", async () => {
    console.log(`MJPEG fuzz: seed ${SEED} (SORTLINE_FUZZ_SEED=${SEED} repeats it), ${STREAM_SEGMENTS} segments`);
    const prng = new Prng(SEED ^ 0x5bd1e995);
    const segments = Array.from({ length: STREAM_SEGMENTS }, (_, index) => generateSegment(prng, bases.camera, index));
    const stream = Buffer.concat(segments.map((segment) => segment.data));
    const rss = new RssSampler();
    rss.begin(50);

    const splitter = new MjpegSplitter({ maxFrameBytes: MAX_FRAME_BYTES });
    const frames: Buffer[] = [];
    const violations: string[] = [];
    let pushed = 0;
    let emittedBytes = 0;
    let chunks = 0;
    for (let offset = 0; offset < stream.length; chunks++) {
      const size = prng.pick([1, 2, 7, 100, 4_096, 65_536, 200_000]);
      const chunk = stream.subarray(offset, offset + size);
      offset += chunk.length;
      pushed += chunk.length;
      const out = splitter.push(chunk);
      for (const frame of out) {
        emittedBytes += frame.length;
        if (frame[0] !== 0xff || frame[1] !== 0xd8 || frame[frame.length - 2] !== 0xff || frame[frame.length - 1] !== 0xd9) {
          violations.push(`frame ${frames.length} of ${frame.length} bytes does not run from SOI to EOI`);
        }
        if (frame.length > MAX_FRAME_BYTES) {
          violations.push(`frame ${frames.length} has ${frame.length} bytes, above the ${MAX_FRAME_BYTES} limit`);
        }
        frames.push(frame);
      }
      if (splitter.bufferedBytes > MAX_FRAME_BYTES) {
        violations.push(`${splitter.bufferedBytes} bytes buffered after chunk ${chunks}, above the ${MAX_FRAME_BYTES} limit`);
      }
      const accounted = emittedBytes + splitter.stats.droppedBytes + splitter.bufferedBytes;
      if (accounted !== pushed) {
        violations.push(`after chunk ${chunks}: ${pushed} bytes pushed, ${accounted} accounted for`);
      }
    }

    // A valid frame that directly follows a recovered valid frame must be recovered intact.
    const emitted = new Set(frames.map((frame) => frame.toString("base64")));
    const recovered = segments.map((segment) => segment.kind === "valid" && emitted.has(segment.data.toString("base64")));
    let validFrames = 0;
    segments.forEach((segment, index) => {
      if (segment.kind !== "valid") {
        return;
      }
      validFrames++;
      if (index > 0 && recovered[index - 1] && !recovered[index]) {
        violations.push(`valid frame in segment ${index} follows a recovered valid frame but was not emitted intact`);
      }
    });

    // After reset(), a clean run of frames comes out unchanged.
    splitter.reset();
    const clean = bases.camera.slice(0, 5).map((frame, index) => withThumbnailMarkers(frame, 1_000_000 + index));
    const afterReset = splitter.push(Buffer.concat(clean));
    expect(afterReset.map((frame) => frame.toString("base64"))).toEqual(clean.map((frame) => frame.toString("base64")));

    // The frames the splitter returned go on to the pipeline, as a camera source would send them.
    const decodeErrors = await decodeOutcomes(frames);
    const images: FuzzImage[] = frames.map((frame) => ({ kind: "mjpeg-frame", data: frame, outcome: "either" }));
    const result = await decideAll("mjpeg", frames);
    const checked = checkDecisions("mjpeg", images, decodeErrors, result);
    result.audit.close();
    const validEmitted = recovered.filter(Boolean).length;
    const validSet = new Set(segments.filter((segment) => segment.kind === "valid").map((segment) => segment.data.toString("base64")));
    frames.forEach((frame, index) => {
      if (validSet.has(frame.toString("base64")) && decodeErrors[index] !== null) {
        violations.push(`recovered valid frame ${index} failed to decode: ${decodeErrors[index]}`);
      }
    });
    const memory = rss.end();

    console.log(
      JSON.stringify(
        {
          seed: SEED,
          segments: STREAM_SEGMENTS,
          streamBytes: stream.length,
          chunks,
          splitter: splitter.stats,
          framesOut: frames.length,
          validFrames,
          validRecovered: validEmitted,
          errorDecisions: frames.length - [...result.records.values()].filter((records) => records[0]!.error === null).length,
          rssMiB: memory,
          rssMiBByWave: result.rssByWave.join(" "),
          outcomes: checked.table,
        },
        null,
        1,
      ),
    );
    expect(violations.slice(0, 20)).toEqual([]);
    expect(checked.violations.slice(0, 20)).toEqual([]);
    expect(result.pipeline.stats.decided).toBe(frames.length);
    expect(memory.peakMiB - memory.startMiB).toBeLessThan(MAX_PEAK_GROWTH_MIB);
    expect(secondHalfGrowth(result.rssByWave)).toBeLessThan(MAX_SECOND_HALF_GROWTH_MIB);
  }, 30 * 60_000 * SCALE);
});
