/**
 * The pipeline observer that mines hard examples. It runs the selector on every scored frame and
 * stores the selected ones, with image, embedding, scores, model and reasons, in the outbox.
 */
import { topK } from "../inference/runner.js";
import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { PipelineObserver, ScoredFrame } from "../pipeline/pipeline.js";
import type { Knowledge } from "./knowledge.js";
import { OutboxError, type AddResult, type ExampleMeta, type NewExample } from "./outbox.js";
import { HardExampleSelector, type CandidateReason, type Selection, type SelectorOptions, type SkipReason } from "./selector.js";

/** The part of the outbox the miner needs. */
export interface MinerOutbox {
  add(example: NewExample): AddResult;
  size(): { items: number; bytes: number };
}

/** Optional counters of the miner, for example Prometheus metrics. */
export interface MinerMetrics {
  /** A frame was stored in the outbox; called once per reason of the frame. */
  selected(reason: CandidateReason): void;
  /** A candidate was not selected. */
  skipped(reason: SkipReason): void;
  /** Older examples that the outbox evicted to store a new one. */
  evicted(count: number): void;
  /** A selected frame that the outbox rejected. */
  rejected(reason: "lower-priority" | "too-large"): void;
  /** An outbox write that failed, for example on a full disk. */
  outboxWriteFailed(): void;
  /** Items and payload bytes in the outbox after each write. */
  outboxSize(items: number, bytes: number): void;
}

export interface HardExampleMinerOptions {
  /** A selector, or the options to create one. */
  selector: HardExampleSelector | SelectorOptions;
  outbox: MinerOutbox;
  device: { id: string; site: string };
  /** Labels with probabilities stored per example. Default 3. */
  topK?: number;
  /** Called after an example was stored, for example to start the uplink at once. */
  onStored?: (id: number) => void;
  metrics?: MinerMetrics;
  logger?: Logger;
}

export interface MinerStats {
  frames: number;
  stored: number;
  rejected: number;
  evicted: number;
  outboxWriteFailures: number;
  /** Frames the selector could not score, for example an embedding that does not match the knowledge. */
  selectorErrors: number;
}

/** Log at most one outbox or selector error per this many milliseconds; the stats count all. */
const ERROR_LOG_INTERVAL_MS = 10_000;

/**
 * Mines hard examples as a pipeline observer. It keeps class knowledge per model sha256, so a model
 * swap turns novelty off until `setKnowledge` was called for the new model.
 */
export class HardExampleMiner implements PipelineObserver {
  readonly selector: HardExampleSelector;
  private readonly logger: Logger;
  private readonly knowledgeByModel = new Map<string, Knowledge | undefined>();
  private currentModel: string | undefined;
  private lastErrorLog = 0;
  readonly stats: MinerStats = { frames: 0, stored: 0, rejected: 0, evicted: 0, outboxWriteFailures: 0, selectorErrors: 0 };

  constructor(private readonly options: HardExampleMinerOptions) {
    this.selector = options.selector instanceof HardExampleSelector ? options.selector : new HardExampleSelector(options.selector);
    this.logger = options.logger ?? silentLogger;
  }

  /**
   * Registers the class centroids of the model with `modelSha256`; undefined means that model has
   * none. Frames of a model without registered knowledge get no novelty score.
   */
  setKnowledge(modelSha256: string, knowledge: Knowledge | undefined): void {
    this.knowledgeByModel.set(modelSha256, knowledge);
    if (this.currentModel === modelSha256) {
      this.selector.setKnowledge(knowledge);
    }
  }

  /**
   * Considers every frame of a batch and stores the selected ones. Selector errors and outbox
   * write failures are logged and counted, and the next frame is considered.
   */
  onScored(entries: readonly ScoredFrame[]): void {
    for (const entry of entries) {
      this.stats.frames++;
      this.useModel(entry.model.sha256);
      let selection: Selection;
      try {
        selection = this.selector.consider({
          frameId: entry.frame.id,
          capturedAt: entry.frame.capturedAt,
          probabilities: entry.probabilities,
          labels: entry.labels,
          embedding: entry.embedding,
          decisionReason: decisionReasonOf(entry),
        });
      } catch (error) {
        this.stats.selectorErrors++;
        this.logError(error, entry, "hard-example selection failed for a frame");
        continue;
      }
      if (selection.skippedBecause) {
        this.options.metrics?.skipped(selection.skippedBecause);
      }
      if (selection.selected) {
        this.store(entry, selection);
      }
    }
  }

  /** Switches the selector to the model of the frames; embeddings of two models are not comparable. */
  private useModel(sha256: string): void {
    if (this.currentModel === sha256) {
      return;
    }
    if (this.currentModel !== undefined) {
      this.selector.resetEmbeddingState();
      this.logger.info({ modelSha256: sha256, previousSha256: this.currentModel }, "hard-example miner switched model; near-duplicate memory cleared");
    }
    this.currentModel = sha256;
    this.selector.setKnowledge(this.knowledgeByModel.get(sha256));
  }

  private store(entry: ScoredFrame, selection: Selection): void {
    const { outbox, metrics, device } = this.options;
    const meta: ExampleMeta = {
      frameId: entry.frame.id,
      capturedAt: entry.frame.capturedAt,
      source: entry.frame.source,
      model: entry.model,
      top: topK(entry.probabilities, entry.labels, Math.min(this.options.topK ?? 3, entry.labels.length)),
      reasons: selection.reasons,
      novelty: selection.novelty,
      margin: selection.margin,
      decision: { bin: entry.record.bin, reason: entry.record.reason },
      site: device.site,
      device: device.id,
    };
    let result: AddResult;
    try {
      result = outbox.add({ priority: selection.priority, meta, jpeg: entry.frame.data, embedding: entry.embedding });
    } catch (error) {
      if (!(error instanceof OutboxError)) {
        throw error;
      }
      this.stats.outboxWriteFailures++;
      metrics?.outboxWriteFailed();
      this.logError(error, entry, "hard example not stored: outbox write failed");
      return;
    }
    if (result.stored) {
      this.stats.stored++;
      this.stats.evicted += result.evicted;
      for (const reason of selection.reasons) {
        metrics?.selected(reason);
      }
      if (result.evicted > 0) {
        metrics?.evicted(result.evicted);
      }
      this.options.onStored?.(result.id);
    } else {
      this.stats.rejected++;
      metrics?.rejected(result.reason);
      this.logger.debug({ frame: entry.frame.id, reason: result.reason, priority: selection.priority }, "outbox rejected a hard example");
    }
    if (metrics) {
      const { items, bytes } = outbox.size();
      metrics.outboxSize(items, bytes);
    }
  }

  private logError(error: unknown, entry: ScoredFrame, message: string): void {
    const now = Date.now();
    if (now - this.lastErrorLog < ERROR_LOG_INTERVAL_MS) {
      return;
    }
    this.lastErrorLog = now;
    this.logger.error({ err: describeError(error), frame: entry.frame.id, modelSha256: entry.model.sha256, stats: this.stats }, message);
  }
}

function decisionReasonOf(entry: ScoredFrame): "low-confidence" | "unmapped-class" | "error" | null {
  const reason = entry.record.reason;
  if (reason === null) {
    return null;
  }
  return reason === "low-confidence" || reason === "unmapped-class" ? reason : "error";
}
