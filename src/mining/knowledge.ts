/**
 * Class centroids of a model in embedding space, read from the optional `knowledge.json` of a
 * model package. The training job writes the file: per class, the unit-length
 * centroid of the L2-normalised training embeddings and quantiles of their cosine distance to it.
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";

import { Ajv, type ErrorObject } from "ajv";

import { SortlineError } from "../lib/errors.js";

export const KNOWLEDGE_FILE = "knowledge.json";

/** A `knowledge.json` that cannot be used: unreadable, not JSON, invalid, or not matching the model. */
export class KnowledgeLoadError extends SortlineError {
  constructor(
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
  }
}

/** One class of the model as its training embeddings placed it. */
export interface KnowledgeClass {
  label: string;
  /** Mean of the L2-normalised training embeddings of the class, normalised again (unit length). */
  centroid: Float32Array;
  /** Training embeddings behind the centroid. */
  count: number;
  /** Median cosine distance (1 - cos) of the class's training embeddings to the centroid. */
  p50: number;
  /** 95th percentile of the same distances; novelty divides by it. */
  p95: number;
}

/** Contents of `knowledge.json`, with the centroids as Float32Array. */
export interface Knowledge {
  version: 1;
  /** Name of the model output the embeddings came from. */
  output: string;
  dim: number;
  classes: KnowledgeClass[];
}

/** Checks against the model the knowledge belongs to; each is skipped when absent. */
export interface KnowledgeExpectations {
  /** Embedding length of the model. */
  dim?: number;
  /** Labels of the model; every knowledge class must be one of them. */
  labels?: readonly string[];
  /** Name of the model's embedding output. */
  output?: string;
}

/** Result of `noveltyOf`. */
export interface Novelty {
  /** min over classes of cosineDistance(e, centroid) / p95; above 1 means outside every class's usual spread. */
  score: number;
  /** Class that gives the minimum. */
  nearest: string;
  /** Cosine distance to that class's centroid. */
  distance: number;
}

/** Centroids written with 6 decimals are unit length to about 1e-5; a wider gap means a broken file. */
const UNIT_TOLERANCE = 1e-3;
/** Same floor as the training job, so a class whose embeddings all coincide does not divide by zero. */
const MIN_SPREAD = 1e-6;

const knowledgeSchema = {
  type: "object",
  required: ["version", "output", "dim", "classes"],
  properties: {
    version: { const: 1 },
    output: { type: "string", minLength: 1 },
    dim: { type: "integer", minimum: 1 },
    classes: {
      type: "array",
      minItems: 1,
      items: {
        type: "object",
        required: ["label", "centroid", "count", "p50", "p95"],
        properties: {
          label: { type: "string", minLength: 1 },
          centroid: { type: "array", minItems: 1, items: { type: "number" } },
          count: { type: "integer", minimum: 1 },
          p50: { type: "number", minimum: 0, maximum: 2 },
          p95: { type: "number", minimum: 0, maximum: 2 },
        },
      },
    },
  },
} as const;

const ajv = new Ajv({ allErrors: true });
const validateKnowledge = ajv.compile(knowledgeSchema);

function formatSchemaErrors(errors: ErrorObject[] | null | undefined): string {
  return (errors ?? [])
    .slice(0, 5)
    .map((error) => `${error.instancePath || "(root)"} ${error.message ?? "is invalid"}`)
    .join("; ");
}

interface RawKnowledge {
  version: 1;
  output: string;
  dim: number;
  classes: { label: string; centroid: number[]; count: number; p50: number; p95: number }[];
}

/**
 * Reads `knowledge.json` of a model package folder. Returns undefined when the folder has no such
 * file, and raises KnowledgeLoadError for a file that is unreadable, not JSON, invalid, or fails
 * `expected`. When the folder's `manifest.json` names the file with a sha256 (as the training job
 * writes it), the file must match that hash.
 */
export async function loadKnowledge(dir: string, expected: KnowledgeExpectations = {}): Promise<Knowledge | undefined> {
  const file = path.join(dir, KNOWLEDGE_FILE);
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") {
      return undefined;
    }
    throw new KnowledgeLoadError(file, `cannot read the file: ${code ?? String(error)}`, { cause: error });
  }
  await checkManifestHash(dir, file, bytes);
  let document: unknown;
  try {
    document = JSON.parse(bytes.toString("utf8"));
  } catch (error) {
    throw new KnowledgeLoadError(file, `not valid JSON: ${(error as Error).message}`, { cause: error });
  }
  return parseKnowledge(document, file, expected);
}

/** Validates a parsed knowledge document; `file` names it in errors. Raises KnowledgeLoadError. */
export function parseKnowledge(document: unknown, file: string, expected: KnowledgeExpectations = {}): Knowledge {
  if (!validateKnowledge(document)) {
    throw new KnowledgeLoadError(file, `invalid: ${formatSchemaErrors(validateKnowledge.errors)}`);
  }
  const raw = document as unknown as RawKnowledge;
  if (expected.output !== undefined && raw.output !== expected.output) {
    throw new KnowledgeLoadError(file, `centroids come from output '${raw.output}', but the model's embedding output is '${expected.output}'`);
  }
  if (expected.dim !== undefined && raw.dim !== expected.dim) {
    throw new KnowledgeLoadError(file, `dim is ${raw.dim}, but the model's embeddings have ${expected.dim} values`);
  }
  const seen = new Set<string>();
  const classes = raw.classes.map((entry, index): KnowledgeClass => {
    const where = `/classes/${index} (${entry.label})`;
    if (seen.has(entry.label)) {
      throw new KnowledgeLoadError(file, `${where}: label appears twice`);
    }
    seen.add(entry.label);
    if (expected.labels !== undefined && !expected.labels.includes(entry.label)) {
      throw new KnowledgeLoadError(file, `${where}: label is not one of the model's labels (${expected.labels.join(", ")})`);
    }
    if (entry.centroid.length !== raw.dim) {
      throw new KnowledgeLoadError(file, `${where}: centroid has ${entry.centroid.length} values, dim is ${raw.dim}`);
    }
    const centroid = Float32Array.from(entry.centroid);
    const length = Math.sqrt(dot(centroid, centroid));
    if (Math.abs(length - 1) > UNIT_TOLERANCE) {
      throw new KnowledgeLoadError(file, `${where}: centroid has length ${length.toFixed(6)}; it must be unit length`);
    }
    if (entry.p50 > entry.p95) {
      throw new KnowledgeLoadError(file, `${where}: p50 ${entry.p50} is greater than p95 ${entry.p95}`);
    }
    return { label: entry.label, centroid, count: entry.count, p50: entry.p50, p95: entry.p95 };
  });
  return { version: 1, output: raw.output, dim: raw.dim, classes };
}

async function checkManifestHash(dir: string, file: string, bytes: Buffer): Promise<void> {
  let manifest: unknown;
  try {
    manifest = JSON.parse(await readFile(path.join(dir, "manifest.json"), "utf8"));
  } catch {
    // The model loader reports a missing or broken manifest. Without one there is no hash to check.
    return;
  }
  const entry = (manifest as { knowledge?: { file?: unknown; sha256?: unknown } } | null)?.knowledge;
  if (typeof entry?.sha256 !== "string" || (entry.file !== undefined && entry.file !== KNOWLEDGE_FILE)) {
    return;
  }
  const actual = createHash("sha256").update(bytes).digest("hex");
  if (actual !== entry.sha256) {
    throw new KnowledgeLoadError(file, `sha256 is ${actual}, but manifest.json says ${entry.sha256}; the package is incomplete or altered`);
  }
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let sum = 0;
  for (let index = 0; index < a.length; index++) {
    sum += a[index]! * b[index]!;
  }
  return sum;
}

/** Returns a unit-length copy of `vector`, or an all-zero copy when its length is 0. */
export function l2Normalize(vector: ArrayLike<number>): Float32Array {
  const copy = Float32Array.from(vector);
  const length = Math.sqrt(dot(copy, copy));
  if (length > 0) {
    for (let index = 0; index < copy.length; index++) {
      copy[index] = copy[index]! / length;
    }
  }
  return copy;
}

/** Returns 1 - cos(a, b), in [0, 2]; 1 when either vector is all zero. */
export function cosineDistance(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) {
    throw new RangeError(`vectors have ${a.length} and ${b.length} values; cosine distance needs equal lengths`);
  }
  const lengths = Math.sqrt(dot(a, a) * dot(b, b));
  return lengths > 0 ? 1 - dot(a, b) / lengths : 1;
}

/**
 * Scores how far `embedding` lies from the classes the model was trained on: the minimum over
 * classes of cosineDistance(embedding, centroid) / p95. Raises RangeError on a length mismatch.
 */
export function noveltyOf(knowledge: Knowledge, embedding: ArrayLike<number>): Novelty {
  if (embedding.length !== knowledge.dim) {
    throw new RangeError(`embedding has ${embedding.length} values; the knowledge has dim ${knowledge.dim}`);
  }
  const length = Math.sqrt(dot(embedding, embedding));
  let best: Novelty = { score: Number.POSITIVE_INFINITY, nearest: knowledge.classes[0]!.label, distance: 1 };
  for (const entry of knowledge.classes) {
    // Centroids are unit length, so cos = dot / |embedding|.
    const distance = length > 0 ? 1 - dot(embedding, entry.centroid) / length : 1;
    const score = distance / Math.max(entry.p95, MIN_SPREAD);
    if (score < best.score) {
      best = { score, nearest: entry.label, distance };
    }
  }
  return best;
}
