import { writeFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { generateKeyPair, type SigningKeyPair } from "../../src/models/signing.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { agentConfig, ServiceProcess, makeWorkDir, packBundle, readAudit, seconds, signedCopy, SimulatedTrainer, waitFor, writeConfig } from "./harness.js";
import { appendRow, faultCase, lostText } from "./report.js";

const HEALTHY_AFTER_FRAMES = 40;
const CRASH_LOOP_STARTS = 3;
const CRASH_LOOP_WINDOW_SECONDS = 600;

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let trainer: SimulatedTrainer;
let keys: SigningKeyPair;
let configFile: string;
const agents: ServiceProcess[] = [];

function startAgent(): ServiceProcess {
  const agent = ServiceProcess.agent(configFile);
  agents.push(agent);
  return agent;
}

async function sendSigned(version: string): Promise<void> {
  const pkg = await signedCopy(path.join(work.dir, "packages"), keys, version);
  await trainer.sendBundle(await packBundle(pkg), { name: "sortline-trashnet", version, deploy: true });
}

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("model that crashes the agent", () => {
  beforeAll(async () => {
    work = await makeWorkDir("crash-loop");
    broker = await startMosquitto();
    keys = generateKeyPair();
    const keyFile = path.join(work.dir, "trainer.pub");
    await writeFile(keyFile, keys.publicKeyPem);
    trainer = await SimulatedTrainer.start(path.join(work.dir, "trainer"), broker.url, keys);
    const config = agentConfig({
      dir: work.dir,
      fleetUrl: broker.url,
      trustedKey: keyFile,
      mining: { enabled: false },
      update: { shadowFrames: 4, healthyAfterFrames: HEALTHY_AFTER_FRAMES, crashLoop: { starts: CRASH_LOOP_STARTS, windowSeconds: CRASH_LOOP_WINDOW_SECONDS } },
    });
    configFile = await writeConfig(path.join(work.dir, "agent.yaml"), config);
  });

  afterAll(async () => {
    for (const agent of agents) {
      await agent.kill("SIGKILL");
    }
    await trainer?.close();
    await broker?.close();
    await work?.remove();
  });

  it("rolls back after three unhealthy starts", async () => {
    await faultCase(
      {
        case: "8. Bad model rolled back (crash-loop guard)",
        injected:
          `signed 1.0.2 deployed over the fleet connection after 1.0.1 was marked healthy; the agent process is killed with SIGKILL right after the switch to 1.0.2 and again right after the next start's model warm-up, before ${HEALTHY_AFTER_FRAMES} frames mark 1.0.2 healthy. ` +
          "The kills stand in for a model that makes the agent exit at start",
        expected: `the third start of 1.0.2 within ${CRASH_LOOP_WINDOW_SECONDS} s rolls back to 1.0.1 (resolveStartupModel and the crash-loop guard); the agent starts with 1.0.1 and decides again`,
      },
      async (row) => {
        const first = startAgent();
        await first.waitForLog("agent ready", 120_000);
        await sendSigned("1.0.1");
        await first.waitForLog("model switched", 120_000, { modelVersion: "1.0.1" });
        await first.waitForLog("model marked healthy", 120_000);
        await sendSigned("1.0.2");
        await first.waitForLog("model switched", 120_000, { modelVersion: "1.0.2" });
        const firstCrashAt = Date.now();
        await first.kill("SIGKILL");

        const second = startAgent();
        const secondModel = await second.waitForLog("model warmed up", 120_000);
        await second.kill("SIGKILL");

        const third = startAgent();
        const thirdModel = await third.waitForLog("model warmed up", 120_000);
        const rollback = third.findLog("model version keeps crashing the agent; rolling back");
        const fallback = third.findLog("starting with a fallback model");
        await third.waitForLog("agent ready", 120_000);
        const readyAt = Date.now();
        await waitFor(() => Number(trainer.statusSince(readyAt)?.stats?.decided ?? 0) > 0, "a status with decisions from the third start", 60_000);
        const decidingAfterMs = Date.now() - firstCrashAt;
        const status = trainer.statusSince(readyAt)!;
        await third.kill("SIGTERM");
        const audit = readAudit(path.join(work.dir, "state", "audit.db"));

        row.observed =
          `the second start ran ${String(secondModel.modelVersion)}; the third start logged "${rollback?.msg ?? "no rollback"}" (starts ${String(rollback?.starts ?? "?")}) ` +
          `and started with ${String(thirdModel.modelVersion)}, rolled back from ${String(fallback?.rolledBackFrom ?? "nothing")}; ` +
          `the retained status reported model ${status.model?.version ?? "?"} and ${String(status.stats?.decided)} decisions; deciding again ${seconds(decidingAfterMs)} after the first crash; audit integrity ${audit.integrity}`;
        row.lost = lostText({ "healthy versions not restored": thirdModel.modelVersion === "1.0.1" ? 0 : 1 }, ["1.0.2 is no longer active (rolled back on purpose)"]);

        expect(secondModel.modelVersion).toBe("1.0.2");
        expect(rollback).toBeDefined();
        expect(thirdModel.modelVersion).toBe("1.0.1");
        expect(String(fallback?.rolledBackFrom)).toContain("1.0.2");
        expect(status.model?.version).toBe("1.0.1");
        expect(audit.integrity).toBe("ok");
      },
    );
  });

  it("records the regression watch as not covered", () => {
    // NOTE: the agent hands the regression watch only frames the model scored, so ObservedBatch.errors is always 0 there.
    appendRow({
      case: "8b. Bad model rolled back (regression watch)",
      injected: "none",
      expected: "a model that passes the shadow run but then fails inference is rolled back by the regression watch",
      observed:
        "not covered: the agent's pipeline observer receives only frames the model scored, so a batch whose inference failed never reaches the watch and its error count is always 0; " +
        "the latency rule needs a slower candidate, which the suite cannot build from models/default",
      lost: "not measured",
    });
  });
});
