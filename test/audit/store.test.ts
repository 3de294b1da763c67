import path from "node:path";
import { PassThrough, Writable } from "node:stream";

import Database from "better-sqlite3";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { CSV_COLUMNS } from "../../src/audit/queries.js";
import { AuditStore, AuditWriteError } from "../../src/audit/store.js";
import type { DecisionRecord } from "../../src/audit/types.js";
import { makeFailedRecord, makeRecord, makeTempDir, parseCsv, T0 } from "./helpers.js";

const MINUTE = 60_000;

/** Ten decisions over ten minutes: plastic, metal, a rejected frame, a failed frame, two models, two sources. */
function fixture(): DecisionRecord[] {
  return [
    makeRecord("f-0", { decidedAt: T0, truth: "pet-bottle", latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 10 } }),
    makeRecord("f-1", { decidedAt: T0 + MINUTE, truth: "hdpe", latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 20 } }),
    makeRecord("f-2", { decidedAt: T0 + 2 * MINUTE, latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 30 } }),
    makeRecord("f-3", {
      decidedAt: T0 + 3 * MINUTE,
      label: "can",
      bin: "metal",
      truth: "can",
      source: "cam-2",
      latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 40 },
    }),
    makeRecord("f-4", { decidedAt: T0 + 4 * MINUTE, label: "can", bin: "metal", modelVersion: "1.3.0", latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 50 } }),
    makeRecord("f-5", {
      decidedAt: T0 + 5 * MINUTE,
      label: "glass, green",
      confidence: 0.4,
      bin: "reject",
      reason: "low-confidence",
      latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 60 },
    }),
    makeFailedRecord("f-6", 'JPEG "truncated",\nat byte 512', { decidedAt: T0 + 6 * MINUTE, latency: { queueMs: 1, decodeMs: 2, inferenceMs: 0, totalMs: 999 } }),
    makeRecord("f-7", { decidedAt: T0 + 7 * MINUTE, latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 70 } }),
    makeRecord("f-8", { decidedAt: T0 + 8 * MINUTE, latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 80 } }),
    makeRecord("f-9", { decidedAt: T0 + 9 * MINUTE, latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 90 } }),
  ];
}

async function exportToString(store: AuditStore, range: { from?: number; to?: number } = {}): Promise<{ text: string; rows: number }> {
  const chunks: Buffer[] = [];
  const out = new PassThrough();
  out.on("data", (chunk: Buffer) => chunks.push(chunk));
  const rows = await store.exportCsv(range, out);
  out.end();
  return { text: Buffer.concat(chunks).toString("utf8"), rows };
}

describe("AuditStore", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let file: string;
  let store: AuditStore;

  beforeEach(() => {
    temp = makeTempDir("audit-store");
    file = path.join(temp.dir, "audit.db");
    store = AuditStore.open(file);
  });

  afterEach(() => {
    store.close();
    temp.remove();
  });

  it("recordBatch stores every record", () => {
    store.recordBatch(fixture());
    store.recordBatch([]);

    expect(store.stats().rows).toBe(10);
    const row = store.query({ limit: 10 }).find((entry) => entry.frameId === "f-0");
    expect(row).toMatchObject({ ...makeRecord("f-0"), truth: "pet-bottle", latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 10 } });
  });

  it("recordBatch commits before returning", () => {
    store.recordBatch(fixture());

    const reader = new Database(file, { readonly: true });
    expect(reader.prepare("SELECT count(*) FROM decisions").pluck().get()).toBe(10);
    reader.close();
  });

  it("summary counts per bin, label, source, model", () => {
    store.recordBatch(fixture());

    const summary = store.summary();
    expect(summary.total).toBe(10);
    expect(summary.errors).toBe(1);
    expect(summary.firstDecidedAt).toBe(T0);
    expect(summary.lastDecidedAt).toBe(T0 + 9 * MINUTE);
    expect(summary.byBin).toEqual([
      { key: "plastic", count: 6 },
      { key: "metal", count: 2 },
      { key: null, count: 1 },
      { key: "reject", count: 1 },
    ]);
    expect(summary.byLabel).toContainEqual({ key: "glass, green", count: 1 });
    expect(summary.bySource).toEqual([
      { key: "cam-1", count: 9 },
      { key: "cam-2", count: 1 },
    ]);
    expect(summary.byModel).toEqual([
      { modelName: "resnet50-waste", modelVersion: "1.2.0", count: 9 },
      { modelName: "resnet50-waste", modelVersion: "1.3.0", count: 1 },
    ]);
  });

  it("summary accuracy uses rows with truth", () => {
    store.recordBatch(fixture());

    expect(store.summary().accuracy).toEqual({ labelled: 3, correct: 2, ratio: 2 / 3 });
    expect(store.summary({ from: T0 + 4 * MINUTE }).accuracy).toEqual({ labelled: 0, correct: 0, ratio: null });
  });

  it("summary latency percentiles skip errors", () => {
    store.recordBatch(fixture());

    // Nine decisions without error, total 10..90 ms: nearest rank 5 is 50, rank 9 is 90.
    expect(store.summary().totalLatencyMs).toEqual({ count: 9, p50: 50, p95: 90, p99: 90 });
  });

  it("summary of an empty range", () => {
    store.recordBatch(fixture());

    const summary = store.summary({ from: T0 + 60 * MINUTE });
    expect(summary.total).toBe(0);
    expect(summary.firstDecidedAt).toBeNull();
    expect(summary.totalLatencyMs).toEqual({ count: 0, p50: null, p95: null, p99: null });
    expect(summary.byBin).toEqual([]);
  });

  it("summary range is from inclusive, to exclusive", () => {
    store.recordBatch(fixture());

    const summary = store.summary({ from: T0 + MINUTE, to: T0 + 3 * MINUTE });
    expect(summary.total).toBe(2);
    expect(summary.firstDecidedAt).toBe(T0 + MINUTE);
    expect(summary.lastDecidedAt).toBe(T0 + 2 * MINUTE);
  });

  it("query returns newest first within limit", () => {
    store.recordBatch(fixture());

    expect(store.query({ limit: 3 }).map((row) => row.frameId)).toEqual(["f-9", "f-8", "f-7"]);
    expect(store.query({ from: T0, to: T0 + 2 * MINUTE }).map((row) => row.frameId)).toEqual(["f-1", "f-0"]);
  });

  it("query filters by label and bin", () => {
    store.recordBatch(fixture());

    expect(store.query({ label: "can" }).map((row) => row.frameId)).toEqual(["f-4", "f-3"]);
    expect(store.query({ bin: "reject" }).map((row) => row.frameId)).toEqual(["f-5"]);
    expect(store.query({ label: "can", bin: "plastic" })).toEqual([]);
  });

  it("query returns failed frames intact", () => {
    store.recordBatch(fixture());

    const [failed] = store.query({ from: T0 + 6 * MINUTE, to: T0 + 7 * MINUTE });
    expect(failed).toMatchObject({ frameId: "f-6", label: null, confidence: null, bin: null, top: [], error: 'JPEG "truncated",\nat byte 512' });
  });

  it("query rejects an invalid limit", () => {
    expect(() => store.query({ limit: 0 })).toThrow(RangeError);
    expect(() => store.query({ limit: 1.5 })).toThrow(RangeError);
    expect(() => store.query({ limit: 1_000_000 })).toThrow(RangeError);
  });

  it("exportCsv quotes commas, quotes and newlines", async () => {
    store.recordBatch(fixture());

    const { text, rows } = await exportToString(store);
    expect(rows).toBe(10);
    const parsed = parseCsv(text);
    expect(parsed[0]).toEqual([...CSV_COLUMNS]);
    expect(parsed).toHaveLength(11);
    const column = (name: (typeof CSV_COLUMNS)[number]): number => CSV_COLUMNS.indexOf(name);
    expect(parsed.slice(1).map((row) => row[column("frame_id")])).toEqual(fixture().map((record) => record.frameId));
    expect(parsed[6]![column("label")]).toBe("glass, green");
    expect(parsed[7]![column("error")]).toBe('JPEG "truncated",\nat byte 512');
    expect(parsed[7]![column("label")]).toBe("");
    expect(parsed[1]![column("decided_at")]).toBe("2024-05-01T08:00:00.000Z");
    expect(JSON.parse(parsed[1]![column("top")]!)).toEqual(makeRecord("f-0").top);
    expect(text).toContain('"JPEG ""truncated"",\nat byte 512"');
  });

  it("exportCsv pages through many rows in order", async () => {
    const records = Array.from({ length: 2_500 }, (_, index) => makeRecord(`f-${index}`, { decidedAt: T0 + Math.floor(index / 3) }));
    store.recordBatch(records);

    const { text, rows } = await exportToString(store, { from: T0 + 10 });
    const expected = records.filter((record) => record.decidedAt >= T0 + 10).map((record) => record.frameId);
    expect(rows).toBe(expected.length);
    expect(parseCsv(text).slice(1).map((row) => row[1])).toEqual(expected);
  });

  it("exportCsv waits for drain", async () => {
    store.recordBatch(Array.from({ length: 3_000 }, (_, index) => makeRecord(`f-${index}`)));
    let bytes = 0;
    let drains = 0;
    const slow = new Writable({
      highWaterMark: 1024,
      write(chunk: Buffer, _encoding, callback) {
        bytes += chunk.length;
        setImmediate(callback);
      },
    });
    slow.on("drain", () => {
      drains += 1;
    });

    expect(await store.exportCsv({}, slow)).toBe(3_000);
    expect(drains).toBeGreaterThan(0);
    expect(bytes).toBeGreaterThan(3_000 * 100);
  });

  it("raises AuditWriteError when the database is full", () => {
    store.recordBatch([makeRecord("before")]);
    const cap = store.setMaxDatabaseBytes(store.stats().bytesInUse + 16 * 1024);
    const big = Array.from({ length: 200 }, (_, index) => makeFailedRecord(`big-${index}`, "x".repeat(2_000)));

    let caught: unknown;
    try {
      store.recordBatch(big);
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(AuditWriteError);
    expect((caught as AuditWriteError).code).toBe("SQLITE_FULL");
    expect((caught as AuditWriteError).cause).toBeInstanceOf(Database.SqliteError);
    expect(store.stats().rows).toBe(1);
    expect(store.stats().bytesInUse).toBeLessThanOrEqual(cap);
  });

  it("writes again after the limit is raised", () => {
    store.setMaxDatabaseBytes(store.stats().bytesInUse + 16 * 1024);
    const big = Array.from({ length: 200 }, (_, index) => makeFailedRecord(`big-${index}`, "x".repeat(2_000)));
    expect(() => store.recordBatch(big)).toThrow(AuditWriteError);

    store.setMaxDatabaseBytes(1024 * 1024 * 1024);
    store.recordBatch(big);
    store.recordBatch([makeRecord("after")]);

    expect(store.stats().rows).toBe(201);
    expect(store.query({ limit: 1 })[0]!.frameId).toBe("after");
  });

  it("writes again after pruning frees space", async () => {
    store.setMaxDatabaseBytes(512 * 1024);
    const batch = (start: number): DecisionRecord[] =>
      Array.from({ length: 20 }, (_, index) => makeFailedRecord(`f-${start + index}`, "y".repeat(1_000), { decidedAt: T0 + start + index }));
    let written = 0;
    expect(() => {
      for (;;) {
        store.recordBatch(batch(written));
        written += 20;
      }
    }).toThrow(AuditWriteError);

    await store.prune({ maxBytes: 256 * 1024 });
    store.recordBatch(batch(written));

    expect(store.query({ limit: 1 })[0]!.frameId).toBe(`f-${written + 19}`);
  });

  it("rejects writes after close", () => {
    store.close();

    expect(() => store.recordBatch([makeRecord("late")])).toThrow(/is closed/);
  });

  it("read-only store rejects writes", () => {
    store.recordBatch([makeRecord("f-1")]);
    const reader = AuditStore.open(file, { readonly: true });

    expect(() => reader.recordBatch([makeRecord("f-2")])).toThrow(AuditWriteError);
    expect(reader.query().map((row) => row.frameId)).toEqual(["f-1"]);
    reader.close();
  });

  it("opens with synchronous NORMAL", () => {
    store.close();
    const normal = AuditStore.open(file, { synchronous: "NORMAL" });
    normal.recordBatch([makeRecord("f-1")]);

    expect(normal.stats().rows).toBe(1);
    normal.close();
  });
});
