import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { PassThrough, Writable } from "node:stream";

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { AuditStore } from "../../src/audit/store.js";
import { parseTime, runAudit, type AuditIo } from "../../src/cli/audit.js";
import { UsageError } from "../../src/cli/common.js";
import { main } from "../../src/cli/main.js";
import { makeFailedRecord, makeRecord, makeTempDir, parseCsv, T0 } from "../audit/helpers.js";

const MINUTE = 60_000;

/** Creates a writable stream that keeps what is written to it. */
function capture(): { stream: PassThrough; text: () => string } {
  const stream = new PassThrough();
  const chunks: Buffer[] = [];
  stream.on("data", (chunk: Buffer) => chunks.push(chunk));
  return { stream, text: () => Buffer.concat(chunks).toString("utf8") };
}

describe("parseTime", () => {
  const now = T0;

  it("parses relative times", () => {
    expect(parseTime("--from", "-90s", now)).toBe(now - 90_000);
    expect(parseTime("--from", "-30m", now)).toBe(now - 30 * MINUTE);
    expect(parseTime("--from", "-1h", now)).toBe(now - 60 * MINUTE);
    expect(parseTime("--from", "-7d", now)).toBe(now - 7 * 86_400_000);
    expect(parseTime("--from", "-2w", now)).toBe(now - 14 * 86_400_000);
    expect(parseTime("--from", "-1.5h", now)).toBe(now - 90 * MINUTE);
  });

  it("parses ISO 8601 and now", () => {
    expect(parseTime("--to", "now", now)).toBe(now);
    expect(parseTime("--to", "2024-05-01T08:00:00Z", now)).toBe(T0);
    expect(parseTime("--to", "2024-05-01T10:00:00+02:00", now)).toBe(T0);
    expect(parseTime("--to", "2024-05-01", now)).toBe(Date.UTC(2024, 4, 1));
  });

  it("rejects other forms", () => {
    for (const value of ["1h", "-1y", "yesterday", "1714550400000", "2024-13-45", ""]) {
      expect(() => parseTime("--from", value, now), value).toThrow(UsageError);
    }
  });
});

describe("sortline audit", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let db: string;
  let out: ReturnType<typeof capture>;
  let err: ReturnType<typeof capture>;

  const run = (argv: string[], io: AuditIo = {}): Promise<number> =>
    runAudit(argv, { out: out.stream, err: err.stream, env: {}, now: T0 + 10 * MINUTE, ...io });

  beforeEach(() => {
    temp = makeTempDir("cli-audit");
    db = path.join(temp.dir, "audit.db");
    out = capture();
    err = capture();
    const store = AuditStore.open(db);
    store.recordBatch([
      makeRecord("f-0", { decidedAt: T0, truth: "pet-bottle" }),
      makeRecord("f-1", { decidedAt: T0 + MINUTE, label: "can", bin: "metal", truth: "hdpe" }),
      makeRecord("f-2", { decidedAt: T0 + 2 * MINUTE, label: 'odd "label", with comma', bin: "reject", reason: "unmapped-class" }),
      makeFailedRecord("f-3", "decode failed:\nbad huffman table", { decidedAt: T0 + 3 * MINUTE, source: "cam-2" }),
      makeRecord("f-4", { decidedAt: T0 + 9 * MINUTE }),
    ]);
    store.close();
  });

  afterEach(() => {
    temp.remove();
  });

  it("summary prints a readable table", async () => {
    expect(await run(["--db", db, "summary"])).toBe(0);

    const text = out.text();
    expect(text).toMatch(/^Audit database\s+.*audit\.db$/m);
    expect(text).toMatch(/^Decisions\s+5 \(first 2024-05-01T08:00:00\.000Z, last 2024-05-01T08:09:00\.000Z\)$/m);
    expect(text).toMatch(/^Errors\s+1$/m);
    expect(text).toMatch(/^Accuracy\s+50\.0% \(1 of 2 with a truth label\)$/m);
    expect(text).toMatch(/^plastic\s+2\s+40\.0%$/m);
    expect(text).toMatch(/^\(none\)\s+1\s+20\.0%$/m);
    expect(text).toMatch(/^cam-2\s+1\s+20\.0%$/m);
    expect(text).toMatch(/^resnet50-waste 1\.2\.0\s+5\s+100\.0%$/m);
  });

  it("summary --json matches the store", async () => {
    expect(await run(["--db", db, "--from", "-9m", "--to", "2024-05-01T08:05:00Z", "summary", "--json"])).toBe(0);

    const summary = JSON.parse(out.text()) as Record<string, unknown>;
    expect(summary.from).toBe(T0 + MINUTE);
    expect(summary.to).toBe(T0 + 5 * MINUTE);
    expect(summary.total).toBe(3);
    expect(summary.errors).toBe(1);
    expect(summary.byLabel).toContainEqual({ key: 'odd "label", with comma', count: 1 });
  });

  it("summary of an empty range", async () => {
    expect(await run(["--db", db, "--from", "-30s", "summary"])).toBe(0);

    expect(out.text()).toMatch(/^Decisions\s+0 \(first -, last -\)$/m);
    expect(out.text()).not.toContain("Bin");
  });

  it("query prints newest first", async () => {
    expect(await run(["--db", db, "query", "--limit", "2"])).toBe(0);

    const lines = out.text().trimEnd().split("\n");
    expect(lines[0]).toMatch(/^Decided at\s+Frame\s+Source/);
    expect(lines).toHaveLength(3);
    expect(lines[1]).toMatch(/^2024-05-01T08:09:00\.000Z\s+f-4\s+cam-1\s+pet-bottle\s+0\.910\s+plastic\s+40\.0\s+-$/);
    expect(lines[2]).toContain("decode failed: bad huffman table");
  });

  it("query --json prints one object per line", async () => {
    expect(await run(["--db", db, "query", "--json", "--label", "can"])).toBe(0);

    const rows = out.text().trimEnd().split("\n").map((line) => JSON.parse(line) as { frameId: string; truth: string });
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ frameId: "f-1", truth: "hdpe" });
  });

  it("query --bin filters", async () => {
    expect(await run(["--db", db, "query", "--json", "--bin", "reject"])).toBe(0);

    expect(out.text().trimEnd().split("\n").map((line) => (JSON.parse(line) as { frameId: string }).frameId)).toEqual(["f-2"]);
  });

  it("export writes CSV to stdout", async () => {
    expect(await run(["--db", db, "--to", "2024-05-01T08:04:00Z", "export"])).toBe(0);

    const rows = parseCsv(out.text());
    expect(rows).toHaveLength(5);
    expect(rows.slice(1).map((row) => row[1])).toEqual(["f-0", "f-1", "f-2", "f-3"]);
    expect(rows[3]![8]).toBe('odd "label", with comma');
    expect(rows[4]![16]).toBe("decode failed:\nbad huffman table");
  });

  it("export --csv writes a file", async () => {
    const csv = path.join(temp.dir, "out.csv");

    expect(await run(["--db", db, "export", "--csv", csv])).toBe(0);

    expect(parseCsv(readFileSync(csv, "utf8"))).toHaveLength(6);
    expect(err.text()).toBe(`sortline audit: wrote 5 decisions to ${csv}\n`);
    expect(out.text()).toBe("");
  });

  it("export --csv to a missing folder exits 1", async () => {
    const csv = path.join(temp.dir, "missing", "out.csv");

    expect(await run(["--db", db, "export", "--csv", csv])).toBe(1);

    expect(err.text()).toMatch(/^sortline audit: cannot write .*out\.csv: ENOENT/);
  });

  it("closed pipe ends output with 0", async () => {
    let writes = 0;
    const closedPipe = new Writable({
      write(_chunk, _encoding, callback) {
        writes += 1;
        callback(Object.assign(new Error("write EPIPE"), { code: "EPIPE" }));
      },
    });

    expect(await runAudit(["--db", db, "export"], { out: closedPipe, err: err.stream, env: {} })).toBe(0);
    expect(await runAudit(["--db", db, "query"], { out: new PassThrough().on("data", () => undefined), err: err.stream, env: {} })).toBe(0);
    expect(writes).toBe(1);
  });

  it("reads SORTLINE_AUDIT_DB", async () => {
    expect(await run(["query", "--json"], { env: { SORTLINE_AUDIT_DB: db } })).toBe(0);

    expect(out.text().trimEnd().split("\n")).toHaveLength(5);
  });

  it("reads while the agent writes", async () => {
    const writer = AuditStore.open(db);
    writer.recordBatch([makeRecord("live", { decidedAt: T0 + 9 * MINUTE + 1 })]);

    expect(await run(["--db", db, "query", "--json", "--limit", "1"])).toBe(0);
    writer.close();

    expect(JSON.parse(out.text()) as { frameId: string }).toMatchObject({ frameId: "live" });
  });

  it("missing database exits 1", async () => {
    const missing = path.join(temp.dir, "none.db");

    expect(await run(["--db", missing, "summary"])).toBe(1);

    expect(err.text()).toBe(`sortline audit: audit database ${missing} not found; pass --db FILE or set SORTLINE_AUDIT_DB\n`);
  });

  it("database that is not SQLite exits 1", async () => {
    const text = path.join(temp.dir, "notes.txt");
    writeFileSync(text, "not a database\n".repeat(100));

    expect(await run(["--db", text, "summary"])).toBe(1);

    expect(err.text()).toMatch(/^sortline audit: .*notes\.txt: cannot open audit database: file is not a database\n$/);
  });

  it("rejects invalid command lines", async () => {
    const cases: [string[], RegExp][] = [
      [[], /no command given/],
      [["list"], /unknown command 'list'/],
      [["summary", "extra"], /unexpected argument 'extra'/],
      [["--from", "yesterday", "summary"], /--from yesterday is not an ISO 8601 time/],
      [["--from", "-1h", "--to", "-2h", "summary"], /--from -1h is not before --to -2h/],
      [["summary", "--csv", "x.csv"], /--csv applies to export, not to summary/],
      [["export", "--json"], /--json applies to summary and query, not to export/],
      [["summary", "--limit", "5"], /--limit applies to query, not to summary/],
      [["query", "--limit", "0"], /--limit 0 is not a whole number from 1 to 100000/],
      [["query", "--limit", "ten"], /--limit ten is not a whole number/],
    ];
    for (const [argv, message] of cases) {
      await expect(run(["--db", db, ...argv]), argv.join(" ")).rejects.toThrow(message);
      await expect(run(["--db", db, ...argv]), argv.join(" ")).rejects.toBeInstanceOf(UsageError);
    }
  });

  it("help prints usage", async () => {
    expect(await run(["--help"])).toBe(0);

    expect(out.text()).toMatch(/^Usage: sortline audit/);
  });

  it("main registers the audit command", async () => {
    // Accepts a write and calls its callback, as a real stream does once the data is handed on.
    const accept = ((_chunk: unknown, encodingOrCallback?: unknown, callback?: unknown): boolean => {
      const done = typeof encodingOrCallback === "function" ? encodingOrCallback : callback;
      (done as ((error?: Error | null) => void) | undefined)?.();
      return true;
    }) as typeof process.stdout.write;
    const stderr = vi.spyOn(process.stderr, "write").mockImplementation(accept);
    const stdout = vi.spyOn(process.stdout, "write").mockImplementation(accept);
    try {
      expect(await main(["audit", "--db", db, "summary", "--bogus"])).toBe(2);
      expect(await main(["audit", "--db", db, "bogus"])).toBe(2);
      expect(await main(["audit", "--db", path.join(temp.dir, "none.db"), "summary"])).toBe(1);
      expect(await main(["audit", "--db", db, "summary", "--json"])).toBe(0);
      expect(String(stderr.mock.calls[0]?.[0])).toMatch(/^sortline audit: Unknown option '--bogus'/);
      expect(JSON.parse(String(stdout.mock.calls.at(-1)?.[0])) as { total: number }).toMatchObject({ total: 5 });
    } finally {
      stderr.mockRestore();
      stdout.mockRestore();
    }
  });
});
