import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import { AuditStore } from "../audit/store.js";
import type { DecisionRecord } from "../audit/types.js";
import type { Frame } from "../capture/types.js";
import { defaultModelDir, packageRoot } from "../cli/common.js";
import type { Actuator } from "../decision/actuators.js";
import { DecisionPolicy } from "../decision/policy.js";
import { ModelRunner, type ProviderName } from "../inference/runner.js";
import { Pipeline } from "../pipeline/pipeline.js";
import { prepareImage } from "../preprocess/image.js";

const usage = `Usage: npm run bench -- [--model DIR] [--photos DIR] [--batch N] [--frames N] [--provider NAME]

Measures, in one run on the same images: raw onnxruntime throughput of the model, end-to-end
pipeline throughput (decode, batch, infer, decide, audit), and end-to-end latency with frames
arriving at 80% of that pipeline throughput. The last line is a JSON object.`;

interface Photo {
  file: string;
  data: Buffer;
  pixels: Buffer;
}

async function loadPhotos(root: string, runner: ModelRunner): Promise<Photo[]> {
  const entries = await readdir(root, { recursive: true, withFileTypes: true });
  const files = entries.filter((e) => e.isFile() && /\.(jpe?g|png|webp)$/i.test(e.name)).map((e) => path.join(e.parentPath, e.name)).sort();
  const photos: Photo[] = [];
  for (const file of files) {
    const data = await readFile(file);
    photos.push({ file, data, pixels: (await prepareImage(data, runner.manifest.preprocess)).pixels });
  }
  if (photos.length === 0) {
    throw new Error(`no photos found under ${root}`);
  }
  return photos;
}

/** Images per second of `session.run` alone on prepared pixels, at a fixed batch size. */
async function measureRaw(runner: ModelRunner, photos: Photo[], batch: number, frames: number): Promise<number> {
  const batches = Math.max(2, Math.ceil(frames / batch));
  const inputs = Array.from({ length: batches }, (_, b) => Array.from({ length: batch }, (_, i) => photos[(b * batch + i) % photos.length]!.pixels));
  await runner.run(inputs[0]!);
  const start = performance.now();
  for (const input of inputs) {
    await runner.run(input);
  }
  return (batches * batch * 1000) / (performance.now() - start);
}

class CountingActuator implements Actuator {
  readonly kind = "count";
  readonly dropped = 0;
  sent = 0;
  async start(): Promise<void> {}
  send(messages: readonly unknown[]): void {
    this.sent += messages.length;
  }
  async stop(): Promise<void> {}
}

interface PipelineRun {
  pipeline: Pipeline;
  decisions: DecisionRecord[];
  audit: AuditStore;
}

function createPipeline(runner: ModelRunner, batch: number, auditFile: string, queueSize: number): PipelineRun {
  const decisions: DecisionRecord[] = [];
  const audit = AuditStore.open(auditFile, { synchronous: "FULL" });
  const bins = Object.fromEntries(runner.manifest.labels.map((label) => [label, label]));
  const policy = new DecisionPolicy({ bins, rejectBin: "reject", minConfidence: {}, defaultMinConfidence: 0.5, topK: 3 }, runner.manifest.labels);
  const pipeline = new Pipeline({
    runner,
    policy,
    device: { id: "bench", site: "bench" },
    maxBatch: batch,
    maxWaitMs: 10,
    queueSize,
    deadlineMs: 1000,
    audit,
    actuators: [new CountingActuator()],
    onDecision: (record) => decisions.push(record),
  });
  pipeline.start();
  return { pipeline, decisions, audit };
}

let sequence = 0;
function frameOf(photo: Photo): Frame {
  sequence++;
  return { id: `bench-${sequence}`, source: "bench", sequence, data: photo.data, capturedAt: Date.now(), file: photo.file };
}

async function waitFor(condition: () => boolean): Promise<void> {
  while (!condition()) {
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** Images per second through the whole pipeline, fed as fast as it accepts frames without drops. */
async function measurePipeline(runner: ModelRunner, photos: Photo[], batch: number, frames: number, auditFile: string): Promise<number> {
  const run = createPipeline(runner, batch, auditFile, batch * 8);
  const warm = batch * 2;
  const total = warm + frames;
  let submitted = 0;
  let start = 0;
  while (submitted < total) {
    await waitFor(() => run.pipeline.depth < batch * 3);
    run.pipeline.submit(frameOf(photos[submitted % photos.length]!));
    submitted++;
    if (submitted === warm) {
      await waitFor(() => run.decisions.length >= warm);
      start = performance.now();
    }
  }
  await waitFor(() => run.decisions.length >= total);
  const rate = (frames * 1000) / (performance.now() - start);
  await run.pipeline.stop();
  run.audit.close();
  if (run.pipeline.stats.dropped > 0) {
    throw new Error(`pipeline dropped ${run.pipeline.stats.dropped} frames during the throughput run`);
  }
  return rate;
}

/** End-to-end latency (capture to decision) with frames arriving at a steady `rate` per second. */
async function measureLatency(runner: ModelRunner, photos: Photo[], batch: number, rate: number, frames: number, auditFile: string) {
  const run = createPipeline(runner, batch, auditFile, batch * 8);
  const interval = 1000 / rate;
  const warm = Math.ceil(rate * 2);
  const start = performance.now();
  for (let i = 0; i < warm + frames; i++) {
    const due = start + i * interval;
    const wait = due - performance.now();
    if (wait > 0) {
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
    run.pipeline.submit(frameOf(photos[i % photos.length]!));
  }
  await waitFor(() => run.decisions.length >= warm + frames);
  await run.pipeline.stop();
  run.audit.close();
  const latencies = run.decisions.slice(warm).map((d) => d.latency.totalMs).sort((a, b) => a - b);
  const pick = (q: number): number => latencies[Math.min(latencies.length - 1, Math.ceil(q * latencies.length) - 1)]!;
  return { p50: pick(0.5), p99: pick(0.99), dropped: run.pipeline.stats.dropped, frames: latencies.length };
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: "string" },
      photos: { type: "string" },
      batch: { type: "string", default: "8" },
      frames: { type: "string", default: "160" },
      provider: { type: "string", default: "cpu" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    return 0;
  }
  const batch = Number(values.batch);
  const frames = Number(values.frames);
  const runner = await ModelRunner.load(values.model ?? defaultModelDir(), { providers: [values.provider as ProviderName] });
  await runner.warmUp([1, batch]);
  const photos = await loadPhotos(values.photos ?? path.join(packageRoot, "demo", "photos"), runner);
  const scratch = await mkdtemp(path.join(os.tmpdir(), "sortline-bench-"));
  const { name, version } = runner.manifest;
  process.stdout.write(`model ${name} ${version} (${runner.manifest.precision}) on ${runner.provider}, batch ${batch}, ${photos.length} photos, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? "unknown"})\n`);

  const raw = await measureRaw(runner, photos, batch, frames);
  process.stdout.write(`raw onnxruntime: ${raw.toFixed(2)} images/s\n`);
  const pipelineRate = await measurePipeline(runner, photos, batch, frames, path.join(scratch, "throughput.db"));
  process.stdout.write(`pipeline (decode, batch, infer, decide, audit): ${pipelineRate.toFixed(2)} images/s = ${(pipelineRate / raw).toFixed(3)} of raw\n`);
  const offered = pipelineRate * 0.8;
  const latency = await measureLatency(runner, photos, batch, offered, frames, path.join(scratch, "latency.db"));
  process.stdout.write(
    `latency at ${offered.toFixed(2)} frames/s (80%): p50 ${latency.p50} ms, p99 ${latency.p99} ms, p99/p50 ${(latency.p99 / latency.p50).toFixed(2)}, dropped ${latency.dropped}\n`,
  );
  await runner.release();
  await rm(scratch, { recursive: true, force: true });
  const report = {
    model: `${name}@${version}`,
    provider: runner.provider,
    batch,
    rawImagesPerSecond: Number(raw.toFixed(2)),
    pipelineImagesPerSecond: Number(pipelineRate.toFixed(2)),
    latencyMs: { p50: latency.p50, p99: latency.p99 },
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
  return 0;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (error) => {
      process.stderr.write(`bench failed: ${error instanceof Error ? error.stack : String(error)}\n`);
      process.exitCode = 1;
    },
  );
}
