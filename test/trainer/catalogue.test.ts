import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";

import Database from "better-sqlite3";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import {
  Catalogue,
  CatalogueInputError,
  CatalogueOpenError,
  ExampleNotFoundError,
  ExampleTooLargeError,
  InvalidClassNameError,
  UnknownClassError,
} from "../../src/trainer/catalogue.js";
import { parseCsv, CsvParseError } from "../../src/trainer/labels-csv.js";
import { BASE_CLASSES, makeClock, makeMeta, makeTempDir, readPhotos, T0 } from "./helpers.js";

const MINUTE = 60_000;
const glass = readPhotos("glass");
const metal = readPhotos("metal");
const paper = readPhotos("paper");

function sha256Of(bytes: Buffer): string {
  return createHash("sha256").update(bytes).digest("hex");
}

describe("Catalogue", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let clock: ReturnType<typeof makeClock>;
  let catalogue: Catalogue;

  function open(): Catalogue {
    return Catalogue.open(temp.dir, { baseClasses: BASE_CLASSES, now: clock.now });
  }

  beforeEach(() => {
    temp = makeTempDir("catalogue");
    clock = makeClock();
    catalogue = open();
  });

  afterEach(() => {
    catalogue.close();
    temp.remove();
  });

  describe("typical order", () => {
    it("gives one typical example per group before a second one of any group", () => {
      const photos = [...readPhotos("glass"), ...readPhotos("metal"), ...readPhotos("paper")];
      // Two groups of embeddings: eight near the first axis, four near the second; priority favours the small group.
      photos.slice(0, 12).forEach((jpeg, index) => {
        const big = index < 8;
        const embedding = new Float32Array(4);
        embedding[big ? 0 : 1] = 1;
        embedding[2] = 0.05 * index;
        catalogue.add(jpeg, makeMeta(`f-${index}`, { priority: big ? 1 : 5, embedding }));
      });
      catalogue.add(photos[12]!, makeMeta("no-embedding", { priority: 9 }));

      const page = catalogue.list({ order: "typical", limit: 2 });
      const groups = page.map((record) => Array.from(catalogue.embedding(record.sha256)!)[0]);

      expect(groups.sort()).toEqual([0, 1]);
      expect(catalogue.list({ order: "typical", limit: 20 })).toHaveLength(13);
    });
  });

  describe("add", () => {
    it("stores the image and the metadata", () => {
      const embedding = new Float32Array([0.25, -1.5, 3]);
      const result = catalogue.add(glass[0]!, makeMeta("f-1", { reasons: ["low-confidence", "novelty"], priority: 0.9, truth: "glass", embedding }));

      expect(result).toEqual({ sha256: sha256Of(glass[0]!), duplicate: false });
      const file = catalogue.imagePath(result.sha256);
      expect(file).toBe(path.join(temp.dir, "examples", result.sha256.slice(0, 2), `${result.sha256}.jpg`));
      expect(readFileSync(file).equals(glass[0]!)).toBe(true);
      expect(catalogue.get(result.sha256)).toMatchObject({
        sha256: result.sha256,
        site: "plant-a",
        device: "edge-1",
        frameId: "f-1",
        capturedAt: T0,
        receivedAt: T0,
        seen: 1,
        bytes: glass[0]!.length,
        modelName: "resnet50-waste",
        modelVersion: "1.2.0",
        reasons: ["low-confidence", "novelty"],
        priority: 0.9,
        top: [
          { label: "plastic", p: 0.41 },
          { label: "glass", p: 0.38 },
        ],
        predicted: "plastic",
        truth: "glass",
        hasEmbedding: true,
        status: "pending",
        label: null,
      });
      expect(Array.from(catalogue.embedding(result.sha256)!)).toEqual([0.25, -1.5, 3]);
    });

    it("leaves no temporary files", () => {
      const { sha256 } = catalogue.add(glass[0]!, makeMeta("f-1"));

      expect(readdirSync(path.dirname(catalogue.imagePath(sha256)))).toEqual([`${sha256}.jpg`]);
    });

    it("accepts an ISO capture time", () => {
      const { sha256 } = catalogue.add(glass[0]!, makeMeta("f-1", { capturedAt: "2024-05-01T08:00:01.500Z" }));

      expect(catalogue.get(sha256)!.capturedAt).toBe(T0 + 1500);
    });

    it("counts duplicates and keeps the first metadata", () => {
      const first = catalogue.add(glass[0]!, makeMeta("f-1", { device: "edge-1" }));
      clock.advance(MINUTE);
      const second = catalogue.add(Buffer.from(glass[0]!), makeMeta("f-9", { device: "edge-2", priority: 5 }));

      expect(second).toEqual({ sha256: first.sha256, duplicate: true });
      expect(catalogue.count("all")).toBe(1);
      expect(catalogue.get(first.sha256)).toMatchObject({ frameId: "f-1", device: "edge-1", priority: 0.5, seen: 2, receivedAt: T0, lastSeenAt: T0 + MINUTE });
    });

    it("writes a missing image again on a duplicate", () => {
      const { sha256 } = catalogue.add(glass[0]!, makeMeta("f-1"));
      const file = catalogue.imagePath(sha256);
      rmSync(file);

      expect(catalogue.add(glass[0]!, makeMeta("f-1")).duplicate).toBe(true);
      expect(readFileSync(file).equals(glass[0]!)).toBe(true);
    });

    it.each([
      ["a PNG header", Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])],
      ["text", Buffer.from("not an image")],
      ["an empty buffer", Buffer.alloc(0)],
      ["two bytes of SOI", Buffer.from([0xff, 0xd8])],
    ])("rejects %s as not a JPEG", (_name, bytes) => {
      expect(() => catalogue.add(bytes, makeMeta("f-1"))).toThrow(CatalogueInputError);
      expect(() => catalogue.add(bytes, makeMeta("f-1"))).toThrow("is not a JPEG");
      expect(catalogue.count("all")).toBe(0);
    });

    it("rejects an image over the size limit", () => {
      catalogue.close();
      catalogue = Catalogue.open(temp.dir, { baseClasses: BASE_CLASSES, maxImageBytes: 1000 });

      let error: unknown;
      try {
        catalogue.add(glass[0]!, makeMeta("f-1"));
      } catch (caught) {
        error = caught;
      }

      expect(error).toBeInstanceOf(ExampleTooLargeError);
      expect((error as ExampleTooLargeError).message).toBe(`image of ${glass[0]!.length} bytes is larger than the limit of 1000 bytes`);
      expect(catalogue.count("all")).toBe(0);
    });

    it.each([
      ["an empty device", { device: "" }, "invalid device"],
      ["a bad capture time", { capturedAt: "yesterday" }, "invalid capturedAt"],
      ["a probability above 1", { top: [{ label: "glass", p: 1.5 }] }, "invalid top[0].p"],
      ["a NaN priority", { priority: Number.NaN }, "invalid priority"],
      ["reasons that are not strings", { reasons: [42 as unknown as string] }, "invalid reasons[0]"],
      ["an empty embedding", { embedding: new Float32Array(0) }, "invalid embedding"],
    ])("rejects metadata with %s", (_name, overrides, message) => {
      expect(() => catalogue.add(glass[0]!, makeMeta("f-1", overrides))).toThrow(message);
      expect(catalogue.count("all")).toBe(0);
    });
  });

  describe("list", () => {
    let shas: string[];

    beforeEach(() => {
      shas = [];
      const priorities = [0.2, 0.9, 0.5, 0.9];
      priorities.forEach((priority, index) => {
        shas.push(catalogue.add(metal[index]!, makeMeta(`f-${index}`, { priority })).sha256);
        clock.advance(MINUTE);
      });
    });

    it("orders pending examples by priority, then oldest first", () => {
      expect(catalogue.list().map((example) => example.sha256)).toEqual([shas[1], shas[3], shas[2], shas[0]]);
    });

    it("orders by received time, newest first", () => {
      expect(catalogue.list({ order: "received" }).map((example) => example.sha256)).toEqual([shas[3], shas[2], shas[1], shas[0]]);
    });

    it("filters by status and pages", () => {
      catalogue.label(shas[1]!, "metal", "ana");
      catalogue.discard(shas[2]!, "ana");

      expect(catalogue.list({ status: "pending" }).map((example) => example.sha256)).toEqual([shas[3], shas[0]]);
      expect(catalogue.list({ status: "labelled" }).map((example) => example.sha256)).toEqual([shas[1]]);
      expect(catalogue.list({ status: "discarded" }).map((example) => example.sha256)).toEqual([shas[2]]);
      expect(catalogue.list({ status: "all", limit: 2, offset: 1 }).map((example) => example.sha256)).toEqual([shas[3], shas[2]]);
    });

    it.each([
      [{ limit: 0 }, "invalid limit 0"],
      [{ limit: 501 }, "invalid limit 501"],
      [{ offset: -1 }, "invalid offset -1"],
      [{ status: "done" as "all" }, "invalid status 'done'"],
    ])("rejects %o", (options, message) => {
      expect(() => catalogue.list(options)).toThrow(message);
    });
  });

  describe("review", () => {
    let sha: string;

    beforeEach(() => {
      sha = catalogue.add(glass[0]!, makeMeta("f-1")).sha256;
    });

    it("labels an example", () => {
      clock.advance(MINUTE);
      const record = catalogue.label(sha, "glass", "ana");

      expect(record).toMatchObject({ status: "labelled", label: "glass", reviewedBy: "ana", reviewedAt: T0 + MINUTE });
      expect(catalogue.get(sha)).toEqual(record);
    });

    it("rejects an unknown class and names the known ones", () => {
      let error: unknown;
      try {
        catalogue.label(sha, "styrofoam", "ana");
      } catch (caught) {
        error = caught;
      }

      expect(error).toBeInstanceOf(UnknownClassError);
      expect((error as Error).message).toBe(
        "unknown class 'styrofoam'; known classes: cardboard, glass, metal, paper, plastic, trash. Add the class first",
      );
      expect(catalogue.get(sha)!.status).toBe("pending");
    });

    it("labels with a class added later", () => {
      expect(catalogue.addClass("styrofoam")).toBe(true);
      expect(catalogue.addClass("styrofoam")).toBe(false);
      expect(catalogue.addClass("glass")).toBe(false);

      expect(catalogue.classes()).toEqual([...BASE_CLASSES, "styrofoam"]);
      expect(catalogue.label(sha, "styrofoam", "ana").label).toBe("styrofoam");
    });

    it.each(["Glass", "1st", "", "a".repeat(33), "with space", "discard", "é"])("rejects the class name %j", (name) => {
      expect(() => catalogue.addClass(name)).toThrow(InvalidClassNameError);
    });

    it("discards and unlabels", () => {
      catalogue.label(sha, "glass", "ana");
      expect(catalogue.discard(sha, "ben")).toMatchObject({ status: "discarded", label: null, reviewedBy: "ben" });
      expect(catalogue.unlabel(sha)).toMatchObject({ status: "pending", label: null, reviewedBy: null, reviewedAt: null });
    });

    it("reports unknown and malformed examples", () => {
      const unknown = "0".repeat(64);

      expect(catalogue.get(unknown)).toBeUndefined();
      expect(() => catalogue.label(unknown, "glass", "ana")).toThrow(ExampleNotFoundError);
      expect(() => catalogue.discard(unknown, "ana")).toThrow(ExampleNotFoundError);
      expect(() => catalogue.unlabel(unknown)).toThrow(ExampleNotFoundError);
      expect(() => catalogue.get("../../etc/passwd")).toThrow(CatalogueInputError);
      expect(() => catalogue.imagePath("A".repeat(64))).toThrow("invalid sha256");
    });
  });

  describe("importLabelsCsv", () => {
    let shas: string[];

    beforeEach(() => {
      shas = [
        catalogue.add(glass[0]!, makeMeta("f-1", { device: "edge-1" })).sha256,
        catalogue.add(glass[1]!, makeMeta("f-2", { device: "edge-1" })).sha256,
        catalogue.add(metal[0]!, makeMeta("f-2", { device: "edge-2" })).sha256,
        catalogue.add(paper[0]!, makeMeta("f-3", { device: "edge-2" })).sha256,
      ];
    });

    it("applies sha256 rows, frame rows and discards", () => {
      const text = `\uFEFFsha256,frame_id,device,label\r\n${shas[0]},,,glass\r\n,f-2,edge-2,metal\r\n,f-3,,discard\r\n`;

      const result = catalogue.importLabelsCsv(text, "import");

      expect(result).toEqual({ applied: 3, unknownExamples: [], errors: [], addedClasses: [] });
      expect(catalogue.get(shas[0]!)).toMatchObject({ status: "labelled", label: "glass", reviewedBy: "import" });
      expect(catalogue.get(shas[2]!)).toMatchObject({ status: "labelled", label: "metal" });
      expect(catalogue.get(shas[3]!)).toMatchObject({ status: "discarded", label: null });
      expect(catalogue.get(shas[1]!)!.status).toBe("pending");
    });

    it("reports every kind of row error and applies the rest", () => {
      const unknownSha = "0".repeat(64);
      const text = [
        "sha256,frame_id,device,label",
        `${shas[0]},,,styrofoam`, // 2: unknown class
        ",f-2,,glass", // 3: frame id of two devices
        `${unknownSha},,,glass`, // 4: unknown example
        ",f-404,edge-1,glass", // 5: unknown frame
        "xyz,,,glass", // 6: invalid sha256
        `${shas[1]},,,`, // 7: empty label
        ",,,glass", // 8: no key
        `${shas[1]},glass`, // 9: wrong field count
        `${shas[1]},,,glass`, // 10: applied
      ].join("\n");

      const result = catalogue.importLabelsCsv(text, "import");

      expect(result.applied).toBe(1);
      expect(result.unknownExamples).toEqual([unknownSha, "edge-1/f-404"]);
      expect(result.errors.map((error) => error.line)).toEqual([2, 3, 6, 7, 8, 9]);
      expect(result.errors[0]!.message).toContain("unknown class 'styrofoam'");
      expect(result.errors[1]!.message).toContain("matches examples of several devices (edge-1, edge-2)");
      expect(result.errors[2]!.message).toContain("invalid sha256");
      expect(result.errors[3]!.message).toBe("the label is empty");
      expect(result.errors[4]!.message).toBe("the row has neither a sha256 nor a frame_id");
      expect(result.errors[5]!.message).toBe("expected 4 fields as in the header, found 2");
      expect(catalogue.get(shas[0]!)!.status).toBe("pending");
      expect(catalogue.get(shas[1]!)!.label).toBe("glass");
      expect(catalogue.classes()).toEqual(BASE_CLASSES);
    });

    it("adds new classes when asked", () => {
      const text = `sha256,label\n${shas[0]},styrofoam\n${shas[1]},Styrofoam\n${shas[2]},9lives\n`;

      const result = catalogue.importLabelsCsv(text, "import", { addClasses: true });

      expect(result.applied).toBe(2);
      expect(result.addedClasses).toEqual(["styrofoam"]);
      expect(result.errors).toHaveLength(1);
      expect(result.errors[0]!.line).toBe(4);
      expect(result.errors[0]!.message).toContain("invalid class name '9lives'");
      expect(catalogue.classes()).toEqual([...BASE_CLASSES, "styrofoam"]);
      expect(catalogue.get(shas[1]!)!.label).toBe("styrofoam");
    });

    it("applies nothing when the header is unusable", () => {
      expect(() => catalogue.importLabelsCsv(`${shas[0]},glass\n`, "import")).toThrow(CsvParseError);
      expect(() => catalogue.importLabelsCsv('sha256,label\n"open', "import")).toThrow("no closing quote");
      expect(catalogue.count("pending")).toBe(4);
    });
  });

  describe("exportTrainingCsv", () => {
    it("writes absolute paths of labelled examples", () => {
      const a = catalogue.add(glass[0]!, makeMeta("f-1")).sha256;
      const b = catalogue.add(metal[0]!, makeMeta("f-2")).sha256;
      const c = catalogue.add(glass[1]!, makeMeta("f-3")).sha256;
      catalogue.add(paper[0]!, makeMeta("f-4"));
      const d = catalogue.add(paper[1]!, makeMeta("f-5")).sha256;
      catalogue.label(a, "glass", "ana");
      catalogue.label(b, "metal", "ana");
      clock.advance(MINUTE);
      catalogue.label(c, "glass", "ana");
      catalogue.discard(d, "ana");
      const file = path.join(temp.dir, "out", "..", "train.csv");

      const result = catalogue.exportTrainingCsv(file);

      expect(result).toEqual({ rows: 3, perClass: { glass: 2, metal: 1 } });
      const records = parseCsv(readFileSync(path.join(temp.dir, "train.csv"), "utf8")).map((record) => record.fields);
      expect(records[0]).toEqual(["path", "label"]);
      expect(records.slice(1)).toEqual(
        [
          [catalogue.imagePath(a), "glass"],
          [catalogue.imagePath(c), "glass"],
          [catalogue.imagePath(b), "metal"],
        ].sort((x, y) => x[1]!.localeCompare(y[1]!) || x[0]!.localeCompare(y[0]!)),
      );
      for (const [imagePath] of records.slice(1)) {
        expect(path.isAbsolute(imagePath!)).toBe(true);
        expect(existsSync(imagePath!)).toBe(true);
      }
      expect(readdirSync(temp.dir).filter((name) => name.endsWith(".tmp"))).toEqual([]);

      const since = catalogue.exportTrainingCsv(file, { since: new Date(T0 + MINUTE).toISOString() });
      expect(since).toEqual({ rows: 1, perClass: { glass: 1 } });
    });

    it("writes a header for an empty catalogue", () => {
      const file = path.join(temp.dir, "train.csv");

      expect(catalogue.exportTrainingCsv(file)).toEqual({ rows: 0, perClass: {} });
      expect(readFileSync(file, "utf8")).toBe("path,label\n");
    });

    it("rejects an invalid since time", () => {
      expect(() => catalogue.exportTrainingCsv(path.join(temp.dir, "x.csv"), { since: "last week" })).toThrow("invalid since 'last week'");
    });
  });

  describe("stats and markTrained", () => {
    it("counts by status, label, device and training", () => {
      const a = catalogue.add(glass[0]!, makeMeta("f-1", { device: "edge-1" })).sha256;
      const b = catalogue.add(metal[0]!, makeMeta("f-2", { device: "edge-1" })).sha256;
      const c = catalogue.add(glass[1]!, makeMeta("f-3", { device: "edge-2", site: "plant-b" })).sha256;
      catalogue.add(glass[1]!, makeMeta("f-3", { device: "edge-2", site: "plant-b" }));
      const d = catalogue.add(paper[0]!, makeMeta("f-4", { device: "edge-2", site: "plant-b" })).sha256;
      catalogue.label(a, "glass", "ana");
      catalogue.label(b, "metal", "ana");
      catalogue.discard(d, "ana");

      const before = catalogue.stats();

      expect(before.total).toBe(4);
      expect(before.byStatus).toEqual({ pending: 1, labelled: 2, discarded: 1 });
      expect(before.byLabel).toEqual({ glass: 1, metal: 1 });
      expect(before.lastTraining).toBeNull();
      expect(before.labelledSinceLastTraining).toBe(2);
      expect(before.devices).toEqual([
        { site: "plant-a", device: "edge-1", pending: 0, labelled: 2, discarded: 0, seen: 2 },
        { site: "plant-b", device: "edge-2", pending: 1, labelled: 0, discarded: 1, seen: 3 },
      ]);

      clock.advance(MINUTE);
      const training = catalogue.markTrained("1.3.0", [a, b, a]);
      expect(training).toEqual({ id: 1, modelVersion: "1.3.0", trainedAt: T0 + MINUTE, examples: 2 });
      expect(catalogue.trainedExamples(training.id)).toEqual(
        [
          { sha256: a, label: "glass" },
          { sha256: b, label: "metal" },
        ].sort((x, y) => x.sha256.localeCompare(y.sha256)),
      );
      expect(catalogue.stats().labelledSinceLastTraining).toBe(0);

      // Same clock time as the training: the count must not depend on timestamps.
      catalogue.label(c, "glass", "ana");
      const after = catalogue.stats();
      expect(after.labelledSinceLastTraining).toBe(1);
      expect(after.lastTraining).toEqual(training);
    });

    it("records nothing when an example is not labelled", () => {
      const a = catalogue.add(glass[0]!, makeMeta("f-1")).sha256;
      const b = catalogue.add(metal[0]!, makeMeta("f-2")).sha256;
      catalogue.label(a, "glass", "ana");

      expect(() => catalogue.markTrained("1.3.0", [a, b])).toThrow(`example ${b} is pending; only labelled examples can be marked as trained`);
      expect(() => catalogue.markTrained("1.3.0", [a, "0".repeat(64)])).toThrow(ExampleNotFoundError);
      expect(catalogue.stats().lastTraining).toBeNull();
    });
  });

  describe("persistence", () => {
    it("keeps everything after close and reopen", () => {
      const a = catalogue.add(glass[0]!, makeMeta("f-1", { embedding: new Float32Array([1, 2]) })).sha256;
      const b = catalogue.add(metal[0]!, makeMeta("f-2")).sha256;
      const c = catalogue.add(paper[0]!, makeMeta("f-3")).sha256;
      catalogue.addClass("styrofoam");
      catalogue.label(a, "styrofoam", "ana");
      catalogue.discard(b, "ana");
      catalogue.markTrained("1.3.0", [a]);
      const records = [a, b, c].map((sha) => catalogue.get(sha));
      const stats = catalogue.stats();
      catalogue.close();

      expect(existsSync(path.join(temp.dir, "catalogue.db-wal")) ? statSync(path.join(temp.dir, "catalogue.db-wal")).size : 0).toBe(0);
      catalogue = open();

      expect([a, b, c].map((sha) => catalogue.get(sha))).toEqual(records);
      expect(catalogue.classes()).toEqual([...BASE_CLASSES, "styrofoam"]);
      expect(catalogue.stats()).toEqual(stats);
      expect(Array.from(catalogue.embedding(a)!)).toEqual([1, 2]);
    });

    it("uses WAL with synchronous FULL", () => {
      // synchronous is a per-connection setting, so it is read from the catalogue's own connection.
      const connection = (catalogue as unknown as { db: Database.Database }).db;
      expect(connection.pragma("synchronous", { simple: true })).toBe(2);

      const db = new Database(catalogue.file, { readonly: true });
      try {
        expect(db.pragma("journal_mode", { simple: true })).toBe("wal");
        expect(db.pragma("user_version", { simple: true })).toBe(1);
      } finally {
        db.close();
      }
    });

    it("rejects a schema newer than this build", () => {
      catalogue.close();
      const db = new Database(path.join(temp.dir, "catalogue.db"));
      db.pragma("user_version = 99");
      db.close();

      expect(() => open()).toThrow(CatalogueOpenError);
      expect(() => open()).toThrow("schema version 99 is newer than this sortline reads (1)");
    });

    it("rejects a file that is not SQLite", () => {
      catalogue.close();
      writeFileSync(path.join(temp.dir, "catalogue.db"), "not a database, just text that is long enough to fill a header page");
      for (const suffix of ["-wal", "-shm"]) {
        writeFileSync(path.join(temp.dir, `catalogue.db${suffix}`), "");
      }

      expect(() => open()).toThrow(CatalogueOpenError);
    });

    it("rejects invalid base classes", () => {
      expect(() => Catalogue.open(temp.dir, { baseClasses: ["Glass"] })).toThrow(InvalidClassNameError);
    });

    it("raises after close", () => {
      catalogue.close();

      expect(() => catalogue.list()).toThrow("is closed");
    });
  });
});
