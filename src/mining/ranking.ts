import { createRandom } from "../lib/random.js";
import { l2Normalize } from "./knowledge.js";

export interface CoverageOptions {
  /**
   * Cosine distance within which an example counts as covering another. With the ResNet-50
   * embedding, photos of one material on similar backgrounds mostly lie within 0.45 of each other.
   */
  radius?: number;
  /** Length of the ranking to return; default all. */
  limit?: number;
}

export const DEFAULT_COVERAGE_RADIUS = 0.45;

/**
 * Orders examples for labelling by greedy maximum coverage of the pool they come from: each next
 * example is the one whose neighbourhood (cosine distance below `radius`) contains the most examples
 * that no earlier pick covers yet.
 *
 * The first picks are the most typical examples of the largest groups. Later picks move to groups
 * not covered yet, so any prefix of the ranking spreads a labelling budget over the groups in
 * proportion to their size, without spending it on outliers. Costs O(n^2) dot
 * products, so callers cap the pool at a few thousand examples.
 */
export function rankByCoverage(embeddings: readonly ArrayLike<number>[], options: CoverageOptions = {}): number[] {
  const radius = options.radius ?? DEFAULT_COVERAGE_RADIUS;
  const n = embeddings.length;
  const limit = Math.min(options.limit ?? n, n);
  if (n === 0 || limit === 0) {
    return [];
  }

  const unit = embeddings.map((e) => l2Normalize(e));
  const dim = unit[0]!.length;
  const neighbours: number[][] = Array.from({ length: n }, (_, i) => [i]);
  for (let i = 0; i < n; i++) {
    const a = unit[i]!;
    for (let j = i + 1; j < n; j++) {
      const b = unit[j]!;
      let dot = 0;
      for (let k = 0; k < dim; k++) {
        dot += a[k]! * b[k]!;
      }
      if (1 - dot < radius) {
        neighbours[i]!.push(j);
        neighbours[j]!.push(i);
      }
    }
  }

  const gain = neighbours.map((list) => list.length);
  const covered = new Uint8Array(n);
  const picked = new Uint8Array(n);
  const order: number[] = [];
  while (order.length < limit) {
    let best = -1;
    for (let i = 0; i < n; i++) {
      if (!picked[i] && (best < 0 || gain[i]! > gain[best]!)) {
        best = i;
      }
    }
    if (best < 0) {
      break;
    }
    picked[best] = 1;
    order.push(best);
    for (const p of neighbours[best]!) {
      if (!covered[p]) {
        covered[p] = 1;
        for (const q of neighbours[p]!) {
          gain[q]!--;
        }
      }
    }
  }
  return order;
}

export interface TypicalityOptions {
  /** Number of examples to choose: the pool is split into this many clusters. */
  count: number;
  /** Neighbours whose mean cosine similarity measures how typical an example is. Default 20. */
  neighbours?: number;
  /** Lloyd iterations of the spherical k-means. Default 15. */
  iterations?: number;
  /** Seed of the k-means++ start. Default 1. */
  seed?: number;
}

function dotRows(a: Float32Array, b: Float32Array): number {
  let sum = 0;
  for (let k = 0; k < a.length; k++) {
    sum += a[k]! * b[k]!;
  }
  return sum;
}

/**
 * Chooses `count` examples for labelling: a spherical k-means splits the pool into `count`
 * clusters, and each cluster gives its most typical member (the highest mean similarity to its
 * nearest neighbours in the pool). Returns pool indices, largest cluster first.
 *
 * At small labelling budgets typical examples of many groups teach a classifier more than the
 * most uncertain or most unusual frames, which are often blurred, occluded or odd items. Costs
 * O(n^2) dot products for the typicality and O(n * count * iterations) for the clustering.
 */
export function rankByTypicality(embeddings: readonly ArrayLike<number>[], options: TypicalityOptions): number[] {
  const n = embeddings.length;
  const count = Math.min(options.count, n);
  if (count <= 0) {
    return [];
  }
  const unit = embeddings.map((e) => l2Normalize(e));
  const random = createRandom(options.seed ?? 1);
  const k = Math.min(options.neighbours ?? 20, n - 1);

  // Typicality: mean similarity to the k nearest neighbours.
  const typicality = new Float64Array(n);
  const similarities = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      similarities[j] = i === j ? -Infinity : dotRows(unit[i]!, unit[j]!);
    }
    const nearest = Array.from(similarities).sort((a, b) => b - a).slice(0, k);
    typicality[i] = k > 0 ? nearest.reduce((s, v) => s + v, 0) / k : 0;
  }

  // k-means++ start on cosine distance, then Lloyd iterations with re-normalised centroids.
  const centres: Float32Array[] = [unit[Math.floor(random() * n)]!.slice()];
  const best = new Float64Array(n).fill(Infinity);
  while (centres.length < count) {
    const last = centres[centres.length - 1]!;
    let total = 0;
    for (let i = 0; i < n; i++) {
      best[i] = Math.min(best[i]!, Math.max(0, 1 - dotRows(unit[i]!, last)));
      total += best[i]! * best[i]!;
    }
    let target = random() * total;
    let chosen = n - 1;
    for (let i = 0; i < n; i++) {
      target -= best[i]! * best[i]!;
      if (target <= 0) {
        chosen = i;
        break;
      }
    }
    centres.push(unit[chosen]!.slice());
  }
  const assignment = new Int32Array(n);
  for (let iteration = 0; iteration < (options.iterations ?? 15); iteration++) {
    for (let i = 0; i < n; i++) {
      let bestCentre = 0;
      let bestSimilarity = -Infinity;
      centres.forEach((centre, c) => {
        const similarity = dotRows(unit[i]!, centre);
        if (similarity > bestSimilarity) {
          bestSimilarity = similarity;
          bestCentre = c;
        }
      });
      assignment[i] = bestCentre;
    }
    centres.forEach((centre, c) => {
      const sum = new Float32Array(centre.length);
      let members = 0;
      for (let i = 0; i < n; i++) {
        if (assignment[i] === c) {
          members++;
          for (let d = 0; d < sum.length; d++) {
            sum[d]! += unit[i]![d]!;
          }
        }
      }
      if (members > 0) {
        centres[c] = l2Normalize(sum);
      }
    });
  }
  const clusters = new Map<number, number[]>();
  for (let i = 0; i < n; i++) {
    const members = clusters.get(assignment[i]!) ?? [];
    members.push(i);
    clusters.set(assignment[i]!, members);
  }
  return [...clusters.values()]
    .sort((a, b) => b.length - a.length)
    .map((members) => members.reduce((top, i) => (typicality[i]! > typicality[top]! ? i : top), members[0]!));
}
