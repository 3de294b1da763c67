import { createHash } from "node:crypto";
import { copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

import type { Database } from "better-sqlite3";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { packBundle } from "../../src/models/bundle.js";
import { generateKeyPair, signPackage } from "../../src/models/signing.js";
import { MqttLink } from "../../src/protocol/link.js";
import type { ModelInfo } from "../../src/protocol/messages.js";
import { deviceTopic } from "../../src/protocol/topics.js";
import { TransferReceiver, type BeginHeader } from "../../src/protocol/transfer.js";
import { DeviceTracker } from "../../src/trainer/fleet.js";
import { Publisher } from "../../src/trainer/publisher.js";
import { openStateDb } from "../../src/trainer/service.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { makeTempDir } from "./helpers.js";

const DEFAULT_MODEL = fileURLToPath(new URL("../../models/default/", import.meta.url));
const SITE = "plant-a";
const DEVICE = "edge-1";
const KEYS = generateKeyPair();

/** Copies the default model package into `dir`; with a version, rewrites the manifest and signs the copy. */
async function makePackage(dir: string, version?: string): Promise<string> {
  await mkdir(dir, { recursive: true });
  for (const name of await readdir(DEFAULT_MODEL)) {
    await copyFile(path.join(DEFAULT_MODEL, name), path.join(dir, name));
  }
  if (version !== undefined) {
    const manifestFile = path.join(dir, "manifest.json");
    const manifest = JSON.parse(await readFile(manifestFile, "utf8")) as { version: string };
    manifest.version = version;
    await writeFile(manifestFile, JSON.stringify(manifest, null, 2));
    await signPackage(dir, KEYS.privateKeyPem);
  }
  return dir;
}

async function waitFor(condition: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** The publishing side of a trainer process: state database, broker link, status tracker and publisher. */
interface TrainerSide {
  db: Database;
  link: MqttLink;
  tracker: DeviceTracker;
  publisher: Publisher;
  close(): Promise<void>;
}

/** A device with a receiver on its down/data topic that copies each completed bundle out. */
interface DeviceSide {
  link: MqttLink;
  receiver: TransferReceiver;
  received: { begin: BeginHeader; sha256: string }[];
  close(): Promise<void>;
}

describe("Publisher", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let broker: MosquittoBroker;
  let dataDir: string;
  let baseDir: string;
  const cleanups: (() => Promise<void>)[] = [];

  async function openTrainer(chunkSize = 64 * 1024): Promise<TrainerSide> {
    const db = openStateDb(dataDir);
    const link = new MqttLink({ url: broker.url, role: "trainer", reconnectPeriodMs: 200 });
    await link.connect({ timeoutMs: 10_000 });
    const tracker = new DeviceTracker({ link, db });
    const publisher = new Publisher({ link, db, tracker, devices: [`${SITE}/${DEVICE}`], chunkSize, ackTimeoutMs: 1_000, retryIntervalMs: 1_000 });
    await publisher.registerBase(baseDir);
    await tracker.start();
    publisher.start();
    let closed = false;
    const close = async (): Promise<void> => {
      if (closed) {
        return;
      }
      closed = true;
      await publisher.stop();
      await tracker.stop();
      await link.close();
      db.close();
    };
    cleanups.push(close);
    return { db, link, tracker, publisher, close };
  }

  async function connectDevice(options: { maxBytes?: number; model?: ModelInfo } = {}): Promise<DeviceSide> {
    const link = new MqttLink({
      url: broker.url,
      role: "agent",
      site: SITE,
      device: DEVICE,
      reconnectPeriodMs: 200,
      statusProvider: () => (options.model === undefined ? {} : { model: options.model }),
    });
    await link.connect({ timeoutMs: 10_000 });
    const received: DeviceSide["received"] = [];
    const receiver = new TransferReceiver({
      link,
      dataTopic: deviceTopic(SITE, DEVICE, "down/data"),
      dir: path.join(temp.dir, "device-transfers"),
      maxBytes: options.maxBytes ?? 100 * 1024 * 1024,
      onComplete: async (file, begin) => {
        received.push({ begin, sha256: createHash("sha256").update(await readFile(file)).digest("hex") });
      },
    });
    await receiver.start();
    let closed = false;
    const close = async (): Promise<void> => {
      if (closed) {
        return;
      }
      closed = true;
      await receiver.close();
      await link.close();
    };
    cleanups.push(close);
    return { link, receiver, received, close };
  }

  beforeEach(async () => {
    temp = makeTempDir("publisher");
    broker = await startMosquitto();
    dataDir = path.join(temp.dir, "data");
    await mkdir(dataDir);
    baseDir = await makePackage(path.join(temp.dir, "base"));
  });

  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) {
      await cleanup();
    }
    await broker.close();
    temp.remove();
  });

  it("records the base model as current", async () => {
    const trainer = await openTrainer();

    const current = trainer.publisher.current();

    expect(current?.version).toBe("1.0.0");
    expect(current?.source).toBe("base");
    expect(trainer.publisher.deliveries()).toEqual([]);
  });

  it("delivers a signed bundle to an online device", async () => {
    const device = await connectDevice();
    const trainer = await openTrainer();
    const packageDir = await makePackage(path.join(temp.dir, "pkg-1.1.0"), "1.1.0");
    const expectedSha = createHash("sha256").update(await packBundle(packageDir)).digest("hex");

    const model = await trainer.publisher.publish(packageDir, 7);

    await waitFor(() => trainer.publisher.deliveries(model.id)[0]?.state === "delivered", "the delivery");
    expect(device.received).toHaveLength(1);
    expect(device.received[0]!.sha256).toBe(expectedSha);
    expect(device.received[0]!.begin.kind).toBe("model");
    expect(device.received[0]!.begin.name).toBe("sortline-trashnet-1.1.0.slpkg");
    expect(device.received[0]!.begin.meta).toEqual({ name: "sortline-trashnet", version: "1.1.0", sha256: model.modelSha256, deploy: true });
    const [delivery] = trainer.publisher.deliveries(model.id);
    expect(delivery!.attempts).toBe(1);
    expect(delivery!.deliveredAt).not.toBeNull();
    expect(model.runId).toBe(7);
    expect(trainer.publisher.current()?.version).toBe("1.1.0");
  });

  it("resumes a delivery after a trainer restart", async () => {
    const device = await connectDevice();
    let trainer = await openTrainer(16 * 1024);
    const packageDir = await makePackage(path.join(temp.dir, "pkg-1.1.0"), "1.1.0");
    const bundle = await packBundle(packageDir);
    const chunks = Math.ceil(bundle.length / (16 * 1024));

    const model = await trainer.publisher.publish(packageDir);
    await waitFor(() => device.receiver.stats.chunksStored >= 100, "the first 100 chunks on the device");
    await trainer.close();

    const stateDb = openStateDb(dataDir);
    const stopped = stateDb.prepare("SELECT state FROM deliveries WHERE model_id = ?").all(model.id);
    stateDb.close();
    expect(stopped).toEqual([{ state: "pending" }]);
    expect(device.received).toHaveLength(0);
    trainer = await openTrainer(16 * 1024);
    await waitFor(() => trainer.publisher.deliveries(model.id)[0]?.state === "delivered", "the resumed delivery", 60_000);

    expect(device.received).toHaveLength(1);
    expect(device.received[0]!.sha256).toBe(createHash("sha256").update(bundle).digest("hex"));
    // Each chunk was stored once: the second trainer sent only the chunks the device lacked.
    expect(device.receiver.stats.chunksStored).toBe(chunks);
    expect(trainer.publisher.deliveries(model.id)[0]!.attempts).toBe(2);
  });

  it("waits for an offline device and sends only the newest model", async () => {
    const trainer = await openTrainer();
    const first = await trainer.publisher.publish(await makePackage(path.join(temp.dir, "pkg-1.1.0"), "1.1.0"));
    const second = await trainer.publisher.publish(await makePackage(path.join(temp.dir, "pkg-1.2.0"), "1.2.0"));

    expect(trainer.publisher.deliveries(first.id)[0]!.state).toBe("superseded");
    expect(trainer.publisher.deliveries(second.id)[0]!.state).toBe("pending");
    expect(trainer.publisher.deliveries(second.id)[0]!.attempts).toBe(0);

    const device = await connectDevice();
    await waitFor(() => trainer.publisher.deliveries(second.id)[0]?.state === "delivered", "the delivery after the device came online");

    expect(device.received.map((item) => item.begin.meta.version)).toEqual(["1.2.0"]);
    expect(trainer.publisher.deliveries(first.id)[0]!.state).toBe("superseded");
  });

  it("records a bundle the device rejects as failed", async () => {
    await connectDevice({ maxBytes: 1_000 });
    const trainer = await openTrainer();

    const model = await trainer.publisher.publish(await makePackage(path.join(temp.dir, "pkg-1.1.0"), "1.1.0"));

    await waitFor(() => trainer.publisher.deliveries(model.id)[0]?.state === "failed", "the failed delivery");
    expect(trainer.publisher.deliveries(model.id)[0]!.error).toMatch(/exceeds the receiver limit of 1000 bytes/);
  });

  it("skips a device that already runs the model", async () => {
    const packageDir = await makePackage(path.join(temp.dir, "pkg-1.1.0"), "1.1.0");
    const manifest = JSON.parse(await readFile(path.join(packageDir, "manifest.json"), "utf8")) as { name: string; file: { sha256: string } };
    const device = await connectDevice({ model: { name: manifest.name, version: "1.1.0", sha256: manifest.file.sha256 } });
    const trainer = await openTrainer();

    const model = await trainer.publisher.publish(packageDir);

    await waitFor(() => trainer.publisher.deliveries(model.id)[0]?.state === "delivered", "the delivery record");
    expect(trainer.publisher.deliveries(model.id)[0]!.attempts).toBe(0);
    expect(device.received).toEqual([]);
  });
});
