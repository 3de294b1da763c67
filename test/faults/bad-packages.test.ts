import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { generateKeyPair, type SigningKeyPair } from "../../src/models/signing.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { agentConfig, InProcessAgent, makeWorkDir, packBundle, readAudit, seconds, signedCopy, SimulatedTrainer, waitFor, writeConfig } from "./harness.js";
import { faultCase, lostText } from "./report.js";

interface BadPackage {
  kind: string;
  version: string;
  injected: string;
  /** Builds the bundle bytes. */
  build: (dir: string, keys: SigningKeyPair, otherKeys: SigningKeyPair) => Promise<Buffer>;
}

const PACKAGES: BadPackage[] = [
  {
    kind: "corrupt",
    version: "1.0.6",
    injected: "1 MiB of random bytes in place of a bundle",
    build: async () => randomBytes(1024 * 1024),
  },
  {
    kind: "truncated",
    version: "1.0.7",
    injected: "a signed bundle cut to half its length",
    build: async (dir, keys) => {
      const bundle = await packBundle(await signedCopy(dir, keys, "1.0.7"));
      return bundle.subarray(0, Math.floor(bundle.length / 2));
    },
  },
  {
    kind: "unsigned",
    version: "1.0.8",
    injected: "a copy of models/default with a new version and no signature.json",
    build: async (dir, keys) => packBundle(await signedCopy(dir, keys, "1.0.8", { unsigned: true })),
  },
  {
    kind: "wrongly signed",
    version: "1.0.9",
    injected: "a package signed by a key the agent does not trust",
    build: async (dir, _keys, otherKeys) => packBundle(await signedCopy(dir, otherKeys, "1.0.9")),
  },
  {
    kind: "tampered after signing",
    version: "1.0.10",
    injected: "a signed package whose model.onnx had one byte flipped after signing",
    build: async (dir, keys) => {
      const pkg = await signedCopy(dir, keys, "1.0.10");
      const model = path.join(pkg, "model.onnx");
      const bytes = await readFile(model);
      bytes[bytes.length - 100] = bytes[bytes.length - 100]! ^ 0xff;
      await writeFile(model, bytes);
      return packBundle(pkg);
    },
  },
  {
    kind: "outputs do not match the manifest",
    version: "1.0.11",
    injected: "a correctly signed package whose manifest lists 7 labels for a model with 6 outputs",
    build: async (dir, keys) =>
      packBundle(
        await signedCopy(dir, keys, "1.0.11", {
          manifest: (manifest) => {
            manifest.labels = [...(manifest.labels as string[]), "textile"];
          },
        }),
      ),
  },
];

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let broker: MosquittoBroker;
let trainer: SimulatedTrainer;
let running: InProcessAgent;
let keys: SigningKeyPair;
const otherKeys = generateKeyPair();

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("bad model packages over the fleet connection", () => {
  beforeAll(async () => {
    work = await makeWorkDir("bad-packages");
    broker = await startMosquitto();
    keys = generateKeyPair();
    const keyFile = path.join(work.dir, "trainer.pub");
    await writeFile(keyFile, keys.publicKeyPem);
    trainer = await SimulatedTrainer.start(path.join(work.dir, "trainer"), broker.url, keys);
    const config = agentConfig({ dir: work.dir, fleetUrl: broker.url, trustedKey: keyFile, mining: { enabled: false } });
    running = await InProcessAgent.start(await writeConfig(path.join(work.dir, "agent.yaml"), config));
    await waitFor(() => running.decisions.length >= 10, "ten decisions", 120_000);
  });

  afterAll(async () => {
    await running?.stop();
    await trainer?.close();
    await broker?.close();
    await work?.remove();
  });

  it.each(PACKAGES)("rejects a $kind package", async ({ kind, version, injected, build }) => {
    await faultCase(
      {
        case: `7. Bad model package: ${kind}`,
        injected: `${injected}; sent over the fleet connection with deploy: true to a running agent`,
        expected: "the update is rejected; the active model and the store pointer stay as they were; decisions never stop",
      },
      async (row) => {
        const bundle = await build(path.join(work.dir, "packages"), keys, otherKeys);
        const pointerFile = path.join(work.dir, "state", "models", "active.json");
        const updatesBefore = running.updates.length;
        const sentAt = Date.now();
        await trainer.sendBundle(bundle, { name: "sortline-trashnet", version, deploy: true });
        await waitFor(
          () => running.updates.slice(updatesBefore).some((status) => status.state === "rejected" || status.state === "active"),
          `the final update state of the ${kind} package`,
          120_000,
        );
        const settledAt = Date.now();
        const final = running.updates.slice(updatesBefore).find((status) => status.state === "rejected" || status.state === "active")!;
        const decided = running.decisionsBetween(sentAt, settledAt);
        const gap = running.longestGap(sentAt, settledAt);
        const activeVersion = running.agent.activeRunner!.manifest.version;
        const pointerWritten = existsSync(pointerFile);
        const health = (await (await fetch(`http://127.0.0.1:${running.agent.healthPort!}/healthz`)).json()) as { status: string };
        const audit = readAudit(running.agent.agentConfig.audit.path);
        const notAudited = running.decisions.filter((record) => !audit.frameIds.has(record.frameId)).length;
        const reason = (final.reason ?? "").replaceAll(work.dir, "<work>").slice(0, 200);

        row.observed =
          `${final.state} ${seconds(settledAt - sentAt)} after the send (${final.error ?? "no error class"}: ${reason}); ` +
          `${decided} decisions meanwhile, longest gap ${seconds(gap)}; active model ${activeVersion}; store pointer ${pointerWritten ? "written" : "absent as before"}; /healthz ${health.status}`;
        row.lost = lostText({ "decisions made but not audited": notAudited }, ["the bad package (rejected on purpose)"]);

        expect(final.state).toBe("rejected");
        expect(activeVersion).toBe("1.0.0");
        expect(pointerWritten).toBe(false);
        expect(decided).toBeGreaterThan(0);
        expect(notAudited).toBe(0);
      },
    );
  });
});
