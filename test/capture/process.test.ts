import { execFileSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";

import {
  CameraExitError,
  gstreamerArgs,
  gstreamerPresetElements,
  gstreamerSource,
  ProcessSource,
  rpicamArgs,
  rpicamSource,
  type ProcessSourceOptions,
} from "../../src/capture/process.js";
import type { Frame } from "../../src/capture/types.js";
import { CameraError, ConfigError } from "../../src/lib/errors.js";
import { makeTempDir, memoryLogger, trashnetSamples, writeStandIns, type SampleImage, type StandIns } from "./helpers.js";

let photos: SampleImage[] = [];
let standIns: StandIns;
let removeTemp: () => Promise<void> = async () => {};
const running: ProcessSource[] = [];

beforeAll(async () => {
  photos = await trashnetSamples(["paper", "plastic", "trash"], 1);
  const temp = await makeTempDir("process");
  removeTemp = temp.remove;
  standIns = await writeStandIns(temp.dir, photos);
});

afterEach(async () => {
  await Promise.all(running.splice(0).map((source) => source.stop()));
});

afterAll(async () => {
  await removeTemp();
});

async function standInSource(mode: string, options: Partial<ProcessSourceOptions> = {}): Promise<ProcessSource> {
  const state = await standIns.stateDir();
  const source = new ProcessSource({
    name: "cam",
    command: standIns.camera,
    args: [mode, state, ...standIns.frames],
    stopTimeoutMs: 1000,
    ...options,
  });
  running.push(source);
  return source;
}

interface Collected {
  frames: Frame[];
  errors: Error[];
}

async function startCollecting(source: ProcessSource): Promise<Collected> {
  const collected: Collected = { frames: [], errors: [] };
  await source.start(
    (frame) => collected.frames.push(frame),
    (error) => collected.errors.push(error),
  );
  return collected;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

const waitOptions = { timeout: 10_000, interval: 20 };

describe("ProcessSource", () => {
  it("streams the photos as frames", async () => {
    const source = await standInSource("stream");

    const { frames, errors } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(2 * photos.length), waitOptions);

    for (const [index, frame] of frames.entries()) {
      expect(frame.data.equals(photos[index % photos.length]!.data)).toBe(true);
    }
    expect(frames[0]!.id).toBe("cam-1");
    expect(frames[1]!.sequence).toBe(2);
    expect(errors).toEqual([]);
    expect(source.stats.droppedBytes).toBe(0);
  });

  it("extracts frames from a noisy stream", async () => {
    const source = await standInSource("noisy");

    const { frames } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(photos.length), waitOptions);

    for (const [index, frame] of frames.entries()) {
      expect(frame.data.equals(photos[index % photos.length]!.data)).toBe(true);
    }
    expect(source.stats.droppedBytes).toBeGreaterThan(0);
  });

  it("reports an exit with code and stderr", async () => {
    const source = await standInSource("die");

    const { frames, errors } = await startCollecting(source);
    await vi.waitFor(() => expect(errors).toHaveLength(1), waitOptions);

    const error = errors[0] as CameraExitError;
    expect(error).toBeInstanceOf(CameraExitError);
    expect(error).toBeInstanceOf(CameraError);
    expect(error.exitCode).toBe(3);
    expect(error.signal).toBeNull();
    expect(error.lastStderrLine).toBe("sensor timeout");
    expect(error.message).toContain("exited with code 3");
    expect(frames).toHaveLength(photos.length);
    expect(source.pid).toBeUndefined();
    expect(source.stats.unexpectedExits).toBe(1);
  });

  it("can start again after an exit", async () => {
    const source = await standInSource("die");
    const first = await startCollecting(source);
    await vi.waitFor(() => expect(first.errors).toHaveLength(1), waitOptions);

    const second = await startCollecting(source);
    await vi.waitFor(() => expect(second.errors).toHaveLength(1), waitOptions);

    expect(second.frames.map((frame) => frame.sequence)).toEqual([4, 5, 6]);
    expect(source.stats.starts).toBe(2);
  });

  it("rejects a missing executable", async () => {
    const source = await standInSource("stream", { command: path.join(standIns.framesDir, "no-such-camera") });

    const error = await source.start(() => {}, () => {}).catch((caught: unknown) => caught);

    expect(error).toBeInstanceOf(CameraError);
    expect((error as CameraError).cause).toMatchObject({ code: "ENOENT" });
    expect(source.pid).toBeUndefined();
  });

  it("stops with SIGTERM without reporting an error", async () => {
    const source = await standInSource("stream", { stopTimeoutMs: 5000 });
    const { frames, errors } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThan(0), waitOptions);
    const pid = source.pid!;

    const startedAt = Date.now();
    await source.stop();

    expect(Date.now() - startedAt).toBeLessThan(5000);
    expect(isAlive(pid)).toBe(false);
    expect(errors).toEqual([]);
  });

  it("kills a process that ignores SIGTERM", async () => {
    const source = await standInSource("stubborn", { stopTimeoutMs: 300 });
    const { frames, errors } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThan(0), waitOptions);
    const pid = source.pid!;

    const startedAt = Date.now();
    await source.stop();

    expect(Date.now() - startedAt).toBeGreaterThanOrEqual(290);
    expect(isAlive(pid)).toBe(false);
    expect(errors).toEqual([]);
  });

  it("rate-limits stderr lines", async () => {
    const { logger, records } = memoryLogger();
    const source = await standInSource("chatty", { logger, stderrLinesPerWindow: 5 });
    const { frames } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThan(0), waitOptions);

    await source.stop();

    const logged = records.filter((record) => record.msg === "camera stderr");
    expect(logged).toHaveLength(5);
    expect(logged[0]!.stderr).toBe("stand-in camera mode=chatty first_run=1");
    expect(logged[0]!.source).toBe("cam");
    const summary = records.find((record) => record.msg === "camera stderr lines suppressed by the rate limit");
    expect(summary?.suppressed).toBe(46);
    expect(source.stats.stderrLinesSuppressed).toBe(46);
  });
});

describe("rpicamArgs", () => {
  it("builds the MJPEG stdout command", () => {
    expect(rpicamArgs({ name: "line", width: 1280, height: 720, fps: 30 })).toEqual([
      "--codec", "mjpeg", "--nopreview", "-t", "0",
      "--width", "1280", "--height", "720", "--framerate", "30",
      "--camera", "0", "--flush",
      "-o", "-",
    ]);
  });

  it("adds camera, quality and extra options", () => {
    const args = rpicamArgs({ name: "line", width: 640, height: 480, fps: 12.5, camera: 1, quality: 80, extraArgs: ["--hflip"] });

    expect(args).toEqual([
      "--codec", "mjpeg", "--nopreview", "-t", "0",
      "--width", "640", "--height", "480", "--framerate", "12.5",
      "--camera", "1", "--flush", "--quality", "80",
      "--hflip", "-o", "-",
    ]);
  });

  it.each([
    ["width", { width: 0 }],
    ["height", { height: 1.5 }],
    ["fps", { fps: 0 }],
    ["camera", { camera: -1 }],
    ["quality", { quality: 101 }],
  ])("rejects an invalid %s", (key, override) => {
    const options = { name: "line", width: 640, height: 480, fps: 30, ...override };

    expect(() => rpicamArgs(options)).toThrow(ConfigError);
    expect(() => rpicamArgs(options)).toThrow(new RegExp(`^${key}:`));
  });
});

describe("gstreamerArgs", () => {
  it("builds the Jetson CSI preset", () => {
    const args = gstreamerArgs({ name: "csi", pipeline: { kind: "jetson-csi", sensorId: 1, width: 1920, height: 1080, fps: 30 } });

    expect(args).toEqual([
      "-q",
      "nvarguscamerasrc", "sensor-id=1",
      "!", "video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1",
      "!", "nvvidconv",
      "!", "video/x-raw,format=I420",
      "!", "jpegenc",
      "!", "fdsink", "fd=1",
    ]);
  });

  it("builds the V4L2 raw preset", () => {
    const args = gstreamerArgs({ name: "usb", pipeline: { kind: "v4l2", width: 640, height: 480, fps: 15 }, encoder: "jpegenc quality=90" });

    expect(args).toEqual([
      "-q",
      "v4l2src", "device=/dev/video0",
      "!", "video/x-raw,width=640,height=480,framerate=15/1",
      "!", "videoconvert",
      "!", "jpegenc", "quality=90",
      "!", "fdsink", "fd=1",
    ]);
  });

  it("passes V4L2 MJPEG through unencoded", () => {
    const args = gstreamerArgs({
      name: "usb",
      pipeline: { kind: "v4l2", device: "/dev/video2", width: 1280, height: 720, fps: 30, input: "mjpeg" },
    });

    expect(args).toEqual([
      "-q",
      "v4l2src", "device=/dev/video2",
      "!", "image/jpeg,width=1280,height=720,framerate=30/1",
      "!", "fdsink", "fd=1",
    ]);
  });

  it("splits custom elements into arguments", () => {
    const args = gstreamerArgs({ name: "test", pipeline: ["videotestsrc  is-live=true", "video/x-raw,width=320,height=240"] });

    expect(args).toEqual(["-q", "videotestsrc", "is-live=true", "!", "video/x-raw,width=320,height=240", "!", "jpegenc", "!", "fdsink", "fd=1"]);
  });

  it("rejects an empty element", () => {
    expect(() => gstreamerArgs({ name: "test", pipeline: ["videotestsrc", " "] })).toThrow(/^pipeline\[1\]:/);
  });

  it("rejects a fractional preset frame rate", () => {
    expect(() => gstreamerPresetElements({ kind: "v4l2", width: 640, height: 480, fps: 7.5 })).toThrow(ConfigError);
  });
});

describe("camera factories", () => {
  async function runLauncher(create: (env: NodeJS.ProcessEnv, argsFile: string) => ProcessSource): Promise<{ args: string[]; frames: Frame[] }> {
    const argsFile = path.join(await standIns.stateDir(), "args.txt");
    const env = { ...process.env, STANDIN_ARGS_FILE: argsFile, STANDIN_FRAMES_DIR: standIns.framesDir };
    const source = create(env, argsFile);
    running.push(source);

    const { frames } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(photos.length), waitOptions);
    await source.stop();

    const args = (await readFile(argsFile, "utf8")).split("\n").slice(0, -1);
    return { args, frames };
  }

  it("runs rpicam-vid's arguments through binaryPath", async () => {
    const options = { name: "pi", width: 640, height: 480, fps: 10, binaryPath: standIns.launcher };

    const { args, frames } = await runLauncher((env) => rpicamSource({ ...options, env }));

    expect(args).toEqual(rpicamArgs(options));
    expect(frames[0]!.data.equals(photos[0]!.data)).toBe(true);
    expect(frames[0]!.source).toBe("pi");
  });

  it("runs gst-launch-1.0's arguments through binaryPath", async () => {
    const options = {
      name: "jetson",
      pipeline: { kind: "jetson-csi" as const, width: 1280, height: 720, fps: 30 },
      binaryPath: standIns.launcher,
    };

    const { args, frames } = await runLauncher((env) => gstreamerSource({ ...options, env }));

    expect(args).toEqual(gstreamerArgs(options));
    expect(frames[0]!.data.equals(photos[0]!.data)).toBe(true);
  });
});

function hasGstLaunch(): boolean {
  try {
    execFileSync("gst-launch-1.0", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

describe.skipIf(!hasGstLaunch())("gstreamerSource with gst-launch-1.0", () => {
  it("streams JPEG frames from videotestsrc", async () => {
    const source = gstreamerSource({ name: "gst", pipeline: ["videotestsrc is-live=true", "video/x-raw,width=160,height=120,framerate=10/1"] });
    running.push(source);

    const { frames, errors } = await startCollecting(source);
    await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(3), waitOptions);

    expect(frames[0]!.data.subarray(0, 2)).toEqual(Buffer.from([0xff, 0xd8]));
    expect(frames[0]!.data.subarray(-2)).toEqual(Buffer.from([0xff, 0xd9]));
    expect(errors).toEqual([]);
  });
});
