/**
 * Global setup of the fault-injection suite: compiles src/cli/agent.ts and src/cli/trainer.ts once
 * for the child processes, starts a fresh rows.jsonl and writes run.json with the scale and the
 * run's times.
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";

import type { TestProject } from "vitest/node";

import { buildModules } from "../update/helpers.js";
import { faultScale, reportDir } from "./report.js";

declare module "vitest" {
  export interface ProvidedContext {
    /** File URL of the compiled src/cli/agent.ts. */
    faultAgentModule: string;
    /** File URL of the compiled src/cli/trainer.ts. */
    faultTrainerModule: string;
  }
}

/** Facts about one run of the suite, for the header of docs/faults.md. */
export interface RunInfo {
  scale: number;
  fps: string;
  /** CPUs this process may use, as `nproc` prints them. */
  nproc: number;
  cpuModel: string;
  startedAt: string;
  finishedAt?: string;
  wallSeconds?: number;
}

export default function setup(project: TestProject): () => void {
  const dir = reportDir();
  mkdirSync(dir, { recursive: true });
  rmSync(path.join(dir, "rows.jsonl"), { force: true });
  const started = Date.now();
  const info: RunInfo = {
    scale: faultScale(),
    fps: process.env.SORTLINE_FAULT_FPS ?? "8",
    nproc: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model.trim() ?? "unknown",
    startedAt: new Date(started).toISOString(),
  };
  writeFileSync(path.join(dir, "run.json"), `${JSON.stringify(info, null, 2)}\n`);

  const build = buildModules("faults", ["cli/agent.ts", "cli/trainer.ts"]);
  project.provide("faultAgentModule", build.urls[0]!);
  project.provide("faultTrainerModule", build.urls[1]!);

  return () => {
    build.remove();
    const current = JSON.parse(readFileSync(path.join(dir, "run.json"), "utf8")) as RunInfo;
    const finished = Date.now();
    current.finishedAt = new Date(finished).toISOString();
    current.wallSeconds = Math.round((finished - started) / 1000);
    writeFileSync(path.join(dir, "run.json"), `${JSON.stringify(current, null, 2)}\n`);
  };
}
