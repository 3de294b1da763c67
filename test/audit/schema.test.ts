import { writeFileSync } from "node:fs";
import path from "node:path";

import Database from "better-sqlite3";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { MIGRATIONS, SCHEMA_VERSION } from "../../src/audit/schema.js";
import { AuditOpenError, AuditStore } from "../../src/audit/store.js";
import { makeRecord, makeTempDir } from "./helpers.js";

describe("audit schema", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let file: string;

  beforeEach(() => {
    temp = makeTempDir("audit-schema");
    file = path.join(temp.dir, "audit.db");
  });

  afterEach(() => {
    temp.remove();
  });

  it("migrates an empty file to the latest version", () => {
    writeFileSync(file, "");
    AuditStore.open(file).close();

    const db = new Database(file, { readonly: true });
    expect(db.pragma("user_version", { simple: true })).toBe(SCHEMA_VERSION);
    expect(db.pragma("journal_mode", { simple: true })).toBe("wal");
    expect(db.pragma("auto_vacuum", { simple: true })).toBe(2);
    const columns = (db.pragma("table_info(decisions)") as { name: string }[]).map((column) => column.name);
    expect(columns).toEqual(expect.arrayContaining(["frame_id", "decided_at", "top_json", "total_ms", "truth"]));
    const indexes = (db.pragma("index_list(decisions)") as { name: string }[]).map((index) => index.name);
    expect(indexes).toContain("decisions_decided_at");
    db.close();
  });

  it("creates a missing file", () => {
    const store = AuditStore.open(file);
    expect(store.stats().rows).toBe(0);
    store.close();
  });

  it("reopens idempotently and keeps rows", () => {
    const first = AuditStore.open(file);
    first.recordBatch([makeRecord("f-1")]);
    first.close();

    const second = AuditStore.open(file);
    expect(second.stats().rows).toBe(1);
    second.close();
    const third = AuditStore.open(file);
    expect(third.query().map((row) => row.frameId)).toEqual(["f-1"]);
    third.close();
  });

  it("has strictly increasing migration versions", () => {
    const versions = MIGRATIONS.map((step) => step.version);
    expect(versions).toEqual(versions.map((_, index) => index + 1));
  });

  it("rejects a schema newer than this build", () => {
    AuditStore.open(file).close();
    const db = new Database(file);
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();

    expect(() => AuditStore.open(file)).toThrow(AuditOpenError);
    expect(() => AuditStore.open(file)).toThrow(/newer than this sortline reads/);
  });

  it("rejects a file that is not SQLite", () => {
    writeFileSync(file, "this is a text file, not a database\n".repeat(200));

    expect(() => AuditStore.open(file)).toThrow(AuditOpenError);
  });

  it("read-only open rejects a missing file", () => {
    expect(() => AuditStore.open(file, { readonly: true })).toThrow(/audit database not found/);
  });

  it("read-only open rejects an unmigrated file", () => {
    new Database(file).close();

    expect(() => AuditStore.open(file, { readonly: true })).toThrow(/start the agent once to migrate it/);
  });
});
