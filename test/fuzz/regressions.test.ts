/**
 * Inputs found by the fuzz tests in this folder, kept as fast unit cases: command requests that
 * once got no reply, and set-config keys that once reached Object.prototype.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { applyOverrides, validateChange } from "../../src/agent/overrides.js";
import { ConfigError } from "../../src/lib/errors.js";
import { generateKeyPair, type SigningKeyPair } from "../../src/models/signing.js";
import { CommandServer } from "../../src/protocol/commands.js";
import type { MessageHandler, MqttLink } from "../../src/protocol/link.js";
import type { CommandReply } from "../../src/protocol/messages.js";

const SITE = "plant-r";
const DEVICE = "line-r";

/** The part of MqttLink that CommandServer uses, delivering payloads straight to the handler. */
class StubLink {
  readonly role = "agent";
  readonly site = SITE;
  readonly device = DEVICE;
  readonly replies: CommandReply[] = [];
  private handler: MessageHandler | undefined;

  async subscribe(_pattern: string, handler: MessageHandler): Promise<() => Promise<void>> {
    this.handler = handler;
    return async () => {
      this.handler = undefined;
    };
  }

  async publish(_topic: string, message: unknown): Promise<void> {
    this.replies.push(message as CommandReply);
  }

  /** Delivers one payload and waits for the handler to finish, as MqttLink does. */
  async deliver(text: string): Promise<void> {
    await this.handler!(`sortline/v1/${SITE}/${DEVICE}/cmd`, Buffer.from(text));
  }
}

async function startServer(keys?: SigningKeyPair): Promise<StubLink> {
  const link = new StubLink();
  const server = new CommandServer({ link: link as unknown as MqttLink, trustedKeys: keys ? { [keys.keyId]: keys.publicKeyPem } : undefined });
  server.handle("status", { run: async () => ({ ok: true }) });
  await server.start();
  return link;
}

/** A request with raw JSON for args and a 64-byte signature that passes the length check. */
function requestText(id: string, argsJson: string, keyId?: string): string {
  const signature = keyId === undefined ? "" : `,"keyId":"${keyId}","sig":"${Buffer.alloc(64, 7).toString("base64")}"`;
  return `{"v":1,"id":"${id}","command":"status","args":${argsJson},"sentAt":${Date.now()}${signature}}`;
}

describe("command server inputs found by fuzzing", () => {
  let keys: SigningKeyPair;

  beforeAll(() => {
    keys = generateKeyPair();
  });

  it("rejects signed args holding 1e400", async () => {
    const link = await startServer(keys);
    await link.deliver(requestText("nonfinite-1", '{"x":1e400}', keys.keyId));
    expect(link.replies).toHaveLength(1);
    expect(link.replies[0]).toMatchObject({ id: "nonfinite-1", ok: false, error: { code: "unauthorised" } });
  });

  it("rejects signed args nested 100000 deep", async () => {
    const link = await startServer(keys);
    const deep = `${"[".repeat(100_000)}1${"]".repeat(100_000)}`;
    await link.deliver(requestText("deep-1", `{"x":${deep}}`, keys.keyId));
    expect(link.replies).toHaveLength(1);
    expect(link.replies[0]).toMatchObject({ id: "deep-1", ok: false, error: { code: "unauthorised" } });
  });

  it("rejects deep args on an unsigned server", async () => {
    const link = await startServer();
    const deep = `${'{"d":'.repeat(100_000)}1${"}".repeat(100_000)}`;
    await link.deliver(requestText("deep-2", deep));
    expect(link.replies).toHaveLength(1);
    expect(link.replies[0]).toMatchObject({ id: "deep-2", ok: false, error: { code: "invalid-args" } });
  });
});

describe("set-config keys found by fuzzing", () => {
  let dir: string;
  let configFile: string;

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "sortline-fuzz-regressions-"));
    configFile = path.join(dir, "agent.yaml");
    await writeFile(configFile, "device: { id: line-r, site: plant-r }\nsources: []\n");
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("applyOverrides rejects a __proto__ segment", () => {
    const document = { decisions: { bins: {} } };
    expect(() => applyOverrides(document, { "decisions.__proto__.polluted": "yes" })).toThrow(ConfigError);
    expect(Object.keys(Object.prototype)).toEqual([]);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it("applyOverrides keeps constructor paths on the copy", () => {
    const copy = applyOverrides({ decisions: {} }, { "decisions.constructor.prototype.polluted": "yes" });
    expect(Object.keys(Object.prototype)).toEqual([]);
    expect((copy.decisions as Record<string, unknown>).constructor).toEqual({ prototype: { polluted: "yes" } });
  });

  it("validateChange rejects a __proto__ key", async () => {
    for (const key of ["decisions.__proto__.polluted", "decisions.__proto__", "mining.__proto__.polluted"]) {
      await expect(validateChange(configFile, {}, { [key]: "yes" })).rejects.toThrow(/is not a dotted configuration key/);
    }
    expect(Object.keys(Object.prototype)).toEqual([]);
  });
});
