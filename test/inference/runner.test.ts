import { existsSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { ModelRunner, topK } from "../../src/inference/runner.js";
import { ModelLoadError } from "../../src/lib/errors.js";
import { createLogger } from "../../src/lib/log.js";
import type { ModelManifest } from "../../src/models/manifest.js";
import { prepareImage } from "../../src/preprocess/image.js";
import { makeTempDir } from "../audit/helpers.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const defaultModelDir = path.join(root, "models", "default");
const photo = path.join(root, "demo", "photos", "glass", "glass143.jpg");

interface LogLine {
  level: string;
  msg: string;
  provider?: string;
  err?: string;
}

/** Creates a pino logger whose JSON lines are kept in `lines`. */
function captureLogger(): { logger: ReturnType<typeof createLogger>; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const destination = {
    write(chunk: string): void {
      for (const line of chunk.split("\n").filter(Boolean)) {
        lines.push(JSON.parse(line) as LogLine);
      }
    },
  };
  return { logger: createLogger({ level: "debug", destination }), lines };
}

function readDefaultManifest(): ModelManifest {
  return JSON.parse(readFileSync(path.join(defaultModelDir, "manifest.json"), "utf8")) as ModelManifest;
}

describe("ModelRunner", () => {
  let temp: ReturnType<typeof makeTempDir>;
  const runners: ModelRunner[] = [];

  /** Writes a package in the temp folder that links the default model.onnx under `manifest`. */
  const writePackage = (change: (manifest: ModelManifest) => void = () => {}): string => {
    const manifest = readDefaultManifest();
    change(manifest);
    writeFileSync(path.join(temp.dir, "manifest.json"), JSON.stringify(manifest));
    symlinkSync(path.join(defaultModelDir, manifest.file.name), path.join(temp.dir, manifest.file.name));
    return temp.dir;
  };

  const load = async (dir: string, options: Parameters<typeof ModelRunner.load>[1] = {}): Promise<ModelRunner> => {
    const runner = await ModelRunner.load(dir, options);
    runners.push(runner);
    return runner;
  };

  const loadError = async (dir: string, options: Parameters<typeof ModelRunner.load>[1] = {}): Promise<string> => {
    const error = await load(dir, options).then(
      () => null,
      (caught: unknown) => caught,
    );
    expect(error).toBeInstanceOf(ModelLoadError);
    return (error as ModelLoadError).message;
  };

  beforeAll(() => {
    if (!existsSync(path.join(defaultModelDir, "manifest.json"))) {
      throw new Error(`${defaultModelDir}/manifest.json not found; build the default model with 'npm run model:default'`);
    }
  });

  beforeEach(() => {
    temp = makeTempDir("runner");
  });

  afterEach(async () => {
    await Promise.all(runners.splice(0).map((runner) => runner.release()));
    temp.remove();
  });

  afterAll(async () => {
    await Promise.all(runners.map((runner) => runner.release()));
  });

  it("loads on cpu by default", async () => {
    const { logger, lines } = captureLogger();

    const runner = await load(defaultModelDir, { logger });

    expect(runner.provider).toBe("cpu");
    expect(runner.manifest.labels).toEqual(readDefaultManifest().labels);
    const loaded = lines.find((line) => line.msg === "model loaded");
    expect(loaded?.level).toBe("info");
    expect(loaded?.provider).toBe("cpu");
  });

  it("falls back from cuda to cpu", async () => {
    const { logger, lines } = captureLogger();

    const runner = await load(defaultModelDir, { providers: ["cuda", "cpu"], logger });

    expect(runner.provider).toBe("cpu");
    const warnings = lines.filter((line) => line.level === "warn");
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.provider).toBe("cuda");
    expect(warnings[0]!.msg).toBe("execution provider unavailable, trying the next one");
    expect(warnings[0]!.err).toBeTruthy();
  });

  it("falls back through tensorrt and cuda", async () => {
    const { logger, lines } = captureLogger();

    const runner = await load(defaultModelDir, { providers: ["tensorrt", "cuda", "cpu"], logger });

    expect(runner.provider).toBe("cpu");
    const warned = lines.filter((line) => line.level === "warn").map((line) => line.provider);
    expect(warned).toEqual(["tensorrt", "cuda"]);
  });

  it("cuda alone fails to load", async () => {
    const message = await loadError(defaultModelDir, { providers: ["cuda"] });

    expect(message).toContain(`no execution provider could load ${path.join(defaultModelDir, "model.onnx")}`);
    expect(message).toContain("cuda: ");
  });

  it("unknown output name fails to load", async () => {
    const dir = writePackage((manifest) => {
      manifest.outputs.probabilities = "scores";
    });

    const message = await loadError(dir, { providers: ["cpu"] });

    expect(message).toContain("the manifest names 'scores'");
    expect(message).toContain("model has outputs");
  });

  it("unknown input name fails to load", async () => {
    const dir = writePackage((manifest) => {
      manifest.input.name = "image";
    });

    const message = await loadError(dir);

    expect(message).toContain("the manifest names 'image'");
  });

  it("signature error skips provider fallback", async () => {
    const dir = writePackage((manifest) => {
      manifest.outputs.embedding = "features";
    });
    const { logger, lines } = captureLogger();

    const message = await loadError(dir, { providers: ["cpu", "cpu"], logger });

    expect(message).toContain("the manifest names 'features'");
    expect(lines.filter((line) => line.level === "warn")).toHaveLength(0);
  });

  it("fewer labels than scores fails to load", async () => {
    const dir = writePackage((manifest) => {
      manifest.labels = manifest.labels.slice(0, -1);
    });

    const message = await loadError(dir);

    expect(message).toContain(`model returns ${readDefaultManifest().labels.length} scores`);
    expect(message).toContain(`the manifest lists ${readDefaultManifest().labels.length - 1} labels`);
  });

  it("more labels than scores fails to load", async () => {
    const dir = writePackage((manifest) => {
      manifest.labels = [...manifest.labels, "textile"];
    });

    const message = await loadError(dir);

    expect(message).toContain(`the manifest lists ${readDefaultManifest().labels.length + 1} labels`);
  });

  it("wrong sha256 fails without skipVerify", async () => {
    const dir = writePackage((manifest) => {
      manifest.file.sha256 = "0".repeat(64);
    });

    const message = await loadError(dir);
    const runner = await load(dir, { skipVerify: true });

    expect(message).toContain(`the manifest says ${"0".repeat(64)}`);
    expect(runner.provider).toBe("cpu");
  });

  it("run returns one row per image", async () => {
    const runner = await load(defaultModelDir, { threads: 1 });
    const { pixels } = await prepareImage(photo, runner.manifest.preprocess);
    const grey = Buffer.alloc(pixels.length, 128);

    const { probabilities, embeddings } = await runner.run([pixels, grey]);

    expect(probabilities).toHaveLength(2);
    expect(embeddings).toHaveLength(2);
    for (const row of probabilities) {
      expect(row).toHaveLength(runner.manifest.labels.length);
      expect(row.reduce((sum, p) => sum + p, 0)).toBeCloseTo(1, 4);
    }
    expect(embeddings[0]!.length).toBeGreaterThan(0);
    expect(embeddings[0]!.length).toBe(embeddings[1]!.length);
  });

  it("batch and single runs agree", async () => {
    const runner = await load(defaultModelDir, { threads: 1 });
    const { pixels } = await prepareImage(photo, runner.manifest.preprocess);

    const single = await runner.run([pixels]);
    const batch = await runner.run([Buffer.alloc(pixels.length, 30), pixels]);

    const first = single.probabilities[0]!;
    const second = batch.probabilities[1]!;
    for (let i = 0; i < first.length; i++) {
      expect(second[i]).toBeCloseTo(first[i]!, 4);
    }
  });

  it("wrong image size is rejected", async () => {
    const runner = await load(defaultModelDir, { threads: 1 });
    const [, height, width] = runner.manifest.input.shape;

    await expect(runner.run([Buffer.alloc(height * width * 3), Buffer.alloc(10)])).rejects.toThrow(
      `image 1 has 10 bytes; the model takes ${height * width * 3}`,
    );
  });

  it("warmUp runs each batch size", async () => {
    const runner = await load(defaultModelDir, { threads: 1 });

    await expect(runner.warmUp([1, 3])).resolves.toBeUndefined();
  });
});

describe("topK", () => {
  const labels = ["cardboard", "glass", "metal", "paper"];

  it("orders labels by probability", () => {
    const top = topK(new Float32Array([0.1, 0.6, 0.05, 0.25]), labels, 3);

    expect(top.map((entry) => entry.label)).toEqual(["glass", "paper", "cardboard"]);
    expect(top[0]!.p).toBeCloseTo(0.6, 6);
  });

  it("k above class count returns all", () => {
    const top = topK(new Float32Array([0.1, 0.6, 0.05, 0.25]), labels, 10);

    expect(top).toHaveLength(4);
  });

  it("names classes without a label", () => {
    const top = topK(new Float32Array([0.1, 0.2, 0.3, 0.15, 0.25]), labels, 2);

    expect(top.map((entry) => entry.label)).toEqual(["metal", "class_4"]);
  });
});
