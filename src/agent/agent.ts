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
import { Pipeline } from "../pipeline/pipeline.js";

export interface AgentOptions {
  config: AgentConfig;
  logger: Logger;
  /** Called after each decision has been audited and sent (demo statistics, tests). */
  onDecision?: (record: DecisionRecord) => void;
  /** Called when every non-looping source has delivered its last frame. */
  onSourcesEnded?: () => void;
  env?: NodeJS.ProcessEnv;
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

  async start(): Promise<void> {
    const { config, logger } = this;
    logger.info({ device: config.device.id, site: config.device.site }, "agent starting");
    this.metrics.start();
    await mkdir(path.dirname(config.audit.path), { recursive: true });
    this.audit = AuditStore.open(config.audit.path, { synchronous: config.audit.synchronous, logger });
    this.schedulePrune();

    this.runner = await ModelRunner.load(config.model.dir, { providers: config.model.providers, threads: config.model.threads, logger });
    const { manifest } = this.runner;
    this.metrics.setModel({ name: manifest.name, version: manifest.version, sha256: manifest.file.sha256, provider: this.runner.provider });
    await this.runner.warmUp([1, config.pipeline.maxBatch]);
    logger.info({ provider: this.runner.provider, model: manifest.name, modelVersion: manifest.version }, "model warmed up");

    const policy = new DecisionPolicy(config.decisions, manifest.labels);
    const unmapped = policy.unmappedLabels();
    if (unmapped.length) {
      logger.warn({ labels: unmapped, rejectBin: config.decisions.rejectBin }, "model classes without a bin go to the reject bin");
    }
    this.actuators = await createActuators(config.actuators, config.device, logger);
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
    });
    this.pipelineInstance.start();

    this.health = new HealthServer({ host: config.health.host, port: config.health.port, registry: this.metrics.registry, health: () => this.healthReport(), logger });
    await this.health.start();
    await this.startSources();

    this.status = "ok";
    this.metrics.setReady(true);
    await this.notifier.ready(`deciding with ${manifest.name} ${manifest.version} on ${this.runner.provider}`);
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
    await this.health?.stop();
    this.audit?.close();
    await this.runner?.release();
    await this.metrics.stop();
    this.logger.info({ decided: this.pipelineInstance?.stats.decided ?? 0 }, "agent stopped");
  }
}
