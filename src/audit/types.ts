/** Per-stage latencies of one frame, in milliseconds. */
export interface StageLatency {
  /** Capture to the start of decoding, including queueing. */
  queueMs: number;
  decodeMs: number;
  /** Inference time of the batch this frame ran in. */
  inferenceMs: number;
  /** Capture to decision. */
  totalMs: number;
}

/** One audited decision: what the agent decided about one frame, or why it could not. */
export interface DecisionRecord {
  frameId: string;
  source: string;
  /** Milliseconds since the Unix epoch. */
  capturedAt: number;
  decidedAt: number;
  modelName: string;
  modelVersion: string;
  modelSha256: string;
  /** Top-k labels with probabilities, highest first; empty when the frame failed. */
  top: { label: string; p: number }[];
  /** Top-1 label, or null when the frame failed. */
  label: string | null;
  confidence: number | null;
  /** Bin sent to the actuator, or null when no decision was sent. */
  bin: string | null;
  /** Reason the frame went to the reject bin or failed, e.g. "low-confidence", "unmapped-class". */
  reason: string | null;
  latency: StageLatency;
  /** Error message for frames that could not be decoded or classified. */
  error: string | null;
  /** Ground-truth label when known (replayed labelled images). */
  truth?: string | null;
}
