import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";

import { CameraExitError, ProcessSource } from "../../src/capture/process.js";
import type { Frame, FrameHandler, FrameSource } from "../../src/capture/types.js";
import { backoffDelay, CameraWatchdog, DEFAULT_BACKOFF, type CameraWatchdogOptions, type RestartEvent } from "../../src/capture/watchdog.js";
import { CameraError, ConfigError } from "../../src/lib/errors.js";
import { makeTempDir, memoryLogger, trashnetSamples, writeStandIns, type SampleImage, type StandIns } from "./helpers.js";

/**
 * A source driven by the test: `emit` delivers a frame, `fail` reports an error, and
 * `failStarts` makes the next starts reject.
 */
class ScriptedSource implements FrameSource {
  readonly name = "scripted";
  starts = 0;
  stops = 0;
  failStarts = 0;
  private sequence = 0;
  private handler: FrameHandler | undefined;
  private errorHandler: ((error: Error) => void) | undefined;
  /** Handlers of every successful start, oldest first, to replay late callbacks. */
  readonly runs: Array<{ onFrame: FrameHandler; onError: (error: Error) => void }> = [];

  async start(onFrame: FrameHandler, onError: (error: Error) => void): Promise<void> {
    this.starts += 1;
    if (this.failStarts > 0) {
      this.failStarts -= 1;
      throw new CameraError("camera not found");
    }
    this.handler = onFrame;
    this.errorHandler = onError;
    this.runs.push({ onFrame, onError });
  }

  async stop(): Promise<void> {
    this.stops += 1;
    this.handler = undefined;
    this.errorHandler = undefined;
  }

  get running(): boolean {
    return this.handler !== undefined;
  }

  emit(): void {
    this.sequence += 1;
    this.handler?.(frameOf(this.sequence));
  }

  fail(error: Error): void {
    this.errorHandler?.(error);
  }
}

function frameOf(sequence: number): Frame {
  return { id: `scripted-${sequence}`, source: "scripted", sequence, data: Buffer.alloc(0), capturedAt: Date.now() };
}

/** Backoff without jitter: 100, 200, 400, 800, 1000, 1000 … ms. */
const backoff = { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0 };

function watch(source: FrameSource, options: CameraWatchdogOptions = {}): { watchdog: CameraWatchdog; events: RestartEvent[]; frames: Frame[] } {
  const events: RestartEvent[] = [];
  const frames: Frame[] = [];
  const watchdog = new CameraWatchdog(source, { stallSeconds: 1, backoff, onRestart: (event) => events.push(event), ...options });
  return { watchdog, events, frames };
}

describe("backoffDelay", () => {
  it("grows by factor up to the cap", () => {
    const delays = [0, 1, 2, 3, 4, 5, 100, 5000].map((attempt) => backoffDelay(attempt, backoff));

    expect(delays).toEqual([100, 200, 400, 800, 1000, 1000, 1000, 1000]);
  });

  it("applies jitter on both sides", () => {
    const options = { ...backoff, jitter: 0.2 };

    expect(backoffDelay(1, options, () => 0)).toBe(160);
    expect(backoffDelay(1, options, () => 0.5)).toBe(200);
    expect(backoffDelay(1, options, () => 0.999999)).toBe(240);
    expect(backoffDelay(9, options, () => 0.999999)).toBe(1200);
  });

  it("stays zero for a zero initial delay", () => {
    expect(backoffDelay(5000, { ...DEFAULT_BACKOFF, initialMs: 0 })).toBe(0);
  });
});

describe("CameraWatchdog with fake timers", () => {
  beforeAll(() => {
    vi.useFakeTimers();
  });

  afterAll(() => {
    vi.useRealTimers();
  });

  it("passes frames through", async () => {
    const source = new ScriptedSource();
    const { watchdog, frames } = watch(source);

    await watchdog.start((frame) => frames.push(frame));
    source.emit();
    source.emit();

    expect(frames.map((frame) => frame.id)).toEqual(["scripted-1", "scripted-2"]);
    expect(watchdog.stats.frames).toBe(2);
    expect(watchdog.stats.lastFrameAt).toBe(Date.now());
    await watchdog.stop();
  });

  it("restarts a stalled source after the backoff", async () => {
    const source = new ScriptedSource();
    const { watchdog, events } = watch(source);
    await watchdog.start(() => {});
    source.emit();

    await vi.advanceTimersByTimeAsync(999);
    expect(watchdog.stats.stalls).toBe(0);
    await vi.advanceTimersByTimeAsync(1);

    expect(watchdog.stats.stalls).toBe(1);
    expect(events).toEqual([{ reason: "stall", attempt: 1, delayMs: 100 }]);
    expect(source.stops).toBe(1);
    expect(source.starts).toBe(1);
    await vi.advanceTimersByTimeAsync(100);
    expect(source.starts).toBe(2);
    await watchdog.stop();
  });

  it("does not restart while frames flow", async () => {
    const source = new ScriptedSource();
    const { watchdog } = watch(source);
    await watchdog.start(() => {});

    for (let i = 0; i < 20; i += 1) {
      source.emit();
      await vi.advanceTimersByTimeAsync(500);
    }

    expect(watchdog.stats.stalls).toBe(0);
    expect(watchdog.stats.restarts).toBe(0);
    await watchdog.stop();
  });

  it("backs off exponentially while frames stay away", async () => {
    const source = new ScriptedSource();
    const { watchdog, events } = watch(source);
    await watchdog.start(() => {});

    // Each cycle: 1 s stall, then the backoff delay before the next start.
    await vi.advanceTimersByTimeAsync(1000 + 100 + 1000 + 200 + 1000 + 400 + 1000 + 800 + 1000 + 1000 + 1000);

    expect(events.map((event) => event.delayMs)).toEqual([100, 200, 400, 800, 1000, 1000]);
    expect(events.map((event) => event.attempt)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(watchdog.stats.attempt).toBe(6);
    await watchdog.stop();
  });

  it("resets the backoff once frames flow again", async () => {
    const source = new ScriptedSource();
    const { watchdog, events } = watch(source);
    await watchdog.start(() => {});
    await vi.advanceTimersByTimeAsync(1000 + 100 + 1000 + 200);
    expect(watchdog.stats.attempt).toBe(2);

    source.emit();
    expect(watchdog.stats.attempt).toBe(0);
    await vi.advanceTimersByTimeAsync(1000);

    expect(events.map((event) => event.delayMs)).toEqual([100, 200, 100]);
    await watchdog.stop();
  });

  it("restarts a source that reports an error", async () => {
    const source = new ScriptedSource();
    const { logger, records } = memoryLogger();
    const { watchdog, events } = watch(source, { logger });
    await watchdog.start(() => {});
    const exit = new CameraExitError("rpicam-vid", 1, null, "no cameras available");

    source.fail(exit);

    expect(events).toEqual([{ reason: "error", attempt: 1, delayMs: 100, error: exit }]);
    expect(watchdog.stats.failures).toBe(1);
    const warning = records.find((record) => record.msg === "restarting camera source");
    expect(warning).toMatchObject({ level: "warn", source: "scripted", reason: "error", attempt: 1, delayMs: 100 });
    await vi.advanceTimersByTimeAsync(100);
    expect(source.starts).toBe(2);
    expect(source.running).toBe(true);
    await watchdog.stop();
  });

  it("retries a failed start", async () => {
    const source = new ScriptedSource();
    source.failStarts = 2;
    const { watchdog, events, frames } = watch(source);

    await watchdog.start((frame) => frames.push(frame));
    await vi.advanceTimersByTimeAsync(100 + 200);
    source.emit();

    expect(events.map((event) => event.reason)).toEqual(["start-failed", "start-failed"]);
    expect(source.starts).toBe(3);
    expect(watchdog.stats.failures).toBe(2);
    expect(frames).toHaveLength(1);
    await watchdog.stop();
  });

  it("ignores late callbacks of a replaced run", async () => {
    const source = new ScriptedSource();
    const { watchdog, events, frames } = watch(source);
    await watchdog.start((frame) => frames.push(frame));
    source.fail(new CameraError("lost"));
    await vi.advanceTimersByTimeAsync(100);

    source.runs[0]!.onFrame(frameOf(99));
    source.runs[0]!.onError(new CameraError("late"));

    expect(frames).toEqual([]);
    expect(events).toHaveLength(1);
    await watchdog.stop();
  });

  it("counts one restart for an error during the backoff", async () => {
    const source = new ScriptedSource();
    const { watchdog, events } = watch(source);
    await watchdog.start(() => {});

    source.fail(new CameraError("first"));
    source.runs[0]!.onError(new CameraError("second"));
    await vi.advanceTimersByTimeAsync(1000);

    expect(events).toHaveLength(1);
    expect(watchdog.stats.restarts).toBe(1);
    await watchdog.stop();
  });

  it("cancels a pending restart on stop", async () => {
    const source = new ScriptedSource();
    const { watchdog } = watch(source);
    await watchdog.start(() => {});
    source.fail(new CameraError("lost"));

    await watchdog.stop();
    await vi.advanceTimersByTimeAsync(10_000);

    expect(source.starts).toBe(1);
    expect(source.running).toBe(false);
  });

  it("keeps running when onRestart throws", async () => {
    const source = new ScriptedSource();
    const { watchdog } = watch(source, {
      onRestart: () => {
        throw new Error("metrics failed");
      },
    });
    await watchdog.start(() => {});

    source.fail(new CameraError("lost"));
    await vi.advanceTimersByTimeAsync(100);

    expect(source.starts).toBe(2);
    await watchdog.stop();
  });

  it("rejects invalid options", () => {
    const source = new ScriptedSource();

    expect(() => new CameraWatchdog(source, { stallSeconds: 0 })).toThrow(ConfigError);
    expect(() => new CameraWatchdog(source, { backoff: { initialMs: 500, maxMs: 100 } })).toThrow(/^backoff\.maxMs:/);
    expect(() => new CameraWatchdog(source, { backoff: { factor: 0.5 } })).toThrow(/^backoff\.factor:/);
    expect(() => new CameraWatchdog(source, { backoff: { jitter: 2 } })).toThrow(/^backoff\.jitter:/);
  });
});

describe("CameraWatchdog with stand-in cameras", () => {
  let photos: SampleImage[] = [];
  let standIns: StandIns;
  let removeTemp: () => Promise<void> = async () => {};
  const watchdogs: CameraWatchdog[] = [];

  beforeAll(async () => {
    photos = await trashnetSamples(["cardboard", "glass"], 2);
    const temp = await makeTempDir("watchdog");
    removeTemp = temp.remove;
    standIns = await writeStandIns(temp.dir, photos);
  });

  afterEach(async () => {
    await Promise.all(watchdogs.splice(0).map((watchdog) => watchdog.stop()));
  });

  afterAll(async () => {
    await removeTemp();
  });

  async function watchStandIn(mode: string): Promise<{ source: ProcessSource; watchdog: CameraWatchdog; events: RestartEvent[]; frames: Frame[] }> {
    const state = await standIns.stateDir();
    const source = new ProcessSource({ name: mode, command: standIns.camera, args: [mode, state, ...standIns.frames], stopTimeoutMs: 1000 });
    const { watchdog, events, frames } = watch(source, { stallSeconds: 0.5, backoff: { initialMs: 50, maxMs: 200, factor: 2, jitter: 0.1 } });
    watchdogs.push(watchdog);
    await watchdog.start((frame) => frames.push(frame));
    return { source, watchdog, events, frames };
  }

  /** Checks that frames arrived from a second run of the camera and match the photos. */
  function expectFramesFromRestart(source: ProcessSource, frames: readonly Frame[]): void {
    expect(source.stats.starts).toBeGreaterThanOrEqual(2);
    const photoBytes = photos.map((photo) => photo.data);
    for (const frame of frames) {
      expect(photoBytes.some((bytes) => bytes.equals(frame.data))).toBe(true);
    }
  }

  const waitOptions = { timeout: 15_000, interval: 20 };

  it("restarts a camera that stalls", async () => {
    const { source, watchdog, events, frames } = await watchStandIn("stall");
    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(photos.length), waitOptions);
    const beforeStall = frames.length;

    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(beforeStall + photos.length), waitOptions);

    expect(events[0]?.reason).toBe("stall");
    expect(watchdog.stats.stalls).toBeGreaterThanOrEqual(1);
    expect(watchdog.stats.attempt).toBe(0);
    expectFramesFromRestart(source, frames);
  });

  it("restarts a camera that exits", async () => {
    const { source, watchdog, events, frames } = await watchStandIn("die");

    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(2 * photos.length + 1), waitOptions);

    const error = events[0]?.error as CameraExitError;
    expect(events[0]?.reason).toBe("error");
    expect(error).toBeInstanceOf(CameraExitError);
    expect(error.exitCode).toBe(3);
    expect(watchdog.stats.failures).toBeGreaterThanOrEqual(2);
    expectFramesFromRestart(source, frames);
  });

  it("restarts a camera that writes garbage", async () => {
    const { source, watchdog, events, frames } = await watchStandIn("garbage");

    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(photos.length), waitOptions);

    expect(events[0]?.reason).toBe("stall");
    expect(watchdog.stats.stalls).toBeGreaterThanOrEqual(1);
    expect(source.stats.droppedBytes).toBeGreaterThan(0);
    expectFramesFromRestart(source, frames);
  });
});
