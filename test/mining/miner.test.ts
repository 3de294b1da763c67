import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import sharp from "sharp";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";

import type { Frame } from "../../src/capture/types.js";
import type { Actuator, ActuatorMessage } from "../../src/decision/actuators.js";
import { DecisionPolicy } from "../../src/decision/policy.js";
import { ModelRunner } from "../../src/inference/runner.js";
import { dot, l2Normalize, loadKnowledge, type Knowledge } from "../../src/mining/knowledge.js";
import { HardExampleMiner, type MinerMetrics } from "../../src/mining/miner.js";
import { Outbox, type OutboxItem } from "../../src/mining/outbox.js";
import type { CandidateReason, SkipReason } from "../../src/mining/selector.js";
import { Pipeline, type ScoredFrame } from "../../src/pipeline/pipeline.js";
import { prepareImage } from "../../src/preprocess/image.js";
import { makeTempDir } from "../audit/helpers.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const photosDir = path.join(root, "demo", "photos");
/** The class left out of the knowledge file, so its photos play the part of a new material. */
const HELD_OUT = "trash";
const BINS: Record<string, string> = { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" };
const DEVICE = { id: "line-1", site: "plant-a" };

interface Photo {
  label: string;
  file: string;
  data: Buffer;
}

let runner: ModelRunner;
let policy: DecisionPolicy;
let photos: Photo[];
let variants: { of: Photo; data: Buffer }[];
let knowledgeDir: ReturnType<typeof makeTempDir>;
let knowledge: Knowledge;
let sequence = 0;

function readPhotos(): Photo[] {
  return readdirSync(photosDir)
    .sort()
    .flatMap((label) =>
      readdirSync(path.join(photosDir, label))
        .filter((file) => file.endsWith(".jpg"))
        .sort()
        .map((file) => ({ label, file, data: readFileSync(path.join(photosDir, label, file)) })),
    );
}

/** Two near-duplicates of a photo, as the next frames of one item on a belt: shifted a few pixels, and brighter. */
async function nearDuplicates(photo: Photo): Promise<Buffer[]> {
  const { width, height } = await sharp(photo.data).metadata();
  const shifted = await sharp(photo.data).extract({ left: 8, top: 4, width: width - 16, height: height - 8 }).jpeg({ quality: 85 }).toBuffer();
  const brighter = await sharp(photo.data).modulate({ brightness: 1.08 }).jpeg({ quality: 80 }).toBuffer();
  return [shifted, brighter];
}

function quantile(values: number[], q: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.round(q * (sorted.length - 1))]!;
}

/** Builds knowledge.json from the photos of every class but HELD_OUT, as the training job does from its training split. */
async function writeKnowledge(dir: string): Promise<void> {
  const byLabel = new Map<string, Float32Array[]>();
  for (const photo of photos.filter((entry) => entry.label !== HELD_OUT)) {
    const { pixels } = await prepareImage(photo.data, runner.manifest.preprocess);
    const { embeddings } = await runner.run([pixels]);
    byLabel.set(photo.label, [...(byLabel.get(photo.label) ?? []), l2Normalize(embeddings[0]!)]);
  }
  const classes = [...byLabel].map(([label, members]) => {
    const mean = new Float32Array(members[0]!.length);
    for (const member of members) {
      member.forEach((value, index) => (mean[index] = mean[index]! + value / members.length));
    }
    const centroid = l2Normalize(mean);
    const distances = members.map((member) => 1 - dot(member, centroid));
    return { label, centroid: Array.from(centroid), count: members.length, p50: quantile(distances, 0.5), p95: quantile(distances, 0.95) };
  });
  writeFileSync(path.join(dir, "knowledge.json"), JSON.stringify({ version: 1, output: "embedding", dim: 2048, classes }));
}

beforeAll(async () => {
  runner = await ModelRunner.load(path.join(root, "models", "default"));
  policy = new DecisionPolicy({ bins: BINS, rejectBin: "reject", minConfidence: {}, defaultMinConfidence: 0, topK: 3 }, runner.manifest.labels);
  photos = readPhotos();
  variants = [];
  for (const label of new Set(photos.map((photo) => photo.label))) {
    const first = photos.find((photo) => photo.label === label)!;
    for (const data of await nearDuplicates(first)) {
      variants.push({ of: first, data });
    }
  }
  knowledgeDir = makeTempDir("miner-knowledge");
  await writeKnowledge(knowledgeDir.dir);
  const { labels, outputs } = runner.manifest;
  knowledge = (await loadKnowledge(knowledgeDir.dir, { dim: 2048, labels, output: outputs.embedding }))!;
});

afterAll(async () => {
  await runner?.release();
  knowledgeDir?.remove();
});

class NullActuator implements Actuator {
  readonly kind = "null";
  readonly dropped = 0;
  readonly messages: ActuatorMessage[] = [];
  async start(): Promise<void> {}
  async stop(): Promise<void> {}
  send(messages: readonly ActuatorMessage[]): void {
    this.messages.push(...messages);
  }
}

/** Counts every metrics call of the miner. */
class CountingMetrics implements MinerMetrics {
  readonly selectedByReason = new Map<CandidateReason, number>();
  readonly skippedByReason = new Map<SkipReason, number>();
  evictedCount = 0;
  rejectedCount = 0;
  writeFailures = 0;
  lastSize: { items: number; bytes: number } | undefined;

  selected(reason: CandidateReason): void {
    this.selectedByReason.set(reason, (this.selectedByReason.get(reason) ?? 0) + 1);
  }
  skipped(reason: SkipReason): void {
    this.skippedByReason.set(reason, (this.skippedByReason.get(reason) ?? 0) + 1);
  }
  evicted(count: number): void {
    this.evictedCount += count;
  }
  rejected(): void {
    this.rejectedCount++;
  }
  outboxWriteFailed(): void {
    this.writeFailures++;
  }
  outboxSize(items: number, bytes: number): void {
    this.lastSize = { items, bytes };
  }
}

function makeFrame(data: Buffer, label?: string): Frame {
  sequence++;
  return { id: `cam-1-${sequence}`, source: "cam-1", sequence, data, capturedAt: Date.now(), label };
}

/** Returns every outbox item, highest priority first. */
function drain(outbox: Outbox): OutboxItem[] {
  const items: OutboxItem[] = [];
  for (let item = outbox.next(); item; item = outbox.next(items.map((entry) => entry.id))) {
    items.push(item);
  }
  return items;
}

describe("HardExampleMiner with the default model", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let outbox: Outbox;
  let metrics: CountingMetrics;

  function runPipeline(miner: HardExampleMiner, frames: Frame[]): Promise<Pipeline> {
    const pipeline = new Pipeline({
      runner,
      policy,
      device: DEVICE,
      maxBatch: 4,
      maxWaitMs: 30_000,
      queueSize: 128,
      deadlineMs: 1_500,
      actuators: [new NullActuator()],
      observer: miner,
    });
    pipeline.start();
    for (const frame of frames) {
      pipeline.submit(frame);
    }
    return pipeline.stop().then(() => pipeline);
  }

  beforeEach(() => {
    temp = makeTempDir("miner");
    metrics = new CountingMetrics();
  });

  afterEach(() => {
    outbox?.close();
    temp.remove();
  });

  it("stores one example per distinct photo", async () => {
    outbox = Outbox.open(path.join(temp.dir, "outbox.db"), { maxBytes: 50_000_000, maxItems: 1_000 });
    // lowConfidence 1 makes every frame a candidate, so only the near-duplicate check decides.
    const miner = new HardExampleMiner({ selector: { lowConfidence: 1, randomRate: 0, budget: null, knowledge }, outbox, device: DEVICE, metrics });
    miner.setKnowledge(runner.manifest.file.sha256, knowledge);
    const frames: Frame[] = [];
    const photoOf = new Map<string, Photo>();
    for (const photo of photos) {
      const frame = makeFrame(photo.data, photo.label);
      frames.push(frame);
      photoOf.set(frame.id, photo);
      for (const variant of variants.filter((entry) => entry.of === photo)) {
        const copy = makeFrame(variant.data, photo.label);
        frames.push(copy);
        photoOf.set(copy.id, photo);
      }
    }

    const pipeline = await runPipeline(miner, frames);

    expect(pipeline.stats.decided).toBe(photos.length + variants.length);
    expect(pipeline.stats.observerErrors).toBe(0);
    const items = drain(outbox);
    expect(items).toHaveLength(photos.length);
    // Decoding runs two frames at once, so a near-duplicate may be scored before its original.
    // Either way, each photo with its copies gives one example.
    const storedPhotos = items.map((item) => photoOf.get(item.meta.frameId)!.file);
    expect(new Set(storedPhotos).size).toBe(photos.length);
    expect(miner.selector.stats.skipped.duplicate).toBe(variants.length);
    expect(metrics.skippedByReason.get("duplicate")).toBe(variants.length);
    expect(metrics.selectedByReason.get("low-confidence")).toBe(photos.length);
    expect(metrics.lastSize).toEqual(outbox.size());
    expect(miner.stats).toMatchObject({ frames: frames.length, stored: photos.length, outboxWriteFailures: 0, selectorErrors: 0 });

    for (const item of items) {
      const frame = frames.find((candidate) => candidate.id === item.meta.frameId)!;
      expect(item.jpeg.equals(frame.data)).toBe(true);
      expect(item.embedding).toHaveLength(2048);
      expect(item.meta.model).toEqual({ name: runner.manifest.name, version: runner.manifest.version, sha256: runner.manifest.file.sha256 });
      expect(item.meta.top).toHaveLength(3);
      expect(item.meta.reasons).toContain("low-confidence");
      expect(typeof item.meta.novelty).toBe("number");
      expect(item.meta).toMatchObject({ site: DEVICE.site, device: DEVICE.id, source: "cam-1" });
      expect(item.meta.decision!.bin).toBe(BINS[item.meta.top[0]!.label]);
    }
  });

  it("scores a held-out class as more novel", async () => {
    outbox = Outbox.open(path.join(temp.dir, "outbox.db"), { maxBytes: 50_000_000, maxItems: 1_000 });
    const miner = new HardExampleMiner({ selector: { lowConfidence: 1, randomRate: 0, budget: null }, outbox, device: DEVICE });
    miner.setKnowledge(runner.manifest.file.sha256, knowledge);
    const frames = photos.map((photo) => makeFrame(photo.data, photo.label));
    const labelOf = new Map(frames.map((frame) => [frame.id, frame.label!]));

    await runPipeline(miner, frames);

    const items = drain(outbox);
    const mean = (values: number[]): number => values.reduce((sum, value) => sum + value, 0) / values.length;
    const heldOut = items.filter((item) => labelOf.get(item.meta.frameId) === HELD_OUT).map((item) => item.meta.novelty!);
    const known = items.filter((item) => labelOf.get(item.meta.frameId) !== HELD_OUT).map((item) => item.meta.novelty!);
    expect(heldOut).toHaveLength(6);
    expect(mean(heldOut)).toBeGreaterThan(mean(known));
  });

  it("keeps going when the outbox cannot write", async () => {
    // SQLite never sets max_page_count below the current size, so 1 byte caps the file as created.
    outbox = Outbox.open(path.join(temp.dir, "outbox.db"), { maxBytes: 50_000_000, maxItems: 1_000, maxDatabaseBytes: 1 });
    const miner = new HardExampleMiner({ selector: { lowConfidence: 1, randomRate: 0, budget: null }, outbox, device: DEVICE, metrics });
    const frames = photos.slice(0, 12).map((photo) => makeFrame(photo.data, photo.label));

    const pipeline = await runPipeline(miner, frames);

    expect(pipeline.stats.decided).toBe(frames.length);
    expect(pipeline.stats.observerErrors).toBe(0);
    expect(miner.stats.outboxWriteFailures).toBeGreaterThan(0);
    expect(miner.stats.outboxWriteFailures + miner.stats.stored).toBe(frames.length);
    expect(metrics.writeFailures).toBe(miner.stats.outboxWriteFailures);
  });
});

describe("HardExampleMiner across models", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let outbox: Outbox;
  let entry: ScoredFrame;

  beforeAll(async () => {
    const photo = photos.find((candidate) => candidate.label === HELD_OUT)!;
    const { pixels } = await prepareImage(photo.data, runner.manifest.preprocess);
    const { probabilities, embeddings } = await runner.run([pixels]);
    const decision = policy.decide(probabilities[0]!);
    const { name, version, file, labels } = runner.manifest;
    entry = {
      frame: makeFrame(photo.data, photo.label),
      pixels,
      record: {
        frameId: "scored",
        source: "cam-1",
        capturedAt: Date.now(),
        decidedAt: Date.now(),
        modelName: name,
        modelVersion: version,
        modelSha256: file.sha256,
        top: decision.top,
        label: decision.label,
        confidence: decision.confidence,
        bin: decision.bin,
        reason: decision.reason,
        latency: { queueMs: 0, decodeMs: 0, inferenceMs: 0, totalMs: 0 },
        error: null,
      },
      probabilities: probabilities[0]!,
      embedding: embeddings[0]!,
      labels,
      model: { name, version, sha256: file.sha256 },
    };
  });

  beforeEach(() => {
    temp = makeTempDir("miner-models");
    outbox = Outbox.open(path.join(temp.dir, "outbox.db"), { maxBytes: 50_000_000, maxItems: 1_000 });
  });

  afterEach(() => {
    outbox.close();
    temp.remove();
  });

  it("clears near-duplicate memory on a model change", () => {
    const miner = new HardExampleMiner({ selector: { lowConfidence: 1, randomRate: 0, budget: null }, outbox, device: DEVICE });
    const otherModel = { ...entry, model: { ...entry.model, version: "2.0.0", sha256: "b".repeat(64) } };

    miner.onScored([entry]);
    miner.onScored([entry]);
    miner.onScored([otherModel]);

    expect(miner.stats.stored).toBe(2);
    expect(miner.selector.stats.skipped.duplicate).toBe(1);
    expect(drain(outbox).map((item) => item.meta.model.version).sort()).toEqual(["1.0.0", "2.0.0"]);
  });

  it("uses the knowledge of each model", () => {
    const miner = new HardExampleMiner({ selector: { lowConfidence: 1, randomRate: 0, budget: null }, outbox, device: DEVICE });
    miner.setKnowledge(entry.model.sha256, knowledge);
    const otherModel = { ...entry, model: { ...entry.model, version: "2.0.0", sha256: "b".repeat(64) } };

    miner.onScored([entry, otherModel]);

    const byVersion = new Map(drain(outbox).map((item) => [item.meta.model.version, item]));
    expect(typeof byVersion.get("1.0.0")!.meta.novelty).toBe("number");
    expect(byVersion.get("2.0.0")!.meta.novelty).toBeNull();
  });

  it("counts selector errors and goes on", () => {
    const miner = new HardExampleMiner({ selector: { lowConfidence: 1, randomRate: 0, budget: null }, outbox, device: DEVICE });
    miner.setKnowledge(entry.model.sha256, knowledge);
    const truncated = { ...entry, embedding: entry.embedding.subarray(0, 100) };

    miner.onScored([truncated, entry]);

    expect(miner.stats.selectorErrors).toBe(1);
    expect(miner.stats.stored).toBe(1);
  });
});
