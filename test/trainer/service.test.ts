import { copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { generateKeyPair, verifyPackage, type SigningKeyPair } from "../../src/models/signing.js";
import { unpackBundle } from "../../src/models/bundle.js";
import { readModelPackage } from "../../src/models/manifest.js";
import { MqttLink } from "../../src/protocol/link.js";
import { deviceTopic } from "../../src/protocol/topics.js";
import { TransferError, TransferReceiver, TransferSender, type BeginHeader } from "../../src/protocol/transfer.js";
import { parseTrainerConfig, type TrainerConfig } from "../../src/trainer/config.js";
import { TrainerService } from "../../src/trainer/service.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { makeTempDir, readPhotos } from "./helpers.js";

const DEFAULT_MODEL = fileURLToPath(new URL("../../models/default/", import.meta.url));
const PHOTOS = fileURLToPath(new URL("../../demo/photos/", import.meta.url));
const SITE = "plant-a";
const DEVICE = "edge-1";

/**
 * A stand-in for the Spark train job. It copies the package given as its first argument into --out
 * with --name and --version in the manifest and writes validation.csv from the demo photos. It
 * records its arguments in the file given as its second argument and prints the job's JSON summary.
 */
const TRAIN_SCRIPT = `
import { cpSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import path from "node:path";
const [source, argsFile, photos, ...args] = process.argv.slice(2);
const option = (name) => args[args.indexOf(name) + 1];
writeFileSync(argsFile, JSON.stringify(args));
const out = option("--out");
cpSync(source, out, { recursive: true });
const manifestFile = path.join(out, "manifest.json");
const manifest = JSON.parse(readFileSync(manifestFile, "utf8"));
manifest.name = option("--name");
manifest.version = option("--version");
writeFileSync(manifestFile, JSON.stringify(manifest, null, 2));
let csv = "path,label\\n";
for (const label of readdirSync(photos)) {
  for (const file of readdirSync(path.join(photos, label))) csv += path.join(photos, label, file) + "," + label + "\\n";
}
writeFileSync(path.join(out, "validation.csv"), csv);
process.stderr.write("INFO embedding images\\nINFO training the head\\n");
console.log(JSON.stringify({ model: out, accuracy: { int8: 0.91 }, seconds: 1.5 }));
`;

/** A stand-in for the gate: its first argument is "pass" or "fail"; records its arguments and prints a verdict. */
const GATE_SCRIPT = `
import { writeFileSync } from "node:fs";
const [mode, argsFile, ...args] = process.argv.slice(2);
writeFileSync(argsFile, JSON.stringify(args));
const passed = mode === "pass";
const verdict = { passed, reasons: passed ? [] : ["accuracy 0.8000 does not beat the running model's 0.9000"], baselineAccuracy: 0.9, candidateAccuracy: passed ? 0.95 : 0.8, newClasses: [], perClass: {} };
writeFileSync(args[args.indexOf("--out") + 1], JSON.stringify(verdict));
process.stderr.write("INFO gate done\\n");
console.log(JSON.stringify(verdict));
process.exit(passed ? 0 : 3);
`;

interface Fixture {
  dir: string;
  config: TrainerConfig;
  keys: SigningKeyPair;
  baseModel: string;
  trainArgsFile: string;
  gateArgsFile: string;
}

/** Writes a trainer config for `brokerUrl` with the stand-in train and gate jobs and a copy of the default model. */
async function makeFixture(dir: string, brokerUrl: string, gate: "pass" | "fail", minNewLabels = 1000): Promise<Fixture> {
  const keys = generateKeyPair();
  await writeFile(path.join(dir, "signing.key"), keys.privateKeyPem, { mode: 0o600 });
  const baseModel = path.join(dir, "base-model");
  await mkdir(baseModel);
  for (const name of await readdir(DEFAULT_MODEL)) {
    await copyFile(path.join(DEFAULT_MODEL, name), path.join(baseModel, name));
  }
  await writeFile(path.join(dir, "train.mjs"), TRAIN_SCRIPT);
  await writeFile(path.join(dir, "gate.mjs"), GATE_SCRIPT);
  const trainArgsFile = path.join(dir, "train-args.json");
  const gateArgsFile = path.join(dir, "gate-args.json");
  const document = {
    broker: { url: brokerUrl, protocolVersion: 5 },
    dataDir: "data",
    review: { port: 0 },
    signing: { privateKey: "signing.key" },
    base: { datasets: [PHOTOS], model: "base-model" },
    validation: [PHOTOS],
    training: {
      modelName: "plant-a-waste",
      trigger: { minNewLabels },
      command: [process.execPath, path.join(dir, "train.mjs"), baseModel, trainArgsFile, PHOTOS],
      gateCommand: [process.execPath, path.join(dir, "gate.mjs"), gate, gateArgsFile],
    },
    fleet: { groups: { line1: [`${SITE}/${DEVICE}`] }, publishTo: "line1" },
  };
  const file = path.join(dir, "trainer.yaml");
  await writeFile(file, JSON.stringify(document));
  return { dir, config: parseTrainerConfig(document, file, dir), keys, baseModel, trainArgsFile, gateArgsFile };
}

interface LogLine {
  level: number;
  msg: string;
  [field: string]: unknown;
}

/** Polls `condition` every 25 ms until it holds, or throws after `timeoutMs` naming `what`. */
async function waitFor(condition: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Builds the begin meta a device sends with a hard example. */
function exampleMeta(frameId: string, embedding?: Float32Array): Record<string, unknown> {
  return {
    frameId,
    capturedAt: "2024-05-01T08:00:00Z",
    model: { name: "sortline-trashnet", version: "1.0.0", sha256: "a".repeat(64) },
    top: [
      { label: "glass", p: 0.48 },
      { label: "plastic", p: 0.41 },
    ],
    reasons: ["small-margin"],
    priority: 0.7,
    novelty: 0.2,
    margin: 0.07,
    predicted: "glass",
    embedding: embedding === undefined ? undefined : Buffer.from(embedding.buffer).toString("base64"),
  };
}

describe("TrainerService", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let broker: MosquittoBroker;
  let service: TrainerService | undefined;
  let logs: LogLine[];
  const links: MqttLink[] = [];

  async function startService(fixture: Fixture, retrainCheckIntervalMs?: number): Promise<TrainerService> {
    const logger = pino({ level: "debug" }, { write: (line: string) => logs.push(JSON.parse(line) as LogLine) });
    service = new TrainerService({ config: fixture.config, logger, publisher: { ackTimeoutMs: 2_000 }, retrainCheckIntervalMs });
    await service.start();
    return service;
  }

  async function connectDevice(): Promise<MqttLink> {
    const link = new MqttLink({ url: broker.url, role: "agent", site: SITE, device: DEVICE, reconnectPeriodMs: 200 });
    links.push(link);
    await link.connect({ timeoutMs: 10_000 });
    return link;
  }

  function upload(sender: TransferSender, transferId: string, data: Buffer, meta: Record<string, unknown>) {
    return sender.send({
      dataTopic: deviceTopic(SITE, DEVICE, "up/data"),
      ackTopic: deviceTopic(SITE, DEVICE, "up/ack"),
      transferId,
      kind: "example",
      name: `${transferId}.jpg`,
      data,
      meta,
      ackTimeoutMs: 2_000,
    });
  }

  beforeEach(async () => {
    temp = makeTempDir("trainer-service");
    broker = await startMosquitto();
    logs = [];
  });

  afterEach(async () => {
    await Promise.all(links.splice(0).map((link) => link.close()));
    await service?.stop();
    service = undefined;
    await broker.close();
    temp.remove();
  });

  it("stores uploaded examples in the catalogue", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "pass");
    const trainer = await startService(fixture);
    const device = await connectDevice();
    const sender = new TransferSender({ link: device });
    const photos = [readPhotos("glass")[0]!, readPhotos("metal")[0]!, readPhotos("plastic")[0]!];
    const embedding = new Float32Array([0.25, -1.5, 3]);

    for (const [index, photo] of photos.entries()) {
      await upload(sender, `ex-${index}`, photo, exampleMeta(`frame-${index}`, index === 0 ? embedding : undefined));
    }

    const examples = trainer.catalogue.list({ status: "all", order: "received" });
    expect(examples).toHaveLength(3);
    expect(examples.map((example) => example.frameId).sort()).toEqual(["frame-0", "frame-1", "frame-2"]);
    const first = examples.find((example) => example.frameId === "frame-0")!;
    expect(first.site).toBe(SITE);
    expect(first.device).toBe(DEVICE);
    expect(first.modelName).toBe("sortline-trashnet");
    expect(first.modelVersion).toBe("1.0.0");
    expect(first.reasons).toEqual(["small-margin"]);
    expect(first.predicted).toBe("glass");
    expect(first.capturedAt).toBe(Date.parse("2024-05-01T08:00:00Z"));
    expect([...trainer.catalogue.embedding(first.sha256)!]).toEqual([...embedding]);
    expect(await readFile(trainer.catalogue.imagePath(first.sha256))).toEqual(photos[0]);
  });

  it("rejects an upload that is not a JPEG", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "pass");
    const trainer = await startService(fixture);
    const device = await connectDevice();
    const sender = new TransferSender({ link: device });

    const error = await upload(sender, "ex-bad", Buffer.from("definitely not a JPEG file"), exampleMeta("frame-bad")).catch((caught: unknown) => caught);

    expect(error).toBeInstanceOf(TransferError);
    expect((error as TransferError).receiverError).toMatch(/JPEG/);
    expect(trainer.catalogue.count("all")).toBe(0);
    const rejected = logs.find((line) => line.msg === "hard example rejected");
    expect(rejected?.device).toBe(DEVICE);
    expect(String(rejected?.err)).toMatch(/JPEG/);
  });

  it("retrains, signs and delivers a model that passes the gate", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "pass");
    const trainer = await startService(fixture);
    const device = await connectDevice();
    const sender = new TransferSender({ link: device });
    const glass = readPhotos("glass")[0]!;
    await upload(sender, "ex-1", glass, exampleMeta("frame-1"));
    const [example] = trainer.catalogue.list();
    trainer.catalogue.label(example!.sha256, "glass", "tester");

    const received: { file: string; begin: BeginHeader }[] = [];
    const deviceDir = path.join(temp.dir, "device");
    const receiver = new TransferReceiver({
      link: device,
      dataTopic: deviceTopic(SITE, DEVICE, "down/data"),
      dir: path.join(deviceDir, "transfers"),
      maxBytes: 100 * 1024 * 1024,
      onComplete: async (file, begin) => {
        const copy = path.join(deviceDir, `${begin.transferId}.slpkg`);
        await copyFile(file, copy);
        received.push({ file: copy, begin });
      },
    });
    await receiver.start();

    const response = await fetch(`http://127.0.0.1:${trainer.reviewPort}/api/retrain`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    expect(response.status).toBe(202);
    const { run: started } = (await response.json()) as { run: { id: number } };
    await waitFor(() => trainer.retrainer.get(started.id)?.status !== "running", "the end of the training run", 60_000);
    const run = trainer.retrainer.get(started.id)!;

    expect(run.status).toBe("published");
    expect(run.error).toBeNull();
    expect(run.version).toBe("1.1.0");
    expect(run.examples).toBe(1);
    expect(run.candidateAccuracy).toBe(0.95);
    expect(run.train?.accuracy).toEqual({ int8: 0.91 });

    const modelDir = path.join(fixture.config.dataDir, "models", "plant-a-waste-1.1.0");
    expect(run.modelDir).toBe(modelDir);
    const verified = await verifyPackage(modelDir, [{ keyId: fixture.keys.keyId, publicKeyPem: fixture.keys.publicKeyPem }]);
    expect(verified.manifest.version).toBe("1.1.0");
    expect(trainer.catalogue.stats().lastTraining?.modelVersion).toBe("1.1.0");
    expect(trainer.catalogue.stats().labelledSinceLastTraining).toBe(0);

    const trainArgs = JSON.parse(await readFile(fixture.trainArgsFile, "utf8")) as string[];
    expect(trainArgs).toContain(path.join(fixture.config.dataDir, "runs", String(run.id), "labelled.csv"));
    expect(trainArgs.slice(trainArgs.indexOf("--extra-validation"), trainArgs.indexOf("--extra-validation") + 2)).toEqual(["--extra-validation", PHOTOS]);
    expect(trainArgs.slice(trainArgs.indexOf("--validation-fraction"), trainArgs.indexOf("--validation-fraction") + 2)).toEqual(["--validation-fraction", "0.2"]);
    const gateArgs = JSON.parse(await readFile(fixture.gateArgsFile, "utf8")) as string[];
    expect(gateArgs.slice(0, 2)).toEqual(["--baseline", fixture.baseModel]);
    expect(gateArgs.filter((arg, index) => gateArgs[index - 1] === "--validation")).toEqual([
      path.join(fixture.config.dataDir, "runs", String(run.id), "candidate", "validation.csv"),
      PHOTOS,
    ]);

    await waitFor(() => received.length === 1, "the model bundle on the device", 30_000);
    const { begin, file } = received[0]!;
    expect(begin.kind).toBe("model");
    expect(begin.meta).toEqual({ name: "plant-a-waste", version: "1.1.0", sha256: verified.manifest.file.sha256, deploy: true });
    const unpacked = path.join(deviceDir, "unpacked");
    await unpackBundle(file, unpacked);
    const installed = await verifyPackage(unpacked, [{ keyId: fixture.keys.keyId, publicKeyPem: fixture.keys.publicKeyPem }]);
    expect(installed.manifest.version).toBe("1.1.0");

    await waitFor(() => trainer.publisher.deliveries()[0]?.state === "delivered", "the delivery record");
    const models = (await (await fetch(`http://127.0.0.1:${trainer.reviewPort}/api/models`)).json()) as {
      current: { version: string };
      models: { version: string; deliveries: { site: string; device: string; state: string }[] }[];
    };
    expect(models.current.version).toBe("1.1.0");
    expect(models.models.map((model) => model.version)).toEqual(["1.1.0", "1.0.0"]);
    expect(models.models[0]!.deliveries).toEqual([expect.objectContaining({ site: SITE, device: DEVICE, state: "delivered" })]);
    await receiver.close();
  });

  it("publishes nothing when the gate fails", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "fail");
    const trainer = await startService(fixture);

    const run = await trainer.retrainer.retrain().done;

    expect(run.error).toBeNull();
    expect(run.status).toBe("rejected");
    expect(run.verdict?.reasons).toEqual(["accuracy 0.8000 does not beat the running model's 0.9000"]);
    expect(run.candidateAccuracy).toBe(0.8);
    expect(trainer.publisher.current()?.version).toBe("1.0.0");
    expect(trainer.publisher.deliveries()).toEqual([]);
    expect(trainer.catalogue.stats().lastTraining).toBeNull();
    const candidate = await readModelPackage(run.candidateDir!);
    expect(candidate.manifest.version).toBe("1.1.0");
    const verdictFile = JSON.parse(await readFile(path.join(fixture.config.dataDir, "runs", String(run.id), "verdict.json"), "utf8")) as { passed: boolean };
    expect(verdictFile.passed).toBe(false);
    expect(logs.some((line) => line.msg === "candidate rejected by the gate; nothing published")).toBe(true);
  });

  it("records a failing train job with its last output lines", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "pass");
    const script = 'process.stderr.write("Traceback (most recent call last)\\nValueError: no images in /srv/data\\nINFO py4j closing\\n"); process.exit(1);\n';
    await writeFile(path.join(temp.dir, "train.mjs"), script);
    const trainer = await startService(fixture);

    const run = await trainer.retrainer.retrain().done;

    expect(run.status).toBe("failed");
    expect(run.step).toBe("train");
    expect(run.error).toBe("the train job exited with code 1; stderr: ValueError: no images in /srv/data");
    expect(run.logTail).toEqual(["Traceback (most recent call last)", "ValueError: no images in /srv/data", "INFO py4j closing"]);
    expect(trainer.publisher.current()?.version).toBe("1.0.0");
    const failed = logs.find((line) => line.msg === "training run failed");
    expect(failed?.runId).toBe(run.id);
  });

  it("retrains once enough labels arrive", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "fail", 2);
    const trainer = await startService(fixture, 50);
    const device = await connectDevice();
    const sender = new TransferSender({ link: device });
    const photos = readPhotos("cardboard");
    for (const [index, photo] of photos.slice(0, 3).entries()) {
      await upload(sender, `ex-${index}`, photo, exampleMeta(`frame-${index}`));
    }
    const examples = trainer.catalogue.list();

    trainer.catalogue.label(examples[0]!.sha256, "cardboard", "tester");
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(trainer.retrainer.runs()).toEqual([]);
    trainer.catalogue.label(examples[1]!.sha256, "cardboard", "tester");
    await waitFor(() => trainer.retrainer.runs()[0]?.status === "rejected", "the triggered run");

    expect(trainer.retrainer.runs()[0]!.trigger).toBe("labels");
    expect(trainer.retrainer.runs()[0]!.labelledAtStart).toBe(2);
    // The rejected run counts as the last one, so the same two labels start no second run.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(trainer.retrainer.runs()).toHaveLength(1);
    trainer.catalogue.label(examples[2]!.sha256, "cardboard", "tester");
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(trainer.retrainer.runs()).toHaveLength(1);
  });

  it("reports fleet devices and their status", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "pass");
    const trainer = await startService(fixture);
    await connectDevice();

    await waitFor(() => trainer.tracker.get(SITE, DEVICE)?.state === "online", "the device status");
    const body = (await (await fetch(`http://127.0.0.1:${trainer.reviewPort}/api/fleet`)).json()) as {
      devices: { site: string; device: string; groups: string[]; reachable: boolean; status: { state: string } | null }[];
    };

    expect(body.devices).toEqual([expect.objectContaining({ site: SITE, device: DEVICE, groups: ["line1"], reachable: true })]);
    expect(body.devices[0]!.status?.state).toBe("online");
  });

  it("keeps examples and runs across a restart", async () => {
    const fixture = await makeFixture(temp.dir, broker.url, "fail");
    let trainer = await startService(fixture);
    const device = await connectDevice();
    await upload(new TransferSender({ link: device }), "ex-1", readPhotos("paper")[0]!, exampleMeta("frame-1"));
    const run = await trainer.retrainer.retrain().done;
    await trainer.stop();

    trainer = await startService(fixture);

    expect(trainer.catalogue.count("all")).toBe(1);
    expect(trainer.retrainer.get(run.id)?.status).toBe("rejected");
    expect(trainer.publisher.current()?.version).toBe("1.0.0");
    expect(trainer.publisher.models()).toHaveLength(1);
  });
});
