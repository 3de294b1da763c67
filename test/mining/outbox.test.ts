import path from "node:path";

import Database from "better-sqlite3";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { Outbox, OutboxOpenError, OutboxWriteError, type OutboxOptions } from "../../src/mining/outbox.js";
import { createRandom } from "../../src/mining/selector.js";
import { makeTempDir } from "../audit/helpers.js";
import { makeExample, T0 } from "./helpers.js";

/** Payload bytes of `makeExample(id, priority, jpegBytes)`: image, 16 float32 values, metadata JSON. */
function payloadBytes(frameId: string, priority: number, jpegBytes: number): number {
  const example = makeExample(frameId, priority, jpegBytes);
  return jpegBytes + 16 * 4 + Buffer.byteLength(JSON.stringify(example.meta));
}

/** Reads the stored rows straight from the file, bypassing the Outbox class. */
function storedRows(file: string): { id: number; priority: number; bytes: number; frameId: string }[] {
  const db = new Database(file, { readonly: true });
  try {
    const rows = db.prepare("SELECT id, priority, bytes, meta FROM examples ORDER BY id").all() as { id: number; priority: number; bytes: number; meta: string }[];
    return rows.map((row) => ({ id: row.id, priority: row.priority, bytes: row.bytes, frameId: (JSON.parse(row.meta) as { frameId: string }).frameId }));
  } finally {
    db.close();
  }
}

describe("Outbox", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let file: string;
  const open: Outbox[] = [];
  const openOutbox = (options: Partial<OutboxOptions> = {}): Outbox => {
    const outbox = Outbox.open(file, { maxBytes: 10_000_000, maxItems: 1_000, ...options });
    open.push(outbox);
    return outbox;
  };

  beforeEach(() => {
    temp = makeTempDir("outbox");
    file = path.join(temp.dir, "outbox.db");
  });

  afterEach(() => {
    for (const outbox of open.splice(0)) {
      outbox.close();
    }
    temp.remove();
  });

  it("returns items by priority, oldest first", () => {
    const outbox = openOutbox();
    outbox.add(makeExample("low", 1, 100, T0));
    outbox.add(makeExample("high-late", 5, 100, T0 + 2));
    outbox.add(makeExample("high-early", 5, 100, T0 + 1));

    const first = outbox.next()!;
    const second = outbox.next([first.id])!;
    const third = outbox.next([first.id, second.id])!;

    expect(first.meta.frameId).toBe("high-early");
    expect(second.meta.frameId).toBe("high-late");
    expect(third.meta.frameId).toBe("low");
    expect(outbox.next([first.id, second.id, third.id])).toBeUndefined();
  });

  it("stores image, embedding and metadata", () => {
    const outbox = openOutbox();
    const example = makeExample("round-trip", 2.5, 3_000, T0);

    const result = outbox.add(example);
    const item = outbox.next()!;

    expect(result).toEqual({ stored: true, id: item.id, evicted: 0 });
    expect(item.jpeg.equals(example.jpeg)).toBe(true);
    expect(Array.from(item.embedding)).toEqual(Array.from(example.embedding));
    expect(item.meta).toEqual(example.meta);
    expect(item.priority).toBe(2.5);
    expect(item.createdAt).toBe(T0);
    expect(item.bytes).toBe(payloadBytes("round-trip", 2.5, 3_000));
  });

  it("deletes an item on ack", () => {
    const outbox = openOutbox();
    const { id } = outbox.add(makeExample("acked", 1)) as { id: number };

    expect(outbox.ack(id)).toBe(true);
    expect(outbox.ack(id)).toBe(false);
    expect(outbox.next()).toBeUndefined();
    expect(outbox.stats()).toMatchObject({ items: 0, bytes: 0, added: 1, acked: 1 });
  });

  it("evicts lowest priority, oldest first", () => {
    const outbox = openOutbox({ maxItems: 3 });
    outbox.add(makeExample("p1-old", 1, 100, T0));
    outbox.add(makeExample("p2", 2, 100, T0 + 1));
    outbox.add(makeExample("p1-new", 1, 100, T0 + 2));

    const better = outbox.add(makeExample("p1.5", 1.5, 100, T0 + 3));
    expect(better).toMatchObject({ stored: true, evicted: 1 });
    expect(storedRows(file).map((row) => row.frameId)).toEqual(["p2", "p1-new", "p1.5"]);

    const equal = outbox.add(makeExample("p1-newest", 1, 100, T0 + 4));
    expect(equal).toMatchObject({ stored: true, evicted: 1 });
    expect(storedRows(file).map((row) => row.frameId)).toEqual(["p2", "p1.5", "p1-newest"]);

    const worse = outbox.add(makeExample("p0.5", 0.5, 100, T0 + 5));
    expect(worse).toEqual({ stored: false, reason: "lower-priority", evicted: 0 });
    expect(storedRows(file).map((row) => row.frameId)).toEqual(["p2", "p1.5", "p1-newest"]);
    expect(outbox.stats()).toMatchObject({ items: 3, added: 5, evicted: 2, rejected: 1 });
  });

  it("never evicts a higher priority for room", () => {
    const small = payloadBytes("a", 3, 1_000);
    const outbox = openOutbox({ maxBytes: small * 2 + 500 });
    outbox.add(makeExample("a", 3, 1_000, T0));
    outbox.add(makeExample("b", 1, 1_000, T0 + 1));

    // Room for the large item needs both stored items gone; "a" has the higher priority.
    const large = outbox.add(makeExample("large", 2, 1_800, T0 + 2));

    expect(large).toEqual({ stored: false, reason: "lower-priority", evicted: 0 });
    expect(storedRows(file).map((row) => row.frameId)).toEqual(["a", "b"]);
  });

  it("rejects an item larger than maxBytes", () => {
    const outbox = openOutbox({ maxBytes: 2_000 });

    const result = outbox.add(makeExample("huge", 9, 5_000));

    expect(result).toEqual({ stored: false, reason: "too-large", evicted: 0 });
    expect(outbox.stats()).toMatchObject({ items: 0, rejected: 1 });
  });

  it("holds the byte bound under a flood", () => {
    const maxBytes = 200_000;
    const outbox = openOutbox({ maxBytes });
    const reader = new Database(file, { readonly: true });
    const priorities = (): Map<number, number> => {
      const rows = reader.prepare("SELECT id, priority FROM examples").all() as { id: number; priority: number }[];
      return new Map(rows.map((row) => [row.id, row.priority]));
    };
    const random = createRandom(5);
    let stored = 0;
    let rejected = 0;

    try {
      for (let index = 0; index < 500; index++) {
        const size = 1_000 + Math.floor(random() * 9_000);
        const priority = Math.floor(random() * 5);
        const before = priorities();
        const result = outbox.add(makeExample(`flood-${index}`, priority, size, T0 + index));
        const after = priorities();
        const evicted = [...before.keys()].filter((id) => !after.has(id));

        expect(outbox.stats().bytes).toBeLessThanOrEqual(maxBytes);
        for (const id of evicted) {
          expect(before.get(id)).toBeLessThanOrEqual(priority);
        }
        if (result.stored) {
          stored++;
          expect(evicted).toHaveLength(result.evicted);
        } else {
          rejected++;
          expect(evicted).toEqual([]);
        }
      }
    } finally {
      reader.close();
    }

    const rows = storedRows(file);
    const stats = outbox.stats();
    expect(rejected).toBeGreaterThan(0);
    expect(rows.reduce((sum, row) => sum + row.bytes, 0)).toBe(stats.bytes);
    expect(rows).toHaveLength(stats.items);
    expect(stats.added).toBe(stored);
    expect(stats.rejected).toBe(rejected);
    expect(stats.evicted).toBe(stored - rows.length);
  });

  it("keeps items and counters after reopening", () => {
    const first = Outbox.open(file, { maxBytes: 1_000_000, maxItems: 2 });
    first.add(makeExample("kept-1", 2, 500, T0));
    first.add(makeExample("kept-2", 3, 500, T0 + 1));
    first.add(makeExample("evicts-1", 2, 500, T0 + 2));
    first.add(makeExample("rejected", 1, 500, T0 + 3));
    const before = first.stats();
    first.close();

    const second = openOutbox({ maxBytes: 1_000_000, maxItems: 2 });

    expect(second.stats()).toEqual(before);
    expect(second.stats()).toMatchObject({ items: 2, added: 3, evicted: 1, rejected: 1 });
    expect(second.next()!.meta.frameId).toBe("kept-2");
    const { id } = second.add(makeExample("after-reopen", 9, 500, T0 + 4)) as { id: number };
    expect(id).toBeGreaterThan(3);
  });

  it("raises OutboxWriteError on a full database", () => {
    // SQLite never sets max_page_count below the current size, so 1 byte caps the file at its size after creation.
    const outbox = openOutbox({ maxDatabaseBytes: 1 });
    let failure: unknown;
    for (let index = 0; index < 100 && failure === undefined; index++) {
      try {
        outbox.add(makeExample(`fill-${index}`, 1, 2_000, T0 + index));
      } catch (error) {
        failure = error;
      }
    }

    expect(failure).toBeInstanceOf(OutboxWriteError);
    expect((failure as OutboxWriteError).code).toBe("SQLITE_FULL");
    expect((failure as OutboxWriteError).message).toMatch(/outbox add of example fill-\d+ failed: .*outbox\.db/);
    const failedId = /example (fill-\d+)/.exec((failure as Error).message)![1];
    const rows = storedRows(file);
    expect(rows.map((row) => row.frameId)).not.toContain(failedId);
    const stats = outbox.stats();
    expect(stats.items).toBe(rows.length);
    expect(stats.added).toBe(stats.items);
    // The failed add left the outbox usable: reads and acks still work.
    const item = outbox.next();
    if (item) {
      expect(outbox.ack(item.id)).toBe(true);
    }
  });

  it("rejects a file that is not SQLite", async () => {
    const { writeFileSync } = await import("node:fs");
    writeFileSync(file, "not a database, just text that is long enough to fill a header page ".repeat(20));

    expect(() => Outbox.open(file, { maxBytes: 1_000, maxItems: 1 })).toThrow(OutboxOpenError);
  });

  it("rejects invalid limits", () => {
    expect(() => Outbox.open(file, { maxBytes: 0, maxItems: 1 })).toThrow(/maxBytes 0 is invalid/);
    expect(() => Outbox.open(file, { maxBytes: 1_000, maxItems: 1.5 })).toThrow(/maxItems 1.5 is invalid/);
  });
});
