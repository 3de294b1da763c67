import { describe, expect, it } from "vitest";

import { DecisionPolicy, type DecisionSettings } from "../../src/decision/policy.js";

const LABELS = ["cardboard", "glass", "metal", "paper", "plastic", "trash"] as const;

function settings(overrides: Partial<DecisionSettings> = {}): DecisionSettings {
  return {
    bins: { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" },
    rejectBin: "reject",
    minConfidence: {},
    defaultMinConfidence: 0.5,
    topK: 3,
    ...overrides,
  };
}

/**
 * Returns class probabilities in label order. The values used in this file are sums of powers
 * of two, so they survive the Float32Array conversion exactly and comparisons with the
 * confidence floors are exact.
 */
function scores(byLabel: Partial<Record<(typeof LABELS)[number], number>>): Float32Array {
  return Float32Array.from(LABELS.map((label) => byLabel[label] ?? 0));
}

describe("DecisionPolicy bins", () => {
  it("maps each label to its bin", () => {
    const policy = new DecisionPolicy(settings({ defaultMinConfidence: 0 }), LABELS);

    const bins = LABELS.map((label) => policy.decide(scores({ [label]: 1 })).bin);

    expect(bins).toEqual(["fibre", "glass", "metal", "fibre", "plastic", "residual"]);
  });

  it("returns label, confidence and no reason when accepted", () => {
    const policy = new DecisionPolicy(settings(), LABELS);

    const decision = policy.decide(scores({ metal: 0.75, glass: 0.125, paper: 0.125 }));

    expect(decision.label).toBe("metal");
    expect(decision.confidence).toBe(0.75);
    expect(decision.bin).toBe("metal");
    expect(decision.reason).toBeNull();
  });

  it("exposes the reject bin name", () => {
    const policy = new DecisionPolicy(settings({ rejectBin: "manual-check" }), LABELS);

    expect(policy.rejectBinName).toBe("manual-check");
  });
});

describe("DecisionPolicy confidence floors", () => {
  it("rejects below the default floor", () => {
    const policy = new DecisionPolicy(settings({ defaultMinConfidence: 0.5 }), LABELS);

    const decision = policy.decide(scores({ glass: 0.375, metal: 0.25, plastic: 0.25, trash: 0.125 }));

    expect(decision.bin).toBe("reject");
    expect(decision.reason).toBe("low-confidence");
    expect(decision.label).toBe("glass");
    expect(decision.confidence).toBe(0.375);
  });

  it("accepts exactly at the floor", () => {
    const policy = new DecisionPolicy(settings({ defaultMinConfidence: 0.5 }), LABELS);

    const decision = policy.decide(scores({ glass: 0.5, metal: 0.25, plastic: 0.25 }));

    expect(decision.bin).toBe("glass");
    expect(decision.reason).toBeNull();
  });

  it("raises the floor for one class", () => {
    const policy = new DecisionPolicy(settings({ defaultMinConfidence: 0.5, minConfidence: { glass: 0.875 } }), LABELS);

    const glass = policy.decide(scores({ glass: 0.75, metal: 0.25 }));
    const metal = policy.decide(scores({ metal: 0.75, glass: 0.25 }));

    expect(glass.bin).toBe("reject");
    expect(glass.reason).toBe("low-confidence");
    expect(metal.bin).toBe("metal");
    expect(metal.reason).toBeNull();
  });

  it("lowers the floor for one class", () => {
    const policy = new DecisionPolicy(settings({ defaultMinConfidence: 0.5, minConfidence: { trash: 0.25 } }), LABELS);

    const trash = policy.decide(scores({ trash: 0.375, paper: 0.3125, plastic: 0.3125 }));
    const paper = policy.decide(scores({ paper: 0.375, trash: 0.3125, plastic: 0.3125 }));

    expect(trash.bin).toBe("residual");
    expect(trash.reason).toBeNull();
    expect(paper.bin).toBe("reject");
    expect(paper.reason).toBe("low-confidence");
  });

  it("applies the floor of the top-1 class only", () => {
    // glass has a floor above its probability, but metal is the top-1 class.
    const policy = new DecisionPolicy(settings({ minConfidence: { glass: 0.875 } }), LABELS);

    const decision = policy.decide(scores({ metal: 0.625, glass: 0.375 }));

    expect(decision.bin).toBe("metal");
    expect(decision.reason).toBeNull();
  });
});

describe("DecisionPolicy unmapped classes", () => {
  const withoutTrash = settings({ bins: { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic" } });

  it("lists labels without a bin", () => {
    const policy = new DecisionPolicy(withoutTrash, LABELS);

    expect(policy.unmappedLabels()).toEqual(["trash"]);
  });

  it("lists nothing when every label has a bin", () => {
    const policy = new DecisionPolicy(settings(), LABELS);

    expect(policy.unmappedLabels()).toEqual([]);
  });

  it("rejects an unmapped class with its reason", () => {
    const policy = new DecisionPolicy(withoutTrash, LABELS);

    const decision = policy.decide(scores({ trash: 0.875, paper: 0.125 }));

    expect(decision.bin).toBe("reject");
    expect(decision.reason).toBe("unmapped-class");
    expect(decision.label).toBe("trash");
    expect(decision.confidence).toBe(0.875);
  });

  it("reports unmapped before low confidence", () => {
    const policy = new DecisionPolicy(withoutTrash, LABELS);

    const decision = policy.decide(scores({ trash: 0.4375, paper: 0.1875, glass: 0.1875, metal: 0.1875 }));

    expect(decision.bin).toBe("reject");
    expect(decision.reason).toBe("unmapped-class");
  });
});

describe("DecisionPolicy topK", () => {
  const probabilities = scores({ cardboard: 0.0625, glass: 0.125, metal: 0.5, paper: 0.03125, plastic: 0.25, trash: 0.03125 });

  it("returns the k best, highest first", () => {
    const policy = new DecisionPolicy(settings({ topK: 3 }), LABELS);

    const { top } = policy.decide(probabilities);

    expect(top).toEqual([
      { label: "metal", p: 0.5 },
      { label: "plastic", p: 0.25 },
      { label: "glass", p: 0.125 },
    ]);
  });

  it("returns only the top-1 for k=1", () => {
    const policy = new DecisionPolicy(settings({ topK: 1 }), LABELS);

    expect(policy.decide(probabilities).top).toEqual([{ label: "metal", p: 0.5 }]);
  });

  it("caps k at the number of labels", () => {
    const policy = new DecisionPolicy(settings({ topK: 20 }), LABELS);

    const { top } = policy.decide(probabilities);

    expect(top).toHaveLength(LABELS.length);
    expect(top.map((entry) => entry.label).sort()).toEqual([...LABELS].sort());
  });

  it("keeps top when the frame is rejected", () => {
    const policy = new DecisionPolicy(settings({ topK: 2, defaultMinConfidence: 0.75 }), LABELS);

    const decision = policy.decide(probabilities);

    expect(decision.reason).toBe("low-confidence");
    expect(decision.top).toEqual([
      { label: "metal", p: 0.5 },
      { label: "plastic", p: 0.25 },
    ]);
  });
});
