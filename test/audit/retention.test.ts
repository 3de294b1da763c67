import { statSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { AuditStore } from "../../src/audit/store.js";
import type { DecisionRecord } from "../../src/audit/types.js";
import { makeFailedRecord, makeRecord, makeTempDir, T0 } from "./helpers.js";

const DAY = 86_400_000;

/** `count` decisions of about 1 KiB each, one per second from `start`. */
function bulky(count: number, start: number, prefix = "f"): DecisionRecord[] {
  return Array.from({ length: count }, (_, index) =>
    makeFailedRecord(`${prefix}-${index}`, `decode failed: ${"z".repeat(1_000)}`, { decidedAt: start + index * 1_000 }),
  );
}

describe("AuditStore.prune", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let file: string;
  let store: AuditStore;

  beforeEach(() => {
    temp = makeTempDir("audit-retention");
    file = path.join(temp.dir, "audit.db");
    store = AuditStore.open(file);
  });

  afterEach(() => {
    store.close();
    temp.remove();
  });

  it("deletes rows older than maxAgeDays", async () => {
    const now = T0 + 30 * DAY;
    store.recordBatch([
      makeRecord("day-0", { decidedAt: T0 }),
      makeRecord("day-20", { decidedAt: T0 + 20 * DAY }),
      makeRecord("day-24", { decidedAt: T0 + 24 * DAY }),
      makeRecord("day-29", { decidedAt: T0 + 29 * DAY }),
    ]);

    const result = await store.prune({ maxAgeDays: 7 }, { now });

    expect(result.deletedByAge).toBe(2);
    expect(result.deletedBySize).toBe(0);
    expect(store.query().map((row) => row.frameId)).toEqual(["day-29", "day-24"]);
  });

  it("deletes age in chunks", async () => {
    store.recordBatch(bulky(1_000, T0));

    const result = await store.prune({ maxAgeDays: 1 }, { now: T0 + 2 * DAY, chunkRows: 64 });

    expect(result.deletedByAge).toBe(1_000);
    expect(store.stats().rows).toBe(0);
  });

  it("deletes oldest rows until under maxBytes", async () => {
    store.recordBatch(bulky(3_000, T0));
    const maxBytes = 1024 * 1024;
    expect(store.stats().bytesInUse).toBeGreaterThan(3 * maxBytes);

    const result = await store.prune({ maxBytes }, { chunkRows: 200 });

    expect(result.deletedBySize).toBeGreaterThan(1_500);
    expect(result.bytesInUse).toBeLessThanOrEqual(maxBytes);
    const keptIds = store.query({ limit: 3_000 }).map((row) => Number(row.frameId.slice(2)));
    expect(keptIds).toHaveLength(3_000 - result.deletedBySize);
    expect(Math.min(...keptIds)).toBe(result.deletedBySize);
    expect(Math.max(...keptIds)).toBe(2_999);
  });

  it("shrinks the file after pruning by size", async () => {
    store.recordBatch(bulky(4_000, T0));
    store.close();
    store = AuditStore.open(file);
    const before = statSync(file).size;
    expect(before).toBeGreaterThan(4 * 1024 * 1024);

    const result = await store.prune({ maxBytes: 512 * 1024 });

    expect(result.vacuumedPages).toBeGreaterThan(0);
    expect(store.stats().freeBytes).toBe(0);
    const after = statSync(file).size;
    expect(after).toBeLessThan(before / 4);
    expect(after).toBeLessThanOrEqual(512 * 1024 + 64 * 1024);
  });

  it("applies age before size", async () => {
    const now = T0 + 10 * DAY;
    store.recordBatch(bulky(100, T0, "old"));
    store.recordBatch(bulky(100, now - DAY, "new"));

    const result = await store.prune({ maxAgeDays: 5, maxBytes: 1024 * 1024 * 1024 }, { now });

    expect(result.deletedByAge).toBe(100);
    expect(result.deletedBySize).toBe(0);
    expect(store.query({ limit: 200 }).every((row) => row.frameId.startsWith("new-"))).toBe(true);
  });

  it("stops at an empty table", async () => {
    store.recordBatch(bulky(10, T0));

    const result = await store.prune({ maxBytes: 1 });

    expect(result.deletedBySize).toBe(10);
    expect(store.stats().rows).toBe(0);
  });

  it("lets recordBatch run between chunks", async () => {
    store.recordBatch(bulky(2_000, T0));
    const order: string[] = [];

    const pruning = store.prune({ maxAgeDays: 1 }, { now: T0 + 2 * DAY, chunkRows: 100 }).then(() => order.push("prune done"));
    setImmediate(() => {
      store.recordBatch([makeRecord("live", { decidedAt: T0 + 2 * DAY })]);
      order.push("recorded");
    });
    await pruning;

    expect(order).toEqual(["recorded", "prune done"]);
    expect(store.query().map((row) => row.frameId)).toEqual(["live"]);
  });

  it("returns the running prune to a second call", async () => {
    store.recordBatch(bulky(500, T0));

    const first = store.prune({ maxAgeDays: 1 }, { now: T0 + 2 * DAY, chunkRows: 50 });
    const second = store.prune({ maxAgeDays: 1 }, { now: T0 + 2 * DAY, chunkRows: 50 });

    expect(second).toBe(first);
    expect((await first).deletedByAge).toBe(500);
  });

  it("rejects invalid limits", async () => {
    await expect(store.prune({ maxAgeDays: -1 })).rejects.toThrow("prune maxAgeDays -1 is invalid; expected a number of days >= 0");
    await expect(store.prune({ maxBytes: Number.NaN })).rejects.toThrow(RangeError);
    await expect(store.prune({ maxBytes: 1 }, { chunkRows: 0 })).rejects.toThrow(/chunkRows 0 is invalid/);
  });

  it("rejects after close", async () => {
    store.close();

    await expect(store.prune({ maxAgeDays: 1 })).rejects.toThrow(/is closed/);
  });

  it("stops when the store closes", async () => {
    store.recordBatch(bulky(1_000, T0));

    const pruning = store.prune({ maxAgeDays: 1 }, { now: T0 + 2 * DAY, chunkRows: 100 });
    setImmediate(() => store.close());
    const result = await pruning;

    expect(result.deletedByAge).toBeLessThan(1_000);
    store = AuditStore.open(file);
    expect(store.stats().rows).toBe(1_000 - result.deletedByAge);
  });
});
