import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import path from "node:path";
import { Ajv, type ErrorObject } from "ajv";

import { ModelLoadError } from "../lib/errors.js";

/** Preprocessing steps from image to model input; the training job applies the same steps with libvips. */
export interface PreprocessPolicy {
  orientation: "exif";
  colourspace: "srgb";
  alpha: { flatten: [number, number, number] };
  resize: { shortSide: number; kernel: "lanczos3" | "lanczos2" | "cubic" | "mitchell" | "linear" | "nearest" };
  crop: { mode: "centre"; width: number; height: number };
}

export interface ModelInputSpec {
  name: string;
  dtype: "uint8";
  layout: "NHWC";
  pixelFormat: "RGB";
  shape: [null, number, number, 3];
}

/** Contents of a model package's `manifest.json`. */
export interface ModelManifest {
  schemaVersion: 1;
  name: string;
  version: string;
  createdAt: string;
  labels: string[];
  input: ModelInputSpec;
  outputs: { probabilities: string; embedding: string };
  preprocess: PreprocessPolicy;
  file: { name: string; sha256: string; bytes: number };
  precision: "fp32" | "int8";
  backbone: Record<string, unknown>;
  training?: Record<string, unknown>;
  metrics?: Record<string, unknown>;
}

const manifestSchema = {
  type: "object",
  required: ["schemaVersion", "name", "version", "createdAt", "labels", "input", "outputs", "preprocess", "file", "precision", "backbone"],
  properties: {
    schemaVersion: { const: 1 },
    name: { type: "string", minLength: 1, pattern: "^[A-Za-z0-9._-]+$" },
    version: { type: "string", pattern: "^\\d+\\.\\d+\\.\\d+(?:[-+][0-9A-Za-z.+-]+)?$" },
    createdAt: { type: "string", minLength: 1 },
    labels: { type: "array", minItems: 2, uniqueItems: true, items: { type: "string", minLength: 1 } },
    input: {
      type: "object",
      required: ["name", "dtype", "layout", "pixelFormat", "shape"],
      properties: {
        name: { type: "string", minLength: 1 },
        dtype: { const: "uint8" },
        layout: { const: "NHWC" },
        pixelFormat: { const: "RGB" },
        shape: {
          type: "array",
          minItems: 4,
          maxItems: 4,
          items: [{ type: "null" }, { type: "integer", minimum: 1 }, { type: "integer", minimum: 1 }, { const: 3 }],
        },
      },
    },
    outputs: {
      type: "object",
      required: ["probabilities", "embedding"],
      properties: { probabilities: { type: "string" }, embedding: { type: "string" } },
    },
    preprocess: {
      type: "object",
      required: ["orientation", "colourspace", "alpha", "resize", "crop"],
      properties: {
        orientation: { const: "exif" },
        colourspace: { const: "srgb" },
        alpha: {
          type: "object",
          required: ["flatten"],
          properties: {
            flatten: { type: "array", minItems: 3, maxItems: 3, items: { type: "integer", minimum: 0, maximum: 255 } },
          },
        },
        resize: {
          type: "object",
          required: ["shortSide", "kernel"],
          properties: {
            shortSide: { type: "integer", minimum: 1 },
            kernel: { enum: ["lanczos3", "lanczos2", "cubic", "mitchell", "linear", "nearest"] },
          },
        },
        crop: {
          type: "object",
          required: ["mode", "width", "height"],
          properties: {
            mode: { const: "centre" },
            width: { type: "integer", minimum: 1 },
            height: { type: "integer", minimum: 1 },
          },
        },
      },
    },
    file: {
      type: "object",
      required: ["name", "sha256", "bytes"],
      properties: {
        name: { type: "string", pattern: "^[A-Za-z0-9._-]+\\.onnx$" },
        sha256: { type: "string", pattern: "^[0-9a-f]{64}$" },
        bytes: { type: "integer", minimum: 1 },
      },
    },
    precision: { enum: ["fp32", "int8"] },
    backbone: { type: "object" },
  },
} as const;

const ajv = new Ajv({ allErrors: true, strictTuples: false });
const validateManifest = ajv.compile(manifestSchema);

function formatSchemaErrors(errors: ErrorObject[] | null | undefined): string {
  return (errors ?? [])
    .slice(0, 5)
    .map((error) => `${error.instancePath || "(root)"} ${error.message ?? "is invalid"}`)
    .join("; ");
}

/** A manifest with the absolute path of its model file. */
export interface ModelPackage {
  dir: string;
  manifest: ModelManifest;
  modelPath: string;
}

/**
 * Reads and validates `manifest.json` of a model package folder.
 * The model file's sha256 is checked separately by `verifyModelFile`, since hashing 25 MB
 * costs about 50 ms and callers may hold a verified copy already.
 */
export async function readModelPackage(dir: string): Promise<ModelPackage> {
  const manifestPath = path.join(dir, "manifest.json");
  let text: string;
  try {
    text = await readFile(manifestPath, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const hint = code === "ENOENT" ? " (no model package in that folder; check the model path)" : "";
    throw new ModelLoadError(`cannot read ${manifestPath}: ${code ?? error}${hint}`, { cause: error });
  }
  let document: unknown;
  try {
    document = JSON.parse(text);
  } catch (error) {
    throw new ModelLoadError(`${manifestPath} is not valid JSON: ${(error as Error).message}`, { cause: error });
  }
  if (!validateManifest(document)) {
    throw new ModelLoadError(`${manifestPath} is invalid: ${formatSchemaErrors(validateManifest.errors)}`);
  }
  const manifest = document as unknown as ModelManifest;
  const { crop } = manifest.preprocess;
  if (crop.width !== manifest.input.shape[2] || crop.height !== manifest.input.shape[1]) {
    throw new ModelLoadError(
      `${manifestPath} is invalid: crop ${crop.width}x${crop.height} does not match input shape ${JSON.stringify(manifest.input.shape)}`,
    );
  }
  return { dir, manifest, modelPath: path.join(dir, manifest.file.name) };
}

/** Returns the hex sha256 of a file, streamed so that large models need no extra memory. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk as Buffer);
  }
  return hash.digest("hex");
}

/** Checks the model file's size and sha256 against the manifest. */
export async function verifyModelFile(pkg: ModelPackage): Promise<void> {
  let size: number;
  try {
    size = (await stat(pkg.modelPath)).size;
  } catch (error) {
    throw new ModelLoadError(`model file ${pkg.modelPath} not found`, { cause: error });
  }
  if (size !== pkg.manifest.file.bytes) {
    throw new ModelLoadError(`model file ${pkg.modelPath} has ${size} bytes; the manifest says ${pkg.manifest.file.bytes}`);
  }
  const actual = await sha256File(pkg.modelPath);
  if (actual !== pkg.manifest.file.sha256) {
    throw new ModelLoadError(`model file ${pkg.modelPath} has sha256 ${actual}; the manifest says ${pkg.manifest.file.sha256}`);
  }
}
