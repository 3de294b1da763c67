import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { createLogger } from "../../src/lib/log.js";
import { Outbox, type OutboxItem } from "../../src/mining/outbox.js";
import { Uplink, type UplinkOptions } from "../../src/mining/uplink.js";
import { makeTempDir } from "../audit/helpers.js";
import { makeExample, T0, waitFor } from "./helpers.js";

/** Backoff short enough that retries happen within a test, with no jitter. */
const FAST: Partial<UplinkOptions> = { initialBackoffMs: 5, maxBackoffMs: 20, idlePollMs: 10, random: () => 0 };

/** A fake trainer: records what it received and fails or hangs on request. */
class FakeTrainer {
  readonly received: string[] = [];
  readonly attempts = new Map<string, number>();
  inFlight = 0;
  maxInFlight = 0;
  /** Frame ids whose sends reject. */
  readonly rejecting = new Set<string>();
  /** Sends of these frame ids never settle. */
  readonly hanging = new Set<string>();
  /** Number of sends that reject before the trainer starts accepting. */
  failFirst = 0;

  readonly send = async (item: OutboxItem): Promise<void> => {
    const frameId = item.meta.frameId;
    this.attempts.set(frameId, (this.attempts.get(frameId) ?? 0) + 1);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await new Promise((resolve) => setTimeout(resolve, 2));
      if (this.hanging.has(frameId)) {
        await new Promise(() => {});
      }
      if (this.failFirst > 0) {
        this.failFirst--;
        throw new Error("broker unreachable");
      }
      if (this.rejecting.has(frameId)) {
        throw new Error(`trainer rejected ${frameId}`);
      }
      this.received.push(frameId);
    } finally {
      this.inFlight--;
    }
  };
}

function storedFrameIds(outbox: Outbox): string[] {
  const ids: string[] = [];
  const seen: number[] = [];
  for (let item = outbox.next(); item; item = outbox.next(seen)) {
    ids.push(item.meta.frameId);
    seen.push(item.id);
  }
  return ids.sort();
}

describe("Uplink", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let file: string;
  let outbox: Outbox;
  let trainer: FakeTrainer;
  const uplinks: Uplink[] = [];
  const startUplink = (options: Partial<UplinkOptions> = {}): Uplink => {
    const uplink = new Uplink({ outbox, send: trainer.send, ...FAST, ...options });
    uplinks.push(uplink);
    uplink.start();
    return uplink;
  };
  const fill = (count: number, prefix = "item"): string[] =>
    Array.from({ length: count }, (_, index) => {
      const id = `${prefix}-${index}`;
      outbox.add(makeExample(id, count - index, 500, T0 + index));
      return id;
    });

  beforeEach(() => {
    temp = makeTempDir("uplink");
    file = path.join(temp.dir, "outbox.db");
    outbox = Outbox.open(file, { maxBytes: 10_000_000, maxItems: 1_000 });
    trainer = new FakeTrainer();
  });

  afterEach(async () => {
    for (const uplink of uplinks.splice(0)) {
      await uplink.stop();
    }
    outbox.close();
    temp.remove();
  });

  it("sends everything in priority order", async () => {
    const ids = fill(5);

    startUplink();
    await waitFor(() => trainer.received.length === 5, "five sends");

    expect(trainer.received).toEqual(ids);
    expect(outbox.stats()).toMatchObject({ items: 0, acked: 5 });
  });

  it("deletes only acknowledged items", async () => {
    const ids = fill(6);
    trainer.rejecting.add(ids[1]!);
    trainer.rejecting.add(ids[4]!);

    const uplink = startUplink({ initialBackoffMs: 1_000, maxBackoffMs: 1_000 });
    await waitFor(() => trainer.received.length === 1, "the first send");
    // Each rejection starts a 1 s backoff; drainNow ends it at once.
    while (trainer.received.length < 4) {
      uplink.drainNow();
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await uplink.stop();

    expect(trainer.received.sort()).toEqual([ids[0], ids[2], ids[3], ids[5]].sort());
    expect(storedFrameIds(outbox)).toEqual([ids[1], ids[4]].sort());
    expect(uplink.stats.failed).toBeGreaterThanOrEqual(2);
  });

  it("sends other items while one is rejected", async () => {
    const ids = fill(4);
    trainer.rejecting.add(ids[0]!);

    const uplink = startUplink();
    await waitFor(() => trainer.received.length === 3, "three sends");

    expect(trainer.received).toEqual(ids.slice(1));
    expect(storedFrameIds(outbox)).toEqual([ids[0]]);
    expect(uplink.stats.failed).toBeGreaterThanOrEqual(1);
  });

  it("retries after failed sends", async () => {
    const ids = fill(2);
    trainer.failFirst = 3;

    const uplink = startUplink();
    await waitFor(() => trainer.received.length === 2, "both sends");

    // A failed item is held back for its own backoff, so the two items take turns.
    expect(trainer.received.sort()).toEqual(ids.sort());
    expect(trainer.attempts.get(ids[0]!)! + trainer.attempts.get(ids[1]!)!).toBe(5);
    expect(uplink.stats).toMatchObject({ sent: 2, failed: 3, consecutiveFailures: 0 });
    expect(outbox.stats().items).toBe(0);
  });

  it("backs off exponentially while sends fail", async () => {
    fill(1);
    trainer.failFirst = 1_000;
    const warnings: { failures?: number; retryInMs?: number }[] = [];
    const logger = createLogger({ level: "warn", destination: { write: (line: string) => warnings.push(JSON.parse(line)) } });

    const full = startUplink({ initialBackoffMs: 10, maxBackoffMs: 40, random: () => 1, logger });
    await waitFor(() => warnings.length >= 5, "five failures");
    await full.stop();

    // With random() = 1 the delay is the whole ceiling: 10, 20, 40, then capped at 40 ms.
    expect(warnings.slice(0, 5).map((warning) => warning.retryInMs)).toEqual([10, 20, 40, 40, 40]);
    expect(warnings.slice(0, 5).map((warning) => warning.failures)).toEqual([1, 2, 3, 4, 5]);
    expect(outbox.stats().items).toBe(1);
  });

  it("jitters the backoff down to half", async () => {
    fill(1);
    trainer.failFirst = 1_000;
    const warnings: { retryInMs?: number }[] = [];
    const logger = createLogger({ level: "warn", destination: { write: (line: string) => warnings.push(JSON.parse(line)) } });

    startUplink({ initialBackoffMs: 10, maxBackoffMs: 40, random: () => 0, logger });
    await waitFor(() => warnings.length >= 3, "three failures");

    expect(warnings.slice(0, 3).map((warning) => warning.retryInMs)).toEqual([5, 10, 20]);
  });

  it("keeps unsent items across a restart", async () => {
    const ids = fill(5);
    trainer.hanging.add(ids[2]!);

    const first = startUplink({ sendTimeoutMs: 200 });
    await waitFor(() => trainer.received.length === 2 && (trainer.attempts.get(ids[2]!) ?? 0) >= 1, "two sends and the hanging one");
    await first.stop();
    outbox.close();

    outbox = Outbox.open(file, { maxBytes: 10_000_000, maxItems: 1_000 });
    expect(storedFrameIds(outbox)).toEqual(ids.slice(2).sort());

    trainer.hanging.clear();
    startUplink();
    await waitFor(() => trainer.received.length === 5, "all five sends");

    expect(trainer.received).toEqual(ids);
    expect(outbox.stats().items).toBe(0);
  });

  it("counts a send past its timeout as failed", async () => {
    const ids = fill(1);
    trainer.hanging.add(ids[0]!);

    const uplink = startUplink({ sendTimeoutMs: 30, initialBackoffMs: 60_000, maxBackoffMs: 60_000 });
    await waitFor(() => uplink.stats.failed === 1, "the timeout");

    expect(uplink.stats.inFlight).toBe(0);
    expect(storedFrameIds(outbox)).toEqual(ids);
  });

  it("runs two sends at once", async () => {
    fill(8);

    startUplink({ concurrency: 2 });
    await waitFor(() => trainer.received.length === 8, "eight sends");

    expect(trainer.maxInFlight).toBe(2);
    expect(new Set(trainer.received).size).toBe(8);
    expect([...trainer.attempts.values()].every((count) => count === 1)).toBe(true);
  });

  it("sends items added while idle", async () => {
    const uplink = startUplink({ idlePollMs: 60_000 });
    await new Promise((resolve) => setTimeout(resolve, 20));

    fill(1, "late");
    uplink.drainNow();
    await waitFor(() => trainer.received.length === 1, "the late send");

    expect(trainer.received).toEqual(["late-0"]);
  });

  it("rejects invalid options", () => {
    expect(() => new Uplink({ outbox, send: trainer.send, concurrency: 3 as 2 })).toThrow(/concurrency 3 is invalid/);
    expect(() => new Uplink({ outbox, send: trainer.send, initialBackoffMs: -1 })).toThrow(/initialBackoffMs -1 is invalid/);
  });
});
