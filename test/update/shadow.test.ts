import { describe, expect, it } from "vitest";

import type { BatchResult } from "../../src/inference/runner.js";
import type { ModelManifest } from "../../src/models/manifest.js";
import type { ObservedBatch } from "../../src/update/observe.js";
import { ShadowRun, type ShadowCandidate } from "../../src/update/shadow.js";
import { readDefaultManifest } from "./helpers.js";

const FRAME_BYTES = 224 * 224 * 3;

/**
 * A candidate whose each run waits until the test settles it, and returns one-hot scores for
 * the label index stored in the first byte of each frame.
 */
class ManualCandidate implements ShadowCandidate {
  readonly manifest: Pick<ModelManifest, "labels" | "input">;
  readonly pending: Array<{ settle: (error?: Error) => void }> = [];

  constructor(labels: string[]) {
    this.manifest = { labels, input: readDefaultManifest().input };
  }

  run(images: readonly Buffer[]): Promise<BatchResult> {
    return new Promise((resolve, reject) => {
      this.pending.push({
        settle: (error) => {
          if (error) {
            reject(error);
            return;
          }
          const probabilities = images.map((image) => {
            const scores = new Float32Array(this.manifest.labels.length);
            scores[image[0]!] = 1;
            return scores;
          });
          resolve({ probabilities, embeddings: images.map(() => new Float32Array(4)) });
        },
      });
    });
  }

  /** Settles the oldest pending run and waits for the shadow run to record it. */
  async settleNext(error?: Error): Promise<void> {
    this.pending.shift()!.settle(error);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** Builds a batch whose frames make the candidate return the labels at `candidateIndexes`, with the active model's labels. */
function batch(candidateIndexes: number[], activeLabels: string[], inferenceMs = 10): ObservedBatch {
  return {
    pixels: candidateIndexes.map((index) => Buffer.alloc(FRAME_BYTES, index)),
    labels: activeLabels,
    inferenceMs,
  };
}

const ACTIVE_LABELS = ["glass", "metal", "paper"];

describe("ShadowRun", () => {
  it("reports agreement overall and over shared labels", async () => {
    // The candidate has the labels glass, metal and a new class, hdpe, but not paper.
    const candidate = new ManualCandidate(["glass", "metal", "hdpe"]);
    const run = new ShadowRun(candidate, { frames: 6, activeLabels: ACTIVE_LABELS });

    run.onBatch(batch([0, 1, 2], ["glass", "glass", "paper"], 20));
    await candidate.settleNext();
    run.onBatch(batch([0, 2, 1], ["glass", "paper", "metal"], 30));
    await candidate.settleNext();

    const report = await run.done;
    expect(report.complete).toBe(true);
    expect(report.frames).toBe(6);
    expect(report.batches).toBe(2);
    expect(report.errors).toBe(0);
    // glass=glass, metal!=glass, hdpe!=paper, glass=glass, hdpe!=paper, metal=metal.
    expect(report.agreement.overall).toEqual({ compared: 6, agreed: 3, rate: 0.5 });
    // Frames where either label is hdpe or paper do not count: 4 compared, 3 agreed.
    expect(report.agreement.sharedLabels).toEqual({ compared: 4, agreed: 3, rate: 0.75 });
    expect(report.latency.active).toEqual({ count: 2, p50: 20, p95: 30 });
    expect(report.latency.candidate.count).toBe(2);
    expect(report.latency.p95Ratio).toBeCloseTo(report.latency.candidate.p95 / 30);
  });

  it("skips batches while the candidate is busy", async () => {
    const candidate = new ManualCandidate(ACTIVE_LABELS);
    const run = new ShadowRun(candidate, { frames: 2, activeLabels: ACTIVE_LABELS });
    run.onBatch(batch([0], ["glass"]));
    run.onBatch(batch([1], ["metal"]));
    run.onBatch(batch([1], ["metal"]));
    expect(candidate.pending).toHaveLength(1);
    expect(run.report().skippedBusy).toBe(2);

    await candidate.settleNext();
    run.onBatch(batch([2], ["paper"]));
    await candidate.settleNext();
    const report = await run.done;
    expect(report.frames).toBe(2);
    expect(report.skippedBusy).toBe(2);
    expect(report.agreement.overall.rate).toBe(1);
  });

  it("counts candidate errors per frame", async () => {
    const candidate = new ManualCandidate(ACTIVE_LABELS);
    const run = new ShadowRun(candidate, { frames: 4, activeLabels: ACTIVE_LABELS });
    run.onBatch(batch([0, 0], ["glass", "glass"]));
    await candidate.settleNext(new Error("candidate failed"));
    run.onBatch({ ...batch([0, 0], ["glass", "glass"]), errors: 1 });
    await candidate.settleNext();
    const report = await run.done;
    expect(report.errors).toBe(2);
    expect(report.errorMessages).toEqual(["candidate failed"]);
    expect(report.activeErrors).toBe(1);
    expect(report.agreement.overall.compared).toBe(2);
  });

  it("skips frames of another input size", async () => {
    const candidate = new ManualCandidate(ACTIVE_LABELS);
    const run = new ShadowRun(candidate, { frames: 1, activeLabels: ACTIVE_LABELS });
    run.onBatch({ pixels: [Buffer.alloc(100)], labels: ["glass"], inferenceMs: 5 });
    expect(candidate.pending).toHaveLength(0);
    expect(run.report().skippedIncompatible).toBe(1);
  });

  it("resolves an incomplete report on cancel", async () => {
    const candidate = new ManualCandidate(ACTIVE_LABELS);
    const run = new ShadowRun(candidate, { frames: 10, activeLabels: ACTIVE_LABELS });
    run.onBatch(batch([0], ["glass"]));
    await candidate.settleNext();
    run.cancel();
    const report = await run.done;
    expect(report.complete).toBe(false);
    expect(report.frames).toBe(1);
    run.onBatch(batch([0], ["glass"]));
    expect(candidate.pending).toHaveLength(0);
  });

  it("rejects a frame count below 1", () => {
    expect(() => new ShadowRun(new ManualCandidate(ACTIVE_LABELS), { frames: 0, activeLabels: ACTIVE_LABELS })).toThrow(RangeError);
  });
});
