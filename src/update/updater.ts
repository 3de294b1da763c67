import { rm } from "node:fs/promises";

import { ModelRunner } from "../inference/runner.js";
import { describeError, ModelLoadError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { unpackBundle } from "../models/bundle.js";
import type { ModelManifest } from "../models/manifest.js";
import { verifyPackage, type TrustedKey } from "../models/signing.js";
import { RegressionMonitor, type ModelFigures, type RegressionVerdict } from "./guard.js";
import type { BatchTap } from "./observe.js";
import { ShadowRun, type ShadowReport } from "./shadow.js";
import { ModelStoreError, packageId, type ModelStore } from "./store.js";

export type UpdateState = "verifying" | "shadowing" | "active" | "rejected" | "rolled-back";

/** Status of an update or rollback, sent as a command reply or event. */
export interface UpdateStatus {
  state: UpdateState;
  /** Manifest version of the package concerned, once known. */
  version: string | null;
  /** Store id of the package concerned, once known. */
  id: string | null;
  reason?: string;
  /** Class name of the error that rejected the package, such as BadSignatureError. */
  error?: string;
  report?: ShadowReport;
  verdict?: RegressionVerdict;
  at: string;
}

export interface RegressionSettings {
  windowFrames: number;
  maxErrorRateIncrease: number;
  maxLatencyFactor: number;
}

export interface ModelUpdaterOptions {
  store: ModelStore;
  trustedKeys: readonly TrustedKey[];
  /** The package that shipped with the software; a rollback with no earlier stored version returns to it. */
  bundledDefault: string;
  /** Source of the pipeline's batches for shadow runs and regression monitors. */
  tap: BatchTap;
  /**
   * Makes the pipeline decide with `runner` from now on. The callee owns the runner afterwards
   * and releases the one it replaced. A rejection leaves the old model deciding.
   */
  swap: (runner: ModelRunner, manifest: ModelManifest) => Promise<void>;
  /** Manifest of the model the pipeline runs now. */
  activeManifest: () => ModelManifest;
  /** Loads a verified package folder. Default: ModelRunner.load on the CPU without a second sha256 check. */
  load?: (dir: string) => Promise<ModelRunner>;
  /** Frames to shadow before the decision, where 0 skips the shadow run. Default 200. */
  shadowFrames?: number;
  /** Time allowed for the shadow run before the package is rejected. Default 10 minutes. */
  shadowTimeoutMs?: number;
  /** Largest allowed ratio of candidate to active p95 latency in the shadow run. Default 1.5. */
  maxLatencyRatio?: number;
  /** Stored versions kept after an activation, active and previous included. Default 3. */
  keepVersions?: number;
  /** Watch of the new model after the switch, with automatic rollback. False turns it off. */
  regression?: RegressionSettings | false;
  logger?: Logger;
  /** Called on every status change. */
  onStatus?: (status: UpdateStatus) => void;
}

/** A package rejected after its shadow run, or by a check of its outputs. */
export class UpdateRejectedError extends SortlineError {
  constructor(
    message: string,
    readonly report?: ShadowReport,
  ) {
    super(message);
  }
}

const DEFAULT_REGRESSION: RegressionSettings = { windowFrames: 500, maxErrorRateIncrease: 0.02, maxLatencyFactor: 2 };

/** Rejects a model whose output does not match its manifest on one blank frame. */
async function checkOutputs(runner: ModelRunner): Promise<void> {
  const { manifest } = runner;
  const [, height, width] = manifest.input.shape;
  const result = await runner.run([Buffer.alloc(height * width * 3, 128)]);
  const probabilities = result.probabilities[0];
  const embedding = result.embeddings[0];
  if (!probabilities || probabilities.length !== manifest.labels.length) {
    throw new ModelLoadError(`model returns ${probabilities?.length ?? 0} scores; the manifest lists ${manifest.labels.length} labels`);
  }
  if (!embedding || embedding.length === 0) {
    throw new ModelLoadError(`model returns no embedding in output '${manifest.outputs.embedding}'`);
  }
  if (![...probabilities, ...embedding].every(Number.isFinite)) {
    throw new ModelLoadError("model returns values that are not finite numbers on a blank frame");
  }
}

/** Returns true when frames prepared for `active` are valid input for `candidate`. */
function samePreprocessing(active: ModelManifest, candidate: ModelManifest): boolean {
  return JSON.stringify(active.preprocess) === JSON.stringify(candidate.preprocess) && JSON.stringify(active.input.shape) === JSON.stringify(candidate.input.shape);
}

/**
 * Deploys received model bundles: unpack, verify signature and hashes, install, load and check
 * outputs, shadow the active model, then activate and swap. A package that fails any step is
 * rejected, and the active model and the store pointer stay as they were. After a switch a
 * RegressionMonitor watches the new model and rolls back when it regresses.
 */
export class ModelUpdater {
  private readonly logger: Logger;
  private deploying = false;
  private lock: Promise<unknown> = Promise.resolve();
  private monitor: RegressionMonitor | undefined;
  private lastStatus: UpdateStatus | undefined;
  /**
   * Settles when the regression watch of the latest switch ends, after its rollback if one
   * followed. A watch that a later deploy or rollback replaces never settles.
   */
  regressionWatch: Promise<RegressionVerdict> | undefined;

  constructor(private readonly options: ModelUpdaterOptions) {
    this.logger = options.logger ?? silentLogger;
  }

  get status(): UpdateStatus | undefined {
    return this.lastStatus;
  }

  private emit(state: UpdateState, fields: Partial<UpdateStatus> & Pick<UpdateStatus, "version" | "id">): UpdateStatus {
    const status: UpdateStatus = { state, ...fields, at: new Date().toISOString() };
    this.lastStatus = status;
    this.options.onStatus?.(status);
    return status;
  }

  private exclusive<T>(task: () => Promise<T>): Promise<T> {
    const result = this.lock.then(task);
    this.lock = result.catch(() => undefined);
    return result;
  }

  private async load(dir: string): Promise<ModelRunner> {
    return this.options.load ? this.options.load(dir) : ModelRunner.load(dir, { skipVerify: true, logger: this.logger });
  }

  /**
   * Deploys one bundle (a buffer or a bundle file) and resolves with the final status, "active"
   * or "rejected". It rejects at once while another deploy is in progress.
   */
  async deploy(bundle: Buffer | string): Promise<UpdateStatus> {
    if (this.deploying) {
      return this.emit("rejected", { version: null, id: null, reason: "another model update is in progress; retry when it has finished", error: "UpdateBusyError" });
    }
    this.deploying = true;
    try {
      return await this.exclusive(() => this.deployLocked(bundle));
    } finally {
      this.deploying = false;
    }
  }

  private async deployLocked(bundle: Buffer | string): Promise<UpdateStatus> {
    const { store } = this.options;
    const scratch = await store.createScratchDir("bundle");
    let version: string | null = null;
    let id: string | null = null;
    let installed = false;
    let runner: ModelRunner | undefined;
    try {
      this.emit("verifying", { version, id });
      await unpackBundle(bundle, scratch);
      const verified = await verifyPackage(scratch, this.options.trustedKeys);
      version = verified.manifest.version;
      id = packageId(verified.manifest, verified.manifestSha256);
      this.emit("verifying", { version, id });

      const pointer = await store.readPointer().catch(() => null);
      if (pointer?.id === id) {
        return this.emit("active", { version, id, reason: "this version is already active" });
      }
      const stored = (await store.list()).some((entry) => entry.id === id);
      await store.install(scratch);
      installed = !stored;

      runner = await this.load(store.versionDir(id));
      await checkOutputs(runner);

      this.emit("shadowing", { version, id });
      const report = await this.shadow(runner);
      this.decide(report);

      await this.switchTo(id, runner);
      const manifest = runner.manifest;
      runner = undefined;
      installed = false;
      const removed = await store.prune(this.options.keepVersions ?? 3);
      this.logger.info({ version: id, removed }, "model update active");
      this.watchRegression(manifest, report);
      return this.emit("active", { version, id, ...(report ? { report } : { reason: "shadow run skipped" }) });
    } catch (error) {
      await runner?.release().catch(() => undefined);
      if (installed && id) {
        await store.remove(id).catch((removeError: unknown) => this.logger.warn({ version: id, err: describeError(removeError) }, "cannot remove a rejected version"));
      }
      const report = error instanceof UpdateRejectedError ? error.report : undefined;
      this.logger.warn({ version: id, err: describeError(error) }, "model update rejected");
      return this.emit("rejected", { version, id, reason: describeError(error), error: (error as Error).name ?? "Error", ...(report ? { report } : {}) });
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
  }

  /** Runs the shadow run, or returns undefined when it is turned off or cannot run on the active model's frames. */
  private async shadow(runner: ModelRunner): Promise<ShadowReport | undefined> {
    const frames = this.options.shadowFrames ?? 200;
    const active = this.options.activeManifest();
    if (frames === 0) {
      return undefined;
    }
    if (!samePreprocessing(active, runner.manifest)) {
      // NOTE: a candidate with other preprocessing goes live without a shadow run; only the regression watch guards it.
      this.logger.warn({ candidate: runner.manifest.version }, "shadow run skipped: the candidate's preprocessing differs from the active model's");
      return undefined;
    }
    const run = new ShadowRun(runner, { frames, activeLabels: active.labels, logger: this.logger });
    const timeoutMs = this.options.shadowTimeoutMs ?? 10 * 60_000;
    const timer = setTimeout(() => run.cancel(), timeoutMs);
    this.options.tap.attach(run);
    try {
      const report = await run.done;
      if (!report.complete) {
        throw new UpdateRejectedError(`shadow run timed out after ${timeoutMs} ms with ${report.frames} of ${frames} frames; send the update again while the line is running`, report);
      }
      return report;
    } finally {
      clearTimeout(timer);
      this.options.tap.detach(run);
    }
  }

  private decide(report: ShadowReport | undefined): void {
    if (!report) {
      return;
    }
    if (report.errors > 0) {
      throw new UpdateRejectedError(`candidate inference failed on ${report.errors} of ${report.frames} shadow frames: ${report.errorMessages.join("; ")}`, report);
    }
    const maxRatio = this.options.maxLatencyRatio ?? 1.5;
    if (report.latency.p95Ratio !== null && report.latency.p95Ratio > maxRatio) {
      throw new UpdateRejectedError(
        `candidate p95 latency ${report.latency.candidate.p95.toFixed(1)} ms is ${report.latency.p95Ratio.toFixed(2)} x the active model's ${report.latency.active.p95.toFixed(1)} ms; the limit is ${maxRatio} x`,
        report,
      );
    }
  }

  /** Activates `id` and swaps the pipeline to `runner`. When the swap fails, the pointer goes back. */
  private async switchTo(id: string, runner: ModelRunner): Promise<void> {
    const { store } = this.options;
    const before = await store.readPointer().catch(() => null);
    await store.activate(id);
    try {
      await this.options.swap(runner, runner.manifest);
    } catch (error) {
      if (before) {
        await store.activate(before.id);
      } else {
        await store.deactivate();
      }
      throw error;
    }
  }

  private watchRegression(manifest: ModelManifest, report: ShadowReport | undefined): void {
    this.stopWatch();
    if (this.options.regression === false) {
      return;
    }
    const settings = this.options.regression ?? DEFAULT_REGRESSION;
    const baseline: ModelFigures = report
      ? { frames: report.frames, errorRate: report.frames ? report.activeErrors / report.frames : 0, p95LatencyMs: report.latency.active.p95 }
      : { frames: 0, errorRate: 0, p95LatencyMs: 0 };
    const monitor = new RegressionMonitor({
      baseline,
      windowFrames: settings.windowFrames,
      maxErrorRateIncrease: settings.maxErrorRateIncrease,
      maxLatencyFactor: settings.maxLatencyFactor,
      model: { name: manifest.name, version: manifest.version, sha256: manifest.file.sha256 },
    });
    this.monitor = monitor;
    this.options.tap.attach(monitor);
    this.regressionWatch = monitor.done.then(async (verdict) => {
      this.options.tap.detach(monitor);
      this.logger.info({ version: manifest.version, rollBack: verdict.rollBack, reason: verdict.reason }, "regression watch finished");
      if (!verdict.rollBack) {
        if (this.monitor === monitor) {
          this.monitor = undefined;
        }
        return verdict;
      }
      // The check runs under the lock, so that a deploy that switched models meanwhile is not rolled back.
      await this.exclusive(async () => {
        if (this.monitor !== monitor) {
          this.logger.info({ version: manifest.version }, "regression rollback skipped: another model is active since");
          return;
        }
        await this.rollbackLocked(`regression after the switch to ${manifest.version}: ${verdict.reason}`, verdict);
      }).catch((error: unknown) => this.logger.error({ err: describeError(error) }, "automatic rollback failed"));
      return verdict;
    });
  }

  private stopWatch(): void {
    if (this.monitor) {
      this.options.tap.detach(this.monitor);
      this.monitor = undefined;
    }
  }

  /**
   * Re-activates the previous verified version (or the bundled default when the store has
   * none), swaps the pipeline to it and resolves with a "rolled-back" status. Throws when the
   * model cannot be loaded or swapped, and the store pointer has changed by then.
   */
  async rollback(reason: string): Promise<UpdateStatus> {
    return this.exclusive(() => this.rollbackLocked(reason));
  }

  private async rollbackLocked(reason: string, verdict?: RegressionVerdict): Promise<UpdateStatus> {
    const { store } = this.options;
    if ((await store.readPointer()) === null) {
      throw new ModelStoreError("the bundled default model is running and no earlier model is stored; there is nothing to roll back to");
    }
    this.stopWatch();
    let dir: string;
    let id: string;
    try {
      id = await store.rollback();
      dir = store.versionDir(id);
    } catch (error) {
      this.logger.warn({ err: describeError(error) }, "no earlier stored version; rolling back to the bundled default model");
      await store.deactivate();
      const resolved = await store.resolveActive({ bundledDefault: this.options.bundledDefault, trustedKeys: this.options.trustedKeys });
      dir = resolved.dir;
      id = resolved.id;
    }
    const runner = await this.load(dir);
    try {
      await this.options.swap(runner, runner.manifest);
    } catch (error) {
      await runner.release().catch(() => undefined);
      throw error;
    }
    this.logger.warn({ version: id, reason }, "model rolled back");
    return this.emit("rolled-back", { version: runner.manifest.version, id, reason, ...(verdict ? { verdict } : {}) });
  }
}
