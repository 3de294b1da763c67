import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import type { StepSummary } from "../../src/bench/fleet-load.js";
import { MOSQUITTO_BINARY } from "../helpers/mosquitto.js";
import { buildModules, defaultModelDir, repoRoot } from "../update/helpers.js";

const PHOTOS = path.join(repoRoot, "demo", "photos");
const mosquittoMissing = existsSync(MOSQUITTO_BINARY) ? "" : ` (skipped: ${MOSQUITTO_BINARY} is not installed)`;

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the compiled simulator and collects its output. */
function runFleetLoad(script: string, args: string[], timeoutMs: number): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (data: Buffer) => {
      stdout += data.toString("utf8");
    });
    child.stderr.on("data", (data: Buffer) => {
      stderr += data.toString("utf8");
    });
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`fleet-load ran longer than ${timeoutMs} ms:\n${stderr}`));
    }, timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe.skipIf(mosquittoMissing !== "")(`fleet load simulator${mosquittoMissing}`, () => {
  let script: string;
  let removeBuild: () => void;
  let out: string;

  beforeAll(() => {
    // The simulator forks itself for the trainer, so it runs as compiled JavaScript.
    const build = buildModules("fleet-load", ["bench/fleet-load.ts"]);
    script = fileURLToPath(build.urls[0]!);
    removeBuild = build.remove;
    out = mkdtempSync(path.join(tmpdir(), "sortline-fleet-load-test-"));
  });

  afterAll(() => {
    removeBuild?.();
    rmSync(out, { recursive: true, force: true });
  });

  it("rejects an invalid device count", async () => {
    const result = await runFleetLoad(script, ["--devices", "ten"], 30_000);

    expect(result.code).toBe(2);
    expect(result.stderr).toContain('--devices "ten" is invalid');
  });

  it("delivers every example of 20 devices", { timeout: 180_000 }, async () => {
    const args = ["--devices", "20", "--seconds", "20", "--rate", "12", "--status-interval", "2", "--photos", PHOTOS, "--model", defaultModelDir, "--out", out];
    const result = await runFleetLoad(script, args, 170_000);
    expect(result.code, result.stderr).toBe(0);

    const lines = result.stdout.trim().split("\n");
    expect(lines).toHaveLength(2);
    const machine = JSON.parse(lines[0]!) as { machine: { nproc: number } };
    expect(machine.machine.nproc).toBeGreaterThan(0);
    const summary = JSON.parse(lines[1]!) as StepSummary;

    expect(summary.connect.ok).toBe(20);
    expect(summary.connect.failed).toBe(0);
    expect(summary.examples.generated).toBeGreaterThan(0);
    expect(summary.examples.acked).toBe(summary.examples.generated);
    expect(summary.examples.stored).toBe(summary.examples.acked);
    expect(summary.examples.lost).toBe(0);
    expect(summary.examples.storedWithoutAck).toBe(0);
    expect(summary.examples.duplicateAdds).toBe(0);
    expect(summary.examples.backlog).toBe(0);
    expect(summary.examples.embeddingLength).toBe(2048);
    expect(summary.latencyMs.attempt.p50).toBeGreaterThan(0);
    expect(summary.latencyMs.attempt.p99).toBeGreaterThanOrEqual(summary.latencyMs.attempt.p50);

    // Each device publishes a status on connect and then every 2 s.
    expect(summary.status.sent).toBeGreaterThanOrEqual(20 * 5);
    expect(summary.status.seenByTracker).toBe(summary.status.sent);
    expect(summary.status.trackerDevices).toBe(20);
    expect(summary.status.lastWills).toBe(2);
    expect(summary.status.offlineAfterClose).toBe(20);

    // 20 devices, the trainer and the $SYS monitor.
    expect(summary.broker.connectionsMax).toBe(22);
    expect(summary.trainer.peakRssMB).toBeGreaterThan(0);
    expect(summary.trainer.cpuSeconds).toBeGreaterThan(0);
    expect(summary.logs.trainer.errors).toBe(0);

    const stepDir = readdirSync(out).find((name) => name.startsWith("step-1-"));
    expect(stepDir).toBeDefined();
    expect(readFileSync(path.join(out, stepDir!, "trainer.log"), "utf8")).toContain("hard example stored");
    expect(existsSync(path.join(out, stepDir!, "data"))).toBe(false);
  });
});
