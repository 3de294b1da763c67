import { topK, type Scored } from "../inference/runner.js";

export interface DecisionSettings {
  /** Class label to bin name. A label without a bin goes to the reject bin. */
  bins: Record<string, string>;
  rejectBin: string;
  /** Per-class minimum top-1 probability; classes not listed use `defaultMinConfidence`. */
  minConfidence: Record<string, number>;
  defaultMinConfidence: number;
  topK: number;
}

export type RejectReason = "low-confidence" | "unmapped-class" | "error";

export interface Decision {
  top: Scored[];
  label: string;
  confidence: number;
  bin: string;
  /** Set when the frame goes to the reject bin. */
  reason: RejectReason | null;
}

/** Turns model scores into a bin: class-to-bin map, per-class confidence floor, reject bin. */
export class DecisionPolicy {
  constructor(
    private readonly settings: DecisionSettings,
    private readonly labels: readonly string[],
  ) {}

  get rejectBinName(): string {
    return this.settings.rejectBin;
  }

  /** Labels of the model that have no bin; frames of these classes are rejected. */
  unmappedLabels(): string[] {
    return this.labels.filter((label) => this.settings.bins[label] === undefined);
  }

  decide(probabilities: Float32Array): Decision {
    const top = topK(probabilities, this.labels, Math.min(this.settings.topK, this.labels.length));
    const best = top[0]!;
    const floor = this.settings.minConfidence[best.label] ?? this.settings.defaultMinConfidence;
    const mapped = this.settings.bins[best.label];
    if (mapped === undefined) {
      return { top, label: best.label, confidence: best.p, bin: this.settings.rejectBin, reason: "unmapped-class" };
    }
    if (best.p < floor) {
      return { top, label: best.label, confidence: best.p, bin: this.settings.rejectBin, reason: "low-confidence" };
    }
    return { top, label: best.label, confidence: best.p, bin: mapped, reason: null };
  }
}
