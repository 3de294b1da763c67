import { writeFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { generateKeyPair, verifyPackage } from "../../src/models/signing.js";
import { ModelStore } from "../../src/update/store.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { agentConfig, ServiceProcess, DEVICE, makeWorkDir, packBundle, seconds, signedCopy, SimulatedTrainer, SITE, sleep, writeConfig } from "./harness.js";
import { faultCase, lostText, scaled } from "./report.js";

const KILLS = scaled(100, 5);
/** Kill delays are drawn from [0, KILL_WINDOW_FACTOR x the measured switch time], so some land after the switch. */
const KILL_WINDOW_FACTOR = 1.2;
const VERSIONS = ["1.0.1", "1.0.2"] as const;

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let trainer: SimulatedTrainer;
let agent: ServiceProcess | undefined;
let configFile: string;
let trustedKeys: { keyId: string; publicKeyPem: string }[];

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("kill -9 during a model switch", () => {
  beforeAll(async () => {
    work = await makeWorkDir("switch-kill");
    broker = await startMosquitto();
    const keys = generateKeyPair();
    trustedKeys = [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }];
    const keyFile = path.join(work.dir, "trainer.pub");
    await writeFile(keyFile, keys.publicKeyPem);
    trainer = await SimulatedTrainer.start(path.join(work.dir, "trainer"), broker.url, keys);
    // The crash-loop guard would roll back after three quick kills; case 8 covers it, so it is out of the way here.
    const config = agentConfig({
      dir: work.dir,
      fleetUrl: broker.url,
      trustedKey: keyFile,
      mining: { enabled: false },
      update: { shadowFrames: 4, healthyAfterFrames: 1, crashLoop: { starts: 1000, windowSeconds: 600 } },
    });
    configFile = await writeConfig(path.join(work.dir, "agent.yaml"), config);

    agent = ServiceProcess.agent(configFile);
    await agent.waitForLog("agent ready", 120_000);
    for (const version of VERSIONS) {
      const pkg = await signedCopy(work.dir, keys, version);
      await trainer.sendBundle(await packBundle(pkg), { name: "sortline-trashnet", version, deploy: false });
      await agent.waitForLog("model bundle received", 60_000, { modelVersion: version });
    }
  });

  afterAll(async () => {
    await agent?.kill("SIGKILL");
    await trainer?.close();
    await broker?.close();
    await work?.remove();
  });

  it("restarts with the old or new model", async () => {
    await faultCase(
      {
        case: "3. kill -9 of the agent during a model switch",
        injected: `${KILLS} SIGKILLs of the agent process (real agent, fleet deploy command for a received signed bundle, shadowFrames 4), each at a random delay within ${KILL_WINDOW_FACTOR} x the measured switch time; the agent is started again after each kill`,
        expected: `every restart logs "model warmed up" with the version active before the command or the new one, from a verified package, with no fallback and no start failure`,
      },
      async (row) => {
        const firstSent = Date.now();
        const first = await trainer.client.request(SITE, DEVICE, "deploy", { version: VERSIONS[0] }, { timeoutMs: 120_000 });
        expect(first.ok, JSON.stringify(first.error)).toBe(true);
        await agent!.waitForLog("model switched", 120_000, { modelVersion: VERSIONS[0] });
        const switchMs = Date.now() - firstSent;
        let current: string = VERSIONS[0];

        const outcomes = { old: 0, new: 0, other: 0, fallback: 0, failedStart: 0, switchUndone: 0 };
        const stages = new Map<string, number>();
        const startMs: number[] = [];
        const failures: string[] = [];
        for (let kill = 0; kill < KILLS; kill++) {
          const target = current === VERSIONS[0] ? VERSIONS[1] : VERSIONS[0];
          const sentAt = Date.now();
          trainer.client.request(SITE, DEVICE, "deploy", { version: target }, { timeoutMs: 60_000 }).catch(() => undefined);
          await sleep(Math.random() * switchMs * KILL_WINDOW_FACTOR);
          await agent!.kill("SIGKILL");
          const stage = stageAtKill(agent!, sentAt);
          stages.set(stage, (stages.get(stage) ?? 0) + 1);

          agent = ServiceProcess.agent(configFile);
          let version: string;
          try {
            const warmed = await agent.waitForLog("model warmed up", 120_000);
            version = String(warmed.modelVersion);
            startMs.push(Number(warmed.receivedAt) - agent.startedAt);
            await agent.waitForLog("agent ready", 120_000);
          } catch (error) {
            outcomes.failedStart++;
            failures.push(`kill ${kill} (${stage}): ${(error as Error).message}`);
            break;
          }
          if (agent.findLog("starting with a fallback model")) {
            outcomes.fallback++;
            failures.push(`kill ${kill} (${stage}): fallback model at start`);
          }
          if (version === current) {
            outcomes.old++;
            if (stage === "after the switch") {
              outcomes.switchUndone++;
              failures.push(`kill ${kill}: the agent had logged the switch to ${target} but restarted with ${version}`);
            }
          } else if (version === target) {
            outcomes.new++;
          } else {
            outcomes.other++;
            failures.push(`kill ${kill} (${stage}): started with ${version}, expected ${current} or ${target}`);
          }
          current = version;
        }

        await agent!.kill("SIGKILL");
        agent = undefined;
        const store = await ModelStore.open(path.join(work.dir, "state"), { trustedKeys });
        const pointer = await store.readPointer();
        const verified = pointer ? await verifyPackage(store.versionDir(pointer.id), trustedKeys) : undefined;
        const stageText = [...stages.entries()].map(([stage, count]) => `${count} ${stage}`).join(", ");
        const sortedStarts = [...startMs].sort((a, b) => a - b);

        row.observed =
          `${outcomes.old + outcomes.new + outcomes.other} restarts: ${outcomes.old} with the old model, ${outcomes.new} with the new one, ${outcomes.other} with another, ` +
          `${outcomes.fallback} fallbacks, ${outcomes.failedStart} failed starts; kills landed ${stageText}; ` +
          `switch without a kill took ${seconds(switchMs)}; start to "model warmed up" median ${seconds(sortedStarts[Math.floor(sortedStarts.length / 2)] ?? 0)}; ` +
          `store pointer ${pointer?.id ?? "none"} verifies at the end: ${verified ? "yes" : "no"}`;
        row.lost = lostText({ "switches logged as done but undone by the restart": outcomes.switchUndone }, ["none (decisions are not counted here; case 4 checks the audit under kill -9)"]);

        expect(failures).toEqual([]);
        expect(verified?.manifest.version).toBe(current);
      },
    );
  });
});

/** Returns the last update step the killed agent logged after `since`. */
function stageAtKill(agent: ServiceProcess, since: number): string {
  const lines = agent.logs.filter((line) => Number(line.receivedAt) >= since);
  if (lines.some((line) => line.msg === "model switched")) {
    return "after the switch";
  }
  const update = lines.filter((line) => line.msg === "model update").at(-1);
  if (update) {
    return `while ${String(update.state)}`;
  }
  return lines.some((line) => line.msg === "running command") ? "after the command arrived" : "before any update step";
}
