import { spawn, type ChildProcess } from "node:child_process";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import mqtt, { type MqttClient } from "mqtt";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Upper bound for any wait in these tests. It only turns a hang into a clear failure. */
export const HANG_GUARD_MS = 60_000;

/** Polls `condition` every 50 ms until it returns true, or rejects with `description` after `timeoutMs`. */
export async function waitUntil(condition: () => boolean, description: string, timeoutMs = HANG_GUARD_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${description}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** One JSON log line of the agent (pino). */
export interface LogLine {
  level: string;
  msg: string;
  [field: string]: unknown;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A `sortline` CLI child process whose stdout JSON log lines are parsed as they arrive. */
export class CliProcess {
  readonly logs: LogLine[] = [];
  /** stdout lines that are not JSON, in order. */
  readonly plainLines: string[] = [];
  stderr = "";
  status: ExitStatus | undefined;
  readonly exited: Promise<ExitStatus>;

  private constructor(readonly child: ChildProcess & { stdout: NodeJS.ReadableStream; stderr: NodeJS.ReadableStream }) {
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        this.logs.push(JSON.parse(line) as LogLine);
      } catch {
        this.plainLines.push(line);
      }
    });
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk: string) => {
      this.stderr += chunk;
    });
    this.exited = new Promise((resolve) => {
      child.on("close", (code, signal) => {
        this.status = { code, signal };
        resolve(this.status);
      });
    });
  }

  /** Starts `node bin/sortline.js ...args` in the repository root. */
  static start(args: readonly string[], env: NodeJS.ProcessEnv = {}): CliProcess {
    const child = spawn(process.execPath, [path.join(repoRoot, "bin", "sortline.js"), ...args], {
      cwd: repoRoot,
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    return new CliProcess(child as CliProcess["child"]);
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Returns the first log line with message `msg` that matches `fields`, if any. */
  findLog(msg: string, fields: Record<string, unknown> = {}): LogLine | undefined {
    return this.logs.find((line) => line.msg === msg && Object.entries(fields).every(([key, value]) => line[key] === value));
  }

  /** Resolves with the first log line with message `msg`, or rejects when the process exits first. */
  async waitForLog(msg: string): Promise<LogLine> {
    await waitUntil(() => this.findLog(msg) !== undefined || this.status !== undefined, `log line "${msg}"`);
    const line = this.findLog(msg);
    if (!line) {
      throw new Error(`process exited (${JSON.stringify(this.status)}) before logging "${msg}"; stderr: ${this.stderr}`);
    }
    return line;
  }

  /** Sends `signal` and resolves with the exit status. */
  async kill(signal: NodeJS.Signals): Promise<ExitStatus> {
    if (this.status === undefined) {
      this.child.kill(signal);
    }
    return this.exited;
  }
}

/** Subscribes to a decision topic with QoS 1 and collects the frame ids of the messages. */
export class DecisionSubscriber {
  readonly frameIds: string[] = [];

  private constructor(private readonly client: MqttClient) {
    client.on("message", (_topic, payload) => {
      this.frameIds.push((JSON.parse(payload.toString("utf8")) as { frameId: string }).frameId);
    });
  }

  static async start(url: string, topic: string): Promise<DecisionSubscriber> {
    const client = await mqtt.connectAsync(url, { clientId: `sortline-test-subscriber-${process.pid}`, clean: true, reconnectPeriod: 0 });
    const subscriber = new DecisionSubscriber(client);
    await client.subscribeAsync(topic, { qos: 1 });
    return subscriber;
  }

  /** Frame ids received so far that start with `prefix`. */
  idsWithPrefix(prefix: string): string[] {
    return this.frameIds.filter((id) => id.startsWith(prefix));
  }

  async stop(): Promise<void> {
    await this.client.endAsync(true);
  }
}

export { NotifySocket } from "../helpers/notify-socket.js";
