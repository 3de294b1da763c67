import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { ModelLoadError } from "../../src/lib/errors.js";
import { generateKeyPair, PackageUnsignedError, signPackage, UntrustedKeyError } from "../../src/models/signing.js";
import { ModelStore, ModelStoreError, type ActivePointer } from "../../src/update/store.js";
import { makeTempDir } from "../audit/helpers.js";
import { defaultModelDir, writeFakePackage } from "./helpers.js";

describe("ModelStore", () => {
  let temp: ReturnType<typeof makeTempDir>;
  const keys = generateKeyPair();
  const trustedKeys = [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }];
  let bundled: string;

  beforeEach(() => {
    temp = makeTempDir("store");
    bundled = writeFakePackage(path.join(temp.dir, "bundled"), { version: "0.9.0" });
  });

  afterEach(() => {
    temp.remove();
  });

  const openStore = (): Promise<ModelStore> => ModelStore.open(path.join(temp.dir, "state"), { trustedKeys });

  /** Writes and signs a fake package of `version` and returns its folder. */
  const signedPackage = async (version: string, options: { knowledge?: boolean } = {}): Promise<string> => {
    const dir = writeFakePackage(path.join(temp.dir, `pkg-${version}`), { version, ...options });
    await signPackage(dir, keys.privateKeyPem);
    return dir;
  };

  const readPointerFile = (store: ModelStore): ActivePointer => JSON.parse(readFileSync(store.pointerFile, "utf8")) as ActivePointer;

  it("installs a signed package under versions/", async () => {
    const store = await openStore();
    const id = await store.install(await signedPackage("1.0.0", { knowledge: true }));
    expect(id).toMatch(/^sortline-fake-1\.0\.0-[0-9a-f]{12}$/);
    expect(readdirSync(store.versionsDir)).toEqual([id]);
    expect(readdirSync(path.join(store.versionsDir, id)).sort()).toEqual(["knowledge.json", "manifest.json", "model.onnx", "signature.json"]);
    expect((await store.verify(id)).keyId).toBe(keys.keyId);
    expect(existsSync(store.pointerFile)).toBe(false);
  });

  it("installs the same package twice as one version", async () => {
    const store = await openStore();
    const dir = await signedPackage("1.0.0");
    const first = await store.install(dir);
    const second = await store.install(dir);
    expect(second).toBe(first);
    expect(readdirSync(store.versionsDir)).toEqual([first]);
  });

  it("replaces a stored copy that no longer verifies", async () => {
    const store = await openStore();
    const dir = await signedPackage("1.0.0");
    const id = await store.install(dir);
    appendFileSync(path.join(store.versionDir(id), "model.onnx"), "x");
    await expect(store.verify(id)).rejects.toThrow(ModelLoadError);
    expect(await store.install(dir)).toBe(id);
    await store.verify(id);
    expect(readdirSync(store.versionsDir)).toEqual([id]);
  });

  it("rejects unsigned and untrusted packages without a trace", async () => {
    const store = await openStore();
    const unsigned = writeFakePackage(path.join(temp.dir, "unsigned"));
    await expect(store.install(unsigned)).rejects.toThrow(PackageUnsignedError);
    const foreign = writeFakePackage(path.join(temp.dir, "foreign"));
    await signPackage(foreign, generateKeyPair().privateKeyPem);
    await expect(store.install(foreign)).rejects.toThrow(UntrustedKeyError);
    expect(readdirSync(store.versionsDir)).toEqual([]);
  });

  it("activates versions and keeps the history", async () => {
    const store = await openStore();
    const first = await store.install(await signedPackage("1.0.0"));
    const second = await store.install(await signedPackage("1.0.1"));
    const third = await store.install(await signedPackage("1.0.2"));

    const pointer1 = await store.activate(first);
    expect(pointer1.previous).toBeNull();
    expect(pointer1.history).toEqual([]);
    await store.activate(second);
    const pointer3 = await store.activate(third);
    expect(pointer3.id).toBe(third);
    expect(pointer3.previous).toBe(second);
    expect(pointer3.history).toEqual([second, first]);
    expect(pointer3.dir).toBe(store.versionDir(third));
    expect(pointer3.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(Date.parse(pointer3.activatedAt)).not.toBeNaN();
    expect(readPointerFile(store)).toEqual(pointer3);

    const again = await store.activate(third);
    expect(again).toEqual(pointer3);
    const back = await store.activate(first);
    expect(back.history).toEqual([third, second]);
    expect(readdirSync(store.root).filter((name) => name.startsWith(".tmp-"))).toEqual([]);
  });

  it("refuses to activate a version that does not verify", async () => {
    const store = await openStore();
    const first = await store.install(await signedPackage("1.0.0"));
    const second = await store.install(await signedPackage("1.0.1"));
    await store.activate(first);
    writeFileSync(path.join(store.versionDir(second), "manifest.json"), "{}");
    await expect(store.activate(second)).rejects.toThrow(ModelLoadError);
    expect((await store.readPointer())?.id).toBe(first);
    await expect(store.activate("no-such-1.0.0-000000000000")).rejects.toThrow(ModelLoadError);
    await expect(store.activate("../escape")).rejects.toThrow(ModelStoreError);
  });

  it("rolls back to the previous verified version", async () => {
    const store = await openStore();
    const ids = [];
    for (const version of ["1.0.0", "1.0.1", "1.0.2"]) {
      ids.push(await store.install(await signedPackage(version)));
      await store.activate(ids.at(-1)!);
    }
    rmSync(path.join(store.versionDir(ids[1]!), "model.onnx"));

    expect(await store.rollback()).toBe(ids[0]);
    const pointer = await store.readPointer();
    expect(pointer?.id).toBe(ids[0]);
    expect(pointer?.previous).toBeNull();
    expect(pointer?.history).toEqual([]);
    await expect(store.rollback()).rejects.toThrow(/cannot roll back from .*: no earlier version verifies/);
  });

  it("rejects a rollback with nothing active", async () => {
    const store = await openStore();
    await expect(store.rollback()).rejects.toThrow(ModelStoreError);
  });

  it("prunes old versions but keeps active and previous", async () => {
    const store = await openStore();
    const ids: string[] = [];
    for (const version of ["1.0.0", "1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"]) {
      ids.push(await store.install(await signedPackage(version)));
    }
    await store.activate(ids[0]!);
    await store.activate(ids[1]!);

    const removed = await store.prune(1);
    expect(removed.sort()).toEqual(ids.slice(2).sort());
    expect(readdirSync(store.versionsDir).sort()).toEqual([ids[0], ids[1]].sort());
    await expect(store.remove(ids[0]!)).rejects.toThrow(/it is the previous version/);
    await expect(store.remove(ids[1]!)).rejects.toThrow(/it is the active version/);
  });

  it("prunes to the history first, then newest", async () => {
    const store = await openStore();
    const ids: string[] = [];
    for (const version of ["1.0.0", "1.0.1", "1.0.2", "1.0.3"]) {
      ids.push(await store.install(await signedPackage(version)));
      await store.activate(ids.at(-1)!);
    }
    const extra = await store.install(await signedPackage("2.0.0"));
    expect(await store.prune(3)).toEqual(expect.arrayContaining([ids[0], extra]));
    const versions = await store.list();
    expect(versions.map((version) => version.id).sort()).toEqual(ids.slice(1).sort());
    expect(versions.find((version) => version.active)?.id).toBe(ids[3]);
    expect(versions.find((version) => version.previous)?.id).toBe(ids[2]);
    expect(versions.every((version) => version.name === "sortline-fake")).toBe(true);
  });

  it("removes a version that is neither active nor previous", async () => {
    const store = await openStore();
    const id = await store.install(await signedPackage("1.0.0"));
    await store.remove(id);
    expect(readdirSync(store.versionsDir)).toEqual([]);
    await store.remove(id);
  });

  it("sweeps leftovers of interrupted operations at open", async () => {
    const store = await openStore();
    mkdirSync(path.join(store.versionsDir, ".staging-abc"));
    writeFileSync(path.join(store.versionsDir, ".staging-abc", "model.onnx"), "half");
    mkdirSync(path.join(store.versionsDir, ".trash-def"));
    writeFileSync(path.join(store.root, ".tmp-active.json-1-00"), "{\"id\":");
    const scratch = await store.createScratchDir("unpack");
    writeFileSync(path.join(scratch, "x"), "x");

    const reopened = await openStore();
    expect(readdirSync(reopened.versionsDir)).toEqual([]);
    expect(readdirSync(reopened.root).sort()).toEqual(["versions"]);
  });

  describe("resolveActive", () => {
    it("returns the bundled default when nothing is active", async () => {
      const store = await openStore();
      const resolved = await store.resolveActive({ bundledDefault: bundled });
      expect(resolved.source).toBe("bundled");
      expect(resolved.dir).toBe(bundled);
      expect(resolved.fellBack).toBe(false);
      expect(resolved.id).toMatch(/^sortline-fake-0\.9\.0-[0-9a-f]{12}$/);
      expect(resolved.manifest.version).toBe("0.9.0");
    });

    it("returns the real bundled default model", async () => {
      const store = await openStore();
      const resolved = await store.resolveActive({ bundledDefault: defaultModelDir });
      expect(resolved.manifest.name).toBe("sortline-trashnet");
      expect(resolved.source).toBe("bundled");
    });

    it("returns the active version when it verifies", async () => {
      const store = await openStore();
      const id = await store.install(await signedPackage("1.0.0"));
      await store.activate(id);
      const resolved = await store.resolveActive({ bundledDefault: bundled });
      expect(resolved).toMatchObject({ id, source: "store", fellBack: false, dir: store.versionDir(id) });
      expect(resolved.reason).toBeUndefined();
    });

    it("falls back to the previous version, then the bundled default", async () => {
      const store = await openStore();
      const first = await store.install(await signedPackage("1.0.0"));
      const second = await store.install(await signedPackage("1.0.1"));
      await store.activate(first);
      await store.activate(second);

      appendFileSync(path.join(store.versionDir(second), "model.onnx"), "corrupt");
      const previous = await store.resolveActive({ bundledDefault: bundled });
      expect(previous).toMatchObject({ id: first, source: "store", fellBack: true });
      expect(previous.reason).toContain(`version ${second} does not verify`);

      rmSync(path.join(store.versionDir(first), "signature.json"));
      const fallback = await store.resolveActive({ bundledDefault: bundled });
      expect(fallback).toMatchObject({ source: "bundled", fellBack: true, dir: bundled });
      expect(fallback.reason).toContain("is not signed");
    });

    it("rejects stored versions signed by keys no longer trusted", async () => {
      const store = await openStore();
      const id = await store.install(await signedPackage("1.0.0"));
      await store.activate(id);
      const resolved = await store.resolveActive({ bundledDefault: bundled, trustedKeys: [] });
      expect(resolved.source).toBe("bundled");
      expect(resolved.reason).toContain("not trusted");
    });

    it("falls back when active.json is invalid", async () => {
      const store = await openStore();
      writeFileSync(store.pointerFile, "{\"id\": \"x");
      const resolved = await store.resolveActive({ bundledDefault: bundled });
      expect(resolved).toMatchObject({ source: "bundled", fellBack: true });
      expect(resolved.reason).toContain("not valid JSON");
    });

    it("throws when the bundled default is broken too", async () => {
      const store = await openStore();
      appendFileSync(path.join(bundled, "model.onnx"), "corrupt");
      await expect(store.resolveActive({ bundledDefault: bundled })).rejects.toThrow(/no usable model: bundled default/);
    });

    it("uses the bundled default after deactivate", async () => {
      const store = await openStore();
      const id = await store.install(await signedPackage("1.0.0"));
      await store.activate(id);
      await store.deactivate();
      const resolved = await store.resolveActive({ bundledDefault: bundled });
      expect(resolved).toMatchObject({ source: "bundled", fellBack: false });
    });
  });
});
