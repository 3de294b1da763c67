import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { ModelRunner } from "../../src/inference/runner.js";
import { prepareImage } from "../../src/preprocess/image.js";
import { makeTempDir } from "../audit/helpers.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const photosDir = path.join(root, "demo", "photos");
const modelDir = path.join(root, "models", "default");
const python = path.join(root, "spark", ".venv", "bin", "python");

/** Minimum cosine similarity between the training-side and serving-side embedding of one image. */
const MIN_COSINE = 0.999;

/** Every other class lends its first photo to each variant; the variants cover each branch of the preprocessing. */
const variantSources = readdirSync(photosDir)
  .sort()
  .filter((_, index) => index % 2 === 0)
  .map((label) => path.join(photosDir, label, readdirSync(path.join(photosDir, label)).sort()[0]!));

/** Variants of a demo photo (256x341 JPEG) that the training job and the agent must prepare alike. */
const variants: { kind: string; extension: string; write: (source: string, target: string) => Promise<unknown> }[] = [
  // sharp 0.34 decodes a JPEG shrunk by 4 or more at reduced size (shrink-on-load) unless that is turned off.
  { kind: "jpeg-1024", extension: "jpg", write: (s, t) => sharp(s).resize(1024).jpeg({ quality: 92 }).toFile(t) },
  { kind: "jpeg-1080x1920", extension: "jpg", write: (s, t) => sharp(s).resize(1080, 1920, { fit: "fill" }).jpeg().toFile(t) },
  { kind: "png-500x333", extension: "png", write: (s, t) => sharp(s).resize(500, 333, { fit: "fill" }).png().toFile(t) },
  {
    kind: "jpeg-exif6",
    extension: "jpg",
    write: (s, t) => sharp(s).resize(900).rotate(-90).withMetadata({ orientation: 6 }).jpeg({ quality: 95 }).toFile(t),
  },
  { kind: "png-rgba", extension: "png", write: (s, t) => sharp(s).resize(700).ensureAlpha(0.4).png().toFile(t) },
  { kind: "png-16bit", extension: "png", write: (s, t) => sharp(s).resize(700).toColourspace("rgb16").png().toFile(t) },
  { kind: "jpeg-cmyk", extension: "jpg", write: (s, t) => sharp(s).resize(1100).toColourspace("cmyk").jpeg().toFile(t) },
  { kind: "jpeg-grey", extension: "jpg", write: (s, t) => sharp(s).resize(1100).greyscale().jpeg().toFile(t) },
  { kind: "jpeg-p3-profile", extension: "jpg", write: (s, t) => sharp(s).resize(600).withIccProfile("p3").jpeg().toFile(t) },
  { kind: "png-100-upscaled", extension: "png", write: (s, t) => sharp(s).resize(100).png().toFile(t) },
  { kind: "webp-800", extension: "webp", write: (s, t) => sharp(s).resize(800).webp().toFile(t) },
];

interface Sample {
  kind: string;
  file: string;
}

interface PythonLine {
  file: string;
  pixelsSha256?: string;
  embedding?: number[];
  error?: string;
}

interface Comparison extends Sample {
  cosine: number;
  identicalPixels: boolean;
}

function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let dot = 0;
  let normA = 0;
  let normB = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i]! * b[i]!;
    normA += a[i]! * a[i]!;
    normB += b[i]! * b[i]!;
  }
  return dot / Math.sqrt(normA * normB);
}

/** Runs `sortline_spark.parity` (pyvips + onnxruntime) on the files and parses its JSON lines. */
async function embedWithPython(files: string[]): Promise<PythonLine[]> {
  const args = ["-m", "sortline_spark.parity", "--model", path.join(modelDir, "model.onnx"), "--manifest", path.join(modelDir, "manifest.json")];
  const { stdout } = await promisify(execFile)(python, [...args, ...files], {
    cwd: path.join(root, "spark"),
    maxBuffer: 256 * 1024 * 1024,
  });
  return stdout
    .trim()
    .split("\n")
    .map((line) => JSON.parse(line) as PythonLine);
}

// The training side needs the Python environment that scripts/python-env.sh creates.
describe.skipIf(!existsSync(python))("training and serving preprocessing", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let runner: ModelRunner;
  const samples: Sample[] = [];
  const comparisons = new Map<string, Comparison>();
  const errors: string[] = [];

  beforeAll(async () => {
    if (!existsSync(path.join(modelDir, "manifest.json"))) {
      throw new Error(`${modelDir}/manifest.json not found; build the default model with 'npm run model:default'`);
    }
    temp = makeTempDir("parity");

    for (const label of readdirSync(photosDir).sort()) {
      for (const name of readdirSync(path.join(photosDir, label)).sort()) {
        samples.push({ kind: "demo-photo", file: path.join(photosDir, label, name) });
      }
    }
    for (const source of variantSources) {
      for (const variant of variants) {
        const file = path.join(temp.dir, `${path.basename(source, ".jpg")}-${variant.kind}.${variant.extension}`);
        await variant.write(source, file);
        samples.push({ kind: variant.kind, file });
      }
    }

    const pythonLines = await embedWithPython(samples.map((sample) => sample.file));
    runner = await ModelRunner.load(modelDir, { threads: 1 });
    for (const [index, sample] of samples.entries()) {
      const trained = pythonLines[index]!;
      if (trained.error !== undefined || trained.embedding === undefined) {
        errors.push(`${sample.file}: python: ${trained.error}`);
        continue;
      }
      const { pixels } = await prepareImage(readFileSync(sample.file), runner.manifest.preprocess);
      const { embeddings } = await runner.run([pixels]);
      comparisons.set(sample.file, {
        ...sample,
        cosine: cosine(embeddings[0]!, trained.embedding),
        identicalPixels: createHash("sha256").update(pixels).digest("hex") === trained.pixelsSha256,
      });
    }
  }, 600_000);

  afterAll(async () => {
    await runner?.release();
    temp?.remove();
  });

  it("every file decodes on both sides", () => {
    expect(errors).toEqual([]);
    expect(comparisons.size).toBe(samples.length);
  });

  const kinds = ["demo-photo", ...variants.map((variant) => variant.kind)];

  it.each(kinds)("%s embeddings agree", (kind) => {
    const ofKind = [...comparisons.values()].filter((comparison) => comparison.kind === kind);
    expect(ofKind.length).toBeGreaterThan(0);
    for (const comparison of ofKind) {
      expect(comparison.cosine, comparison.file).toBeGreaterThan(MIN_COSINE);
    }
  });

  it.each(kinds)("%s pixels are byte-identical", (kind) => {
    const different = [...comparisons.values()]
      .filter((comparison) => comparison.kind === kind && !comparison.identicalPixels)
      .map((comparison) => comparison.file);
    expect(different).toEqual([]);
  });
});
