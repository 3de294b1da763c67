import { spawn } from "node:child_process";
import { once } from "node:events";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { generateKeyPair, signPackage } from "../../src/models/signing.js";
import { ModelStore } from "../../src/update/store.js";
import { makeTempDir } from "../audit/helpers.js";
import { buildModules, copyDefaultPackage, defaultModelDir } from "./helpers.js";

const testDir = path.dirname(fileURLToPath(import.meta.url));

interface StartResult {
  code: number | null;
  choice: { id: string; source: string; version: string; rolledBackFrom: string | null };
}

describe("resolveStartupModel", () => {
  let build: ReturnType<typeof buildModules>;
  let temp: ReturnType<typeof makeTempDir>;

  beforeAll(() => {
    build = buildModules("startup", ["update/startup.ts", "update/guard.ts", "update/store.ts", "inference/runner.ts"]);
    temp = makeTempDir("startup");
  });

  afterAll(() => {
    build?.remove();
    temp?.remove();
  });

  it("rolls back a model that keeps crashing the agent", async () => {
    const keys = generateKeyPair();
    const trustedKeys = [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }];
    const keysFile = path.join(temp.dir, "trusted.json");
    writeFileSync(keysFile, JSON.stringify(trustedKeys));
    const stateDir = path.join(temp.dir, "state");

    const store = await ModelStore.open(stateDir, { trustedKeys });
    const ids: string[] = [];
    for (const version of ["1.0.1", "1.0.2"]) {
      const dir = copyDefaultPackage(path.join(temp.dir, version), (manifest) => (manifest.version = version));
      await signPackage(dir, keys.privateKeyPem);
      ids.push(await store.install(dir));
      await store.activate(ids.at(-1)!);
    }
    const [good, crashing] = ids as [string, string];

    /** Runs one agent start in a child process. */
    const start = async (mode: "crash" | "healthy"): Promise<StartResult> => {
      const child = spawn(process.execPath, [path.join(testDir, "startup-child.mjs"), ...build.urls, stateDir, defaultModelDir, keysFile, mode], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stdout = "";
      let stderr = "";
      child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
      child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
      const [code] = (await once(child, "exit")) as [number | null];
      if (!stdout.trim()) {
        throw new Error(`startup child printed nothing; exit code ${String(code)}:\n${stderr}`);
      }
      return { code, choice: JSON.parse(stdout.trim()) as StartResult["choice"] };
    };

    const first = await start("crash");
    expect(first.code).toBe(70);
    expect(first.choice).toEqual({ id: crashing, source: "store", version: "1.0.2", rolledBackFrom: null });
    const second = await start("crash");
    expect(second.choice.id).toBe(crashing);

    const third = await start("crash");
    expect(third.choice).toEqual({ id: good, source: "store", version: "1.0.1", rolledBackFrom: crashing });
    const pointer = await store.readPointer();
    expect(pointer?.id).toBe(good);
    expect(pointer?.history).toEqual([]);

    // 1.0.1 has two unhealthy starts now; a healthy start clears them, so more crashes start over.
    const fourth = await start("healthy");
    expect(fourth.code).toBe(0);
    expect(fourth.choice.id).toBe(good);
    const fifth = await start("crash");
    expect(fifth.choice.id).toBe(good);
    const sixth = await start("crash");
    expect(sixth.choice.id).toBe(good);
    expect(sixth.choice.rolledBackFrom).toBeNull();

    // A third unhealthy start of 1.0.1 leaves nothing stored to roll back to: the bundled default runs.
    const seventh = await start("crash");
    expect(seventh.choice.source).toBe("bundled");
    expect(seventh.choice.version).toBe("1.0.0");
    expect(seventh.choice.rolledBackFrom).toBe(good);
    expect(await store.readPointer()).toBeNull();
  });
});
