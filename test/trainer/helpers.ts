import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import type { ExampleMeta } from "../../src/trainer/catalogue.js";

/** The classes of the demo photos, used as the catalogue's base classes. */
export const BASE_CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"];

/** Base time of the fixtures: 2024-05-01T08:00:00Z. */
export const T0 = Date.UTC(2024, 4, 1, 8, 0, 0);

const PHOTOS_DIR = fileURLToPath(new URL("../../demo/photos/", import.meta.url));

/** Creates a temporary folder and returns it with a function that removes it. */
export function makeTempDir(prefix: string): { dir: string; remove: () => void } {
  const dir = mkdtempSync(path.join(tmpdir(), `sortline-${prefix}-`));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Returns the bytes of the demo photos of one class, sorted by file name. */
export function readPhotos(className: string): Buffer[] {
  const folder = path.join(PHOTOS_DIR, className);
  return readdirSync(folder)
    .filter((name) => name.endsWith(".jpg"))
    .sort()
    .map((name) => readFileSync(path.join(folder, name)));
}

/** Builds the metadata of a hard example for frame `frameId`; `overrides` replaces any field. */
export function makeMeta(frameId: string, overrides: Partial<ExampleMeta> = {}): ExampleMeta {
  return {
    site: "plant-a",
    device: "edge-1",
    frameId,
    capturedAt: T0,
    modelName: "resnet50-waste",
    modelVersion: "1.2.0",
    reasons: ["low-confidence"],
    priority: 0.5,
    top: [
      { label: "plastic", p: 0.41 },
      { label: "glass", p: 0.38 },
    ],
    predicted: "plastic",
    ...overrides,
  };
}

/** A clock that tests move by hand, in milliseconds since the Unix epoch. */
export function makeClock(start = T0): { now: () => number; advance: (ms: number) => void } {
  let time = start;
  return {
    now: () => time,
    advance: (ms) => {
      time += ms;
    },
  };
}
