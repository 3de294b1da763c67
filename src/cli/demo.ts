import { mkdir, rm } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";
import mqtt from "mqtt";

import { Agent } from "../agent/agent.js";
import { AuditStore } from "../audit/store.js";
import type { DecisionRecord } from "../audit/types.js";
import { EmbeddedBroker } from "../broker/embedded.js";
import { parseAgentConfig } from "../config/load.js";
import { createLogger } from "../lib/log.js";
import { defaultModelDir, packageRoot, UsageError } from "./common.js";

export const demoUsage = `Usage: sortline demo [--fps N] [--seconds N] [--model DIR] [--photos DIR] [--data-dir DIR]

Runs the agent on this machine with an embedded MQTT broker: bundled TrashNet photos replayed as
a camera, the default model, decisions published over MQTT and audited in SQLite. Prints a live
line per second and a summary at the end.

Options:
  --fps N          frames per second of the replayed camera (default: 6)
  --seconds N      replay the photos in a loop for N seconds (default: one pass, then stop)
  --model DIR      model package (default: models/default)
  --photos DIR     labelled photos, one folder per class (default: demo/photos)
  --data-dir DIR   folder for the audit database (default: .sortline-demo); emptied first
  -h, --help       print this help`;

/** Bins of the demo line: fibre for paper and cardboard, one bin per other material. */
const DEMO_BINS: Record<string, string> = {
  cardboard: "fibre",
  paper: "fibre",
  glass: "glass",
  metal: "metal",
  plastic: "plastic",
  trash: "residual",
};

function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) {
    return 0;
  }
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]!;
}

class DemoStats {
  decided = 0;
  errors = 0;
  correct = 0;
  withTruth = 0;
  readonly bins = new Map<string, number>();
  readonly latencies: number[] = [];
  private windowStart = Date.now();
  private windowCount = 0;

  add(record: DecisionRecord): void {
    this.decided++;
    this.windowCount++;
    this.bins.set(record.bin ?? "none", (this.bins.get(record.bin ?? "none") ?? 0) + 1);
    if (record.error) {
      this.errors++;
      return;
    }
    this.latencies.push(record.latency.totalMs);
    // Percentiles cover the most recent decisions, so a long run keeps bounded memory.
    if (this.latencies.length > 20_000) {
      this.latencies.splice(0, 10_000);
    }
    if (record.truth) {
      this.withTruth++;
      if (record.truth === record.label) {
        this.correct++;
      }
    }
  }

  line(elapsedSeconds: number): string {
    const now = Date.now();
    const fps = (this.windowCount * 1000) / Math.max(1, now - this.windowStart);
    this.windowStart = now;
    this.windowCount = 0;
    const sorted = [...this.latencies].sort((a, b) => a - b);
    const bins = [...this.bins.entries()].map(([bin, count]) => `${bin}=${count}`).join(" ");
    const accuracy = this.withTruth ? `${this.correct}/${this.withTruth} (${(this.correct / this.withTruth).toFixed(3)})` : "n/a";
    return `t=${elapsedSeconds.toFixed(0).padStart(3)}s fps=${fps.toFixed(1)} latency p50=${percentile(sorted, 0.5).toFixed(0)}ms p99=${percentile(sorted, 0.99).toFixed(0)}ms decided=${this.decided} bins: ${bins || "-"} accuracy=${accuracy}`;
  }
}

function positiveNumber(option: string, value: string | undefined, fallback: number): number {
  const number = value === undefined ? fallback : Number(value);
  if (!Number.isFinite(number) || number <= 0) {
    throw new UsageError(`${option} ${value} is not a positive number`);
  }
  return number;
}

/** Runs `sortline demo` and returns the exit code. */
export async function runDemo(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      fps: { type: "string" },
      seconds: { type: "string" },
      model: { type: "string" },
      photos: { type: "string" },
      "data-dir": { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${demoUsage}\n`);
    return 0;
  }
  const fps = positiveNumber("--fps", values.fps, 6);
  const seconds = values.seconds === undefined ? undefined : positiveNumber("--seconds", values.seconds, 1);
  const dataDir = path.resolve(values["data-dir"] ?? ".sortline-demo");
  const photos = path.resolve(values.photos ?? path.join(packageRoot, "demo", "photos"));
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });

  const logger = createLogger({ fd: 2, level: process.env.SORTLINE_LOG_LEVEL ?? "warn", base: { device: "demo" } });
  const broker = new EmbeddedBroker("127.0.0.1", logger);
  await broker.start();
  const topic = "sortline/v1/demo-site/demo-line/decision";
  const plc = await mqtt.connectAsync(broker.url, { clientId: "sortline-demo-plc-gateway" });
  let messages = 0;
  plc.on("message", () => messages++);
  await plc.subscribeAsync(topic, { qos: 1 });

  const config = parseAgentConfig(
    {
      device: { id: "demo-line", site: "demo-site" },
      model: { dir: values.model ?? defaultModelDir() },
      sources: [{ type: "directory", name: "camera", path: photos, fps, loop: seconds !== undefined }],
      decisions: { bins: DEMO_BINS, rejectBin: "reject", defaultMinConfidence: 0.5 },
      actuators: [{ type: "mqtt", url: broker.url, topic: "sortline/v1/{site}/{device}/decision" }],
      audit: { path: path.join(dataDir, "audit.db"), synchronous: "NORMAL" },
      health: { port: 0 },
    },
    "demo configuration",
    process.cwd(),
  );

  const stats = new DemoStats();
  let finish: () => void = () => undefined;
  const finished = new Promise<void>((resolve) => (finish = resolve));
  const agent = new Agent({ config, logger, onDecision: (record) => stats.add(record), onSourcesEnded: () => finish() });

  process.stdout.write(`sortline demo: ${photos} at ${fps} fps, model ${config.model.dir}, broker ${broker.url}\n`);
  await agent.start();
  const started = Date.now();
  if (seconds !== undefined) {
    setTimeout(() => finish(), seconds * 1000).unref();
  }
  process.stdout.write(`agent ready on ${agent.provider} (health: http://127.0.0.1:${agent.healthPort}/healthz)\n`);
  const ticker = setInterval(() => process.stdout.write(`${stats.line((Date.now() - started) / 1000)}\n`), 1000);
  const interrupted = new Promise<void>((resolve) => process.once("SIGINT", resolve));
  await Promise.race([finished, interrupted]);
  clearInterval(ticker);
  await agent.stop();
  // Give the last QoS 1 deliveries to the subscriber a moment before closing the broker.
  await new Promise((resolve) => setTimeout(resolve, 200));
  await plc.endAsync();
  await broker.stop();

  const audit = AuditStore.open(config.audit.path, { readonly: true });
  const summary = audit.summary();
  audit.close();
  process.stdout.write(`${stats.line((Date.now() - started) / 1000)}\n`);
  const sorted = [...stats.latencies].sort((a, b) => a - b);
  const result = {
    frames: stats.decided,
    dropped: agent.pipeline?.stats.dropped ?? 0,
    errors: stats.errors,
    accuracy: stats.withTruth ? stats.correct / stats.withTruth : null,
    latencyMs: { p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99) },
    bins: Object.fromEntries(stats.bins),
    mqttMessagesReceived: messages,
    auditRows: summary.total,
    auditFile: config.audit.path,
    seconds: (Date.now() - started) / 1000,
  };
  process.stdout.write(
    `summary: ${result.frames} frames decided, ${result.dropped} dropped, accuracy ${result.accuracy?.toFixed(3) ?? "n/a"}, latency p50 ${result.latencyMs.p50} ms p99 ${result.latencyMs.p99} ms, ` +
      `${result.mqttMessagesReceived} decisions received over MQTT, ${result.auditRows} rows in ${result.auditFile}\n`,
  );
  process.stdout.write(`${JSON.stringify(result)}\n`);
  logger.flush();
  return 0;
}
