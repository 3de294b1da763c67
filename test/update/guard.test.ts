import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { CrashLoopGuard, RegressionMonitor } from "../../src/update/guard.js";
import type { ObservedBatch } from "../../src/update/observe.js";
import { makeTempDir } from "../audit/helpers.js";

const MODEL = { name: "m", version: "2.0.0", sha256: "b".repeat(64) };

function batch(frames: number, inferenceMs: number, errors = 0, model = MODEL): ObservedBatch {
  return { pixels: Array.from({ length: frames }, () => Buffer.alloc(3)), labels: Array.from({ length: frames }, () => "glass"), inferenceMs, errors, model };
}

describe("CrashLoopGuard", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let clock: number;
  const now = (): number => clock;

  beforeEach(() => {
    temp = makeTempDir("guard");
    clock = Date.UTC(2024, 4, 1);
  });

  afterEach(() => {
    temp.remove();
  });

  const open = (): Promise<CrashLoopGuard> => CrashLoopGuard.open(temp.dir, { maxStarts: 3, windowMs: 60_000, now });

  it("asks for a rollback after K unhealthy starts", async () => {
    const guard = await open();
    expect(await guard.recordStart("a")).toBe(1);
    expect(guard.shouldRollBack("a")).toBe(false);
    clock += 1_000;
    await guard.recordStart("a");
    expect(guard.shouldRollBack("a")).toBe(false);
    clock += 1_000;
    expect(await guard.recordStart("a")).toBe(3);
    expect(guard.shouldRollBack("a")).toBe(true);
    expect(guard.shouldRollBack("b")).toBe(false);
  });

  it("persists starts across processes", async () => {
    for (let start = 0; start < 3; start += 1) {
      const guard = await open();
      await guard.recordStart("a");
      clock += 500;
    }
    const guard = await open();
    expect(guard.shouldRollBack("a")).toBe(true);
    const file = JSON.parse(readFileSync(path.join(temp.dir, "models", "boots.json"), "utf8")) as { v: number; models: Record<string, { starts: number[] }> };
    expect(file.v).toBe(1);
    expect(file.models.a?.starts).toHaveLength(3);
    expect(readdirSync(path.join(temp.dir, "models"))).toEqual(["boots.json"]);
  });

  it("forgets starts outside the window", async () => {
    const guard = await open();
    await guard.recordStart("a");
    await guard.recordStart("a");
    clock += 61_000;
    await guard.recordStart("a");
    expect(guard.startsWithinWindow("a")).toBe(1);
    expect(guard.shouldRollBack("a")).toBe(false);
  });

  it("clears starts when marked healthy", async () => {
    const guard = await open();
    await guard.recordStart("a");
    await guard.recordStart("a");
    await guard.markHealthy("a");
    await guard.recordStart("a");
    await guard.recordStart("a");
    expect(guard.shouldRollBack("a")).toBe(false);
    expect((await open()).startsWithinWindow("a")).toBe(2);
  });

  it("treats an invalid boots.json as empty", async () => {
    const guard = await open();
    await guard.recordStart("a");
    writeFileSync(path.join(temp.dir, "models", "boots.json"), "{\"v\":");
    const reopened = await open();
    expect(reopened.startsWithinWindow("a")).toBe(0);
    expect(await reopened.recordStart("a")).toBe(1);
  });

  it("keeps records of at most 16 models", async () => {
    const guard = await open();
    for (let index = 0; index < 20; index += 1) {
      clock += 10;
      await guard.recordStart(`model-${index}`);
    }
    const file = JSON.parse(readFileSync(path.join(temp.dir, "models", "boots.json"), "utf8")) as { models: Record<string, unknown> };
    expect(Object.keys(file.models)).toHaveLength(16);
    expect(file.models["model-19"]).toBeDefined();
    expect(file.models["model-0"]).toBeUndefined();
  });
});

describe("RegressionMonitor", () => {
  const baseline = { frames: 100, errorRate: 0.01, p95LatencyMs: 50 };
  const settings = { baseline, windowFrames: 100, maxErrorRateIncrease: 0.02, maxLatencyFactor: 2, model: MODEL };

  it("passes a model within limits", async () => {
    const monitor = new RegressionMonitor(settings);
    for (let index = 0; index < 25; index += 1) {
      monitor.onBatch(batch(4, 60, index === 0 ? 2 : 0));
    }
    const verdict = await monitor.done;
    expect(verdict.rollBack).toBe(false);
    expect(verdict.figures).toEqual({ frames: 100, errorRate: 0.02, p95LatencyMs: 60 });
    expect(verdict.reason).toMatch(/within limits/);
  });

  it("rolls back on a high error rate", async () => {
    const monitor = new RegressionMonitor(settings);
    for (let index = 0; index < 3; index += 1) {
      monitor.onBatch(batch(4, 40, 1));
    }
    expect(monitor.verdict).toBeUndefined();
    monitor.onBatch(batch(4, 40, 1));
    const verdict = await monitor.done;
    expect(verdict.rollBack).toBe(true);
    expect(verdict.figures.frames).toBe(16);
    expect(verdict.reason).toMatch(/error rate 25\.0% over 16 frames exceeds the limit 3\.0%/);
  });

  it("rolls back on slow p95 latency", async () => {
    const monitor = new RegressionMonitor(settings);
    for (let index = 0; index < 50; index += 1) {
      monitor.onBatch(batch(2, index % 10 === 0 ? 500 : 120));
    }
    const verdict = await monitor.done;
    expect(verdict.rollBack).toBe(true);
    expect(verdict.reason).toMatch(/p95 inference latency 500\.0 ms exceeds 2 x the previous model's 50\.0 ms/);
  });

  it("ignores batches of other models", async () => {
    const monitor = new RegressionMonitor(settings);
    monitor.onBatch(batch(200, 40, 200, { ...MODEL, version: "1.0.0" }));
    monitor.onBatch({ ...batch(200, 40, 200), model: undefined });
    expect(monitor.verdict).toBeUndefined();
    expect(monitor.figures().frames).toBe(0);
  });

  it("rejects an empty window", () => {
    expect(() => new RegressionMonitor({ ...settings, windowFrames: 0 })).toThrow(RangeError);
  });
});
