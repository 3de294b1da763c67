import { generateKeyPairSync, type KeyObject } from "node:crypto";

import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import {
  canonicalJson,
  CommandClient,
  CommandError,
  CommandKeyError,
  CommandServer,
  CommandTimeoutError,
  loadPrivateKey,
  loadPublicKey,
  signCommandRequest,
  signedRequestBytes,
  verifyCommandRequest,
  type CommandHandler,
} from "../../src/protocol/commands.js";
import type { MqttLink } from "../../src/protocol/link.js";
import { decodeCommandReply, type CommandReply, type CommandRequest } from "../../src/protocol/messages.js";
import { deviceTopic } from "../../src/protocol/topics.js";
import { startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { collect, LinkPool, waitFor, type Received } from "./helpers.js";

const SITE = "plant-a";

function ed25519(): { publicKey: KeyObject; privateKey: KeyObject } {
  return generateKeyPairSync("ed25519");
}

function replies(received: Received[]): CommandReply[] {
  return received.map((message) => {
    const decoded = decodeCommandReply(message.payload);
    if (!decoded.ok) {
      throw new Error(`invalid reply: ${decoded.error}`);
    }
    return decoded.value;
  });
}

describe("canonicalJson", () => {
  it("sorts keys at every level", () => {
    expect(canonicalJson({ b: 1, a: { d: [3, { z: 1, y: 2 }], c: "x" } })).toBe('{"a":{"c":"x","d":[3,{"y":2,"z":1}]},"b":1}');
  });

  it("omits undefined entries like JSON", () => {
    expect(canonicalJson({ a: undefined, b: null, c: [undefined] })).toBe('{"b":null,"c":[null]}');
  });

  it("escapes strings like JSON.stringify", () => {
    expect(canonicalJson({ "k\"ey": "line\nbreak é" })).toBe('{"k\\"ey":"line\\nbreak é"}');
  });

  it("rejects values JSON cannot encode", () => {
    expect(() => canonicalJson({ a: Number.NaN })).toThrow(TypeError);
    expect(() => canonicalJson({ a: Infinity })).toThrow(/cannot encode the number Infinity/);
    expect(() => canonicalJson(10n)).toThrow(/type bigint/);
  });
});

describe("request signatures", () => {
  const request = { id: "r-1", command: "ping", args: { b: 2, a: 1 }, sentAt: 1000, expiresAt: 2000 };

  it("signedRequestBytes covers the listed fields", () => {
    expect(signedRequestBytes(request, "s", "d").toString()).toBe('{"args":{"a":1,"b":2},"command":"ping","device":"d","expiresAt":2000,"id":"r-1","sentAt":1000,"site":"s"}');
    expect(signedRequestBytes({ ...request, expiresAt: undefined }, "s", "d").toString()).not.toContain("expiresAt");
  });

  it("verify accepts the signed request", () => {
    const { publicKey, privateKey } = ed25519();
    const sig = signCommandRequest(request, "s", "d", privateKey);

    expect(Buffer.from(sig, "base64")).toHaveLength(64);
    expect(verifyCommandRequest(request, "s", "d", sig, publicKey)).toBe(true);
  });

  it("verify rejects any changed field", () => {
    const { publicKey, privateKey } = ed25519();
    const sig = signCommandRequest(request, "s", "d", privateKey);

    expect(verifyCommandRequest({ ...request, args: { a: 1, b: 3 } }, "s", "d", sig, publicKey)).toBe(false);
    expect(verifyCommandRequest({ ...request, command: "reboot" }, "s", "d", sig, publicKey)).toBe(false);
    expect(verifyCommandRequest({ ...request, expiresAt: 9999 }, "s", "d", sig, publicKey)).toBe(false);
    expect(verifyCommandRequest(request, "s", "other", sig, publicKey)).toBe(false);
    expect(verifyCommandRequest(request, "s", "d", sig, ed25519().publicKey)).toBe(false);
    expect(verifyCommandRequest(request, "s", "d", "AAAA", publicKey)).toBe(false);
  });

  it("keys load from PEM strings", () => {
    const { publicKey, privateKey } = ed25519();
    const privatePem = privateKey.export({ format: "pem", type: "pkcs8" }).toString();
    const publicPem = publicKey.export({ format: "pem", type: "spki" }).toString();
    const sig = signCommandRequest(request, "s", "d", privatePem);

    expect(verifyCommandRequest(request, "s", "d", sig, publicPem)).toBe(true);
    expect(loadPublicKey(privateKey).type).toBe("public");
  });

  it("rejects keys that are not ed25519", () => {
    const rsa = generateKeyPairSync("rsa", { modulusLength: 1024 });

    expect(() => loadPrivateKey(rsa.privateKey)).toThrow(CommandKeyError);
    expect(() => loadPublicKey(rsa.publicKey)).toThrow(/expected an ed25519 public key, got a rsa public key/);
    expect(() => loadPublicKey("not a pem")).toThrow(/cannot read the public key/);
  });
});

describe("commands on Mosquitto", () => {
  let broker: MosquittoBroker;
  const pool = new LinkPool();
  let deviceCounter = 0;

  beforeAll(async () => {
    broker = await startMosquitto();
  });

  afterEach(async () => {
    await pool.closeAll();
  });

  afterAll(async () => {
    await broker.close();
  });

  interface Setup {
    device: string;
    agent: MqttLink;
    trainer: MqttLink;
    server: CommandServer;
    client: CommandClient;
    runs: Record<string, number>;
    /** Every reply on the device's reply topic. */
    received: Received[];
    /** Publishes a raw payload on the device's cmd topic. */
    sendRaw: (payload: string | object) => Promise<void>;
    /** Lets the running "slow" command finish. */
    releaseSlow: () => void;
  }

  async function setup(options: { trustedKeys?: Record<string, KeyObject | string>; signingKey?: { keyId: string; privateKey: KeyObject } } = {}): Promise<Setup> {
    const device = `line-${++deviceCounter}`;
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const runs: Record<string, number> = {};
    const count = (name: string): void => {
      runs[name] = (runs[name] ?? 0) + 1;
    };
    const server = new CommandServer({ link: agent, trustedKeys: options.trustedKeys });
    const ping: CommandHandler<{ echo?: string; times: number }> = {
      argsSchema: {
        type: "object",
        properties: { echo: { type: "string" }, times: { type: "integer", minimum: 1, default: 1 } },
        additionalProperties: false,
      },
      run: async (args) => {
        count("ping");
        return { pong: true, echo: args.echo ?? null, times: args.times };
      },
    };
    server.handle("ping", ping);
    server.handle("fail", {
      run: async () => {
        count("fail");
        throw new Error("disk full while saving");
      },
    });
    server.handle("coded", {
      run: async () => {
        throw new CommandError("busy", "camera recalibration in progress");
      },
    });
    let release: () => void = () => {};
    server.handle("slow", {
      exclusive: true,
      run: async () => {
        count("slow");
        await new Promise<void>((resolve) => {
          release = resolve;
        });
        return { done: true };
      },
    });
    server.handle("bad-result", {
      run: async () => [1, 2] as unknown as Record<string, unknown>,
    });
    await server.start();
    const received = await collect(trainer, deviceTopic(SITE, device, "reply"));
    const client = new CommandClient({ link: trainer, signingKey: options.signingKey });
    const sendRaw = (payload: string | object): Promise<void> => trainer.publish(deviceTopic(SITE, device, "cmd"), payload);
    return { device, agent, trainer, server, client, runs, received, sendRaw, releaseSlow: () => release() };
  }

  it("round trip returns the result", async () => {
    const { device, client } = await setup();

    const reply = await client.request(SITE, device, "ping", { echo: "hi" });

    expect(reply).toMatchObject({ v: 1, site: SITE, device, ok: true, result: { pong: true, echo: "hi", times: 1 } });
    expect(reply.error).toBeUndefined();
  });

  it("malformed JSON gets id unknown", async () => {
    const { sendRaw, received } = await setup();

    await sendRaw("{not json");

    await waitFor(() => received.length === 1, "the reply");
    const [reply] = replies(received);
    expect(reply!.id).toBe("unknown");
    expect(reply!.ok).toBe(false);
    expect(reply!.error!.code).toBe("malformed");
    expect(reply!.error!.message).toMatch(/^malformed request: invalid JSON/);
  });

  it("schema error echoes a readable id", async () => {
    const { sendRaw, received } = await setup();

    await sendRaw({ v: 1, id: "req-no-command", sentAt: Date.now() });
    await sendRaw({ v: 2, id: "req-v2", command: "ping", sentAt: Date.now() });
    await sendRaw({ v: 1, id: "bad id!", command: "ping", sentAt: Date.now() });

    await waitFor(() => received.length === 3, "three replies");
    const [noCommand, wrongVersion, badId] = replies(received);
    expect(noCommand).toMatchObject({ id: "req-no-command", ok: false, error: { code: "malformed", message: 'malformed request: missing field "command"' } });
    expect(wrongVersion).toMatchObject({ id: "req-v2", error: { code: "malformed" } });
    expect(wrongVersion!.error!.message).toMatch(/unsupported protocol version 2/);
    expect(badId).toMatchObject({ id: "unknown", error: { code: "malformed" } });
    expect(badId!.error!.message).toMatch(/field "id" must match pattern/);
  });

  it("unknown command lists known ones", async () => {
    const { device, client } = await setup();

    const reply = await client.request(SITE, device, "reboot");

    expect(reply.ok).toBe(false);
    expect(reply.error!.code).toBe("unknown-command");
    expect(reply.error!.message).toBe('unknown command "reboot"; this device handles: bad-result, coded, fail, ping, slow');
  });

  it("invalid args carry the schema message", async () => {
    const { device, client, runs } = await setup();

    const wrongType = await client.request(SITE, device, "ping", { times: "two" });
    const extra = await client.request(SITE, device, "ping", { volume: 11 });

    expect(wrongType.error).toEqual({ code: "invalid-args", message: "args/times must be integer" });
    expect(extra.error).toEqual({ code: "invalid-args", message: "args must NOT have additional properties" });
    expect(runs.ping).toBeUndefined();
  });

  it("expired request is not run", async () => {
    const { sendRaw, received, runs } = await setup();

    await sendRaw({ v: 1, id: "old-1", command: "ping", args: {}, sentAt: Date.now() - 60_000, expiresAt: Date.now() - 30_000 });

    await waitFor(() => received.length === 1, "the reply");
    const [reply] = replies(received);
    expect(reply).toMatchObject({ id: "old-1", ok: false, error: { code: "expired" } });
    expect(reply!.error!.message).toMatch(/^request expired at .*; device time is /);
    expect(runs.ping).toBeUndefined();
  });

  it("handler error replies failed", async () => {
    const { device, client, runs } = await setup();

    const reply = await client.request(SITE, device, "fail");

    expect(reply.error).toEqual({ code: "failed", message: "disk full while saving" });
    expect(runs.fail).toBe(1);
  });

  it("CommandError sets the code", async () => {
    const { device, client } = await setup();

    const reply = await client.request(SITE, device, "coded");

    expect(reply.error).toEqual({ code: "busy", message: "camera recalibration in progress" });
  });

  it("non-object result replies failed", async () => {
    const { device, client } = await setup();

    const reply = await client.request(SITE, device, "bad-result");

    expect(reply.error).toEqual({ code: "failed", message: 'handler of "bad-result" returned an array, expected an object' });
  });

  it("exclusive command replies busy", async () => {
    const { device, client, runs, releaseSlow } = await setup();

    const first = client.request(SITE, device, "slow");
    await waitFor(() => runs.slow === 1, "the first run to start");
    const second = await client.request(SITE, device, "slow");
    releaseSlow();

    expect(second.error!.code).toBe("busy");
    expect((await first).result).toEqual({ done: true });
    expect(runs.slow).toBe(1);
  });

  it("duplicate id is not run twice", async () => {
    const { sendRaw, received, runs } = await setup();
    const request: CommandRequest = { v: 1, id: "dup-1", command: "ping", args: { echo: "once" }, sentAt: Date.now() };

    await sendRaw(request);
    await waitFor(() => received.length === 1, "the first reply");
    await sendRaw(request);

    await waitFor(() => received.length === 2, "the second reply");
    const [first, second] = replies(received);
    expect(second).toEqual(first);
    expect(first!.result).toEqual({ pong: true, echo: "once", times: 1 });
    expect(runs.ping).toBe(1);
  });

  it("replay cache evicts the oldest id", async () => {
    const device = `line-${++deviceCounter}`;
    const agent = await pool.open({ url: broker.url, role: "agent", site: SITE, device });
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    let runs = 0;
    const server = new CommandServer({ link: agent, replayCacheSize: 2 });
    server.handle("count", {
      run: async () => ({ run: ++runs }),
    });
    await server.start();
    const received = await collect(trainer, deviceTopic(SITE, device, "reply"));
    const send = async (id: string, expected: number): Promise<void> => {
      await trainer.publish(deviceTopic(SITE, device, "cmd"), { v: 1, id, command: "count", sentAt: Date.now() });
      await waitFor(() => received.length === expected, `reply ${expected}`);
    };

    await send("a", 1);
    await send("b", 2);
    await send("c", 3);
    await send("a", 4);

    expect(replies(received).map((reply) => reply.result!.run)).toEqual([1, 2, 3, 4]);
  });

  it("request times out without a device", async () => {
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const client = new CommandClient({ link: trainer });

    const request = client.request(SITE, "no-such-device", "ping", {}, { timeoutMs: 300 });

    await expect(request).rejects.toThrow(CommandTimeoutError);
    await expect(request).rejects.toThrow(/command "ping" to plant-a\/no-such-device got no reply within 300 ms/);
  });

  it("close rejects pending requests", async () => {
    const trainer = await pool.open({ url: broker.url, role: "trainer" });
    const client = new CommandClient({ link: trainer });

    const request = client.request(SITE, "no-such-device", "ping", {}, { timeoutMs: 10_000 });
    const rejection = expect(request).rejects.toThrow(/closed before the reply arrived/);
    await new Promise((resolve) => setTimeout(resolve, 50));
    await client.close();

    await rejection;
  });

  describe("with trainer keys", () => {
    it("signed request runs", async () => {
      const keys = ed25519();
      const { device, client, runs } = await setup({ trustedKeys: { trainer1: keys.publicKey }, signingKey: { keyId: "trainer1", privateKey: keys.privateKey } });

      const reply = await client.request(SITE, device, "ping", { echo: "signed" });

      expect(reply.ok).toBe(true);
      expect(reply.result).toMatchObject({ echo: "signed" });
      expect(runs.ping).toBe(1);
    });

    it("unsigned request is unauthorised", async () => {
      const keys = ed25519();
      const { device, client, runs } = await setup({ trustedKeys: { trainer1: keys.publicKey } });

      const reply = await client.request(SITE, device, "ping");

      expect(reply.error).toEqual({ code: "unauthorised", message: "request is not signed; this device requires keyId and sig" });
      expect(runs.ping).toBeUndefined();
    });

    it("wrong key is unauthorised", async () => {
      const keys = ed25519();
      const { device, client, runs } = await setup({ trustedKeys: { trainer1: keys.publicKey }, signingKey: { keyId: "trainer1", privateKey: ed25519().privateKey } });

      const reply = await client.request(SITE, device, "ping");

      expect(reply.error).toEqual({ code: "unauthorised", message: 'invalid signature for keyId "trainer1"' });
      expect(runs.ping).toBeUndefined();
    });

    it("unknown keyId is unauthorised", async () => {
      const keys = ed25519();
      const { device, client, runs } = await setup({ trustedKeys: { trainer1: keys.publicKey }, signingKey: { keyId: "trainer2", privateKey: keys.privateKey } });

      const reply = await client.request(SITE, device, "ping");

      expect(reply.error).toEqual({ code: "unauthorised", message: 'unknown keyId "trainer2"' });
      expect(runs.ping).toBeUndefined();
    });

    it("tampered or redirected request is unauthorised", async () => {
      const keys = ed25519();
      const { device, sendRaw, received, runs } = await setup({ trustedKeys: { trainer1: keys.publicKey } });
      const base = { v: 1 as const, command: "ping", args: { echo: "a" }, sentAt: Date.now() };
      const forOtherDevice = { ...base, id: "redirected" };
      const tampered = { ...base, id: "tampered" };

      await sendRaw({ ...forOtherDevice, keyId: "trainer1", sig: signCommandRequest(forOtherDevice, SITE, "other-device", keys.privateKey) });
      await sendRaw({ ...tampered, args: { echo: "b" }, keyId: "trainer1", sig: signCommandRequest(tampered, SITE, device, keys.privateKey) });

      await waitFor(() => received.length === 2, "two replies");
      expect(replies(received).map((reply) => reply.error?.code)).toEqual(["unauthorised", "unauthorised"]);
      expect(runs.ping).toBeUndefined();
    });

    it("unauthorised id does not block the signed one", async () => {
      const keys = ed25519();
      const { device, sendRaw, received, runs } = await setup({ trustedKeys: { trainer1: keys.publicKey } });
      const request = { v: 1 as const, id: "same-id", command: "ping", args: {}, sentAt: Date.now() };

      await sendRaw(request);
      await waitFor(() => received.length === 1, "the unauthorised reply");
      await sendRaw({ ...request, keyId: "trainer1", sig: signCommandRequest(request, SITE, device, keys.privateKey) });

      await waitFor(() => received.length === 2, "the signed reply");
      expect(replies(received).map((reply) => reply.ok)).toEqual([false, true]);
      expect(runs.ping).toBe(1);
    });
  });
});
