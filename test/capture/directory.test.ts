import { copyFile, mkdir, writeFile } from "node:fs/promises";
import { rmSync, unlinkSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeAll, beforeEach, describe, expect, it, vi } from "vitest";

import { DirectorySource, type DirectorySourceOptions } from "../../src/capture/directory.js";
import type { Frame } from "../../src/capture/types.js";
import { CameraError, ConfigError } from "../../src/lib/errors.js";
import { copySamples, makeTempDir, memoryLogger, trashnetSamples, type SampleImage } from "./helpers.js";

let samples: SampleImage[] = [];
let root = "";
let removeRoot: () => Promise<void> = async () => {};
/** Paths of the copied photos in replay order: glass/ before metal/, file names in code-point order. */
let expectedOrder: string[] = [];

beforeAll(async () => {
  samples = await trashnetSamples(["metal", "glass"], 3);
});

beforeEach(async () => {
  const temp = await makeTempDir("directory");
  root = temp.dir;
  removeRoot = temp.remove;
  const copies = await copySamples(root, samples);
  expectedOrder = [...copies].sort();
});

afterEach(async () => {
  await removeRoot();
});

function source(options: Partial<DirectorySourceOptions> = {}): DirectorySource {
  return new DirectorySource({ name: "replay", path: root, fps: 200, ...options });
}

/** Starts `directory` and resolves with its frames once `count` arrived. */
async function collect(directory: DirectorySource, count: number, onFrame?: (frame: Frame) => void): Promise<Frame[]> {
  const frames: Frame[] = [];
  const errors: Error[] = [];
  await directory.start(
    (frame) => {
      frames.push(frame);
      onFrame?.(frame);
    },
    (error) => errors.push(error),
  );
  await vi.waitFor(() => expect(frames.length).toBeGreaterThanOrEqual(count), { timeout: 10_000, interval: 10 });
  await directory.stop();
  expect(errors).toEqual([]);
  return frames;
}

describe("DirectorySource", () => {
  it("replays images in sorted order with folder labels", async () => {
    const frames = await collect(source(), samples.length);

    expect(frames.map((frame) => frame.file)).toEqual(expectedOrder);
    expect(frames.map((frame) => frame.label)).toEqual(expectedOrder.map((file) => path.basename(path.dirname(file))));
    for (const frame of frames) {
      const sample = samples.find((candidate) => path.basename(candidate.file) === path.basename(frame.file!));
      expect(frame.data.equals(sample!.data)).toBe(true);
    }
  });

  it("numbers frames and ids per source", async () => {
    const directory = source();

    const first = await collect(directory, 2);
    const second = await collect(directory, 2);

    const sequences = [...first, ...second].map((frame) => frame.sequence);
    expect(sequences).toEqual(Array.from({ length: sequences.length }, (_, index) => index + 1));
    expect(first[0]!.id).toBe("replay-1");
    expect(first[0]!.source).toBe("replay");
  });

  it("uses the first folder below the root as label", async () => {
    const nested = path.join(root, "glass", "bottles", "green");
    await mkdir(nested, { recursive: true });
    await copyFile(samples[0]!.file, path.join(nested, "deep.jpg"));
    await copyFile(samples[0]!.file, path.join(root, "unsorted.jpg"));

    const frames = await collect(source(), samples.length + 2);

    const byName = new Map(frames.map((frame) => [path.basename(frame.file!), frame.label]));
    expect(byName.get("deep.jpg")).toBe("glass");
    expect(byName.has("unsorted.jpg")).toBe(true);
    expect(byName.get("unsorted.jpg")).toBeUndefined();
  });

  it("omits labels when labelsFromFolders is false", async () => {
    const frames = await collect(source({ labelsFromFolders: false }), samples.length);

    expect(frames.every((frame) => frame.label === undefined)).toBe(true);
  });

  it("ignores hidden and non-image files", async () => {
    await writeFile(path.join(root, "glass", "notes.txt"), "not an image");
    await copyFile(samples[0]!.file, path.join(root, "glass", ".hidden.jpg"));
    await mkdir(path.join(root, ".cache"));
    await copyFile(samples[0]!.file, path.join(root, ".cache", "cached.jpg"));

    const frames = await collect(source(), samples.length);

    expect(frames.map((frame) => frame.file)).toEqual(expectedOrder);
  });

  it("holds the configured frame rate", async () => {
    const fps = 20;

    const intervalMs = 1000 / fps;

    const frames = await collect(source({ fps, loop: true }), 8);

    // Frame k is due k intervals after the first one was scheduled. The first frame may be late by
    // the time it took to read, and a later frame that is late shortens the interval after it.
    const elapsed = frames[7]!.capturedAt - frames[0]!.capturedAt;
    expect(elapsed).toBeGreaterThanOrEqual(6 * intervalMs);
    // Loose upper bound, because the test machine may be busy.
    expect(elapsed).toBeLessThan(14 * intervalMs);
  });

  it("loops over the images", async () => {
    const directory = source({ loop: true });

    const frames = await collect(directory, 2 * samples.length + 1);

    const files = frames.map((frame) => frame.file);
    expect(files.slice(0, samples.length)).toEqual(expectedOrder);
    expect(files.slice(samples.length, 2 * samples.length)).toEqual(expectedOrder);
    expect(directory.stats.passes).toBeGreaterThanOrEqual(2);
  });

  it("calls onEnd after the last image", async () => {
    const frames: Frame[] = [];
    const ended = new Promise<number>((resolve) => {
      const directory = source({ onEnd: () => resolve(frames.length) });
      void directory.start((frame) => frames.push(frame), () => {});
    });

    const framesAtEnd = await ended;

    expect(framesAtEnd).toBe(samples.length);
    expect(frames.map((frame) => frame.file)).toEqual(expectedOrder);
  });

  it("can start again after the end", async () => {
    let resolveEnd: () => void = () => {};
    const directory = source({ onEnd: () => resolveEnd() });
    const frames: Frame[] = [];

    for (let pass = 0; pass < 2; pass += 1) {
      const ended = new Promise<void>((resolve) => (resolveEnd = resolve));
      await directory.start((frame) => frames.push(frame), () => {});
      await ended;
    }

    expect(frames).toHaveLength(2 * samples.length);
  });

  it("shuffles reproducibly with a seed", async () => {
    const first = await collect(source({ shuffleSeed: 42, loop: true }), 2 * samples.length);
    const second = await collect(source({ shuffleSeed: 42, loop: true }), 2 * samples.length);

    const firstFiles = first.slice(0, 2 * samples.length).map((frame) => frame.file);
    const secondFiles = second.slice(0, 2 * samples.length).map((frame) => frame.file);
    expect(secondFiles).toEqual(firstFiles);
    expect([...firstFiles.slice(0, samples.length)].sort()).toEqual(expectedOrder);
    expect(firstFiles.slice(0, samples.length)).not.toEqual(expectedOrder);
    expect(firstFiles.slice(samples.length)).not.toEqual(firstFiles.slice(0, samples.length));
  });

  it("skips a file that cannot be read", async () => {
    const { logger, records } = memoryLogger();
    const missing = expectedOrder[2]!;

    const frames = await collect(source({ loop: true, logger }), samples.length, (frame) => {
      if (frame.sequence === 1) {
        unlinkSync(missing);
      }
    });

    expect(frames.slice(0, samples.length - 1).map((frame) => frame.file)).toEqual(expectedOrder.filter((file) => file !== missing));
    const warning = records.find((record) => record.msg === "cannot read image file; skipped");
    expect(warning?.level).toBe("warn");
    expect(warning?.file).toBe(missing);
    expect(warning?.source).toBe("replay");
  });

  it("skips files above maxFileBytes", async () => {
    const sizes = samples.map((sample) => sample.data.length).sort((a, b) => a - b);
    const maxFileBytes = sizes[sizes.length - 1]! - 1;
    const frames: Frame[] = [];
    let directory: DirectorySource | undefined;

    await new Promise<void>((resolve) => {
      directory = source({ maxFileBytes, onEnd: resolve });
      void directory.start((frame) => frames.push(frame), () => {});
    });

    expect(frames.every((frame) => frame.data.length <= maxFileBytes)).toBe(true);
    expect(directory!.stats.skippedFiles).toBe(sizes.filter((size) => size > maxFileBytes).length);
  });

  it("replays at most maxFiles images", async () => {
    const { logger, records } = memoryLogger();
    const frames: Frame[] = [];

    await new Promise<void>((resolve) => {
      const directory = source({ maxFiles: 2, logger, onEnd: resolve });
      void directory.start((frame) => frames.push(frame), () => {});
    });

    expect(frames.map((frame) => frame.file)).toEqual(expectedOrder.slice(0, 2));
    const warning = records.find((record) => record.msg.startsWith("image folder contains more images than maxFiles"));
    expect(warning?.maxFiles).toBe(2);
  });

  it("reports a pass without readable images", async () => {
    const errors: Error[] = [];
    const directory = source({ loop: true });
    let delivered = 0;

    await directory.start(
      () => {
        delivered += 1;
        if (delivered === samples.length) {
          rmSync(path.join(root, "glass"), { recursive: true });
          rmSync(path.join(root, "metal"), { recursive: true });
        }
      },
      (error) => errors.push(error),
    );
    await vi.waitFor(() => expect(errors).toHaveLength(1), { timeout: 10_000, interval: 10 });
    await directory.stop();

    expect(errors[0]).toBeInstanceOf(CameraError);
    expect(errors[0]!.message).toContain("could be read");
    expect(delivered).toBe(samples.length);
  });

  it("rejects a folder without images", async () => {
    const empty = path.join(root, "empty");
    await mkdir(empty);

    await expect(source({ path: empty }).start(() => {}, () => {})).rejects.toThrow(/no images/);
  });

  it("rejects a missing folder", async () => {
    const missing = path.join(root, "missing");

    const error = await source({ path: missing })
      .start(() => {}, () => {})
      .catch((caught: unknown) => caught);

    expect(error).toBeInstanceOf(CameraError);
    expect((error as CameraError).cause).toMatchObject({ code: "ENOENT" });
  });

  it("rejects a second start while running", async () => {
    const directory = source({ fps: 1, loop: true });
    await directory.start(() => {}, () => {});

    await expect(directory.start(() => {}, () => {})).rejects.toThrow(/already running/);
    await directory.stop();
  });

  it("stops without delivering further frames", async () => {
    const directory = source({ fps: 5, loop: true });
    const frames: Frame[] = [];
    await directory.start((frame) => frames.push(frame), () => {});
    await vi.waitFor(() => expect(frames).toHaveLength(1), { timeout: 5000, interval: 10 });

    await directory.stop();
    const count = frames.length;
    // Two frame intervals at 5 fps.
    await new Promise((resolve) => setTimeout(resolve, 450));

    expect(frames).toHaveLength(count);
  });

  it("rejects an invalid frame rate", () => {
    expect(() => source({ fps: 0 })).toThrow(ConfigError);
    expect(() => source({ fps: Number.NaN })).toThrow(ConfigError);
  });
});
