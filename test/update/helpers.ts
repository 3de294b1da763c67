import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import type { ModelManifest } from "../../src/models/manifest.js";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const defaultModelDir = path.join(repoRoot, "models", "default");

export function readDefaultManifest(): ModelManifest {
  return JSON.parse(readFileSync(path.join(defaultModelDir, "manifest.json"), "utf8")) as ModelManifest;
}

/**
 * Writes a small package whose model.onnx is random bytes, not an ONNX graph. Signing, bundles
 * and the store check only sizes and hashes, so these packages suit every test that does not
 * load a model. Returns the folder.
 */
export function writeFakePackage(dir: string, options: { version?: string; modelBytes?: number; knowledge?: boolean } = {}): string {
  mkdirSync(dir, { recursive: true });
  const model = randomBytes(options.modelBytes ?? 64 * 1024);
  writeFileSync(path.join(dir, "model.onnx"), model);
  const manifest = readDefaultManifest() as ModelManifest & { knowledge?: { file: string; sha256: string } };
  manifest.name = "sortline-fake";
  manifest.version = options.version ?? "1.0.0";
  manifest.file = { name: "model.onnx", sha256: createHash("sha256").update(model).digest("hex"), bytes: model.length };
  delete manifest.knowledge;
  if (options.knowledge) {
    const knowledge = Buffer.from(JSON.stringify({ glass: { recyclable: true } }));
    writeFileSync(path.join(dir, "knowledge.json"), knowledge);
    manifest.knowledge = { file: "knowledge.json", sha256: createHash("sha256").update(knowledge).digest("hex") };
  }
  writeFileSync(path.join(dir, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  return dir;
}

/**
 * Copies the files that the manifest of models/default names (model and knowledge file) into
 * `dir`, and writes the manifest after `change` edited it.
 */
export function copyDefaultPackage(dir: string, change: (manifest: ModelManifest) => void = () => {}): string {
  mkdirSync(dir, { recursive: true });
  const manifest = readDefaultManifest() as ModelManifest & { knowledge?: { file: string } };
  const files = [manifest.file.name, ...(manifest.knowledge ? [manifest.knowledge.file] : [])];
  change(manifest);
  writeFileSync(path.join(dir, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  for (const file of files) {
    copyFileSync(path.join(defaultModelDir, file), path.join(dir, file));
  }
  return dir;
}

/**
 * Compiles the given modules under src/ and their imports to plain JS for child processes, which
 * run without vitest's TypeScript transform. The output sits in the ignored .cache folder inside
 * the repository so that the children resolve packages from node_modules. Returns a file URL per
 * entry, in order.
 */
export function buildModules(prefix: string, entries: readonly string[]): { urls: string[]; remove: () => void } {
  mkdirSync(path.join(repoRoot, ".cache"), { recursive: true });
  const outDir = mkdtempSync(path.join(repoRoot, ".cache", `${prefix}-build-`));
  const tsc = path.join(repoRoot, "node_modules", "typescript", "bin", "tsc");
  const sources = entries.map((entry) => path.join(repoRoot, "src", entry));
  const args = [
    tsc, "--outDir", outDir, "--rootDir", path.join(repoRoot, "src"), "--target", "ES2022", "--module", "NodeNext",
    "--moduleResolution", "NodeNext", "--strict", "--skipLibCheck", "--types", "node", ...sources,
  ];
  const result = spawnSync(process.execPath, args, { encoding: "utf8" });
  if (result.status !== 0) {
    throw new Error(`tsc failed with status ${result.status}:\n${result.stdout}${result.stderr}`);
  }
  const urls = entries.map((entry) => pathToFileURL(path.join(outDir, entry.replace(/\.ts$/, ".js"))).href);
  return { urls, remove: () => rmSync(outDir, { recursive: true, force: true }) };
}
