import { describe, expect, it } from "vitest";

import { cosineDistance } from "../../src/mining/knowledge.js";
import {
  createRandom,
  HardExampleSelector,
  randomPick,
  REASON_WEIGHTS,
  selectFromStream,
  type SelectorInput,
  type SelectorOptions,
} from "../../src/mining/selector.js";
import { around, gaussian, makeInput, makeKnowledge, randomDirection, T0 } from "./helpers.js";

const MINUTE_MS = 60_000;

/** Options that turn off the random samples, so only the deterministic reasons make candidates. */
const NO_RANDOM: SelectorOptions = { randomRate: 0, budget: null };

describe("HardExampleSelector reasons", () => {
  const normal = gaussian(11);

  it("flags low top-1 probability", () => {
    const selector = new HardExampleSelector(NO_RANDOM);

    const selection = selector.consider(makeInput(randomDirection(normal), { probabilities: [0.5, 0.3, 0.2] }));

    expect(selection.reasons).toEqual(["low-confidence"]);
    expect(selection.selected).toBe(true);
    expect(selection.confidence).toBeCloseTo(0.5);
    expect(selection.label).toBe("cardboard");
  });

  it("flags a small top-2 margin", () => {
    const selector = new HardExampleSelector({ ...NO_RANDOM, lowConfidence: 0.5 });

    const selection = selector.consider(makeInput(randomDirection(normal), { probabilities: [0.45, 0.55, 0] }));

    expect(selection.reasons).toEqual(["margin"]);
    expect(selection.margin).toBeCloseTo(0.1);
    expect(selection.label).toBe("glass");
  });

  it("flags frames sent to the reject bin", () => {
    const selector = new HardExampleSelector(NO_RANDOM);

    const unmapped = selector.consider(makeInput(randomDirection(normal), { decisionReason: "unmapped-class" }));
    const floor = selector.consider(makeInput(randomDirection(normal), { decisionReason: "low-confidence" }));

    expect(unmapped.reasons).toEqual(["reject"]);
    expect(floor.reasons).toEqual(["reject"]);
  });

  it("flags embeddings outside every class", () => {
    const centers = { cardboard: randomDirection(normal), glass: randomDirection(normal), metal: randomDirection(normal) };
    const selector = new HardExampleSelector({ ...NO_RANDOM, knowledge: makeKnowledge(centers, 0.3) });

    const known = selector.consider(makeInput(around(centers.glass, 0.3, normal)));
    const novel = selector.consider(makeInput(randomDirection(normal)));

    expect(known.reasons).toEqual([]);
    expect(known.novelty).toBeLessThan(1);
    expect(novel.reasons).toEqual(["novel"]);
    expect(novel.novelty).toBeGreaterThan(1);
  });

  it("reports no novelty without knowledge", () => {
    const selector = new HardExampleSelector(NO_RANDOM);

    const selection = selector.consider(makeInput(randomDirection(normal)));

    expect(selection.novelty).toBeNull();
    expect(selection.reasons).toEqual([]);
    expect(selection.selected).toBe(false);
    expect(selection.skippedBecause).toBeUndefined();
  });

  it("samples confident frames at randomRate 1", () => {
    const selector = new HardExampleSelector({ randomRate: 1, budget: null });

    const selection = selector.consider(makeInput(randomDirection(normal)));

    expect(selection.reasons).toEqual(["random"]);
    expect(selection.selected).toBe(true);
    expect(selection.priority).toBeLessThan(1);
  });

  it("ranks novel, reject, low-confidence, margin, random", () => {
    const centers = { cardboard: randomDirection(normal) };
    const base: SelectorOptions = { budget: null, lowConfidence: 0.5, knowledge: makeKnowledge(centers, 0.3) };
    const known = (): Float32Array => around(centers.cardboard, 0.3, normal);
    const cases: [string, SelectorInput, SelectorOptions][] = [
      ["novel", makeInput(randomDirection(normal)), { ...base, randomRate: 0 }],
      ["reject", makeInput(known(), { decisionReason: "unmapped-class" }), { ...base, randomRate: 0 }],
      ["low-confidence", makeInput(known(), { probabilities: [0.45, 0.25, 0.3] }), { ...base, randomRate: 0 }],
      ["margin", makeInput(known(), { probabilities: [0.52, 0.48, 0] }), { ...base, randomRate: 0 }],
      ["random", makeInput(known()), { ...base, randomRate: 1 }],
    ];

    const priorities = cases.map(([reason, input, options]) => {
      const selection = new HardExampleSelector(options).consider(input);
      expect(selection.reasons).toEqual([reason]);
      return selection.priority;
    });

    for (let index = 1; index < priorities.length; index++) {
      expect(priorities[index - 1]).toBeGreaterThan(priorities[index]!);
    }
    expect(priorities[0]).toBeGreaterThanOrEqual(REASON_WEIGHTS.novel);
  });

  it("adds the weights of several reasons", () => {
    const selector = new HardExampleSelector(NO_RANDOM);

    const selection = selector.consider(makeInput(randomDirection(normal), { probabilities: [0.4, 0.35, 0.25], decisionReason: "low-confidence" }));

    expect(selection.reasons).toEqual(["reject", "low-confidence", "margin"]);
    expect(selection.priority).toBeCloseTo(REASON_WEIGHTS.reject + REASON_WEIGHTS["low-confidence"] + REASON_WEIGHTS.margin + (1 - 0.05));
  });

  it("rejects invalid options", () => {
    expect(() => new HardExampleSelector({ minDistance: -0.1 })).toThrow(/minDistance is -0.1/);
    expect(() => new HardExampleSelector({ budget: { perHour: 0 } })).toThrow(/budget.perHour is 0/);
    expect(() => new HardExampleSelector({ budget: { perHour: 10, perReason: { bogus: 1 } as never } })).toThrow(/unknown reason 'bogus'/);
    expect(() => new HardExampleSelector({ maxClusterShare: 0 })).toThrow(/maxClusterShare/);
  });
});

describe("HardExampleSelector near-duplicates", () => {
  it("selects one of many near-duplicate frames", () => {
    const normal = gaussian(21);
    const item = randomDirection(normal);
    const selector = new HardExampleSelector({ ...NO_RANDOM, minDistance: 0.1 });
    const uncertain = { probabilities: [0.5, 0.3, 0.2] };

    const results = Array.from({ length: 20 }, () => selector.consider(makeInput(around(item, 0.05, normal), uncertain)));
    const other = selector.consider(makeInput(randomDirection(normal), uncertain));

    expect(results.filter((result) => result.selected)).toHaveLength(1);
    expect(results.filter((result) => result.skippedBecause === "duplicate")).toHaveLength(19);
    expect(selector.stats.skipped.duplicate).toBe(19);
    expect(other.selected).toBe(true);
  });

  it("forgets selected embeddings on reset", () => {
    const normal = gaussian(22);
    const item = randomDirection(normal);
    const selector = new HardExampleSelector(NO_RANDOM);
    const uncertain = { probabilities: [0.5, 0.3, 0.2] };

    expect(selector.consider(makeInput(item, uncertain)).selected).toBe(true);
    expect(selector.consider(makeInput(item, uncertain)).skippedBecause).toBe("duplicate");
    selector.resetEmbeddingState();

    expect(selector.consider(makeInput(item, uncertain)).selected).toBe(true);
  });

  it("keeps only memorySize recent embeddings", () => {
    const normal = gaussian(23);
    const first = randomDirection(normal);
    const selector = new HardExampleSelector({ ...NO_RANDOM, memorySize: 3 });
    const uncertain = { probabilities: [0.5, 0.3, 0.2] };

    selector.consider(makeInput(first, uncertain));
    for (let index = 0; index < 3; index++) {
      selector.consider(makeInput(randomDirection(normal), uncertain));
    }

    expect(selector.consider(makeInput(first, uncertain)).selected).toBe(true);
  });
});

describe("HardExampleSelector budgets", () => {
  const uncertain = { probabilities: [0.5, 0.3, 0.2] };

  it("stops at the burst and refills over time", () => {
    const normal = gaussian(31);
    const selector = new HardExampleSelector({ randomRate: 0, budget: { perHour: 10, burst: 2 } });

    const first = Array.from({ length: 10 }, () => selector.consider(makeInput(randomDirection(normal), { ...uncertain, capturedAt: T0 })));
    // 10 per hour refills one token every 6 minutes.
    const early = selector.consider(makeInput(randomDirection(normal), { ...uncertain, capturedAt: T0 + 5 * MINUTE_MS }));
    const later = selector.consider(makeInput(randomDirection(normal), { ...uncertain, capturedAt: T0 + 6 * MINUTE_MS }));
    const after = selector.consider(makeInput(randomDirection(normal), { ...uncertain, capturedAt: T0 + 6 * MINUTE_MS }));

    expect(first.filter((result) => result.selected)).toHaveLength(2);
    expect(first.filter((result) => result.skippedBecause === "budget")).toHaveLength(8);
    expect(early.skippedBecause).toBe("budget");
    expect(later.selected).toBe(true);
    expect(after.skippedBecause).toBe("budget");
    expect(selector.stats.skipped.budget).toBe(10);
  });

  it("ignores capture times that go backwards", () => {
    const normal = gaussian(32);
    const selector = new HardExampleSelector({ randomRate: 0, budget: { perHour: 10, burst: 1 } });

    expect(selector.consider(makeInput(randomDirection(normal), { ...uncertain, capturedAt: T0 + 60 * MINUTE_MS })).selected).toBe(true);
    const older = selector.consider(makeInput(randomDirection(normal), { ...uncertain, capturedAt: T0 }));

    expect(older.skippedBecause).toBe("budget");
  });

  it("caps a single reason", () => {
    const normal = gaussian(33);
    const selector = new HardExampleSelector({ randomRate: 0, lowConfidence: 0.5, budget: { perHour: 100, burst: 10, perReason: { margin: 5 } } });
    const marginOnly = { probabilities: [0.55, 0.45, 0] };

    const first = selector.consider(makeInput(randomDirection(normal), marginOnly));
    const second = selector.consider(makeInput(randomDirection(normal), marginOnly));
    const rejected = selector.consider(makeInput(randomDirection(normal), { ...marginOnly, decisionReason: "unmapped-class" }));

    expect(first.selected).toBe(true);
    expect(second.skippedBecause).toBe("reason-cap");
    expect(rejected.reasons).toEqual(["reject", "margin"]);
    expect(rejected.selected).toBe(true);
    expect(selector.stats.skipped["reason-cap"]).toBe(1);
  });
});

interface GroupFrame extends SelectorInput {
  group: string;
}

/**
 * Builds a stream over one hour: novel frames from three new groups (A takes 80%) that the old
 * model scores as uncertain look-alikes, mixed at random with confident frames of known classes.
 */
function novelGroupStream(seed: number, known: number): { frames: GroupFrame[]; options: SelectorOptions } {
  const normal = gaussian(seed);
  const random = createRandom(seed);
  const centers = { cardboard: randomDirection(normal), glass: randomDirection(normal), metal: randomDirection(normal) };
  const groups = { A: randomDirection(normal), B: randomDirection(normal), C: randomDirection(normal) };
  const plan: string[] = [...Array<string>(160).fill("A"), ...Array<string>(20).fill("B"), ...Array<string>(20).fill("C"), ...Array<string>(known).fill("known")];
  for (let index = plan.length - 1; index > 0; index--) {
    const swap = Math.floor(random() * (index + 1));
    [plan[index], plan[swap]] = [plan[swap]!, plan[index]!];
  }
  const stepMs = (60 * MINUTE_MS) / plan.length;
  const frames = plan.map((group, index): GroupFrame => {
    const capturedAt = T0 + Math.round(index * stepMs);
    if (group === "known") {
      const label = (["cardboard", "glass", "metal"] as const)[index % 3]!;
      return { ...makeInput(around(centers[label], 0.3, normal), { capturedAt }), group };
    }
    const center = groups[group as keyof typeof groups];
    // Spread 0.5 puts two members of a group about 0.2 apart: no duplicates, one cluster.
    return { ...makeInput(around(center, 0.5, normal), { capturedAt, probabilities: [0.4, 0.35, 0.25] }), group };
  });
  return { frames, options: { knowledge: makeKnowledge(centers, 0.3), randomRate: 0, minDistance: 0.1, clusterRadius: 0.35 } };
}

type GroupCounts = Record<"A" | "B" | "C" | "known", number>;

function countGroups(frames: readonly GroupFrame[]): GroupCounts {
  const counts: GroupCounts = { A: 0, B: 0, C: 0, known: 0 };
  for (const frame of frames) {
    counts[frame.group as keyof GroupCounts]++;
  }
  return counts;
}

describe("HardExampleSelector novelty clusters", () => {
  it("places group members between thresholds", () => {
    const { frames } = novelGroupStream(41, 0);
    const a = frames.filter((frame) => frame.group === "A");
    const distances = a.slice(1, 20).map((frame) => cosineDistance(frame.embedding, a[0]!.embedding));

    expect(Math.min(...distances)).toBeGreaterThan(0.1);
    expect(Math.max(...distances)).toBeLessThan(0.35);
  });

  it("spreads picks across novel groups", () => {
    const { frames, options } = novelGroupStream(42, 0);
    const budget = { perHour: 24, burst: 4 };
    const capped = new HardExampleSelector({ ...options, budget, maxClusterShare: 0.25 });
    const uncapped = new HardExampleSelector({ ...options, budget, maxClusterShare: 1 });

    const cappedPicks = frames.filter((frame) => capped.consider(frame).selected);
    const uncappedPicks = frames.filter((frame) => uncapped.consider(frame).selected);

    const withCap = countGroups(cappedPicks);
    const withoutCap = countGroups(uncappedPicks);
    // Each cluster may take 1 at once and 6 per hour (a quarter of the bucket and of the rate).
    expect(withCap.A).toBeLessThanOrEqual(7);
    expect(withCap.B).toBeGreaterThanOrEqual(3);
    expect(withCap.C).toBeGreaterThanOrEqual(3);
    expect(capped.stats.skipped["cluster-cap"]).toBeGreaterThan(0);
    expect(capped.stats.clusters).toBe(3);
    expect(withoutCap.A).toBeGreaterThan(2 * (withoutCap.B + withoutCap.C));
  });

  it("evicts the least recently joined cluster", () => {
    const normal = gaussian(43);
    const centers = { cardboard: randomDirection(normal) };
    const selector = new HardExampleSelector({ ...NO_RANDOM, knowledge: makeKnowledge(centers, 0.3), maxClusters: 2 });
    const groups = [randomDirection(normal), randomDirection(normal), randomDirection(normal)];

    const first = selector.consider(makeInput(around(groups[0]!, 0.5, normal))).cluster;
    selector.consider(makeInput(around(groups[1]!, 0.5, normal)));
    selector.consider(makeInput(around(groups[0]!, 0.5, normal)));
    const third = selector.consider(makeInput(around(groups[2]!, 0.5, normal))).cluster;
    const firstAgain = selector.consider(makeInput(around(groups[0]!, 0.5, normal))).cluster;
    const secondAgain = selector.consider(makeInput(around(groups[1]!, 0.5, normal))).cluster;

    expect(selector.stats.clusters).toBe(2);
    expect(third).toBe(3);
    expect(firstAgain).toBe(first);
    // The cluster of groups[1] was the least recently joined when groups[2] arrived, so it was dropped.
    expect(secondAgain).toBe(4);
  });

  it("clusters uncertain frames without knowledge", () => {
    const { frames } = novelGroupStream(44, 0);
    const selector = new HardExampleSelector({ randomRate: 0, clusterScope: "uncertain", budget: { perHour: 24, burst: 4 } });

    const picks = countGroups(frames.filter((frame) => selector.consider({ ...frame }).selected));

    expect(picks.A).toBeLessThanOrEqual(7);
    expect(picks.B).toBeGreaterThanOrEqual(3);
    expect(picks.C).toBeGreaterThanOrEqual(3);
  });
});

describe("HardExampleSelector random samples", () => {
  it("balances random samples across classes", () => {
    const normal = gaussian(51);
    const random = createRandom(52);
    const selector = new HardExampleSelector({ randomRate: 0.02, budget: null, minDistance: 0 });
    const seen = { cardboard: 0, glass: 0 };
    const picked = { cardboard: 0, glass: 0 };

    for (let index = 0; index < 10_000; index++) {
      const rare = random() < 0.05;
      const label = rare ? "glass" : "cardboard";
      const probabilities = rare ? [0.02, 0.96, 0.02] : [0.96, 0.02, 0.02];
      const selection = selector.consider(makeInput(randomDirection(normal, 16), { probabilities }));
      seen[label]++;
      if (selection.reasons.includes("random")) {
        picked[label]++;
      }
    }

    // randomRate 0.02 of 10000 frames, split over two classes: about 100 samples each.
    expect(picked.cardboard).toBeGreaterThan(60);
    expect(picked.cardboard).toBeLessThan(140);
    expect(picked.glass).toBeGreaterThan(60);
    expect(picked.glass).toBeLessThan(140);
    expect(picked.glass / seen.glass).toBeGreaterThan(10 * (picked.cardboard / seen.cardboard));
  });

  it("repeats choices for the same seed", () => {
    const run = (seed: number): boolean[] => {
      const normal = gaussian(53);
      const selector = new HardExampleSelector({ randomRate: 0.3, budget: null, seed });
      return Array.from({ length: 200 }, () => selector.consider(makeInput(randomDirection(normal))).selected);
    };

    expect(run(7)).toEqual(run(7));
    expect(run(7)).not.toEqual(run(8));
  });
});

describe("selectFromStream", () => {
  it("spreads a label budget across novel groups", () => {
    const { frames, options } = novelGroupStream(61, 300);

    const mined = countGroups(selectFromStream(frames, { ...options, total: 12, maxClusterShare: 0.25, ranking: "priority" }));
    const uncapped = countGroups(selectFromStream(frames, { ...options, total: 12, maxClusterShare: 1, ranking: "priority" }));

    expect(mined.A + mined.B + mined.C + mined.known).toBe(12);
    expect(mined.B).toBeGreaterThanOrEqual(3);
    expect(mined.C).toBeGreaterThanOrEqual(3);
    expect(uncapped.A).toBeGreaterThanOrEqual(7);
  });

  it("returns frames in stream order", () => {
    const { frames, options } = novelGroupStream(62, 100);

    const chosen = selectFromStream(frames, { ...options, total: 25 });
    const positions = chosen.map((frame) => frames.indexOf(frame));

    expect(positions).toEqual([...positions].sort((a, b) => a - b));
    expect(new Set(positions).size).toBe(25);
  });

  it("returns fewer frames when candidates run out", () => {
    const normal = gaussian(63);
    const frames = Array.from({ length: 50 }, () => makeInput(randomDirection(normal)));
    frames[10] = makeInput(randomDirection(normal), { probabilities: [0.4, 0.3, 0.3] });

    const chosen = selectFromStream(frames, { randomRate: 0, total: 25 });

    expect(chosen).toEqual([frames[10]]);
  });
});

describe("randomPick", () => {
  const frames = Array.from({ length: 100 }, (_, index) => index);

  it("picks n distinct frames in stream order", () => {
    const picked = randomPick(frames, 25, 3);

    expect(picked).toHaveLength(25);
    expect(new Set(picked).size).toBe(25);
    expect(picked).toEqual([...picked].sort((a, b) => a - b));
  });

  it("repeats a pick for the same seed", () => {
    expect(randomPick(frames, 10, 3)).toEqual(randomPick(frames, 10, 3));
    expect(randomPick(frames, 10, 3)).not.toEqual(randomPick(frames, 10, 4));
  });

  it("returns every frame when n is larger", () => {
    expect(randomPick(frames.slice(0, 5), 10, 1)).toEqual([0, 1, 2, 3, 4]);
  });
});
