import type { DecisionRecord } from "../audit/types.js";
import type { Frame } from "../capture/types.js";
import type { Actuator, ActuatorMessage } from "../decision/actuators.js";
import type { DecisionPolicy } from "../decision/policy.js";
import type { AgentMetrics } from "../health/metrics.js";
import type { ModelRunner } from "../inference/runner.js";
import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { prepareImage } from "../preprocess/image.js";
import { DropOldestQueue } from "./queue.js";

/** The part of the audit store the pipeline needs: a synchronous, committed batch write. */
export interface AuditSink {
  recordBatch(records: readonly DecisionRecord[]): void;
}

export interface PipelineOptions {
  runner: ModelRunner;
  policy: DecisionPolicy;
  device: { id: string; site: string };
  maxBatch: number;
  /** How long the oldest decoded frame may wait for the batch to fill while inference is idle. */
  maxWaitMs: number;
  /** Capacity of the frame queue in front of decoding; the oldest frame is dropped when it is full. */
  queueSize: number;
  deadlineMs: number;
  /** Decodes running at once; libvips runs each on a libuv worker thread. */
  decodeConcurrency?: number;
  audit?: AuditSink;
  /** Records kept in memory while audit writes fail (for example a full disk); older ones are dropped. */
  maxPendingAudit?: number;
  actuators: readonly Actuator[];
  metrics?: AgentMetrics;
  logger?: Logger;
  /** Called for every decision after it was audited and sent. */
  onDecision?: (record: DecisionRecord) => void;
}

interface DecodedFrame {
  frame: Frame;
  pixels?: Buffer;
  error?: string;
  decodeStartedAt: number;
  decodedAt: number;
}

export interface PipelineStats {
  received: number;
  dropped: number;
  decided: number;
  errors: number;
  batches: number;
  auditFailures: number;
  auditDropped: number;
  lastDecisionAt: number | undefined;
}

/**
 * Frames in, decisions out: a bounded drop-oldest queue, decoding as frames arrive, micro-batched
 * inference, the decision policy, a committed audit write, then the actuators.
 *
 * Decoding of the next frames overlaps inference of the current batch. The audit batch commits
 * before any of its decisions reaches an actuator, so a decision that was sent is in the audit.
 * The exception is a period of failing audit writes (a full disk, say). The line keeps moving
 * then, and the records wait in memory (bounded) until the store accepts writes again.
 */
export class Pipeline {
  private readonly input: DropOldestQueue<Frame>;
  private readonly ready: DecodedFrame[] = [];
  private readonly logger: Logger;
  private decoding = 0;
  private running = false;
  private stopping = false;
  private readyWaiter: (() => void) | undefined;
  private loop: Promise<void> | undefined;
  private pendingAudit: DecisionRecord[] = [];
  private lastAuditErrorLog = 0;
  readonly stats: PipelineStats = { received: 0, dropped: 0, decided: 0, errors: 0, batches: 0, auditFailures: 0, auditDropped: 0, lastDecisionAt: undefined };

  constructor(private readonly options: PipelineOptions) {
    this.input = new DropOldestQueue(options.queueSize);
    this.logger = options.logger ?? silentLogger;
  }

  /** Audit records held in memory because the store rejected them. */
  get pendingAuditCount(): number {
    return this.pendingAudit.length;
  }

  /** Frames waiting for decoding or inference. */
  get depth(): number {
    return this.input.size + this.ready.length + this.decoding;
  }

  /** Accepts a frame from a source. It only queues the frame, so it returns at once. */
  submit(frame: Frame): void {
    if (this.stopping) {
      return;
    }
    this.stats.received++;
    this.options.metrics?.frameReceived(frame.source);
    const dropped = this.input.push(frame);
    if (dropped) {
      this.stats.dropped++;
      this.options.metrics?.frameDropped(dropped.source, "queue_full");
      this.logger.debug({ frame: dropped.id, source: dropped.source }, "frame dropped: queue full");
    }
    this.pumpDecode();
  }

  start(): void {
    if (this.running) {
      return;
    }
    this.running = true;
    this.loop = this.inferenceLoop();
  }

  /** Stops accepting frames, decides everything already accepted, and resolves when done. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wakeInference();
    await this.loop;
    this.running = false;
    this.flushPendingAudit();
  }

  private pumpDecode(): void {
    const concurrency = this.options.decodeConcurrency ?? 2;
    // Decoded frames wait for inference; holding more than two batches only adds latency.
    while (this.decoding < concurrency && this.input.size > 0 && this.ready.length + this.decoding < this.options.maxBatch * 2) {
      const [frame] = this.input.take(1);
      this.decoding++;
      void this.decode(frame!).then((decoded) => {
        this.decoding--;
        this.ready.push(decoded);
        this.wakeInference();
        this.pumpDecode();
      });
    }
    this.options.metrics?.setQueueDepth("frames", this.input.size);
  }

  private async decode(frame: Frame): Promise<DecodedFrame> {
    const decodeStartedAt = Date.now();
    try {
      const prepared = await prepareImage(frame.data, this.options.runner.manifest.preprocess);
      return { frame, pixels: prepared.pixels, decodeStartedAt, decodedAt: Date.now() };
    } catch (error) {
      return { frame, error: describeError(error), decodeStartedAt, decodedAt: Date.now() };
    }
  }

  private wakeInference(): void {
    const wake = this.readyWaiter;
    this.readyWaiter = undefined;
    wake?.();
  }

  private waitForReady(timeoutMs?: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = timeoutMs === undefined ? undefined : setTimeout(() => this.wakeInference(), timeoutMs);
      this.readyWaiter = () => {
        if (timer) {
          clearTimeout(timer);
        }
        resolve();
      };
    });
  }

  private idle(): boolean {
    return this.input.size === 0 && this.ready.length === 0 && this.decoding === 0;
  }

  private async inferenceLoop(): Promise<void> {
    const { maxBatch, maxWaitMs } = this.options;
    while (!(this.stopping && this.idle())) {
      if (this.ready.length === 0) {
        await this.waitForReady();
        continue;
      }
      const oldestWait = Date.now() - this.ready[0]!.decodedAt;
      const more = this.decoding + this.input.size > 0;
      if (this.ready.length < maxBatch && oldestWait < maxWaitMs && more && !this.stopping) {
        await this.waitForReady(maxWaitMs - oldestWait);
        continue;
      }
      const batch = this.ready.splice(0, maxBatch);
      this.pumpDecode();
      await this.runBatch(batch);
    }
  }

  private async runBatch(batch: DecodedFrame[]): Promise<void> {
    const good = batch.filter((entry) => entry.pixels !== undefined);
    const inferenceStart = Date.now();
    let probabilities: Float32Array[] = [];
    let inferenceError: string | undefined;
    if (good.length > 0) {
      try {
        probabilities = (await this.options.runner.run(good.map((entry) => entry.pixels!))).probabilities;
      } catch (error) {
        inferenceError = `inference failed: ${describeError(error)}`;
        this.logger.error({ err: inferenceError, batch: good.length }, "inference failed; frames go to the reject bin");
      }
    }
    const inferenceMs = Date.now() - inferenceStart;
    this.options.metrics?.observeBatchSize(good.length);
    const records = batch.map((entry) => this.record(entry, probabilities[good.indexOf(entry)], inferenceError, inferenceMs));
    this.stats.batches++;
    this.audit(records);
    this.actuate(records);
  }

  private record(entry: DecodedFrame, scores: Float32Array | undefined, inferenceError: string | undefined, inferenceMs: number): DecisionRecord {
    const { frame } = entry;
    const manifest = this.options.runner.manifest;
    const decidedAt = Date.now();
    const error = entry.error ?? (scores === undefined ? inferenceError ?? "no scores" : null);
    const decision = scores ? this.options.policy.decide(scores) : undefined;
    return {
      frameId: frame.id,
      source: frame.source,
      capturedAt: frame.capturedAt,
      decidedAt,
      modelName: manifest.name,
      modelVersion: manifest.version,
      modelSha256: manifest.file.sha256,
      top: decision?.top ?? [],
      label: decision?.label ?? null,
      confidence: decision?.confidence ?? null,
      bin: decision?.bin ?? this.rejectBin(),
      reason: decision ? decision.reason : "error",
      latency: {
        queueMs: entry.decodeStartedAt - frame.capturedAt,
        decodeMs: entry.decodedAt - entry.decodeStartedAt,
        inferenceMs: entry.pixels ? inferenceMs : 0,
        totalMs: decidedAt - frame.capturedAt,
      },
      error,
      truth: frame.label ?? null,
    };
  }

  private rejectBin(): string {
    return this.options.policy.rejectBinName;
  }

  private audit(records: DecisionRecord[]): void {
    const store = this.options.audit;
    if (!store) {
      return;
    }
    const batch = this.pendingAudit.length ? [...this.pendingAudit, ...records] : records;
    try {
      store.recordBatch(batch);
      if (this.pendingAudit.length) {
        this.logger.info({ records: this.pendingAudit.length }, "audit writes recovered; held records written");
      }
      this.pendingAudit = [];
    } catch (error) {
      this.stats.auditFailures++;
      this.options.metrics?.auditWriteFailed();
      const limit = this.options.maxPendingAudit ?? 10_000;
      const overflow = Math.max(0, batch.length - limit);
      this.stats.auditDropped += overflow;
      this.pendingAudit = batch.slice(overflow);
      const now = Date.now();
      if (now - this.lastAuditErrorLog > 10_000) {
        this.lastAuditErrorLog = now;
        this.logger.error({ err: describeError(error), held: this.pendingAudit.length, dropped: this.stats.auditDropped }, "audit write failed; decisions continue and are held in memory");
      }
    }
  }

  private flushPendingAudit(): void {
    if (this.pendingAudit.length && this.options.audit) {
      this.audit([]);
    }
  }

  private actuate(records: DecisionRecord[]): void {
    const { device, deadlineMs, metrics, runner } = this.options;
    const messages: ActuatorMessage[] = records.map((record) => ({
      frameId: record.frameId,
      source: record.source,
      device: device.id,
      bin: record.bin!,
      label: record.label,
      confidence: record.confidence,
      reason: record.reason,
      capturedAt: record.capturedAt,
      decidedAt: record.decidedAt,
      deadline: record.capturedAt + deadlineMs,
      model: { name: runner.manifest.name, version: runner.manifest.version },
    }));
    for (const actuator of this.options.actuators) {
      actuator.send(messages);
    }
    for (const record of records) {
      this.stats.decided++;
      if (record.error) {
        this.stats.errors++;
        metrics?.error(record.error.startsWith("inference") ? "inference" : "decode");
        this.logger.warn({ frame: record.frameId, source: record.source, err: record.error }, "frame could not be classified; sent to the reject bin");
      }
      metrics?.decision(record.bin!);
      metrics?.observeLatency("queue", record.latency.queueMs / 1000);
      metrics?.observeLatency("decode", record.latency.decodeMs / 1000);
      metrics?.observeLatency("inference", record.latency.inferenceMs / 1000);
      metrics?.observeLatency("total", record.latency.totalMs / 1000);
      this.options.onDecision?.(record);
    }
    this.stats.lastDecisionAt = Date.now();
  }
}
