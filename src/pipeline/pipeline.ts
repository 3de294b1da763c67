import type { DecisionRecord } from "../audit/types.js";
import type { Frame } from "../capture/types.js";
import type { Actuator, ActuatorMessage } from "../decision/actuators.js";
import type { DecisionPolicy } from "../decision/policy.js";
import type { AgentMetrics } from "../health/metrics.js";
import type { ModelRunner } from "../inference/runner.js";
import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { PreprocessPolicy } from "../models/manifest.js";
import { prepareImage } from "../preprocess/image.js";
import { DropOldestQueue } from "./queue.js";

/** The part of the audit store the pipeline needs: a synchronous, committed batch write. */
export interface AuditSink {
  recordBatch(records: readonly DecisionRecord[]): void;
}

/** One frame the model scored, as the observer receives it. */
export interface ScoredFrame {
  /** The frame as the source sent it; `frame.data` contains the encoded image (JPEG for cameras). */
  frame: Frame;
  /** Model input: crop height x width x 3 RGB bytes. */
  pixels: Buffer;
  /** The audited decision. */
  record: DecisionRecord;
  probabilities: Float32Array;
  embedding: Float32Array;
  /** Labels of the model, in the order of `probabilities`. */
  labels: readonly string[];
  model: { name: string; version: string; sha256: string };
}

/** Receives the scored frames of each batch after the batch was audited and sent to the actuators. */
export interface PipelineObserver {
  /**
   * Runs synchronously in the inference loop, so the next batch waits for it; keep it short.
   * The pipeline logs a thrown error or a rejected promise and goes on.
   */
  onScored(entries: readonly ScoredFrame[]): void | Promise<void>;
  /**
   * Called for a batch whose inference failed, with the number of frames that were sent to the
   * reject bin because of it. Frames that could not be decoded are not counted: a corrupt image
   * is not the model's fault.
   */
  onInferenceFailed?(frames: number, model: { name: string; version: string; sha256: string }): void;
}

export interface PipelineOptions {
  /** The model at start; swapModel replaces it and the policy. */
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
  /** Receives the frames the model scored, once per batch, after onDecision. */
  observer?: PipelineObserver;
}

interface DecodedFrame {
  frame: Frame;
  pixels?: Buffer;
  /** Preprocessing the pixels were made with; it changes when a model swap changes it. */
  preprocess: PreprocessPolicy;
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
  /** Frames dropped because the pipeline was paused; they also count in `dropped`. */
  pausedDrops: number;
  /** Batches whose observer threw or rejected. */
  observerErrors: number;
  lastDecisionAt: number | undefined;
}

/** The model and decision policy that decide one batch. */
interface ActiveModel {
  runner: ModelRunner;
  policy: DecisionPolicy;
}

/**
 * Frames in, decisions out: a bounded drop-oldest queue, decoding as frames arrive, micro-batched
 * inference, the decision policy, a committed audit write, then the actuators.
 *
 * Decoding of the next frames overlaps inference of the current batch. The audit batch commits
 * before any of its decisions reaches an actuator, so a decision that was sent is in the audit.
 * The exception is a period of failing audit writes (a full disk, say). The line keeps moving
 * then, and the records wait in memory (bounded) until the store accepts writes again.
 *
 * `swapModel` replaces the model between batches: each batch reads the model and policy once
 * when it starts, so no batch mixes two models.
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
  private lastObserverErrorLog = 0;
  private model: ActiveModel;
  private activeBatch: Promise<void> | undefined;
  private isPaused = false;
  readonly stats: PipelineStats = {
    received: 0,
    dropped: 0,
    decided: 0,
    errors: 0,
    batches: 0,
    auditFailures: 0,
    auditDropped: 0,
    pausedDrops: 0,
    observerErrors: 0,
    lastDecisionAt: undefined,
  };

  constructor(private readonly options: PipelineOptions) {
    this.input = new DropOldestQueue(options.queueSize);
    this.logger = options.logger ?? silentLogger;
    this.model = { runner: options.runner, policy: options.policy };
  }

  /** The model that decides the next batch. */
  get runner(): ModelRunner {
    return this.model.runner;
  }

  /** True while frames are dropped on arrival; see pause(). */
  get paused(): boolean {
    return this.isPaused;
  }

  /**
   * Drops every frame submitted from now on, counted as reason "paused". Frames accepted before
   * the call are still decided.
   */
  pause(): void {
    if (!this.isPaused) {
      this.isPaused = true;
      this.logger.info({}, "pipeline paused; new frames are dropped");
    }
  }

  /** Accepts frames again after pause(). */
  resume(): void {
    if (this.isPaused) {
      this.isPaused = false;
      this.logger.info({ pausedDrops: this.stats.pausedDrops }, "pipeline resumed");
    }
  }

  /**
   * Makes `runner` and `policy` decide every batch that starts after this call. A batch in
   * inference keeps the previous model. Resolves with the previous runner once no batch uses it,
   * so the caller may release it then. Frames decoded for a different preprocessing are decoded
   * again before inference.
   */
  async swapModel(runner: ModelRunner, policy: DecisionPolicy): Promise<ModelRunner> {
    const previous = this.model.runner;
    const inFlight = this.activeBatch;
    this.model = { runner, policy };
    const { name, version, file } = runner.manifest;
    this.options.metrics?.setModel({ name, version, sha256: file.sha256, provider: runner.provider });
    this.logger.info(
      { model: name, modelVersion: version, modelSha256: file.sha256, previousVersion: previous.manifest.version },
      "model swapped; the next batch uses it",
    );
    await inFlight;
    return previous;
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
    if (this.isPaused) {
      this.stats.dropped++;
      this.stats.pausedDrops++;
      this.options.metrics?.frameDropped(frame.source, "paused");
      return;
    }
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
    const preprocess = this.model.runner.manifest.preprocess;
    try {
      const prepared = await prepareImage(frame.data, preprocess);
      return { frame, pixels: prepared.pixels, preprocess, decodeStartedAt, decodedAt: Date.now() };
    } catch (error) {
      return { frame, error: describeError(error), preprocess, decodeStartedAt, decodedAt: Date.now() };
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
      this.activeBatch = this.runBatch(batch);
      await this.activeBatch;
      this.activeBatch = undefined;
    }
  }

  private async runBatch(batch: DecodedFrame[]): Promise<void> {
    const model = this.model;
    await this.redecodeForModel(batch, model.runner.manifest.preprocess);
    const good = batch.filter((entry) => entry.pixels !== undefined);
    const inferenceStart = Date.now();
    let probabilities: Float32Array[] = [];
    let embeddings: Float32Array[] = [];
    let inferenceError: string | undefined;
    if (good.length > 0) {
      try {
        ({ probabilities, embeddings } = await model.runner.run(good.map((entry) => entry.pixels!)));
      } catch (error) {
        inferenceError = `inference failed: ${describeError(error)}`;
        this.logger.error({ err: inferenceError, batch: good.length }, "inference failed; frames go to the reject bin");
      }
    }
    const inferenceMs = Date.now() - inferenceStart;
    this.options.metrics?.observeBatchSize(good.length);
    const records = batch.map((entry) => this.record(model, entry, probabilities[good.indexOf(entry)], inferenceError, inferenceMs));
    this.stats.batches++;
    this.audit(records);
    this.actuate(model, records);
    this.notifyObserver(model, batch, records, probabilities, embeddings, good);
  }

  /** Decodes again the frames whose pixels were made for another preprocessing than `preprocess`. */
  private async redecodeForModel(batch: DecodedFrame[], preprocess: PreprocessPolicy): Promise<void> {
    const stale = batch.filter((entry) => entry.pixels !== undefined && entry.preprocess !== preprocess);
    if (stale.length === 0) {
      return;
    }
    const key = JSON.stringify(preprocess);
    await Promise.all(
      stale.map(async (entry) => {
        if (JSON.stringify(entry.preprocess) === key) {
          entry.preprocess = preprocess;
          return;
        }
        const decodeStartedAt = Date.now();
        try {
          entry.pixels = (await prepareImage(entry.frame.data, preprocess)).pixels;
        } catch (error) {
          entry.pixels = undefined;
          entry.error = describeError(error);
        }
        entry.preprocess = preprocess;
        entry.decodedAt += Date.now() - decodeStartedAt;
      }),
    );
  }

  private notifyObserver(
    model: ActiveModel,
    batch: DecodedFrame[],
    records: DecisionRecord[],
    probabilities: Float32Array[],
    embeddings: Float32Array[],
    good: DecodedFrame[],
  ): void {
    const observer = this.options.observer;
    if (!observer) {
      return;
    }
    const { name, version, file, labels } = model.runner.manifest;
    const modelInfo = { name, version, sha256: file.sha256 };
    if (probabilities.length === 0) {
      if (good.length > 0 && observer.onInferenceFailed) {
        try {
          observer.onInferenceFailed(good.length, modelInfo);
        } catch (error) {
          this.observerFailed(error, good.length);
        }
      }
      return;
    }
    const entries: ScoredFrame[] = [];
    batch.forEach((entry, index) => {
      const position = good.indexOf(entry);
      const scores = probabilities[position];
      const embedding = embeddings[position];
      if (position < 0 || scores === undefined || embedding === undefined) {
        return;
      }
      entries.push({ frame: entry.frame, pixels: entry.pixels!, record: records[index]!, probabilities: scores, embedding, labels, model: modelInfo });
    });
    if (entries.length === 0) {
      return;
    }
    try {
      Promise.resolve(observer.onScored(entries)).catch((error: unknown) => this.observerFailed(error, entries.length));
    } catch (error) {
      this.observerFailed(error, entries.length);
    }
  }

  private observerFailed(error: unknown, frames: number): void {
    this.stats.observerErrors++;
    const now = Date.now();
    if (now - this.lastObserverErrorLog > 10_000) {
      this.lastObserverErrorLog = now;
      this.logger.error({ err: describeError(error), frames, observerErrors: this.stats.observerErrors }, "pipeline observer failed; decisions continue");
    }
  }

  private record(
    model: ActiveModel,
    entry: DecodedFrame,
    scores: Float32Array | undefined,
    inferenceError: string | undefined,
    inferenceMs: number,
  ): DecisionRecord {
    const { frame } = entry;
    const manifest = model.runner.manifest;
    const decidedAt = Date.now();
    const error = entry.error ?? (scores === undefined ? inferenceError ?? "no scores" : null);
    const decision = scores ? model.policy.decide(scores) : undefined;
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
      bin: decision?.bin ?? model.policy.rejectBinName,
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

  private actuate(model: ActiveModel, records: DecisionRecord[]): void {
    const { device, deadlineMs, metrics } = this.options;
    const { runner } = model;
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
