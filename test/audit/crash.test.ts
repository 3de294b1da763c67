import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath, pathToFileURL } from "node:url";

import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { AuditStore } from "../../src/audit/store.js";
import { makeTempDir } from "./helpers.js";

const testDir = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(testDir, "..", "..");
const RUNS = 6;
const BATCH_SIZE = 20;

/**
 * Compiles src/audit/store.ts and its imports to plain JS for the child process, which runs
 * without vitest's TypeScript transform. The output sits inside the repository (in the ignored
 * .cache folder) so that the child resolves better-sqlite3 from node_modules.
 */
function buildStoreModule(): { url: string; remove: () => void } {
  mkdirSync(path.join(repoRoot, ".cache"), { recursive: true });
  const outDir = mkdtempSync(path.join(repoRoot, ".cache", "audit-crash-build-"));
  const tsc = path.join(repoRoot, "node_modules", "typescript", "bin", "tsc");
  const args = [
    tsc, "--outDir", outDir, "--rootDir", path.join(repoRoot, "src"), "--target", "ES2022", "--module", "NodeNext",
    "--moduleResolution", "NodeNext", "--strict", "--skipLibCheck", "--types", "node", path.join(repoRoot, "src", "audit", "store.ts"),
  ];
  const result = spawnSync(process.execPath, args, { encoding: "utf8" });
  if (result.status !== 0) {
    throw new Error(`tsc failed with status ${result.status}:\n${result.stdout}${result.stderr}`);
  }
  return { url: pathToFileURL(path.join(outDir, "audit", "store.js")).href, remove: () => rmSync(outDir, { recursive: true, force: true }) };
}

/** Runs the child until it has sent at least one batch, waits `delayMs`, kills it with SIGKILL and returns its output. */
async function runAndKill(storeUrl: string, file: string, runId: string, delayMs: number): Promise<{ stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [path.join(testDir, "crash-child.mjs"), storeUrl, file, runId, String(BATCH_SIZE)], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  const exited = once(child, "exit");

  while (!stdout.includes("\nsent ") && child.exitCode === null) {
    await sleep(10);
  }
  await sleep(delayMs);
  child.kill("SIGKILL");
  const [code, signal] = await exited;
  if (signal !== "SIGKILL") {
    throw new Error(`crash child exited by itself with code ${String(code)}:\n${stderr}`);
  }
  return { stdout, stderr };
}

/** Frame ids from complete "sent" lines; a line cut off by the kill is ignored. */
function sentFrameIds(stdout: string): string[] {
  const lines = stdout.split("\n").slice(0, -1);
  return lines.filter((line) => line.startsWith("sent ")).flatMap((line) => line.slice("sent ".length).split(" "));
}

describe("AuditStore crash safety", () => {
  let build: ReturnType<typeof buildStoreModule>;
  let temp: ReturnType<typeof makeTempDir>;

  beforeAll(() => {
    build = buildStoreModule();
    temp = makeTempDir("audit-crash");
  });

  afterAll(() => {
    build?.remove();
    temp?.remove();
  });

  it("keeps every sent decision after SIGKILL", async () => {
    const file = path.join(temp.dir, "audit.db");
    for (let run = 0; run < RUNS; run += 1) {
      const { stdout } = await runAndKill(build.url, file, `run${run}`, 20 + Math.floor(Math.random() * 250));
      const sent = sentFrameIds(stdout);
      expect(sent.length).toBeGreaterThan(0);

      const store = AuditStore.open(file);
      store.close();
      const db = new Database(file, { readonly: true });
      expect(db.pragma("integrity_check", { simple: true })).toBe("ok");
      const storedIds = db.prepare("SELECT frame_id FROM decisions WHERE frame_id LIKE ?").pluck().all(`run${run}-%`) as string[];
      db.close();

      const stored = new Set(storedIds);
      const missing = sent.filter((frameId) => !stored.has(frameId));
      expect(missing).toEqual([]);
      expect(stored.size).toBeGreaterThanOrEqual(sent.length);
      // Frame ids are run-batch-index; a committed batch is stored whole or not at all.
      const batchSizes = new Map<string, number>();
      for (const frameId of storedIds) {
        const batch = frameId.slice(0, frameId.lastIndexOf("-"));
        batchSizes.set(batch, (batchSizes.get(batch) ?? 0) + 1);
      }
      expect([...new Set(batchSizes.values())]).toEqual([BATCH_SIZE]);
    }
  });
});
