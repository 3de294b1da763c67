import { readFileSync, statSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { PassThrough } from "node:stream";
import { fileURLToPath } from "node:url";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { runFleet } from "../../src/cli/fleet.js";
import { runKeys } from "../../src/cli/keys.js";
import { main } from "../../src/cli/main.js";
import { runTrainer } from "../../src/cli/trainer.js";
import { generateKeyPair, keyIdOf, type SigningKeyPair } from "../../src/models/signing.js";
import { CommandError, CommandServer } from "../../src/protocol/commands.js";
import { MqttLink } from "../../src/protocol/link.js";
import { loadTrainerConfig } from "../../src/trainer/config.js";
import { TrainerService } from "../../src/trainer/service.js";
import { freePort, startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";
import { makeTempDir, readPhotos } from "../trainer/helpers.js";

const DEFAULT_MODEL = fileURLToPath(new URL("../../models/default/", import.meta.url));
const PHOTOS = fileURLToPath(new URL("../../demo/photos/", import.meta.url));
const EXAMPLE_CONFIG = fileURLToPath(new URL("../../deploy/trainer.example.yaml", import.meta.url));

/** Creates a writable stream that keeps what is written to it. */
function capture(): { stream: PassThrough; text: () => string } {
  const stream = new PassThrough();
  const chunks: Buffer[] = [];
  stream.on("data", (chunk: Buffer) => chunks.push(chunk));
  return { stream, text: () => Buffer.concat(chunks).toString("utf8") };
}

/** Writes a trainer config into `dir` that uses the default model read-only and `keys` for signing. */
async function writeConfig(dir: string, brokerUrl: string, keys: SigningKeyPair, overrides: Record<string, unknown> = {}): Promise<string> {
  await writeFile(path.join(dir, "signing.key"), keys.privateKeyPem, { mode: 0o600 });
  const document = {
    broker: { url: brokerUrl },
    dataDir: "data",
    review: { port: 0 },
    signing: { privateKey: "signing.key" },
    base: { datasets: [PHOTOS], model: DEFAULT_MODEL },
    training: {
      trigger: { minNewLabels: 1000 },
      command: [process.execPath, "-e", "process.exit(1)"],
      gateCommand: [process.execPath, "-e", "process.exit(2)"],
    },
    fleet: { groups: { line1: ["plant-a/edge-1", "plant-a/edge-2"] }, publishTo: "line1" },
    ...overrides,
  };
  const file = path.join(dir, "trainer.yaml");
  await writeFile(file, JSON.stringify(document, null, 2));
  return file;
}

describe("sortline keys", () => {
  let temp: ReturnType<typeof makeTempDir>;

  beforeEach(() => {
    temp = makeTempDir("cli-keys");
  });

  afterEach(() => {
    temp.remove();
  });

  it("writes a key pair and prints the key id", async () => {
    const out = capture();
    const dir = path.join(temp.dir, "keys");

    const code = await runKeys(["generate", "--out", dir], { out: out.stream });

    expect(code).toBe(0);
    const publicKeyPem = readFileSync(path.join(dir, "signing.pub"), "utf8");
    const privateKeyPem = readFileSync(path.join(dir, "signing.key"), "utf8");
    expect(out.text()).toContain(`keyId ${keyIdOf(publicKeyPem)}\n`);
    expect(out.text()).not.toContain("PRIVATE KEY");
    expect(privateKeyPem).toContain("BEGIN PRIVATE KEY");
    expect(statSync(path.join(dir, "signing.key")).mode & 0o777).toBe(0o600);
    expect(statSync(path.join(dir, "signing.pub")).mode & 0o777).toBe(0o644);
  });

  it("keeps existing keys without --force", async () => {
    const dir = path.join(temp.dir, "keys");
    await runKeys(["generate", "--out", dir], { out: capture().stream });
    const before = readFileSync(path.join(dir, "signing.key"), "utf8");
    const err = capture();

    expect(await runKeys(["generate", "--out", dir], { out: capture().stream, err: err.stream })).toBe(1);
    expect(err.text()).toMatch(/already exist; pass --force/);
    expect(readFileSync(path.join(dir, "signing.key"), "utf8")).toBe(before);
    expect(await runKeys(["generate", "--out", dir, "--force"], { out: capture().stream })).toBe(0);
    expect(readFileSync(path.join(dir, "signing.key"), "utf8")).not.toBe(before);
  });

  it("rejects a missing subcommand", async () => {
    expect(await main(["keys", "--out", temp.dir])).toBe(2);
    expect(await main(["keys", "generate"])).toBe(2);
  });
});

describe("sortline trainer --validate-config", () => {
  let temp: ReturnType<typeof makeTempDir>;

  beforeEach(() => {
    temp = makeTempDir("cli-trainer");
  });

  afterEach(() => {
    temp.remove();
  });

  it("accepts a valid configuration", async () => {
    const file = await writeConfig(temp.dir, "mqtt://127.0.0.1:1883", generateKeyPair());
    const out = capture();

    expect(await runTrainer(["--config", file, "--validate-config"], { out: out.stream, err: capture().stream, env: {} })).toBe(0);
    expect(out.text()).toBe(`${file}: configuration is valid\n`);
  });

  it("names every invalid key", async () => {
    const file = await writeConfig(temp.dir, "http://127.0.0.1:1883", generateKeyPair(), {
      review: { port: 70_000, colour: "blue" },
      training: { trigger: { minNewLabels: 0 } },
    });
    const err = capture();

    expect(await runTrainer(["--config", file, "--validate-config"], { out: capture().stream, err: err.stream, env: {} })).toBe(1);
    const text = err.text();
    expect(text).toContain('broker.url: value "http://127.0.0.1:1883" is invalid; expected a string matching ^(mqtt|mqtts|ws|wss)://');
    expect(text).toContain("review.port: value 70000 is invalid; expected <= 65535");
    expect(text).toContain("review.colour: unknown key");
    expect(text).toContain("training.trigger.minNewLabels: value 0 is invalid; expected >= 1");
  });

  it("rejects a publishTo group that does not exist", async () => {
    const file = await writeConfig(temp.dir, "mqtt://127.0.0.1:1883", generateKeyPair(), {
      fleet: { groups: { line1: ["plant-a/edge-1"] }, publishTo: "line2" },
    });
    const err = capture();

    expect(await runTrainer(["--config", file, "--validate-config"], { out: capture().stream, err: err.stream, env: {} })).toBe(1);
    expect(err.text()).toContain('fleet.publishTo: value "line2" is not a group in fleet.groups (groups: line1)');
  });

  it("reports missing files and secrets", async () => {
    const file = await writeConfig(temp.dir, "mqtt://127.0.0.1:1883", generateKeyPair(), {
      signing: { privateKey: { credential: "signing-key" } },
      base: { datasets: ["missing-dataset"], model: "missing-model" },
      review: { token: { env: "REVIEW_TOKEN" } },
    });
    const err = capture();

    expect(await runTrainer(["--config", file, "--validate-config"], { out: capture().stream, err: err.stream, env: {} })).toBe(1);
    const text = err.text();
    expect(text).toContain(`base.datasets[0]: ${path.join(temp.dir, "missing-dataset")} not found`);
    expect(text).toMatch(/base\.model: cannot read .*missing-model\/manifest\.json/);
    expect(text).toContain('signing.privateKey: credential "signing-key" requested but CREDENTIALS_DIRECTORY is not set');
    expect(text).toContain("review.token: environment variable REVIEW_TOKEN is not set");
  });

  it("fills defaults and resolves paths", async () => {
    const file = await writeConfig(temp.dir, "mqtt://127.0.0.1:1883", generateKeyPair());

    const config = await loadTrainerConfig(file);

    expect(config.dataDir).toBe(path.join(temp.dir, "data"));
    expect(config.signing.privateKey).toBe(path.join(temp.dir, "signing.key"));
    expect(config.review.host).toBe("127.0.0.1");
    expect(config.broker.protocolVersion).toBe(5);
    expect(config.base.validationFraction).toBe(0.2);
    expect(config.validation).toEqual([]);
    expect(config.training.trigger).toEqual({ minNewLabels: 1000, intervalMinutes: 0 });
    expect(config.training.gate).toEqual({ minGain: 0, maxClassDrop: 0.02 });
    expect(config.training.timeoutMinutes).toBe(360);
    expect(config.training.python).toMatch(/spark\/\.venv\/bin\/python$/);
    expect(config.logging.level).toBe("info");
  });

  it("parses the example configuration of deploy/", async () => {
    const config = await loadTrainerConfig(EXAMPLE_CONFIG);

    expect(config.fleet.publishTo).toBe("pilot");
    expect(config.signing.privateKey).toEqual({ credential: "signing-key" });
    expect(config.broker.tls?.key).toEqual({ credential: "mqtt-tls-key" });
    expect(config.training.trigger.minNewLabels).toBe(50);
  });
});

describe("sortline trainer --retrain", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let broker: MosquittoBroker;
  let service: TrainerService | undefined;

  beforeEach(async () => {
    temp = makeTempDir("cli-retrain");
    broker = await startMosquitto();
  });

  afterEach(async () => {
    await service?.stop();
    service = undefined;
    await broker.close();
    temp.remove();
  });

  it("starts a run on the running trainer", async () => {
    const port = await freePort();
    const file = await writeConfig(temp.dir, broker.url, generateKeyPair(), { review: { port, token: { env: "REVIEW_TOKEN" } } });
    const env = { REVIEW_TOKEN: "retrain-token" };
    service = new TrainerService({ config: await loadTrainerConfig(file), env });
    await service.start();
    const out = capture();
    const anonymous = await fetch(`http://127.0.0.1:${port}/api/retrain`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    expect(anonymous.status).toBe(401);

    const code = await runTrainer(["--config", file, "--retrain"], { out: out.stream, err: capture().stream, env });

    expect(code).toBe(0);
    const body = JSON.parse(out.text()) as { run: { id: number; trigger: string; status: string } };
    expect(body.run.trigger).toBe("manual");
    expect(body.run.status).toBe("running");
    const deadline = Date.now() + 30_000;
    while (service.retrainer.get(body.run.id)?.status === "running" && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    expect(service.retrainer.get(body.run.id)?.status).toBe("failed");
    expect(service.retrainer.runs()).toHaveLength(1);
  });

  it("reports a trainer that is not running", async () => {
    const port = await freePort();
    const file = await writeConfig(temp.dir, broker.url, generateKeyPair(), { review: { port } });
    const err = capture();

    expect(await runTrainer(["--config", file, "--retrain"], { out: capture().stream, err: err.stream, env: {} })).toBe(1);
    expect(err.text()).toContain(`cannot reach the trainer at http://127.0.0.1:${port}/api/retrain`);
  });
});

describe("sortline fleet", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let broker: MosquittoBroker;
  let keys: SigningKeyPair;
  let file: string;
  let device: MqttLink;
  let server: CommandServer;
  const received: { command: string; args: Record<string, unknown> }[] = [];

  beforeEach(async () => {
    temp = makeTempDir("cli-fleet");
    broker = await startMosquitto();
    keys = generateKeyPair();
    file = await writeConfig(temp.dir, broker.url, keys);
    device = new MqttLink({ url: broker.url, role: "agent", site: "plant-a", device: "edge-1", reconnectPeriodMs: 200 });
    await device.connect({ timeoutMs: 10_000 });
    server = new CommandServer({ link: device, trustedKeys: { [keys.keyId]: keys.publicKeyPem } });
    received.length = 0;
    server.handle("status", {
      run: async (args) => {
        received.push({ command: "status", args });
        return { state: "online", model: { version: "1.0.0" } };
      },
    });
    server.handle("set-config", {
      run: async (args) => {
        received.push({ command: "set-config", args });
        return { applied: Object.keys(args) };
      },
    });
    server.handle("deploy", {
      argsSchema: { type: "object", required: ["version"], properties: { version: { type: "string" } } },
      run: async (args) => {
        throw new CommandError("failed", `version ${String(args.version)} has not been received`);
      },
    });
    server.handle("snapshot", { run: async () => ({ jpeg: readPhotos("glass")[0]!.toString("base64"), width: 512 }) });
    await server.start();
  });

  afterEach(async () => {
    await server.stop();
    await device.close();
    await broker.close();
    temp.remove();
  });

  it("prints the reply of a signed command", async () => {
    const out = capture();

    const code = await runFleet(["--config", file, "plant-a/edge-1", "status"], { out: out.stream, err: capture().stream, env: {} });

    expect(code).toBe(0);
    const reply = JSON.parse(out.text()) as { ok: boolean; site: string; device: string; result: Record<string, unknown> };
    expect(reply.ok).toBe(true);
    expect(reply.site).toBe("plant-a");
    expect(reply.device).toBe("edge-1");
    expect(reply.result).toEqual({ state: "online", model: { version: "1.0.0" } });
  });

  it("sends key=value words and --json as arguments", async () => {
    const words = ["--config", file, "plant-a/edge-1", "set-config", "mining.perHour=20", "decisions.rejectBin=reject", "mining.enabled=false"];

    expect(await runFleet(words, { out: capture().stream, err: capture().stream, env: {} })).toBe(0);
    expect(await runFleet(["--config", file, "plant-a/edge-1", "set-config", "--json", '{"mining.randomRate": 0.01}'], { out: capture().stream, err: capture().stream, env: {} })).toBe(0);

    expect(received[0]).toEqual({ command: "set-config", args: { "mining.perHour": 20, "decisions.rejectBin": "reject", "mining.enabled": false } });
    expect(received[1]).toEqual({ command: "set-config", args: { "mining.randomRate": 0.01 } });
  });

  it("exits 1 on an error reply", async () => {
    const out = capture();

    const code = await runFleet(["--config", file, "plant-a/edge-1", "deploy", "version=9.9.9"], { out: out.stream, err: capture().stream, env: {} });

    expect(code).toBe(1);
    const reply = JSON.parse(out.text()) as { ok: boolean; error: { code: string; message: string } };
    expect(reply.ok).toBe(false);
    expect(reply.error).toEqual({ code: "failed", message: "version 9.9.9 has not been received" });
  });

  it("exits 1 for a key the device does not trust", async () => {
    const otherKeys = generateKeyPair();
    const otherDir = path.join(temp.dir, "other");
    await mkdir(otherDir);
    const otherFile = await writeConfig(otherDir, broker.url, otherKeys);
    const out = capture();

    const code = await runFleet(["--config", otherFile, "plant-a/edge-1", "status"], { out: out.stream, err: capture().stream, env: {} });

    expect(code).toBe(1);
    expect((JSON.parse(out.text()) as { error: { code: string } }).error.code).toBe("unauthorised");
  });

  it("exits 2 when no reply arrives", async () => {
    const err = capture();

    const code = await runFleet(["--config", file, "--timeout", "0.5", "plant-a/edge-9", "status"], { out: capture().stream, err: err.stream, env: {} });

    expect(code).toBe(2);
    expect(err.text()).toMatch(/command "status" to plant-a\/edge-9 got no reply within 500 ms/);
  });

  it("writes the snapshot JPEG with --out", async () => {
    const out = capture();
    const jpegFile = path.join(temp.dir, "frame.jpg");

    const code = await runFleet(["--config", file, "plant-a/edge-1", "snapshot", "--out", jpegFile], { out: out.stream, err: capture().stream, env: {} });

    expect(code).toBe(0);
    expect(await readFile(jpegFile)).toEqual(readPhotos("glass")[0]);
    const reply = JSON.parse(out.text()) as { result: { jpeg: string; width: number } };
    expect(reply.result.jpeg).toBe(`${readPhotos("glass")[0]!.length} bytes written to ${jpegFile}`);
    expect(reply.result.width).toBe(512);
  });

  it("lists device statuses and configured devices", async () => {
    const out = capture();

    const code = await runFleet(["--config", file, "list"], { out: out.stream, err: capture().stream, env: {} });

    expect(code).toBe(0);
    const lines = out.text().trimEnd().split("\n");
    expect(lines[0]).toMatch(/^DEVICE\s+STATE\s+MODEL\s+LAST STATUS\s+GROUPS$/);
    expect(lines[1]).toMatch(/^plant-a\/edge-1\s+online\s+-\s+\d{4}-\d{2}-\d{2}T\S+Z\s+line1$/);
    expect(lines[2]).toMatch(/^plant-a\/edge-2\s+unknown\s+-\s+-\s+line1$/);
  });

  it("rejects bad usage with exit 2", async () => {
    expect(await main(["fleet", "--config", file, "edge-1", "status"])).toBe(2);
    expect(await main(["fleet", "--config", file, "plant-a/edge-1"])).toBe(2);
    expect(await main(["fleet", "--config", file, "plant-a/edge-1", "status", "verbose"])).toBe(2);
    expect(await main(["fleet", "--config", file, "plant-a/edge-1", "status", "a=1", "--json", "{}"])).toBe(2);
    expect(await main(["fleet", "--config", file, "plant-a/edge-1", "status", "--json", "[1]"])).toBe(2);
    expect(await main(["fleet", "plant-a/edge-1", "status"])).toBe(2);
    expect(await main(["fleet", "--config", file, "--timeout", "0", "plant-a/edge-1", "status"])).toBe(2);
  });
});
