import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { generateKeyPair, verifyPackage, verifyPackageFiles } from "../../src/models/signing.js";
import { ModelStore } from "../../src/update/store.js";
import { makeTempDir } from "../audit/helpers.js";
import { buildModules, defaultModelDir, writeFakePackage } from "./helpers.js";

const testDir = path.dirname(fileURLToPath(import.meta.url));

/** Kills per test run; a longer fault suite sets SORTLINE_STORE_CRASH_RUNS=200 or more. */
const RUNS = Number(process.env.SORTLINE_STORE_CRASH_RUNS ?? 50);
/** The kill comes at a random moment up to this long after the child opened the store. */
const MAX_KILL_DELAY_MS = 300;

interface ChildOutput {
  stdout: string;
  stderr: string;
}

/** Starts the child, waits until it opened the store, waits `delayMs`, kills it with SIGKILL and returns its output. */
async function runAndKill(args: string[], delayMs: number): Promise<ChildOutput> {
  const child = spawn(process.execPath, [path.join(testDir, "store-crash-child.mjs"), ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  const exited = once(child, "exit");

  while (!stdout.startsWith("ready\n") && child.exitCode === null) {
    await sleep(5);
  }
  await sleep(delayMs);
  child.kill("SIGKILL");
  const [code, signal] = await exited;
  if (signal !== "SIGKILL") {
    throw new Error(`store crash child exited by itself with code ${String(code)}:\n${stderr}`);
  }
  return { stdout, stderr };
}

/**
 * Returns the ids the pointer may hold after the kill: the last version whose activation
 * completed (or `before` when none did in this run) and any activation that began after it.
 */
function acceptableIds(stdout: string, before: string | null): Set<string | null> {
  const lines = stdout.split("\n").slice(0, -1);
  const accepted = new Set<string | null>([before]);
  for (const line of lines) {
    if (line.startsWith("activated ")) {
      accepted.clear();
      accepted.add(line.slice("activated ".length));
    } else if (line.startsWith("activating ")) {
      accepted.add(line.slice("activating ".length));
    }
  }
  return accepted;
}

describe("ModelStore crash safety", () => {
  let build: ReturnType<typeof buildModules>;
  let temp: ReturnType<typeof makeTempDir>;

  beforeAll(() => {
    build = buildModules("store-crash", ["update/store.ts", "models/signing.ts"]);
    temp = makeTempDir("store-crash");
  });

  afterAll(() => {
    build?.remove();
    temp?.remove();
  });

  it(`resolves a verified model after ${RUNS} kills`, { timeout: 60_000 + RUNS * 5_000 }, async () => {
    const keys = generateKeyPair();
    const trustedKeys = [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }];
    const keyFile = path.join(temp.dir, "keys.json");
    writeFileSync(keyFile, JSON.stringify(keys));
    const stateDir = path.join(temp.dir, "state");
    const workDir = path.join(temp.dir, "work");
    const bundled = writeFakePackage(path.join(temp.dir, "bundled"), { version: "0.1.0" });
    const [storeUrl, signingUrl] = build.urls as [string, string];

    let activeId: string | null = null;
    let completedActivations = 0;
    let killsAfterActivationBegan = 0;
    for (let run = 0; run < RUNS; run += 1) {
      const delay = Math.floor(Math.random() * MAX_KILL_DELAY_MS);
      const args = [storeUrl, signingUrl, stateDir, keyFile, path.join(defaultModelDir, "manifest.json"), workDir, String(run)];
      const { stdout } = await runAndKill(args, delay);
      const accepted = acceptableIds(stdout, activeId);
      completedActivations += stdout.split("\n").filter((line) => line.startsWith("activated ")).length;
      killsAfterActivationBegan += stdout.includes("activating ") ? 1 : 0;

      // The pointer file is either absent (no activation yet) or complete, valid JSON.
      const pointerFile = path.join(stateDir, "models", "active.json");
      if (existsSync(pointerFile)) {
        const text = readFileSync(pointerFile, "utf8");
        expect(() => JSON.parse(text), `run ${run}: active.json after a kill at ${delay} ms`).not.toThrow();
      }

      const store = await ModelStore.open(stateDir, { trustedKeys });
      const pointer = await store.readPointer();
      expect(accepted.has(pointer?.id ?? null), `run ${run}: pointer ${pointer?.id} not in ${[...accepted].join(", ")}`).toBe(true);
      expect(readdirSync(store.versionsDir).filter((name) => name.startsWith(".")), `run ${run}: leftovers after open`).toEqual([]);

      const resolved = await store.resolveActive({ bundledDefault: bundled });
      expect(resolved.fellBack, `run ${run}: ${resolved.reason}`).toBe(false);
      if (pointer) {
        expect(resolved.source).toBe("store");
        expect(resolved.id).toBe(pointer.id);
        const verified = await verifyPackage(resolved.dir, trustedKeys);
        expect(verified.keyId).toBe(keys.keyId);
        expect(resolved.dir).toBe(store.versionDir(pointer.id));
      } else {
        expect(resolved.source).toBe("bundled");
        await verifyPackageFiles(resolved.dir);
      }
      activeId = pointer?.id ?? null;
    }
    // The kills must have hit a store that was doing work, not a child still starting. On a
    // loaded machine installs take longer, so fewer kills land after an activation began.
    expect(killsAfterActivationBegan).toBeGreaterThan(RUNS / 4);
    expect(completedActivations).toBeGreaterThan(0);
  });
});
