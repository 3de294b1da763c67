/**
 * Retraining: exports the labelled examples, runs the Spark train job and the release gate as
 * child processes, and signs, stores and publishes a candidate that passed. One run at a time.
 *
 * Files of run N are under `<dataDir>/runs/N/`: `labelled.csv` (the exported examples),
 * `candidate/` (the package the job wrote, kept there when the gate rejects it or a step fails),
 * `train.log` and `gate.log` (the jobs' stderr) and `verdict.json`. A package that passed moves to
 * `<dataDir>/models/<name>-<version>/` after signing.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createPublicKey } from "node:crypto";
import { createWriteStream, existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import path from "node:path";

import type { Database } from "better-sqlite3";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { readModelPackage } from "../models/manifest.js";
import { signPackage, verifyPackage } from "../models/signing.js";
import type { Catalogue } from "./catalogue.js";
import type { SigningKey, TrainerConfig } from "./config.js";
import type { Publisher } from "./publisher.js";

export type RunTrigger = "labels" | "interval" | "manual";
/** running; published: passed the gate and queued for the fleet; rejected: failed the gate; failed: a step failed. */
export type RunStatus = "running" | "published" | "rejected" | "failed";
export type RunStep = "export" | "train" | "gate" | "sign" | "store" | "publish" | "done";

/** Accuracy and duration that the train job printed. */
export interface TrainSummary {
  accuracy: Record<string, number>;
  seconds: number | null;
}

/** One training run. Times are milliseconds since the Unix epoch. */
export interface TrainingRun {
  id: number;
  trigger: RunTrigger;
  status: RunStatus;
  /** The step in progress, or the step that failed; "done" after a successful run. */
  step: RunStep;
  version: string | null;
  startedAt: number;
  finishedAt: number | null;
  /** The catalogue's labelledSinceLastTraining when the run started. */
  labelledAtStart: number;
  /** Labelled examples exported for the run. */
  examples: number | null;
  candidateDir: string | null;
  modelDir: string | null;
  /** Total size of the package files. */
  bytes: number | null;
  train: TrainSummary | null;
  /** The gate's JSON verdict: passed, reasons, baselineAccuracy, candidateAccuracy, newClasses, perClass. */
  verdict: Record<string, unknown> | null;
  baselineAccuracy: number | null;
  candidateAccuracy: number | null;
  error: string | null;
  /** Last stderr lines of the failed job. */
  logTail: string[];
}

export interface RetrainerOptions {
  config: TrainerConfig;
  catalogue: Catalogue;
  publisher: Publisher;
  /** Trainer state database with the `runs` table. */
  db: Database;
  signingKey: SigningKey;
  logger?: Logger;
  /** How often the trigger is checked (default 60000 ms). */
  checkIntervalMs?: number;
  now?: () => number;
  /** Environment of the train and gate jobs (default process.env); see jobEnvironment. */
  env?: NodeJS.ProcessEnv;
}

/**
 * Returns the trainer's environment without the variables its configuration reads secrets from
 * (broker password, review token, signing key) and without systemd's credentials folder. The
 * Spark jobs need none of them.
 */
export function jobEnvironment(config: TrainerConfig, env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const copy = { ...env };
  const refs = [config.broker.password, config.review.token, config.signing.privateKey];
  for (const ref of refs) {
    if (ref && typeof ref === "object" && "env" in ref && typeof ref.env === "string") {
      delete copy[ref.env];
    }
  }
  delete copy.CREDENTIALS_DIRECTORY;
  return copy;
}

/** Result of `retrain`: the started run, or the run in progress when one was running already. */
export interface RetrainResult {
  started: boolean;
  run: TrainingRun;
  /** Settles when the run has finished, with its final record. */
  done: Promise<TrainingRun>;
}

/** A step of a run that failed; the message is recorded on the run. */
class RunStepError extends SortlineError {
  constructor(
    message: string,
    readonly logTail: string[] = [],
  ) {
    super(message);
  }
}

const LOG_TAIL_LINES = 50;
const MAX_STDOUT_BYTES = 1024 * 1024;
const KILL_GRACE_MS = 10_000;
const SHA256_IN_PATH = /([0-9a-f]{64})\.jpg/;

interface RunRow {
  id: number;
  trigger: RunTrigger;
  status: RunStatus;
  step: RunStep;
  version: string | null;
  started_at: number;
  finished_at: number | null;
  labelled_at_start: number;
  examples: number | null;
  candidate_dir: string | null;
  model_dir: string | null;
  bytes: number | null;
  train_json: string | null;
  verdict_json: string | null;
  baseline_accuracy: number | null;
  candidate_accuracy: number | null;
  error: string | null;
  log_tail_json: string | null;
}

function toRun(row: RunRow): TrainingRun {
  return {
    id: row.id,
    trigger: row.trigger,
    status: row.status,
    step: row.step,
    version: row.version,
    startedAt: row.started_at,
    finishedAt: row.finished_at,
    labelledAtStart: row.labelled_at_start,
    examples: row.examples,
    candidateDir: row.candidate_dir,
    modelDir: row.model_dir,
    bytes: row.bytes,
    train: row.train_json === null ? null : (JSON.parse(row.train_json) as TrainSummary),
    verdict: row.verdict_json === null ? null : (JSON.parse(row.verdict_json) as Record<string, unknown>),
    baselineAccuracy: row.baseline_accuracy,
    candidateAccuracy: row.candidate_accuracy,
    error: row.error,
    logTail: row.log_tail_json === null ? [] : (JSON.parse(row.log_tail_json) as string[]),
  };
}

/** Returns the next minor version: 1.2.3 and 1.2.3-rc.1 give 1.3.0. Raises for a version that is not semantic. */
export function nextMinorVersion(version: string): string {
  const match = /^(\d+)\.(\d+)\.(\d+)/.exec(version);
  if (match === null) {
    throw new SortlineError(`version '${version}' of the current model is not a semantic version (MAJOR.MINOR.PATCH)`);
  }
  return `${match[1]}.${Number(match[2]) + 1}.0`;
}

/** Returns the last line of `text` that parses as a JSON object, or undefined. */
function lastJsonLine(text: string): Record<string, unknown> | undefined {
  const lines = text.split("\n").map((line) => line.trim()).filter((line) => line.startsWith("{"));
  for (const line of lines.reverse()) {
    try {
      const value = JSON.parse(line) as unknown;
      if (value !== null && typeof value === "object" && !Array.isArray(value)) {
        return value as Record<string, unknown>;
      }
    } catch {
      // A log line that starts with "{" but is not JSON; try the one before.
    }
  }
  return undefined;
}

async function folderBytes(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir)) {
    total += (await stat(path.join(dir, name))).size;
  }
  return total;
}

interface JobResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  tail: string[];
  timedOut: boolean;
}

export class Retrainer {
  private readonly config: TrainerConfig;
  private readonly db: Database;
  private readonly logger: Logger;
  private readonly now: () => number;
  private readonly startedAt: number;
  private current: { run: TrainingRun; done: Promise<TrainingRun> } | undefined;
  private child: ChildProcess | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopping = false;

  constructor(private readonly options: RetrainerOptions) {
    this.config = options.config;
    this.db = options.db;
    this.logger = (options.logger ?? silentLogger).child({ component: "retrainer" });
    this.now = options.now ?? Date.now;
    this.startedAt = this.now();
  }

  /** Marks runs left "running" by a stopped trainer as failed, checks the trigger now and then periodically. */
  start(): void {
    const stale = this.db
      .prepare("UPDATE runs SET status = 'failed', error = 'the trainer stopped during the run', finished_at = ? WHERE status = 'running'")
      .run(this.now()).changes;
    if (stale > 0) {
      this.logger.warn({ runs: stale }, "runs interrupted by a trainer stop marked as failed");
    }
    this.timer = setInterval(() => this.checkTrigger(), this.options.checkIntervalMs ?? 60_000);
    this.timer.unref();
    this.logger.info({ trigger: this.config.training.trigger }, "retrainer started");
    this.checkTrigger();
  }

  /** Stops the trigger, ends a running job with SIGTERM and waits for the run to finish. */
  async stop(): Promise<void> {
    this.stopping = true;
    clearInterval(this.timer);
    this.child?.kill("SIGTERM");
    await this.current?.done;
  }

  /** The run in progress, if any. */
  get active(): TrainingRun | undefined {
    return this.current?.run;
  }

  /** Returns the newest runs first. */
  runs(limit = 50): TrainingRun[] {
    return (this.db.prepare("SELECT * FROM runs ORDER BY id DESC LIMIT ?").all(limit) as RunRow[]).map(toRun);
  }

  get(id: number): TrainingRun | undefined {
    const row = this.db.prepare("SELECT * FROM runs WHERE id = ?").get(id) as RunRow | undefined;
    return row === undefined ? undefined : toRun(row);
  }

  /**
   * Returns the reason to start a run now, or undefined. Labels: at least minNewLabels labels
   * since the last training, counted from the start of the last run when that run published
   * nothing, so a rejected candidate does not start the same run again at once. Interval: the
   * interval has passed since the last run started (or the service started) and there is at
   * least one new label.
   */
  dueTrigger(): RunTrigger | undefined {
    const { minNewLabels, intervalMinutes } = this.config.training.trigger;
    const labelled = this.options.catalogue.stats().labelledSinceLastTraining;
    const last = this.runs(1)[0];
    const sinceLastRun = last !== undefined && last.status !== "published" ? labelled - last.labelledAtStart : labelled;
    if (sinceLastRun >= minNewLabels) {
      return "labels";
    }
    if (intervalMinutes > 0 && labelled > 0 && this.now() - (last?.startedAt ?? this.startedAt) >= intervalMinutes * 60_000) {
      return "interval";
    }
    return undefined;
  }

  /** Starts a run when the trigger is due and none is running. */
  checkTrigger(): void {
    if (this.current !== undefined || this.stopping) {
      return;
    }
    let trigger: RunTrigger | undefined;
    try {
      trigger = this.dueTrigger();
    } catch (error) {
      this.logger.error({ err: describeError(error) }, "checking the retrain trigger failed");
      return;
    }
    if (trigger !== undefined) {
      this.retrain(trigger);
    }
  }

  /** Starts a run unless one is running; then returns the running one with started false. */
  retrain(trigger: RunTrigger = "manual"): RetrainResult {
    if (this.current !== undefined) {
      return { started: false, run: this.current.run, done: this.current.done };
    }
    if (this.stopping) {
      throw new SortlineError("the retrainer is stopping; no new run starts");
    }
    const labelledAtStart = this.options.catalogue.stats().labelledSinceLastTraining;
    const id = Number(
      this.db
        .prepare("INSERT INTO runs (trigger, status, step, started_at, labelled_at_start) VALUES (?, 'running', 'export', ?, ?)")
        .run(trigger, this.now(), labelledAtStart).lastInsertRowid,
    );
    const run = this.get(id)!;
    this.logger.info({ runId: id, trigger, labelledSinceLastTraining: labelledAtStart }, "training run started");
    const done = this.execute(run).finally(() => {
      this.current = undefined;
    });
    this.current = { run, done };
    return { started: true, run, done };
  }

  private save(run: TrainingRun): void {
    this.db
      .prepare(
        `UPDATE runs SET status = @status, step = @step, version = @version, finished_at = @finishedAt, examples = @examples,
           candidate_dir = @candidateDir, model_dir = @modelDir, bytes = @bytes, train_json = @train, verdict_json = @verdict,
           baseline_accuracy = @baselineAccuracy, candidate_accuracy = @candidateAccuracy, error = @error, log_tail_json = @logTail
         WHERE id = @id`,
      )
      .run({
        id: run.id,
        status: run.status,
        step: run.step,
        version: run.version,
        finishedAt: run.finishedAt,
        examples: run.examples,
        candidateDir: run.candidateDir,
        modelDir: run.modelDir,
        bytes: run.bytes,
        train: run.train === null ? null : JSON.stringify(run.train),
        verdict: run.verdict === null ? null : JSON.stringify(run.verdict),
        baselineAccuracy: run.baselineAccuracy,
        candidateAccuracy: run.candidateAccuracy,
        error: run.error,
        logTail: JSON.stringify(run.logTail),
      });
  }

  private step(run: TrainingRun, step: RunStep): void {
    run.step = step;
    this.save(run);
    this.logger.info({ runId: run.id, step, version: run.version }, "training run step");
  }

  /** Runs every step and records the outcome; never rejects. */
  private async execute(run: TrainingRun): Promise<TrainingRun> {
    try {
      await this.runSteps(run);
    } catch (error) {
      run.status = "failed";
      run.error = describeError(error);
      run.logTail = error instanceof RunStepError ? error.logTail : [];
      run.finishedAt = this.now();
      this.save(run);
      this.logger.error({ runId: run.id, step: run.step, version: run.version, err: run.error, logTail: run.logTail }, "training run failed");
    }
    return run;
  }

  private async runSteps(run: TrainingRun): Promise<void> {
    const { config } = this;
    const baseline = this.options.publisher.current();
    if (baseline === undefined) {
      throw new RunStepError("no current model is recorded; the base model must be registered before training");
    }
    run.version = nextMinorVersion(baseline.version);
    const name = config.training.modelName ?? baseline.name;
    const runDir = path.join(config.dataDir, "runs", String(run.id));
    await mkdir(runDir, { recursive: true });

    this.step(run, "export");
    const csv = path.join(runDir, "labelled.csv");
    const exported = this.options.catalogue.exportTrainingCsv(csv);
    run.examples = exported.rows;
    const shas = (await readFile(csv, "utf8"))
      .split("\n")
      .map((line) => SHA256_IN_PATH.exec(line)?.[1])
      .filter((sha): sha is string => sha !== undefined);

    this.step(run, "train");
    const candidateDir = path.join(runDir, "candidate");
    await rm(candidateDir, { recursive: true, force: true });
    run.candidateDir = candidateDir;
    const trainArgs: string[] = [];
    for (const dataset of config.base.datasets) {
      trainArgs.push("--data", dataset);
    }
    if (exported.rows > 0) {
      trainArgs.push("--data", csv);
    }
    for (const dataset of config.validation) {
      trainArgs.push("--extra-validation", dataset);
    }
    trainArgs.push("--out", candidateDir, "--name", name, "--version", run.version);
    trainArgs.push("--validation-fraction", String(config.base.validationFraction));
    if (config.training.master !== undefined) {
      trainArgs.push("--master", config.training.master);
    }
    if (config.training.featureCache !== undefined) {
      trainArgs.push("--feature-cache", config.training.featureCache);
    }
    const trained = await this.runJob("train", config.training.command, "sortline_spark.train", trainArgs, path.join(runDir, "train.log"));
    if (trained.code !== 0) {
      throw new RunStepError(this.describeExit("train", trained), trained.tail);
    }
    const summary = lastJsonLine(trained.stdout);
    run.train = {
      accuracy: (summary?.accuracy as Record<string, number> | undefined) ?? {},
      seconds: typeof summary?.seconds === "number" ? summary.seconds : null,
    };
    const candidate = await readModelPackage(candidateDir).catch((error: unknown) => {
      throw new RunStepError(`the train job exited with 0 but wrote no valid package to ${candidateDir}: ${describeError(error)}`, trained.tail);
    });
    if (candidate.manifest.version !== run.version) {
      throw new RunStepError(`the train job wrote version ${candidate.manifest.version}, but ${run.version} was requested`, trained.tail);
    }
    const validationCsv = path.join(candidateDir, "validation.csv");
    if (!existsSync(validationCsv)) {
      throw new RunStepError(`the train job wrote no ${validationCsv}, which the gate needs`, trained.tail);
    }
    this.save(run);

    this.step(run, "gate");
    const verdictFile = path.join(runDir, "verdict.json");
    const gateArgs = ["--baseline", baseline.dir, "--candidate", candidateDir, "--validation", validationCsv];
    for (const dataset of config.validation) {
      gateArgs.push("--validation", dataset);
    }
    gateArgs.push("--min-gain", String(config.training.gate.minGain), "--max-class-drop", String(config.training.gate.maxClassDrop), "--out", verdictFile);
    if (config.training.master !== undefined) {
      gateArgs.push("--master", config.training.master);
    }
    const gated = await this.runJob("gate", config.training.gateCommand, "sortline_spark.gate", gateArgs, path.join(runDir, "gate.log"));
    const verdict = lastJsonLine(gated.stdout);
    if (verdict !== undefined) {
      run.verdict = verdict;
      run.baselineAccuracy = typeof verdict.baselineAccuracy === "number" ? verdict.baselineAccuracy : null;
      run.candidateAccuracy = typeof verdict.candidateAccuracy === "number" ? verdict.candidateAccuracy : null;
    }
    if (gated.code === 3 && verdict?.passed === false) {
      run.status = "rejected";
      run.step = "done";
      run.finishedAt = this.now();
      this.save(run);
      this.logger.warn(
        { runId: run.id, version: run.version, reasons: verdict.reasons, baselineAccuracy: run.baselineAccuracy, candidateAccuracy: run.candidateAccuracy, candidateDir },
        "candidate rejected by the gate; nothing published",
      );
      return;
    }
    if (gated.code !== 0 || verdict?.passed !== true) {
      const reason = typeof verdict?.error === "string" ? `: ${verdict.error}` : "";
      throw new RunStepError(`${this.describeExit("gate", gated)}${reason}`, gated.tail);
    }

    this.step(run, "sign");
    await signPackage(candidateDir, this.options.signingKey.privateKeyPem);
    const publicKeyPem = createPublicKey(this.options.signingKey.privateKeyPem).export({ type: "spki", format: "pem" }).toString();
    await verifyPackage(candidateDir, [{ keyId: this.options.signingKey.keyId, publicKeyPem }]);

    this.step(run, "store");
    const modelDir = path.join(config.dataDir, "models", `${name}-${run.version}`);
    if (this.options.publisher.models().some((model) => model.dir === modelDir)) {
      throw new RunStepError(`${modelDir} holds a published model already; remove its record or pick another training.modelName`);
    }
    await mkdir(path.dirname(modelDir), { recursive: true });
    // A folder without a record is left from a run that stopped between the move and publishing.
    await rm(modelDir, { recursive: true, force: true });
    await rename(candidateDir, modelDir);
    run.candidateDir = null;
    run.modelDir = modelDir;
    run.bytes = await folderBytes(modelDir);
    const stillLabelled = shas.filter((sha) => this.options.catalogue.get(sha)?.status === "labelled");
    this.options.catalogue.markTrained(run.version, stillLabelled);

    this.step(run, "publish");
    await this.options.publisher.publish(modelDir, run.id);
    run.status = "published";
    run.step = "done";
    run.finishedAt = this.now();
    this.save(run);
    this.logger.info(
      { runId: run.id, version: run.version, baselineAccuracy: run.baselineAccuracy, candidateAccuracy: run.candidateAccuracy, bytes: run.bytes, modelDir },
      "candidate passed the gate and was published",
    );
  }

  private describeExit(job: string, result: JobResult): string {
    if (result.timedOut) {
      return `the ${job} job ran longer than training.timeoutMinutes (${this.config.training.timeoutMinutes}) and was stopped`;
    }
    if (this.stopping) {
      return `the ${job} job was stopped because the trainer is stopping`;
    }
    const outcome = result.signal !== null ? `was killed by ${result.signal}` : `exited with code ${result.code}`;
    // A Python traceback ends with "SomeError: message", but Spark and py4j log more lines after it.
    const last = [...result.tail].reverse().find((line) => /(Error|Exception)\b/.test(line)) ?? result.tail.at(-1);
    return `the ${job} job ${outcome}${last === undefined ? "" : `; stderr: ${last}`}`;
  }

  /**
   * Runs a job: `command` plus `args`, or the Python module with `args`, in training.sparkDir.
   * Stdout is collected (up to 1 MiB); stderr lines go to `logFile`, to the log at debug level
   * and to the last-lines buffer.
   */
  private async runJob(job: string, command: string[] | undefined, module: string, args: string[], logFile: string): Promise<JobResult> {
    const { sparkDir, python, timeoutMinutes } = this.config.training;
    if (!existsSync(sparkDir)) {
      throw new RunStepError(`training.sparkDir ${sparkDir} not found`);
    }
    const argv = command !== undefined ? [...command, ...args] : [python, "-m", module, ...args];
    const log = createWriteStream(logFile, { flags: "a" });
    this.logger.info({ job, program: argv[0], args: argv.slice(1), cwd: sparkDir }, "starting job");

    return new Promise<JobResult>((resolve, reject) => {
      const env = jobEnvironment(this.config, this.options.env ?? process.env);
      const child = spawn(argv[0]!, argv.slice(1), { cwd: sparkDir, stdio: ["ignore", "pipe", "pipe"], env });
      this.child = child;
      let stdout = "";
      let partial = "";
      const tail: string[] = [];
      let timedOut = false;
      let killTimer: NodeJS.Timeout | undefined;
      const timeout = setTimeout(() => {
        timedOut = true;
        child.kill("SIGTERM");
        killTimer = setTimeout(() => child.kill("SIGKILL"), KILL_GRACE_MS);
      }, timeoutMinutes * 60_000);

      child.stdout!.on("data", (data: Buffer) => {
        if (stdout.length < MAX_STDOUT_BYTES) {
          stdout += data.toString("utf8");
        }
      });
      const addLine = (line: string): void => {
        this.logger.debug({ job, line }, "job output");
        tail.push(line);
        if (tail.length > LOG_TAIL_LINES) {
          tail.shift();
        }
      };
      child.stderr!.on("data", (data: Buffer) => {
        log.write(data);
        const lines = (partial + data.toString("utf8")).split("\n");
        partial = lines.pop()!;
        lines.filter((line) => line.trim() !== "").forEach(addLine);
      });
      child.once("error", (error) => {
        clearTimeout(timeout);
        this.child = undefined;
        log.end();
        reject(new RunStepError(`cannot start the ${job} job '${argv[0]}': ${describeError(error)}; check training.python or training.command`));
      });
      child.once("close", (code, signal) => {
        clearTimeout(timeout);
        clearTimeout(killTimer);
        this.child = undefined;
        if (partial.trim() !== "") {
          addLine(partial);
        }
        log.end();
        this.logger.info({ job, code, signal }, "job finished");
        resolve({ code, signal, stdout, tail, timedOut });
      });
    });
  }
}
