import { writeFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import type { Actuator } from "../../src/decision/actuators.js";
import { generateKeyPair } from "../../src/models/signing.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { agentConfig, InProcessAgent, makeWorkDir, OutboxProbe, readAudit, seconds, SimulatedTrainer, sleep, waitFor, writeConfig } from "./harness.js";
import { faultCase, lostText, scaled } from "./report.js";

const OUTBOX_MAX_ITEMS = 20;
const OUTAGE_MS = scaled(120_000, 10_000);
/** Maximum time for the examples left in the outbox to leave it after the broker returns. */
const DRAIN_TIMEOUT_MS = 180_000;

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let trainer: SimulatedTrainer;
let running: InProcessAgent;
let probe: OutboxProbe;

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("broker unreachable with a small outbox", () => {
  beforeAll(async () => {
    work = await makeWorkDir("broker-outage");
    broker = await startMosquitto();
    const keys = generateKeyPair();
    const keyFile = path.join(work.dir, "trainer.pub");
    await writeFile(keyFile, keys.publicKeyPem);
    trainer = await SimulatedTrainer.start(path.join(work.dir, "trainer"), broker.url, keys);
    const config = agentConfig({ dir: work.dir, fleetUrl: broker.url, trustedKey: keyFile, mining: { outbox: { maxItems: OUTBOX_MAX_ITEMS, maxBytes: 1_048_576 } } });
    running = await InProcessAgent.start(await writeConfig(path.join(work.dir, "agent.yaml"), config));
    probe = new OutboxProbe(running.agent.outboxStore!);
  });

  afterAll(async () => {
    probe?.stop();
    await running?.stop();
    await trainer?.close();
    await broker?.close();
    await work?.remove();
  });

  it("stays bounded and delivers the rest", async () => {
    await faultCase(
      {
        case: "2. Broker unreachable, outbox bound hit",
        injected: `Mosquitto stopped for ${seconds(OUTAGE_MS)} while frames flow; outbox maxItems ${OUTBOX_MAX_ITEMS}, maxBytes 1 MiB`,
        expected: "the outbox never holds more than its bound; evictions are counted; after the broker returns, every example left in the outbox is delivered or evicted by a higher-priority one; nothing acknowledged is lost",
      },
      async (row) => {
        await waitFor(() => trainer.stored.size >= 3, "three uploaded examples", 120_000);
        const before = running.agent.outboxStore!.stats();
        const minedBefore = running.agent.miner!.stats.stored;
        probe.maxItems = running.agent.outboxStore!.size().items;

        const stopAt = Date.now();
        await broker.stop();
        await sleep(OUTAGE_MS);
        const maxDuringOutage = probe.maxItems;
        const duringOutage = running.agent.outboxStore!.stats();
        const minedDuringOutage = running.agent.miner!.stats.stored - minedBefore;
        const decidedDuringOutage = running.decisionsBetween(stopAt, Date.now());

        const leftAtReturn = probe.storedIds();
        const restartAt = Date.now();
        await broker.restart();
        await waitFor(() => [...probe.storedIds()].every((id) => !leftAtReturn.has(id)), "every example left at the broker's return to leave the outbox", DRAIN_TIMEOUT_MS);
        const drainMs = Date.now() - restartAt;
        const deliveredOfLeft = [...leftAtReturn].filter((id) => probe.acked.has(id)).length;
        const evictedOfLeft = leftAtReturn.size - deliveredOfLeft;

        running.agent.pipeline!.pause();
        await sleep(2_000);
        const after = running.agent.outboxStore!.stats();
        const missing = [...probe.acked].filter((id) => !trainer.stored.has(id));
        const audit = readAudit(running.agent.agentConfig.audit.path);
        const notAudited = running.decisions.filter((record) => !audit.frameIds.has(record.frameId)).length;
        const actuators = (running.agent as unknown as { actuators: Actuator[] }).actuators;
        const actuatorDropped = actuators.reduce((sum, actuator) => sum + actuator.dropped, 0);

        row.observed =
          `${decidedDuringOutage} decisions and ${minedDuringOutage} stored examples during the outage; outbox max ${maxDuringOutage} items (bound ${OUTBOX_MAX_ITEMS}); ` +
          `evicted ${duringOutage.evicted - before.evicted} and rejected as lower priority ${duringOutage.rejected - before.rejected} during the outage; ` +
          `${leftAtReturn.size} examples in the outbox at the broker's return: ${deliveredOfLeft} delivered, ${evictedOfLeft} evicted by newer higher-priority ones, all gone after ${seconds(drainMs)}; ` +
          `trainer stored ${trainer.stored.size}, outbox acked ${probe.acked.size} in total`;
        row.lost = lostText({ "examples acked by the trainer": missing.length, "decisions made but not audited": notAudited }, [
          `${after.evicted} examples evicted from the outbox (${after.rejected} more rejected as lower priority than everything held)`,
          `${actuatorDropped} decisions over the actuator's maxQueued while offline`,
        ]);

        expect(maxDuringOutage).toBeLessThanOrEqual(OUTBOX_MAX_ITEMS);
        expect(probe.maxItems).toBeLessThanOrEqual(OUTBOX_MAX_ITEMS);
        expect(duringOutage.evicted + duringOutage.rejected).toBeGreaterThan(before.evicted + before.rejected);
        expect(deliveredOfLeft).toBeGreaterThan(0);
        expect(missing).toEqual([]);
        expect(notAudited).toBe(0);
      },
    );
  });
});
