import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { cosineDistance, KnowledgeLoadError, l2Normalize, loadKnowledge, noveltyOf, parseKnowledge } from "../../src/mining/knowledge.js";
import { makeTempDir } from "../audit/helpers.js";

function document(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    version: 1,
    output: "embedding",
    dim: 3,
    classes: [
      { label: "glass", centroid: [1, 0, 0], count: 40, p50: 0.1, p95: 0.2 },
      { label: "metal", centroid: [0, 1, 0], count: 30, p50: 0.2, p95: 0.4 },
    ],
    ...overrides,
  };
}

describe("loadKnowledge", () => {
  let temp: ReturnType<typeof makeTempDir>;
  const file = (): string => path.join(temp.dir, "knowledge.json");

  beforeEach(() => {
    temp = makeTempDir("knowledge");
  });

  afterEach(() => {
    temp.remove();
  });

  it("returns undefined without the file", async () => {
    await expect(loadKnowledge(temp.dir)).resolves.toBeUndefined();
  });

  it("reads a valid file", async () => {
    writeFileSync(file(), JSON.stringify(document()));

    const knowledge = (await loadKnowledge(temp.dir, { dim: 3, labels: ["glass", "metal", "paper"], output: "embedding" }))!;

    expect(knowledge.dim).toBe(3);
    expect(knowledge.classes.map((entry) => entry.label)).toEqual(["glass", "metal"]);
    expect(knowledge.classes[0]!.centroid).toBeInstanceOf(Float32Array);
    expect(Array.from(knowledge.classes[1]!.centroid)).toEqual([0, 1, 0]);
    expect(knowledge.classes[1]!.p95).toBe(0.4);
  });

  it("names the file when JSON is broken", async () => {
    writeFileSync(file(), '{"version": 1, "classes": [');

    const loading = loadKnowledge(temp.dir);

    await expect(loading).rejects.toThrow(KnowledgeLoadError);
    await expect(loading).rejects.toThrow(/knowledge\.json: not valid JSON/);
  });

  it("rejects a file that fails the schema", async () => {
    writeFileSync(file(), JSON.stringify(document({ version: 2 })));

    await expect(loadKnowledge(temp.dir)).rejects.toThrow(/invalid: \/version must be equal to constant/);
  });

  it("rejects a centroid that is not unit length", async () => {
    const classes = [{ label: "glass", centroid: [0.5, 0.5, 0], count: 4, p50: 0.1, p95: 0.2 }];
    writeFileSync(file(), JSON.stringify(document({ classes })));

    await expect(loadKnowledge(temp.dir)).rejects.toThrow(/\/classes\/0 \(glass\): centroid has length 0\.7071\d+; it must be unit length/);
  });

  it("rejects a centroid of the wrong length", async () => {
    const classes = [{ label: "glass", centroid: [1, 0], count: 4, p50: 0.1, p95: 0.2 }];
    writeFileSync(file(), JSON.stringify(document({ classes })));

    await expect(loadKnowledge(temp.dir)).rejects.toThrow(/centroid has 2 values, dim is 3/);
  });

  it("rejects a dim that differs from the model", async () => {
    writeFileSync(file(), JSON.stringify(document()));

    await expect(loadKnowledge(temp.dir, { dim: 2048 })).rejects.toThrow(/dim is 3, but the model's embeddings have 2048 values/);
  });

  it("rejects labels the model does not have", async () => {
    writeFileSync(file(), JSON.stringify(document()));

    await expect(loadKnowledge(temp.dir, { labels: ["glass", "paper"] })).rejects.toThrow(/\(metal\): label is not one of the model's labels/);
  });

  it("rejects a label listed twice", async () => {
    const classes = [
      { label: "glass", centroid: [1, 0, 0], count: 4, p50: 0.1, p95: 0.2 },
      { label: "glass", centroid: [0, 1, 0], count: 4, p50: 0.1, p95: 0.2 },
    ];
    writeFileSync(file(), JSON.stringify(document({ classes })));

    await expect(loadKnowledge(temp.dir)).rejects.toThrow(/label appears twice/);
  });

  it("rejects p50 above p95", async () => {
    const classes = [{ label: "glass", centroid: [1, 0, 0], count: 4, p50: 0.3, p95: 0.2 }];
    writeFileSync(file(), JSON.stringify(document({ classes })));

    await expect(loadKnowledge(temp.dir)).rejects.toThrow(/p50 0.3 is greater than p95 0.2/);
  });

  it("checks the sha256 the manifest names", async () => {
    const text = JSON.stringify(document());
    writeFileSync(file(), text);
    const sha256 = createHash("sha256").update(text).digest("hex");
    writeFileSync(path.join(temp.dir, "manifest.json"), JSON.stringify({ knowledge: { file: "knowledge.json", sha256 } }));

    await expect(loadKnowledge(temp.dir)).resolves.toBeDefined();

    writeFileSync(path.join(temp.dir, "manifest.json"), JSON.stringify({ knowledge: { file: "knowledge.json", sha256: "0".repeat(64) } }));
    await expect(loadKnowledge(temp.dir)).rejects.toThrow(/but manifest.json says 0{64}/);
  });
});

describe("noveltyOf", () => {
  const knowledge = parseKnowledge(document(), "test");

  it("divides the nearest distance by p95", () => {
    // cos(e, glass) = 0.9 gives distance 0.1 and score 0.1 / 0.2 = 0.5.
    const embedding = [0.9, Math.sqrt(1 - 0.81), 0];

    const novelty = noveltyOf(knowledge, embedding);

    expect(novelty.nearest).toBe("glass");
    expect(novelty.distance).toBeCloseTo(0.1, 6);
    expect(novelty.score).toBeCloseTo(0.5, 6);
  });

  it("takes the minimum over classes", () => {
    // Distance 0.3 to metal scores 0.75. The distance to glass is 1 - 0.2 = 0.8, which scores 4.
    const embedding = [0.2, 0.7, Math.sqrt(1 - 0.04 - 0.49)];

    const novelty = noveltyOf(knowledge, embedding);

    expect(novelty.nearest).toBe("metal");
    expect(novelty.score).toBeCloseTo(0.75, 6);
  });

  it("ignores the embedding's length", () => {
    expect(noveltyOf(knowledge, [0, 0, 5]).score).toBeCloseTo(noveltyOf(knowledge, [0, 0, 1]).score, 6);
    expect(noveltyOf(knowledge, [0, 0, 1]).score).toBeCloseTo(1 / 0.4, 6);
  });

  it("rejects an embedding of another length", () => {
    expect(() => noveltyOf(knowledge, [1, 0])).toThrow(/embedding has 2 values; the knowledge has dim 3/);
  });
});

describe("vector helpers", () => {
  it("computes cosine distance", () => {
    expect(cosineDistance([1, 0], [0, 1])).toBeCloseTo(1);
    expect(cosineDistance([1, 1], [2, 2])).toBeCloseTo(0);
    expect(cosineDistance([1, 0], [-1, 0])).toBeCloseTo(2);
    expect(cosineDistance([0, 0], [1, 0])).toBe(1);
  });

  it("normalises to unit length", () => {
    expect(Array.from(l2Normalize([3, 4]))).toEqual([Math.fround(0.6), Math.fround(0.8)]);
    expect(Array.from(l2Normalize([0, 0]))).toEqual([0, 0]);
  });
});
