import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir, userInfo } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { freePort, MOSQUITTO_BINARY } from "../helpers/mosquitto.js";

const deployDir = fileURLToPath(new URL("../../deploy/", import.meta.url));
const pkiScript = path.join(deployDir, "pki.sh");
const renderScript = path.join(deployDir, "mosquitto", "render.sh");

const mosquittoMissing = existsSync(MOSQUITTO_BINARY) ? "" : ` (skipped: ${MOSQUITTO_BINARY} is not installed)`;

const SITE_A = "plant-a";
const DEVICE_A = "cam-1";
const SITE_B = "plant-b";
// A dot in the name checks that CNs and ACL topics keep names with dots intact.
const DEVICE_B = "sorter.2";
const BASE_A = `sortline/v1/${SITE_A}/${DEVICE_A}`;
const BASE_B = `sortline/v1/${SITE_B}/${DEVICE_B}`;

/** MQTT 5 reason code "Not authorized" in PUBACK and SUBACK. */
const NOT_AUTHORIZED = 0x87;
/** MQTT 3.1.1 SUBACK return code "Failure". */
const SUBACK_FAILURE = 0x80;

interface Identity {
  cert: string;
  key: string;
}

let workDir: string;
let pkiDir: string;
let confDir: string;
let logFile: string;
let inventory: string;
let port: number;
let broker: ChildProcess | undefined;
const clients: MqttClient[] = [];

function pki(...args: string[]): string {
  return execFileSync(pkiScript, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function renderConfig(): void {
  // Mosquitto started as root switches to the --user of render.sh, and only root can read the temp folder.
  const user = userInfo().uid === 0 ? "root" : userInfo().username;
  execFileSync(
    renderScript,
    [
      "--port", String(port),
      "--bind", "127.0.0.1",
      "--data-dir", path.join(workDir, "data"),
      "--log-file", logFile,
      "--user", user,
      pkiDir, inventory, confDir,
    ],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
  );
}

function brokerLogTail(lines = 40): string {
  if (!existsSync(logFile)) {
    return "(no broker log)";
  }
  return readFileSync(logFile, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
}

function identity(dir: string, base: string): Identity {
  return { cert: readFileSync(path.join(dir, `${base}.crt`), "utf8"), key: readFileSync(path.join(dir, `${base}.key`), "utf8") };
}

function deviceIdentity(site: string, device: string, root = pkiDir): Identity {
  return identity(path.join(root, "devices", site, device), "device");
}

/** Starts the broker and waits for the "running" line in its log. */
async function startBroker(): Promise<void> {
  const child = spawn(MOSQUITTO_BINARY, ["-c", path.join(confDir, "sortline.conf")], { stdio: "ignore" });
  broker = child;
  // Stops the broker when the test process exits without running afterAll.
  process.once("exit", () => child.kill("SIGTERM"));
  const deadline = Date.now() + 10_000;
  const startedBefore = existsSync(logFile) ? readFileSync(logFile, "utf8").split(" running").length : 1;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`mosquitto exited with code ${child.exitCode} before it was running:\n${brokerLogTail()}`);
    }
    if (existsSync(logFile) && readFileSync(logFile, "utf8").split(" running").length > startedBefore) {
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

/** Connects over TLS with the given identity; rejects on a TLS or CONNACK error. */
async function connectAs(
  client: Partial<Identity> & { ca?: string },
  options: IClientOptions = {},
): Promise<MqttClient> {
  const connection = mqtt.connect(`mqtts://127.0.0.1:${port}`, {
    ca: client.ca ?? readFileSync(path.join(pkiDir, "ca.crt"), "utf8"),
    cert: client.cert,
    key: client.key,
    rejectUnauthorized: true,
    reconnectPeriod: 0,
    connectTimeout: 5_000,
    protocolVersion: 4,
    ...options,
  });
  clients.push(connection);
  await new Promise<void>((resolve, reject) => {
    connection.once("connect", () => resolve());
    connection.once("error", reject);
    connection.once("close", () => reject(new Error("connection closed before CONNACK")));
  });
  return connection;
}

/** Collects messages per topic from a client's subscriptions. */
function collect(client: MqttClient): Map<string, string[]> {
  const received = new Map<string, string[]>();
  client.on("message", (topic, payload) => {
    received.set(topic, [...(received.get(topic) ?? []), payload.toString("utf8")]);
  });
  return received;
}

async function waitFor(check: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Returns the reason code of a rejected QoS 1 publish, or 0 when the broker accepted it. */
async function publishReasonCode(client: MqttClient, topic: string, payload: string): Promise<number> {
  try {
    await client.publishAsync(topic, payload, { qos: 1 });
    return 0;
  } catch (error) {
    return (error as { code?: number }).code ?? -1;
  }
}

async function closeClients(): Promise<void> {
  const open = clients.splice(0);
  await Promise.all(open.map((client) => client.endAsync(true).catch(() => undefined)));
}

beforeAll(async () => {
  if (mosquittoMissing !== "") {
    return;
  }
  workDir = await mkdtemp(path.join(tmpdir(), "sortline-deploy-"));
  pkiDir = path.join(workDir, "pki");
  confDir = path.join(workDir, "mosquitto");
  logFile = path.join(workDir, "mosquitto.log");
  inventory = path.join(workDir, "fleet.txt");
  await mkdir(path.join(workDir, "data"));
  await writeFile(inventory, `# site device\n${SITE_A} ${DEVICE_A}\n\n${SITE_B} ${DEVICE_B}\n`);

  pki("init", pkiDir);
  pki("broker", pkiDir, "localhost", "127.0.0.1");
  pki("fleet", pkiDir, inventory);
  pki("trainer", pkiDir);
  pki("observer", pkiDir, SITE_A);
  // A valid certificate for a device that the inventory, and so the ACL, does not list.
  pki("device", pkiDir, SITE_A, "unlisted");
  // A second CA that issues a certificate with device A's CN.
  pki("init", path.join(workDir, "other-ca"));
  pki("device", path.join(workDir, "other-ca"), SITE_A, DEVICE_A);

  port = await freePort();
  renderConfig();
  await startBroker();
});

afterAll(async () => {
  await closeClients();
  await stopBroker();
  if (workDir !== undefined) {
    await rm(workDir, { recursive: true, force: true });
  }
});

describe.skipIf(mosquittoMissing !== "")(`TLS broker with per-device ACL${mosquittoMissing}`, () => {
  beforeEach((context) => {
    context.onTestFailed(() => {
      console.error(`mosquitto log (last lines):\n${brokerLogTail()}`);
    });
  });

  afterEach(async () => {
    await closeClients();
  });

  it("device publishes status and receives cmd", async () => {
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"));
    const trainerInbox = collect(trainer);
    await trainer.subscribeAsync(`sortline/v1/+/+/status`, { qos: 1 });
    const device = await connectAs(deviceIdentity(SITE_A, DEVICE_A));
    const deviceInbox = collect(device);
    await device.subscribeAsync(`${BASE_A}/cmd`, { qos: 1 });

    await device.publishAsync(`${BASE_A}/status`, '{"state":"running"}', { qos: 1, retain: true });
    await trainer.publishAsync(`${BASE_A}/cmd`, '{"id":1,"op":"ping"}', { qos: 1 });

    await waitFor(() => trainerInbox.has(`${BASE_A}/status`), "the trainer to receive A's status");
    await waitFor(() => deviceInbox.has(`${BASE_A}/cmd`), "device A to receive its cmd");
    expect(trainerInbox.get(`${BASE_A}/status`)).toEqual(['{"state":"running"}']);
    expect(deviceInbox.get(`${BASE_A}/cmd`)).toEqual(['{"id":1,"op":"ping"}']);
  });

  it("device reads its own retained status", async () => {
    const device = await connectAs(deviceIdentity(SITE_A, DEVICE_A));
    const inbox = collect(device);
    await device.publishAsync(`${BASE_A}/status`, '{"state":"idle"}', { qos: 1, retain: true });

    const granted = await device.subscribeAsync(`${BASE_A}/status`, { qos: 1 });

    expect(granted.map((grant) => grant.qos)).toEqual([1]);
    await waitFor(() => inbox.has(`${BASE_A}/status`), "the retained status");
    expect(inbox.get(`${BASE_A}/status`)).toEqual(['{"state":"idle"}']);
  });

  it("drops a device's MQTT 3.1.1 publish to another device", async () => {
    const deviceB = await connectAs(deviceIdentity(SITE_B, DEVICE_B));
    const inboxB = collect(deviceB);
    await deviceB.subscribeAsync(`${BASE_B}/cmd`, { qos: 1 });
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"));
    const trainerInbox = collect(trainer);
    await trainer.subscribeAsync(`${BASE_B}/status`, { qos: 1 });
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A));

    // MQTT 3.1.1 has no negative PUBACK, so Mosquitto acknowledges and drops the message.
    await deviceA.publishAsync(`${BASE_B}/cmd`, "forged by A", { qos: 1 });
    await deviceA.publishAsync(`${BASE_B}/status`, "forged by A", { qos: 1, retain: true });
    // The markers go out after the broker acknowledged A's publishes, so a forged message that
    // was routed would arrive first.
    await trainer.publishAsync(`${BASE_B}/cmd`, "marker", { qos: 1 });
    await deviceB.publishAsync(`${BASE_B}/status`, "marker", { qos: 1 });

    await waitFor(() => inboxB.has(`${BASE_B}/cmd`), "the cmd marker at device B");
    await waitFor(() => trainerInbox.has(`${BASE_B}/status`), "the status marker at the trainer");
    expect(inboxB.get(`${BASE_B}/cmd`)).toEqual(["marker"]);
    expect(trainerInbox.get(`${BASE_B}/status`)).toEqual(["marker"]);
  });

  it("rejects a device's MQTT 5 publish to another device", async () => {
    const deviceB = await connectAs(deviceIdentity(SITE_B, DEVICE_B), { protocolVersion: 5 });
    const inboxB = collect(deviceB);
    await deviceB.subscribeAsync(`${BASE_B}/down/data`, { qos: 1 });
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A), { protocolVersion: 5 });

    const forged = await publishReasonCode(deviceA, `${BASE_B}/down/data`, "forged by A");
    const wrongDirection = await publishReasonCode(deviceA, `${BASE_A}/cmd`, "device writes its own cmd");
    const own = await publishReasonCode(deviceA, `${BASE_A}/reply`, '{"id":1,"ok":true}');

    expect(forged).toBe(NOT_AUTHORIZED);
    expect(wrongDirection).toBe(NOT_AUTHORIZED);
    expect(own).toBe(0);
    expect(inboxB.size).toBe(0);
  });

  it("device subscribed to another device receives nothing", async () => {
    const deviceB = await connectAs(deviceIdentity(SITE_B, DEVICE_B));
    await deviceB.publishAsync(`${BASE_B}/status`, '{"state":"running"}', { qos: 1, retain: true });
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A));
    const inboxA = collect(deviceA);
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"));

    // Mosquitto with acl_file grants every subscription and checks the read rule for each
    // message it would deliver instead. Its changelog for 1.3.5 says that subscription checks
    // were disabled because wildcard filters cannot be checked against wildcard rules.
    const granted = await deviceA.subscribeAsync(
      [`${BASE_B}/cmd`, `${BASE_B}/status`, "sortline/v1/+/+/cmd", "sortline/v1/#", `${BASE_A}/cmd`],
      { qos: 1 },
    );
    await trainer.publishAsync(`${BASE_B}/cmd`, '{"id":3,"op":"ping"}', { qos: 1 });
    await trainer.publishAsync(`${BASE_A}/cmd`, "marker", { qos: 1 });

    for (const grant of granted) {
      expect([1, SUBACK_FAILURE]).toContain(grant.qos);
    }
    await waitFor(() => inboxA.has(`${BASE_A}/cmd`), "the cmd marker at device A");
    // The marker matches three of A's filters, so it may arrive once per filter.
    expect(new Set(inboxA.get(`${BASE_A}/cmd`))).toEqual(new Set(["marker"]));
    expect(inboxA.has(`${BASE_B}/cmd`)).toBe(false);
    expect(inboxA.has(`${BASE_B}/status`)).toBe(false);
    // sortline/v1/# also matches A's own retained status, which A may read.
    expect([...inboxA.keys()].sort()).toEqual([`${BASE_A}/cmd`, `${BASE_A}/status`]);
  });

  it("device MQTT 5 subscription to another device receives nothing", async () => {
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A), { protocolVersion: 5 });
    const inboxA = collect(deviceA);
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"), { protocolVersion: 5 });

    const granted = await deviceA.subscribeAsync([`${BASE_B}/down/data`, `${BASE_A}/up/ack`], { qos: 1 });
    await trainer.publishAsync(`${BASE_B}/down/data`, "frame for B", { qos: 1 });
    await trainer.publishAsync(`${BASE_A}/up/ack`, "marker", { qos: 1 });

    expect([1, NOT_AUTHORIZED]).toContain(granted[0]?.qos);
    expect(granted[1]?.qos).toBe(1);
    await waitFor(() => inboxA.has(`${BASE_A}/up/ack`), "the up/ack marker at device A");
    expect([...inboxA.keys()]).toEqual([`${BASE_A}/up/ack`]);
  });

  it("ignores the user name sent in CONNECT", async () => {
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A), { protocolVersion: 5, username: "trainer", password: "x" });

    const forged = await publishReasonCode(deviceA, `${BASE_B}/cmd`, "forged by A as the trainer");
    const own = await publishReasonCode(deviceA, `${BASE_A}/status`, '{"state":"running"}');

    expect(forged).toBe(NOT_AUTHORIZED);
    expect(own).toBe(0);
  });

  it("trainer commands devices and reads replies and uploads", async () => {
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"), { protocolVersion: 5 });
    const trainerInbox = collect(trainer);
    const granted = await trainer.subscribeAsync(
      ["sortline/v1/+/+/reply", "sortline/v1/+/+/up/data", "sortline/v1/+/+/down/ack", "sortline/v1/+/+/decision"],
      { qos: 1 },
    );
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A), { protocolVersion: 5 });
    const inboxA = collect(deviceA);
    await deviceA.subscribeAsync([`${BASE_A}/cmd`, `${BASE_A}/up/ack`, `${BASE_A}/down/data`], { qos: 1 });
    const frame = Buffer.alloc(64 * 1024 + 256, 7);

    await trainer.publishAsync(`${BASE_A}/cmd`, '{"id":2,"op":"upload"}', { qos: 1 });
    await deviceA.publishAsync(`${BASE_A}/reply`, '{"id":2,"ok":true}', { qos: 1 });
    await deviceA.publishAsync(`${BASE_A}/up/data`, frame, { qos: 1 });
    await trainer.publishAsync(`${BASE_A}/up/ack`, '{"seq":0}', { qos: 1 });
    await trainer.publishAsync(`${BASE_A}/down/data`, frame, { qos: 1 });
    await deviceA.publishAsync(`${BASE_A}/down/ack`, '{"seq":0}', { qos: 1 });
    await deviceA.publishAsync(`${BASE_A}/decision`, '{"bin":"glass"}', { qos: 1 });

    expect(granted.map((grant) => grant.qos)).toEqual([1, 1, 1, 1]);
    await waitFor(() => trainerInbox.size === 4, "the trainer to receive reply, up/data, down/ack and decision");
    await waitFor(() => inboxA.size === 3, "device A to receive cmd, up/ack and down/data");
    expect(trainerInbox.get(`${BASE_A}/reply`)).toEqual(['{"id":2,"ok":true}']);
    expect(trainerInbox.get(`${BASE_A}/up/data`)?.[0]?.length).toBe(frame.length);
    expect(inboxA.get(`${BASE_A}/down/data`)?.[0]?.length).toBe(frame.length);
    expect(await publishReasonCode(trainer, `${BASE_A}/status`, "forged by the trainer")).toBe(NOT_AUTHORIZED);
    expect(await publishReasonCode(trainer, `${BASE_A}/decision`, "forged by the trainer")).toBe(NOT_AUTHORIZED);
  });

  it("observer reads decisions of its site only", async () => {
    const observer = await connectAs(identity(path.join(pkiDir, "observers", SITE_A), "observer"), { protocolVersion: 5 });
    const inbox = collect(observer);
    await observer.subscribeAsync([`sortline/v1/${SITE_A}/+/decision`, `sortline/v1/${SITE_B}/+/decision`], { qos: 1 });
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A));
    const deviceB = await connectAs(deviceIdentity(SITE_B, DEVICE_B));

    await deviceB.publishAsync(`${BASE_B}/decision`, '{"bin":"metal"}', { qos: 1 });
    await deviceA.publishAsync(`${BASE_A}/decision`, '{"bin":"glass"}', { qos: 1 });
    const write = await publishReasonCode(observer, `${BASE_A}/decision`, "forged by the observer");

    await waitFor(() => inbox.has(`${BASE_A}/decision`), "A's decision at the observer");
    expect(inbox.get(`${BASE_A}/decision`)).toEqual(['{"bin":"glass"}']);
    expect(inbox.has(`${BASE_B}/decision`)).toBe(false);
    expect(write).toBe(NOT_AUTHORIZED);
  });

  it("unlisted certificate connects without topic access", async () => {
    const base = `sortline/v1/${SITE_A}/unlisted`;
    const unlisted = await connectAs(deviceIdentity(SITE_A, "unlisted"), { protocolVersion: 5 });
    const inbox = collect(unlisted);
    await unlisted.subscribeAsync([`${base}/cmd`, `${base}/status`], { qos: 1 });
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"));
    const trainerInbox = collect(trainer);
    await trainer.subscribeAsync(`sortline/v1/${SITE_A}/+/status`, { qos: 1 });
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A));

    const statusWrite = await publishReasonCode(unlisted, `${base}/status`, '{"state":"forged"}');
    await trainer.publishAsync(`${base}/cmd`, "cmd for an unlisted device", { qos: 1 });
    await deviceA.publishAsync(`${BASE_A}/status`, "marker", { qos: 1 });
    // The broker sends this PUBACK after any message it routed to the client before, so the
    // inbox is complete once it arrives.
    const replyWrite = await publishReasonCode(unlisted, `${base}/reply`, "{}");

    expect(statusWrite).toBe(NOT_AUTHORIZED);
    expect(replyWrite).toBe(NOT_AUTHORIZED);
    await waitFor(() => trainerInbox.get(`${BASE_A}/status`)?.includes("marker") === true, "A's status marker at the trainer");
    expect(trainerInbox.has(`${base}/status`)).toBe(false);
    expect(inbox.size).toBe(0);
  });

  it("client id of another device does not take over its session", async () => {
    const deviceA = await connectAs(deviceIdentity(SITE_A, DEVICE_A), { clientId: "device-a" });
    const closedA = new Promise<string>((resolve) => deviceA.once("close", () => resolve("closed")));

    // Without use_username_as_clientid the broker would close A's connection here.
    await connectAs(deviceIdentity(SITE_B, DEVICE_B), { clientId: "device-a" });
    const acknowledged = deviceA.publishAsync(`${BASE_A}/status`, '{"state":"running"}', { qos: 1 }).then(() => "acknowledged");

    expect(await Promise.race([acknowledged, closedA])).toBe("acknowledged");
  });

  it("last will on the device's status is delivered", async () => {
    const trainer = await connectAs(identity(path.join(pkiDir, "trainer"), "trainer"));
    const trainerInbox = collect(trainer);
    await trainer.subscribeAsync(`${BASE_B}/status`, { qos: 1 });
    const deviceB = await connectAs(deviceIdentity(SITE_B, DEVICE_B), {
      will: { topic: `${BASE_B}/status`, payload: Buffer.from('{"state":"offline"}'), qos: 1, retain: true },
    });
    // A payload unique to this test distinguishes the live status from one retained earlier.
    const running = JSON.stringify({ state: "running", since: Date.now() });
    await deviceB.publishAsync(`${BASE_B}/status`, running, { qos: 1, retain: true });
    await waitFor(() => trainerInbox.get(`${BASE_B}/status`)?.includes(running) === true, "B's running status");
    trainerInbox.clear();

    deviceB.stream.destroy();

    await waitFor(() => trainerInbox.has(`${BASE_B}/status`), "B's last will");
    expect(trainerInbox.get(`${BASE_B}/status`)).toEqual(['{"state":"offline"}']);
  });

  it("rejects a client without a certificate", async () => {
    await expect(connectAs({})).rejects.toThrow(/alert certificate required|handshake failure/);
  });

  it("rejects a certificate from another CA", async () => {
    const foreign = deviceIdentity(SITE_A, DEVICE_A, path.join(workDir, "other-ca"));

    await expect(connectAs(foreign)).rejects.toThrow(/alert unknown ca/);
  });

  it("rejects the broker certificate as a client", async () => {
    // The broker certificate allows only serverAuth, so OpenSSL rejects it as a client certificate.
    await expect(connectAs(identity(path.join(pkiDir, "broker"), "broker"))).rejects.toThrow(/alert unsupported certificate/);
  });

  it("client rejects a broker from another CA", async () => {
    const otherCa = await readFile(path.join(workDir, "other-ca", "ca.crt"), "utf8");

    await expect(connectAs({ ...deviceIdentity(SITE_A, DEVICE_A), ca: otherCa })).rejects.toThrow(/self-signed certificate|unable to verify/);
  });

  it("rejects a revoked device after reload", async () => {
    const revoked = deviceIdentity(SITE_B, DEVICE_B);
    const established = await connectAs(revoked);

    pki("revoke", pkiDir, "device", SITE_B, DEVICE_B);
    renderConfig();
    broker?.kill("SIGHUP");
    await waitFor(() => brokerLogTail(5).includes("Reloading config"), "the broker to log the reload");

    await expect(connectAs(revoked)).rejects.toThrow(/alert certificate revoked/);
    const other = await connectAs(deviceIdentity(SITE_A, DEVICE_A));
    expect(other.connected).toBe(true);
    // The CRL is checked only in the TLS handshake, so a connection opened before the reload
    // stays open. deploy/README.md therefore restarts the broker after a revocation.
    expect(await publishReasonCode(established, `${BASE_B}/status`, '{"state":"running"}')).toBe(0);
  });
});
