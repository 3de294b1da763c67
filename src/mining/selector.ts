/**
 * Hard-example selection: decides per scored frame whether a person should label it so the
 * trainer can retrain. Pure logic with no I/O. Time comes from the frames' capture times, so a
 * recorded stream replays with the same choices, and randomness comes from a seeded PRNG.
 */
import type { RejectReason } from "../decision/policy.js";
import { createRandom } from "../lib/random.js";
import { rankByTypicality } from "./ranking.js";
import { dot, l2Normalize, noveltyOf, type Knowledge } from "./knowledge.js";

/** Candidate reasons, highest weight first. */
export const CANDIDATE_REASONS = ["novel", "reject", "low-confidence", "margin", "random"] as const;
export type CandidateReason = (typeof CANDIDATE_REASONS)[number];

/** Reasons for not selecting a candidate. */
export const SKIP_REASONS = ["duplicate", "cluster-cap", "reason-cap", "budget"] as const;
export type SkipReason = (typeof SKIP_REASONS)[number];

/**
 * Weight of each reason in the priority. A frame's priority is the sum of the weights of its
 * reasons plus (1 - margin), so a frame with several reasons or close top-2 scores ranks higher.
 * A novel frame scores at least 4, a rejected one at least 3, and a frame that is only a random
 * sample scores below 1.
 */
export const REASON_WEIGHTS: Readonly<Record<CandidateReason, number>> = {
  novel: 4,
  reject: 3,
  "low-confidence": 2,
  margin: 1,
  random: 0,
};

/** One scored frame, the input of the selector. */
export interface SelectorInput {
  frameId: string;
  /** Milliseconds since the Unix epoch; the budgets' clock. */
  capturedAt: number;
  probabilities: ArrayLike<number>;
  /** Model labels, in the order of `probabilities`. */
  labels: readonly string[];
  embedding: ArrayLike<number>;
  /** Reason of the decision policy: null when the frame went to a bin, otherwise why it was rejected. */
  decisionReason: RejectReason | null;
}

export interface SelectorBudget {
  /** Frames selected per hour over all reasons (token bucket refill rate). */
  perHour: number;
  /** Bucket size: frames that may be selected at once after a quiet period. Default: max(1, perHour / 6). */
  burst?: number;
  /** Optional cap per hour for single reasons, for example `{ random: 6 }`. */
  perReason?: Partial<Record<CandidateReason, number>>;
}

export interface SelectorOptions {
  /** Top-1 probability below which a frame is a "low-confidence" candidate. Default 0.6. */
  lowConfidence?: number;
  /** Top-1 minus top-2 probability below which a frame is a "margin" candidate. Default 0.15. */
  minMargin?: number;
  /** Novelty above which a frame is a "novel" candidate; needs `knowledge`. Default 1. */
  noveltyThreshold?: number;
  /** Class centroids of the model. Without them no frame is "novel". */
  knowledge?: Knowledge;
  /**
   * Share of all frames picked as class-balanced "random" samples. Each predicted class gets an
   * equal part of it, so rare classes are sampled at a higher rate than common ones. Default 0.005.
   */
  randomRate?: number;
  /** Half-life, in frames, of the per-class frame counts behind the random rates. Default 5000. */
  classHalfLife?: number;
  /**
   * Cosine distance below which a candidate counts as a near-duplicate of a recently selected frame.
   * Default 0.1. With models/default, re-encoded and slightly shifted copies of one photo in
   * demo/photos lie below 0.07, and two different photos of one class lie above 0.3.
   */
  minDistance?: number;
  /** Recently selected embeddings kept for the near-duplicate check. Default 256. */
  memorySize?: number;
  /** Cosine distance from a cluster's leader within which a candidate joins that cluster. Default 0.35. */
  clusterRadius?: number;
  /** Clusters kept; the least recently joined one is dropped to make room. Default 32. */
  maxClusters?: number;
  /** Share of the budget any one cluster may take (its own token bucket). Default 0.25. */
  maxClusterShare?: number;
  /**
   * Candidates that are clustered and capped: "novel" ones only, or every candidate with a reason
   * other than "random". The second helps when the model has no knowledge file. Default "novel".
   */
  clusterScope?: "novel" | "uncertain";
  /** Hourly budgets. Default { perHour: 60 }. null means no budget, no reason caps and no cluster caps. */
  budget?: SelectorBudget | null;
  /** Seed of the PRNG behind the random samples. Default 1. */
  seed?: number;
}

/** Result of `HardExampleSelector.consider`. */
export interface Selection {
  selected: boolean;
  /** Reasons the frame is a candidate, highest weight first; empty when it is not one. */
  reasons: CandidateReason[];
  /** Sum of REASON_WEIGHTS of the reasons plus (1 - margin); 0 when the frame is no candidate. */
  priority: number;
  /** Novelty score, or null without knowledge. */
  novelty: number | null;
  /** Top-1 minus top-2 probability. */
  margin: number;
  /** Top-1 label and probability. */
  label: string;
  confidence: number;
  /** Cluster id of a clustered candidate; ids are never reused. */
  cluster?: number;
  /** Set when the frame was a candidate but not selected. */
  skippedBecause?: SkipReason;
}

export interface SelectorStats {
  frames: number;
  candidates: number;
  selected: number;
  /** Selected frames per reason; a frame with two reasons counts for both. */
  selectedByReason: Record<CandidateReason, number>;
  candidatesByReason: Record<CandidateReason, number>;
  skipped: Record<SkipReason, number>;
  /** Clusters currently kept. */
  clusters: number;
}

const HOUR_MS = 3_600_000;

const DEFAULTS = {
  lowConfidence: 0.6,
  minMargin: 0.15,
  noveltyThreshold: 1,
  randomRate: 0.005,
  classHalfLife: 5_000,
  minDistance: 0.1,
  memorySize: 256,
  clusterRadius: 0.35,
  maxClusters: 32,
  maxClusterShare: 0.25,
  clusterScope: "novel" as "novel" | "uncertain",
  seed: 1,
};

const DEFAULT_BUDGET: SelectorBudget = { perHour: 60 };

export { createRandom };

/** A token bucket on an external clock in milliseconds. It starts full at the first call. */
export class TokenBucket {
  private tokens: number;
  private updatedAt: number | undefined;

  constructor(
    readonly capacity: number,
    readonly perHour: number,
  ) {
    this.tokens = capacity;
  }

  /** Returns whether a whole token is available at `now`. */
  available(now: number): boolean {
    this.refill(now);
    return this.tokens >= 1;
  }

  /** Takes one token; call it only after `available` returned true. */
  take(now: number): void {
    this.refill(now);
    this.tokens -= 1;
  }

  private refill(now: number): void {
    if (this.updatedAt !== undefined && now > this.updatedAt) {
      this.tokens = Math.min(this.capacity, this.tokens + ((now - this.updatedAt) * this.perHour) / HOUR_MS);
    }
    this.updatedAt = Math.max(now, this.updatedAt ?? now);
  }
}

interface Cluster {
  id: number;
  leader: Float32Array;
  members: number;
  lastJoined: number;
  bucket: TokenBucket | undefined;
}

type Resolved = typeof DEFAULTS & { knowledge: Knowledge | undefined; budget: SelectorBudget | null };

function resolveOptions(options: SelectorOptions): Resolved {
  const resolved: Resolved = {
    ...DEFAULTS,
    ...Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined)),
    knowledge: options.knowledge,
    budget: options.budget === undefined ? DEFAULT_BUDGET : options.budget,
  };
  const fraction = (value: number): boolean => Number.isFinite(value) && value >= 0 && value <= 1;
  const positive = (value: number): boolean => Number.isFinite(value) && value > 0;
  const distance = (value: number): boolean => Number.isFinite(value) && value >= 0 && value <= 2;
  const count = (value: number): boolean => Number.isInteger(value) && value >= 1;
  const checks: [string, number, (value: number) => boolean, string][] = [
    ["lowConfidence", resolved.lowConfidence, fraction, "a probability in [0, 1]"],
    ["minMargin", resolved.minMargin, fraction, "a probability difference in [0, 1]"],
    ["noveltyThreshold", resolved.noveltyThreshold, positive, "a number > 0"],
    ["randomRate", resolved.randomRate, fraction, "a share of frames in [0, 1]"],
    ["classHalfLife", resolved.classHalfLife, positive, "a number of frames > 0"],
    ["minDistance", resolved.minDistance, distance, "a cosine distance in [0, 2]"],
    ["memorySize", resolved.memorySize, count, "a whole number >= 1"],
    ["clusterRadius", resolved.clusterRadius, distance, "a cosine distance in [0, 2]"],
    ["maxClusters", resolved.maxClusters, count, "a whole number >= 1"],
    ["maxClusterShare", resolved.maxClusterShare, (value) => fraction(value) && value > 0, "a share in (0, 1]"],
  ];
  if (resolved.budget) {
    checks.push(["budget.perHour", resolved.budget.perHour, positive, "a number of frames per hour > 0"]);
    if (resolved.budget.burst !== undefined) {
      checks.push(["budget.burst", resolved.budget.burst, (value) => Number.isFinite(value) && value >= 1, "a number of frames >= 1"]);
    }
    for (const [reason, cap] of definedCaps(resolved.budget)) {
      checks.push([`budget.perReason.${reason}`, cap, positive, "a number of frames per hour > 0"]);
    }
  }
  for (const [name, value, valid, expected] of checks) {
    if (!valid(value)) {
      throw new RangeError(`selector option ${name} is ${value}; expected ${expected}`);
    }
  }
  if (resolved.clusterScope !== "novel" && resolved.clusterScope !== "uncertain") {
    throw new RangeError(`selector option clusterScope is ${String(resolved.clusterScope)}; expected "novel" or "uncertain"`);
  }
  for (const [reason] of definedCaps(resolved.budget)) {
    if (!(CANDIDATE_REASONS as readonly string[]).includes(reason)) {
      throw new RangeError(`selector option budget.perReason has unknown reason '${reason}'; expected one of ${CANDIDATE_REASONS.join(", ")}`);
    }
  }
  return resolved;
}

function definedCaps(budget: SelectorBudget | null): [CandidateReason, number][] {
  const entries = Object.entries(budget?.perReason ?? {}) as [CandidateReason, number | undefined][];
  return entries.filter((entry): entry is [CandidateReason, number] => entry[1] !== undefined);
}

function zeroCounts<K extends string>(keys: readonly K[]): Record<K, number> {
  return Object.fromEntries(keys.map((key) => [key, 0])) as Record<K, number>;
}

/**
 * Picks hard examples from a stream of scored frames under hourly budgets.
 *
 * A frame is a candidate for each of CANDIDATE_REASONS it meets. Candidates then pass, in order:
 * the near-duplicate check against recently selected embeddings, the cap of their novelty cluster,
 * the per-reason caps, and the overall budget. Tokens are taken only from a frame that passes all.
 */
export class HardExampleSelector {
  private readonly options: Resolved;
  private readonly random: () => number;
  private readonly budget: TokenBucket | undefined;
  private readonly reasonBuckets = new Map<CandidateReason, TokenBucket>();
  private readonly memory: Float32Array[] = [];
  private memoryNext = 0;
  private clusters: Cluster[] = [];
  private nextClusterId = 1;
  private clusterClock = 0;
  private readonly classCounts = new Map<string, number>();
  private readonly classDecay: number;
  private clock = Number.NEGATIVE_INFINITY;
  private knowledge: Knowledge | undefined;
  readonly stats: SelectorStats = {
    frames: 0,
    candidates: 0,
    selected: 0,
    selectedByReason: zeroCounts(CANDIDATE_REASONS),
    candidatesByReason: zeroCounts(CANDIDATE_REASONS),
    skipped: zeroCounts(SKIP_REASONS),
    clusters: 0,
  };

  constructor(options: SelectorOptions = {}) {
    this.options = resolveOptions(options);
    this.knowledge = this.options.knowledge;
    this.random = createRandom(this.options.seed);
    this.classDecay = 2 ** (-1 / this.options.classHalfLife);
    const budget = this.options.budget;
    if (budget) {
      this.budget = new TokenBucket(this.burst(budget), budget.perHour);
      for (const [reason, cap] of definedCaps(budget)) {
        this.reasonBuckets.set(reason, new TokenBucket(Math.max(1, (this.burst(budget) * cap) / budget.perHour), cap));
      }
    }
  }

  /** Replaces the class centroids, for example after a model swap; undefined turns novelty off. */
  setKnowledge(knowledge: Knowledge | undefined): void {
    this.knowledge = knowledge;
  }

  /**
   * Forgets the embeddings of recently selected frames and the clusters. Call it when the model
   * changes, because embeddings of two models are not comparable. Budgets and class counts stay.
   */
  resetEmbeddingState(): void {
    this.memory.length = 0;
    this.memoryNext = 0;
    this.clusters = [];
    this.stats.clusters = 0;
  }

  /** Decides about one frame and, when it is selected, takes budget and remembers its embedding. */
  consider(frame: SelectorInput): Selection {
    this.clock = Math.max(this.clock, frame.capturedAt);
    const now = this.clock;
    this.stats.frames++;

    const scores = topTwo(frame.probabilities, frame.labels);
    const margin = scores.first - scores.second;
    const novelty = this.knowledge ? noveltyOf(this.knowledge, frame.embedding).score : null;
    const reasons = this.reasonsOf(frame, scores.first, margin, novelty, scores.label);
    const base: Selection = { selected: false, reasons, priority: 0, novelty, margin, label: scores.label, confidence: scores.first };
    if (reasons.length === 0) {
      return base;
    }

    this.stats.candidates++;
    for (const reason of reasons) {
      this.stats.candidatesByReason[reason]++;
    }
    const selection: Selection = { ...base, priority: priorityOf(reasons, margin) };
    const unit = l2Normalize(frame.embedding);
    const cluster = this.inClusterScope(reasons) ? this.joinCluster(unit) : undefined;
    if (cluster) {
      selection.cluster = cluster.id;
    }

    const skip = this.checkLimits(unit, reasons, cluster, now);
    if (typeof skip === "string") {
      this.stats.skipped[skip]++;
      return { ...selection, skippedBecause: skip };
    }

    cluster?.bucket?.take(now);
    skip?.take(now);
    this.budget?.take(now);
    this.remember(unit);
    this.stats.selected++;
    for (const reason of reasons) {
      this.stats.selectedByReason[reason]++;
    }
    return { ...selection, selected: true };
  }

  private burst(budget: SelectorBudget): number {
    return budget.burst ?? Math.max(1, budget.perHour / 6);
  }

  /** Returns the skip reason, or the per-reason bucket to charge (undefined when uncapped). */
  private checkLimits(unit: Float32Array, reasons: CandidateReason[], cluster: Cluster | undefined, now: number): SkipReason | TokenBucket | undefined {
    if (this.isDuplicate(unit)) {
      return "duplicate";
    }
    if (cluster?.bucket && !cluster.bucket.available(now)) {
      return "cluster-cap";
    }
    // The frame is charged to its highest-weight reason that still has room under its cap.
    let charged: TokenBucket | undefined;
    let room = false;
    for (const reason of reasons) {
      const bucket = this.reasonBuckets.get(reason);
      if (bucket === undefined || bucket.available(now)) {
        charged = bucket;
        room = true;
        break;
      }
    }
    if (!room) {
      return "reason-cap";
    }
    if (this.budget && !this.budget.available(now)) {
      return "budget";
    }
    return charged;
  }

  private reasonsOf(frame: SelectorInput, confidence: number, margin: number, novelty: number | null, label: string): CandidateReason[] {
    const reasons = new Set<CandidateReason>();
    if (novelty !== null && novelty > this.options.noveltyThreshold) {
      reasons.add("novel");
    }
    if (frame.decisionReason !== null) {
      reasons.add("reject");
    }
    if (confidence < this.options.lowConfidence) {
      reasons.add("low-confidence");
    }
    if (margin < this.options.minMargin) {
      reasons.add("margin");
    }
    if (this.random() < this.randomRateFor(label)) {
      reasons.add("random");
    }
    return CANDIDATE_REASONS.filter((reason) => reasons.has(reason));
  }

  /**
   * Updates the decayed frame count of `label` and returns its sampling rate:
   * min(1, randomRate / (K * share)), where share is the label's part of the decayed counts and K
   * the number of labels with a decayed count of at least 1. Every such class then gets about
   * randomRate / K of all frames as random samples, however common it is.
   */
  private randomRateFor(label: string): number {
    let total = 0;
    let active = 0;
    for (const [key, value] of this.classCounts) {
      const decayed = value * this.classDecay + (key === label ? 1 : 0);
      this.classCounts.set(key, decayed);
      total += decayed;
      active += decayed >= 1 ? 1 : 0;
    }
    if (!this.classCounts.has(label)) {
      this.classCounts.set(label, 1);
      total += 1;
      active += 1;
    }
    const share = this.classCounts.get(label)! / total;
    return Math.min(1, this.options.randomRate / (Math.max(1, active) * share));
  }

  private inClusterScope(reasons: CandidateReason[]): boolean {
    if (this.options.clusterScope === "novel") {
      return reasons.includes("novel");
    }
    return reasons.some((reason) => reason !== "random");
  }

  /** Leader clustering: joins the nearest cluster within clusterRadius, or starts a new one. */
  private joinCluster(unit: Float32Array): Cluster {
    this.clusterClock++;
    let nearest: Cluster | undefined;
    let nearestDistance = Number.POSITIVE_INFINITY;
    for (const cluster of this.clusters) {
      const distance = 1 - dot(unit, cluster.leader);
      if (distance < nearestDistance) {
        nearest = cluster;
        nearestDistance = distance;
      }
    }
    if (nearest && nearestDistance <= this.options.clusterRadius) {
      nearest.members++;
      nearest.lastJoined = this.clusterClock;
      return nearest;
    }
    if (this.clusters.length >= this.options.maxClusters) {
      const stale = this.clusters.reduce((oldest, cluster) => (cluster.lastJoined < oldest.lastJoined ? cluster : oldest));
      this.clusters = this.clusters.filter((cluster) => cluster !== stale);
    }
    const cluster: Cluster = { id: this.nextClusterId++, leader: unit, members: 1, lastJoined: this.clusterClock, bucket: this.clusterBucket() };
    this.clusters.push(cluster);
    this.stats.clusters = this.clusters.length;
    return cluster;
  }

  private clusterBucket(): TokenBucket | undefined {
    const budget = this.options.budget;
    if (!budget) {
      return undefined;
    }
    const share = this.options.maxClusterShare;
    return new TokenBucket(Math.max(1, this.burst(budget) * share), budget.perHour * share);
  }

  private isDuplicate(unit: Float32Array): boolean {
    for (const kept of this.memory) {
      if (1 - dot(unit, kept) < this.options.minDistance) {
        return true;
      }
    }
    return false;
  }

  private remember(unit: Float32Array): void {
    if (this.memory.length < this.options.memorySize) {
      this.memory.push(unit);
    } else {
      this.memory[this.memoryNext] = unit;
    }
    this.memoryNext = (this.memoryNext + 1) % this.options.memorySize;
  }
}

function priorityOf(reasons: readonly CandidateReason[], margin: number): number {
  return reasons.reduce((sum, reason) => sum + REASON_WEIGHTS[reason], 0) + (1 - margin);
}

function topTwo(probabilities: ArrayLike<number>, labels: readonly string[]): { first: number; second: number; label: string } {
  if (probabilities.length === 0) {
    throw new RangeError("a frame without probabilities cannot be scored");
  }
  let firstIndex = 0;
  let first = Number.NEGATIVE_INFINITY;
  let second = Number.NEGATIVE_INFINITY;
  for (let index = 0; index < probabilities.length; index++) {
    const p = probabilities[index]!;
    if (p > first) {
      second = first;
      first = p;
      firstIndex = index;
    } else if (p > second) {
      second = p;
    }
  }
  // A single-class model has no runner-up, so its margin is the top-1 probability.
  return { first, second: probabilities.length > 1 ? second : 0, label: labels[firstIndex] ?? `class_${firstIndex}` };
}

/** Options of `selectFromStream`: the selector's, without hourly budgets, and the label budget. */
export interface StreamSelectionOptions extends Omit<SelectorOptions, "budget"> {
  /** Frames to choose in total, for example the number of labels a person will provide. */
  total: number;
  /**
   * Order in which the selected frames are labelled: "typicality" (the trainer's review queue:
   * rankByTypicality over the selected frames' embeddings) or "priority" (the outbox order, with
   * the cluster cap). Default "typicality".
   */
  ranking?: "typicality" | "priority";
}

/**
 * Chooses up to `total` hard examples from a recorded stream, for offline comparison with random
 * picking. Returns the chosen frames in stream order; fewer than `total` when the stream has fewer
 * candidates.
 *
 * Pass 1 runs a HardExampleSelector over the stream without hourly budgets, so it applies the
 * candidate reasons, the near-duplicate check and the clustering. Pass 2 takes its selected frames
 * by priority, highest first (the order in which a full outbox keeps items). A cluster gets at most
 * ceil(maxClusterShare * total) of them while frames of other clusters or without a cluster remain.
 * Only then do the frames held back by that cap fill the rest.
 */
export function selectFromStream<T extends SelectorInput>(frames: readonly T[], options: StreamSelectionOptions): T[] {
  const { total, ranking, ...selectorOptions } = options;
  if (!Number.isInteger(total) || total < 0) {
    throw new RangeError(`total ${total} is invalid; expected a whole number of frames >= 0`);
  }
  const selector = new HardExampleSelector({ ...selectorOptions, budget: null });
  const picked: { index: number; priority: number; cluster: number | undefined }[] = [];
  frames.forEach((frame, index) => {
    const selection = selector.consider(frame);
    if (selection.selected) {
      picked.push({ index, priority: selection.priority, cluster: selection.cluster });
    }
  });
  if ((ranking ?? "typicality") === "typicality") {
    const order = rankByTypicality(picked.map((p) => frames[p.index]!.embedding), { count: total });
    return order.map((position) => picked[position]!.index).sort((a, b) => a - b).map((index) => frames[index]!);
  }
  picked.sort((a, b) => b.priority - a.priority || a.index - b.index);

  const share = options.maxClusterShare ?? DEFAULTS.maxClusterShare;
  const clusterCap = Math.max(1, Math.ceil(share * total));
  const perCluster = new Map<number, number>();
  const chosen: number[] = [];
  const heldBack: number[] = [];
  for (const candidate of picked) {
    if (chosen.length >= total) {
      break;
    }
    if (candidate.cluster !== undefined) {
      const taken = perCluster.get(candidate.cluster) ?? 0;
      if (taken >= clusterCap) {
        heldBack.push(candidate.index);
        continue;
      }
      perCluster.set(candidate.cluster, taken + 1);
    }
    chosen.push(candidate.index);
  }
  chosen.push(...heldBack.slice(0, Math.max(0, total - chosen.length)));
  return chosen.sort((a, b) => a - b).map((index) => frames[index]!);
}

/** Picks `n` frames uniformly at random without replacement (seeded); returns them in stream order. */
export function randomPick<T>(frames: readonly T[], n: number, seed: number): T[] {
  if (!Number.isInteger(n) || n < 0) {
    throw new RangeError(`n ${n} is invalid; expected a whole number of frames >= 0`);
  }
  const random = createRandom(seed);
  const indices = Array.from(frames.keys());
  const count = Math.min(n, indices.length);
  // Partial Fisher-Yates shuffle: the first `count` positions become a uniform sample.
  for (let position = 0; position < count; position++) {
    const swap = position + Math.floor(random() * (indices.length - position));
    [indices[position], indices[swap]] = [indices[swap]!, indices[position]!];
  }
  return indices
    .slice(0, count)
    .sort((a, b) => a - b)
    .map((index) => frames[index]!);
}
