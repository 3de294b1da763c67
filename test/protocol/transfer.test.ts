import { randomBytes } from "node:crypto";
import { copyFile, cp, mkdir, readdir, readFile } from "node:fs/promises";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { MqttLink, type MqttLinkOptions, type PublishOptions } from "../../src/protocol/link.js";
import { decodeTransferAck, type ChunkRange, type TransferAck } from "../../src/protocol/messages.js";
import { deviceTopic, fleetPattern } from "../../src/protocol/topics.js";
import {
  decodeFrame,
  encodeFrame,
  sha256Hex,
  TransferError,
  TransferReceiver,
  TransferSender,
  type BeginHeader,
  type TransferReceiverOptions,
  type TransferResult,
} from "../../src/protocol/transfer.js";
import { startAedes, startMosquitto } from "../helpers/mosquitto.js";
import { LinkPool, makeTempDir, sleep, waitFor } from "./helpers.js";

const SITE = "plant-a";
const MB = 1024 * 1024;

interface Broker {
  url: string;
  stop(): Promise<void>;
  restart(): Promise<void>;
  close(): Promise<void>;
}

const BROKERS: { name: string; protocolVersion: 4 | 5; start: () => Promise<Broker> }[] = [
  { name: "Mosquitto, MQTT 5", protocolVersion: 5, start: () => startMosquitto() },
  { name: "aedes, MQTT 3.1.1", protocolVersion: 4, start: () => startAedes() },
];

/** Indices in inclusive ranges. */
function indicesOf(ranges: readonly ChunkRange[]): number[] {
  return ranges.flatMap(([first, last]) => Array.from({ length: last - first + 1 }, (_, offset) => first + offset));
}

function sum(values: readonly number[]): number {
  return values.reduce((total, value) => total + value, 0);
}

/** A link that flips one payload byte of the first frame it publishes for chunk `index`. */
class CorruptingLink extends MqttLink {
  corrupted = 0;

  constructor(
    options: MqttLinkOptions,
    private readonly index: number,
  ) {
    super(options);
  }

  override publish(topic: string, payload: Buffer | string | object, options?: PublishOptions): Promise<void> {
    if (this.corrupted === 0 && Buffer.isBuffer(payload)) {
      const decoded = decodeFrame(payload);
      if (decoded.ok && decoded.value.header.type === "chunk" && decoded.value.header.index === this.index) {
        const copy = Buffer.from(payload);
        copy[copy.length - 1] = copy[copy.length - 1]! ^ 0xff;
        this.corrupted++;
        return super.publish(topic, copy, options);
      }
    }
    return super.publish(topic, payload, options);
  }
}

/** Completed files, copied out of the receiver by onComplete. */
interface Stored {
  file: string;
  begin: BeginHeader;
  site: string | undefined;
  device: string | undefined;
}

describe.each(BROKERS)("transfers on $name", ({ protocolVersion, start }) => {
  let broker: Broker;
  let temp: ReturnType<typeof makeTempDir>;
  const pool = new LinkPool();
  const receivers: TransferReceiver[] = [];
  const senders: TransferSender[] = [];
  let stored: Stored[];

  beforeEach(async () => {
    broker = await start();
    temp = makeTempDir("transfer");
    stored = [];
  });

  afterEach(async () => {
    await Promise.all(senders.splice(0).map((sender) => sender.close()));
    await Promise.all(receivers.splice(0).map((receiver) => receiver.close()));
    await pool.closeAll();
    await broker.close();
    temp.remove();
  });

  const openAgent = (device: string): Promise<MqttLink> => pool.open({ url: broker.url, role: "agent", site: SITE, device, protocolVersion });
  const openTrainer = (): Promise<MqttLink> => pool.open({ url: broker.url, role: "trainer", protocolVersion });

  async function startReceiver(link: MqttLink, overrides: Partial<TransferReceiverOptions> = {}): Promise<TransferReceiver> {
    const outDir = path.join(temp.dir, "stored");
    const receiver = new TransferReceiver({
      link,
      dataTopic: fleetPattern("up/data"),
      dir: path.join(temp.dir, "receiver"),
      maxBytes: 16 * MB,
      onComplete: async (file, begin, source) => {
        const target = path.join(outDir, `${source.device}-${begin.name}`);
        await mkdir(outDir, { recursive: true });
        await copyFile(file, target);
        stored.push({ file: target, begin, site: source.site, device: source.device });
      },
      ...overrides,
    });
    receivers.push(receiver);
    await receiver.start();
    return receiver;
  }

  function makeSender(link: MqttLink): TransferSender {
    const sender = new TransferSender({ link });
    senders.push(sender);
    return sender;
  }

  function upload(device: string): { dataTopic: string; ackTopic: string } {
    return { dataTopic: deviceTopic(SITE, device, "up/data"), ackTopic: deviceTopic(SITE, device, "up/ack") };
  }

  it("5 MB upload arrives intact", async () => {
    const agent = await openAgent("cam-1");
    const receiver = await startReceiver(await openTrainer());
    const data = randomBytes(5 * MB);

    const result = await makeSender(agent).send({ ...upload("cam-1"), transferId: "ex-1", kind: "hard-example", name: "frame.jpg", data, meta: { label: "can" } });

    expect(result.chunks).toBe(80);
    expect(result.sendCounts.every((count) => count === 1)).toBe(true);
    expect(stored).toHaveLength(1);
    expect(stored[0]!.begin).toMatchObject({ transferId: "ex-1", kind: "hard-example", name: "frame.jpg", size: 5 * MB, meta: { label: "can" } });
    expect(stored[0]!.site).toBe(SITE);
    expect(stored[0]!.device).toBe("cam-1");
    expect((await readFile(stored[0]!.file)).equals(data)).toBe(true);
    expect(receiver.stats.transfersCompleted).toBe(1);
    expect(receiver.activeTransfers).toBe(0);
    expect(await readdir(path.join(temp.dir, "receiver", "active"))).toEqual([]);
  });

  it("several transfers at once", async () => {
    await startReceiver(await openTrainer(), { maxConcurrent: 8 });
    const devices = ["cam-1", "cam-2", "cam-3"];
    const payloads = devices.map((_, index) => randomBytes(300_000 + index * 1_000));
    const agents = await Promise.all(devices.map((device) => openAgent(device)));

    const results = await Promise.all(
      devices.flatMap((device, index) => {
        const sender = makeSender(agents[index]!);
        // Two transfers per device on one sender, so they share the ack topic.
        return ["a", "b"].map((suffix) =>
          sender.send({ ...upload(device), transferId: `ex-${suffix}`, kind: "hard-example", name: `${suffix}.jpg`, data: payloads[index]!, chunkSize: 16_384 }),
        );
      }),
    );

    expect(results).toHaveLength(6);
    expect(stored).toHaveLength(6);
    for (const entry of stored) {
      const index = devices.indexOf(entry.device!);
      expect((await readFile(entry.file)).equals(payloads[index]!), entry.file).toBe(true);
    }
  });

  it("resumes after a broker restart", async () => {
    const agent = await openAgent("cam-1");
    await startReceiver(await openTrainer());
    const data = randomBytes(5 * MB);
    let haveAtStop: ChunkRange[] | undefined;
    let outage: Promise<void> | undefined;

    const transfer = makeSender(agent).send({
      ...upload("cam-1"),
      transferId: "ex-restart",
      kind: "hard-example",
      name: "big.bin",
      data,
      chunkSize: 16_384,
      window: 4,
      ackTimeoutMs: 2_000,
      onProgress: ({ acknowledged, chunks, have }) => {
        if (!outage && acknowledged >= chunks / 4) {
          haveAtStop = have;
          outage = (async () => {
            await broker.stop();
            await sleep(2_000);
            await broker.restart();
          })();
        }
      },
    });
    const result = await transfer;
    await outage;

    const ackedBeforeStop = indicesOf(haveAtStop!);
    expect(ackedBeforeStop.length).toBeGreaterThan(0);
    expect(ackedBeforeStop.length).toBeLessThan(result.chunks);
    expect(ackedBeforeStop.map((index) => result.sendCounts[index])).toEqual(ackedBeforeStop.map(() => 1));
    expect(result.beginSends).toBeGreaterThanOrEqual(2);
    // Only chunks in flight around the outage are sent again, at most a few windows.
    expect(sum(result.sendCounts) - result.chunks).toBeLessThanOrEqual(4 * 4);
    expect((await readFile(stored[0]!.file)).equals(data)).toBe(true);
  });

  it("resumes after the receiver is recreated", async () => {
    const agent = await openAgent("cam-1");
    const trainer = await openTrainer();
    const first = await startReceiver(trainer);
    const data = randomBytes(2 * MB);
    let haveAtRestart: ChunkRange[] | undefined;
    let restart: Promise<TransferReceiver> | undefined;

    const result: TransferResult = await makeSender(agent).send({
      ...upload("cam-1"),
      transferId: "ex-receiver",
      kind: "hard-example",
      name: "big.bin",
      data,
      chunkSize: 16_384,
      window: 4,
      ackTimeoutMs: 1_000,
      onProgress: ({ acknowledged, chunks, have }) => {
        if (!restart && acknowledged >= chunks / 3) {
          haveAtRestart = have;
          restart = (async () => {
            await first.close();
            return startReceiver(trainer);
          })();
        }
      },
    });
    const second = await restart!;

    const ackedBeforeRestart = indicesOf(haveAtRestart!);
    expect(ackedBeforeRestart.length).toBeLessThan(result.chunks);
    expect(ackedBeforeRestart.map((index) => result.sendCounts[index])).toEqual(ackedBeforeRestart.map(() => 1));
    expect(second.stats.chunksStored).toBeLessThan(result.chunks - ackedBeforeRestart.length + 1);
    expect(second.stats.transfersCompleted).toBe(1);
    expect((await readFile(stored[0]!.file)).equals(data)).toBe(true);
  });

  it("resumes after a receiver crash", async () => {
    const agent = await openAgent("cam-1");
    const firstTrainer = await openTrainer();
    const first = await startReceiver(firstTrainer);
    const data = randomBytes(2 * MB);
    let haveAtCrash: ChunkRange[] | undefined;
    let crash: Promise<TransferReceiver> | undefined;

    const result = await makeSender(agent).send({
      ...upload("cam-1"),
      transferId: "ex-crash",
      kind: "hard-example",
      name: "big.bin",
      data,
      chunkSize: 16_384,
      window: 4,
      ackTimeoutMs: 1_000,
      onProgress: ({ acknowledged, chunks, have }) => {
        if (!crash && acknowledged >= chunks / 3) {
          haveAtCrash = have;
          crash = (async () => {
            // Drop the connection without a DISCONNECT and copy the state folder as it is on disk
            // at that moment. The copy is what a restarted process would find after a crash.
            firstTrainer.mqttClient!.end(true);
            await cp(path.join(temp.dir, "receiver"), path.join(temp.dir, "after-crash"), { recursive: true });
            return startReceiver(await openTrainer(), { dir: path.join(temp.dir, "after-crash") });
          })();
        }
      },
    });
    const second = await crash!;

    const ackedBeforeCrash = indicesOf(haveAtCrash!);
    expect(ackedBeforeCrash.length).toBeLessThan(result.chunks);
    expect(ackedBeforeCrash.map((index) => result.sendCounts[index])).toEqual(ackedBeforeCrash.map(() => 1));
    expect(second.stats.transfersCompleted).toBe(1);
    expect(first.stats.transfersCompleted).toBe(0);
    expect((await readFile(stored[0]!.file)).equals(data)).toBe(true);
  });
});

describe("transfer checks on Mosquitto", () => {
  let broker: Awaited<ReturnType<typeof startMosquitto>>;
  let temp: ReturnType<typeof makeTempDir>;
  const pool = new LinkPool();
  let receiver: TransferReceiver;
  let agent: MqttLink;
  let trainer: MqttLink;
  let sender: TransferSender;
  let acks: TransferAck[];
  let completed: { file: string; begin: BeginHeader; bytes: Buffer }[];
  let failOnComplete: Error | undefined;
  const DEVICE = "line-1";
  const dataTopic = deviceTopic(SITE, DEVICE, "down/data");
  const ackTopic = deviceTopic(SITE, DEVICE, "down/ack");

  beforeEach(async () => {
    broker = await startMosquitto();
    temp = makeTempDir("transfer-checks");
    agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device: DEVICE });
    trainer = await pool.open({ url: broker.url, role: "trainer" });
    completed = [];
    failOnComplete = undefined;
    receiver = new TransferReceiver({
      link: agent,
      dataTopic,
      dir: path.join(temp.dir, "receiver"),
      maxBytes: 1 * MB,
      maxConcurrent: 2,
      onComplete: async (file, begin) => {
        if (failOnComplete) {
          throw failOnComplete;
        }
        completed.push({ file, begin, bytes: await readFile(file) });
      },
    });
    await receiver.start();
    sender = new TransferSender({ link: trainer });
    acks = [];
    await trainer.subscribe(ackTopic, (_topic, payload) => {
      const decoded = decodeTransferAck(payload);
      if (!decoded.ok) {
        throw new Error(`invalid ack: ${decoded.error}`);
      }
      acks.push(decoded.value);
    });
  });

  afterEach(async () => {
    await sender.close();
    await receiver.close();
    await pool.closeAll();
    await broker.close();
    temp.remove();
  });

  function beginFor(data: Buffer, overrides: Partial<BeginHeader> = {}): BeginHeader {
    return { v: 1, type: "begin", transferId: "raw-1", kind: "model-package", name: "model.tar", size: data.length, sha256: sha256Hex(data), chunkSize: 1024, chunks: Math.ceil(data.length / 1024), meta: {}, ...overrides };
  }

  async function sendChunk(transferId: string, index: number, payload: Buffer, sha256 = sha256Hex(payload)): Promise<void> {
    await trainer.publish(dataTopic, encodeFrame({ v: 1, type: "chunk", transferId, index, sha256 }, payload));
  }

  it("model package download completes", async () => {
    const data = randomBytes(300_000);

    const result = await sender.send({ dataTopic, ackTopic, transferId: "model-1", kind: "model-package", name: "model.tar", data, meta: { version: "1.3.0" } });

    expect(result.sendCounts.every((count) => count === 1)).toBe(true);
    expect(completed).toHaveLength(1);
    expect(completed[0]!.bytes.equals(data)).toBe(true);
    expect(completed[0]!.begin.meta).toEqual({ version: "1.3.0" });
  });

  it("corrupted chunk is rejected", async () => {
    const data = randomBytes(2048);
    const chunk0 = data.subarray(0, 1024);
    const chunk1 = data.subarray(1024);
    await trainer.publish(dataTopic, encodeFrame(beginFor(data)));
    await waitFor(() => acks.length === 1, "the begin ack");

    const corrupted = Buffer.from(chunk0);
    corrupted[10] = corrupted[10]! ^ 0xff;
    await sendChunk("raw-1", 0, corrupted, sha256Hex(chunk0));
    await sendChunk("raw-1", 1, chunk1.subarray(0, 100));
    await sendChunk("raw-1", 7, chunk1);
    await waitFor(() => receiver.stats.chunksRejected === 3, "three rejected chunks");
    await sleep(400);

    expect(acks.every((ack) => ack.state === "partial" && ack.have.length === 0)).toBe(true);
    expect(receiver.stats.chunksStored).toBe(0);

    await sendChunk("raw-1", 0, chunk0);
    await sendChunk("raw-1", 1, chunk1);

    await waitFor(() => acks.some((ack) => ack.state === "complete"), "the complete ack");
    expect(completed[0]!.bytes.equals(data)).toBe(true);
  });

  it("sender re-sends a rejected chunk", async () => {
    const data = randomBytes(8 * 1024);
    const corrupting = new CorruptingLink({ url: broker.url, role: "trainer", reconnectPeriodMs: 200 }, 3);
    await corrupting.connect({ timeoutMs: 10_000 });
    const corruptingSender = new TransferSender({ link: corrupting });

    try {
      const result = await corruptingSender.send({ dataTopic, ackTopic, transferId: "mixed", kind: "model-package", name: "model.tar", data, chunkSize: 1024, ackTimeoutMs: 500 });

      expect(corrupting.corrupted).toBe(1);
      expect(receiver.stats.chunksRejected).toBe(1);
      expect(result.sendCounts).toEqual([1, 1, 1, 2, 1, 1, 1, 1]);
      expect(result.beginSends).toBe(2);
      expect(completed[0]!.bytes.equals(data)).toBe(true);
    } finally {
      await corruptingSender.close();
      await corrupting.close();
    }
  });

  it("wrong file sha256 ends failed", async () => {
    const data = randomBytes(2048);
    await trainer.publish(dataTopic, encodeFrame(beginFor(data, { sha256: sha256Hex(Buffer.from("other")) })));
    await waitFor(() => acks.length === 1, "the begin ack");

    await sendChunk("raw-1", 0, data.subarray(0, 1024));
    await sendChunk("raw-1", 1, data.subarray(1024));

    await waitFor(() => acks.some((ack) => ack.state === "failed"), "the failed ack");
    const failed = acks.find((ack) => ack.state === "failed")!;
    expect(failed.error).toMatch(/^sha256 mismatch: begin announced [0-9a-f]{64}, the received data hashes to [0-9a-f]{64}/);
    expect(completed).toEqual([]);
    expect(receiver.activeTransfers).toBe(0);
    expect(await readdir(path.join(temp.dir, "receiver", "active"))).toEqual([]);
    expect(receiver.stats.transfersFailed).toBe(1);
  });

  it("oversized transfer is rejected", async () => {
    const send = sender.send({ dataTopic, ackTopic, transferId: "huge", kind: "model-package", name: "model.tar", data: Buffer.alloc(MB + 1) });

    await expect(send).rejects.toThrow(TransferError);
    await expect(send).rejects.toThrow(/receiver rejected transfer huge: transfer of 1048577 bytes exceeds the receiver limit of 1048576 bytes/);
    await expect(send.catch((error: TransferError) => error.receiverError)).resolves.toMatch(/exceeds the receiver limit/);
    expect(completed).toEqual([]);
  });

  it("repeated begin after completion is complete", async () => {
    const data = randomBytes(10_000);
    await sender.send({ dataTopic, ackTopic, transferId: "again", kind: "model-package", name: "model.tar", data });

    const second = await sender.send({ dataTopic, ackTopic, transferId: "again", kind: "model-package", name: "model.tar", data });

    expect(second.sendCounts.every((count) => count === 0)).toBe(true);
    expect(completed).toHaveLength(1);
  });

  it("reused id with other content fails", async () => {
    await sender.send({ dataTopic, ackTopic, transferId: "reused", kind: "model-package", name: "model.tar", data: randomBytes(100) });

    const second = sender.send({ dataTopic, ackTopic, transferId: "reused", kind: "model-package", name: "model.tar", data: randomBytes(100) });

    await expect(second).rejects.toThrow(/already completed with different content/);
  });

  it("onComplete error fails the transfer", async () => {
    failOnComplete = new Error("disk full");

    const send = sender.send({ dataTopic, ackTopic, transferId: "nospace", kind: "model-package", name: "model.tar", data: randomBytes(5000) });

    await expect(send).rejects.toThrow(/receiver could not store the file: disk full/);
    expect(receiver.activeTransfers).toBe(0);
  });

  it("zero-byte file completes", async () => {
    const result = await sender.send({ dataTopic, ackTopic, transferId: "empty", kind: "model-package", name: "empty.bin", data: Buffer.alloc(0) });

    expect(result.chunks).toBe(0);
    expect(completed[0]!.bytes.length).toBe(0);
  });

  it("busy receiver rejects a third transfer", async () => {
    await trainer.publish(dataTopic, encodeFrame(beginFor(Buffer.alloc(2048), { transferId: "open-1" })));
    await trainer.publish(dataTopic, encodeFrame(beginFor(Buffer.alloc(2048), { transferId: "open-2" })));
    await waitFor(() => receiver.activeTransfers === 2, "two open transfers");

    const send = sender.send({ dataTopic, ackTopic, transferId: "third", kind: "model-package", name: "model.tar", data: randomBytes(100) });

    await expect(send).rejects.toThrow(/receiver busy: 2 transfers in progress \(maxConcurrent 2\)/);
  });

  it("fails without a receiver", async () => {
    const send = sender.send({
      dataTopic: deviceTopic(SITE, "nobody", "down/data"),
      ackTopic: deviceTopic(SITE, "nobody", "down/ack"),
      transferId: "lost",
      kind: "model-package",
      name: "model.tar",
      data: randomBytes(100),
      ackTimeoutMs: 200,
      maxAttempts: 2,
    });

    await expect(send).rejects.toThrow(/transfer lost made no progress after 2 attempts of 200 ms \(0 of 1 chunks acknowledged\)/);
  });

  it("rejects invalid requests", async () => {
    const base = { dataTopic, ackTopic, transferId: "ok", kind: "k", name: "n.bin", data: Buffer.alloc(10) };

    await expect(sender.send({ ...base, transferId: "../x" })).rejects.toThrow(/transferId "..\/x" must match/);
    await expect(sender.send({ ...base, name: "a/b" })).rejects.toThrow(/name "a\/b" must match/);
    await expect(sender.send({ ...base, chunkSize: 0 })).rejects.toThrow(/chunkSize 0 must be a whole number/);
    await expect(sender.send({ ...base, window: 0 })).rejects.toThrow(/window 0 must be a whole number >= 1/);
  });

  it("partial state survives on disk", async () => {
    const data = randomBytes(4096);
    await trainer.publish(dataTopic, encodeFrame(beginFor(data, { transferId: "disk" })));
    await sendChunk("disk", 0, data.subarray(0, 1024));
    await sendChunk("disk", 2, data.subarray(2048, 3072));
    await waitFor(() => acks.some((ack) => ack.have.length === 2), "the ack of chunks 0 and 2");

    const [key] = await readdir(path.join(temp.dir, "receiver", "active"));
    const state = JSON.parse(await readFile(path.join(temp.dir, "receiver", "active", key!, "state.json"), "utf8")) as { have: ChunkRange[]; begin: BeginHeader };
    expect(state.have).toEqual([
      [0, 0],
      [2, 2],
    ]);
    expect(state.begin.transferId).toBe("disk");
  });

  it("stale partial transfer is deleted", async () => {
    const staleDevice = "line-stale";
    const staleTopic = deviceTopic(SITE, staleDevice, "down/data");
    const staleDir = path.join(temp.dir, "stale");
    const staleAgent = await pool.open({ url: broker.url, role: "agent", site: SITE, device: staleDevice });
    const stale = new TransferReceiver({ link: staleAgent, dataTopic: staleTopic, dir: staleDir, maxBytes: MB, staleAfterMs: 300, onComplete: async () => {} });
    await stale.start();

    try {
      await trainer.publish(staleTopic, encodeFrame(beginFor(Buffer.alloc(4096), { transferId: "abandoned" })));
      await waitFor(() => stale.activeTransfers === 1, "the transfer to start");

      await waitFor(() => stale.activeTransfers === 0, "the sweep", 5_000);
      expect(await readdir(path.join(staleDir, "active"))).toEqual([]);
    } finally {
      await stale.close();
    }
  });
});
