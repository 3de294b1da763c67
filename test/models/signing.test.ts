import { createHash, generateKeyPairSync } from "node:crypto";
import { appendFileSync, existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { ModelLoadError } from "../../src/lib/errors.js";
import {
  BadSignatureError,
  generateKeyPair,
  keyIdOf,
  PackageUnsignedError,
  signPackage,
  UntrustedKeyError,
  verifyPackage,
  verifyPackageFiles,
  type PackageSignature,
} from "../../src/models/signing.js";
import { makeTempDir } from "../audit/helpers.js";
import { copyDefaultPackage, writeFakePackage } from "../update/helpers.js";

describe("package signing", () => {
  let temp: ReturnType<typeof makeTempDir>;
  const keys = generateKeyPair();
  const trusted = [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }];

  beforeEach(() => {
    temp = makeTempDir("signing");
  });

  afterEach(() => {
    temp.remove();
  });

  const fakePackage = (options: Parameters<typeof writeFakePackage>[1] = {}): string => writeFakePackage(path.join(temp.dir, "pkg"), options);

  it("derives the key id from the DER public key", () => {
    const der = Buffer.from(keys.publicKeyPem.replace(/-----[^-]+-----|\s/g, ""), "base64");
    expect(keys.keyId).toBe(createHash("sha256").update(der).digest("hex").slice(0, 16));
    expect(keyIdOf(keys.publicKeyPem)).toBe(keys.keyId);
    expect(keys.privateKeyPem).toContain("BEGIN PRIVATE KEY");
  });

  it("signs and verifies a package", async () => {
    const dir = fakePackage({ knowledge: true });
    const signature = await signPackage(dir, keys.privateKeyPem);
    const onDisk = JSON.parse(readFileSync(path.join(dir, "signature.json"), "utf8")) as PackageSignature;
    expect(onDisk).toEqual(signature);
    expect(signature.v).toBe(1);
    expect(signature.algorithm).toBe("ed25519");
    expect(signature.keyId).toBe(keys.keyId);
    expect(signature.manifestSha256).toBe(createHash("sha256").update(readFileSync(path.join(dir, "manifest.json"))).digest("hex"));
    expect(Buffer.from(signature.signature, "base64")).toHaveLength(64);

    const verified = await verifyPackage(dir, trusted);
    expect(verified.keyId).toBe(keys.keyId);
    expect(verified.manifest.version).toBe("1.0.0");
    expect(verified.manifestSha256).toBe(signature.manifestSha256);
  });

  it("verifies a signed copy of the default model", async () => {
    const dir = copyDefaultPackage(path.join(temp.dir, "default"));
    await signPackage(dir, keys.privateKeyPem);
    const verified = await verifyPackage(dir, trusted);
    expect(verified.manifest.name).toBe("sortline-trashnet");
  });

  it("rejects an unsigned package", async () => {
    const dir = fakePackage();
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(PackageUnsignedError);
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/not signed: signature.json is missing/);
  });

  it("rejects a key that is not trusted", async () => {
    const dir = fakePackage();
    const other = generateKeyPair();
    await signPackage(dir, other.privateKeyPem);
    const error = await verifyPackage(dir, trusted).catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(UntrustedKeyError);
    expect((error as UntrustedKeyError).keyId).toBe(other.keyId);
    expect((error as Error).message).toContain(`signed by key ${other.keyId}, which is not trusted`);
    await expect(verifyPackage(dir, [])).rejects.toThrow(/trusted keys: none/);
  });

  it("rejects a trusted entry whose key id does not match its key", async () => {
    const dir = fakePackage();
    const other = generateKeyPair();
    await signPackage(dir, keys.privateKeyPem);
    await expect(verifyPackage(dir, [{ keyId: keys.keyId, publicKeyPem: other.publicKeyPem }])).rejects.toThrow(UntrustedKeyError);
  });

  it("rejects a signature made by another key under a trusted key id", async () => {
    const dir = fakePackage();
    const other = generateKeyPair();
    await signPackage(dir, other.privateKeyPem);
    const file = path.join(dir, "signature.json");
    const forged = JSON.parse(readFileSync(file, "utf8")) as PackageSignature;
    forged.keyId = keys.keyId;
    writeFileSync(file, JSON.stringify(forged));
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(BadSignatureError);
  });

  it("rejects a manifest changed after signing", async () => {
    const dir = fakePackage();
    await signPackage(dir, keys.privateKeyPem);
    appendFileSync(path.join(dir, "manifest.json"), " ");
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(BadSignatureError);
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/does not match manifest.json/);
  });

  it("rejects a signature whose manifest sha256 field was edited", async () => {
    const dir = fakePackage();
    await signPackage(dir, keys.privateKeyPem);
    const file = path.join(dir, "signature.json");
    const signature = JSON.parse(readFileSync(file, "utf8")) as PackageSignature;
    signature.manifestSha256 = "0".repeat(64);
    writeFileSync(file, JSON.stringify(signature));
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/names manifest sha256/);
  });

  it("rejects malformed signature files", async () => {
    const dir = fakePackage();
    const file = path.join(dir, "signature.json");
    const cases: Array<[string, RegExp]> = [
      ["{", /not valid JSON/],
      ["null", /expected a JSON object/],
      [JSON.stringify({ v: 2, algorithm: "ed25519" }), /expected v 1 and algorithm ed25519/],
      [JSON.stringify({ v: 1, algorithm: "rsa" }), /expected v 1 and algorithm ed25519/],
      [JSON.stringify({ v: 1, algorithm: "ed25519", keyId: "xyz" }), /keyId must be 16/],
      [JSON.stringify({ v: 1, algorithm: "ed25519", keyId: keys.keyId, manifestSha256: "ab" }), /manifestSha256 must be/],
      [JSON.stringify({ v: 1, algorithm: "ed25519", keyId: keys.keyId, manifestSha256: "a".repeat(64), signature: "" }), /signature must be/],
    ];
    for (const [text, message] of cases) {
      writeFileSync(file, text);
      const error = await verifyPackage(dir, trusted).catch((caught: unknown) => caught);
      expect(error, text).toBeInstanceOf(BadSignatureError);
      expect((error as Error).message, text).toMatch(message);
    }
  });

  it("rejects a model file changed after signing", async () => {
    const dir = fakePackage();
    await signPackage(dir, keys.privateKeyPem);
    const model = path.join(dir, "model.onnx");
    const bytes = readFileSync(model);
    bytes[100] = bytes[100]! ^ 0xff;
    writeFileSync(model, bytes);
    const error = await verifyPackage(dir, trusted).catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(ModelLoadError);
    expect(error).not.toBeInstanceOf(BadSignatureError);
    expect((error as Error).message).toMatch(/has sha256 [0-9a-f]{64}; the manifest says/);
  });

  it("rejects a missing model file", async () => {
    const dir = fakePackage();
    await signPackage(dir, keys.privateKeyPem);
    rmSync(path.join(dir, "model.onnx"));
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/model file .* not found/);
  });

  it("checks the knowledge file named by the manifest", async () => {
    const dir = fakePackage({ knowledge: true });
    await signPackage(dir, keys.privateKeyPem);
    writeFileSync(path.join(dir, "knowledge.json"), "{}");
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/knowledge file .* has sha256/);
    rmSync(path.join(dir, "knowledge.json"));
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/knowledge file .* not found/);
    await expect(verifyPackageFiles(dir)).rejects.toThrow(/knowledge file .* not found/);
  });

  it("checks the knowledge file size when given", async () => {
    const dir = fakePackage({ knowledge: true });
    const manifestPath = path.join(dir, "manifest.json");
    const manifest = JSON.parse(readFileSync(manifestPath, "utf8")) as { knowledge: { bytes?: number } };
    manifest.knowledge.bytes = 3;
    writeFileSync(manifestPath, JSON.stringify(manifest));
    await signPackage(dir, keys.privateKeyPem);
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/knowledge file .* has \d+ bytes; the manifest says 3/);
  });

  it("rejects a knowledge entry that is not a plain file name", async () => {
    const dir = fakePackage();
    const manifestPath = path.join(dir, "manifest.json");
    const manifest = JSON.parse(readFileSync(manifestPath, "utf8")) as Record<string, unknown>;
    manifest.knowledge = { file: "../outside.json", sha256: "a".repeat(64) };
    writeFileSync(manifestPath, JSON.stringify(manifest));
    await signPackage(dir, keys.privateKeyPem);
    await expect(verifyPackage(dir, trusted)).rejects.toThrow(/knowledge.file '..\/outside.json' is not a plain file name/);
  });

  it("keeps private keys out of error messages", async () => {
    const dir = fakePackage();
    const rsa = generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey.export({ type: "pkcs8", format: "pem" }).toString();
    const broken = keys.privateKeyPem.replace(/[A-Za-z]{8}/, "AAAAAAAA");
    for (const key of [rsa, broken, "not a key"]) {
      const error = await signPackage(dir, key).catch((caught: unknown) => caught);
      expect(error).toBeInstanceOf(BadSignatureError);
      const text = `${(error as Error).message} ${String((error as Error).cause ?? "")} ${(error as Error).stack ?? ""}`;
      expect(text).toMatch(/invalid signing key/);
      expect(text).not.toContain(key.split("\n")[1] ?? key);
    }
    expect(existsSync(path.join(dir, "signature.json"))).toBe(false);
  });

  it("accepts an unsigned package in the file-only check", async () => {
    const dir = fakePackage({ knowledge: true });
    const pkg = await verifyPackageFiles(dir);
    expect(pkg.manifest.name).toBe("sortline-fake");
  });
});
