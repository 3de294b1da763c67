import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stringify } from "yaml";

import { Agent } from "../../src/agent/agent.js";
import { OVERRIDES_FILE } from "../../src/agent/overrides.js";
import { loadAgentConfig } from "../../src/config/load.js";
import { silentLogger } from "../../src/lib/log.js";
import { packBundle } from "../../src/models/bundle.js";
import { generateKeyPair, signPackage, type SigningKeyPair } from "../../src/models/signing.js";
import { CommandClient } from "../../src/protocol/commands.js";
import { MqttLink } from "../../src/protocol/link.js";
import { deviceTopic, fleetPattern } from "../../src/protocol/topics.js";
import { TransferReceiver, TransferSender, type BeginHeader } from "../../src/protocol/transfer.js";
import type { UpdateStatus } from "../../src/update/updater.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { repoRoot, waitUntil } from "./helpers.js";

const SITE = "plant-t";
const DEVICE = "line1";

interface Harness {
  dir: string;
  broker: MosquittoBroker;
  keys: SigningKeyPair;
  agent: Agent;
  configFile: string;
  trainer: MqttLink;
  client: CommandClient;
  unsignedClient: CommandClient;
  sender: TransferSender;
  receiver: TransferReceiver;
  examples: { begin: BeginHeader; bytes: number }[];
  updates: UpdateStatus[];
}

async function signedCopy(dir: string, keys: SigningKeyPair, version: string, tamper = false): Promise<string> {
  const target = path.join(dir, `package-${version}${tamper ? "-tampered" : ""}`);
  await cp(path.join(repoRoot, "models", "default"), target, { recursive: true });
  const manifestFile = path.join(target, "manifest.json");
  const manifest = JSON.parse(await readFile(manifestFile, "utf8"));
  manifest.version = version;
  await writeFile(manifestFile, `${JSON.stringify(manifest, null, 2)}\n`);
  await signPackage(target, keys.privateKeyPem);
  if (tamper) {
    const model = path.join(target, "model.onnx");
    const bytes = await readFile(model);
    bytes[bytes.length - 100] = bytes[bytes.length - 100]! ^ 0xff;
    await writeFile(model, bytes);
  }
  return target;
}

async function sendModel(h: Harness, packageDir: string, version: string, deploy: boolean): Promise<void> {
  const manifest = JSON.parse(await readFile(path.join(packageDir, "manifest.json"), "utf8"));
  await h.sender.send({
    dataTopic: deviceTopic(SITE, DEVICE, "down/data"),
    ackTopic: deviceTopic(SITE, DEVICE, "down/ack"),
    transferId: `model-${version}-${Date.now()}`,
    kind: "model",
    name: `${manifest.name}-${version}.slpkg`,
    data: await packBundle(packageDir),
    meta: { name: manifest.name, version, sha256: manifest.file.sha256, deploy },
    ackTimeoutMs: 5_000,
  });
}

let h: Harness;

beforeAll(async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "sortline-fleet-"));
  const broker = await startMosquitto();
  const keys = generateKeyPair();
  await writeFile(path.join(dir, "trainer.pub"), keys.publicKeyPem);
  const configFile = path.join(dir, "agent.yaml");
  await writeFile(
    configFile,
    stringify({
      device: { id: DEVICE, site: SITE },
      sources: [{ type: "directory", name: "replay", path: path.join(repoRoot, "demo", "photos"), fps: 8, loop: true, shuffleSeed: 3 }],
      pipeline: { maxBatch: 4 },
      actuators: [{ type: "fleet" }],
      audit: { path: path.join(dir, "state", "audit.db") },
      health: { port: 0 },
      fleet: { url: broker.url, protocolVersion: 5, trustedKeys: ["trainer.pub"], statusIntervalSeconds: 1 },
      mining: { lowConfidence: 0.999, perHour: 100000, minDistance: 0.02 },
      update: { shadowFrames: 8, maxLatencyRatio: 50, regression: false, healthyAfterFrames: 20 },
    }),
  );
  const config = await loadAgentConfig(configFile);
  const updates: UpdateStatus[] = [];
  const agent = new Agent({ config, logger: silentLogger, configFile, overrides: {}, onUpdate: (status) => updates.push(status) });
  await agent.start();

  const trainer = new MqttLink({ url: broker.url, role: "trainer", protocolVersion: 5, logger: silentLogger });
  await trainer.connect();
  const client = new CommandClient({ link: trainer, signingKey: { keyId: keys.keyId, privateKey: keys.privateKeyPem } });
  const unsignedClient = new CommandClient({ link: trainer });
  const sender = new TransferSender({ link: trainer });
  const examples: Harness["examples"] = [];
  const receiver = new TransferReceiver({
    link: trainer,
    dataTopic: fleetPattern("up/data"),
    dir: path.join(dir, "trainer-inbox"),
    maxBytes: 8 * 1024 * 1024,
    onComplete: async (file, begin) => {
      examples.push({ begin, bytes: (await readFile(file)).length });
    },
  });
  await receiver.start();
  h = { dir, broker, keys, agent, configFile, trainer, client, unsignedClient, sender, receiver, examples, updates };
}, 120_000);

afterAll(async () => {
  await h?.agent.stop();
  await h?.receiver.close();
  await h?.sender.close();
  await h?.client.close();
  await h?.trainer.close();
  await h?.broker.close();
  if (h) {
    await rm(h.dir, { recursive: true, force: true });
  }
}, 60_000);

describe("agent on the fleet broker", () => {
  it("answers status with its model and counters", async () => {
    const reply = await h.client.request(SITE, DEVICE, "status", {}, { timeoutMs: 10_000 });
    expect(reply.ok).toBe(true);
    expect(reply.result).toMatchObject({ device: { id: DEVICE, site: SITE }, model: { name: "sortline-trashnet", version: "1.0.0" } });
  });

  it("refuses unsigned, unknown and malformed commands without acting", async () => {
    const unsigned = await h.unsignedClient.request(SITE, DEVICE, "pause", {}, { timeoutMs: 10_000 });
    expect(unsigned.ok).toBe(false);
    expect(unsigned.error?.code).toBe("unauthorised");
    expect(h.agent.pipeline!.paused).toBe(false);

    const unknown = await h.client.request(SITE, DEVICE, "self-destruct", {}, { timeoutMs: 10_000 });
    expect(unknown.error?.code).toBe("unknown-command");

    const badDeploy = await h.client.request(SITE, DEVICE, "deploy", { version: "latest" }, { timeoutMs: 10_000 });
    expect(badDeploy.error?.code).toBe("invalid-args");

    const missing = await h.client.request(SITE, DEVICE, "deploy", { version: "9.9.9" }, { timeoutMs: 10_000 });
    expect(missing.error).toMatchObject({ code: "failed", message: expect.stringContaining("has not been received") });

    const identity = await h.client.request(SITE, DEVICE, "set-config", { "device.id": "other" }, { timeoutMs: 10_000 });
    expect(identity.error).toMatchObject({ code: "invalid-args", message: expect.stringContaining("cannot be changed by a fleet command") });

    const statusArgs = await h.client.request(SITE, DEVICE, "status", { verbose: true }, { timeoutMs: 10_000 });
    expect(statusArgs.error?.code).toBe("invalid-args");

    const pauseArgs = await h.client.request(SITE, DEVICE, "pause", { seconds: 5 }, { timeoutMs: 10_000 });
    expect(pauseArgs.error?.code).toBe("invalid-args");
    expect(h.agent.pipeline!.paused).toBe(false);

    const nothingToRollBack = await h.client.request(SITE, DEVICE, "rollback", {}, { timeoutMs: 10_000 });
    expect(nothingToRollBack.error?.code).toBe("failed");
    expect(h.agent.activeRunner!.manifest.version).toBe("1.0.0");

    const emptyConfig = await h.client.request(SITE, DEVICE, "set-config", {}, { timeoutMs: 10_000 });
    expect(emptyConfig.error?.code).toBe("invalid-args");

    const badValue = await h.client.request(SITE, DEVICE, "set-config", { "decisions.defaultMinConfidence": 7 }, { timeoutMs: 10_000 });
    expect(badValue.error?.code).toBe("invalid-args");
    expect(h.agent.agentConfig.decisions.defaultMinConfidence).toBe(0.5);
  });

  it("changes a decision setting live and keeps it across restarts", async () => {
    const reply = await h.client.request(SITE, DEVICE, "set-config", { "decisions.defaultMinConfidence": 0.7, "decisions.bins.wood": "wood", "pipeline.maxWaitMs": 20 }, { timeoutMs: 10_000 });

    expect(reply.ok).toBe(true);
    expect(reply.result).toEqual({ applied: ["decisions.defaultMinConfidence", "decisions.bins.wood"], restartRequired: ["pipeline.maxWaitMs"], persisted: true });
    expect(h.agent.agentConfig.decisions.defaultMinConfidence).toBe(0.7);
    const saved = JSON.parse(await readFile(path.join(h.dir, "state", OVERRIDES_FILE), "utf8"));
    expect(saved).toEqual({ "decisions.defaultMinConfidence": 0.7, "decisions.bins.wood": "wood", "pipeline.maxWaitMs": 20 });
  });

  it("pauses and resumes the line", async () => {
    const paused = await h.client.request(SITE, DEVICE, "pause", {}, { timeoutMs: 10_000 });
    expect(paused.result).toEqual({ paused: true });
    expect(h.agent.pipeline!.paused).toBe(true);
    const resumed = await h.client.request(SITE, DEVICE, "resume", {}, { timeoutMs: 10_000 });
    expect(resumed.result).toEqual({ paused: false });
    expect(h.agent.pipeline!.paused).toBe(false);
  });

  it("sends a snapshot of the latest frame", async () => {
    await waitUntil(() => h.agent.lastFrame !== undefined, "a classified frame");
    const reply = await h.client.request(SITE, DEVICE, "snapshot", {}, { timeoutMs: 10_000 });
    const jpeg = Buffer.from(String((reply.result as { jpegBase64: string }).jpegBase64), "base64");
    expect(jpeg.subarray(0, 2)).toEqual(Buffer.from([0xff, 0xd8]));
  });

  it("uploads mined hard examples and deletes them from the outbox once acknowledged", async () => {
    await waitUntil(() => h.examples.length >= 2, "two uploaded hard examples", 60_000);
    const upload = await h.client.request(SITE, DEVICE, "upload-now", {}, { timeoutMs: 10_000 });
    expect(upload.ok).toBe(true);
    const first = h.examples[0]!;
    expect(first.begin.kind).toBe("example");
    expect(first.begin.meta).toMatchObject({ device: DEVICE, site: SITE, model: { version: "1.0.0" } });
    expect(Buffer.from(String(first.begin.meta!.embedding), "base64").length).toBe(2048 * 4);
    const stats = h.agent.outboxStore!.stats();
    expect(stats.acked).toBeGreaterThanOrEqual(2);
  });

  it("rejects a tampered model bundle and keeps deciding with the active model", async () => {
    const tampered = await signedCopy(h.dir, h.keys, "1.0.5", true);
    await sendModel(h, tampered, "1.0.5", true);
    await waitUntil(() => h.updates.some((u) => u.state === "rejected"), "the rejection of the tampered model", 180_000);
    expect(h.agent.activeRunner!.manifest.version).toBe("1.0.0");
  }, 200_000);

  it("rejects an unsigned model bundle", async () => {
    const unsigned = await signedCopy(h.dir, h.keys, "1.0.6");
    await rm(path.join(unsigned, "signature.json"));
    const rejectedBefore = h.updates.filter((u) => u.state === "rejected").length;
    await sendModel(h, unsigned, "1.0.6", true);
    await waitUntil(() => h.updates.filter((u) => u.state === "rejected").length > rejectedBefore, "the rejection of the unsigned model", 180_000);
    expect(h.updates.filter((u) => u.state === "rejected").at(-1)?.error).toBe("PackageUnsignedError");
    expect(h.agent.activeRunner!.manifest.version).toBe("1.0.0");
  }, 200_000);

  it("deploys a signed model after a shadow run, then rolls back on command", async () => {
    const good = await signedCopy(h.dir, h.keys, "1.0.1");
    await sendModel(h, good, "1.0.1", true);
    await waitUntil(() => h.updates.some((u) => u.state === "active" && u.version === "1.0.1"), "activation of 1.0.1", 180_000);
    expect(h.agent.activeRunner!.manifest.version).toBe("1.0.1");
    const shadowed = h.updates.find((u) => u.state === "active" && u.version === "1.0.1")!;
    expect(shadowed.report?.frames).toBeGreaterThanOrEqual(8);

    const status = await h.client.request(SITE, DEVICE, "status", {}, { timeoutMs: 10_000 });
    expect(status.result).toMatchObject({ model: { version: "1.0.1" } });

    const rollback = await h.client.request(SITE, DEVICE, "rollback", {}, { timeoutMs: 30_000 });
    expect(rollback.ok).toBe(true);
    expect(h.agent.activeRunner!.manifest.version).toBe("1.0.0");

    const again = await h.client.request(SITE, DEVICE, "deploy", { version: "1.0.1" }, { timeoutMs: 60_000 });
    expect(again.ok).toBe(true);
    await waitUntil(() => h.agent.activeRunner!.manifest.version === "1.0.1", "redeploy of the received 1.0.1", 180_000);
  }, 400_000);
});
