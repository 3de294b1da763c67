import { mkdir, readdir, readFile, rm, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { destination as pinoDestination } from "pino";

import { Agent } from "../agent/agent.js";
import { EmbeddedBroker } from "../broker/embedded.js";
import { parseAgentConfig } from "../config/load.js";
import { ModelRunner } from "../inference/runner.js";
import { createLogger, type Logger } from "../lib/log.js";
import { sha256Hex, splitOf } from "../lib/split.js";
import { generateKeyPair } from "../models/signing.js";
import { prepareImage } from "../preprocess/image.js";
import { CommandClient } from "../protocol/commands.js";
import { MqttLink } from "../protocol/link.js";
import { parseTrainerConfig } from "../trainer/config.js";
import { TrainerService } from "../trainer/service.js";
import { defaultModelDir, packageRoot, UsageError } from "./common.js";

export const demoLoopUsage = `Usage: sortline demo-loop [--datasets DIR] [--labels N] [--fps N] [--work DIR]

Runs the closed loop on this machine: an embedded MQTT broker, the edge agent with the default
model, the trainer service and the Spark training job. The agent replays the training split of
the waste-stream photos as a camera and mines hard examples; a scripted reviewer labels them in
the trainer's review API from the photos' folder names; the trainer retrains with the new
classes, gates, signs and publishes; the agent shadows the new model and switches. Accuracy on
the stream's held-out photos is printed before and after. The last line is JSON: {"model": PATH}.

Options:
  --datasets DIR   folder with trashnet/ and waste-stream/ (default: $SORTLINE_DATASETS or ../shared/datasets)
  --labels N       examples the scripted reviewer labels, most typical first (default: 400)
  --fps N          frame rate of the replayed camera (default: 8)
  --work DIR       working folder, emptied first (default: .sortline-loop)
  -h, --help       print this help`;

const SITE = "demo";
const DEVICE = "line1";
const VALIDATION_FRACTION = 0.2;

/** Bins of the demo line; the new classes get bins by a fleet command after the switch. */
const BINS: Record<string, string> = { cardboard: "fibre", paper: "fibre", carton: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" };
const NEW_BINS: Record<string, string> = { organic: "organic", textile: "textile", wood: "wood" };

interface Photo {
  file: string;
  label: string;
  sha256: string;
}

async function listPhotos(root: string): Promise<Photo[]> {
  const entries = await readdir(root, { recursive: true, withFileTypes: true });
  const files = entries.filter((e) => e.isFile() && /\.(jpe?g|png|webp)$/i.test(e.name)).map((e) => path.join(e.parentPath, e.name)).sort();
  if (files.length === 0) {
    throw new UsageError(`no photos under ${root}`);
  }
  return Promise.all(files.map(async (file) => ({ file, label: path.basename(path.dirname(file)), sha256: sha256Hex(await readFile(file)) })));
}

/** Links photos into class folders so that the agent and the Spark job see the split as datasets. */
async function linkSplit(photos: Photo[], dir: string): Promise<void> {
  for (const photo of photos) {
    await mkdir(path.join(dir, photo.label), { recursive: true });
    await symlink(photo.file, path.join(dir, photo.label, path.basename(photo.file)));
  }
}

async function accuracy(modelDir: string, photos: Photo[]): Promise<{ accuracy: number; perClass: Record<string, number> }> {
  const runner = await ModelRunner.load(modelDir);
  let correct = 0;
  const perClass = new Map<string, { n: number; ok: number }>();
  for (let offset = 0; offset < photos.length; offset += 8) {
    const batch = photos.slice(offset, offset + 8);
    const pixels = await Promise.all(batch.map(async (p) => (await prepareImage(await readFile(p.file), runner.manifest.preprocess)).pixels));
    const { probabilities } = await runner.run(pixels);
    batch.forEach((photo, index) => {
      const scores = probabilities[index]!;
      const predicted = runner.manifest.labels[scores.indexOf(Math.max(...scores))];
      const entry = perClass.get(photo.label) ?? { n: 0, ok: 0 };
      entry.n++;
      if (predicted === photo.label) {
        correct++;
        entry.ok++;
      }
      perClass.set(photo.label, entry);
    });
  }
  await runner.release();
  return { accuracy: correct / photos.length, perClass: Object.fromEntries([...perClass].sort().map(([k, v]) => [k, Number((v.ok / v.n).toFixed(3))])) };
}

async function waitFor(condition: () => boolean | Promise<boolean>, what: string, timeoutMs: number, logger: Logger): Promise<void> {
  const start = Date.now();
  let lastLog = start;
  while (!(await condition())) {
    if (Date.now() - start > timeoutMs) {
      throw new Error(`timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what}`);
    }
    if (Date.now() - lastLog > 30_000) {
      lastLog = Date.now();
      logger.info({ waitingFor: what, seconds: Math.round((Date.now() - start) / 1000) }, "still waiting");
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function api(port: number, method: string, route: string, body?: unknown): Promise<unknown> {
  const response = await fetch(`http://127.0.0.1:${port}${route}`, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) {
    throw new Error(`${method} ${route}: HTTP ${response.status}: ${text}`);
  }
  return text ? JSON.parse(text) : undefined;
}

function say(line: string): void {
  process.stdout.write(`${line}\n`);
}

export async function runDemoLoop(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      datasets: { type: "string" },
      labels: { type: "string", default: "400" },
      fps: { type: "string", default: "8" },
      work: { type: "string", default: ".sortline-loop" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    say(demoLoopUsage);
    return 0;
  }
  const labelBudget = Number.parseInt(values.labels, 10);
  const fps = Number(values.fps);
  if (!(labelBudget > 0) || !(fps > 0)) {
    throw new UsageError("--labels and --fps must be positive numbers");
  }
  const datasets = path.resolve(values.datasets ?? process.env.SORTLINE_DATASETS ?? path.join(packageRoot, "..", "shared", "datasets"));
  const work = path.resolve(values.work);
  const started = Date.now();
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  const logger = createLogger({ level: "info", destination: pinoDestination({ dest: path.join(work, "loop.log"), sync: false }) });
  say(`sortline loop demo: logs in ${path.join(work, "loop.log")}`);

  const stream = await listPhotos(path.join(datasets, "waste-stream")).catch((error: unknown) => {
    throw new UsageError(`waste-stream photos not found under ${datasets} (set --datasets): ${String(error)}`);
  });
  const trashnet = await listPhotos(path.join(datasets, "trashnet"));
  const replay = stream.filter((p) => splitOf(p.sha256, VALIDATION_FRACTION) === "train");
  const holdout = stream.filter((p) => splitOf(p.sha256, VALIDATION_FRACTION) === "validation");
  const trashnetValidation = trashnet.filter((p) => splitOf(p.sha256, VALIDATION_FRACTION) === "validation");
  await linkSplit(replay, path.join(work, "stream-replay"));
  await linkSplit(holdout, path.join(work, "stream-holdout"));
  say(`stream: ${replay.length} photos replayed as the camera, ${holdout.length} held out; TrashNet validation: ${trashnetValidation.length}`);

  const before = { stream: await accuracy(defaultModelDir(), holdout), trashnet: await accuracy(defaultModelDir(), trashnetValidation) };
  say(`before: default model, held-out stream accuracy ${before.stream.accuracy.toFixed(3)}, TrashNet validation ${before.trashnet.accuracy.toFixed(3)}`);

  const broker = new EmbeddedBroker("127.0.0.1", logger);
  await broker.start(0);
  const keys = generateKeyPair();
  await mkdir(path.join(work, "keys"), { recursive: true });
  await writeFile(path.join(work, "keys", "signing.key"), keys.privateKeyPem, { mode: 0o600 });
  await writeFile(path.join(work, "keys", "signing.pub"), keys.publicKeyPem);

  const trainerConfig = parseTrainerConfig(
    {
      broker: { url: broker.url, protocolVersion: 4 },
      dataDir: "trainer",
      review: { port: 0 },
      signing: { privateKey: "keys/signing.key" },
      base: { datasets: [path.join(datasets, "trashnet")], model: defaultModelDir(), validationFraction: VALIDATION_FRACTION },
      validation: ["stream-holdout"],
      training: { trigger: { minNewLabels: 1_000_000, intervalMinutes: 0 }, gate: { minGain: 0, maxClassDrop: 0.05 } },
      fleet: { groups: { demo: [`${SITE}/${DEVICE}`] }, publishTo: "demo" },
    },
    path.join(work, "trainer.yaml"),
    work,
  );
  const trainer = new TrainerService({ config: trainerConfig, logger: logger.child({ component: "trainer" }), publisher: { retryIntervalMs: 2_000 } });
  await trainer.start();

  const agentConfig = parseAgentConfig(
    {
      device: { id: DEVICE, site: SITE },
      sources: [{ type: "directory", name: "stream", path: "stream-replay", fps, loop: true, shuffleSeed: 7 }],
      actuators: [{ type: "fleet" }],
      decisions: { bins: BINS, defaultMinConfidence: 0.5 },
      audit: { path: "agent/audit.db" },
      health: { port: 0 },
      fleet: { url: broker.url, protocolVersion: 4, trustedKeys: ["keys/signing.pub"], statusIntervalSeconds: 5 },
      mining: { perHour: 1_000_000, outbox: { maxItems: 5000 } },
      update: { shadowFrames: 48, regression: false },
    },
    path.join(work, "agent.yaml"),
    work,
  );
  await writeFile(path.join(work, "agent.yaml"), JSON.stringify(agentConfig, null, 2));
  let firstPass = { decided: 0, correct: 0 };
  const agent = new Agent({
    config: agentConfig,
    logger: logger.child({ component: "agent" }),
    configFile: path.join(work, "agent.yaml"),
    onDecision: (record) => {
      if (firstPass.decided < replay.length) {
        firstPass = { decided: firstPass.decided + 1, correct: firstPass.correct + (record.truth === record.label ? 1 : 0) };
      }
    },
  });
  await agent.start();
  const operator = new MqttLink({ url: broker.url, role: "trainer", protocolVersion: 4, logger });
  await operator.connect();
  const commands = new CommandClient({ link: operator, signingKey: { keyId: keys.keyId, privateKey: keys.privateKeyPem } });

  try {
    say(`agent: replaying the stream at ${fps} frames/s and mining hard examples`);
    await waitFor(() => firstPass.decided >= replay.length, "the first pass over the stream", 3_600_000, logger);
    const mining = await commands.request(SITE, DEVICE, "set-config", { "mining.enabled": false }, { timeoutMs: 30_000 });
    if (!mining.ok) {
      throw new Error(`mining could not be stopped: ${mining.error?.message}`);
    }
    await waitFor(() => (agent.outboxStore?.size().items ?? 0) === 0, "the uplink to drain the outbox", 600_000, logger);
    const mined = agent.miner?.stats.stored ?? trainer.catalogue.stats().total;
    const upload = broker.traffic.get("up/data") ?? { messages: 0, bytes: 0 };
    const acks = broker.traffic.get("up/ack") ?? { messages: 0, bytes: 0 };
    const examples = trainer.catalogue.stats().total;
    say(`first pass: line accuracy ${(firstPass.correct / firstPass.decided).toFixed(3)} on ${firstPass.decided} frames; ${examples} hard examples at the trainer`);

    const bySha = new Map(replay.map((p) => [p.sha256, p.label]));
    const pending = (await api(trainer.reviewPort!, "GET", `/api/examples?status=pending&order=typical&limit=${labelBudget}`)) as { examples: { sha256: string }[] };
    const known = new Set(trainer.catalogue.classes());
    let labelled = 0;
    for (const example of pending.examples.slice(0, labelBudget)) {
      const label = bySha.get(example.sha256);
      if (!label) {
        await api(trainer.reviewPort!, "POST", `/api/examples/${example.sha256}/discard`, {});
        continue;
      }
      if (!known.has(label)) {
        await api(trainer.reviewPort!, "POST", "/api/classes", { name: label });
        known.add(label);
      }
      await api(trainer.reviewPort!, "POST", `/api/examples/${example.sha256}/label`, { label, by: "scripted-reviewer" });
      labelled++;
    }
    const perClass = trainer.catalogue.stats().byLabel;
    say(`reviewer: labelled ${labelled} examples ${JSON.stringify(perClass)}`);

    const retrainStart = Date.now();
    await api(trainer.reviewPort!, "POST", "/api/retrain", {});
    say("trainer: retraining with Spark (first run on a machine embeds every image, later runs reuse the feature cache)");
    let run: { status: string; version?: string | null; error?: string | null; gate?: unknown; packageDir?: string | null } | undefined;
    await waitFor(
      async () => {
        const runs = (await api(trainer.reviewPort!, "GET", "/api/runs")) as { active: unknown; runs: typeof run[] };
        run = runs.runs[0];
        return runs.active === null && run !== undefined && run.status !== "running";
      },
      "the training run",
      3 * 3_600_000,
      logger,
    );
    const trainSeconds = (Date.now() - retrainStart) / 1000;
    if (run?.status !== "published") {
      say(`trainer: the run ended ${run?.status}: ${run?.error ?? JSON.stringify(run?.gate)}`);
      return 1;
    }
    say(`trainer: model ${run.version} passed the gate, signed and published in ${trainSeconds.toFixed(0)} s`);
    await waitFor(() => agent.activeRunner?.manifest.version === run!.version, "the agent to shadow and switch", 1_800_000, logger);
    const switched = agent.updater?.status;
    say(`agent: switched to ${run.version} after shadowing ${switched?.report?.frames ?? "?"} frames`);
    const bins = await commands.request(SITE, DEVICE, "set-config", Object.fromEntries(Object.entries(NEW_BINS).map(([k, v]) => [`decisions.bins.${k}`, v])), { timeoutMs: 30_000 });
    say(`operator: new classes mapped to bins (${bins.ok ? "applied" : bins.error?.message})`);

    const packageDir = agent.activeRunner!.pkg.dir;
    const after = { stream: await accuracy(packageDir, holdout), trashnet: await accuracy(packageDir, trashnetValidation) };
    const wallSeconds = (Date.now() - started) / 1000;
    const summary = {
      before: { streamAccuracy: before.stream.accuracy, trashnetAccuracy: before.trashnet.accuracy, streamPerClass: before.stream.perClass },
      after: { streamAccuracy: after.stream.accuracy, trashnetAccuracy: after.trashnet.accuracy, streamPerClass: after.stream.perClass },
      holdoutImages: holdout.length,
      trashnetValidationImages: trashnetValidation.length,
      minedExamples: mined,
      examplesAtTrainer: examples,
      labelled,
      bytesPerExample: examples ? Math.round((upload.bytes + acks.bytes) / examples) : null,
      uploadBytes: upload.bytes,
      trainSeconds: Math.round(trainSeconds),
      loopWallSeconds: Math.round(wallSeconds),
    };
    await writeFile(path.join(work, "summary.json"), `${JSON.stringify(summary, null, 2)}\n`);
    say(`after:  model ${run.version}, held-out stream accuracy ${after.stream.accuracy.toFixed(3)} (was ${before.stream.accuracy.toFixed(3)}), TrashNet validation ${after.trashnet.accuracy.toFixed(3)} (was ${before.trashnet.accuracy.toFixed(3)})`);
    say(`per class on the held-out stream: ${JSON.stringify(after.stream.perClass)}`);
    say(`upload: ${summary.bytesPerExample} bytes per example over MQTT; loop wall time ${Math.round(wallSeconds)} s; summary in ${path.join(work, "summary.json")}`);
    say(JSON.stringify({ model: packageDir }));
    return 0;
  } finally {
    await commands.close();
    await operator.close();
    await agent.stop();
    await trainer.stop();
    await broker.stop();
  }
}
