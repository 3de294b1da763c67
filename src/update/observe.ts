/**
 * One batch that the active model classified, as the agent passes it on from the pipeline's
 * per-batch observer.
 */
export interface ObservedBatch {
  /** Model input of each frame: crop height x width x 3 RGB bytes. The buffers must not change after the call. */
  pixels: readonly Buffer[];
  /** Top-1 label of the active model per frame, in `pixels` order. */
  labels: readonly string[];
  /** Wall time of the batch's inference in ms. */
  inferenceMs: number;
  /** Frames of the batch whose inference failed. Defaults to 0. */
  errors?: number;
  /** The model that classified the batch, as in its manifest (sha256 of the model file). */
  model?: ModelIdentity;
}

export interface ModelIdentity {
  name: string;
  version: string;
  sha256: string;
}

/** Returns true when `model` names the same name, version and model file as `expected`. */
export function sameModel(model: ModelIdentity | undefined, expected: ModelIdentity): boolean {
  return model !== undefined && model.name === expected.name && model.version === expected.version && model.sha256 === expected.sha256;
}

/** Receives batches; implementations return at once and do their work off the caller's path. */
export interface BatchObserver {
  onBatch(batch: ObservedBatch): void;
}

/** Attachment point for batch observers. The agent forwards each pipeline batch to every attached observer. */
export interface BatchTap {
  attach(observer: BatchObserver): void;
  detach(observer: BatchObserver): void;
}

export interface LatencySummary {
  count: number;
  p50: number;
  p95: number;
}

/** Returns the nearest-rank percentile `q` (0 to 1) of `values`, or 0 when there are none. */
export function percentile(values: readonly number[], q: number): number {
  if (values.length === 0) {
    return 0;
  }
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil(q * sorted.length));
  return sorted[rank - 1]!;
}

export function summarizeLatency(values: readonly number[]): LatencySummary {
  return { count: values.length, p50: percentile(values, 0.5), p95: percentile(values, 0.95) };
}
