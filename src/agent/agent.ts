import { mkdir } from "node:fs/promises";
import path from "node:path";

import { AuditStore } from "../audit/store.js";
import type { DecisionRecord } from "../audit/types.js";
import { DirectorySource } from "../capture/directory.js";
import { gstreamerSource, rpicamSource } from "../capture/process.js";
import type { FrameSource } from "../capture/types.js";
import { CameraWatchdog } from "../capture/watchdog.js";
import type { AgentConfig, SourceConfig } from "../config/schema.js";
import { createActuators, type Actuator } from "../decision/actuators.js";
import { DecisionPolicy } from "../decision/policy.js";
import { HealthServer, type HealthReport } from "../health/http.js";
import { AgentMetrics } from "../health/metrics.js";
import { Notifier, WatchdogKeeper } from "../health/sdnotify.js";
import { ModelRunner } from "../inference/runner.js";
import { describeError } from "../lib/errors.js";
import type { Logger } from "../lib/log.js";
import { Pipeline, type PipelineObserver, type ScoredFrame } from "../pipeline/pipeline.js";
import { loadKnowledge } from "../mining/knowledge.js";
import { HardExampleMiner } from "../mining/miner.js";
import { Outbox } from "../mining/outbox.js";
import type { SelectorOptions } from "../mining/selector.js";
import type { ModelManifest } from "../models/manifest.js";
import type { TrustedKey } from "../models/signing.js";
import { CrashLoopGuard } from "../update/guard.js";
import type { BatchObserver, BatchTap, ObservedBatch } from "../update/observe.js";
import { resolveStartupModel } from "../update/startup.js";
import { ModelStore } from "../update/store.js";
import { ModelUpdater, type UpdateStatus } from "../update/updater.js";
import { registerCommands } from "./commands.js";
import { DeviceFleet, loadTrustedKeys, type ReceivedModel } from "./fleet.js";
import type { Overrides } from "./overrides.js";

export interface AgentOptions {
  config: AgentConfig;
  logger: Logger;
  /** Called after each decision has been audited and sent (demo statistics, tests). */
  onDecision?: (record: DecisionRecord) => void;
  /** Called when every non-looping source has delivered its last frame. */
  onSourcesEnded?: () => void;
  /** Called on every model update status change (verifying, shadowing, active, rejected, rolled back). */
  onUpdate?: (status: UpdateStatus) => void;
  env?: NodeJS.ProcessEnv;
  /** The configuration file, needed to validate settings changed by fleet commands. */
  configFile?: string;
  /** Settings changed by fleet commands that are already applied to `config`. */
  overrides?: Overrides;
  agentVersion?: string;
}

/** Selector options of a mining configuration. */
export function selectorOptions(config: AgentConfig["mining"]): SelectorOptions {
  return {
    lowConfidence: config.lowConfidence,
    minMargin: config.minMargin,
    noveltyThreshold: config.noveltyThreshold,
    randomRate: config.randomRate,
    minDistance: config.minDistance,
    clusterRadius: config.clusterRadius,
    maxClusterShare: config.maxClusterShare,
    budget: { perHour: config.perHour },
  };
}

/** Forwards the pipeline's batches to the observers the updater attaches (shadow runs, regression watches). */
class Tap implements BatchTap {
  readonly observers = new Set<BatchObserver>();
  attach(observer: BatchObserver): void {
    this.observers.add(observer);
  }
  detach(observer: BatchObserver): void {
    this.observers.delete(observer);
  }
}

function createSource(config: SourceConfig, logger: Logger, onEnd: () => void): FrameSource {
  const sourceLogger = logger.child({ source: config.name });
  switch (config.type) {
    case "directory":
      return new DirectorySource({ name: config.name, path: config.path, fps: config.fps, loop: config.loop, shuffleSeed: config.shuffleSeed, logger: sourceLogger, onEnd });
    case "rpicam":
      return rpicamSource({ name: config.name, width: config.width, height: config.height, fps: config.fps, camera: config.camera, extraArgs: config.extraArgs, binaryPath: config.binaryPath, logger: sourceLogger });
    case "gstreamer":
      return gstreamerSource({ name: config.name, pipeline: config.pipeline ?? { ...config.preset! }, binaryPath: config.binaryPath, logger: sourceLogger });
  }
}

/**
 * The edge agent: starts its subsystems in dependency order (metrics, audit, model, actuators,
 * pipeline, health server, sources) and stops them in reverse.
 */
export class Agent {
  private readonly config: AgentConfig;
  private readonly logger: Logger;
  readonly metrics: AgentMetrics;
  private readonly notifier: Notifier;
  private audit: AuditStore | undefined;
  private runner: ModelRunner | undefined;
  private actuators: Actuator[] = [];
  private pipelineInstance: Pipeline | undefined;
  private health: HealthServer | undefined;
  private sources: FrameSource[] = [];
  private keeper: WatchdogKeeper | undefined;
  private pruneTimer: NodeJS.Timeout | undefined;
  private status: HealthReport["status"] = "starting";
  private endedSources = 0;
  private store: ModelStore | undefined;
  private guard: CrashLoopGuard | undefined;
  private activeId: string | undefined;
  private healthyFrames = 0;
  private trustedKeys: TrustedKey[] = [];
  private outbox: Outbox | undefined;
  miner: HardExampleMiner | undefined;
  fleet: DeviceFleet | undefined;
  updater: ModelUpdater | undefined;
  private readonly tap = new Tap();
  private latestFrame: ScoredFrame | undefined;
  private policy: DecisionPolicy | undefined;
  readonly startedAt = Date.now();

  constructor(private readonly options: AgentOptions) {
    this.config = options.config;
    this.logger = options.logger;
    this.metrics = new AgentMetrics({ logger: this.logger, dataDir: path.dirname(this.config.audit.path) });
    this.notifier = new Notifier({ env: options.env, logger: this.logger });
  }

  get pipeline(): Pipeline | undefined {
    return this.pipelineInstance;
  }

  get healthPort(): number | undefined {
    return this.health?.port;
  }

  get provider(): string | undefined {
    return this.runner?.provider;
  }

  get agentConfig(): AgentConfig {
    return this.config;
  }

  get activeRunner(): ModelRunner | undefined {
    return this.runner;
  }

  /** The most recent classified frame (for the snapshot command). */
  get lastFrame(): ScoredFrame | undefined {
    return this.latestFrame;
  }

  get outboxStore(): Outbox | undefined {
    return this.outbox;
  }

  async start(): Promise<void> {
    const { config, logger } = this;
    logger.info({ device: config.device.id, site: config.device.site }, "agent starting");
    this.metrics.start();
    await mkdir(path.dirname(config.audit.path), { recursive: true });
    this.audit = AuditStore.open(config.audit.path, { synchronous: config.audit.synchronous, logger });
    this.schedulePrune();

    if (config.fleet) {
      this.trustedKeys = await loadTrustedKeys(config.fleet.trustedKeys);
    }
    const stateDir = config.update.stateDir;
    await mkdir(stateDir, { recursive: true });
    this.store = await ModelStore.open(stateDir, { trustedKeys: this.trustedKeys, logger });
    this.guard = await CrashLoopGuard.open(stateDir, { maxStarts: config.update.crashLoop.starts, windowMs: config.update.crashLoop.windowSeconds * 1000, logger });
    const startup = await resolveStartupModel({ store: this.store, guard: this.guard, bundledDefault: config.model.dir, trustedKeys: this.trustedKeys, logger });
    if (startup.fellBack || startup.rolledBackFrom) {
      logger.warn({ model: startup.id, reason: startup.reason, rolledBackFrom: startup.rolledBackFrom }, "starting with a fallback model");
    }
    this.activeId = startup.source === "store" ? startup.id : undefined;

    this.runner = await ModelRunner.load(startup.dir, { providers: config.model.providers, threads: config.model.threads, logger, skipVerify: startup.source === "store" });
    const { manifest } = this.runner;
    this.metrics.setModel({ name: manifest.name, version: manifest.version, sha256: manifest.file.sha256, provider: this.runner.provider });
    await this.runner.warmUp([1, config.pipeline.maxBatch]);
    logger.info({ provider: this.runner.provider, model: manifest.name, modelVersion: manifest.version }, "model warmed up");

    const policy = this.createPolicy(manifest);
    if (config.mining.enabled) {
      this.outbox = Outbox.open(path.join(stateDir, "outbox.db"), { maxBytes: config.mining.outbox.maxBytes, maxItems: config.mining.outbox.maxItems, logger });
      this.miner = this.createMiner(config);
      this.miner.setKnowledge(manifest.file.sha256, await this.knowledgeOf(startup.dir, manifest));
    }
    if (config.fleet) {
      this.fleet = await DeviceFleet.create({
        config: config.fleet,
        device: config.device,
        stateDir,
        trustedKeys: this.trustedKeys,
        outbox: this.outbox,
        onModel: (model) => this.modelReceived(model),
        statusExtras: () => this.statusExtras(),
        logger,
        agentVersion: this.options.agentVersion,
      });
    }
    this.actuators = await createActuators(config.actuators, config.device, logger, this.fleet?.link);
    for (const actuator of this.actuators) {
      await actuator.start();
    }
    this.pipelineInstance = new Pipeline({
      runner: this.runner,
      policy,
      device: config.device,
      ...config.pipeline,
      deadlineMs: config.decisions.deadlineMs,
      audit: this.audit,
      actuators: this.actuators,
      metrics: this.metrics,
      logger,
      onDecision: this.options.onDecision,
      observer: this.observer(),
    });
    this.pipelineInstance.start();
    this.updater = new ModelUpdater({
      store: this.store,
      trustedKeys: this.trustedKeys,
      bundledDefault: config.model.dir,
      tap: this.tap,
      swap: (runner, candidate) => this.swap(runner, candidate),
      activeManifest: () => this.runner!.manifest,
      load: (dir) => ModelRunner.load(dir, { providers: config.model.providers, threads: config.model.threads, logger, skipVerify: true }),
      shadowFrames: config.update.shadowFrames,
      shadowTimeoutMs: config.update.shadowTimeoutSeconds * 1000,
      maxLatencyRatio: config.update.maxLatencyRatio,
      keepVersions: config.update.keepVersions,
      regression: config.update.regression,
      logger,
      onStatus: (status) => {
        logger.info({ state: status.state, version: status.version, reason: status.reason }, "model update");
        this.options.onUpdate?.(status);
        void this.fleet?.publishStatus();
      },
    });
    if (this.fleet) {
      registerCommands(this, this.fleet, { configFile: this.options.configFile, overrides: this.options.overrides ?? {}, logger });
      await this.fleet.start();
    }

    this.health = new HealthServer({ host: config.health.host, port: config.health.port, registry: this.metrics.registry, health: () => this.healthReport(), logger });
    await this.health.start();
    await this.startSources();

    this.status = "ok";
    this.metrics.setReady(true);
    await this.notifier.ready(`deciding with ${manifest.name} ${manifest.version} on ${this.runner.provider}`);
    void this.fleet?.publishStatus();
    this.keeper = new WatchdogKeeper(this.notifier, { isHealthy: () => this.framesFlowing(), env: this.options.env, logger });
    this.keeper.start();
    logger.info({ healthPort: this.health.port, sources: this.sources.map((s) => s.name) }, "agent ready");
  }

  private async startSources(): Promise<void> {
    const pipeline = this.pipelineInstance!;
    const nonLooping = this.config.sources.filter((s) => s.type === "directory" && !s.loop).length;
    for (const sourceConfig of this.config.sources) {
      const onEnd = (): void => {
        this.endedSources++;
        this.logger.info({ source: sourceConfig.name }, "source delivered its last frame");
        if (this.endedSources === nonLooping) {
          this.options.onSourcesEnded?.();
        }
      };
      const raw = createSource(sourceConfig, this.logger, onEnd);
      // A non-looping replay ends on purpose; the watchdog would take that for a stall.
      const replayOnce = sourceConfig.type === "directory" && !sourceConfig.loop;
      const source = replayOnce
        ? raw
        : new CameraWatchdog(raw, {
            stallSeconds: sourceConfig.stallSeconds,
            logger: this.logger,
            onRestart: (event) => this.metrics.cameraRestarted(sourceConfig.name, event.reason),
          });
      await source.start(
        (frame) => pipeline.submit(frame),
        (error) => this.logger.error({ source: sourceConfig.name, err: describeError(error) }, "source failed"),
      );
      this.sources.push(source);
    }
  }

  private createPolicy(manifest: ModelManifest): DecisionPolicy {
    const policy = new DecisionPolicy(this.config.decisions, manifest.labels);
    const unmapped = policy.unmappedLabels();
    if (unmapped.length) {
      this.logger.warn({ labels: unmapped, rejectBin: this.config.decisions.rejectBin }, "model classes without a bin go to the reject bin");
    }
    this.policy = policy;
    return policy;
  }

  private createMiner(config: AgentConfig): HardExampleMiner {
    return new HardExampleMiner({
      selector: selectorOptions(config.mining),
      outbox: this.outbox!,
      device: config.device,
      topK: config.decisions.topK,
      onStored: () => this.fleet?.uplink?.drainNow(),
      logger: this.logger,
    });
  }

  private async knowledgeOf(dir: string, manifest: ModelManifest) {
    try {
      return await loadKnowledge(dir, { labels: manifest.labels });
    } catch (error) {
      this.logger.warn({ err: describeError(error), model: manifest.name, modelVersion: manifest.version }, "class knowledge unusable; mining runs without novelty");
      return undefined;
    }
  }

  /** Returns the pipeline observer that feeds mining, the updater's taps, the snapshot and the healthy mark. */
  private observer(): PipelineObserver {
    return {
      onScored: (entries) => {
        if (entries.length === 0) {
          return;
        }
        this.latestFrame = entries[entries.length - 1];
        this.miner?.onScored(entries);
        if (this.tap.observers.size) {
          const batch: ObservedBatch = {
            pixels: entries.map((e) => e.pixels),
            labels: entries.map((e) => e.record.label ?? ""),
            inferenceMs: entries[0]!.record.latency.inferenceMs,
            errors: entries.filter((e) => e.record.error).length,
            model: entries[0]!.model,
          };
          for (const observer of [...this.tap.observers]) {
            observer.onBatch(batch);
          }
        }
        this.countHealthy(entries.length);
      },
      onInferenceFailed: (frames, model) => {
        for (const observer of [...this.tap.observers]) {
          observer.onBatch({ pixels: [], labels: [], inferenceMs: 0, errors: frames, model });
        }
      },
    };
  }

  private countHealthy(frames: number): void {
    if (!this.activeId || !this.guard) {
      return;
    }
    const before = this.healthyFrames;
    this.healthyFrames += frames;
    if (before < this.config.update.healthyAfterFrames && this.healthyFrames >= this.config.update.healthyAfterFrames) {
      const id = this.activeId;
      this.guard.markHealthy(id).then(
        () => this.logger.info({ model: id, frames: this.healthyFrames }, "model marked healthy"),
        (error) => this.logger.warn({ err: describeError(error) }, "healthy mark not saved"),
      );
    }
  }

  /** Makes the pipeline decide with a new runner; called by the updater after activation or rollback. */
  private async swap(runner: ModelRunner, manifest: ModelManifest): Promise<void> {
    const pipeline = this.pipelineInstance!;
    const policy = this.createPolicy(manifest);
    this.miner?.setKnowledge(manifest.file.sha256, await this.knowledgeOf(runner.pkg.dir, manifest));
    const old = await pipeline.swapModel(runner, policy);
    this.runner = runner;
    if (old !== runner) {
      await old.release().catch((error: unknown) => this.logger.warn({ err: describeError(error) }, "old model session release failed"));
    }
    const pointer = await this.store?.readPointer().catch(() => null);
    this.activeId = pointer?.id;
    this.healthyFrames = 0;
    if (this.activeId) {
      await this.guard?.recordStart(this.activeId);
    }
    this.metrics.setModel({ name: manifest.name, version: manifest.version, sha256: manifest.file.sha256, provider: runner.provider });
    this.logger.info({ model: manifest.name, modelVersion: manifest.version, provider: runner.provider }, "model switched");
  }

  /** Applies live settings: a new decision policy and a new miner with the changed selector options. */
  async applyLiveConfig(config: AgentConfig): Promise<void> {
    if (config.logging.level !== this.config.logging.level) {
      this.logger.level = config.logging.level;
    }
    this.config.decisions = config.decisions;
    this.config.mining = { ...config.mining, outbox: this.config.mining.outbox };
    this.config.logging = config.logging;
    const pipeline = this.pipelineInstance!;
    const runner = this.runner!;
    await pipeline.swapModel(runner, this.createPolicy(runner.manifest));
    if (this.outbox) {
      this.miner = this.config.mining.enabled ? this.createMiner(this.config) : undefined;
      this.miner?.setKnowledge(runner.manifest.file.sha256, await this.knowledgeOf(runner.pkg.dir, runner.manifest));
    }
  }

  private modelReceived(model: ReceivedModel): void {
    if (!model.deploy) {
      return;
    }
    this.updater!.deploy(model.file).catch((error: unknown) => this.logger.error({ err: describeError(error), modelVersion: model.version }, "model deployment failed"));
  }

  /** Fields of the retained status message. */
  statusExtras() {
    const manifest = this.runner?.manifest;
    const stats = this.pipelineInstance?.stats;
    return {
      model: manifest ? { name: manifest.name, version: manifest.version, sha256: manifest.file.sha256 } : undefined,
      stats: {
        provider: this.runner?.provider ?? null,
        decided: stats?.decided ?? 0,
        dropped: stats?.dropped ?? 0,
        errors: stats?.errors ?? 0,
        paused: this.pipelineInstance?.paused ?? false,
        outbox: this.outbox ? this.outbox.size() : null,
        mined: this.miner?.stats.stored ?? 0,
        update: this.updater?.status ? { state: this.updater.status.state, version: this.updater.status.version, reason: this.updater.status.reason ?? null } : null,
        uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000),
      },
    };
  }

  private framesFlowing(): boolean {
    const last = this.pipelineInstance?.stats.lastDecisionAt;
    return last !== undefined && Date.now() - last < this.config.health.stallSeconds * 1000;
  }

  private healthReport(): HealthReport {
    const stats = this.pipelineInstance?.stats;
    const lastDecisionAgeMs = stats?.lastDecisionAt === undefined ? null : Date.now() - stats.lastDecisionAt;
    let status = this.status;
    if (status === "ok" && (!this.framesFlowing() || this.pipelineHasPendingAudit())) {
      status = "degraded";
    }
    return {
      status,
      device: this.config.device.id,
      model: this.runner ? { name: this.runner.manifest.name, version: this.runner.manifest.version, provider: this.runner.provider } : null,
      lastDecisionAgeMs,
      queueDepth: this.pipelineInstance?.depth ?? 0,
      frames: stats ? { received: stats.received, dropped: stats.dropped, decided: stats.decided, errors: stats.errors } : null,
      audit: { failures: stats?.auditFailures ?? 0 },
    };
  }

  private pipelineHasPendingAudit(): boolean {
    return (this.pipelineInstance?.pendingAuditCount ?? 0) > 0;
  }

  private schedulePrune(): void {
    const { maxAgeDays, maxBytes, pruneIntervalSeconds } = this.config.audit;
    const prune = (): void => {
      this.audit
        ?.prune({ maxAgeDays, maxBytes })
        .then((result) => this.logger.debug({ ...result }, "audit pruned"))
        .catch((error) => this.logger.warn({ err: describeError(error) }, "audit pruning failed"));
    };
    prune();
    this.pruneTimer = setInterval(prune, pruneIntervalSeconds * 1000);
    this.pruneTimer.unref();
  }

  /** Stops sources first, decides every frame already accepted, flushes the audit, then closes the rest. */
  async stop(): Promise<void> {
    this.status = "stopping";
    this.metrics.setReady(false);
    this.logger.info("agent stopping");
    // Pings stop first, so that no WATCHDOG=1 reaches systemd after STOPPING=1.
    this.keeper?.stop();
    await this.notifier.stopping();
    if (this.pruneTimer) {
      clearInterval(this.pruneTimer);
    }
    await Promise.all(this.sources.map((source) => source.stop().catch((error) => this.logger.warn({ source: source.name, err: describeError(error) }, "source stop failed"))));
    await this.pipelineInstance?.stop();
    for (const actuator of this.actuators.reverse()) {
      await actuator.stop();
    }
    await this.fleet?.stop().catch((error: unknown) => this.logger.warn({ err: describeError(error) }, "fleet connection close failed"));
    this.outbox?.close();
    await this.health?.stop();
    this.audit?.close();
    await this.runner?.release();
    await this.metrics.stop();
    this.logger.info({ decided: this.pipelineInstance?.stats.decided ?? 0 }, "agent stopped");
  }
}
