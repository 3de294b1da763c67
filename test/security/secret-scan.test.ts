/**
 * Runs the components that handle secrets as child processes of a private build, with known
 * marker values. The test then checks that no output line and no file they leave behind contains
 * a marker.
 * The components:
 *
 * - `sortline keys generate` (the private key it writes),
 * - `sortline trainer` with the signing key file, an MQTT password and a review token from
 *   environment variables, serving authorised and rejected review requests,
 * - `sortline trainer --retrain` and `--validate-config` with the token in the environment,
 * - `sortline agent` with its MQTT password from an environment variable, and once with a wrong one,
 * - `sortline fleet` with the signing key PEM in an environment variable, with the right and a
 *   wrong MQTT password and with a damaged key.
 *
 * The broker is a Mosquitto child process with a password file, so a wrong password is rejected.
 * Markers: the passwords and the token (whole and every 16-character window), each base64 line of
 * the private key PEM, and the 32-byte ed25519 seed as hex, base64 and base64url.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createPrivateKey, randomBytes } from "node:crypto";
import { copyFileSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stringify as toYaml } from "yaml";

import { repoRoot } from "../agent/helpers.js";
import { freePort, startMosquitto, type MosquittoBroker } from "../helpers/mosquitto.js";

const SITE = "plant-s";
const DEVICE = "line-s";
const AGENT_USER = DEVICE;
const TRAINER_USER = "trainer";
const HANG_GUARD_MS = 90_000;

/** Secrets of this run, random so that no fixture or earlier run can contain them by chance. */
const secrets = {
  agentPassword: `agentpw-${randomBytes(12).toString("hex")}`,
  trainerPassword: `trainerpw-${randomBytes(12).toString("hex")}`,
  wrongPassword: `wrongpw-${randomBytes(12).toString("hex")}`,
  reviewToken: `reviewtoken-${randomBytes(12).toString("hex")}`,
};

/** A named substring that must not appear in any output or file outside the secret files. */
interface Marker {
  name: string;
  value: string;
}

/** Returns the whole value and every `width`-character window of it, so a cut-off copy is found too. */
function windows(name: string, value: string, width = 16): Marker[] {
  const markers: Marker[] = [{ name, value }];
  for (let start = 0; start + width <= value.length; start++) {
    markers.push({ name: `${name}[${start}..${start + width}]`, value: value.slice(start, start + width) });
  }
  return markers;
}

/** Markers of an ed25519 private key: its PEM base64 lines and the seed in hex, base64 and base64url. */
function privateKeyMarkers(name: string, pem: string): Marker[] {
  const lines = pem.split("\n").filter((line) => line.length > 0 && !line.startsWith("-----"));
  const der = createPrivateKey(pem).export({ format: "der", type: "pkcs8" });
  // A PKCS#8 ed25519 key ends with the 32-byte seed (RFC 8410, section 7).
  const seed = der.subarray(der.length - 32);
  return [
    ...lines.map((line, index) => ({ name: `${name} PEM line ${index + 1}`, value: line })),
    ...windows(`${name} seed hex`, seed.toString("hex")),
    ...windows(`${name} seed base64`, seed.toString("base64").replace(/=+$/, "")),
    ...windows(`${name} seed base64url`, seed.toString("base64url")),
  ];
}

/** A place where output was found: a child's stream or a file. */
interface Finding {
  where: string;
  marker: string;
  /** The line, with the marker replaced, so the report itself does not repeat the secret. */
  context: string;
}

function scanText(where: string, text: string, markers: readonly Marker[]): Finding[] {
  const findings: Finding[] = [];
  for (const marker of markers) {
    const at = text.indexOf(marker.value);
    if (at === -1) {
      continue;
    }
    const lineStart = text.lastIndexOf("\n", at) + 1;
    const lineEnd = text.indexOf("\n", at);
    const line = text.slice(lineStart, lineEnd === -1 ? undefined : lineEnd).split(marker.value).join(`<${marker.name}>`);
    findings.push({ where, marker: marker.name, context: line.slice(0, 400) });
  }
  return findings;
}

/** Lists regular files under `root`, not following symbolic links and skipping `skip` folders. */
function listFiles(root: string, skip: ReadonlySet<string>): string[] {
  const files: string[] = [];
  for (const name of readdirSync(root)) {
    const file = path.join(root, name);
    const info = lstatSync(file);
    if (info.isDirectory() && !skip.has(file)) {
      files.push(...listFiles(file, skip));
    } else if (info.isFile()) {
      files.push(file);
    }
  }
  return files;
}

/** A `sortline` child process of the private build whose stdout and stderr are kept as text. */
class Child {
  stdout = "";
  stderr = "";
  code: number | null | undefined;
  readonly exited: Promise<number | null>;
  private readonly child: ChildProcess;

  constructor(
    readonly label: string,
    bin: string,
    args: readonly string[],
    env: NodeJS.ProcessEnv,
  ) {
    // Only the variables the child needs, so a secret reaches no process that does not use it.
    const base = { PATH: process.env.PATH, HOME: process.env.HOME, NOTIFY_SOCKET: "", WATCHDOG_USEC: "" };
    this.child = spawn(process.execPath, [bin, ...args], { cwd: path.dirname(path.dirname(bin)), env: { ...base, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    this.child.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
      this.stdout += chunk;
    });
    this.child.stderr!.setEncoding("utf8").on("data", (chunk: string) => {
      this.stderr += chunk;
    });
    this.exited = new Promise((resolve) => {
      this.child.on("close", (code) => {
        this.code = code;
        resolve(code);
      });
    });
  }

  /** Resolves with the first stdout JSON log line whose msg is `msg`, and rejects when the child exits first. */
  async waitForLog(msg: string, timeoutMs = HANG_GUARD_MS): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (const line of this.stdout.split("\n")) {
        if (line.includes(`"msg":"${msg}"`)) {
          return JSON.parse(line) as Record<string, unknown>;
        }
      }
      if (this.code !== undefined) {
        throw new Error(`${this.label} exited with ${this.code} before logging "${msg}"; stderr: ${this.stderr.slice(-2_000)}`);
      }
      if (Date.now() > deadline) {
        throw new Error(`${this.label} did not log "${msg}" within ${timeoutMs} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Sends SIGTERM, then SIGKILL after `graceMs`, and resolves with the exit code, which is null when a signal ended the child. */
  async stop(graceMs = 30_000): Promise<number | null> {
    if (this.code === undefined) {
      this.child.kill("SIGTERM");
    }
    const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }
}

/**
 * Compiles src/ into `dir`/dist and lays out a package around it (bin, package.json, a link to
 * node_modules), so the children run the current sources and the shared dist/ stays untouched.
 */
function buildPrivatePackage(dir: string): string {
  const tsc = path.join(repoRoot, "node_modules", "typescript", "bin", "tsc");
  const result = spawnSync(process.execPath, [tsc, "-p", path.join(repoRoot, "tsconfig.json"), "--outDir", path.join(dir, "dist")], { encoding: "utf8" });
  // tsc still emits when other files fail to type-check, so only a missing entry point stops the test.
  if (!existsSync(path.join(dir, "dist", "cli", "main.js"))) {
    throw new Error(`tsc did not emit dist/cli/main.js (exit ${result.status}):\n${result.stdout}${result.stderr}`);
  }
  mkdirSync(path.join(dir, "bin"));
  copyFileSync(path.join(repoRoot, "bin", "sortline.js"), path.join(dir, "bin", "sortline.js"));
  copyFileSync(path.join(repoRoot, "package.json"), path.join(dir, "package.json"));
  symlinkSync(path.join(repoRoot, "node_modules"), path.join(dir, "node_modules"));
  return path.join(dir, "bin", "sortline.js");
}

/**
 * A stand-in for the train and gate jobs that fails at once, so a retrain run ends quickly. It
 * prints the names, not the values, of the test's secret variables that reached its environment.
 */
const FAILING_JOB = `const names = Object.keys(process.env).filter((name) => name.startsWith("SORTLINE_TEST_"));
process.stderr.write("stand-in job sees: " + (names.join(",") || "none") + "\\n");
process.exit(1);
`;

interface Setup {
  root: string;
  packageDir: string;
  bin: string;
  broker: MosquittoBroker;
  brokerLogFile: string;
  keysDir: string;
  trainerConfig: string;
  fleetConfig: string;
  agentConfig: string;
  /** The same agent with its own state folder, for the run with a wrong password. */
  secondAgentConfig: string;
  children: Child[];
}

let s: Setup;

function start(label: string, args: readonly string[], env: NodeJS.ProcessEnv = {}): Child {
  const child = new Child(label, s.bin, args, env);
  s.children.push(child);
  return child;
}

async function run(label: string, args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<Child> {
  const child = start(label, args, env);
  const timer = setTimeout(() => void child.stop(), HANG_GUARD_MS);
  await child.exited;
  clearTimeout(timer);
  return child;
}

beforeAll(async () => {
  const root = mkdtempSync(path.join(tmpdir(), "sortline-secret-scan-"));
  const packageDir = path.join(root, "package");
  mkdirSync(packageDir);
  const bin = buildPrivatePackage(packageDir);

  const brokerDir = path.join(root, "broker");
  mkdirSync(brokerDir);
  const passwordFile = path.join(brokerDir, "passwords");
  for (const [user, password] of [
    [AGENT_USER, secrets.agentPassword],
    [TRAINER_USER, secrets.trainerPassword],
  ] as const) {
    const passwd = spawnSync("/usr/bin/mosquitto_passwd", [...(existsSync(passwordFile) ? [] : ["-c"]), "-b", passwordFile, user, password], { encoding: "utf8" });
    if (passwd.status !== 0) {
      throw new Error(`mosquitto_passwd failed: ${passwd.stderr}`);
    }
  }
  const brokerLogFile = path.join(brokerDir, "mosquitto.log");
  const broker = await startMosquitto({
    dir: brokerDir,
    config: ["allow_anonymous false", `password_file ${passwordFile}`, `log_dest file ${brokerLogFile}`, "log_type all", "connection_messages true"],
  });

  s = { root, packageDir, bin, broker, brokerLogFile, keysDir: path.join(root, "keys"), trainerConfig: "", fleetConfig: "", agentConfig: "", secondAgentConfig: "", children: [] };
}, 180_000);

afterAll(async () => {
  for (const child of s?.children ?? []) {
    await child.stop();
  }
  await s?.broker.close();
  if (s) {
    rmSync(s.root, { recursive: true, force: true });
  }
}, 120_000);

/** Writes the trainer, fleet and agent configuration files once the keys exist. */
function writeConfigs(reviewPort: number): void {
  const trainerDir = path.join(s.root, "trainer");
  mkdirSync(path.join(trainerDir, "spark"), { recursive: true });
  writeFileSync(path.join(trainerDir, "job.mjs"), FAILING_JOB);
  const photos = path.join(repoRoot, "demo", "photos");
  const baseModel = path.join(trainerDir, "base-model");
  mkdirSync(baseModel);
  for (const name of readdirSync(path.join(repoRoot, "models", "default"))) {
    copyFileSync(path.join(repoRoot, "models", "default", name), path.join(baseModel, name));
  }
  const trainer = {
    broker: { url: s.broker.url, protocolVersion: 5, username: TRAINER_USER, password: { env: "SORTLINE_TEST_BROKER_PASSWORD" } },
    dataDir: path.join(trainerDir, "data"),
    review: { host: "127.0.0.1", port: reviewPort, token: { env: "SORTLINE_TEST_REVIEW_TOKEN" } },
    signing: { privateKey: path.join(s.keysDir, "signing.key") },
    base: { datasets: [photos], model: baseModel },
    validation: [photos],
    training: {
      sparkDir: path.join(trainerDir, "spark"),
      trigger: { minNewLabels: 1_000 },
      command: [process.execPath, path.join(trainerDir, "job.mjs")],
      gateCommand: [process.execPath, path.join(trainerDir, "job.mjs")],
    },
    fleet: { groups: { line: [`${SITE}/${DEVICE}`] }, publishTo: "line" },
    logging: { level: "trace" },
  };
  s.trainerConfig = path.join(trainerDir, "trainer.json");
  writeFileSync(s.trainerConfig, JSON.stringify(trainer, null, 2));
  // The fleet CLI reads the same file format, and this copy takes the key PEM from the environment.
  s.fleetConfig = path.join(trainerDir, "fleet.json");
  writeFileSync(s.fleetConfig, JSON.stringify({ ...trainer, signing: { privateKey: { env: "SORTLINE_TEST_SIGNING_KEY" } } }, null, 2));

  s.agentConfig = writeAgentConfig(path.join(s.root, "agent"), photos);
  s.secondAgentConfig = writeAgentConfig(path.join(s.root, "agent-second"), photos);
}

function writeAgentConfig(agentDir: string, photos: string): string {
  mkdirSync(agentDir);
  const file = path.join(agentDir, "agent.yaml");
  writeFileSync(
    file,
    toYaml({
      device: { id: DEVICE, site: SITE },
      model: { dir: path.join(repoRoot, "models", "default"), providers: ["cpu"], threads: 1 },
      sources: [{ type: "directory", name: "replay", path: photos, fps: 2, loop: true, shuffleSeed: 11 }],
      pipeline: { maxBatch: 2 },
      actuators: [{ type: "fleet" }],
      audit: { path: path.join(agentDir, "state", "audit.db") },
      health: { host: "127.0.0.1", port: 0 },
      logging: { level: "trace" },
      fleet: { url: s.broker.url, username: AGENT_USER, password: { env: "SORTLINE_TEST_MQTT_PASSWORD" }, trustedKeys: [path.join(s.keysDir, "signing.pub")], statusIntervalSeconds: 2 },
      mining: { lowConfidence: 0.99, perHour: 1_000, minDistance: 0.02 },
    }),
  );
  return file;
}

describe("secret scan of logs and outputs", () => {
  it("keeps secrets out of logs", async () => {
    // 1. Keys.
    const keys = await run("keys generate", ["keys", "generate", "--out", s.keysDir]);
    expect(keys.code, keys.stderr).toBe(0);
    const privatePem = readFileSync(path.join(s.keysDir, "signing.key"), "utf8");
    const markers: Marker[] = [
      ...windows("agent MQTT password", secrets.agentPassword),
      ...windows("trainer MQTT password", secrets.trainerPassword),
      ...windows("wrong MQTT password", secrets.wrongPassword),
      ...windows("review token", secrets.reviewToken),
      ...privateKeyMarkers("signing key", privatePem),
    ];
    // A damaged copy of the key: one base64 character changed, so the PEM no longer parses.
    const damagedLine = privatePem.split("\n")[1]!;
    const damagedPem = privatePem.replace(damagedLine, `${damagedLine.slice(0, 20)}!${damagedLine.slice(21)}`);
    markers.push({ name: "damaged key PEM line", value: damagedPem.split("\n")[1]! });
    // A fixed port, because `trainer --retrain` finds the trainer through the configuration file.
    writeConfigs(await freePort());

    // 2. Trainer service.
    const trainer = start("trainer", ["trainer", "--config", s.trainerConfig], {
      SORTLINE_TEST_BROKER_PASSWORD: secrets.trainerPassword,
      SORTLINE_TEST_REVIEW_TOKEN: secrets.reviewToken,
    });
    const started = await trainer.waitForLog("trainer started");
    const review = `http://127.0.0.1:${String(started.reviewPort)}`;

    // 3. Agent.
    const agent = start("agent", ["agent", "--config", s.agentConfig], { SORTLINE_TEST_MQTT_PASSWORD: secrets.agentPassword });
    await agent.waitForLog("agent ready");

    // 4. Review requests: without, with a wrong and with the right token, by header and by cookie.
    const statuses: Record<string, number> = {};
    statuses.noToken = (await fetch(`${review}/api/stats`)).status;
    statuses.wrongBearer = (await fetch(`${review}/api/stats`, { headers: { Authorization: `Bearer ${secrets.wrongPassword}` } })).status;
    statuses.bearer = (await fetch(`${review}/api/stats`, { headers: { Authorization: `Bearer ${secrets.reviewToken}` } })).status;
    statuses.wrongLogin = (await fetch(`${review}/login?token=${secrets.wrongPassword}`, { redirect: "manual" })).status;
    const login = await fetch(`${review}/login?token=${secrets.reviewToken}`, { redirect: "manual" });
    statuses.login = login.status;
    const cookie = (login.headers.get("set-cookie") ?? "").split(";")[0]!;
    statuses.cookie = (await fetch(`${review}/api/stats`, { headers: { Cookie: cookie } })).status;
    statuses.missingRoute = (await fetch(`${review}/api/nothing-here?token=${secrets.reviewToken}`, { headers: { Authorization: `Bearer ${secrets.reviewToken}` } })).status;
    expect(statuses).toEqual({ noToken: 401, wrongBearer: 401, bearer: 200, wrongLogin: 401, login: statuses.login, cookie: 200, missingRoute: 404 });
    expect([302, 303]).toContain(statuses.login);

    // 5. Fleet commands signed with the key from the environment.
    const fleetEnv = { SORTLINE_TEST_BROKER_PASSWORD: secrets.trainerPassword, SORTLINE_TEST_SIGNING_KEY: privatePem };
    const target = `${SITE}/${DEVICE}`;
    for (const words of [["status"], ["pause"], ["resume"], ["set-config", "decisions.topK=4"], ["upload-now"]]) {
      const fleet = await run(`fleet ${words.join(" ")}`, ["fleet", "--config", s.fleetConfig, "--timeout", "20", target, ...words], fleetEnv);
      expect(fleet.code, `${fleet.label}: ${fleet.stderr}${fleet.stdout}`).toBe(0);
    }
    const snapshotFile = path.join(s.root, "snapshot.jpg");
    const snapshot = await run("fleet snapshot", ["fleet", "--config", s.fleetConfig, "--timeout", "20", "--out", snapshotFile, target, "snapshot"], fleetEnv);
    expect(snapshot.code, snapshot.stderr).toBe(0);
    const wrongPassword = await run("fleet with a wrong password", ["fleet", "--config", s.fleetConfig, "--timeout", "10", target, "status"], {
      ...fleetEnv,
      SORTLINE_TEST_BROKER_PASSWORD: secrets.wrongPassword,
    });
    expect(wrongPassword.code).toBe(1);
    const damagedKey = await run("fleet with a damaged key", ["fleet", "--config", s.fleetConfig, "--timeout", "10", target, "status"], {
      ...fleetEnv,
      SORTLINE_TEST_SIGNING_KEY: damagedPem,
    });
    expect(damagedKey.code).toBe(1);
    expect(damagedKey.stderr).toMatch(/signing\.privateKey/);

    // 6. Trainer CLI calls that read the token.
    const retrain = await run("trainer --retrain", ["trainer", "--config", s.trainerConfig, "--retrain"], { SORTLINE_TEST_REVIEW_TOKEN: secrets.reviewToken });
    expect(retrain.code, retrain.stderr).toBe(0);
    const validate = await run("trainer --validate-config", ["trainer", "--config", s.trainerConfig, "--validate-config"], {
      SORTLINE_TEST_BROKER_PASSWORD: secrets.trainerPassword,
      SORTLINE_TEST_REVIEW_TOKEN: secrets.reviewToken,
    });
    expect(validate.code, validate.stderr).toBe(0);
    await trainer.waitForLog("training run failed", 30_000);

    // 7. An agent with a wrong MQTT password keeps running and logs the rejected connection.
    const rejectedAgent = start("agent with a wrong password", ["agent", "--config", s.secondAgentConfig], { SORTLINE_TEST_MQTT_PASSWORD: secrets.wrongPassword });
    await rejectedAgent.waitForLog("agent ready");
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    // NOTE: while the broker refuses the agent, Agent.stop() waits for the uplink's send in flight,
    // which waits for a connection up to its 120 s send timeout. The grace period is the unit's
    // TimeoutStopSec=20 plus a margin, after which systemd would kill it as this test does.
    const rejectedStopStart = Date.now();
    const rejectedExit = await rejectedAgent.stop(25_000);
    const rejectedStop = { exit: rejectedExit, ms: Date.now() - rejectedStopStart };

    // Give the agent time to upload a mined example, so the trainer logs its receipt too.
    await trainer.waitForLog("hard example stored", 30_000).catch(() => undefined);
    expect(await agent.stop()).toBe(0);
    expect(await trainer.stop()).toBe(0);

    // 8. Scan every captured stream and every file left in the test's folder.
    const findings: Finding[] = [];
    let lines = 0;
    for (const child of s.children) {
      lines += child.stdout.split("\n").length + child.stderr.split("\n").length;
      findings.push(...scanText(`${child.label} stdout`, child.stdout, markers), ...scanText(`${child.label} stderr`, child.stderr, markers));
    }
    findings.push(...scanText("mosquitto stderr", s.broker.log(), markers));
    // The key file contains the key by design, and the package folder contains only the build.
    const expectedHolders = new Set([path.join(s.keysDir, "signing.key")]);
    const files = listFiles(s.root, new Set([s.packageDir])).filter((file) => !expectedHolders.has(file));
    for (const file of files) {
      findings.push(...scanText(path.relative(s.root, file), readFileSync(file).toString("latin1"), markers));
    }

    // The scan must see real output, and must find a marker where one is known to be.
    const agentLogs = agent.stdout.split("\n").filter((line) => line.startsWith("{")).length;
    const trainerLogs = trainer.stdout.split("\n").filter((line) => line.startsWith("{")).length;
    const control = scanText("signing.key", privatePem, markers);
    const jobSees = [...new Set([...trainer.stdout.matchAll(/stand-in job sees: ([A-Z_,a-z]+)/g)].map((match) => match[1]))];
    console.log(
      JSON.stringify(
        {
          children: s.children.map((child) => ({ label: child.label, exit: child.code, stdoutLines: child.stdout.split("\n").length - 1, stderrLines: child.stderr.split("\n").length - 1 })),
          markers: markers.length,
          linesScanned: lines,
          filesScanned: files.length,
          brokerLogBytes: existsSync(s.brokerLogFile) ? readFileSync(s.brokerLogFile).length : 0,
          controlHits: control.length,
          secretVariablesSeenByTrainingJobs: jobSees,
          rejectedAgentStop: rejectedStop,
          findings: findings.length,
        },
        null,
        1,
      ),
    );
    expect(agentLogs).toBeGreaterThan(50);
    expect(trainerLogs).toBeGreaterThan(5);
    expect(rejectedAgent.stdout).toMatch(/Not authorized|not authori[sz]ed|Bad user name or password|refused/i);
    expect(control.length).toBeGreaterThan(0);
    expect(files.some((file) => file === s.brokerLogFile)).toBe(true);
    expect(findings).toEqual([]);
  }, 10 * 60_000);
});
