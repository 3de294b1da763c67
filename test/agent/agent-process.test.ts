import { execFileSync, spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";

import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stringify as toYaml } from "yaml";

import { EmbeddedBroker } from "../../src/broker/embedded.js";
import { DEFAULT_NOTIFY_PATH } from "../../src/health/sdnotify.js";
import { makeTempDir } from "../audit/helpers.js";
import { CliProcess, DecisionSubscriber, NotifySocket, repoRoot, waitUntil } from "./helpers.js";

const SITE = "plant-a";
const DEVICE = "line-7";
const TOPIC = `sortline/v1/${SITE}/${DEVICE}/decision`;

const canNotify = spawnSync("python3", ["--version"]).status === 0 && spawnSync(DEFAULT_NOTIFY_PATH, ["--version"]).status === 0;

let broker: EmbeddedBroker;
let subscriber: DecisionSubscriber;
let temp: ReturnType<typeof makeTempDir>;
const processes: CliProcess[] = [];

/** Returns an agent configuration that replays demo/photos as source `sourceName` and publishes to the test broker. */
function agentConfig(sourceName: string, auditPath: string, overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    device: { id: DEVICE, site: SITE },
    model: { dir: path.join(repoRoot, "models", "default"), providers: ["cpu"], threads: 1 },
    sources: [{ type: "directory", name: sourceName, path: path.join(repoRoot, "demo", "photos"), fps: 4, loop: true, shuffleSeed: 7 }],
    pipeline: { maxBatch: 2, maxWaitMs: 20, queueSize: 8 },
    decisions: { bins: { cardboard: "fibre", paper: "fibre", glass: "glass", metal: "metal", plastic: "plastic", trash: "residual" } },
    actuators: [{ type: "mqtt", url: broker.url, qos: 1 }],
    audit: { path: auditPath },
    health: { host: "127.0.0.1", port: 0 },
    logging: { level: "info" },
    ...overrides,
  };
}

function writeConfig(name: string, config: Record<string, unknown>): string {
  const file = path.join(temp.dir, name);
  writeFileSync(file, toYaml(config));
  return file;
}

function startAgent(configFile: string, env: NodeJS.ProcessEnv = {}): CliProcess {
  // The test runner's own NOTIFY_SOCKET, if any, must not reach the agent.
  const agent = CliProcess.start(["agent", "--config", configFile], { NOTIFY_SOCKET: "", WATCHDOG_USEC: "", ...env });
  processes.push(agent);
  return agent;
}

/** Reads the frame ids and the integrity_check result of an audit database. */
function readAudit(file: string): { frameIds: Set<string>; integrity: string } {
  const db = new Database(file);
  try {
    const integrity = db.pragma("integrity_check", { simple: true }) as string;
    const rows = db.prepare("SELECT frame_id FROM decisions").all() as { frame_id: string }[];
    return { frameIds: new Set(rows.map((row) => row.frame_id)), integrity };
  } finally {
    db.close();
  }
}

beforeAll(async () => {
  // The CLI runs from dist/, so build it from the current sources first.
  execFileSync(process.execPath, [path.join(repoRoot, "node_modules", "typescript", "bin", "tsc"), "-p", repoRoot], { stdio: "pipe" });
  temp = makeTempDir("agent-process");
  broker = new EmbeddedBroker();
  await broker.start();
  subscriber = await DecisionSubscriber.start(broker.url, TOPIC);
});

afterAll(async () => {
  for (const agent of processes) {
    await agent.kill("SIGKILL");
  }
  await subscriber?.stop();
  await broker?.stop();
  temp?.remove();
});

describe("agent process until SIGTERM", () => {
  const source = "photos-term";
  let agent: CliProcess;
  let notify: NotifySocket | undefined;
  let auditPath: string;
  let healthPort: number;
  let stopped: Promise<void> | undefined;

  /** Sends SIGTERM once and waits for the exit. Later calls wait for the same exit. */
  const stopAgent = (): Promise<void> => {
    stopped ??= agent.kill("SIGTERM").then(() => undefined);
    return stopped;
  };

  beforeAll(async () => {
    auditPath = path.join(temp.dir, "term", "audit.db");
    const env: NodeJS.ProcessEnv = {};
    if (canNotify) {
      notify = await NotifySocket.start(path.join(temp.dir, "notify.sock"));
      env.NOTIFY_SOCKET = notify.socketPath;
      // Pings every 200 ms while decisions flow.
      env.WATCHDOG_USEC = "400000";
    }
    const config = agentConfig(source, auditPath, { model: { dir: path.join(repoRoot, "models", "default"), providers: ["cuda", "cpu"], threads: 1 } });
    agent = startAgent(writeConfig("term.yaml", config), env);
    const ready = await agent.waitForLog("agent ready");
    healthPort = ready.healthPort as number;
    await waitUntil(() => subscriber.idsWithPrefix(`${source}-`).length >= 3, "three decisions over MQTT");
  });

  afterAll(() => {
    notify?.stop();
  });

  it("falls back from cuda to cpu", () => {
    const warning = agent.findLog("execution provider unavailable, trying the next one", { provider: "cuda" });
    const loaded = agent.findLog("model loaded");

    expect(warning?.level).toBe("warn");
    expect(warning?.err).toEqual(expect.any(String));
    expect(loaded?.provider).toBe("cpu");
    expect(agent.findLog("model loaded", { provider: "cuda" })).toBeUndefined();
  });

  it("reports ok on /healthz while frames flow", async () => {
    const response = await fetch(`http://127.0.0.1:${healthPort}/healthz`);
    const body = (await response.json()) as { status: string; device: string; model: { provider: string } };

    expect(response.status).toBe(200);
    expect(body.status).toBe("ok");
    expect(body.device).toBe(DEVICE);
    expect(body.model.provider).toBe("cpu");
  });

  it("serves frame counters on /metrics", async () => {
    const response = await fetch(`http://127.0.0.1:${healthPort}/metrics`);
    const text = await response.text();

    expect(response.status).toBe(200);
    expect(text).toMatch(new RegExp(`^sortline_frames_total\\{[^}]*source="${source}"[^}]*\\} [1-9]`, "m"));
  });

  it("exits 0 on SIGTERM with every decision audited", async () => {
    await stopAgent();

    expect(agent.status).toEqual({ code: 0, signal: null });
    const stoppedLine = agent.findLog("agent stopped");
    expect(stoppedLine).toBeDefined();
    const { frameIds, integrity } = readAudit(auditPath);
    expect(integrity).toBe("ok");
    const received = subscriber.idsWithPrefix(`${source}-`);
    expect(received.length).toBeGreaterThanOrEqual(3);
    for (const id of received) {
      expect(frameIds.has(id), `frame ${id} was sent over MQTT but is not in the audit`).toBe(true);
    }
    // A graceful stop publishes every audited decision, but QoS 1 messages may still be on their way.
    await waitUntil(() => new Set(subscriber.idsWithPrefix(`${source}-`)).size >= frameIds.size, "every audited decision over MQTT", 10_000);
    expect(new Set(subscriber.idsWithPrefix(`${source}-`))).toEqual(frameIds);
    expect(stoppedLine!.decided).toBe(frameIds.size);
  });

  it.skipIf(!canNotify)("sends READY, WATCHDOG and STOPPING to systemd", async () => {
    await stopAgent();
    await waitUntil(() => notify!.messages.includes("STOPPING=1"), "STOPPING=1", 10_000);

    const messages = notify!.messages;
    const ready = messages.findIndex((message) => message.split("\n").includes("READY=1"));
    const stopping = messages.indexOf("STOPPING=1");
    const firstPing = messages.indexOf("WATCHDOG=1");

    expect(ready).toBe(0);
    expect(firstPing).toBeGreaterThan(ready);
    expect(stopping).toBeGreaterThan(firstPing);
    // Pings stop before STOPPING=1, so nothing follows it.
    expect(stopping).toBe(messages.length - 1);
    expect(messages.filter((message) => message.includes("READY=1"))).toHaveLength(1);
  });
});

describe("agent process under kill -9", () => {
  let auditPath: string;
  /** Frame ids received over MQTT across every run of this block. */
  const sentIds = new Set<string>();

  beforeAll(() => {
    auditPath = path.join(temp.dir, "kill", "audit.db");
  });

  // Each run replays under its own source name, so frame ids stay unique in the shared database.
  it.each([1, 2, 3])("keeps every sent decision, run %i", async (run) => {
    const source = `photos-kill${run}`;
    const agent = startAgent(writeConfig(`kill-${run}.yaml`, agentConfig(source, auditPath)));
    await agent.waitForLog("agent ready");

    const decisionsBeforeKill = 1 + Math.floor(Math.random() * 4);
    await waitUntil(() => subscriber.idsWithPrefix(`${source}-`).length >= decisionsBeforeKill, `${decisionsBeforeKill} decisions over MQTT`);
    await new Promise((resolve) => setTimeout(resolve, Math.floor(Math.random() * 400)));
    const status = await agent.kill("SIGKILL");
    // Lets the broker forward what the agent wrote to its socket before it died.
    await new Promise((resolve) => setTimeout(resolve, 300));

    expect(status).toEqual({ code: null, signal: "SIGKILL" });
    const { frameIds, integrity } = readAudit(auditPath);
    expect(integrity).toBe("ok");
    const received = subscriber.idsWithPrefix(`${source}-`);
    expect(received.length).toBeGreaterThanOrEqual(decisionsBeforeKill);
    for (const id of received) {
      sentIds.add(id);
      expect(frameIds.has(id), `frame ${id} was sent over MQTT but is not in the audit`).toBe(true);
    }
  });

  it("keeps decisions of earlier runs", () => {
    // Also covers messages that reached the subscriber after their run was checked.
    for (const run of [1, 2, 3]) {
      for (const id of subscriber.idsWithPrefix(`photos-kill${run}-`)) {
        sentIds.add(id);
      }
    }
    const { frameIds, integrity } = readAudit(auditPath);

    expect(integrity).toBe("ok");
    expect(sentIds.size).toBeGreaterThanOrEqual(3);
    const missing = [...sentIds].filter((id) => !frameIds.has(id));
    expect(missing).toEqual([]);
  });
});

describe("agent --validate-config", () => {
  it("exits 0 for a valid file", async () => {
    const file = writeConfig("valid.yaml", agentConfig("photos-valid", path.join(temp.dir, "valid", "audit.db")));

    const cli = CliProcess.start(["agent", "--config", file, "--validate-config"]);
    const status = await cli.exited;

    expect(status).toEqual({ code: 0, signal: null });
    expect(cli.plainLines.join("\n")).toContain("configuration is valid");
    expect(cli.stderr).toBe("");
  });

  it("exits 1 naming each bad key", async () => {
    const config = agentConfig("photos-invalid", path.join(temp.dir, "invalid", "audit.db"), { pipeline: { maxBatch: 0 } });
    const file = writeConfig("invalid.yaml", { ...config, decisions: { defaultMinConfidence: 1.5 } });

    const cli = CliProcess.start(["agent", "--config", file, "--validate-config"]);
    const status = await cli.exited;

    expect(status).toEqual({ code: 1, signal: null });
    expect(cli.stderr).toContain(file);
    expect(cli.stderr).toContain("pipeline.maxBatch");
    expect(cli.stderr).toContain("decisions.defaultMinConfidence");
    expect(cli.plainLines.join("\n")).not.toContain("configuration is valid");
  });

  it("exits 1 for missing model and photos", async () => {
    const config = agentConfig("photos-missing", path.join(temp.dir, "missing", "audit.db"));
    const missing = path.join(temp.dir, "no-such-folder");
    const sources = [{ ...(config.sources as object[])[0], path: missing }];
    const file = writeConfig("missing.yaml", { ...config, model: { dir: missing }, sources });

    const cli = CliProcess.start(["agent", "--config", file, "--validate-config"]);
    const status = await cli.exited;

    expect(status).toEqual({ code: 1, signal: null });
    expect(cli.stderr).toContain(`model.dir: cannot read ${path.join(missing, "manifest.json")}: ENOENT`);
    expect(cli.stderr).toContain(`sources[0].path: folder ${missing} not found`);
  });
});
