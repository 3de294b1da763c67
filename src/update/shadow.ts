import { performance } from "node:perf_hooks";

import { topK, type BatchResult } from "../inference/runner.js";
import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { ModelManifest } from "../models/manifest.js";
import { summarizeLatency, type BatchObserver, type LatencySummary, type ObservedBatch } from "./observe.js";

/** The part of a ModelRunner that a shadow run uses. */
export interface ShadowCandidate {
  readonly manifest: Pick<ModelManifest, "labels" | "input">;
  run(images: readonly Buffer[]): Promise<BatchResult>;
}

export interface ShadowOptions {
  /** Frames to run through the candidate before the report resolves. */
  frames: number;
  /** Labels of the active model. */
  activeLabels: readonly string[];
  logger?: Logger;
}

export interface AgreementFigures {
  /** Frames whose top-1 labels were compared. */
  compared: number;
  agreed: number;
  /** agreed / compared, or null when no frame was compared. */
  rate: number | null;
}

export interface ShadowReport {
  /** Frames the candidate ran, including those whose inference failed. */
  frames: number;
  batches: number;
  /** Batches not run because the previous candidate inference was still running. */
  skippedBusy: number;
  /** Batches not run because their frames do not match the candidate's input size. */
  skippedIncompatible: number;
  /** Frames whose candidate inference failed. */
  errors: number;
  /** First distinct error messages of the candidate, at most 5. */
  errorMessages: string[];
  /** Frames of the shadowed batches whose inference failed on the active model. */
  activeErrors: number;
  agreement: {
    /** Every frame with a candidate result. */
    overall: AgreementFigures;
    /** Frames whose active and candidate top-1 labels are both labels of the other model. */
    sharedLabels: AgreementFigures;
  };
  /** Per-batch inference latency in ms over the shadowed batches. */
  latency: { active: LatencySummary; candidate: LatencySummary; p95Ratio: number | null };
  /** True when `frames` reached the requested count; false after cancel. */
  complete: boolean;
}

const MAX_ERROR_MESSAGES = 5;

function agreement(agreed: number, compared: number): AgreementFigures {
  return { compared, agreed, rate: compared ? agreed / compared : null };
}

/**
 * Runs a candidate model on batches that the active model just classified, off the critical
 * path: onBatch starts the candidate and returns at once, and a batch that arrives while the
 * previous candidate inference is still running is skipped and counted. The report compares
 * top-1 labels and latency.
 *
 * NOTE: both models share the CPU, so the candidate's latency here includes contention with
 * the active model and is higher than it would be alone.
 */
export class ShadowRun implements BatchObserver {
  private busy = false;
  private finished = false;
  private frames = 0;
  private batches = 0;
  private skippedBusy = 0;
  private skippedIncompatible = 0;
  private errors = 0;
  private activeErrors = 0;
  private readonly errorMessages: string[] = [];
  private overallAgreed = 0;
  private overallCompared = 0;
  private sharedAgreed = 0;
  private sharedCompared = 0;
  private readonly activeLatencies: number[] = [];
  private readonly candidateLatencies: number[] = [];
  private readonly activeLabels: ReadonlySet<string>;
  private readonly candidateLabels: ReadonlySet<string>;
  private readonly frameBytes: number;
  private readonly logger: Logger;
  private resolveDone!: (report: ShadowReport) => void;
  /** Resolves with the report when `frames` frames were shadowed, or at cancel. */
  readonly done: Promise<ShadowReport>;

  constructor(
    private readonly candidate: ShadowCandidate,
    private readonly options: ShadowOptions,
  ) {
    if (!Number.isInteger(options.frames) || options.frames < 1) {
      throw new RangeError(`shadow frames must be a positive integer, got ${options.frames}`);
    }
    const [, height, width] = candidate.manifest.input.shape;
    this.frameBytes = height * width * 3;
    this.activeLabels = new Set(options.activeLabels);
    this.candidateLabels = new Set(candidate.manifest.labels);
    this.logger = options.logger ?? silentLogger;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  /** Starts the candidate on `batch` unless it is busy or done. It returns before the candidate finishes. */
  onBatch(batch: ObservedBatch): void {
    if (this.finished || batch.pixels.length === 0) {
      return;
    }
    if (this.busy) {
      this.skippedBusy++;
      return;
    }
    if (batch.pixels.some((pixels) => pixels.length !== this.frameBytes)) {
      this.skippedIncompatible++;
      return;
    }
    this.busy = true;
    void this.shadow(batch).finally(() => {
      this.busy = false;
    });
  }

  private async shadow(batch: ObservedBatch): Promise<void> {
    const started = performance.now();
    let result: BatchResult | undefined;
    try {
      result = await this.candidate.run(batch.pixels);
    } catch (error) {
      this.recordError(describeError(error), batch.pixels.length);
    }
    const elapsed = performance.now() - started;
    if (this.finished) {
      return;
    }
    this.batches++;
    this.frames += batch.pixels.length;
    this.activeErrors += batch.errors ?? 0;
    this.activeLatencies.push(batch.inferenceMs);
    this.candidateLatencies.push(elapsed);
    if (result) {
      this.compare(batch, result);
    }
    if (this.frames >= this.options.frames) {
      this.finish(true);
    }
  }

  private recordError(message: string, frames: number): void {
    this.errors += frames;
    if (this.errorMessages.length < MAX_ERROR_MESSAGES && !this.errorMessages.includes(message)) {
      this.errorMessages.push(message);
    }
    this.logger.warn({ err: message, frames, errors: this.errors }, "shadow run: candidate inference failed");
  }

  private compare(batch: ObservedBatch, result: BatchResult): void {
    const labels = this.candidate.manifest.labels;
    result.probabilities.forEach((probabilities, index) => {
      const activeLabel = batch.labels[index];
      if (activeLabel === undefined) {
        return;
      }
      const candidateLabel = topK(probabilities, labels, 1)[0]?.label;
      const agreed = candidateLabel === activeLabel;
      this.overallCompared++;
      this.overallAgreed += agreed ? 1 : 0;
      if (candidateLabel !== undefined && this.candidateLabels.has(activeLabel) && this.activeLabels.has(candidateLabel)) {
        this.sharedCompared++;
        this.sharedAgreed += agreed ? 1 : 0;
      }
    });
  }

  /** Returns the figures so far. */
  report(): ShadowReport {
    const active = summarizeLatency(this.activeLatencies);
    const candidate = summarizeLatency(this.candidateLatencies);
    return {
      frames: this.frames,
      batches: this.batches,
      skippedBusy: this.skippedBusy,
      skippedIncompatible: this.skippedIncompatible,
      errors: this.errors,
      errorMessages: [...this.errorMessages],
      activeErrors: this.activeErrors,
      agreement: {
        overall: agreement(this.overallAgreed, this.overallCompared),
        sharedLabels: agreement(this.sharedAgreed, this.sharedCompared),
      },
      latency: { active, candidate, p95Ratio: active.count && active.p95 > 0 ? candidate.p95 / active.p95 : null },
      complete: this.finished && this.frames >= this.options.frames,
    };
  }

  /** Stops feeding the candidate and resolves `done` with the figures so far. A candidate inference in flight is not counted. */
  cancel(): void {
    this.finish(false);
  }

  private finish(complete: boolean): void {
    if (this.finished) {
      return;
    }
    this.finished = true;
    const report = this.report();
    report.complete = complete;
    this.logger.info({ frames: report.frames, errors: report.errors, skippedBusy: report.skippedBusy, complete }, "shadow run finished");
    this.resolveDone(report);
  }
}
