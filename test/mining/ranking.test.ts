import { describe, expect, it } from "vitest";

import { rankByCoverage, rankByTypicality } from "../../src/mining/ranking.js";
import { createRandom } from "../../src/mining/selector.js";

/** Unit vectors scattered around `groups` random directions; group sizes as given, plus a few outliers. */
function pool(sizes: number[], spread: number, outliers: number, seed = 3): { vectors: Float32Array[]; group: number[] } {
  const random = createRandom(seed);
  const gaussian = (): number => Math.sqrt(-2 * Math.log(random() + 1e-12)) * Math.cos(2 * Math.PI * random());
  const dim = 32;
  const centres = sizes.map(() => Float32Array.from({ length: dim }, gaussian));
  const vectors: Float32Array[] = [];
  const group: number[] = [];
  sizes.forEach((size, g) => {
    for (let i = 0; i < size; i++) {
      vectors.push(Float32Array.from(centres[g]!, (v) => v + spread * gaussian()));
      group.push(g);
    }
  });
  for (let i = 0; i < outliers; i++) {
    vectors.push(Float32Array.from({ length: dim }, () => 3 * gaussian()));
    group.push(-1);
  }
  return { vectors, group };
}

describe("rankByTypicality", () => {
  it("picks one typical member of each group and no outlier", () => {
    const { vectors, group } = pool([30, 20, 10], 0.2, 5);

    const picks = rankByTypicality(vectors, { count: 3 });

    expect(new Set(picks.map((i) => group[i]))).toEqual(new Set([0, 1, 2]));
  });

  it("spreads a larger budget over groups roughly by size", () => {
    const { vectors, group } = pool([40, 20, 10], 0.3, 0);

    const picks = rankByTypicality(vectors, { count: 14 });
    const perGroup = [0, 1, 2].map((g) => picks.filter((i) => group[i] === g).length);

    expect(picks).toHaveLength(14);
    expect(perGroup.every((n) => n >= 1)).toBe(true);
    expect(perGroup[0]).toBeGreaterThan(perGroup[2]!);
  });

  it("returns at most the pool and nothing for an empty one", () => {
    expect(rankByTypicality([], { count: 5 })).toEqual([]);
    expect(rankByTypicality([Float32Array.of(1, 0)], { count: 5 })).toEqual([0]);
  });
});

describe("rankByCoverage", () => {
  it("starts with the largest group and reaches every group before repeating one", () => {
    const { vectors, group } = pool([30, 15, 8], 0.15, 0);

    const order = rankByCoverage(vectors, { radius: 0.3, limit: 3 });

    expect(group[order[0]!]).toBe(0);
    expect(new Set(order.map((i) => group[i]))).toEqual(new Set([0, 1, 2]));
  });
});
