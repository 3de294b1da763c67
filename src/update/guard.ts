import { mkdir, readFile } from "node:fs/promises";
import path from "node:path";

import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { writeJsonAtomic } from "./durable.js";
import { percentile, sameModel, type BatchObserver, type ModelIdentity, type ObservedBatch } from "./observe.js";

export interface CrashLoopOptions {
  /** Starts without markHealthy, within `windowMs`, after which shouldRollBack returns true. Default 3. */
  maxStarts?: number;
  /** Window in ms in which starts count. Default 10 minutes. */
  windowMs?: number;
  /** Clock in ms since the epoch, for tests. */
  now?: () => number;
  logger?: Logger;
}

interface BootRecord {
  /** Start times in ms since the epoch since the model was last marked healthy. */
  starts: number[];
  healthyAt: number | null;
}

/** Contents of `boots.json`. */
interface BootsFile {
  v: 1;
  models: Record<string, BootRecord>;
}

/** Maximum number of models with records in boots.json. The least recently started ones are dropped first. */
const MAX_MODELS = 16;

/**
 * Detects a model that crashes the agent: each agent start is recorded in
 * `<stateDir>/models/boots.json` (replaced atomically), and a model that started `maxStarts`
 * times within `windowMs` without being marked healthy should be rolled back.
 */
export class CrashLoopGuard {
  private readonly file: string;
  private readonly maxStarts: number;
  private readonly windowMs: number;
  private readonly now: () => number;
  private readonly logger: Logger;

  private constructor(
    stateDir: string,
    options: CrashLoopOptions,
    private boots: BootsFile,
  ) {
    this.file = path.join(path.resolve(stateDir), "models", "boots.json");
    this.maxStarts = options.maxStarts ?? 3;
    this.windowMs = options.windowMs ?? 10 * 60_000;
    this.now = options.now ?? Date.now;
    this.logger = options.logger ?? silentLogger;
  }

  /** Reads boots.json. A missing or invalid file counts as no starts, and an invalid one is logged. */
  static async open(stateDir: string, options: CrashLoopOptions = {}): Promise<CrashLoopGuard> {
    const file = path.join(path.resolve(stateDir), "models", "boots.json");
    await mkdir(path.dirname(file), { recursive: true });
    let boots: BootsFile = { v: 1, models: {} };
    try {
      const document = JSON.parse(await readFile(file, "utf8")) as Partial<BootsFile>;
      if (document.v === 1 && typeof document.models === "object" && document.models !== null) {
        boots = { v: 1, models: document.models };
      } else {
        options.logger?.warn({ file }, "crash-loop guard: boots.json has an unknown form; starting with no records");
      }
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") {
        options.logger?.warn({ file, err: describeError(error) }, "crash-loop guard: cannot read boots.json; starting with no records");
      }
    }
    return new CrashLoopGuard(stateDir, options, boots);
  }

  private record(id: string): BootRecord {
    const existing = this.boots.models[id];
    const valid = existing && Array.isArray(existing.starts) ? existing : { starts: [], healthyAt: null };
    this.boots.models[id] = valid;
    return valid;
  }

  /** Starts of `id` since it was last marked healthy that fall within the window. */
  startsWithinWindow(id: string): number {
    const since = this.now() - this.windowMs;
    return (this.boots.models[id]?.starts ?? []).filter((time) => typeof time === "number" && time >= since).length;
  }

  /** Records an agent start with model `id` and returns the starts within the window, this one included. */
  async recordStart(id: string): Promise<number> {
    const record = this.record(id);
    const since = this.now() - this.windowMs;
    record.starts = [...record.starts.filter((time) => time >= since), this.now()].slice(-this.maxStarts * 4);
    this.dropOldModels();
    await writeJsonAtomic(this.file, this.boots);
    const starts = this.startsWithinWindow(id);
    this.logger.info({ version: id, starts, maxStarts: this.maxStarts }, "crash-loop guard: start recorded");
    return starts;
  }

  /** Records that model `id` ran without trouble, so its earlier starts no longer count. */
  async markHealthy(id: string): Promise<void> {
    const record = this.record(id);
    record.starts = [];
    record.healthyAt = this.now();
    await writeJsonAtomic(this.file, this.boots);
    this.logger.info({ version: id }, "crash-loop guard: model marked healthy");
  }

  /** True when model `id` started `maxStarts` times within the window without being marked healthy. */
  shouldRollBack(id: string): boolean {
    return this.startsWithinWindow(id) >= this.maxStarts;
  }

  private dropOldModels(): void {
    const lastStart = (record: BootRecord): number => Math.max(record.healthyAt ?? 0, ...record.starts);
    const ids = Object.keys(this.boots.models).sort((a, b) => lastStart(this.boots.models[b]!) - lastStart(this.boots.models[a]!));
    for (const id of ids.slice(MAX_MODELS)) {
      delete this.boots.models[id];
    }
  }
}

/** Error rate and inference latency of a model over some frames. */
export interface ModelFigures {
  frames: number;
  /** Frames whose inference failed, as a fraction of all frames. */
  errorRate: number;
  /** p95 of the per-batch inference latency in ms, as ShadowRun measures it. */
  p95LatencyMs: number;
}

export interface RegressionOptions {
  /** Figures of the previous model, or of the candidate's shadow run. */
  baseline: ModelFigures;
  /** Frames of the new model to watch before the verdict. */
  windowFrames: number;
  /** Allowed rise of the error rate over the baseline's, as a fraction of frames (0.02 is 2 points). */
  maxErrorRateIncrease: number;
  /** Allowed ratio of the new model's p95 latency to the baseline's. */
  maxLatencyFactor: number;
  /** When set, batches of any other model are ignored, for example batches still in flight at the switch. */
  model?: ModelIdentity;
}

export interface RegressionVerdict {
  rollBack: boolean;
  reason: string;
  figures: ModelFigures;
  baseline: ModelFigures;
}

/**
 * Watches a newly activated model for `windowFrames` frames and compares its error rate and
 * p95 inference latency with the baseline. The verdict comes early when the errors already
 * exceed what the whole window allows.
 */
export class RegressionMonitor implements BatchObserver {
  private frames = 0;
  private errors = 0;
  private readonly latencies: number[] = [];
  private result: RegressionVerdict | undefined;
  private resolveDone!: (verdict: RegressionVerdict) => void;
  /** Resolves with the verdict. */
  readonly done: Promise<RegressionVerdict>;

  constructor(private readonly options: RegressionOptions) {
    if (!(options.windowFrames >= 1)) {
      throw new RangeError(`windowFrames must be at least 1, got ${options.windowFrames}`);
    }
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  get verdict(): RegressionVerdict | undefined {
    return this.result;
  }

  private get errorLimit(): number {
    return this.options.baseline.errorRate + this.options.maxErrorRateIncrease;
  }

  onBatch(batch: ObservedBatch): void {
    if (this.result || (this.options.model && !sameModel(batch.model, this.options.model))) {
      return;
    }
    const frames = Math.max(batch.pixels.length, batch.labels.length, batch.errors ?? 0);
    this.frames += frames;
    this.errors += batch.errors ?? 0;
    // A batch whose inference failed has no pixels and no latency worth comparing.
    if (batch.pixels.length > 0) {
      this.latencies.push(batch.inferenceMs);
    }
    if (this.tooManyErrors() || this.frames >= this.options.windowFrames) {
      this.finish();
    }
  }

  /** Current figures of the watched model. */
  figures(): ModelFigures {
    return { frames: this.frames, errorRate: this.frames ? this.errors / this.frames : 0, p95LatencyMs: percentile(this.latencies, 0.95) };
  }

  /** True when the errors so far exceed what the limit allows over the whole window. */
  private tooManyErrors(): boolean {
    return this.errors > this.errorLimit * this.options.windowFrames;
  }

  private finish(): void {
    const figures = this.figures();
    const { baseline, maxLatencyFactor } = this.options;
    let reason: string;
    let rollBack = true;
    if (this.tooManyErrors() || figures.errorRate > this.errorLimit) {
      reason = `error rate ${formatRate(figures.errorRate)} over ${figures.frames} frames exceeds the limit ${formatRate(this.errorLimit)} (previous model ${formatRate(baseline.errorRate)})`;
    } else if (baseline.p95LatencyMs > 0 && figures.p95LatencyMs > maxLatencyFactor * baseline.p95LatencyMs) {
      reason = `p95 inference latency ${figures.p95LatencyMs.toFixed(1)} ms exceeds ${maxLatencyFactor} x the previous model's ${baseline.p95LatencyMs.toFixed(1)} ms`;
    } else {
      rollBack = false;
      reason = `error rate ${formatRate(figures.errorRate)} and p95 latency ${figures.p95LatencyMs.toFixed(1)} ms over ${figures.frames} frames are within limits`;
    }
    this.result = { rollBack, reason, figures, baseline };
    this.resolveDone(this.result);
  }
}

function formatRate(rate: number): string {
  return `${(rate * 100).toFixed(1)}%`;
}
