import { readdir, readFile, statfs } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import si from "systeminformation";

import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";

/** Pipeline stages whose latency `sortline_stage_latency_seconds` records. */
export const LATENCY_STAGES = ["queue", "decode", "inference", "total"] as const;
export type LatencyStage = (typeof LATENCY_STAGES)[number];

/** Latency buckets in seconds, from 1 ms to 5 s. */
export const LATENCY_BUCKETS_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

/** Batch size buckets, in frames per inference call. */
export const BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64];

/** Drop reasons that start at 0 for every source, so rate() works before the first drop. */
export const KNOWN_DROP_REASONS = ["queue_full", "decode_error"] as const;

export const DEFAULT_SYSTEM_INTERVAL_MS = 15_000;

/** Labels of `sortline_model_info`. */
export interface ModelInfo {
  name: string;
  version: string;
  sha256: string;
  /** onnxruntime execution provider, for example `cuda` or `cpu`. */
  provider: string;
}

/** One reading of the host, taken off the frame path. Fields are absent when unavailable. */
export interface SystemSample {
  /** CPU busy time since the previous sample over all cores, 0–100. */
  cpuLoadPercent?: number;
  /** Memory in use, excluding buffers and page cache. */
  memoryUsedBytes?: number;
  memoryTotalBytes?: number;
  cpuTemperature?: { zone: string; celsius: number };
  /** Bytes available to unprivileged users on the file system of the data directory. */
  diskFreeBytes?: number;
  /** Error message per part (`memory`, `temperature`, `disk`) whose reading failed. */
  failures?: Record<string, string>;
}

export type SystemSampler = () => Promise<SystemSample>;

export interface SystemSamplerOptions {
  /** Directory whose file system `diskFreeBytes` reports; omitted means no disk reading. */
  dataDir?: string;
  /** sysfs thermal class directory; tests point it at a fixture tree. */
  thermalDir?: string;
}

export interface AgentMetricsOptions extends SystemSamplerOptions {
  logger?: Logger;
  /** Period of the system sampling timer in milliseconds. */
  systemIntervalMs?: number;
  /** Replaces the host reader, for example in tests; defaults to `createSystemSampler(options)`. */
  systemSampler?: SystemSampler;
  /** Registers prom-client's process and Node.js metrics (`process_*`, `nodejs_*`); defaults to true. */
  defaultMetrics?: boolean;
}

/** Pre-bound counters of one camera source, so per-frame calls skip label validation of new series. */
export class SourceMetrics {
  private readonly received: Counter.Internal;
  private readonly drops = new Map<string, Counter.Internal>();
  private readonly restarts = new Map<string, Counter.Internal>();

  constructor(
    readonly source: string,
    private readonly counters: {
      frames: Counter<"source">;
      dropped: Counter<"source" | "reason">;
      restarts: Counter<"source" | "reason">;
    },
  ) {
    this.received = counters.frames.labels({ source });
    this.received.inc(0);
    for (const reason of KNOWN_DROP_REASONS) {
      this.dropChild(reason).inc(0);
    }
  }

  frameReceived(count = 1): void {
    this.received.inc(count);
  }

  frameDropped(reason: string, count = 1): void {
    this.dropChild(reason).inc(count);
  }

  cameraRestarted(reason: string): void {
    let child = this.restarts.get(reason);
    if (child === undefined) {
      child = this.counters.restarts.labels({ source: this.source, reason });
      this.restarts.set(reason, child);
    }
    child.inc();
  }

  private dropChild(reason: string): Counter.Internal {
    let child = this.drops.get(reason);
    if (child === undefined) {
      child = this.counters.dropped.labels({ source: this.source, reason });
      this.drops.set(reason, child);
    }
    return child;
  }
}

/**
 * Prometheus metrics of the agent in a registry of its own (not prom-client's global one).
 *
 * Per-frame methods only look up a cached label child and update it. Host readings come from a
 * timer started by `start()`, so a scrape renders cached gauges and never runs the system sampler.
 */
export class AgentMetrics {
  readonly registry = new Registry();

  private readonly logger: Logger;
  private readonly systemIntervalMs: number;
  private readonly sampler: SystemSampler;
  private systemTimer: NodeJS.Timeout | undefined;
  private sampling: Promise<void> | undefined;
  private readonly failingParts = new Set<string>();

  private readonly frames: Counter<"source">;
  private readonly framesDropped: Counter<"source" | "reason">;
  private readonly decisions: Counter<"bin">;
  private readonly errors: Counter<"stage">;
  private readonly cameraRestarts: Counter<"source" | "reason">;
  private readonly auditWriteFailures: Counter;
  private readonly stageLatency: Histogram<"stage">;
  private readonly batchSize: Histogram;
  private readonly queueDepth: Gauge<"queue">;
  private readonly modelInfo: Gauge<"name" | "version" | "sha256" | "provider">;
  private readonly ready: Gauge;
  private readonly cpuLoad: Gauge;
  private readonly memoryUsed: Gauge;
  private readonly memoryTotal: Gauge;
  private readonly cpuTemperature: Gauge<"zone">;
  private readonly diskFree: Gauge<"path">;

  private readonly sources = new Map<string, SourceMetrics>();
  private readonly decisionChildren = new Map<string, Counter.Internal>();
  private readonly errorChildren = new Map<string, Counter.Internal>();
  private readonly queueChildren = new Map<string, Gauge.Internal<"queue">>();
  private readonly latencyChildren: Record<LatencyStage, Histogram.Internal<"stage">>;

  constructor(private readonly options: AgentMetricsOptions = {}) {
    this.logger = options.logger ?? silentLogger;
    this.systemIntervalMs = options.systemIntervalMs ?? DEFAULT_SYSTEM_INTERVAL_MS;
    if (!Number.isFinite(this.systemIntervalMs) || this.systemIntervalMs < 1) {
      throw new RangeError(`systemIntervalMs must be a positive number of milliseconds, got ${this.systemIntervalMs}`);
    }
    this.sampler = options.systemSampler ?? createSystemSampler(options);
    const registers = [this.registry];

    this.frames = new Counter({
      name: "sortline_frames_total",
      help: "Frames received from each camera source.",
      labelNames: ["source"],
      registers,
    });
    this.framesDropped = new Counter({
      name: "sortline_frames_dropped_total",
      help: "Frames dropped before a decision, by source and reason (queue_full, decode_error, ...).",
      labelNames: ["source", "reason"],
      registers,
    });
    this.decisions = new Counter({
      name: "sortline_decisions_total",
      help: "Sorting decisions, by target bin.",
      labelNames: ["bin"],
      registers,
    });
    this.errors = new Counter({
      name: "sortline_errors_total",
      help: "Errors caught by the agent, by pipeline stage.",
      labelNames: ["stage"],
      registers,
    });
    this.cameraRestarts = new Counter({
      name: "sortline_camera_restarts_total",
      help: "Restarts of a camera source, by source and reason.",
      labelNames: ["source", "reason"],
      registers,
    });
    this.auditWriteFailures = new Counter({
      name: "sortline_audit_write_failures_total",
      help: "Failed audit batch writes. Each failed retry of the records held in memory counts again.",
      registers,
    });
    this.stageLatency = new Histogram({
      name: "sortline_stage_latency_seconds",
      help: "Time spent per frame in each pipeline stage (queue, decode, inference, total).",
      labelNames: ["stage"],
      buckets: LATENCY_BUCKETS_SECONDS,
      registers,
    });
    this.batchSize = new Histogram({
      name: "sortline_batch_size",
      help: "Frames per inference call.",
      buckets: BATCH_SIZE_BUCKETS,
      registers,
    });
    this.queueDepth = new Gauge({
      name: "sortline_queue_depth",
      help: "Items waiting in each bounded queue.",
      labelNames: ["queue"],
      registers,
    });
    this.modelInfo = new Gauge({
      name: "sortline_model_info",
      help: "The loaded model; always 1, the labels carry the information.",
      labelNames: ["name", "version", "sha256", "provider"],
      registers,
    });
    this.ready = new Gauge({
      name: "sortline_ready",
      help: "1 when the agent is ready to sort, 0 otherwise.",
      registers,
    });
    this.cpuLoad = new Gauge({
      name: "sortline_system_cpu_load_percent",
      help: "Host CPU load over all cores between the last two samples, 0-100; NaN before two samples or after a failed one.",
      registers,
    });
    this.memoryUsed = new Gauge({
      name: "sortline_system_memory_used_bytes",
      help: "Host memory in use excluding buffers and page cache; NaN before the first sample or after a failed one.",
      registers,
    });
    this.memoryTotal = new Gauge({
      name: "sortline_system_memory_total_bytes",
      help: "Host memory size; NaN before the first sample or after a failed one.",
      registers,
    });
    this.cpuTemperature = new Gauge({
      name: "sortline_system_cpu_temperature_celsius",
      help: "CPU temperature from the first sysfs thermal zone whose type names the CPU; absent when there is none.",
      labelNames: ["zone"],
      registers,
    });
    this.diskFree = new Gauge({
      name: "sortline_system_disk_free_bytes",
      help: "Bytes available to the agent on the file system of the data directory.",
      labelNames: ["path"],
      registers,
    });

    this.cpuLoad.set(Number.NaN);
    this.memoryUsed.set(Number.NaN);
    this.memoryTotal.set(Number.NaN);
    this.ready.set(0);
    this.auditWriteFailures.inc(0);
    for (const stage of LATENCY_STAGES) {
      this.stageLatency.zero({ stage });
    }
    this.latencyChildren = {
      queue: this.stageLatency.labels({ stage: "queue" }),
      decode: this.stageLatency.labels({ stage: "decode" }),
      inference: this.stageLatency.labels({ stage: "inference" }),
      total: this.stageLatency.labels({ stage: "total" }),
    };

    if (options.defaultMetrics ?? true) {
      collectDefaultMetrics({ register: this.registry });
    }
  }

  /** Returns the pre-bound counters of a camera source, creating its zero-valued series on first use. */
  source(name: string): SourceMetrics {
    let metrics = this.sources.get(name);
    if (metrics === undefined) {
      metrics = new SourceMetrics(name, {
        frames: this.frames,
        dropped: this.framesDropped,
        restarts: this.cameraRestarts,
      });
      this.sources.set(name, metrics);
    }
    return metrics;
  }

  frameReceived(source: string, count = 1): void {
    this.source(source).frameReceived(count);
  }

  frameDropped(source: string, reason: string, count = 1): void {
    this.source(source).frameDropped(reason, count);
  }

  cameraRestarted(source: string, reason: string): void {
    this.source(source).cameraRestarted(reason);
  }

  decision(bin: string): void {
    let child = this.decisionChildren.get(bin);
    if (child === undefined) {
      child = this.decisions.labels({ bin });
      this.decisionChildren.set(bin, child);
    }
    child.inc();
  }

  error(stage: string): void {
    let child = this.errorChildren.get(stage);
    if (child === undefined) {
      child = this.errors.labels({ stage });
      this.errorChildren.set(stage, child);
    }
    child.inc();
  }

  auditWriteFailed(): void {
    this.auditWriteFailures.inc();
  }

  /** Records the time a frame spent in `stage`; negative or non-finite durations are ignored. */
  observeLatency(stage: LatencyStage, seconds: number): void {
    if (!(seconds >= 0) || seconds === Number.POSITIVE_INFINITY) {
      return;
    }
    this.latencyChildren[stage].observe(seconds);
  }

  /** Records the frames in one inference call; sizes below 1 or non-finite are ignored. */
  observeBatchSize(size: number): void {
    if (!(size >= 1) || size === Number.POSITIVE_INFINITY) {
      return;
    }
    this.batchSize.observe(size);
  }

  setQueueDepth(queue: string, depth: number): void {
    let child = this.queueChildren.get(queue);
    if (child === undefined) {
      child = this.queueDepth.labels({ queue });
      this.queueChildren.set(queue, child);
    }
    child.set(depth);
  }

  /** Replaces the series of `sortline_model_info` with the given model. */
  setModel(info: ModelInfo): void {
    this.modelInfo.reset();
    this.modelInfo.set({ ...info }, 1);
  }

  setReady(ready: boolean): void {
    this.ready.set(ready ? 1 : 0);
  }

  /** Content-Type of `metricsText()` (Prometheus text format 0.0.4). */
  get contentType(): string {
    return this.registry.contentType;
  }

  /** Renders all metrics in the Prometheus text format from cached values. */
  metricsText(): Promise<string> {
    return this.registry.metrics();
  }

  /** Takes one host sample now and starts the sampling timer. Calling it again has no effect. */
  start(): void {
    if (this.systemTimer !== undefined) {
      return;
    }
    void this.sampleSystem();
    this.systemTimer = setInterval(() => void this.sampleSystem(), this.systemIntervalMs);
    this.systemTimer.unref();
  }

  /** Stops the sampling timer and waits for a sample in progress. */
  async stop(): Promise<void> {
    if (this.systemTimer !== undefined) {
      clearInterval(this.systemTimer);
      this.systemTimer = undefined;
    }
    await this.sampling;
  }

  /**
   * Reads the host once and updates the system gauges. A call while a sample is still running
   * returns that sample's promise. Never rejects; failures are logged when a part starts failing.
   */
  sampleSystem(): Promise<void> {
    if (this.sampling === undefined) {
      this.sampling = this.runSample().finally(() => {
        this.sampling = undefined;
      });
    }
    return this.sampling;
  }

  private async runSample(): Promise<void> {
    let sample: SystemSample;
    try {
      sample = await this.sampler();
    } catch (error) {
      sample = { failures: { sampler: describeError(error) } };
    }
    this.applySample(sample);
    this.logFailureChanges(sample.failures ?? {});
  }

  private applySample(sample: SystemSample): void {
    this.cpuLoad.set(sample.cpuLoadPercent ?? Number.NaN);
    this.memoryUsed.set(sample.memoryUsedBytes ?? Number.NaN);
    this.memoryTotal.set(sample.memoryTotalBytes ?? Number.NaN);

    this.cpuTemperature.reset();
    if (sample.cpuTemperature !== undefined) {
      this.cpuTemperature.set({ zone: sample.cpuTemperature.zone }, sample.cpuTemperature.celsius);
    }

    this.diskFree.reset();
    if (sample.diskFreeBytes !== undefined && this.options.dataDir !== undefined) {
      this.diskFree.set({ path: this.options.dataDir }, sample.diskFreeBytes);
    }
  }

  private logFailureChanges(failures: Record<string, string>): void {
    for (const [part, message] of Object.entries(failures)) {
      if (!this.failingParts.has(part)) {
        this.failingParts.add(part);
        this.logger.warn({ part, error: message }, "system metrics sample failed; the gauge reads NaN or is absent until it recovers");
      }
    }
    for (const part of [...this.failingParts]) {
      if (!(part in failures)) {
        this.failingParts.delete(part);
        this.logger.info({ part }, "system metrics sample recovered");
      }
    }
  }
}

interface CpuTimes {
  busy: number;
  total: number;
}

function readCpuTimes(): CpuTimes {
  let busy = 0;
  let total = 0;
  for (const cpu of os.cpus()) {
    const { user, nice, sys, irq, idle } = cpu.times;
    busy += user + nice + sys + irq;
    total += user + nice + sys + irq + idle;
  }
  return { busy, total };
}

/**
 * Creates the default host reader.
 *
 * Memory comes from systeminformation's `mem()`, which reads /proc/meminfo asynchronously.
 * CPU load, temperature and disk space do not, because systeminformation 5.33 runs a shell with
 * execSync on Linux in `currentLoad()` and `cpuTemperature()`. On an x86-64 build host that
 * blocked the event loop for about 10 ms and 20–30 ms per call. Instead, CPU load is the busy
 * share of `os.cpus()` times between two samples, temperature is read from sysfs thermal zones,
 * and disk space comes from statfs(2) on the data directory itself.
 */
export function createSystemSampler(options: SystemSamplerOptions = {}): SystemSampler {
  const thermalDir = options.thermalDir ?? "/sys/class/thermal";
  let previousCpu: CpuTimes | undefined;
  let thermalZone: Promise<ThermalZone | undefined> | undefined;

  return async () => {
    const sample: SystemSample = {};
    const failures: Record<string, string> = {};

    const currentCpu = readCpuTimes();
    if (previousCpu !== undefined && currentCpu.total > previousCpu.total) {
      sample.cpuLoadPercent = (100 * (currentCpu.busy - previousCpu.busy)) / (currentCpu.total - previousCpu.total);
    }
    previousCpu = currentCpu;

    const [memory, temperature, disk] = await Promise.allSettled([
      si.mem(),
      (async () => {
        thermalZone ??= findCpuThermalZone(thermalDir);
        const zone = await thermalZone;
        return zone === undefined ? undefined : readThermalZone(zone);
      })(),
      options.dataDir === undefined ? Promise.resolve(undefined) : statfs(options.dataDir),
    ]);

    if (memory.status === "fulfilled") {
      sample.memoryUsedBytes = memory.value.active;
      sample.memoryTotalBytes = memory.value.total;
    } else {
      failures.memory = describeError(memory.reason);
    }
    if (temperature.status === "fulfilled") {
      sample.cpuTemperature = temperature.value;
    } else {
      failures.temperature = describeError(temperature.reason);
    }
    if (disk.status === "fulfilled") {
      if (disk.value !== undefined) {
        sample.diskFreeBytes = disk.value.bavail * disk.value.bsize;
      }
    } else {
      failures.disk = describeError(disk.reason);
    }

    if (Object.keys(failures).length > 0) {
      sample.failures = failures;
    }
    return sample;
  };
}

interface ThermalZone {
  type: string;
  tempPath: string;
}

/**
 * Finds the first thermal zone whose type names the CPU: `cpu-thermal` (Jetson Orin, Raspberry Pi),
 * `CPU-therm` (Jetson Xavier and older) or `x86_pkg_temp` (Intel).
 */
async function findCpuThermalZone(thermalDir: string): Promise<ThermalZone | undefined> {
  let entries: string[];
  try {
    entries = await readdir(thermalDir);
  } catch {
    return undefined;
  }
  const zones = entries.filter((entry) => entry.startsWith("thermal_zone")).sort(compareZoneNames);
  for (const zone of zones) {
    let type: string;
    try {
      type = (await readFile(path.join(thermalDir, zone, "type"), "utf8")).trim();
    } catch {
      continue;
    }
    if (/cpu/i.test(type) || type === "x86_pkg_temp") {
      return { type, tempPath: path.join(thermalDir, zone, "temp") };
    }
  }
  return undefined;
}

function compareZoneNames(a: string, b: string): number {
  return Number(a.slice("thermal_zone".length)) - Number(b.slice("thermal_zone".length));
}

/** Reads a thermal zone; sysfs reports millidegrees Celsius. */
async function readThermalZone(zone: ThermalZone): Promise<{ zone: string; celsius: number }> {
  const text = (await readFile(zone.tempPath, "utf8")).trim();
  const millidegrees = Number(text);
  if (!Number.isFinite(millidegrees) || text === "") {
    throw new Error(`invalid temperature '${text}' in ${zone.tempPath}`);
  }
  return { zone: zone.type, celsius: millidegrees / 1000 };
}
