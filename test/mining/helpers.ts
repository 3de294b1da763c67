import type { Knowledge } from "../../src/mining/knowledge.js";
import { l2Normalize } from "../../src/mining/knowledge.js";
import type { ExampleMeta, NewExample } from "../../src/mining/outbox.js";
import { createRandom, type SelectorInput } from "../../src/mining/selector.js";

/** Embedding length of the synthetic tests; large enough that random directions are nearly orthogonal. */
export const DIM = 128;

/** Returns a seeded source of standard normal numbers (Box-Muller). */
export function gaussian(seed: number): () => number {
  const random = createRandom(seed);
  return () => {
    const u = Math.max(random(), 1e-12);
    const v = random();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  };
}

/** Returns a random unit vector of length `dim`. */
export function randomDirection(normal: () => number, dim = DIM): Float32Array {
  return l2Normalize(Array.from({ length: dim }, normal));
}

/**
 * Returns `center` plus isotropic noise whose expected length is `spread` times the center's
 * length. The cosine distance to the center is then about 1 - 1 / sqrt(1 + spread^2).
 */
export function around(center: Float32Array, spread: number, normal: () => number): Float32Array {
  const sigma = spread / Math.sqrt(center.length);
  return Float32Array.from(center, (value) => value + sigma * normal());
}

/** Builds knowledge with one class per center and the same p95 for every class. */
export function makeKnowledge(centers: Record<string, Float32Array>, p95: number): Knowledge {
  return {
    version: 1,
    output: "embedding",
    dim: Object.values(centers)[0]!.length,
    classes: Object.entries(centers).map(([label, centroid]) => ({ label, centroid: l2Normalize(centroid), count: 100, p50: p95 / 2, p95 })),
  };
}

export const LABELS = ["cardboard", "glass", "metal"] as const;

/** Base time of the synthetic streams: 2024-05-01T08:00:00Z. */
export const T0 = Date.UTC(2024, 4, 1, 8, 0, 0);

let sequence = 0;

/** Builds a selector input; by default a confident "cardboard" frame that went to its bin. */
export function makeInput(embedding: Float32Array, overrides: Partial<SelectorInput> = {}): SelectorInput {
  sequence++;
  return {
    frameId: `frame-${sequence}`,
    capturedAt: T0,
    probabilities: [0.95, 0.03, 0.02],
    labels: LABELS,
    embedding,
    decisionReason: null,
    ...overrides,
  };
}

/** Builds an outbox example with `jpegBytes` bytes of image and a 16-value embedding. */
export function makeExample(frameId: string, priority: number, jpegBytes = 1_000, createdAt?: number): NewExample {
  const meta: ExampleMeta = {
    frameId,
    capturedAt: T0,
    source: "cam-1",
    model: { name: "sortline-trashnet", version: "1.0.0", sha256: "a".repeat(64) },
    top: [
      { label: "glass", p: 0.51 },
      { label: "plastic", p: 0.3 },
    ],
    reasons: ["low-confidence"],
    novelty: null,
    margin: 0.21,
    site: "plant-a",
    device: "line-1",
  };
  const jpeg = Buffer.alloc(jpegBytes, frameId.length % 251);
  jpeg.write(frameId, 0, "utf8");
  const embedding = Float32Array.from({ length: 16 }, (_, index) => index / 16 + priority);
  return { priority, meta, jpeg, embedding, createdAt };
}

/** Resolves once `condition` holds; rejects after `guardMs`, which only turns a hang into a clear failure. */
export async function waitFor(condition: () => boolean, what: string, guardMs = 10_000): Promise<void> {
  const started = Date.now();
  while (!condition()) {
    if (Date.now() - started > guardMs) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
