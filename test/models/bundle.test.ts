import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { BUNDLE_MAGIC, BundleError, MAX_BUNDLE_FILES, packBundle, packBundleToFile, readBundleIndex, unpackBundle, type BundleEntry } from "../../src/models/bundle.js";
import { generateKeyPair, signPackage, verifyPackage } from "../../src/models/signing.js";
import { makeTempDir } from "../audit/helpers.js";
import { copyDefaultPackage, writeFakePackage } from "../update/helpers.js";

/** Builds a bundle by hand from an index and the file contents, so that tests can write invalid ones. */
function rawBundle(index: unknown, contents: Buffer[] = []): Buffer {
  const json = Buffer.from(JSON.stringify(index));
  const length = Buffer.alloc(4);
  length.writeUInt32BE(json.length);
  return Buffer.concat([BUNDLE_MAGIC, length, json, ...contents]);
}

function entry(name: string, data: Buffer): BundleEntry {
  return { name, bytes: data.length, sha256: createHash("sha256").update(data).digest("hex") };
}

describe("model bundles", () => {
  let temp: ReturnType<typeof makeTempDir>;

  beforeEach(() => {
    temp = makeTempDir("bundle");
  });

  afterEach(() => {
    temp.remove();
  });

  const target = (name = "out"): string => path.join(temp.dir, name);

  it("round-trips a package folder", async () => {
    const dir = writeFakePackage(path.join(temp.dir, "pkg"), { knowledge: true });
    const bundle = await packBundle(dir);
    expect(bundle.subarray(0, 7).toString("ascii")).toBe("SLPKG1\n");

    const files = await unpackBundle(bundle, target());
    expect(files.map((file) => file.name)).toEqual(["knowledge.json", "manifest.json", "model.onnx"]);
    for (const name of readdirSync(dir)) {
      expect(readFileSync(path.join(target(), name)).equals(readFileSync(path.join(dir, name))), name).toBe(true);
    }
  });

  it("writes and unpacks a bundle file of the signed default model", async () => {
    const keys = generateKeyPair();
    const dir = copyDefaultPackage(path.join(temp.dir, "pkg"));
    await signPackage(dir, keys.privateKeyPem);
    const file = path.join(temp.dir, "model.slpkg");
    await packBundleToFile(dir, file);

    const index = await readBundleIndex(file);
    expect(index.map((item) => item.name)).toEqual(["knowledge.json", "manifest.json", "model.onnx", "signature.json"]);
    await unpackBundle(file, target());
    const verified = await verifyPackage(target(), [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }]);
    expect(verified.manifest.name).toBe("sortline-trashnet");
  });

  it("bundles files that are symbolic links", async () => {
    const source = path.join(temp.dir, "source.bin");
    writeFileSync(source, "linked");
    mkdirSync(path.join(temp.dir, "pkg"));
    symlinkSync(source, path.join(temp.dir, "pkg", "data.bin"));
    await unpackBundle(await packBundle(path.join(temp.dir, "pkg")), target());
    expect(readFileSync(path.join(target(), "data.bin"), "utf8")).toBe("linked");
  });

  it("rejects folders and too many files", async () => {
    const nested = path.join(temp.dir, "nested");
    mkdirSync(path.join(nested, "sub"), { recursive: true });
    await expect(packBundle(nested)).rejects.toThrow(/contains the folder 'sub'/);

    const many = path.join(temp.dir, "many");
    mkdirSync(many);
    for (let index = 0; index <= MAX_BUNDLE_FILES; index += 1) {
      writeFileSync(path.join(many, `f${index}`), "x");
    }
    await expect(packBundle(many)).rejects.toThrow(/17 files, but the maximum is 16/);
  });

  it("rejects unsafe and duplicate names", async () => {
    const data = Buffer.from("data");
    const names = ["../escape", "a/b", "/etc/passwd", "..", ".", "", "sp ace", "ümlaut", "a\\b", "x".repeat(256)];
    for (const name of names) {
      const bundle = rawBundle({ files: [entry(name, data)] }, [data]);
      const error = await unpackBundle(bundle, target(`n${names.indexOf(name)}`)).catch((caught: unknown) => caught);
      expect(error, name).toBeInstanceOf(BundleError);
      expect((error as Error).message, name).toMatch(/invalid name/);
    }
    expect(existsSync(path.join(temp.dir, "escape"))).toBe(false);

    const duplicate = rawBundle({ files: [entry("a", data), entry("a", data)] }, [data, data]);
    await expect(unpackBundle(duplicate, target("dup"))).rejects.toThrow(/lists 'a' twice/);
  });

  it("rejects more than 16 files", async () => {
    const data = Buffer.from("d");
    const files = Array.from({ length: 17 }, (_, index) => entry(`f${index}`, data));
    await expect(unpackBundle(rawBundle({ files }, files.map(() => data)), target())).rejects.toThrow(/17 files, but the maximum is 16/);
  });

  it("rejects truncated bundles at every cut", async () => {
    const dir = writeFakePackage(path.join(temp.dir, "pkg"), { modelBytes: 4096 });
    const bundle = await packBundle(dir);
    const cuts = [0, 3, 7, 10, 40, bundle.length - 4096, bundle.length - 1];
    for (const cut of cuts) {
      const error = await unpackBundle(bundle.subarray(0, cut), target(`cut${cut}`)).catch((caught: unknown) => caught);
      expect(error, `cut at ${cut}`).toBeInstanceOf(BundleError);
      expect((error as Error).message, `cut at ${cut}`).toMatch(/truncated|magic|not valid JSON/);
      expect(existsSync(target(`cut${cut}`)) ? readdirSync(target(`cut${cut}`)) : [], `cut at ${cut}`).toEqual([]);
    }
  });

  it("rejects trailing bytes and wrong sizes", async () => {
    const data = Buffer.from("four");
    await expect(unpackBundle(rawBundle({ files: [entry("a", data)] }, [data, Buffer.from("x")]), target("t"))).rejects.toThrow(/1 bytes follow the last file/);
    const lying = { ...entry("a", data), bytes: 3 };
    await expect(unpackBundle(rawBundle({ files: [lying] }, [data]), target("s"))).rejects.toThrow(BundleError);
    const negative = { ...entry("a", data), bytes: -4 };
    await expect(unpackBundle(rawBundle({ files: [negative] }, [data]), target("n"))).rejects.toThrow(/invalid size/);
  });

  it("rejects content that does not match its sha256 and removes written files", async () => {
    const good = Buffer.from("good");
    const bad = Buffer.from("evil");
    const bundle = rawBundle({ files: [entry("first", good), entry("second", good)] }, [good, bad]);
    await expect(unpackBundle(bundle, target())).rejects.toThrow(/'second' has sha256 [0-9a-f]{64}; the index expects/);
    expect(readdirSync(target())).toEqual([]);
  });

  it("rejects a bad magic, an oversized index and a broken index", async () => {
    await expect(unpackBundle(Buffer.from("PK\u0003\u0004 not a bundle at all"), target("m"))).rejects.toThrow(/magic SLPKG1/);
    const huge = Buffer.concat([BUNDLE_MAGIC, Buffer.from([0xff, 0xff, 0xff, 0xff])]);
    await expect(unpackBundle(huge, target("h"))).rejects.toThrow(/the maximum is 65536/);
    await expect(unpackBundle(rawBundle({ nofiles: true }), target("i"))).rejects.toThrow(/no files array/);
    await expect(unpackBundle(rawBundle({ files: [] }), target("e"))).rejects.toThrow(/lists no files/);
    await expect(unpackBundle(rawBundle({ files: [{ name: "a", bytes: 1, sha256: "XYZ" }] }, [Buffer.from("a")]), target("s"))).rejects.toThrow(/invalid sha256/);
  });

  it("rejects a target folder that is not empty", async () => {
    const dir = writeFakePackage(path.join(temp.dir, "pkg"));
    mkdirSync(target());
    writeFileSync(path.join(target(), "old"), "x");
    await expect(unpackBundle(await packBundle(dir), target())).rejects.toThrow(/not empty/);
    expect(readdirSync(target())).toEqual(["old"]);
  });
});
