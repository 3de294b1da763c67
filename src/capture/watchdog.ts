import { CameraError, ConfigError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { Frame, FrameHandler, FrameSource } from "./types.js";

/** Capped exponential backoff with jitter, in milliseconds. */
export interface BackoffOptions {
  /** Delay before the first restart. */
  initialMs: number;
  /** Upper bound of the delay before jitter is applied. */
  maxMs: number;
  /** Growth of the delay per consecutive restart. */
  factor: number;
  /** Relative jitter: the delay is scaled by a uniform factor in [1 - jitter, 1 + jitter]. */
  jitter: number;
}

export const DEFAULT_BACKOFF: Readonly<BackoffOptions> = { initialMs: 1000, maxMs: 30_000, factor: 2, jitter: 0.2 };
export const DEFAULT_STALL_SECONDS = 10;

/** Cause of a restart of the wrapped source. */
export type RestartReason = "stall" | "error" | "start-failed";

export interface RestartEvent {
  reason: RestartReason;
  /** Consecutive restarts without a frame in between, counting this one. */
  attempt: number;
  /** Wait before the source is started again. */
  delayMs: number;
  /** The error the source reported or its start rejected with; absent for stalls. */
  error?: Error;
}

export interface WatchdogStats {
  /** Frames passed on since construction. */
  frames: number;
  /** Restarts scheduled, for any reason. */
  restarts: number;
  /** Times no frame arrived for `stallSeconds`. */
  stalls: number;
  /** Errors reported by the source plus failed starts. */
  failures: number;
  /** Time of the last frame, milliseconds since the Unix epoch; null before the first. */
  lastFrameAt: number | null;
  /** Consecutive restarts since frames last flowed. */
  attempt: number;
}

export interface CameraWatchdogOptions {
  /** Seconds without a frame after which the source is restarted; default 10. */
  stallSeconds?: number;
  backoff?: Partial<BackoffOptions>;
  /** Called on every restart, after it is logged; exceptions it throws are logged and ignored. */
  onRestart?: (event: RestartEvent) => void;
  logger?: Logger;
  /** Uniform numbers in [0, 1) for the jitter; default Math.random. */
  random?: () => number;
}

/** Returns the delay before restart number `attempt` (0 for the first), capped and jittered. */
export function backoffDelay(attempt: number, options: BackoffOptions, random: () => number = Math.random): number {
  // factor ** attempt overflows to Infinity after many attempts, and 0 * Infinity is NaN.
  const capped = options.initialMs === 0 ? 0 : Math.min(options.maxMs, options.initialMs * options.factor ** attempt);
  const scale = 1 + options.jitter * (2 * random() - 1);
  return Math.max(0, Math.round(capped * scale));
}

/**
 * Keeps a frame source running. When no frame arrives for `stallSeconds`, the source reports an
 * error, or its start fails, the watchdog stops it and starts it again after a capped exponential
 * backoff with jitter. The backoff starts over once a frame arrives after a restart.
 *
 * The watchdog is itself a `FrameSource`, but it never calls `onError`: failures become restarts,
 * visible in the logs, in `stats` and through `onRestart`. Frames and errors that a replaced run
 * of the source delivers late are ignored.
 *
 * NOTE: this relies on the source's `start` settling. A start that never settles blocks restarts
 * and `stop`.
 */
export class CameraWatchdog implements FrameSource {
  readonly name: string;
  private readonly stallMs: number;
  private readonly backoff: BackoffOptions;
  private readonly logger: Logger;
  private readonly counters: WatchdogStats = { frames: 0, restarts: 0, stalls: 0, failures: 0, lastFrameAt: null, attempt: 0 };
  private running = false;
  /** Increases with every run of the source; callbacks from older runs are ignored. */
  private generation = 0;
  private lastActivityAt = 0;
  private restarting = false;
  private stallTimer: NodeJS.Timeout | undefined;
  private restartTimer: NodeJS.Timeout | undefined;
  private starting: Promise<void> = Promise.resolve();
  private sourceStopped: Promise<void> = Promise.resolve();
  private onFrame: FrameHandler = () => {};

  constructor(
    readonly source: FrameSource,
    private readonly options: CameraWatchdogOptions = {},
  ) {
    const stallSeconds = options.stallSeconds ?? DEFAULT_STALL_SECONDS;
    if (!Number.isFinite(stallSeconds) || stallSeconds <= 0) {
      throw new ConfigError("stallSeconds", `must be a positive number of seconds, got ${stallSeconds}`);
    }
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    validateBackoff(this.backoff);
    this.name = source.name;
    this.stallMs = stallSeconds * 1000;
    this.logger = (options.logger ?? silentLogger).child({ source: source.name });
  }

  get stats(): Readonly<WatchdogStats> {
    return { ...this.counters };
  }

  /**
   * Starts the source and resolves after the first attempt. A failed first start does not reject:
   * it is logged and retried like any other failure.
   */
  async start(onFrame: FrameHandler): Promise<void> {
    if (this.running) {
      throw new CameraError(`camera watchdog for source ${this.name} is already running`);
    }
    this.running = true;
    this.onFrame = onFrame;
    this.counters.attempt = 0;
    this.logger.info({ stallSeconds: this.stallMs / 1000 }, "camera watchdog started");
    await this.startSource();
  }

  /** Cancels any pending restart and stops the source. */
  async stop(): Promise<void> {
    if (!this.running) {
      return;
    }
    this.running = false;
    this.generation += 1;
    clearTimeout(this.stallTimer);
    clearTimeout(this.restartTimer);
    this.restarting = false;
    await this.sourceStopped;
    await this.starting;
    await this.stopSource();
    this.logger.info({ ...this.counters }, "camera watchdog stopped");
  }

  private startSource(): Promise<void> {
    const generation = ++this.generation;
    this.lastActivityAt = Date.now();
    // Armed before start, so that a start which resolves but never yields a frame is caught too.
    this.armStallTimer(generation, this.stallMs);
    this.starting = this.source
      .start(
        (frame) => this.handleFrame(generation, frame),
        (error) => this.handleError(generation, error),
      )
      .catch((error: unknown) => {
        if (generation !== this.generation || !this.running) {
          return;
        }
        this.counters.failures += 1;
        this.logger.error({ err: error }, "camera source failed to start");
        this.scheduleRestart("start-failed", asError(error));
      });
    return this.starting;
  }

  private handleFrame(generation: number, frame: Frame): void {
    if (generation !== this.generation || !this.running) {
      return;
    }
    const now = Date.now();
    this.lastActivityAt = now;
    this.counters.lastFrameAt = now;
    this.counters.frames += 1;
    if (this.counters.attempt > 0) {
      this.logger.info({ attempts: this.counters.attempt, frame: frame.id }, "camera frames flowing again");
      this.counters.attempt = 0;
    }
    this.onFrame(frame);
  }

  private handleError(generation: number, error: Error): void {
    if (generation !== this.generation || !this.running) {
      return;
    }
    this.counters.failures += 1;
    this.scheduleRestart("error", error);
  }

  private armStallTimer(generation: number, delayMs: number): void {
    clearTimeout(this.stallTimer);
    this.stallTimer = setTimeout(() => this.checkStall(generation), delayMs);
  }

  private checkStall(generation: number): void {
    if (generation !== this.generation || !this.running) {
      return;
    }
    const idleMs = Date.now() - this.lastActivityAt;
    if (idleMs < this.stallMs) {
      this.armStallTimer(generation, this.stallMs - idleMs);
      return;
    }
    this.counters.stalls += 1;
    this.scheduleRestart("stall");
  }

  private scheduleRestart(reason: RestartReason, error?: Error): void {
    if (!this.running || this.restarting) {
      return;
    }
    this.restarting = true;
    this.generation += 1;
    clearTimeout(this.stallTimer);

    const delayMs = backoffDelay(this.counters.attempt, this.backoff, this.options.random);
    this.counters.attempt += 1;
    this.counters.restarts += 1;
    const event: RestartEvent = { reason, attempt: this.counters.attempt, delayMs, ...(error ? { error } : {}) };
    this.logger.warn({ reason, attempt: event.attempt, delayMs, err: error, stallSeconds: this.stallMs / 1000 }, "restarting camera source");
    this.notifyRestart(event);

    const previousStart = this.starting;
    this.sourceStopped = previousStart.then(() => this.stopSource());
    this.restartTimer = setTimeout(() => void this.restartAfterStop(), delayMs);
  }

  private async restartAfterStop(): Promise<void> {
    await this.sourceStopped;
    if (!this.running || !this.restarting) {
      return;
    }
    this.restarting = false;
    await this.startSource();
  }

  /** Stops the source; failures are logged, because the next start is the recovery. */
  private async stopSource(): Promise<void> {
    try {
      await this.source.stop();
    } catch (error) {
      this.logger.warn({ err: error }, "camera source failed to stop");
    }
  }

  private notifyRestart(event: RestartEvent): void {
    try {
      this.options.onRestart?.(event);
    } catch (error) {
      this.logger.error({ err: error }, "onRestart hook failed");
    }
  }
}

function validateBackoff(backoff: BackoffOptions): void {
  if (!Number.isFinite(backoff.initialMs) || backoff.initialMs < 0) {
    throw new ConfigError("backoff.initialMs", `must be a number of milliseconds of at least 0, got ${backoff.initialMs}`);
  }
  if (!Number.isFinite(backoff.maxMs) || backoff.maxMs < backoff.initialMs) {
    throw new ConfigError("backoff.maxMs", `must be at least backoff.initialMs (${backoff.initialMs}), got ${backoff.maxMs}`);
  }
  if (!Number.isFinite(backoff.factor) || backoff.factor < 1) {
    throw new ConfigError("backoff.factor", `must be a number of at least 1, got ${backoff.factor}`);
  }
  if (!Number.isFinite(backoff.jitter) || backoff.jitter < 0 || backoff.jitter > 1) {
    throw new ConfigError("backoff.jitter", `must be a number from 0 to 1, got ${backoff.jitter}`);
  }
}

function asError(value: unknown): Error {
  return value instanceof Error ? value : new Error(String(value));
}
