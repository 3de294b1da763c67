/**
 * Shared pieces of the fault-injection cases: agent configurations, an agent in the test process
 * or as a child process, a simulated trainer on the fleet broker, signed model copies, and readers
 * for the audit database, the outbox and /metrics.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { cp, mkdir, mkdtemp, readFile, rename, rm, writeFile, copyFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import Database from "better-sqlite3";
import mqtt, { type MqttClient } from "mqtt";
import { inject } from "vitest";
import { stringify } from "yaml";

import { Agent } from "../../src/agent/agent.js";
import type { DecisionRecord } from "../../src/audit/types.js";
import { loadAgentConfig } from "../../src/config/load.js";
import { createLogger, type Logger } from "../../src/lib/log.js";
import type { Outbox } from "../../src/mining/outbox.js";
import { packBundle } from "../../src/models/bundle.js";
import { signPackage, type SigningKeyPair } from "../../src/models/signing.js";
import { CommandClient } from "../../src/protocol/commands.js";
import { MqttLink } from "../../src/protocol/link.js";
import type { StatusMessage } from "../../src/protocol/messages.js";
import { deviceTopic, fleetPattern } from "../../src/protocol/topics.js";
import { TransferReceiver, TransferSender, type BeginHeader } from "../../src/protocol/transfer.js";
import type { UpdateStatus } from "../../src/update/updater.js";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PHOTOS_DIR = path.join(repoRoot, "demo", "photos");
export const DEFAULT_MODEL_DIR = path.join(repoRoot, "models", "default");
export const SITE = "plant-f";
export const DEVICE = "line-f";
export const DECISION_TOPIC = deviceTopic(SITE, DEVICE, "decision");

/**
 * Frame rate of the replayed photos, from SORTLINE_FAULT_FPS in frames per second.
 * The default of 8 is about the rate at which models/default decided on two shared AMD EPYC
 * cores in these cases. A faster machine can replay faster.
 */
export function replayFps(): number {
  const value = Number(process.env.SORTLINE_FAULT_FPS ?? "8");
  if (!Number.isFinite(value) || value <= 0) {
    throw new RangeError(`SORTLINE_FAULT_FPS=${process.env.SORTLINE_FAULT_FPS} is invalid; expected frames per second > 0`);
  }
  return value;
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `condition` every 50 ms until it returns true, or rejects with `description` after `timeoutMs`. */
export async function waitFor(condition: () => boolean | Promise<boolean>, description: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${description}`);
    }
    await sleep(50);
  }
}

export async function makeWorkDir(prefix: string): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), `sortline-fault-${prefix}-`));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** Formats milliseconds as seconds with one decimal. */
export function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

// ---------------------------------------------------------------------------------------------
// Configuration

export interface ConfigOptions {
  dir: string;
  /** Fleet broker URL; without it the agent has no fleet connection. */
  fleetUrl?: string;
  /** PEM file of the trainer's public key. */
  trustedKey?: string;
  sourceName?: string;
  /** Replaces the directory source. */
  sources?: Record<string, unknown>[];
  actuators?: Record<string, unknown>[];
  mining?: Record<string, unknown>;
  update?: Record<string, unknown>;
  /** Folder of audit.db and, unless update.stateDir sets another folder, of the model store and outbox. */
  dataDir?: string;
}

/** Returns an agent configuration that replays demo/photos at replayFps() with hard-example mining on. */
export function agentConfig(options: ConfigOptions): Record<string, unknown> {
  const dataDir = options.dataDir ?? path.join(options.dir, "state");
  const config: Record<string, unknown> = {
    device: { id: DEVICE, site: SITE },
    model: { dir: DEFAULT_MODEL_DIR, providers: ["cpu"], threads: 0 },
    sources: options.sources ?? [{ type: "directory", name: options.sourceName ?? "replay", path: PHOTOS_DIR, fps: replayFps(), loop: true, shuffleSeed: 3 }],
    pipeline: { maxBatch: 4, maxWaitMs: 20, queueSize: 16 },
    decisions: { bins: { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" } },
    actuators: options.actuators ?? (options.fleetUrl ? [{ type: "fleet" }] : [{ type: "log" }]),
    audit: { path: path.join(dataDir, "audit.db") },
    health: { host: "127.0.0.1", port: 0 },
    logging: { level: "info" },
    // Every frame below 0.999 confidence is a candidate and near-duplicates are allowed, so a
    // replay of 36 photos keeps producing hard examples.
    mining: { lowConfidence: 0.999, perHour: 100000, minDistance: 0, ...options.mining },
    update: { shadowFrames: 8, maxLatencyRatio: 50, regression: false, healthyAfterFrames: 20, ...options.update },
  };
  if (options.fleetUrl) {
    config.fleet = { url: options.fleetUrl, protocolVersion: 5, trustedKeys: options.trustedKey ? [options.trustedKey] : [], statusIntervalSeconds: 1 };
  }
  return config;
}

export async function writeConfig(file: string, config: Record<string, unknown>): Promise<string> {
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, stringify(config));
  return file;
}

// ---------------------------------------------------------------------------------------------
// Agent in the test process

/** One JSON log line of the agent (pino). */
export interface LogLine {
  level: string;
  msg: string;
  [field: string]: unknown;
}

/** Creates an info-level logger that keeps its JSON records in memory. */
export function memoryLogger(level = "info"): { logger: Logger; records: LogLine[] } {
  const records: LogLine[] = [];
  const logger = createLogger({ level, destination: { write: (line: string) => void records.push(JSON.parse(line) as LogLine) } });
  return { logger, records };
}

/** An Agent started in the test process, with its decisions, update states and log lines collected. */
export class InProcessAgent {
  readonly decisions: DecisionRecord[] = [];
  /** Time of each decision, in ms since the epoch, in order. */
  readonly decidedAt: number[] = [];
  readonly updates: UpdateStatus[] = [];
  readonly logs: LogLine[];
  readonly agent: Agent;

  private constructor(configFile: string, config: Awaited<ReturnType<typeof loadAgentConfig>>) {
    const { logger, records } = memoryLogger();
    this.logs = records;
    this.agent = new Agent({
      config,
      logger,
      configFile,
      overrides: {},
      onDecision: (record) => {
        this.decisions.push(record);
        this.decidedAt.push(Date.now());
      },
      onUpdate: (status) => this.updates.push(status),
    });
  }

  static async start(configFile: string): Promise<InProcessAgent> {
    const config = await loadAgentConfig(configFile);
    const running = new InProcessAgent(configFile, config);
    await running.agent.start();
    return running;
  }

  /** Log lines with message `msg`. */
  logsWith(msg: string): LogLine[] {
    return this.logs.filter((line) => line.msg === msg);
  }

  /** Decisions made between `from` and `to` (ms since the epoch). */
  decisionsBetween(from: number, to: number): number {
    return this.decidedAt.filter((at) => at >= from && at <= to).length;
  }

  /** Maximum time without a decision between `from` and `to`, in ms. */
  longestGap(from: number, to: number): number {
    let previous = from;
    let longest = 0;
    for (const at of this.decidedAt) {
      if (at < from) {
        continue;
      }
      if (at > to) {
        break;
      }
      longest = Math.max(longest, at - previous);
      previous = at;
    }
    return Math.max(longest, to - previous);
  }

  async stop(): Promise<void> {
    await this.agent.stop();
  }
}

/** Records what the uplink acknowledged and the largest size the outbox reached. */
export class OutboxProbe {
  /** Outbox ids deleted after the trainer acknowledged them. */
  readonly acked = new Set<number>();
  /** Hex sha256 of each stored example's image, by outbox id. */
  readonly imageSha256 = new Map<number, string>();
  maxItems = 0;
  private sampler: NodeJS.Timeout | undefined;

  constructor(readonly outbox: Outbox) {
    const ack = outbox.ack.bind(outbox);
    const add = outbox.add.bind(outbox);
    // The uplink and the miner call these methods through the object, so the wrappers get every call.
    outbox.ack = (id: number): boolean => {
      const removed = ack(id);
      if (removed) {
        this.acked.add(id);
      }
      return removed;
    };
    outbox.add = (example) => {
      const result = add(example);
      if (result.stored) {
        this.imageSha256.set(result.id, createHash("sha256").update(example.jpeg).digest("hex"));
      }
      this.maxItems = Math.max(this.maxItems, outbox.size().items);
      return result;
    };
    this.sampler = setInterval(() => {
      this.maxItems = Math.max(this.maxItems, outbox.size().items);
    }, 100);
    this.sampler.unref();
  }

  /** Ids of the examples stored in the outbox file now. */
  storedIds(): Set<number> {
    const db = new Database(this.outbox.file, { readonly: true, fileMustExist: true });
    try {
      return new Set((db.prepare("SELECT id FROM examples").all() as { id: number }[]).map((row) => row.id));
    } finally {
      db.close();
    }
  }

  stop(): void {
    clearInterval(this.sampler);
  }
}

// ---------------------------------------------------------------------------------------------
// Simulated trainer

/** Returns the outbox id in an example transfer id `ex-<id>-<createdAt>`. */
export function outboxIdOf(transferId: string): number | undefined {
  const match = /^ex-(\d+)-\d+$/.exec(transferId);
  return match ? Number(match[1]) : undefined;
}

/**
 * The trainer side of the fleet protocol, reduced to what the cases need: it stores uploaded
 * examples in a folder and acknowledges them, sends model bundles and signed commands, and
 * records the device's status messages.
 */
export class SimulatedTrainer {
  /** Stored examples by outbox id. */
  readonly stored = new Map<number, { transferId: string; bytes: number }>();
  readonly statuses: (StatusMessage & { receivedAt: number })[] = [];
  readonly link: MqttLink;
  readonly client: CommandClient;
  readonly sender: TransferSender;
  private receiver: TransferReceiver | undefined;

  private constructor(
    readonly dir: string,
    brokerUrl: string,
    keys: SigningKeyPair,
  ) {
    // A short reconnect period keeps the trainer's own reconnect out of the measured recovery time.
    this.link = new MqttLink({ url: brokerUrl, role: "trainer", protocolVersion: 5, reconnectPeriodMs: 250 });
    this.client = new CommandClient({ link: this.link, signingKey: { keyId: keys.keyId, privateKey: keys.privateKeyPem } });
    this.sender = new TransferSender({ link: this.link });
  }

  static async start(dir: string, brokerUrl: string, keys: SigningKeyPair): Promise<SimulatedTrainer> {
    const trainer = new SimulatedTrainer(dir, brokerUrl, keys);
    await mkdir(path.join(dir, "store"), { recursive: true });
    await trainer.link.connect({ timeoutMs: 10_000 });
    trainer.receiver = new TransferReceiver({
      link: trainer.link,
      dataTopic: fleetPattern("up/data"),
      dir: path.join(dir, "inbox"),
      maxBytes: 8 * 1024 * 1024,
      onComplete: (file, begin) => trainer.storeExample(file, begin),
    });
    await trainer.receiver.start();
    await trainer.link.subscribe(deviceTopic(SITE, DEVICE, "status"), (_topic, payload) => {
      trainer.statuses.push({ ...(JSON.parse(payload.toString("utf8")) as StatusMessage), receivedAt: Date.now() });
    });
    await trainer.client.start();
    return trainer;
  }

  /** Copies an uploaded example into store/ before the receiver acknowledges it; a repeat overwrites the same file. */
  private async storeExample(file: string, begin: BeginHeader): Promise<void> {
    const target = path.join(this.dir, "store", `${begin.transferId}.jpg`);
    await copyFile(file, `${target}.partial`);
    await rename(`${target}.partial`, target);
    const id = outboxIdOf(begin.transferId);
    if (id !== undefined) {
      this.stored.set(id, { transferId: begin.transferId, bytes: begin.size });
    }
  }

  /** Sends a model bundle on the device's download topic. With `deploy` the agent deploys it on arrival. */
  async sendBundle(bundle: Buffer, meta: { name: string; version: string; deploy: boolean }): Promise<void> {
    await this.sender.send({
      dataTopic: deviceTopic(SITE, DEVICE, "down/data"),
      ackTopic: deviceTopic(SITE, DEVICE, "down/ack"),
      transferId: `model-${meta.version}-${Date.now()}`,
      kind: "model",
      name: `${meta.name}-${meta.version}.slpkg`,
      data: bundle,
      meta,
      ackTimeoutMs: 10_000,
    });
  }

  /** Returns the latest status message received at or after `since` (ms since the epoch). */
  statusSince(since: number): (StatusMessage & { receivedAt: number }) | undefined {
    return this.statuses.filter((status) => status.receivedAt >= since).at(-1);
  }

  async close(): Promise<void> {
    await this.receiver?.close();
    await this.sender.close();
    await this.client.close();
    await this.link.close();
  }
}

/**
 * The line's PLC gateway: subscribes to the decision topic with QoS 1 and a persistent session
 * (clean: false), so the broker queues decisions for it while it reconnects.
 */
export class DecisionListener {
  readonly frameIds: string[] = [];

  private constructor(private readonly client: MqttClient) {
    client.on("message", (_topic, payload) => {
      this.frameIds.push((JSON.parse(payload.toString("utf8")) as { frameId: string }).frameId);
    });
  }

  static async start(brokerUrl: string): Promise<DecisionListener> {
    const client = await mqtt.connectAsync(brokerUrl, {
      clientId: `sortline-fault-plc-${process.pid}-${Date.now()}`,
      clean: false,
      protocolVersion: 4,
      reconnectPeriod: 250,
    });
    const listener = new DecisionListener(client);
    await client.subscribeAsync(DECISION_TOPIC, { qos: 1 });
    return listener;
  }

  async stop(): Promise<void> {
    await this.client.endAsync(true);
  }
}

// ---------------------------------------------------------------------------------------------
// Model packages

export interface PackageChange {
  /** Edits the manifest before signing. */
  manifest?: (manifest: Record<string, unknown>) => void;
  /** Skips signing, so the package has no signature file. */
  unsigned?: boolean;
}

/** Copies models/default to `dir/package-<version>` with a new version, signs it and returns the folder. */
export async function signedCopy(dir: string, keys: SigningKeyPair, version: string, change: PackageChange = {}): Promise<string> {
  const target = path.join(dir, `package-${version}`);
  await cp(DEFAULT_MODEL_DIR, target, { recursive: true });
  const manifestFile = path.join(target, "manifest.json");
  const manifest = JSON.parse(await readFile(manifestFile, "utf8")) as Record<string, unknown>;
  manifest.version = version;
  change.manifest?.(manifest);
  await writeFile(manifestFile, `${JSON.stringify(manifest, null, 2)}\n`);
  if (!change.unsigned) {
    await signPackage(target, keys.privateKeyPem);
  }
  return target;
}

export { packBundle };

// ---------------------------------------------------------------------------------------------
// Audit and metrics

/** Reads an audit database through its own read-only connection. */
export function readAudit(file: string): { frameIds: Set<string>; rows: number; integrity: string } {
  const db = new Database(file, { readonly: true, fileMustExist: true });
  try {
    const integrity = db.pragma("integrity_check", { simple: true }) as string;
    const ids = (db.prepare("SELECT frame_id FROM decisions").all() as { frame_id: string }[]).map((row) => row.frame_id);
    return { frameIds: new Set(ids), rows: ids.length, integrity };
  } finally {
    db.close();
  }
}

/** Returns the row count of an audit database. */
export function auditRows(file: string): number {
  const db = new Database(file, { readonly: true, fileMustExist: true });
  try {
    return (db.prepare("SELECT COUNT(*) AS n FROM decisions").get() as { n: number }).n;
  } finally {
    db.close();
  }
}

/** Fetches /metrics from the agent's health server. */
export async function fetchMetrics(port: number): Promise<string> {
  const response = await fetch(`http://127.0.0.1:${port}/metrics`);
  return response.text();
}

/** Sums the samples of metric `name` whose labels contain every pair in `labels`. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$/.exec(line);
    if (!match || match[1] !== name) {
      continue;
    }
    const labelText = match[2] ?? "";
    if (Object.entries(labels).every(([key, value]) => labelText.includes(`${key}="${value}"`))) {
      sum += Number(match[3]);
    }
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Agent and trainer as child processes

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * `sortline agent` or `sortline trainer` as a child process, run from the build that
 * global-setup.ts makes of src/cli. Its JSON log lines on stdout are parsed as they arrive, each
 * with the time it arrived as `receivedAt`.
 */
export class ServiceProcess {
  readonly logs: LogLine[] = [];
  stderr = "";
  status: ExitStatus | undefined;
  readonly exited: Promise<ExitStatus>;
  readonly startedAt = Date.now();

  private constructor(readonly child: ChildProcess) {
    createInterface({ input: child.stdout! }).on("line", (line) => {
      try {
        this.logs.push({ ...(JSON.parse(line) as LogLine), receivedAt: Date.now() });
      } catch {
        this.stderr += `${line}\n`;
      }
    });
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (chunk: string) => {
      this.stderr += chunk;
    });
    this.exited = new Promise((resolve) => {
      child.on("close", (code, signal) => {
        this.status = { code, signal };
        resolve(this.status);
      });
    });
  }

  private static spawn(moduleUrl: string, runName: string, configFile: string): ServiceProcess {
    const child = spawn(process.execPath, [path.join(repoRoot, "test", "faults", "cli-child.mjs"), moduleUrl, runName, "--config", configFile], {
      cwd: repoRoot,
      env: { ...process.env, NOTIFY_SOCKET: "", WATCHDOG_USEC: "" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    return new ServiceProcess(child);
  }

  /** Starts `sortline agent --config FILE`. */
  static agent(configFile: string): ServiceProcess {
    return ServiceProcess.spawn(inject("faultAgentModule"), "runAgent", configFile);
  }

  /** Starts `sortline trainer --config FILE`. */
  static trainer(configFile: string): ServiceProcess {
    return ServiceProcess.spawn(inject("faultTrainerModule"), "runTrainer", configFile);
  }

  get pid(): number {
    return this.child.pid!;
  }

  findLog(msg: string, fields: Record<string, unknown> = {}): LogLine | undefined {
    return this.logs.find((line) => line.msg === msg && Object.entries(fields).every(([key, value]) => line[key] === value));
  }

  /** Resolves with the first log line with message `msg`, or rejects when the process exits first. */
  async waitForLog(msg: string, timeoutMs = 60_000, fields: Record<string, unknown> = {}): Promise<LogLine> {
    await waitFor(() => this.findLog(msg, fields) !== undefined || this.status !== undefined, `log line "${msg}"`, timeoutMs);
    const line = this.findLog(msg, fields);
    if (!line) {
      const fatal = this.logs.find((entry) => entry.level === "fatal" || entry.level === "error");
      throw new Error(`process exited (${JSON.stringify(this.status)}) before logging "${msg}"; ${fatal ? `${fatal.msg}: ${String(fatal.err)}` : `stderr: ${this.stderr.slice(-500)}`}`);
    }
    return line;
  }

  async kill(signal: NodeJS.Signals): Promise<ExitStatus> {
    if (this.status === undefined) {
      this.child.kill(signal);
    }
    return this.exited;
  }
}
