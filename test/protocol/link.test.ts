import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import { LinkError, MqttLink } from "../../src/protocol/link.js";
import { decodeStatusMessage, type StatusMessage } from "../../src/protocol/messages.js";
import { deviceTopic, fleetPattern } from "../../src/protocol/topics.js";
import { freePort, startAedes, startMosquitto, type AedesBroker, type MosquittoBroker } from "../helpers/mosquitto.js";
import { collect, LinkPool, waitFor, type Received } from "./helpers.js";

const SITE = "plant-a";
const DEVICE = "line-3";
const SHA = "b".repeat(64);

function statuses(received: Received[]): StatusMessage[] {
  return received.map((message) => {
    const decoded = decodeStatusMessage(message.payload);
    if (!decoded.ok) {
      throw new Error(`invalid status on ${message.topic}: ${decoded.error}`);
    }
    return decoded.value;
  });
}

describe("MqttLink on Mosquitto", () => {
  let broker: MosquittoBroker;
  const pool = new LinkPool();

  beforeAll(async () => {
    broker = await startMosquitto();
  });

  afterEach(async () => {
    await pool.closeAll();
  });

  afterAll(async () => {
    await broker.close();
  });

  it("agent publishes retained online status", async () => {
    const device = `${DEVICE}-online`;
    await pool.open({
      url: broker.url,
      role: "agent",
      site: SITE,
      device,
      statusProvider: () => ({ agentVersion: "0.1.0", model: { name: "m", version: "1.0.0", sha256: SHA }, stats: { frames: 5 } }),
    });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const received = await collect(trainer, fleetPattern("status", SITE, device));

    await waitFor(() => received.length >= 1, "the retained status");
    const [status] = statuses(received);
    expect(status).toMatchObject({ v: 1, site: SITE, device, state: "online", agentVersion: "0.1.0", stats: { frames: 5 } });
    expect(status!.model).toEqual({ name: "m", version: "1.0.0", sha256: SHA });
    expect(received[0]!.topic).toBe(deviceTopic(SITE, device, "status"));
  });

  it("last will marks an abruptly lost agent offline", async () => {
    const device = `${DEVICE}-will`;
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device, reconnectPeriodMs: 60_000 });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const live = await collect(trainer, fleetPattern("status", SITE, device));
    await waitFor(() => live.length >= 1, "the online status");

    agent.mqttClient!.stream.destroy();

    await waitFor(() => statuses(live).some((status) => status.state === "offline"), "the last will");
    const late = await pool.open({ url: broker.url, role: "trainer" });
    const retained = await collect(late, fleetPattern("status", SITE, device));
    await waitFor(() => retained.length >= 1, "the retained status");
    expect(statuses(retained)[0]).toMatchObject({ site: SITE, device, state: "offline" });
  });

  it("close publishes offline status", async () => {
    const device = `${DEVICE}-close`;
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const live = await collect(trainer, fleetPattern("status", SITE, device));
    await waitFor(() => live.length >= 1, "the online status");

    await agent.close();

    await waitFor(() => live.length >= 2, "the offline status");
    expect(statuses(live).map((status) => status.state)).toEqual(["online", "offline"]);
    expect(agent.connected).toBe(false);
  });

  it("publishStatus remembers paused across reconnects", async () => {
    const device = `${DEVICE}-paused`;
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const live = await collect(trainer, fleetPattern("status", SITE, device));
    await waitFor(() => live.length >= 1, "the online status");

    await agent.publishStatus("paused");
    agent.mqttClient!.stream.destroy();

    await waitFor(() => statuses(live).filter((status) => status.state === "paused").length >= 2, "paused status after the reconnect");
    expect(statuses(live).map((status) => status.state)).toContain("offline");
    expect(agent.connected).toBe(true);
  });

  it("publish resolves after the broker acknowledged", async () => {
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const listener = await pool.open({ url: broker.url, role: "trainer" });
    const received = await collect(listener, "test/publish/#");

    await trainer.publish("test/publish/json", { a: 1 });
    await trainer.publish("test/publish/buffer", Buffer.from([0, 1, 2]), { qos: 0 });

    await waitFor(() => received.length >= 2, "both messages");
    expect(JSON.parse(received[0]!.payload.toString())).toEqual({ a: 1 });
    expect([...received[1]!.payload]).toEqual([0, 1, 2]);
  });

  it("unsubscribe stops delivery", async () => {
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const received: string[] = [];
    const unsubscribe = await trainer.subscribe("test/unsub", (_topic, payload) => {
      received.push(payload.toString());
    });
    await trainer.publish("test/unsub", "first");
    await waitFor(() => received.length === 1, "the first message");

    await unsubscribe();
    const markers = await collect(trainer, "test/unsub-marker");
    await trainer.publish("test/unsub", "second");
    await trainer.publish("test/unsub-marker", "x");

    await waitFor(() => markers.length === 1, "the marker published after the second message");
    expect(received).toEqual(["first"]);
  });

  it("handler errors do not stop other handlers", async () => {
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const received: string[] = [];
    await trainer.subscribe("test/handlers", () => {
      throw new Error("handler bug");
    });
    await trainer.subscribe("test/handlers", async () => {
      throw new Error("async handler bug");
    });
    await trainer.subscribe("test/handlers", (_topic, payload) => {
      received.push(payload.toString());
    });

    await trainer.publish("test/handlers", "hello");

    await waitFor(() => received.length === 1, "the working handler");
  });

  it("restores subscriptions after a broker restart", async () => {
    const device = `${DEVICE}-restart`;
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const commands = await collect(agent, deviceTopic(SITE, device, "cmd"));
    let reconnects = 0;
    agent.on("connect", () => {
      reconnects++;
    });
    let offlines = 0;
    agent.on("offline", () => {
      offlines++;
    });

    await broker.restart();
    await waitFor(() => reconnects >= 1 && trainer.connected, "both links to reconnect");
    await trainer.publish(deviceTopic(SITE, device, "cmd"), { hello: true });

    await waitFor(() => commands.length >= 1, "the command after the restart");
    expect(offlines).toBeGreaterThanOrEqual(1);
  });
});

describe("MqttLink connection errors", () => {
  it("connect rejects after the timeout", async () => {
    const port = await freePort();
    const link = new MqttLink({ url: `mqtt://127.0.0.1:${port}`, role: "trainer", reconnectPeriodMs: 100 });

    await expect(link.connect({ timeoutMs: 500 })).rejects.toThrow(/could not connect to mqtt:\/\/127\.0\.0\.1:\d+ within 500 ms/);
    await link.close();
  });

  it("connect rejects when the broker refuses", async () => {
    const broker = await startMosquitto({ config: ["allow_anonymous false"] });
    try {
      for (const protocolVersion of [4, 5] as const) {
        const link = new MqttLink({ url: broker.url, role: "trainer", protocolVersion });
        const attempt = link.connect({ timeoutMs: 5_000 });
        await expect(attempt).rejects.toThrow(LinkError);
        await expect(attempt).rejects.toThrow(/refused the connection/);
        await link.close();
      }
    } finally {
      await broker.close();
    }
  });

  it("rejects invalid options", () => {
    expect(() => new MqttLink({ url: "mqtt://127.0.0.1:1", role: "agent", site: "a/b", device: "d" })).toThrow(/invalid site name/);
    expect(() => new MqttLink({ url: "mqtt://127.0.0.1:1", role: "agent", site: "s" })).toThrow(/invalid device name/);
    expect(() => new MqttLink({ url: "mqtt://127.0.0.1:1", role: "trainer", tls: { ca: "/x" } })).toThrow(/does not start with mqtts/);
  });

  it("publish before connect names the fix", async () => {
    const link = new MqttLink({ url: "mqtt://127.0.0.1:1", role: "trainer" });

    await expect(link.publish("a", "b")).rejects.toThrow(/call connect\(\) first/);
  });

  it("default client id names role and device", () => {
    const link = new MqttLink({ url: "mqtt://127.0.0.1:1", role: "agent", site: SITE, device: DEVICE });

    expect(link.clientId).toMatch(/^sortline-agent-line-3-[0-9a-f]{8}$/);
  });
});

describe("MqttLink on aedes with MQTT 3.1.1", () => {
  let broker: AedesBroker;
  const pool = new LinkPool();

  beforeAll(async () => {
    broker = await startAedes();
  });

  afterEach(async () => {
    await pool.closeAll();
  });

  afterAll(async () => {
    await broker.close();
  });

  it("status and last will work", async () => {
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device: DEVICE, protocolVersion: 4, reconnectPeriodMs: 60_000 });
    const trainer = await pool.open({ url: broker.url, role: "trainer", protocolVersion: 4 });
    const live = await collect(trainer, fleetPattern("status"));
    await waitFor(() => live.length >= 1, "the online status");

    agent.mqttClient!.stream.destroy();

    await waitFor(() => statuses(live).some((status) => status.state === "offline"), "the last will");
    expect(statuses(live)[0]).toMatchObject({ state: "online", device: DEVICE });
  });
});
