import { writeFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import type { Actuator } from "../../src/decision/actuators.js";
import { generateKeyPair } from "../../src/models/signing.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import {
  agentConfig,
  auditRows,
  DECISION_TOPIC,
  DecisionListener,
  InProcessAgent,
  makeWorkDir,
  OutboxProbe,
  readAudit,
  seconds,
  SimulatedTrainer,
  sleep,
  waitFor,
  writeConfig,
} from "./harness.js";
import { faultCase, lostText, scaled } from "./report.js";

const RUN_BEFORE_MS = scaled(20_000, 5_000);
const OUTAGE_MS = scaled(10_000, 3_000);
const RUN_AFTER_MS = scaled(20_000, 5_000);

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let trainer: SimulatedTrainer;
let running: InProcessAgent;
let probe: OutboxProbe;
let listener: DecisionListener;
/** Time the broker acknowledged each decision's QoS 1 publish, by frame id. */
const brokerAcked = new Map<string, number>();

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("broker killed at full rate", () => {
  beforeAll(async () => {
    work = await makeWorkDir("broker-kill");
    broker = await startMosquitto();
    const keys = generateKeyPair();
    const keyFile = path.join(work.dir, "trainer.pub");
    await writeFile(keyFile, keys.publicKeyPem);
    trainer = await SimulatedTrainer.start(path.join(work.dir, "trainer"), broker.url, keys);
    listener = await DecisionListener.start(broker.url);
    const configFile = await writeConfig(path.join(work.dir, "agent.yaml"), agentConfig({ dir: work.dir, fleetUrl: broker.url, trustedKey: keyFile }));
    running = await InProcessAgent.start(configFile);
    probe = new OutboxProbe(running.agent.outboxStore!);

    // The fleet actuator publishes through this link, so the wrapper records which decisions the broker acknowledged.
    const link = running.agent.fleet!.link;
    const publish = link.publish.bind(link);
    link.publish = async (topic, payload, options) => {
      await publish(topic, payload, options);
      if (topic === DECISION_TOPIC && typeof payload === "string") {
        brokerAcked.set((JSON.parse(payload) as { frameId: string }).frameId, Date.now());
      }
    };
  });

  afterAll(async () => {
    probe?.stop();
    await running?.stop();
    await listener?.stop();
    await trainer?.close();
    await broker?.close();
    await work?.remove();
  });

  it("keeps every acknowledged example and decision", async () => {
    await faultCase(
      {
        case: "1. Broker killed during full-rate operation",
        injected: `SIGKILL of Mosquitto after ${seconds(RUN_BEFORE_MS)} of operation, restarted on the same port ${seconds(OUTAGE_MS)} later; ${seconds(RUN_AFTER_MS)} more operation`,
        expected: "decisions continue and are audited during the outage; the agent reconnects and its retained status is online again; every example deleted from the outbox as acknowledged is in the trainer's store; every decision delivered is in the audit",
      },
      async (row) => {
        const auditFile = running.agent.agentConfig.audit.path;
        await waitFor(() => trainer.stored.size >= 3 && running.decisions.length >= 10, "three uploaded examples and ten decisions", 120_000);
        await sleep(RUN_BEFORE_MS);

        const storedBefore = trainer.stored.size;
        const auditAtKill = auditRows(auditFile);
        const killAt = Date.now();
        await broker.kill();
        await sleep(OUTAGE_MS);
        const auditAtRestart = auditRows(auditFile);
        const decidedInOutage = running.decisionsBetween(killAt, Date.now());
        const gapInOutage = running.longestGap(killAt, Date.now());

        const restartAt = Date.now();
        await broker.restart();
        await waitFor(() => trainer.statusSince(restartAt)?.state === "online", "the agent's online status after the restart", 60_000);
        const onlineAfterMs = trainer.statusSince(restartAt)!.receivedAt - restartAt;
        const storedAtRestart = trainer.stored.size;
        await waitFor(() => trainer.stored.size > storedAtRestart, "an uploaded example after the restart", 120_000);
        const uploadAfterMs = Date.now() - restartAt;
        await sleep(RUN_AFTER_MS);

        // Stop new frames and let the uplink and the actuator finish what they hold.
        running.agent.pipeline!.pause();
        await sleep(3_000);
        const retained = trainer.statusSince(restartAt);
        const audit = readAudit(auditFile);
        const decided = running.decisions.map((record) => record.frameId);
        const notAudited = decided.filter((id) => !audit.frameIds.has(id));
        const deliveredNotAudited = listener.frameIds.filter((id) => !audit.frameIds.has(id));
        const delivered = new Set(listener.frameIds);
        const ackedNotDelivered = [...brokerAcked].filter(([id]) => !delivered.has(id));
        const lostInCrash = ackedNotDelivered.filter(([, at]) => at < killAt).length;
        const examplesMissing = [...probe.acked].filter((id) => !trainer.stored.has(id));
        const outboxStats = running.agent.outboxStore!.stats();
        const actuators = (running.agent as unknown as { actuators: Actuator[] }).actuators;
        const actuatorDropped = actuators.reduce((sum, actuator) => sum + actuator.dropped, 0);
        const undelivered = decided.filter((id) => !delivered.has(id)).length;

        row.observed =
          `${decidedInOutage} decisions during the ${seconds(OUTAGE_MS)} outage (longest gap ${seconds(gapInOutage)}); audit rows ${auditAtKill} at the kill, ${auditAtRestart} at the restart; ` +
          `status online ${seconds(onlineAfterMs)} after the restart, first upload after ${seconds(uploadAfterMs)}; ` +
          `examples stored by the trainer: ${storedBefore} before the kill, ${trainer.stored.size} at the end; outbox acked ${probe.acked.size}, ${outboxStats.items} still queued; ` +
          `decisions: ${decided.length} made, ${audit.rows} audited (integrity ${audit.integrity}), ${delivered.size} delivered to the subscriber, ${undelivered} not delivered`;
        row.lost = lostText(
          {
            "examples acked by the trainer": examplesMissing.length,
            "decisions made but not audited": notAudited.length,
            "delivered decisions not audited": deliveredNotAudited.length,
            "decisions acknowledged by the broker before the kill, never delivered": lostInCrash,
            "decisions acknowledged by the restarted broker, never delivered": ackedNotDelivered.length - lostInCrash,
          },
          [`${actuatorDropped} decisions over the actuator's maxQueued while offline`, `${outboxStats.evicted} examples evicted from the outbox`],
        );

        expect(decidedInOutage).toBeGreaterThan(0);
        expect(auditAtRestart).toBeGreaterThan(auditAtKill);
        expect(retained?.state).toBe("online");
        expect(examplesMissing).toEqual([]);
        expect(notAudited).toEqual([]);
        expect(deliveredNotAudited).toEqual([]);
        expect(audit.integrity).toBe("ok");
      },
    );
  });
});
