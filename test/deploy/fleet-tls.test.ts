import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir, userInfo } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import mqtt, { type MqttClient } from "mqtt";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { stringify } from "yaml";

import { Agent } from "../../src/agent/agent.js";
import { loadAgentConfig } from "../../src/config/load.js";
import { silentLogger } from "../../src/lib/log.js";
import { generateKeyPair, type SigningKeyPair } from "../../src/models/signing.js";
import { CommandClient, signCommandRequest } from "../../src/protocol/commands.js";
import { MqttLink } from "../../src/protocol/link.js";
import { PROTOCOL_VERSION, type CommandRequest } from "../../src/protocol/messages.js";
import { deviceTopic, fleetPattern } from "../../src/protocol/topics.js";
import { parseTrainerConfig } from "../../src/trainer/config.js";
import { TrainerService, type FleetDevice } from "../../src/trainer/service.js";
import { freePort, MOSQUITTO_BINARY } from "../helpers/mosquitto.js";

const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
const deployDir = path.join(repoRoot, "deploy");
const pkiScript = path.join(deployDir, "pki.sh");
const renderScript = path.join(deployDir, "mosquitto", "render.sh");

const mosquittoMissing = existsSync(MOSQUITTO_BINARY) ? "" : ` (skipped: ${MOSQUITTO_BINARY} is not installed)`;

const SITE = "plant-a";
const DEVICE_A = "cam-1";
const DEVICE_B = "cam-2";

/** MQTT 5 reason code "Not authorized" in PUBACK. */
const NOT_AUTHORIZED = 0x87;

interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

let workDir: string;
let pkiDir: string;
let confDir: string;
let logFile: string;
let port: number;
let broker: ChildProcess | undefined;
let keys: SigningKeyPair;
let agent: Agent | undefined;
let trainer: TrainerService | undefined;
let observer: MqttClient | undefined;
const decisions: string[] = [];

function pki(...args: string[]): string {
  return execFileSync(pkiScript, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function brokerLogTail(lines = 40): string {
  if (logFile === undefined || !existsSync(logFile)) {
    return "(no broker log)";
  }
  return readFileSync(logFile, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
}

function tlsFiles(dir: string, base: string): TlsFiles {
  return { ca: path.join(pkiDir, "ca.crt"), cert: path.join(dir, `${base}.crt`), key: path.join(dir, `${base}.key`) };
}

function deviceTls(device: string): TlsFiles {
  return tlsFiles(path.join(pkiDir, "devices", SITE, device), "device");
}

function trainerTls(): TlsFiles {
  return tlsFiles(path.join(pkiDir, "trainer"), "trainer");
}

/** Starts Mosquitto with the rendered config and waits for the "running" line in its log. */
async function startBroker(): Promise<void> {
  const child = spawn(MOSQUITTO_BINARY, ["-c", path.join(confDir, "sortline.conf")], { stdio: "ignore" });
  broker = child;
  // Stops the broker when the test process exits without running afterAll.
  process.once("exit", () => child.kill("SIGTERM"));
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`mosquitto exited with code ${child.exitCode} before it was running:\n${brokerLogTail()}`);
    }
    if (existsSync(logFile) && readFileSync(logFile, "utf8").includes(" running")) {
      return;
    }
    if (Date.now() > deadline) {
      throw new Error(`mosquitto was not running within 10 s:\n${brokerLogTail()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function stopBroker(): Promise<void> {
  const child = broker;
  broker = undefined;
  if (!child || child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  await new Promise<void>((resolve) => {
    child.once("exit", () => resolve());
    child.kill("SIGTERM");
  });
}

/** Connects a plain MQTT 5 client over TLS with the given certificate; rejects on a TLS or CONNACK error. */
async function connectAs(files: TlsFiles): Promise<MqttClient> {
  const client = mqtt.connect(`mqtts://127.0.0.1:${port}`, {
    ca: readFileSync(files.ca),
    cert: readFileSync(files.cert),
    key: readFileSync(files.key),
    rejectUnauthorized: true,
    reconnectPeriod: 0,
    connectTimeout: 5_000,
    protocolVersion: 5,
  });
  await new Promise<void>((resolve, reject) => {
    client.once("connect", () => resolve());
    client.once("error", reject);
    client.once("close", () => reject(new Error("connection closed before CONNACK")));
  });
  return client;
}

async function waitFor(check: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function startAgent(): Promise<Agent> {
  await writeFile(path.join(workDir, "trainer.pub"), keys.publicKeyPem);
  const configFile = path.join(workDir, "agent.yaml");
  await writeFile(
    configFile,
    stringify({
      device: { id: DEVICE_A, site: SITE },
      sources: [{ type: "directory", name: "replay", path: path.join(repoRoot, "demo", "photos"), fps: 8, loop: true, shuffleSeed: 3 }],
      pipeline: { maxBatch: 4 },
      actuators: [{ type: "fleet" }],
      audit: { path: path.join(workDir, "agent-state", "audit.db") },
      health: { port: 0 },
      fleet: {
        url: `mqtts://127.0.0.1:${port}`,
        protocolVersion: 5,
        tls: deviceTls(DEVICE_A),
        trustedKeys: ["trainer.pub"],
        statusIntervalSeconds: 1,
      },
      // Frames with a top confidence under 0.999 count as low-confidence, so most frames become
      // hard-example candidates and uploads start within seconds.
      mining: { lowConfidence: 0.999, perHour: 100000, minDistance: 0.02 },
    }),
  );
  const config = await loadAgentConfig(configFile);
  const started = new Agent({ config, logger: silentLogger, configFile, overrides: {} });
  await started.start();
  return started;
}

async function startTrainer(): Promise<TrainerService> {
  const dir = path.join(workDir, "trainer");
  await mkdir(dir);
  await writeFile(path.join(dir, "signing.key"), keys.privateKeyPem, { mode: 0o600 });
  const document = {
    broker: { url: `mqtts://127.0.0.1:${port}`, protocolVersion: 5, tls: trainerTls() },
    dataDir: "data",
    review: { host: "127.0.0.1", port: 0 },
    signing: { privateKey: "signing.key" },
    base: { datasets: [path.join(repoRoot, "demo", "photos")], model: path.join(repoRoot, "models", "default") },
    // No labels are added here, so this threshold and the default intervalMinutes of 0 keep retraining off.
    training: { modelName: "plant-a-waste", trigger: { minNewLabels: 1_000_000 } },
    fleet: { groups: { line1: [`${SITE}/${DEVICE_A}`] }, publishTo: "line1" },
  };
  const file = path.join(dir, "trainer.yaml");
  await writeFile(file, JSON.stringify(document));
  const service = new TrainerService({ config: parseTrainerConfig(document, file, dir), logger: silentLogger, retrainCheckIntervalMs: 3_600_000 });
  await service.start();
  return service;
}

beforeAll(async () => {
  if (mosquittoMissing !== "") {
    return;
  }
  workDir = await mkdtemp(path.join(tmpdir(), "sortline-fleet-tls-"));
  pkiDir = path.join(workDir, "pki");
  confDir = path.join(workDir, "mosquitto");
  logFile = path.join(workDir, "mosquitto.log");
  const inventory = path.join(workDir, "fleet.txt");
  await mkdir(path.join(workDir, "data"));
  await writeFile(inventory, `${SITE} ${DEVICE_A}\n${SITE} ${DEVICE_B}\n`);

  pki("init", pkiDir);
  pki("broker", pkiDir, "localhost", "127.0.0.1");
  pki("fleet", pkiDir, inventory);
  pki("trainer", pkiDir);
  pki("observer", pkiDir, SITE);

  port = await freePort();
  // Mosquitto started as root switches to the --user of render.sh, and only root can read the temp folder.
  const user = userInfo().uid === 0 ? "root" : userInfo().username;
  execFileSync(
    renderScript,
    ["--port", String(port), "--bind", "127.0.0.1", "--data-dir", path.join(workDir, "data"), "--log-file", logFile, "--user", user, pkiDir, inventory, confDir],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
  );
  await startBroker();

  // The observer identity of the site reads its decisions. It has its own CN, so it does not
  // share a connection slot with the trainer service.
  observer = await connectAs(tlsFiles(path.join(pkiDir, "observers", SITE), "observer"));
  observer.on("message", (_topic, payload) => decisions.push(payload.toString("utf8")));
  await observer.subscribeAsync(deviceTopic(SITE, DEVICE_A, "decision"), { qos: 1 });

  keys = generateKeyPair();
  trainer = await startTrainer();
  agent = await startAgent();
}, 120_000);

afterAll(async () => {
  await agent?.stop();
  await trainer?.stop();
  await observer?.endAsync(true).catch(() => undefined);
  await stopBroker();
  if (workDir !== undefined) {
    await rm(workDir, { recursive: true, force: true });
  }
}, 60_000);

describe.skipIf(mosquittoMissing !== "")(`agent and trainer over TLS with per-device ACL${mosquittoMissing}`, () => {
  beforeEach((context) => {
    context.onTestFailed(() => {
      console.error(`mosquitto log (last lines):\n${brokerLogTail()}`);
    });
  });

  it("trainer tracks device A online", async () => {
    const service = trainer!;
    await waitFor(() => service.tracker.list().some((s) => s.device === DEVICE_A && s.state === "online"), "A's online status at the trainer");

    const response = await fetch(`http://127.0.0.1:${service.reviewPort}/api/fleet`);
    const body = (await response.json()) as { devices: FleetDevice[] };

    expect(response.status).toBe(200);
    expect(body.devices).toHaveLength(1);
    expect(body.devices[0]).toMatchObject({ site: SITE, device: DEVICE_A, groups: ["line1"], reachable: true });
    expect(body.devices[0]?.status?.model).toMatchObject({ name: "sortline-trashnet", version: "1.0.0" });
  });

  it("hard examples reach the catalogue", async () => {
    const service = trainer!;
    await waitFor(() => service.catalogue.count("all") >= 2, "two hard examples in the trainer's catalogue", 45_000);

    const examples = service.catalogue.list();

    expect(examples.length).toBeGreaterThanOrEqual(2);
    for (const example of examples) {
      expect(example).toMatchObject({ site: SITE, device: DEVICE_A, modelVersion: "1.0.0" });
    }
    await waitFor(() => agent!.outboxStore!.stats().acked >= 2, "two acknowledged uploads in A's outbox");
  }, 60_000);

  it("decisions reach the site observer", async () => {
    await waitFor(() => decisions.length >= 3, "three decisions from A");

    const first = JSON.parse(decisions[0]!) as Record<string, unknown>;

    expect(typeof first.bin).toBe("string");
    expect(typeof first.frameId).toBe("string");
  });

  describe("with the trainer service stopped", () => {
    // The broker sets the client id to the certificate CN, so a second connection with the
    // trainer certificate would close the service's connection. TrainerService does not expose
    // its MqttLink, so the command tests stop the service and connect as the trainer instead.
    let link: MqttLink;
    let client: CommandClient;
    const replyIds: string[] = [];

    beforeAll(async () => {
      await trainer?.stop();
      trainer = undefined;
      link = new MqttLink({ url: `mqtts://127.0.0.1:${port}`, role: "trainer", protocolVersion: 5, tls: trainerTls(), logger: silentLogger });
      await link.connect({ timeoutMs: 10_000 });
      await link.subscribe(fleetPattern("reply"), (_topic, payload) => {
        replyIds.push(String((JSON.parse(payload.toString("utf8")) as { id: unknown }).id));
      });
      client = new CommandClient({ link, signingKey: { keyId: keys.keyId, privateKey: keys.privateKeyPem } });
    }, 30_000);

    afterAll(async () => {
      await client?.close();
      await link?.close();
    });

    it("signed status command gets a reply", async () => {
      const reply = await client.request(SITE, DEVICE_A, "status", {}, { timeoutMs: 10_000 });

      expect(reply.ok).toBe(true);
      expect(reply.result).toMatchObject({ device: { id: DEVICE_A, site: SITE }, model: { version: "1.0.0" } });
    });

    it("device B cannot command device A", async () => {
      const deviceB = await connectAs(deviceTls(DEVICE_B));
      const sentAt = Date.now();
      const forged: CommandRequest = { v: PROTOCOL_VERSION, id: randomUUID(), command: "pause", args: {}, sentAt, expiresAt: sentAt + 30_000 };
      // A valid trainer signature shows that the ACL alone keeps the request away from A.
      forged.keyId = keys.keyId;
      forged.sig = signCommandRequest(forged, SITE, DEVICE_A, keys.privateKeyPem);

      let reasonCode = 0;
      try {
        await deviceB.publishAsync(deviceTopic(SITE, DEVICE_A, "cmd"), JSON.stringify(forged), { qos: 1 });
      } catch (error) {
        reasonCode = (error as { code?: number }).code ?? -1;
      } finally {
        await deviceB.endAsync(true).catch(() => undefined);
      }
      // A reply to this later request shows that A has processed its cmd queue up to here.
      const marker = await client.request(SITE, DEVICE_A, "status", {}, { timeoutMs: 10_000 });

      expect(reasonCode).toBe(NOT_AUTHORIZED);
      expect(marker.ok).toBe(true);
      expect(replyIds).toContain(marker.id);
      expect(replyIds).not.toContain(forged.id);
      expect(agent!.pipeline!.paused).toBe(false);
    });
  });
});
