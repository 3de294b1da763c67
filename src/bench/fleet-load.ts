/**
 * Fleet load simulator. One process runs N lightweight devices. Each device has its own MQTT
 * connection with a unique client id, a last will and a retained status. Each uploads hard
 * examples through the real Uplink and TransferSender, with the transfer settings of
 * agent/fleet.ts, to one real TrainerService. The trainer runs in a child process, so its RSS and
 * CPU time are measured apart from the simulator's. Without --broker the simulator starts its own
 * Mosquitto on a free loopback port.
 *
 * Every step starts a fresh broker and trainer, with the catalogue in a new folder and the training
 * trigger off. It runs the load for --seconds, drains the device queues and checks every
 * acknowledged example against the catalogue. Then it closes the devices, every tenth one by
 * dropping its socket so that the broker publishes its last will. Each step prints one JSON
 * summary line on stdout; progress messages go to stderr.
 */
import { fork, spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect as netConnect, createServer, type AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { destination as pinoDestination } from "pino";

import { defaultModelDir, packageRoot } from "../cli/common.js";
import { describeError } from "../lib/errors.js";
import { createLogger } from "../lib/log.js";
import type { OutboxItem } from "../mining/outbox.js";
import { SendTimeoutError, Uplink, type UplinkQueue } from "../mining/uplink.js";
import { readModelPackage } from "../models/manifest.js";
import { generateKeyPair } from "../models/signing.js";
import { MqttLink } from "../protocol/link.js";
import { deviceTopic } from "../protocol/topics.js";
import { TransferError, TransferSender } from "../protocol/transfer.js";
import { parseTrainerConfig } from "../trainer/config.js";
import { TrainerService } from "../trainer/service.js";

const usage = `Usage: node dist/bench/fleet-load.js [--devices LIST] [--rate LIST] [--seconds S] [--broker URL] [options]

Simulates a fleet of devices that upload hard examples to one trainer service through MQTT and
prints one JSON summary line per step on stdout. Each combination of --devices and --rate is one
step, devices outermost.

  --devices LIST          simulated devices, comma-separated for a ramp (default 50)
  --rate LIST             examples per device per minute, comma-separated for a ramp (default 6)
  --seconds S             load time of each step in seconds (default 60)
  --drain-seconds S       longest wait for the device queues to empty after the load (default 30)
  --status-interval S     seconds between retained status messages of each device (default 5)
  --broker URL            broker to use; default: start Mosquitto on a free 127.0.0.1 port
  --mosquitto PATH        Mosquitto binary (default /usr/sbin/mosquitto)
  --mosquitto-conf LINE   extra mosquitto.conf line for the started broker, repeatable
                          (e.g. "max_queued_messages 10000")
  --photos DIR            JPEG photos, searched recursively (default demo/photos)
  --model DIR             base model package of the trainer (default models/default)
  --out DIR               folder for logs and trainer data (default: a new temp folder)
  --connect-concurrency N devices connecting at the same time (default 50)
  --stop-on-break         skip the remaining steps after a step is broken
  --keep-data             keep each step's trainer data folder (logs are always kept)
  --help                  print this text`;

/** Site of every simulated device. */
const SITE = "load";
/** Transfer kind and settings that agent/fleet.ts uses for hard examples. */
const EXAMPLE_KIND = "example";
const ACK_TIMEOUT_MS = 10_000;
const MAX_ATTEMPTS = 3;
const SEND_TIMEOUT_MS = 120_000;
/** Embedding length of the ResNet-50 backbone of the default model. */
const EMBEDDING_LENGTH = 2048;
/** Every this many devices, one closes by dropping its socket, so the broker publishes its last will. */
const ABRUPT_CLOSE_EVERY = 10;
const TRACKER_OFFLINE_WAIT_MS = 15_000;
const CHILD_START_TIMEOUT_MS = 60_000;
const CHILD_REQUEST_TIMEOUT_MS = 60_000;
const EVENT_LOOP_RESOLUTION_MS = 10;
// NOTE: /proc/<pid>/stat counts CPU time in clock ticks. Linux reports them as USER_HZ, which is
// 100 on the common architectures; this file does not query sysconf(_SC_CLK_TCK).
const CLOCK_TICKS_PER_SECOND = 100;

// ---------------------------------------------------------------------------------------------
// Options

interface Options {
  devices: number[];
  rates: number[];
  seconds: number;
  drainSeconds: number;
  statusIntervalSeconds: number;
  broker: string | undefined;
  mosquitto: string;
  mosquittoConf: string[];
  photos: string;
  model: string;
  out: string | undefined;
  connectConcurrency: number;
  stopOnBreak: boolean;
  keepData: boolean;
}

class UsageError extends Error {}

function positiveNumber(name: string, text: string, integer: boolean): number {
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0 || (integer && !Number.isInteger(value))) {
    throw new UsageError(`--${name} ${JSON.stringify(text)} is invalid; expected a ${integer ? "whole " : ""}number > 0`);
  }
  return value;
}

function numberList(name: string, text: string, integer: boolean): number[] {
  return text.split(",").map((part) => positiveNumber(name, part.trim(), integer));
}

function parseOptions(argv: string[]): Options | undefined {
  const { values } = parseArgs({
    args: argv,
    options: {
      devices: { type: "string", default: "50" },
      rate: { type: "string", default: "6" },
      seconds: { type: "string", default: "60" },
      "drain-seconds": { type: "string", default: "30" },
      "status-interval": { type: "string", default: "5" },
      broker: { type: "string" },
      mosquitto: { type: "string", default: "/usr/sbin/mosquitto" },
      "mosquitto-conf": { type: "string", multiple: true, default: [] },
      photos: { type: "string" },
      model: { type: "string" },
      out: { type: "string" },
      "connect-concurrency": { type: "string", default: "50" },
      "stop-on-break": { type: "boolean", default: false },
      "keep-data": { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    return undefined;
  }
  if (values.broker !== undefined && !/^(mqtt|ws):\/\//.test(values.broker)) {
    throw new UsageError(`--broker ${JSON.stringify(values.broker)} is invalid; expected an mqtt:// or ws:// URL`);
  }
  return {
    devices: numberList("devices", values.devices, true),
    rates: numberList("rate", values.rate, false),
    seconds: positiveNumber("seconds", values.seconds, false),
    drainSeconds: positiveNumber("drain-seconds", values["drain-seconds"], false),
    statusIntervalSeconds: positiveNumber("status-interval", values["status-interval"], false),
    broker: values.broker,
    mosquitto: values.mosquitto,
    mosquittoConf: values["mosquitto-conf"],
    photos: path.resolve(values.photos ?? path.join(packageRoot, "demo", "photos")),
    model: path.resolve(values.model ?? defaultModelDir()),
    out: values.out === undefined ? undefined : path.resolve(values.out),
    connectConcurrency: positiveNumber("connect-concurrency", values["connect-concurrency"], true),
    stopOnBreak: values["stop-on-break"],
    keepData: values["keep-data"],
  };
}

// ---------------------------------------------------------------------------------------------
// Processes: /proc samples, the Mosquitto child and the host facts

interface ProcessSample {
  cpuSeconds: number;
  rssBytes: number;
  /** VmHWM: the peak resident set size of the process so far. */
  peakRssBytes: number;
  /** Time the main thread spent waiting for a CPU while runnable, from /proc/<pid>/schedstat; undefined without schedstats. */
  runQueueWaitSeconds: number | undefined;
}

/** Reads CPU time, resident memory and run-queue wait of a Linux process from /proc; undefined once it has exited. */
function sampleProcess(pid: number | "self"): ProcessSample | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name in brackets may contain spaces, so the fields are counted after the last ")".
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(fields[11]) + Number(fields[12]);
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const kilobytes = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? 0);
    return {
      cpuSeconds: ticks / CLOCK_TICKS_PER_SECOND,
      rssBytes: kilobytes("VmRSS") * 1024,
      peakRssBytes: kilobytes("VmHWM") * 1024,
      runQueueWaitSeconds: readRunQueueWait(pid),
    };
  } catch {
    return undefined;
  }
}

/** Reads the second field of /proc/<pid>/schedstat: nanoseconds the thread waited on a run queue. */
function readRunQueueWait(pid: number | "self"): number | undefined {
  try {
    const waitNs = Number(readFileSync(`/proc/${pid}/schedstat`, "utf8").split(" ")[1]);
    return Number.isFinite(waitNs) ? waitNs / 1e9 : undefined;
  } catch {
    return undefined;
  }
}

/** Returns the share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in percent. */
function cpuPressure(): number | undefined {
  try {
    const match = /^some avg10=[\d.]+ avg60=([\d.]+)/m.exec(readFileSync("/proc/pressure/cpu", "utf8"));
    return match ? Number(match[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Returns the soft limit on open files of a process, from /proc/<pid>/limits. */
function openFilesLimit(pid: number | "self"): number | "unlimited" | undefined {
  try {
    const match = /^Max open files\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, "utf8"));
    if (match === null) {
      return undefined;
    }
    return match[1] === "unlimited" ? "unlimited" : Number(match[1]);
  } catch {
    return undefined;
  }
}

function openFileCount(pid: number | "self"): number | undefined {
  try {
    return readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return undefined;
  }
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

function waitForExit(child: ChildProcess, signal: NodeJS.Signals, timeoutMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill(signal);
  });
}

interface Broker {
  url: string;
  /** Undefined for a broker given with --broker. */
  pid: number | undefined;
  logFile: string | undefined;
  stop(): Promise<void>;
}

/**
 * Starts Mosquitto on 127.0.0.1 with anonymous access, no persistence, $SYS topics every second,
 * a log file in `dir` and then `extraLines`. The config sets `user root` because Mosquitto 2.0
 * started as root otherwise switches to the `mosquitto` user, which cannot write `dir`.
 */
async function startMosquitto(binary: string, dir: string, extraLines: readonly string[]): Promise<Broker> {
  const port = await freePort();
  const logFile = path.join(dir, "mosquitto.log");
  const configFile = path.join(dir, "mosquitto.conf");
  const lines = [
    `listener ${port} 127.0.0.1`,
    "allow_anonymous true",
    "persistence false",
    "sys_interval 1",
    "user root",
    `log_dest file ${logFile}`,
    "log_type error",
    "log_type warning",
    "log_type notice",
    "log_type information",
    "log_timestamp true",
    ...extraLines,
  ];
  writeFileSync(configFile, `${lines.join("\n")}\n`);

  const child = spawn(binary, ["-c", configFile], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr?.on("data", (data: Buffer) => {
    stderr += data.toString("utf8");
  });
  const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));

  const deadline = Date.now() + 10_000;
  while (!(await canConnect(port))) {
    const failed = await Promise.race([spawnError, new Promise<undefined>((resolve) => setTimeout(resolve, 50))]);
    if (failed) {
      throw new Error(`starting ${binary} failed: ${failed.message}; install Mosquitto or pass --mosquitto PATH or --broker URL`);
    }
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`mosquitto exited (code ${child.exitCode}, signal ${child.signalCode}) before listening on port ${port}: ${stderr.trim()}`);
    }
    if (Date.now() > deadline) {
      await waitForExit(child, "SIGKILL", 5_000);
      throw new Error(`mosquitto did not listen on port ${port} within 10 s: ${stderr.trim()}`);
    }
  }
  // A simulator that exits on an error still stops its broker; the trainer child exits when its IPC channel closes.
  const killOnExit = (): void => {
    child.kill("SIGKILL");
  };
  process.once("exit", killOnExit);
  const stop = async (): Promise<void> => {
    await waitForExit(child, "SIGTERM", 10_000);
    process.off("exit", killOnExit);
  };
  return { url: `mqtt://127.0.0.1:${port}`, pid: child.pid, logFile, stop };
}

interface MachineInfo {
  nproc: number;
  cpuModel: string;
  memoryGiB: number;
  node: string;
  openFilesLimit: number | "unlimited" | undefined;
  loadAverage: number[];
  cpuPressureAvg60: number | undefined;
}

function machineInfo(): MachineInfo {
  return {
    nproc: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model.trim() ?? "unknown",
    memoryGiB: Number((os.totalmem() / 2 ** 30).toFixed(1)),
    node: process.version,
    openFilesLimit: openFilesLimit("self"),
    loadAverage: os.loadavg().map((value) => Number(value.toFixed(2))),
    cpuPressureAvg60: cpuPressure(),
  };
}

// ---------------------------------------------------------------------------------------------
// Trainer child process

/** The trainer's view at the end of the load, sent by the child. */
interface TrainerReport {
  /** Rows in the catalogue. */
  catalogued: number;
  /** Adds beyond the first of the same bytes (catalogue `seen` minus rows). */
  duplicateAdds: number;
  /** Acknowledged examples found in the catalogue. */
  ackedFound: number;
  /** Up to five sha256 of acknowledged examples missing from the catalogue. */
  ackedMissing: string[];
  /** Length of the stored embedding of the first acknowledged example; undefined when none was acknowledged. */
  embeddingLength: number | undefined;
  /** Status messages the device tracker accepted. */
  statusEvents: number;
  trackerDevices: number;
  rssBytes: number;
  /** Event loop delay since the last reset, in milliseconds. */
  eventLoopDelayMs: { p50: number; p99: number; max: number };
}

interface TrackerCounts {
  online: number;
  offline: number;
  devices: number;
}

type ParentMessage = { type: "reset" } | { type: "report"; acked: string[] } | { type: "tracker" } | { type: "stop" };
type ChildMessage =
  | { type: "ready" }
  | { type: "reset" }
  | { type: "report"; report: TrainerReport }
  | { type: "tracker"; tracker: TrackerCounts }
  | { type: "stopped" }
  | { type: "error"; message: string };

/** Runs in the forked child: starts the trainer service and replies to the parent's requests. */
async function runTrainerChild(configFile: string, logFile: string): Promise<void> {
  const destination = pinoDestination({ dest: logFile, sync: false, mkdir: true });
  const logger = createLogger({ level: "info", destination, base: { service: "trainer" } });
  const send = (message: ChildMessage): void => {
    process.send?.(message);
  };
  const document: unknown = JSON.parse(readFileSync(configFile, "utf8"));
  const config = parseTrainerConfig(document, configFile, path.dirname(configFile));
  const service = new TrainerService({ config, logger });
  const delay = monitorEventLoopDelay({ resolution: EVENT_LOOP_RESOLUTION_MS });
  delay.enable();
  // The histogram records whole timer intervals in nanoseconds (an idle loop reads about the
  // resolution), so the resolution is subtracted to leave the delay.
  const delayMs = (nanoseconds: number): number => Math.max(0, Number((nanoseconds / 1e6 - EVENT_LOOP_RESOLUTION_MS).toFixed(1)));
  let statusEvents = 0;
  let stopping: Promise<void> | undefined;

  const stop = (): Promise<void> => {
    stopping ??= service.stop().finally(() => destination.flushSync());
    return stopping;
  };
  process.on("disconnect", () => {
    void stop().finally(() => process.exit(0));
  });

  await service.start();
  service.tracker.on("status", () => {
    statusEvents++;
  });

  const report = (acked: string[]): TrainerReport => {
    const catalogue = service.catalogue;
    const stats = catalogue.stats();
    const seen = stats.devices.reduce((sum, device) => sum + device.seen, 0);
    const missing = acked.filter((sha256) => catalogue.get(sha256) === undefined);
    const first = acked[0];
    const tracker = service.tracker.list();
    return {
      catalogued: stats.total,
      duplicateAdds: seen - stats.total,
      ackedFound: acked.length - missing.length,
      ackedMissing: missing.slice(0, 5),
      embeddingLength: first === undefined || missing.includes(first) ? undefined : (catalogue.embedding(first)?.length ?? 0),
      statusEvents,
      trackerDevices: tracker.length,
      rssBytes: process.memoryUsage.rss(),
      eventLoopDelayMs: { p50: delayMs(delay.percentile(50)), p99: delayMs(delay.percentile(99)), max: delayMs(delay.max) },
    };
  };

  process.on("message", (message: ParentMessage) => {
    try {
      if (message.type === "reset") {
        delay.reset();
        send({ type: "reset" });
      } else if (message.type === "report") {
        send({ type: "report", report: report(message.acked) });
      } else if (message.type === "tracker") {
        const devices = service.tracker.list();
        send({
          type: "tracker",
          tracker: { devices: devices.length, online: devices.filter((d) => d.state === "online").length, offline: devices.filter((d) => d.state === "offline").length },
        });
      } else if (message.type === "stop") {
        void stop().then(() => send({ type: "stopped" }));
      }
    } catch (error) {
      send({ type: "error", message: describeError(error) });
    }
  });
  send({ type: "ready" });
}

/** The parent's handle on the trainer child. */
class TrainerProcess {
  private stderr = "";

  private constructor(private readonly child: ChildProcess) {
    child.stderr?.on("data", (data: Buffer) => {
      this.stderr = (this.stderr + data.toString("utf8")).slice(-4_000);
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Forks this module as the trainer child and resolves once the service has started. */
  static async start(configFile: string, logFile: string): Promise<TrainerProcess> {
    const child = fork(fileURLToPath(import.meta.url), ["--trainer-child", configFile, logFile], { stdio: ["ignore", "ignore", "pipe", "ipc"] });
    const trainer = new TrainerProcess(child);
    try {
      await trainer.waitFor("ready", CHILD_START_TIMEOUT_MS);
    } catch (error) {
      child.kill("SIGKILL");
      throw error;
    }
    return trainer;
  }

  /** Waits for the next message of one type; rejects on an error message, exit or timeout. */
  private waitFor<T extends ChildMessage["type"]>(type: T, timeoutMs: number): Promise<Extract<ChildMessage, { type: T }>> {
    return new Promise((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.child.off("message", onMessage);
        this.child.off("exit", onExit);
      };
      const onMessage = (message: ChildMessage): void => {
        if (message.type === type) {
          cleanup();
          resolve(message as Extract<ChildMessage, { type: T }>);
        } else if (message.type === "error") {
          cleanup();
          reject(new Error(`trainer child failed: ${message.message}`));
        }
      };
      const onExit = (code: number | null, signal: NodeJS.Signals | null): void => {
        cleanup();
        reject(new Error(`trainer child exited (code ${code}, signal ${signal}) while waiting for "${type}": ${this.stderr.trim()}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`trainer child sent no "${type}" within ${timeoutMs} ms: ${this.stderr.trim()}`));
      }, timeoutMs);
      this.child.on("message", onMessage);
      this.child.once("exit", onExit);
    });
  }

  private async request<T extends ChildMessage["type"]>(message: ParentMessage, reply: T): Promise<Extract<ChildMessage, { type: T }>> {
    const response = this.waitFor(reply, CHILD_REQUEST_TIMEOUT_MS);
    this.child.send(message);
    return response;
  }

  async resetEventLoopDelay(): Promise<void> {
    await this.request({ type: "reset" }, "reset");
  }

  async report(acked: string[]): Promise<TrainerReport> {
    return (await this.request({ type: "report", acked }, "report")).report;
  }

  async tracker(): Promise<TrackerCounts> {
    return (await this.request({ type: "tracker" }, "tracker")).tracker;
  }

  /** Stops the service and waits for the child to exit; kills it when it takes longer than 30 s. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return;
    }
    await this.request({ type: "stop" }, "stopped").catch(() => undefined);
    if (this.child.connected) {
      this.child.disconnect();
    }
    await waitForExit(this.child, "SIGTERM", 30_000);
  }
}

/** Writes the trainer configuration of one step: stand-in training commands that are never triggered. */
function writeTrainerConfig(dir: string, brokerUrl: string, options: Options): string {
  const keys = generateKeyPair();
  const keyFile = path.join(dir, "signing.key");
  writeFileSync(keyFile, keys.privateKeyPem, { mode: 0o600 });
  const document = {
    broker: { url: brokerUrl, protocolVersion: 5, clientId: `fleet-load-trainer-${randomBytes(4).toString("hex")}` },
    dataDir: "data",
    review: { host: "127.0.0.1", port: 0 },
    signing: { privateKey: keyFile },
    base: { datasets: [options.photos], model: options.model },
    training: {
      // Nothing is labelled during the load, so this trigger never fires; the commands only make the config complete.
      trigger: { minNewLabels: 1_000_000, intervalMinutes: 0 },
      command: [process.execPath, "-e", "process.exit(1)"],
      gateCommand: [process.execPath, "-e", "process.exit(1)"],
    },
    // An empty group: the publisher never sends the base model to the simulated devices.
    fleet: { groups: { none: [] }, publishTo: "none" },
    logging: { level: "info" },
  };
  const file = path.join(dir, "trainer.json");
  writeFileSync(file, JSON.stringify(document, null, 2));
  return file;
}

// ---------------------------------------------------------------------------------------------
// Simulated devices

/** Facts every device of a step shares. */
interface ExampleSource {
  photos: Buffer[];
  model: { name: string; version: string; sha256: string };
  labels: string[];
}

interface QueuedExample extends OutboxItem {
  /** sha256 of the JPEG bytes as sent, the catalogue's key. */
  sha256: string;
}

/** Counters and latencies of one step, shared by all devices. */
class StepStats {
  generated = 0;
  acked = 0;
  attemptsStarted = 0;
  attemptsFailed = 0;
  readonly failuresByKind = new Map<string, number>();
  readonly attemptLatencyMs: number[] = [];
  readonly endToEndLatencyMs: number[] = [];
  readonly ackedSha256: string[] = [];
  statusSent = 0;
  statusPublishFailed = 0;

  recordFailure(error: unknown): void {
    this.attemptsFailed++;
    const kind = classifyFailure(error);
    this.failuresByKind.set(kind, (this.failuresByKind.get(kind) ?? 0) + 1);
  }
}

/** Groups a failed send by cause, without ids or numbers, so that counts add up by kind. */
function classifyFailure(error: unknown): string {
  if (error instanceof SendTimeoutError) {
    return "send timed out";
  }
  if (error instanceof TransferError) {
    if (error.receiverError !== undefined) {
      return `rejected: ${error.receiverError.replace(/\d+/g, "#").slice(0, 100)}`;
    }
    if (error.message.includes("made no progress")) {
      return "no acknowledgement (timed out)";
    }
    if (error.message.includes("sender was closed") || error.message.includes("sender is closed")) {
      return "cancelled at the end of the step";
    }
  }
  return `other: ${describeError(error).replace(/\d+/g, "#").slice(0, 100)}`;
}

/** Returns a copy of a JPEG with a comment segment after the SOI marker, so each example has its own bytes. */
function withComment(jpeg: Buffer, comment: string): Buffer {
  const text = Buffer.from(comment, "latin1");
  const segment = Buffer.alloc(4 + text.length);
  segment.writeUInt16BE(0xfffe, 0);
  segment.writeUInt16BE(2 + text.length, 2);
  text.copy(segment, 4);
  return Buffer.concat([jpeg.subarray(0, 2), segment, jpeg.subarray(2)]);
}

/** Exponentially distributed delay, so each device's examples form a Poisson process. */
function poissonDelayMs(ratePerMinute: number): number {
  return (-Math.log(1 - Math.random()) * 60_000) / ratePerMinute;
}

/**
 * One simulated device: an agent MqttLink, a TransferSender and an Uplink that drains an
 * in-memory queue in place of the device's SQLite outbox. The queue returns the oldest item first.
 */
class SimulatedDevice implements UplinkQueue {
  readonly name: string;
  readonly link: MqttLink;
  private readonly sender: TransferSender;
  private readonly uplink: Uplink;
  private readonly queue: QueuedExample[] = [];
  private readonly statusTopic: string;
  private nextId = 1;
  private generateTimer: NodeJS.Timeout | undefined;
  private statusTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly index: number,
    runId: string,
    brokerUrl: string,
    private readonly source: ExampleSource,
    private readonly stats: StepStats,
  ) {
    this.name = `dev-${String(index).padStart(4, "0")}`;
    this.statusTopic = deviceTopic(SITE, this.name, "status");
    this.link = new MqttLink({
      url: brokerUrl,
      role: "agent",
      site: SITE,
      device: this.name,
      clientId: `fleet-load-${runId}-${this.name}`,
      statusProvider: () => ({ agentVersion: "fleet-load", model: source.model, stats: { queued: this.queue.length } }),
    });
    this.sender = new TransferSender({ link: this.link });
    this.uplink = new Uplink({
      outbox: this,
      send: (item) => this.send(item as QueuedExample),
      sendTimeoutMs: SEND_TIMEOUT_MS,
      metrics: { sent: () => undefined, failed: (_item, error) => stats.recordFailure(error) },
    });
  }

  get backlog(): number {
    return this.queue.length;
  }

  async connect(timeoutMs: number): Promise<void> {
    // connect() creates the mqtt.js client at once, so the status published on CONNACK is counted too.
    const connecting = this.link.connect({ timeoutMs });
    this.link.mqttClient?.on("packetsend", (packet) => {
      if (packet.cmd === "publish" && packet.topic === this.statusTopic && !packet.dup) {
        this.stats.statusSent++;
      }
    });
    await connecting;
  }

  /** Starts generating examples at `ratePerMinute` and publishing the status every interval, each from a random phase. */
  startLoad(ratePerMinute: number, statusIntervalMs: number): void {
    const generate = (): void => {
      this.enqueue();
      this.generateTimer = setTimeout(generate, poissonDelayMs(ratePerMinute));
    };
    this.generateTimer = setTimeout(generate, poissonDelayMs(ratePerMinute));
    this.statusTimer = setTimeout(() => {
      const publish = (): void => {
        this.link.publishStatus().catch(() => {
          this.stats.statusPublishFailed++;
        });
      };
      publish();
      this.statusTimer = setInterval(publish, statusIntervalMs);
    }, Math.random() * statusIntervalMs);
    this.uplink.start();
  }

  /** Stops generating examples and publishing statuses; the uplink keeps draining the queue. */
  stopLoad(): void {
    clearTimeout(this.generateTimer);
    clearTimeout(this.statusTimer);
    clearInterval(this.statusTimer);
  }

  /** Ends the uplink: running transfers are cancelled and counted as such. */
  async stopUploads(): Promise<void> {
    const stopped = this.uplink.stop();
    await this.sender.close();
    await stopped;
  }

  /** Closes the link cleanly (retained "offline" status), or abruptly so that the broker publishes the last will. */
  async close(abrupt: boolean): Promise<void> {
    if (abrupt) {
      this.link.mqttClient?.end(true);
    }
    await this.link.close();
  }

  next(exclude: Iterable<number>): OutboxItem | undefined {
    const skip = new Set(exclude);
    return this.queue.find((item) => !skip.has(item.id));
  }

  ack(id: number): boolean {
    const position = this.queue.findIndex((item) => item.id === id);
    if (position < 0) {
      return false;
    }
    const [item] = this.queue.splice(position, 1);
    this.stats.acked++;
    this.stats.ackedSha256.push(item!.sha256);
    this.stats.endToEndLatencyMs.push(Date.now() - item!.createdAt);
    return true;
  }

  private enqueue(): void {
    const id = this.nextId++;
    const createdAt = Date.now();
    const photo = this.source.photos[(this.index + id) % this.source.photos.length]!;
    const jpeg = withComment(photo, `sortline fleet-load ${this.name} example ${id} ${randomBytes(8).toString("hex")}`);
    const embedding = new Float32Array(EMBEDDING_LENGTH);
    for (let i = 0; i < embedding.length; i++) {
      embedding[i] = Math.random();
    }

    const labels = this.source.labels;
    const first = labels[id % labels.length]!;
    const second = labels[(id + 1) % labels.length]!;

    this.queue.push({
      id,
      createdAt,
      priority: Math.random(),
      bytes: jpeg.length + embedding.byteLength,
      jpeg,
      embedding,
      sha256: createHash("sha256").update(jpeg).digest("hex"),
      meta: {
        frameId: `${this.name}-${id}`,
        capturedAt: createdAt,
        model: this.source.model,
        top: [
          { label: first, p: 0.46 },
          { label: second, p: 0.41 },
        ],
        reasons: ["small-margin"],
        novelty: 0.2,
        margin: 0.05,
        site: SITE,
        device: this.name,
      },
    });
    this.stats.generated++;
    this.uplink.drainNow();
  }

  /** Sends one example as agent/fleet.ts does and records the attempt's latency. */
  private async send(item: QueuedExample): Promise<void> {
    this.stats.attemptsStarted++;
    const started = performance.now();
    const meta = { ...item.meta, priority: item.priority, embedding: Buffer.from(item.embedding.buffer, item.embedding.byteOffset, item.embedding.byteLength).toString("base64") };
    await this.sender.send({
      dataTopic: deviceTopic(SITE, this.name, "up/data"),
      ackTopic: deviceTopic(SITE, this.name, "up/ack"),
      transferId: `ex-${item.id}-${item.createdAt}`,
      kind: EXAMPLE_KIND,
      name: `example-${item.id}.jpg`,
      data: item.jpeg,
      meta,
      ackTimeoutMs: ACK_TIMEOUT_MS,
      maxAttempts: MAX_ATTEMPTS,
    });
    this.stats.attemptLatencyMs.push(performance.now() - started);
  }
}

/** Runs `work` on every item with at most `limit` running at once. */
async function forEachLimited<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const runners = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const item = items[next++]!;
      await work(item);
    }
  });
  await Promise.all(runners);
}

// ---------------------------------------------------------------------------------------------
// Broker monitor and log summaries

/** Follows `$SYS/broker/clients/connected`, which Mosquitto publishes every sys_interval. */
class BrokerMonitor {
  connected: number | undefined;
  maxConnected: number | undefined;
  private readonly link: MqttLink;

  constructor(url: string) {
    this.link = new MqttLink({ url, role: "trainer", clientId: `fleet-load-monitor-${randomBytes(4).toString("hex")}` });
  }

  async start(): Promise<void> {
    await this.link.connect({ timeoutMs: 10_000 });
    await this.link.subscribe(
      "$SYS/broker/clients/connected",
      (_topic, payload) => {
        const value = Number(payload.toString("utf8"));
        if (Number.isFinite(value)) {
          this.connected = value;
          this.maxConnected = Math.max(this.maxConnected ?? 0, value);
        }
      },
      { qos: 0 },
    );
  }

  async stop(): Promise<void> {
    await this.link.close();
  }
}

interface LogSummary {
  lines: number;
  warnings: number;
  errors: number;
  /** The most frequent warning and error messages with their counts, ids and numbers replaced by "#". */
  top: { message: string; count: number }[];
}

function topMessages(counts: Map<string, number>, limit: number): { message: string; count: number }[] {
  return [...counts.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, limit)
    .map(([message, count]) => ({ message, count }));
}

/** Counts the trainer's pino JSON log lines at warn level and above, grouped by message and error. */
function summariseTrainerLog(file: string): LogSummary {
  const text = existsSync(file) ? readFileSync(file, "utf8") : "";
  const counts = new Map<string, number>();
  let lines = 0;
  let warnings = 0;
  let errors = 0;
  for (const line of text.split("\n")) {
    if (line.trim() === "") {
      continue;
    }
    lines++;
    let entry: { level?: string; msg?: string; err?: unknown };
    try {
      entry = JSON.parse(line) as typeof entry;
    } catch {
      continue;
    }
    if (entry.level !== "warn" && entry.level !== "error" && entry.level !== "fatal") {
      continue;
    }
    if (entry.level === "warn") {
      warnings++;
    } else {
      errors++;
    }
    const detail = typeof entry.err === "string" ? `: ${entry.err}` : "";
    const key = `${entry.level} ${entry.msg ?? ""}${detail}`.replace(/\d+/g, "#").slice(0, 160);
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return { lines, warnings, errors, top: topMessages(counts, 6) };
}

/** Counts Mosquitto log lines, grouped with timestamps, client ids, addresses and numbers replaced. */
function summariseBrokerLog(file: string | undefined): LogSummary | undefined {
  if (file === undefined) {
    return undefined;
  }
  const text = existsSync(file) ? readFileSync(file, "utf8") : "";
  const counts = new Map<string, number>();
  let lines = 0;
  let warnings = 0;
  let errors = 0;
  for (const line of text.split("\n")) {
    if (line.trim() === "") {
      continue;
    }
    lines++;
    const message = line.replace(/^\d+: /, "");
    if (/warning/i.test(message)) {
      warnings++;
    }
    if (/error/i.test(message)) {
      errors++;
    }
    // Start, stop, connects and clean disconnects are expected and are left out of the top list.
    if (/^(New connection from|New client connected from|Client \S+ disconnected\.$|Client \S+ closed its connection\.$|mosquitto version|Config loaded|Opening ipv)/.test(message)) {
      continue;
    }
    const key = message
      .replace(/fleet-load-\S+/g, "<client>")
      .replace(/\d+/g, "#")
      .slice(0, 160);
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return { lines, warnings, errors, top: topMessages(counts, 6) };
}

// ---------------------------------------------------------------------------------------------
// One step

interface Percentiles {
  p50: number;
  p95: number;
  p99: number;
  max: number;
}

/** Nearest-rank percentiles in whole milliseconds; zeros for an empty list. */
function percentiles(values: number[]): Percentiles {
  if (values.length === 0) {
    return { p50: 0, p95: 0, p99: 0, max: 0 };
  }
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q: number): number => Math.round(sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]!);
  return { p50: at(0.5), p95: at(0.95), p99: at(0.99), max: Math.round(sorted[sorted.length - 1]!) };
}

const megabytes = (bytes: number | undefined): number | undefined => (bytes === undefined ? undefined : Number((bytes / 2 ** 20).toFixed(1)));
const round = (value: number, digits = 2): number => Number(value.toFixed(digits));

export interface StepSummary {
  step: number;
  devices: number;
  ratePerDeviceMinute: number;
  offeredPerSecond: number;
  seconds: number;
  statusIntervalSeconds: number;
  connect: { ok: number; failed: number; seconds: number; firstError?: string };
  examples: {
    generated: number;
    acked: number;
    /** Catalogue rows after the step. */
    stored: number;
    /** Acknowledged examples missing from the catalogue. */
    lost: number;
    /** Up to five sha256 of the lost examples. */
    missingSample?: string[];
    /** Catalogue rows whose acknowledgement the device did not receive before the step ended. */
    storedWithoutAck: number;
    duplicateAdds: number;
    /** Examples still queued on the devices after the drain. */
    backlog: number;
    embeddingLength: number | undefined;
    ackedPerSecond: number;
  };
  attempts: { started: number; failed: number; failuresByKind: Record<string, number> };
  /** Upload latency: attempt is send to "complete" acknowledgement; endToEnd is queued to acknowledged, retries included. */
  latencyMs: { attempt: Percentiles; endToEnd: Percentiles };
  drainSeconds: number;
  status: { sent: number; publishFailed: number; seenByTracker: number; trackerDevices: number; offlineAfterClose: number; lastWills: number };
  trainer: ProcessUsage & {
    endRssMB: number | undefined;
    /** Trainer CPU milliseconds per acknowledged example, statuses and rejected attempts included. */
    cpuMsPerAck: number | undefined;
    eventLoopDelayMs: TrainerReport["eventLoopDelayMs"];
  };
  broker: ProcessUsage & {
    url: string;
    /** The --mosquitto-conf lines of a started broker. */
    extraConfig: string[];
    /** Peak of $SYS/broker/clients/connected: the devices, the trainer and the monitor. */
    connectionsMax: number | undefined;
    openFilesLimit: number | "unlimited" | undefined;
  };
  simulator: ProcessUsage & { openFilesLimit: number | "unlimited" | undefined };
  /** Load average and CPU pressure of the host when the step started and ended. */
  host: { start: ReturnType<typeof hostLoad>; end: ReturnType<typeof hostLoad> };
  logs: { trainer: LogSummary; broker: LogSummary | undefined; dir: string };
  verdict: "ok" | "degraded" | "broken";
  reasons: string[];
}

interface StepContext {
  step: number;
  devices: number;
  rate: number;
  options: Options;
  source: ExampleSource;
  dir: string;
}

function log(message: string): void {
  process.stderr.write(`fleet-load: ${message}\n`);
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

interface ConnectResult {
  devices: SimulatedDevice[];
  failed: number;
  firstError: string | undefined;
  seconds: number;
}

/** Connects the devices, `concurrency` at a time; a device that fails within 30 s is closed and counted. */
async function connectDevices(candidates: SimulatedDevice[], concurrency: number): Promise<ConnectResult> {
  const result: ConnectResult = { devices: [], failed: 0, firstError: undefined, seconds: 0 };
  const started = performance.now();
  await forEachLimited(candidates, concurrency, async (device) => {
    try {
      await device.connect(30_000);
      result.devices.push(device);
    } catch (error) {
      result.failed++;
      result.firstError ??= describeError(error);
      await device.link.close().catch(() => undefined);
    }
  });
  result.seconds = (performance.now() - started) / 1000;
  return result;
}

/** CPU, run-queue wait, memory and open files of one process over the measured part of a step. */
interface ProcessUsage {
  cpuSeconds: number | undefined;
  /** CPU seconds per wall-clock second. */
  cpuCores: number | undefined;
  /** Seconds the main thread was runnable but waited for a CPU. */
  runQueueWaitSeconds: number | undefined;
  peakRssMB: number | undefined;
  openFilesPeak: number | undefined;
}

/** Samples the trainer, the broker and this process every second between start and finish. */
class ResourceMeter {
  private readonly before = new Map<string, ProcessSample | undefined>();
  private readonly peakRss = new Map<string, number>();
  private readonly peakFiles = new Map<string, number>();
  private timer: NodeJS.Timeout | undefined;
  private started = 0;

  constructor(private readonly pids: Record<"trainer" | "broker" | "simulator", number | "self" | undefined>) {}

  start(): void {
    this.started = performance.now();
    for (const [name, pid] of Object.entries(this.pids)) {
      this.before.set(name, pid === undefined ? undefined : sampleProcess(pid));
    }
    this.sample();
    this.timer = setInterval(() => this.sample(), 1_000);
  }

  private sample(): void {
    for (const [name, pid] of Object.entries(this.pids)) {
      if (pid === undefined) {
        continue;
      }
      this.peakRss.set(name, Math.max(this.peakRss.get(name) ?? 0, sampleProcess(pid)?.rssBytes ?? 0));
      this.peakFiles.set(name, Math.max(this.peakFiles.get(name) ?? 0, openFileCount(pid) ?? 0));
    }
  }

  /** Stops sampling and returns each process's usage since start(). */
  finish(): Record<"trainer" | "broker" | "simulator", ProcessUsage> {
    clearInterval(this.timer);
    this.sample();
    const wallSeconds = (performance.now() - this.started) / 1000;
    const usage = (name: "trainer" | "broker" | "simulator"): ProcessUsage => {
      const pid = this.pids[name];
      const before = this.before.get(name);
      const after = pid === undefined ? undefined : sampleProcess(pid);
      const cpu = before && after ? after.cpuSeconds - before.cpuSeconds : undefined;
      const wait = before?.runQueueWaitSeconds !== undefined && after?.runQueueWaitSeconds !== undefined ? after.runQueueWaitSeconds - before.runQueueWaitSeconds : undefined;
      return {
        cpuSeconds: cpu === undefined ? undefined : round(cpu),
        cpuCores: cpu === undefined ? undefined : round(cpu / wallSeconds),
        runQueueWaitSeconds: wait === undefined ? undefined : round(wait),
        peakRssMB: pid === undefined ? undefined : megabytes(this.peakRss.get(name)),
        openFilesPeak: pid === undefined ? undefined : this.peakFiles.get(name),
      };
    };
    return { trainer: usage("trainer"), broker: usage("broker"), simulator: usage("simulator") };
  }
}

interface LoadResult {
  loadSeconds: number;
  drainSeconds: number;
  backlog: number;
}

/** Runs the load for the step's seconds, then waits up to --drain-seconds for the queues to empty and stops the uplinks. */
async function runLoad(devices: SimulatedDevice[], context: StepContext): Promise<LoadResult> {
  const { options } = context;
  const started = performance.now();
  for (const device of devices) {
    device.startLoad(context.rate, options.statusIntervalSeconds * 1000);
  }
  await sleep(options.seconds * 1000);
  for (const device of devices) {
    device.stopLoad();
  }
  const loadSeconds = (performance.now() - started) / 1000;

  const drainStarted = performance.now();
  const backlog = (): number => devices.reduce((sum, device) => sum + device.backlog, 0);
  while (backlog() > 0 && performance.now() - drainStarted < options.drainSeconds * 1000) {
    await sleep(250);
  }
  const drainSeconds = (performance.now() - drainStarted) / 1000;
  const remaining = backlog();
  await Promise.all(devices.map((device) => device.stopUploads()));
  return { loadSeconds, drainSeconds, backlog: remaining };
}

/**
 * Closes the devices, every tenth by dropping its socket, and waits up to 15 s for the tracker to
 * show them offline. Returns the offline count and the number of dropped sockets.
 */
async function closeDevices(devices: SimulatedDevice[], trainer: TrainerProcess, concurrency: number): Promise<{ offline: number; lastWills: number }> {
  const abrupt = (device: SimulatedDevice): boolean => device.index % ABRUPT_CLOSE_EVERY === 0;
  await forEachLimited(devices, concurrency, (device) => device.close(abrupt(device)));
  const deadline = Date.now() + TRACKER_OFFLINE_WAIT_MS;
  let tracker = await trainer.tracker();
  while (tracker.offline < devices.length && Date.now() < deadline) {
    await sleep(250);
    tracker = await trainer.tracker();
  }
  return { offline: tracker.offline, lastWills: devices.filter(abrupt).length };
}

function hostLoad(): { loadAverage: number[]; cpuPressureAvg60: number | undefined } {
  return { loadAverage: os.loadavg().map((value) => round(value)), cpuPressureAvg60: cpuPressure() };
}

/** Runs one step from a fresh broker and trainer to the closed devices and returns its summary. */
async function runStep(context: StepContext): Promise<StepSummary> {
  const { options, dir } = context;
  mkdirSync(dir, { recursive: true });
  const hostAtStart = hostLoad();
  const broker = options.broker === undefined ? await startMosquitto(options.mosquitto, dir, options.mosquittoConf) : { url: options.broker, pid: undefined, logFile: undefined, stop: async () => undefined };
  const trainerLog = path.join(dir, "trainer.log");
  let trainer: TrainerProcess | undefined;
  let monitor: BrokerMonitor | undefined;
  let devices: SimulatedDevice[] = [];
  try {
    trainer = await TrainerProcess.start(writeTrainerConfig(dir, broker.url, options), trainerLog);
    monitor = new BrokerMonitor(broker.url);
    await monitor.start();

    const stats = new StepStats();
    const runId = randomBytes(3).toString("hex");
    const candidates = Array.from({ length: context.devices }, (_, index) => new SimulatedDevice(index + 1, runId, broker.url, context.source, stats));
    const connected = await connectDevices(candidates, options.connectConcurrency);
    devices = connected.devices;
    log(`step ${context.step}: ${devices.length} of ${context.devices} devices connected in ${connected.seconds.toFixed(1)} s; load for ${options.seconds} s at ${context.rate}/min each`);

    await trainer.resetEventLoopDelay();
    const meter = new ResourceMeter({ trainer: trainer.pid, broker: broker.pid, simulator: "self" });
    meter.start();
    const load = await runLoad(devices, context);
    // Status publishes and acknowledgements still in flight settle before the trainer is asked.
    await sleep(1_500);
    const usage = meter.finish();
    const statusSent = stats.statusSent;
    const report = await trainer.report(stats.ackedSha256);
    const closed = await closeDevices(devices, trainer, options.connectConcurrency);

    const summary: StepSummary = {
      step: context.step,
      devices: context.devices,
      ratePerDeviceMinute: context.rate,
      offeredPerSecond: round((context.devices * context.rate) / 60),
      seconds: options.seconds,
      statusIntervalSeconds: options.statusIntervalSeconds,
      connect: { ok: devices.length, failed: connected.failed, seconds: round(connected.seconds, 1), ...(connected.firstError ? { firstError: connected.firstError } : {}) },
      examples: {
        generated: stats.generated,
        acked: stats.acked,
        stored: report.catalogued,
        lost: stats.acked - report.ackedFound,
        ...(report.ackedMissing.length > 0 ? { missingSample: report.ackedMissing } : {}),
        storedWithoutAck: report.catalogued - report.ackedFound,
        duplicateAdds: report.duplicateAdds,
        backlog: load.backlog,
        embeddingLength: report.embeddingLength,
        ackedPerSecond: round(stats.acked / (load.loadSeconds + load.drainSeconds)),
      },
      attempts: { started: stats.attemptsStarted, failed: stats.attemptsFailed, failuresByKind: Object.fromEntries([...stats.failuresByKind.entries()].sort((a, b) => b[1] - a[1])) },
      latencyMs: { attempt: percentiles(stats.attemptLatencyMs), endToEnd: percentiles(stats.endToEndLatencyMs) },
      drainSeconds: round(load.drainSeconds, 1),
      status: { sent: statusSent, publishFailed: stats.statusPublishFailed, seenByTracker: report.statusEvents, trackerDevices: report.trackerDevices, offlineAfterClose: closed.offline, lastWills: closed.lastWills },
      trainer: {
        ...usage.trainer,
        endRssMB: megabytes(report.rssBytes),
        cpuMsPerAck: usage.trainer.cpuSeconds === undefined || stats.acked === 0 ? undefined : round((usage.trainer.cpuSeconds * 1000) / stats.acked, 1),
        eventLoopDelayMs: report.eventLoopDelayMs,
      },
      broker: { url: broker.url, extraConfig: options.broker === undefined ? options.mosquittoConf : [], connectionsMax: monitor.maxConnected, ...usage.broker, openFilesLimit: broker.pid === undefined ? undefined : openFilesLimit(broker.pid) },
      simulator: { ...usage.simulator, openFilesLimit: openFilesLimit("self") },
      host: { start: hostAtStart, end: hostLoad() },
      logs: { trainer: summariseTrainerLog(trainerLog), broker: undefined, dir },
      verdict: "ok",
      reasons: [],
    };
    await monitor.stop();
    monitor = undefined;
    await trainer.stop();
    trainer = undefined;
    await broker.stop();
    summary.logs.trainer = summariseTrainerLog(trainerLog);
    summary.logs.broker = summariseBrokerLog(broker.logFile);
    judge(summary);
    return summary;
  } finally {
    await Promise.all(devices.map((device) => device.link.close().catch(() => undefined)));
    await monitor?.stop().catch(() => undefined);
    await trainer?.stop().catch(() => undefined);
    await broker.stop().catch(() => undefined);
    if (!options.keepData) {
      rmSync(path.join(dir, "data"), { recursive: true, force: true });
    }
  }
}

/**
 * Sets the verdict and its reasons. A step is broken when any of these holds:
 * - a device could not connect;
 * - an acknowledged example is missing from the catalogue;
 * - examples were still queued after the drain;
 * - more than 5% of the attempts failed;
 * - the attempt p99 reached the sender's acknowledgement timeout;
 * - the tracker missed more than 1% of the statuses.
 * It is degraded on any failed attempt, a p99 above half that timeout, any missed status, a
 * device the tracker did not see go offline, or a simulator that used 0.9 CPU cores or more.
 */
function judge(summary: StepSummary): void {
  const broken: string[] = [];
  const degraded: string[] = [];
  const { examples, attempts, latencyMs, status, connect } = summary;
  if (connect.failed > 0) {
    broken.push(`${connect.failed} devices could not connect: ${connect.firstError ?? "no error message"}`);
  }
  if (examples.lost > 0) {
    broken.push(`${examples.lost} acknowledged examples are missing from the catalogue`);
  }
  if (examples.backlog > 0) {
    broken.push(`${examples.backlog} examples were still queued ${summary.drainSeconds} s after the load ended`);
  }

  const failedShare = attempts.started === 0 ? 0 : attempts.failed / attempts.started;
  const failures = Object.entries(attempts.failuresByKind)
    .map(([kind, count]) => `${count} ${kind}`)
    .join(", ");
  if (failedShare > 0.05) {
    broken.push(`${attempts.failed} of ${attempts.started} attempts failed (${failures})`);
  } else if (attempts.failed > 0) {
    degraded.push(`${attempts.failed} of ${attempts.started} attempts failed (${failures})`);
  }
  if (latencyMs.attempt.p99 >= ACK_TIMEOUT_MS) {
    broken.push(`attempt p99 ${latencyMs.attempt.p99} ms reached the ${ACK_TIMEOUT_MS} ms acknowledgement timeout`);
  } else if (latencyMs.attempt.p99 > ACK_TIMEOUT_MS / 2) {
    degraded.push(`attempt p99 ${latencyMs.attempt.p99} ms is above half the ${ACK_TIMEOUT_MS} ms acknowledgement timeout`);
  }

  const missedStatuses = status.sent - status.seenByTracker;
  if (missedStatuses > status.sent * 0.01) {
    broken.push(`the tracker saw ${status.seenByTracker} of ${status.sent} status messages`);
  } else if (missedStatuses > 0) {
    degraded.push(`the tracker saw ${status.seenByTracker} of ${status.sent} status messages`);
  }
  if (status.offlineAfterClose < connect.ok) {
    degraded.push(`the tracker saw ${status.offlineAfterClose} of ${connect.ok} devices go offline within ${TRACKER_OFFLINE_WAIT_MS / 1000} s of closing`);
  }
  if ((summary.simulator.cpuCores ?? 0) >= 0.9) {
    degraded.push(`the simulator used ${summary.simulator.cpuCores} CPU cores, so it may be the bottleneck of this step`);
  }

  if (broken.length > 0) {
    summary.verdict = "broken";
  } else if (degraded.length > 0) {
    summary.verdict = "degraded";
  } else {
    summary.verdict = "ok";
  }
  summary.reasons = [...broken, ...degraded];
}

// ---------------------------------------------------------------------------------------------
// Entry point

async function loadSource(options: Options): Promise<ExampleSource> {
  const entries = readdirSync(options.photos, { recursive: true, withFileTypes: true });
  const files = entries
    .filter((entry) => entry.isFile() && /\.jpe?g$/i.test(entry.name))
    .map((entry) => path.join(entry.parentPath, entry.name))
    .sort();
  if (files.length === 0) {
    throw new UsageError(`no .jpg photos found under ${options.photos}; pass --photos DIR`);
  }
  const pkg = await readModelPackage(options.model);
  return {
    photos: files.map((file) => readFileSync(file)),
    model: { name: pkg.manifest.name, version: pkg.manifest.version, sha256: pkg.manifest.file.sha256 },
    labels: pkg.manifest.labels,
  };
}

export async function main(argv: string[]): Promise<number> {
  let options: Options | undefined;
  try {
    options = parseOptions(argv);
  } catch (error) {
    process.stderr.write(`${describeError(error)}\n\n${usage}\n`);
    return 2;
  }
  if (options === undefined) {
    process.stdout.write(`${usage}\n`);
    return 0;
  }
  const source = await loadSource(options);
  const out = options.out ?? mkdtempSync(path.join(os.tmpdir(), "sortline-fleet-load-"));
  mkdirSync(out, { recursive: true });
  process.stdout.write(`${JSON.stringify({ machine: machineInfo(), out, photos: source.photos.length })}\n`);

  let step = 0;
  let broken = false;
  for (const devices of options.devices) {
    for (const rate of options.rates) {
      step++;
      if (broken && options.stopOnBreak) {
        log(`step ${step} (${devices} devices at ${rate}/min) skipped after a broken step`);
        continue;
      }
      const summary = await runStep({ step, devices, rate, options, source, dir: path.join(out, `step-${step}-${devices}x${rate}`) });
      process.stdout.write(`${JSON.stringify(summary)}\n`);
      log(`step ${step}: ${summary.verdict}${summary.reasons.length > 0 ? `: ${summary.reasons.join("; ")}` : ""}`);
      broken ||= summary.verdict === "broken";
    }
  }
  return 0;
}

if (process.argv[2] === "--trainer-child" && import.meta.url === `file://${process.argv[1]}`) {
  const [, , , configFile, logFile] = process.argv;
  runTrainerChild(configFile!, logFile!).catch((error: unknown) => {
    process.stderr.write(`trainer child failed: ${error instanceof Error ? error.stack : String(error)}\n`);
    process.exit(1);
  });
} else if (import.meta.url === `file://${process.argv[1]}`) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (error: unknown) => {
      process.stderr.write(`fleet-load failed: ${error instanceof Error ? error.stack : String(error)}\n`);
      process.exitCode = 1;
    },
  );
}
