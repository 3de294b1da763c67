import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { DecisionSubscriber } from "../agent/helpers.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { agentConfig, ServiceProcess, DECISION_TOPIC, makeWorkDir, readAudit, sleep, waitFor, writeConfig } from "./harness.js";
import { faultCase, lostText, scaled } from "./report.js";

const KILLS = scaled(10, 3);

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let subscriber: DecisionSubscriber;
let agent: ServiceProcess | undefined;

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("kill -9 during audit writes", () => {
  beforeAll(async () => {
    work = await makeWorkDir("audit-kill");
    broker = await startMosquitto();
    subscriber = await DecisionSubscriber.start(broker.url, DECISION_TOPIC);
  });

  afterAll(async () => {
    await agent?.kill("SIGKILL");
    await subscriber?.stop();
    await broker?.close();
    await work?.remove();
  });

  it("keeps every received decision audited", async () => {
    await faultCase(
      {
        case: "4. kill -9 of the agent during audit writes",
        injected: `${KILLS} SIGKILLs of the agent process (MQTT actuator, QoS 1, audit synchronous FULL) after 1 to 8 delivered decisions plus 0 to 400 ms; one audit file across all runs`,
        expected: "every decision the actuator's subscriber received is in the audit; PRAGMA integrity_check is ok after every kill",
      },
      async (row) => {
        const auditFile = path.join(work.dir, "state", "audit.db");
        const received = new Set<string>();
        const missing: string[] = [];
        const integrity: string[] = [];
        let auditedNotReceived = 0;
        for (let run = 0; run < KILLS; run++) {
          const source = `kill${run}`;
          const config = agentConfig({ dir: work.dir, sourceName: source, actuators: [{ type: "mqtt", url: broker.url, qos: 1 }], mining: { enabled: false } });
          agent = ServiceProcess.agent(await writeConfig(path.join(work.dir, `agent-${run}.yaml`), config));
          await agent.waitForLog("agent ready", 120_000);
          const decisionsBeforeKill = 1 + Math.floor(Math.random() * 8);
          await waitFor(() => subscriber.idsWithPrefix(`${source}-`).length >= decisionsBeforeKill, `${decisionsBeforeKill} decisions over MQTT`, 60_000);
          await sleep(Math.floor(Math.random() * 400));
          await agent.kill("SIGKILL");
          // Lets the broker forward what the agent wrote to its socket before it died.
          await sleep(300);

          const audit = readAudit(auditFile);
          integrity.push(audit.integrity);
          const ids = subscriber.idsWithPrefix(`${source}-`);
          for (const id of ids) {
            received.add(id);
            if (!audit.frameIds.has(id)) {
              missing.push(id);
            }
          }
          auditedNotReceived += [...audit.frameIds].filter((id) => id.startsWith(`${source}-`) && !ids.includes(id)).length;
        }
        agent = undefined;
        const final = readAudit(auditFile);

        row.observed =
          `${KILLS} kills; ${received.size} decisions received by the subscriber, ${final.rows} rows in the audit; ` +
          `integrity_check ok after ${integrity.filter((result) => result === "ok").length} of ${KILLS} kills; ` +
          `${auditedNotReceived} audited decisions had not reached the subscriber when the agent died`;
        row.lost = lostText({ "received decisions missing from the audit": missing.length }, [
          `${auditedNotReceived} audited decisions did not reach the subscriber (the agent died after the audit commit and before the broker had them)`,
        ]);

        expect(missing).toEqual([]);
        expect(integrity.every((result) => result === "ok")).toBe(true);
        expect(received.size).toBeGreaterThanOrEqual(KILLS);
      },
    );
  });
});
