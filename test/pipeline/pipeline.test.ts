import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { MAX_QUERY_LIMIT } from "../../src/audit/queries.js";
import { AuditStore, AuditWriteError } from "../../src/audit/store.js";
import type { Frame } from "../../src/capture/types.js";
import type { Actuator, ActuatorMessage } from "../../src/decision/actuators.js";
import { DecisionPolicy, type DecisionSettings } from "../../src/decision/policy.js";
import { ModelRunner } from "../../src/inference/runner.js";
import type { ModelManifest } from "../../src/models/manifest.js";
import { Pipeline, type PipelineObserver, type PipelineOptions, type ScoredFrame } from "../../src/pipeline/pipeline.js";
import { prepareImage } from "../../src/preprocess/image.js";
import { makeRecord, makeTempDir } from "../audit/helpers.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const photosDir = path.join(root, "demo", "photos");

const BINS: Record<string, string> = { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" };
const DEADLINE_MS = 1_500;
/** Upper bound for waiting on decisions. It only turns a hang into a clear failure. */
const HANG_GUARD_MS = 45_000;

interface Photo {
  label: string;
  data: Buffer;
}

/** Reads the first photo (in file-name order) of each class folder under demo/photos. */
function firstPhotoPerClass(): Photo[] {
  return readdirSync(photosDir)
    .sort()
    .map((label) => {
      const name = readdirSync(path.join(photosDir, label)).filter((file) => file.endsWith(".jpg")).sort()[0]!;
      return { label, data: readFileSync(path.join(photosDir, label, name)) };
    });
}

let sequence = 0;
let runner: ModelRunner;
let policy: DecisionPolicy;
let photos: Photo[];
/** Pipelines that the running test started. afterEach stops them. */
const pipelines: Pipeline[] = [];

beforeAll(async () => {
  runner = await ModelRunner.load(path.join(root, "models", "default"));
  const settings: DecisionSettings = { bins: BINS, rejectBin: "reject", minConfidence: {}, defaultMinConfidence: 0, topK: 3 };
  policy = new DecisionPolicy(settings, runner.manifest.labels);
  photos = firstPhotoPerClass();
});

afterAll(async () => {
  await runner?.release();
});

/**
 * Builds and starts a pipeline that audits to `store` and sends to `actuator`. maxWaitMs is far
 * longer than decoding a handful of photos, so a batch closes when it is full or when no frame is
 * left to decode, and batches do not depend on timing.
 */
function startPipeline(store: AuditStore, actuator: RecordingActuator, overrides: Partial<PipelineOptions> = {}): Pipeline {
  const pipeline = new Pipeline({
    runner,
    policy,
    device: { id: "line-1", site: "plant-a" },
    maxBatch: 8,
    maxWaitMs: 30_000,
    queueSize: 32,
    deadlineMs: DEADLINE_MS,
    audit: store,
    actuators: [actuator],
    ...overrides,
  });
  pipeline.start();
  pipelines.push(pipeline);
  return pipeline;
}

function makeFrame(id: string, data: Buffer, label?: string): Frame {
  sequence++;
  return { id, source: "test-cam", sequence, data, capturedAt: Date.now(), label };
}

/** Returns the frame ids stored in the audit. */
function auditedIds(store: AuditStore): Set<string> {
  return new Set(store.query({ limit: MAX_QUERY_LIMIT }).map((row) => row.frameId));
}

/**
 * Fills the database up to its `maxDatabaseBytes` cap with small records, so that the next write
 * of a decision fails with SQLITE_FULL. Returns the number of filler records written.
 */
function fillUntilFull(store: AuditStore): number {
  for (let index = 0; index < 10_000; index++) {
    try {
      store.recordBatch([makeRecord(`f${index}`, { top: [], modelSha256: "0" })]);
    } catch (error) {
      if (error instanceof AuditWriteError && error.code === "SQLITE_FULL") {
        return index;
      }
      throw error;
    }
  }
  throw new Error("the audit database never reported SQLITE_FULL; is maxDatabaseBytes set?");
}

/**
 * An in-memory actuator that records every batch it receives. When given an audit store, it
 * reads the store inside send() and records each frame id that was not there yet.
 */
class RecordingActuator implements Actuator {
  readonly kind = "recording";
  readonly dropped = 0;
  readonly batches: ActuatorMessage[][] = [];
  /** Frame ids that were missing from the audit when send() received them. */
  readonly missingFromAudit: string[] = [];
  private waiters: { count: number; wake: () => void }[] = [];

  constructor(private readonly audit?: AuditStore) {}

  get messages(): ActuatorMessage[] {
    return this.batches.flat();
  }

  async start(): Promise<void> {}

  async stop(): Promise<void> {}

  send(messages: readonly ActuatorMessage[]): void {
    if (this.audit) {
      const audited = auditedIds(this.audit);
      for (const message of messages) {
        if (!audited.has(message.frameId)) {
          this.missingFromAudit.push(message.frameId);
        }
      }
    }
    this.batches.push([...messages]);
    const received = this.messages.length;
    this.waiters = this.waiters.filter((waiter) => {
      if (received >= waiter.count) {
        waiter.wake();
        return false;
      }
      return true;
    });
  }

  /** Resolves once `count` messages in total have arrived; rejects after HANG_GUARD_MS. */
  waitForMessages(count: number): Promise<void> {
    if (this.messages.length >= count) {
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`actuator received ${this.messages.length} of ${count} messages`)), HANG_GUARD_MS);
      this.waiters.push({
        count,
        wake: () => {
          clearTimeout(timer);
          resolve();
        },
      });
    });
  }
}

describe("Pipeline with the default model", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let store: AuditStore;
  let actuator: RecordingActuator;
  const start = (overrides: Partial<PipelineOptions> = {}): Pipeline => startPipeline(store, actuator, overrides);

  beforeEach(() => {
    temp = makeTempDir("pipeline");
    store = AuditStore.open(path.join(temp.dir, "audit.db"));
    actuator = new RecordingActuator(store);
  });

  afterEach(async () => {
    await Promise.all(pipelines.splice(0).map((pipeline) => pipeline.stop()));
    store.close();
    temp.remove();
  });

  it("decides real photos with labels", async () => {
    const pipeline = start({ maxBatch: 2 });
    const frames = photos.map((photo, index) => makeFrame(`photo-${index}`, photo.data, photo.label));

    for (const frame of frames) {
      pipeline.submit(frame);
    }
    await actuator.waitForMessages(frames.length);

    const messages = actuator.messages;
    expect(messages.map((message) => message.frameId).sort()).toEqual(frames.map((frame) => frame.id).sort());
    for (const message of messages) {
      expect(runner.manifest.labels).toContain(message.label);
      expect(message.bin).toBe(BINS[message.label!]);
      expect(message.reason).toBeNull();
      expect(message.confidence).toBeGreaterThan(0);
      expect(message.confidence).toBeLessThanOrEqual(1);
      expect(message.device).toBe("line-1");
      expect(message.deadline - message.capturedAt).toBe(DEADLINE_MS);
      expect(message.model).toEqual({ name: runner.manifest.name, version: runner.manifest.version });
    }
    expect(pipeline.stats.decided).toBe(frames.length);
    expect(pipeline.stats.errors).toBe(0);

    const rows = store.query({ limit: MAX_QUERY_LIMIT });
    expect(rows).toHaveLength(frames.length);
    for (const row of rows) {
      expect(row.error).toBeNull();
      expect(row.top).toHaveLength(3);
      expect(row.modelSha256).toBe(runner.manifest.file.sha256);
    }
    // One photo per class. The model scores about 84% on its validation split, so two misses
    // are allowed. A broken preprocessing or label order misses far more.
    const correct = rows.filter((row) => row.label === row.truth).length;
    expect(correct).toBeGreaterThanOrEqual(4);
  });

  it("audits every batch before the actuator", async () => {
    const pipeline = start({ maxBatch: 2 });
    const frames = photos.map((photo, index) => makeFrame(`ordered-${index}`, photo.data, photo.label));

    for (const frame of frames) {
      pipeline.submit(frame);
    }
    await actuator.waitForMessages(frames.length);

    // Six frames in batches of at most two reach the actuator in three or more send() calls.
    expect(actuator.batches.length).toBeGreaterThanOrEqual(3);
    expect(actuator.missingFromAudit).toEqual([]);
    expect(auditedIds(store)).toEqual(new Set(frames.map((frame) => frame.id)));
  });

  it("sends corrupt frames to the reject bin", async () => {
    const jpeg = photos[0]!.data;
    const corrupt = [
      makeFrame("random-bytes", randomBytes(4_096)),
      makeFrame("truncated-jpeg", jpeg.subarray(0, Math.floor(jpeg.length / 2))),
      makeFrame("empty", Buffer.alloc(0)),
    ];
    const good = [makeFrame("good-0", photos[1]!.data, photos[1]!.label), makeFrame("good-1", photos[2]!.data, photos[2]!.label)];
    const pipeline = start({ maxBatch: corrupt.length + good.length });

    for (const frame of [good[0]!, ...corrupt, good[1]!]) {
      pipeline.submit(frame);
    }
    await actuator.waitForMessages(corrupt.length + good.length);

    // All five frames were decided in one batch, so the good frames shared it with the corrupt ones.
    expect(actuator.batches).toHaveLength(1);
    const byId = new Map(actuator.messages.map((message) => [message.frameId, message]));
    for (const frame of corrupt) {
      const message = byId.get(frame.id)!;
      expect(message.bin).toBe("reject");
      expect(message.reason).toBe("error");
      expect(message.label).toBeNull();
      expect(message.confidence).toBeNull();
    }
    for (const frame of good) {
      expect(runner.manifest.labels).toContain(byId.get(frame.id)!.label);
      expect(byId.get(frame.id)!.reason).toBeNull();
    }
    expect(pipeline.stats.errors).toBe(corrupt.length);
    expect(pipeline.stats.decided).toBe(corrupt.length + good.length);

    const rows = new Map(store.query({ limit: MAX_QUERY_LIMIT }).map((row) => [row.frameId, row]));
    for (const frame of corrupt) {
      const row = rows.get(frame.id)!;
      expect(row.error).toMatch(/\S/);
      expect(row.reason).toBe("error");
      expect(row.bin).toBe("reject");
      expect(row.top).toEqual([]);
    }
    expect(actuator.missingFromAudit).toEqual([]);
  });

  it("keeps deciding after corrupt frames", async () => {
    const pipeline = start({ maxBatch: 1 });

    pipeline.submit(makeFrame("garbage", randomBytes(512)));
    pipeline.submit(makeFrame("after-garbage", photos[3]!.data, photos[3]!.label));
    await actuator.waitForMessages(2);

    const byId = new Map(actuator.messages.map((message) => [message.frameId, message]));
    expect(byId.get("garbage")!.reason).toBe("error");
    expect(runner.manifest.labels).toContain(byId.get("after-garbage")!.label);
  });

  it("drops the oldest frames when the queue overflows", async () => {
    // With one decoder, frame 0 leaves the queue for decoding at once. The queue then contains two
    // frames, so each later submit pushes out the oldest waiting frame: 1 to 7 are dropped.
    const pipeline = start({ queueSize: 2, decodeConcurrency: 1 });
    const photo = photos[4]!;
    const frames = Array.from({ length: 10 }, (_, index) => makeFrame(`burst-${index}`, photo.data, photo.label));

    for (const frame of frames) {
      pipeline.submit(frame);
    }
    await pipeline.stop();

    expect(pipeline.stats.received).toBe(10);
    expect(pipeline.stats.dropped).toBe(7);
    expect(pipeline.stats.decided).toBe(3);
    expect(actuator.messages.map((message) => message.frameId).sort()).toEqual(["burst-0", "burst-8", "burst-9"]);
    expect(auditedIds(store)).toEqual(new Set(["burst-0", "burst-8", "burst-9"]));
  });

  it("drains accepted frames on stop", async () => {
    const pipeline = start({ maxBatch: 2 });
    const frames = photos.map((photo, index) => makeFrame(`drain-${index}`, photo.data, photo.label));

    for (const frame of frames) {
      pipeline.submit(frame);
    }
    await pipeline.stop();
    pipeline.submit(makeFrame("after-stop", photos[0]!.data));

    expect(pipeline.stats.decided).toBe(frames.length);
    expect(pipeline.stats.received).toBe(frames.length);
    expect(pipeline.depth).toBe(0);
    expect(actuator.messages.map((message) => message.frameId).sort()).toEqual(frames.map((frame) => frame.id).sort());
    expect(auditedIds(store)).toEqual(new Set(frames.map((frame) => frame.id)));
  });
});

describe("Pipeline while audit writes fail", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let store: AuditStore;
  let actuator: RecordingActuator;
  const start = (overrides: Partial<PipelineOptions> = {}): Pipeline => startPipeline(store, actuator, { maxBatch: 2, ...overrides });

  function submitPhotos(pipeline: Pipeline, prefix: string, count: number): string[] {
    const ids: string[] = [];
    for (let index = 0; index < count; index++) {
      const photo = photos[index % photos.length]!;
      const id = `${prefix}-${index}`;
      pipeline.submit(makeFrame(id, photo.data, photo.label));
      ids.push(id);
    }
    return ids;
  }

  beforeEach(() => {
    temp = makeTempDir("pipeline-full");
    // SQLite never sets the cap below the current size, so 1 byte caps the file at its size after migration.
    store = AuditStore.open(path.join(temp.dir, "audit.db"), { maxDatabaseBytes: 1 });
    fillUntilFull(store);
    actuator = new RecordingActuator(store);
  });

  afterEach(async () => {
    await Promise.all(pipelines.splice(0).map((pipeline) => pipeline.stop()));
    store.close();
    temp.remove();
  });

  it("keeps sending and holds the records", async () => {
    const pipeline = start();

    const held = submitPhotos(pipeline, "held", 4);
    await actuator.waitForMessages(held.length);

    expect(actuator.messages.map((message) => message.frameId).sort()).toEqual([...held].sort());
    expect(pipeline.stats.auditFailures).toBeGreaterThan(0);
    expect(pipeline.stats.auditDropped).toBe(0);
    expect(pipeline.pendingAuditCount).toBe(held.length);
    const audited = auditedIds(store);
    for (const id of held) {
      expect(audited.has(id)).toBe(false);
    }
  });

  it("writes held records with the next batch", async () => {
    const pipeline = start();
    const held = submitPhotos(pipeline, "held", 4);
    await actuator.waitForMessages(held.length);

    store.setMaxDatabaseBytes(64 * 1024 * 1024);
    const next = submitPhotos(pipeline, "next", 1);
    await actuator.waitForMessages(held.length + next.length);

    expect(pipeline.pendingAuditCount).toBe(0);
    const audited = auditedIds(store);
    for (const id of [...held, ...next]) {
      expect(audited.has(id)).toBe(true);
    }
    // Only the frames decided while the database was full reached the actuator before the audit.
    expect([...actuator.missingFromAudit].sort()).toEqual([...held].sort());
  });

  it("writes held records on stop", async () => {
    const pipeline = start();
    const held = submitPhotos(pipeline, "held", 2);
    await actuator.waitForMessages(held.length);
    expect(pipeline.pendingAuditCount).toBe(held.length);

    store.setMaxDatabaseBytes(64 * 1024 * 1024);
    await pipeline.stop();

    expect(pipeline.pendingAuditCount).toBe(0);
    const audited = auditedIds(store);
    for (const id of held) {
      expect(audited.has(id)).toBe(true);
    }
  });

  it("drops the oldest held records past the limit", async () => {
    const pipeline = start({ maxBatch: 1, decodeConcurrency: 1, maxPendingAudit: 2 });
    const held = submitPhotos(pipeline, "held", 3);
    await actuator.waitForMessages(held.length);

    expect(pipeline.stats.auditDropped).toBe(1);
    expect(pipeline.pendingAuditCount).toBe(2);

    store.setMaxDatabaseBytes(64 * 1024 * 1024);
    await pipeline.stop();

    const audited = auditedIds(store);
    expect(audited.has(held[0]!)).toBe(false);
    expect(audited.has(held[1]!)).toBe(true);
    expect(audited.has(held[2]!)).toBe(true);
  });
});

/** Records every batch the pipeline reports, with what the audit and actuator had at that moment. */
class RecordingObserver implements PipelineObserver {
  readonly batches: ScoredFrame[][] = [];
  /** Per batch: frame ids that the actuator or the audit lacked when onScored ran. */
  readonly notYetSent: string[] = [];
  readonly notYetAudited: string[] = [];

  constructor(
    private readonly store: AuditStore,
    private readonly actuator: RecordingActuator,
  ) {}

  get entries(): ScoredFrame[] {
    return this.batches.flat();
  }

  onScored(entries: readonly ScoredFrame[]): void {
    const sent = new Set(this.actuator.messages.map((message) => message.frameId));
    const audited = auditedIds(this.store);
    for (const entry of entries) {
      if (!sent.has(entry.frame.id)) {
        this.notYetSent.push(entry.frame.id);
      }
      if (!audited.has(entry.frame.id)) {
        this.notYetAudited.push(entry.frame.id);
      }
    }
    this.batches.push([...entries]);
  }
}

/**
 * Writes a model package to `dir` that runs the default model's file under another version and
 * resize short side, so that tests can distinguish the decisions and inputs of the two packages.
 */
function writeSecondPackage(dir: string): void {
  const source = path.join(root, "models", "default");
  const manifest = JSON.parse(readFileSync(path.join(source, "manifest.json"), "utf8")) as ModelManifest;
  manifest.version = "1.0.1-swap";
  // The demo photos have a short side of 256 px already, so the default package does not resize them.
  manifest.preprocess.resize.shortSide = 288;
  writeFileSync(path.join(dir, "manifest.json"), JSON.stringify(manifest));
  symlinkSync(path.join(source, manifest.file.name), path.join(dir, manifest.file.name));
}

describe("Pipeline observer, model swap and pause", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let store: AuditStore;
  let actuator: RecordingActuator;
  const start = (overrides: Partial<PipelineOptions> = {}): Pipeline => startPipeline(store, actuator, overrides);

  beforeEach(() => {
    temp = makeTempDir("pipeline-observer");
    store = AuditStore.open(path.join(temp.dir, "audit.db"));
    actuator = new RecordingActuator(store);
  });

  afterEach(async () => {
    await Promise.all(pipelines.splice(0).map((pipeline) => pipeline.stop()));
    store.close();
    temp.remove();
  });

  it("reports scored frames after audit and actuation", async () => {
    const observer = new RecordingObserver(store, actuator);
    const pipeline = start({ maxBatch: 2, observer });
    const frames = photos.map((photo, index) => makeFrame(`observed-${index}`, photo.data, photo.label));
    const corrupt = makeFrame("observed-corrupt", randomBytes(256));

    for (const frame of [...frames, corrupt]) {
      pipeline.submit(frame);
    }
    await pipeline.stop();

    const entries = new Map(observer.entries.map((entry) => [entry.frame.id, entry]));
    expect([...entries.keys()].sort()).toEqual(frames.map((frame) => frame.id).sort());
    expect(observer.notYetSent).toEqual([]);
    expect(observer.notYetAudited).toEqual([]);
    const [, height, width] = runner.manifest.input.shape;
    for (const frame of frames) {
      const entry = entries.get(frame.id)!;
      expect(entry.frame.data).toBe(frame.data);
      expect(entry.pixels).toHaveLength(height * width * 3);
      expect(entry.probabilities).toHaveLength(runner.manifest.labels.length);
      expect(entry.embedding).toHaveLength(2048);
      expect(entry.labels).toEqual(runner.manifest.labels);
      expect(entry.model).toEqual({ name: runner.manifest.name, version: runner.manifest.version, sha256: runner.manifest.file.sha256 });
      expect(entry.record.frameId).toBe(frame.id);
      expect(entry.record.label).toBe(entry.labels[entry.probabilities.indexOf(Math.max(...entry.probabilities))]);
    }
  });

  it("keeps deciding when the observer fails", async () => {
    let calls = 0;
    const observer: PipelineObserver = {
      onScored: () => {
        calls++;
        if (calls % 2 === 1) {
          throw new Error("observer broke");
        }
        return Promise.reject(new Error("observer rejected"));
      },
    };
    const pipeline = start({ maxBatch: 1, decodeConcurrency: 1, observer });
    const frames = photos.slice(0, 4).map((photo, index) => makeFrame(`failing-observer-${index}`, photo.data, photo.label));

    for (const frame of frames) {
      pipeline.submit(frame);
    }
    await pipeline.stop();
    await new Promise((resolve) => setImmediate(resolve));

    expect(actuator.messages).toHaveLength(frames.length);
    expect(auditedIds(store)).toEqual(new Set(frames.map((frame) => frame.id)));
    expect(calls).toBe(frames.length);
    expect(pipeline.stats.observerErrors).toBe(frames.length);
  });

  it("reports batches whose inference failed, without the frames that failed to decode", async () => {
    const failing = Object.assign(Object.create(Object.getPrototypeOf(runner) as object) as ModelRunner, runner, {
      run: async () => {
        throw new Error("device lost");
      },
    });
    const failures: number[] = [];
    const observer: PipelineObserver = { onScored: () => undefined, onInferenceFailed: (frames) => failures.push(frames) };
    const pipeline = start({ runner: failing, maxBatch: 8, observer });

    for (const [index, photo] of photos.slice(0, 3).entries()) {
      pipeline.submit(makeFrame(`failed-inference-${index}`, photo.data, photo.label));
    }
    pipeline.submit(makeFrame("failed-inference-corrupt", randomBytes(256)));
    await pipeline.stop();

    expect(failures.reduce((sum, n) => sum + n, 0)).toBe(3);
    expect(actuator.messages.every((message) => message.bin === policy.rejectBinName)).toBe(true);
  });

  it("drops frames while paused", async () => {
    const pipeline = start({ maxBatch: 2 });

    pipeline.pause();
    expect(pipeline.paused).toBe(true);
    for (const [index, photo] of photos.slice(0, 3).entries()) {
      pipeline.submit(makeFrame(`paused-${index}`, photo.data, photo.label));
    }
    expect(pipeline.depth).toBe(0);
    pipeline.resume();
    expect(pipeline.paused).toBe(false);
    pipeline.submit(makeFrame("resumed", photos[3]!.data, photos[3]!.label));
    await pipeline.stop();

    expect(pipeline.stats.received).toBe(4);
    expect(pipeline.stats.pausedDrops).toBe(3);
    expect(pipeline.stats.dropped).toBe(3);
    expect(pipeline.stats.decided).toBe(1);
    expect(actuator.messages.map((message) => message.frameId)).toEqual(["resumed"]);
  });

  it("decides frames accepted before pause", async () => {
    const pipeline = start({ maxBatch: 2 });
    const frames = photos.slice(0, 3).map((photo, index) => makeFrame(`before-pause-${index}`, photo.data, photo.label));

    for (const frame of frames) {
      pipeline.submit(frame);
    }
    pipeline.pause();
    await actuator.waitForMessages(frames.length);

    expect(pipeline.stats.pausedDrops).toBe(0);
    expect(actuator.messages.map((message) => message.frameId).sort()).toEqual(frames.map((frame) => frame.id).sort());
  });

  describe("swapModel", () => {
    let second: ModelRunner;
    let secondPolicy: DecisionPolicy;
    const SECOND_BINS: Record<string, string> = Object.fromEntries(Object.keys(BINS).map((label) => [label, `b-${label}`]));

    beforeAll(async () => {
      const dir = path.join(makeTempDir("second-model").dir);
      writeSecondPackage(dir);
      second = await ModelRunner.load(dir);
      const settings: DecisionSettings = { bins: SECOND_BINS, rejectBin: "reject-b", minConfidence: {}, defaultMinConfidence: 0, topK: 3 };
      secondPolicy = new DecisionPolicy(settings, second.manifest.labels);
    });

    afterAll(async () => {
      await second?.release();
      rmSync(path.dirname(second.pkg.modelPath), { recursive: true, force: true });
    });

    it("switches between batches without mixing", async () => {
      const observer = new RecordingObserver(store, actuator);
      const pipeline = start({ maxBatch: 2, decodeConcurrency: 1, observer });
      let swapped: Promise<ModelRunner> | undefined;
      const original = actuator.send.bind(actuator);
      actuator.send = (messages) => {
        original(messages);
        // The swap happens while the first batch is being sent, so later batches use the new model.
        swapped ??= pipeline.swapModel(second, secondPolicy);
      };
      const frames = photos.map((photo, index) => makeFrame(`swap-${index}`, photo.data, photo.label));

      for (const frame of frames) {
        pipeline.submit(frame);
      }
      await pipeline.stop();

      expect(await swapped).toBe(runner);
      expect(pipeline.runner).toBe(second);
      const versions = actuator.batches.map((batch) => new Set(batch.map((message) => message.model.version)));
      for (const batch of versions) {
        expect(batch.size).toBe(1);
      }
      expect([...versions[0]!]).toEqual([runner.manifest.version]);
      for (const batch of versions.slice(1)) {
        expect([...batch]).toEqual([second.manifest.version]);
      }
      for (const message of actuator.batches.slice(1).flat()) {
        expect(message.bin).toBe(SECOND_BINS[message.label!]);
      }
      const rows = new Map(store.query({ limit: MAX_QUERY_LIMIT }).map((row) => [row.frameId, row]));
      for (const message of actuator.messages) {
        expect(rows.get(message.frameId)!.modelVersion).toBe(message.model.version);
      }
      for (const batch of observer.batches) {
        expect(new Set(batch.map((entry) => entry.model.version)).size).toBe(1);
      }
    });

    it("decodes again for the new preprocessing", async () => {
      const observer = new RecordingObserver(store, actuator);
      const pipeline = start({ maxBatch: 8, observer });
      const frames = photos.slice(0, 2).map((photo, index) => makeFrame(`redecode-${index}`, photo.data, photo.label));

      // Decoding starts inside submit() with the first model's preprocessing; inference runs after the swap.
      for (const frame of frames) {
        pipeline.submit(frame);
      }
      const swapped = pipeline.swapModel(second, secondPolicy);
      await pipeline.stop();
      await swapped;

      for (const entry of observer.entries) {
        const before = await prepareImage(entry.frame.data, runner.manifest.preprocess);
        const after = await prepareImage(entry.frame.data, second.manifest.preprocess);
        expect(before.pixels.equals(after.pixels)).toBe(false);
        expect(entry.model.version).toBe(second.manifest.version);
        expect(entry.pixels.equals(after.pixels)).toBe(true);
      }
      expect(observer.entries).toHaveLength(frames.length);
    });
  });
});
