import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, readFile, stat } from "node:fs/promises";
import path from "node:path";

import { ModelLoadError } from "../lib/errors.js";
import { readModelPackage, type ModelPackage } from "./manifest.js";

/** Name of the signature file inside a model package folder. */
export const SIGNATURE_FILE = "signature.json";

/** A public key that may sign model packages. */
export interface TrustedKey {
  keyId: string;
  publicKeyPem: string;
}

export interface SigningKeyPair extends TrustedKey {
  /** PKCS#8 PEM, to be kept on the signing host. No sortline log line or error message contains it. */
  privateKeyPem: string;
}

/** Contents of `signature.json`. */
export interface PackageSignature {
  v: 1;
  algorithm: "ed25519";
  keyId: string;
  /** Hex sha256 of the exact bytes of manifest.json. */
  manifestSha256: string;
  /** Base64 ed25519 signature over the exact bytes of manifest.json. */
  signature: string;
}

/** Optional manifest entry for a class knowledge file that ships in the package. */
export interface KnowledgeEntry {
  file: string;
  sha256: string;
  /** Size in bytes, checked when present. */
  bytes?: number;
}

/** A package whose signature and file hashes were checked. */
export interface VerifiedPackage extends ModelPackage {
  keyId: string;
  manifestSha256: string;
}

/** A package folder without `signature.json`. */
export class PackageUnsignedError extends ModelLoadError {}

/** A package signed by a key that is not in the trusted list. */
export class UntrustedKeyError extends ModelLoadError {
  constructor(
    readonly keyId: string,
    message: string,
  ) {
    super(message);
  }
}

/** A signature that is malformed or does not match manifest.json. */
export class BadSignatureError extends ModelLoadError {}

const SAFE_FILE_NAME = /^[A-Za-z0-9._-]+$/;
/**
 * Read size for hashing. Large reads keep the number of event-loop turns low: while a busy
 * pipeline runs inference, each turn can wait for a whole batch.
 */
const HASH_CHUNK_BYTES = 4 * 1024 * 1024;
const HEX_SHA256 = /^[0-9a-f]{64}$/;
const KEY_ID = /^[0-9a-f]{16}$/;

/** Returns the key id of a public key: the first 16 hex digits of the sha256 of its DER (SPKI) encoding. */
export function keyIdOf(publicKey: string | KeyObject): string {
  const key = typeof publicKey === "string" ? createPublicKey(publicKey) : publicKey;
  const der = key.export({ type: "spki", format: "der" });
  return createHash("sha256").update(der).digest("hex").slice(0, 16);
}

/** Generates an ed25519 key pair for signing model packages. */
export function generateKeyPair(): SigningKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  return {
    keyId: keyIdOf(publicKey),
    publicKeyPem: publicKey.export({ type: "spki", format: "pem" }).toString(),
    privateKeyPem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
  };
}

/** Parses a private key. The error message never repeats the key text, and the parser's error is not attached. */
function parsePrivateKey(privateKeyPem: string): KeyObject {
  let key: KeyObject;
  try {
    key = createPrivateKey(privateKeyPem);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? "parse error";
    throw new BadSignatureError(`invalid signing key: not a PEM private key (${code})`);
  }
  if (key.asymmetricKeyType !== "ed25519") {
    throw new BadSignatureError(`invalid signing key: expected an ed25519 key, got ${key.asymmetricKeyType ?? "unknown type"}`);
  }
  return key;
}

function parseTrustedKey(trusted: TrustedKey): KeyObject {
  try {
    return createPublicKey(trusted.publicKeyPem);
  } catch {
    throw new UntrustedKeyError(trusted.keyId, `trusted key ${trusted.keyId} is not a valid PEM public key`);
  }
}

/** Returns the knowledge entry of a manifest, or undefined when it has none. */
export function knowledgeEntry(pkg: ModelPackage): KnowledgeEntry | undefined {
  const raw = (pkg.manifest as unknown as Record<string, unknown>).knowledge;
  if (raw === undefined) {
    return undefined;
  }
  const entry = raw as Partial<KnowledgeEntry> | null;
  const manifestPath = path.join(pkg.dir, "manifest.json");
  if (typeof entry !== "object" || entry === null || typeof entry.file !== "string" || typeof entry.sha256 !== "string") {
    throw new ModelLoadError(`${manifestPath} is invalid: knowledge must be an object with file and sha256`);
  }
  if (!SAFE_FILE_NAME.test(entry.file) || entry.file === "." || entry.file === "..") {
    throw new ModelLoadError(`${manifestPath} is invalid: knowledge.file '${entry.file}' is not a plain file name`);
  }
  if (!HEX_SHA256.test(entry.sha256)) {
    throw new ModelLoadError(`${manifestPath} is invalid: knowledge.sha256 must be 64 lowercase hex digits`);
  }
  if (entry.bytes !== undefined && !(Number.isSafeInteger(entry.bytes) && entry.bytes >= 0)) {
    throw new ModelLoadError(`${manifestPath} is invalid: knowledge.bytes must be a non-negative integer`);
  }
  return { file: entry.file, sha256: entry.sha256, ...(entry.bytes !== undefined ? { bytes: entry.bytes } : {}) };
}

/** Returns the size and hex sha256 of a file, or throws ModelLoadError naming `what` when it cannot be read. */
async function hashFile(file: string, what: string): Promise<{ size: number; sha256: string }> {
  try {
    const size = (await stat(file)).size;
    const hash = createHash("sha256");
    for await (const chunk of createReadStream(file, { highWaterMark: HASH_CHUNK_BYTES })) {
      hash.update(chunk as Buffer);
    }
    return { size, sha256: hash.digest("hex") };
  } catch (error) {
    throw new ModelLoadError(`${what} ${file} not found`, { cause: error });
  }
}

/** Checks a file's size (when `bytes` is given) and sha256, with the same messages as verifyModelFile. */
async function checkFile(file: string, what: string, expected: { sha256: string; bytes?: number }): Promise<void> {
  const { size, sha256 } = await hashFile(file, what);
  if (expected.bytes !== undefined && size !== expected.bytes) {
    throw new ModelLoadError(`${what} ${file} has ${size} bytes; the manifest says ${expected.bytes}`);
  }
  if (sha256 !== expected.sha256) {
    throw new ModelLoadError(`${what} ${file} has sha256 ${sha256}; the manifest says ${expected.sha256}`);
  }
}

/**
 * Checks the sha256 of every file the manifest names: the model file (and its size) and the
 * knowledge file when the manifest has one. The signature is not checked here, so this suits
 * the bundled default package, which ships with the software.
 */
export async function verifyPackageFiles(dir: string): Promise<ModelPackage> {
  const pkg = await readModelPackage(dir);
  await checkFile(pkg.modelPath, "model file", pkg.manifest.file);
  const knowledge = knowledgeEntry(pkg);
  if (knowledge) {
    await checkFile(path.join(dir, knowledge.file), "knowledge file", knowledge);
  }
  return pkg;
}

/** Signs a package folder: writes `signature.json` over the current bytes of its manifest.json. */
export async function signPackage(dir: string, privateKeyPem: string): Promise<PackageSignature> {
  const key = parsePrivateKey(privateKeyPem);
  const manifestBytes = await readFile(path.join(dir, "manifest.json"));
  const signature: PackageSignature = {
    v: 1,
    algorithm: "ed25519",
    keyId: keyIdOf(createPublicKey(key)),
    manifestSha256: createHash("sha256").update(manifestBytes).digest("hex"),
    signature: sign(null, manifestBytes, key).toString("base64"),
  };
  const handle = await open(path.join(dir, SIGNATURE_FILE), "w");
  try {
    await handle.writeFile(`${JSON.stringify(signature, null, 2)}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  return signature;
}

async function readSignature(dir: string): Promise<PackageSignature> {
  const file = path.join(dir, SIGNATURE_FILE);
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      throw new PackageUnsignedError(`model package ${dir} is not signed: ${SIGNATURE_FILE} is missing`);
    }
    throw new ModelLoadError(`cannot read ${file}: ${(error as Error).message}`, { cause: error });
  }
  let document: Partial<PackageSignature>;
  try {
    document = JSON.parse(text) as Partial<PackageSignature>;
  } catch (error) {
    throw new BadSignatureError(`${file} is not valid JSON: ${(error as Error).message}`);
  }
  if (typeof document !== "object" || document === null) {
    throw new BadSignatureError(`${file} is invalid: expected a JSON object`);
  }
  if (document.v !== 1 || document.algorithm !== "ed25519") {
    throw new BadSignatureError(`${file} is invalid: expected v 1 and algorithm ed25519, got v ${String(document.v)} and ${String(document.algorithm)}`);
  }
  if (typeof document.keyId !== "string" || !KEY_ID.test(document.keyId)) {
    throw new BadSignatureError(`${file} is invalid: keyId must be 16 lowercase hex digits`);
  }
  if (typeof document.manifestSha256 !== "string" || !HEX_SHA256.test(document.manifestSha256)) {
    throw new BadSignatureError(`${file} is invalid: manifestSha256 must be 64 lowercase hex digits`);
  }
  if (typeof document.signature !== "string" || document.signature.length === 0) {
    throw new BadSignatureError(`${file} is invalid: signature must be a base64 string`);
  }
  return document as PackageSignature;
}

/**
 * Verifies a package folder in this order: `signature.json` is present, its key is trusted, the
 * signature is valid over the exact bytes of manifest.json, and every file the manifest names
 * has its sha256. Throws PackageUnsignedError, UntrustedKeyError, BadSignatureError or
 * ModelLoadError (invalid manifest, missing file, size or sha256 mismatch).
 */
export async function verifyPackage(dir: string, trustedKeys: readonly TrustedKey[]): Promise<VerifiedPackage> {
  const signature = await readSignature(dir);
  const trusted = trustedKeys.find((key) => key.keyId === signature.keyId);
  if (!trusted) {
    const known = trustedKeys.map((key) => key.keyId).join(", ") || "none";
    throw new UntrustedKeyError(signature.keyId, `model package ${dir} is signed by key ${signature.keyId}, which is not trusted (trusted keys: ${known})`);
  }
  const publicKey = parseTrustedKey(trusted);
  if (keyIdOf(publicKey) !== trusted.keyId) {
    throw new UntrustedKeyError(trusted.keyId, `trusted key ${trusted.keyId} does not match its public key, whose id is ${keyIdOf(publicKey)}`);
  }

  const manifestPath = path.join(dir, "manifest.json");
  let manifestBytes: Buffer;
  try {
    manifestBytes = await readFile(manifestPath);
  } catch (error) {
    throw new ModelLoadError(`cannot read ${manifestPath}: ${(error as NodeJS.ErrnoException).code ?? error}`, { cause: error });
  }
  const manifestSha256 = createHash("sha256").update(manifestBytes).digest("hex");
  const signatureBytes = Buffer.from(signature.signature, "base64");
  if (!verify(null, manifestBytes, publicKey, signatureBytes)) {
    throw new BadSignatureError(`model package ${dir}: the signature of key ${signature.keyId} does not match manifest.json (manifest changed or signature corrupt)`);
  }
  if (manifestSha256 !== signature.manifestSha256) {
    throw new BadSignatureError(`model package ${dir}: ${SIGNATURE_FILE} names manifest sha256 ${signature.manifestSha256}, but manifest.json has ${manifestSha256}`);
  }

  // NOTE: readModelPackage reads manifest.json a second time, so a writer that replaces the file
  // between the two reads goes unnoticed. Callers verify packages in folders that sortline owns.
  const pkg = await verifyPackageFiles(dir);
  return { ...pkg, keyId: signature.keyId, manifestSha256 };
}
