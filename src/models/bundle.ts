import { createHash } from "node:crypto";
import { mkdir, open, readdir, readFile, rm, stat, type FileHandle } from "node:fs/promises";
import path from "node:path";

import { SortlineError } from "../lib/errors.js";

/**
 * One-file transport format of a model package folder, so that a package travels as a single
 * MQTT payload or file:
 *
 *   magic "SLPKG1\n" | uint32 big-endian index length | index JSON | file contents in index order
 *
 * The index JSON is `{"files": [{"name", "bytes", "sha256"}]}`. The bundle carries no
 * signature of its own: `signature.json` travels inside it as one of the files.
 */
export const BUNDLE_MAGIC = Buffer.from("SLPKG1\n", "ascii");

/** Maximum number of files in a bundle. */
export const MAX_BUNDLE_FILES = 16;

/** Maximum size of the index JSON in bytes. An index of 16 entries with 255-character names is below 6 KiB. */
export const MAX_INDEX_BYTES = 64 * 1024;

const HEADER_BYTES = BUNDLE_MAGIC.length + 4;
const COPY_CHUNK_BYTES = 1024 * 1024;
const SAFE_FILE_NAME = /^[A-Za-z0-9._-]{1,255}$/;
const HEX_SHA256 = /^[0-9a-f]{64}$/;

export interface BundleEntry {
  name: string;
  bytes: number;
  sha256: string;
}

/** A bundle that is malformed, truncated, or whose contents do not match its index. */
export class BundleError extends SortlineError {}

/** Returns why `name` is not allowed as a bundle file name, or undefined when it is. */
export function invalidBundleName(name: unknown): string | undefined {
  if (typeof name !== "string") {
    return "the name is not a string";
  }
  if (name.includes("/") || name.includes("\\") || path.isAbsolute(name)) {
    return "the name contains a path separator";
  }
  if (name === "." || name === "..") {
    return "the name refers to a folder";
  }
  if (!SAFE_FILE_NAME.test(name)) {
    return "the name may contain only A-Z, a-z, 0-9, '.', '_' and '-' (1 to 255 characters)";
  }
  return undefined;
}

/** Lists the regular files of a package folder (symbolic links to files count), sorted by name. */
async function packageFiles(dir: string): Promise<string[]> {
  const names: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const info = await stat(path.join(dir, entry.name));
    if (info.isDirectory()) {
      throw new BundleError(`cannot bundle ${dir}: it contains the folder '${entry.name}', but a bundle contains only plain files`);
    }
    if (!info.isFile()) {
      throw new BundleError(`cannot bundle ${dir}: '${entry.name}' is not a regular file`);
    }
    const problem = invalidBundleName(entry.name);
    if (problem) {
      throw new BundleError(`cannot bundle ${dir}: invalid file name '${entry.name}': ${problem}`);
    }
    names.push(entry.name);
  }
  if (names.length === 0) {
    throw new BundleError(`cannot bundle ${dir}: the folder is empty`);
  }
  if (names.length > MAX_BUNDLE_FILES) {
    throw new BundleError(`cannot bundle ${dir}: it has ${names.length} files, but the maximum is ${MAX_BUNDLE_FILES}`);
  }
  return names.sort();
}

/** Packs every file of a package folder into one bundle buffer. The whole package is held in memory. */
export async function packBundle(dir: string): Promise<Buffer> {
  const names = await packageFiles(dir);
  const contents: Buffer[] = [];
  const files: BundleEntry[] = [];
  for (const name of names) {
    const data = await readFile(path.join(dir, name));
    contents.push(data);
    files.push({ name, bytes: data.length, sha256: createHash("sha256").update(data).digest("hex") });
  }
  const index = Buffer.from(JSON.stringify({ files }), "utf8");
  const length = Buffer.alloc(4);
  length.writeUInt32BE(index.length);
  return Buffer.concat([BUNDLE_MAGIC, length, index, ...contents]);
}

/** Packs a package folder into a bundle file and fsyncs it. */
export async function packBundleToFile(dir: string, file: string): Promise<void> {
  const bundle = await packBundle(dir);
  const handle = await open(file, "w");
  try {
    await handle.writeFile(bundle);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Random access to bundle bytes held in memory or in a file. */
interface BundleSource {
  size: number;
  read(position: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

function bufferSource(buffer: Buffer): BundleSource {
  return {
    size: buffer.length,
    read: async (position, length) => buffer.subarray(position, position + length),
    close: async () => {},
  };
}

async function fileSource(file: string): Promise<BundleSource> {
  const handle = await open(file, "r");
  const size = (await handle.stat()).size;
  return {
    size,
    read: async (position, length) => {
      const buffer = Buffer.alloc(length);
      const { bytesRead } = await handle.read(buffer, 0, length, position);
      return buffer.subarray(0, bytesRead);
    },
    close: () => handle.close(),
  };
}

function parseIndex(text: string): BundleEntry[] {
  let document: unknown;
  try {
    document = JSON.parse(text);
  } catch (error) {
    throw new BundleError(`invalid bundle: the index is not valid JSON: ${(error as Error).message}`);
  }
  const files = (document as { files?: unknown } | null)?.files;
  if (!Array.isArray(files)) {
    throw new BundleError("invalid bundle: the index has no files array");
  }
  if (files.length === 0) {
    throw new BundleError("invalid bundle: the index lists no files");
  }
  if (files.length > MAX_BUNDLE_FILES) {
    throw new BundleError(`invalid bundle: the index lists ${files.length} files, but the maximum is ${MAX_BUNDLE_FILES}`);
  }
  const seen = new Set<string>();
  return files.map((raw: unknown, position): BundleEntry => {
    const entry = (raw ?? {}) as Partial<BundleEntry>;
    const problem = invalidBundleName(entry.name);
    if (problem) {
      throw new BundleError(`invalid bundle: file ${position} has the invalid name ${JSON.stringify(entry.name)}: ${problem}`);
    }
    const name = entry.name!;
    if (seen.has(name)) {
      throw new BundleError(`invalid bundle: the index lists '${name}' twice`);
    }
    seen.add(name);
    if (!Number.isSafeInteger(entry.bytes) || entry.bytes! < 0) {
      throw new BundleError(`invalid bundle: '${name}' has the invalid size ${JSON.stringify(entry.bytes)}`);
    }
    if (typeof entry.sha256 !== "string" || !HEX_SHA256.test(entry.sha256)) {
      throw new BundleError(`invalid bundle: '${name}' has an invalid sha256; expected 64 lowercase hex digits`);
    }
    return { name, bytes: entry.bytes!, sha256: entry.sha256 };
  });
}

async function readIndex(source: BundleSource): Promise<{ files: BundleEntry[]; dataStart: number }> {
  if (source.size < HEADER_BYTES) {
    throw new BundleError(`invalid bundle: ${source.size} bytes is shorter than the ${HEADER_BYTES}-byte header (truncated?)`);
  }
  const header = await source.read(0, HEADER_BYTES);
  if (!header.subarray(0, BUNDLE_MAGIC.length).equals(BUNDLE_MAGIC)) {
    throw new BundleError("invalid bundle: it does not start with the magic SLPKG1; is it a sortline model bundle?");
  }
  const indexBytes = header.readUInt32BE(BUNDLE_MAGIC.length);
  if (indexBytes > MAX_INDEX_BYTES) {
    throw new BundleError(`invalid bundle: the index has ${indexBytes} bytes; the maximum is ${MAX_INDEX_BYTES}`);
  }
  if (HEADER_BYTES + indexBytes > source.size) {
    throw new BundleError(`invalid bundle: the index needs ${indexBytes} bytes but only ${source.size - HEADER_BYTES} follow the header (truncated)`);
  }
  const files = parseIndex((await source.read(HEADER_BYTES, indexBytes)).toString("utf8"));
  const dataStart = HEADER_BYTES + indexBytes;
  const expected = dataStart + files.reduce((sum, file) => sum + file.bytes, 0);
  if (source.size < expected) {
    throw new BundleError(`invalid bundle: the index lists ${expected} bytes in all, the bundle has ${source.size} (truncated)`);
  }
  if (source.size > expected) {
    throw new BundleError(`invalid bundle: ${source.size - expected} bytes follow the last file listed in the index`);
  }
  return { files, dataStart };
}

/** Returns the index of a bundle after checking its header and total size; file contents are not hashed. */
export async function readBundleIndex(bundle: Buffer | string): Promise<BundleEntry[]> {
  const source = typeof bundle === "string" ? await fileSource(bundle) : bufferSource(bundle);
  try {
    return (await readIndex(source)).files;
  } finally {
    await source.close();
  }
}

async function copyEntry(source: BundleSource, entry: BundleEntry, start: number, handle: FileHandle): Promise<void> {
  const hash = createHash("sha256");
  for (let offset = 0; offset < entry.bytes; offset += COPY_CHUNK_BYTES) {
    const chunk = await source.read(start + offset, Math.min(COPY_CHUNK_BYTES, entry.bytes - offset));
    hash.update(chunk);
    await handle.write(chunk);
  }
  const actual = hash.digest("hex");
  if (actual !== entry.sha256) {
    throw new BundleError(`invalid bundle: '${entry.name}' has sha256 ${actual}; the index expects ${entry.sha256}`);
  }
  await handle.sync();
}

async function syncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Unpacks a bundle (a buffer or the path of a bundle file) into `targetDir`, which must not exist
 * or be empty. It checks the header, the names (plain file names only, no duplicates, at most
 * MAX_BUNDLE_FILES), the total size and each file's sha256, and fsyncs each file and the folder.
 * On any error it removes the files it wrote and throws BundleError.
 */
export async function unpackBundle(bundle: Buffer | string, targetDir: string): Promise<BundleEntry[]> {
  const source = typeof bundle === "string" ? await fileSource(bundle) : bufferSource(bundle);
  const written: string[] = [];
  try {
    const { files, dataStart } = await readIndex(source);
    await mkdir(targetDir, { recursive: true });
    const existing = await readdir(targetDir);
    if (existing.length > 0) {
      throw new BundleError(`cannot unpack into ${targetDir}: the folder is not empty`);
    }
    let position = dataStart;
    for (const entry of files) {
      const file = path.join(targetDir, entry.name);
      const handle = await open(file, "wx");
      written.push(file);
      try {
        await copyEntry(source, entry, position, handle);
      } finally {
        await handle.close();
      }
      position += entry.bytes;
    }
    await syncDir(targetDir);
    return files;
  } catch (error) {
    await Promise.all(written.map((file) => rm(file, { force: true })));
    throw error;
  } finally {
    await source.close();
  }
}
