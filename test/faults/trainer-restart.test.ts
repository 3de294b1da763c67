import { mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";

import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { generateKeyPair } from "../../src/models/signing.js";
import type { TransferReceiver } from "../../src/protocol/transfer.js";
import { Catalogue } from "../../src/trainer/catalogue.js";
import { freePort, startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import {
  agentConfig,
  DEFAULT_MODEL_DIR,
  InProcessAgent,
  makeWorkDir,
  OutboxProbe,
  PHOTOS_DIR,
  replayFps,
  seconds,
  ServiceProcess,
  SITE,
  DEVICE,
  sleep,
  waitFor,
  writeConfig,
} from "./harness.js";
import { faultCase, lostText, scaled } from "./report.js";

const UPLOAD_KILLS = scaled(5, 2);
/** Copies of each demo photo with slightly different brightness, so that every replayed frame is a distinct image. */
const VARIANTS = 20;
const MODEL_NAME = "sortline-trashnet";

/**
 * Stand-in for the Spark train job: copies the package given first into --out with --name and
 * --version, and writes an empty validation.csv. It appends an unknown protobuf field (number
 * 100, varint 1) to model.onnx, which ONNX Runtime ignores. The model file then has a new sha256,
 * as a retrained one would, so the publisher does not take the device for already running it.
 */
const TRAIN_JOB = `
import { createHash } from "node:crypto";
import { appendFileSync, cpSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
const [source, ...args] = process.argv.slice(2);
const option = (name) => args[args.indexOf(name) + 1];
const out = option("--out");
cpSync(source, out, { recursive: true });
const manifestFile = path.join(out, "manifest.json");
const manifest = JSON.parse(readFileSync(manifestFile, "utf8"));
const modelFile = path.join(out, manifest.file.name);
appendFileSync(modelFile, Buffer.from([0xa0, 0x06, 0x01]));
const model = readFileSync(modelFile);
manifest.file.sha256 = createHash("sha256").update(model).digest("hex");
manifest.file.bytes = model.length;
manifest.name = option("--name");
manifest.version = option("--version");
writeFileSync(manifestFile, JSON.stringify(manifest, null, 2));
writeFileSync(path.join(out, "validation.csv"), "path,label\\n");
console.log(JSON.stringify({ model: out, accuracy: {}, seconds: 0 }));
`;

/** Stand-in for the release gate: writes a passing verdict to --out and prints it. */
const GATE_JOB = `
import { writeFileSync } from "node:fs";
const args = process.argv.slice(2);
const verdict = { passed: true, reasons: [], baselineAccuracy: 0.9, candidateAccuracy: 0.91, newClasses: [], perClass: {} };
writeFileSync(args[args.indexOf("--out") + 1], JSON.stringify(verdict));
console.log(JSON.stringify(verdict));
`;

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let trainerConfig: string;
let reviewPort: number;
let trainer: ServiceProcess | undefined;
let running: InProcessAgent;
let probe: OutboxProbe;

/** Writes VARIANTS re-encoded copies of every demo photo into `dir/<label>/`. */
async function writeDistinctPhotos(dir: string): Promise<number> {
  let count = 0;
  for (const label of await readdir(PHOTOS_DIR)) {
    await mkdir(path.join(dir, label), { recursive: true });
    for (const name of (await readdir(path.join(PHOTOS_DIR, label))).filter((file) => file.endsWith(".jpg"))) {
      const source = await readFile(path.join(PHOTOS_DIR, label, name));
      for (let variant = 0; variant < VARIANTS; variant++) {
        const jpeg = await sharp(source).modulate({ brightness: 1 + variant * 0.004 }).jpeg({ quality: 90 }).toBuffer();
        await writeFile(path.join(dir, label, `${path.parse(name).name}-v${variant}.jpg`), jpeg);
        count++;
      }
    }
  }
  return count;
}

async function startTrainer(): Promise<ServiceProcess> {
  trainer = ServiceProcess.trainer(trainerConfig);
  await trainer.waitForLog("trainer started", 60_000);
  return trainer;
}

function logCount(process: ServiceProcess | undefined, msg: string): number {
  return process?.logs.filter((line) => line.msg === msg).length ?? 0;
}

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("trainer restarts", () => {
  beforeAll(async () => {
    work = await makeWorkDir("trainer-restart");
    broker = await startMosquitto();
    const keys = generateKeyPair();
    const trainerDir = path.join(work.dir, "trainer");
    await mkdir(trainerDir, { recursive: true });
    await writeFile(path.join(trainerDir, "signing.key"), keys.privateKeyPem, { mode: 0o600 });
    await writeFile(path.join(trainerDir, "train.mjs"), TRAIN_JOB);
    await writeFile(path.join(trainerDir, "gate.mjs"), GATE_JOB);
    reviewPort = await freePort();
    trainerConfig = path.join(trainerDir, "trainer.json");
    await writeFile(
      trainerConfig,
      JSON.stringify({
        broker: { url: broker.url, protocolVersion: 5 },
        dataDir: "data",
        review: { host: "127.0.0.1", port: reviewPort },
        signing: { privateKey: "signing.key" },
        base: { datasets: [PHOTOS_DIR], model: DEFAULT_MODEL_DIR },
        validation: [PHOTOS_DIR],
        training: {
          modelName: MODEL_NAME,
          // The default is spark/ next to the compiled CLI, which is under .cache for these tests.
          sparkDir: trainerDir,
          trigger: { minNewLabels: 100000 },
          command: [process.execPath, path.join(trainerDir, "train.mjs"), DEFAULT_MODEL_DIR],
          gateCommand: [process.execPath, path.join(trainerDir, "gate.mjs")],
        },
        fleet: { groups: { line: [`${SITE}/${DEVICE}`] }, publishTo: "line" },
      }),
    );
    await startTrainer();

    const photos = path.join(work.dir, "photos");
    await writeDistinctPhotos(photos);
    const keyFile = path.join(work.dir, "trainer.pub");
    await writeFile(keyFile, keys.publicKeyPem);
    const config = agentConfig({
      dir: work.dir,
      fleetUrl: broker.url,
      trustedKey: keyFile,
      sources: [{ type: "directory", name: "distinct", path: photos, fps: replayFps(), loop: true, shuffleSeed: 5 }],
    });
    running = await InProcessAgent.start(await writeConfig(path.join(work.dir, "agent.yaml"), config));
    probe = new OutboxProbe(running.agent.outboxStore!);
  });

  afterAll(async () => {
    probe?.stop();
    await running?.stop();
    await trainer?.kill("SIGTERM");
    await broker?.close();
    await work?.remove();
  });

  it("keeps acknowledged uploads across kills", async () => {
    await faultCase(
      {
        case: "9. Trainer killed in the middle of uploads",
        injected: `${UPLOAD_KILLS} SIGKILLs of the trainer process (sortline trainer) 1 to 4 s apart while the agent uploads hard examples; the trainer is started again 1 s after each kill`,
        expected: "every example the agent deleted from its outbox as acknowledged is in the trainer's catalogue after the restarts; uploads resume after each restart",
      },
      async (row) => {
        await waitFor(() => logCount(trainer, "hard example stored") >= 3, "three stored examples", 120_000);
        const downtimes: number[] = [];
        const resumedAfter: number[] = [];
        for (let kill = 0; kill < UPLOAD_KILLS; kill++) {
          await sleep(1_000 + Math.random() * 3_000);
          const killedAt = Date.now();
          await trainer!.kill("SIGKILL");
          await sleep(1_000);
          const restarted = await startTrainer();
          downtimes.push(Date.now() - killedAt);
          const ackedAtRestart = probe.acked.size;
          await waitFor(() => logCount(restarted, "hard example stored") > 0 && probe.acked.size > ackedAtRestart, "an acknowledged upload after the restart", 120_000);
          resumedAfter.push(Date.now() - killedAt);
        }

        // Stop new examples and give the uplink time to finish the sends in flight.
        running.agent.pipeline!.pause();
        await sleep(5_000);
        await trainer!.kill("SIGTERM");
        trainer = undefined;
        const manifest = JSON.parse(await readFile(path.join(DEFAULT_MODEL_DIR, "manifest.json"), "utf8")) as { labels: string[] };
        const catalogue = Catalogue.open(path.join(work.dir, "trainer", "data", "catalogue"), { baseClasses: manifest.labels });
        const missing = [...probe.acked].filter((id) => catalogue.get(probe.imageSha256.get(id) ?? "") === undefined);
        const catalogued = catalogue.count("all");
        catalogue.close();
        const outbox = running.agent.outboxStore!.stats();
        await startTrainer();
        running.agent.pipeline!.resume();

        row.observed =
          `${UPLOAD_KILLS} kills; trainer down ${seconds(Math.min(...downtimes))} to ${seconds(Math.max(...downtimes))} each; an acknowledged upload ${seconds(Math.min(...resumedAfter))} to ${seconds(Math.max(...resumedAfter))} after each kill; ` +
          `outbox acked ${probe.acked.size}, ${outbox.items} still queued; catalogue holds ${catalogued} examples`;
        row.lost = lostText({ "examples acked by the trainer, missing from its catalogue": missing.length }, [`${outbox.evicted} examples evicted from the outbox`]);

        expect(missing).toEqual([]);
        expect(probe.acked.size).toBeGreaterThan(0);
      },
    );
  });

  it("delivers a model across a kill", async () => {
    await faultCase(
      {
        case: "10. Trainer killed in the middle of a publish",
        injected: "a training run (stand-in train and gate jobs) publishes a signed 1.1.0; the trainer process gets SIGKILL 0 to 1.5 s after it logs \"sending model bundle\" and is started again 1 s later",
        expected: "the restarted trainer returns the delivery to pending and resumes the transfer; the agent receives, verifies and activates 1.1.0",
      },
      async (row) => {
        const response = await fetch(`http://127.0.0.1:${reviewPort}/api/retrain`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
        expect(response.status).toBe(202);
        const sending = await trainer!.waitForLog("sending model bundle", 120_000);
        const delay = Math.random() * 1_500;
        await sleep(delay);
        const receivedBeforeKill = running.logsWith("model bundle received").length > 0;
        const killedAt = Date.now();
        await trainer!.kill("SIGKILL");
        await sleep(1_000);
        const restarted = await startTrainer();
        const publisherStarted = restarted.findLog("publisher started");

        await waitFor(() => running.updates.some((status) => status.version === "1.1.0" && (status.state === "active" || status.state === "rejected")), "the agent's final state for 1.1.0", 240_000);
        const activatedAfterMs = Date.now() - killedAt;
        const final = running.updates.find((status) => status.version === "1.1.0" && (status.state === "active" || status.state === "rejected"))!;
        await restarted.waitForLog("model bundle delivered", 60_000).catch(() => undefined);
        const delivered = restarted.findLog("model bundle delivered");
        const receiver = (running.agent.fleet as unknown as { receiver: TransferReceiver }).receiver;

        row.observed =
          `killed ${seconds(delay)} after the trainer started sending ${String(sending.bytes)} bytes (bundle ${receivedBeforeKill ? "already" : "not yet"} received by the agent); ` +
          `the restarted trainer resumed ${String(publisherStarted?.resumed ?? "?")} delivery; ` +
          `agent receiver: ${receiver.stats.chunksStored} chunks stored, ${receiver.stats.chunksDuplicate} duplicates, ${receiver.stats.transfersCompleted} transfers completed; ` +
          `1.1.0 ${final.state} ${seconds(activatedAfterMs)} after the kill; trainer logged the delivery ${delivered ? "as delivered" : "not as delivered"}; active model ${running.agent.activeRunner!.manifest.version}`;
        row.lost = lostText({ "published models not delivered": final.state === "active" ? 0 : 1 }, ["none"]);

        expect(final.state).toBe("active");
        expect(running.agent.activeRunner!.manifest.version).toBe("1.1.0");
        expect(delivered).toBeDefined();
      },
    );
  });
});
