import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from "node:child_process";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { createLogger } from "../../src/lib/log.js";
import { DEFAULT_NOTIFY_PATH, Notifier, WatchdogKeeper, watchdogIntervalMs } from "../../src/health/sdnotify.js";

const hasPython = spawnSync("python3", ["--version"]).status === 0;
const hasSystemdNotify = spawnSync(DEFAULT_NOTIFY_PATH, ["--version"]).status === 0;
let skipReason = "";
if (!hasPython) {
  skipReason = "python3 is not installed";
} else if (!hasSystemdNotify) {
  skipReason = `${DEFAULT_NOTIFY_PATH} is not installed`;
}

/**
 * Binds an AF_UNIX datagram socket at argv[1], as systemd does for NOTIFY_SOCKET, and prints each
 * datagram as one JSON string per line. A BARRIER=1 datagram carries a pipe fd; recv() without
 * ancillary buffer lets the kernel close it, which releases the sender's sd_notify_barrier().
 */
const LISTENER = `
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
print(json.dumps("LISTENING"), flush=True)
while True:
    data = sock.recv(65536)
    print(json.dumps(data.decode("utf-8", "replace")), flush=True)
`;

/** The listening side of a notify socket, run by python3 because Node.js cannot bind AF_UNIX datagram sockets. */
class NotifySocketListener {
  private readonly messages: string[] = [];
  private waiter: (() => void) | undefined;

  private constructor(
    readonly socketPath: string,
    private readonly child: ChildProcessWithoutNullStreams,
  ) {
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      const message = JSON.parse(line) as string;
      // systemd-notify sends BARRIER=1 after each message to wait for its processing.
      if (message !== "BARRIER=1") {
        this.messages.push(message);
        this.waiter?.();
      }
    });
  }

  static async start(socketPath: string): Promise<NotifySocketListener> {
    const child = spawn("python3", ["-u", "-c", LISTENER, socketPath]);
    const listener = new NotifySocketListener(socketPath, child);
    expect(await listener.next()).toBe("LISTENING");
    return listener;
  }

  /** Returns the next datagram, waiting up to `timeoutMs` of real time for it. */
  async next(timeoutMs = 5_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (this.messages.length === 0) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        throw new Error(`no datagram on ${this.socketPath} within ${timeoutMs} ms`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return this.messages.shift() as string;
  }

  stop(): void {
    this.child.kill();
  }
}

function captureLogger(): { logger: ReturnType<typeof createLogger>; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const logger = createLogger({
    level: "debug",
    destination: {
      write(line: string) {
        records.push(JSON.parse(line) as Record<string, unknown>);
      },
    },
  });
  return { logger, records };
}

describe.skipIf(skipReason !== "")(`sd_notify over a real socket${skipReason ? ` (skipped: ${skipReason})` : ""}`, () => {
  let tempDir: string;
  let listener: NotifySocketListener;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-notify-"));
    listener = await NotifySocketListener.start(path.join(tempDir, "notify.sock"));
  });

  afterEach(async () => {
    vi.useRealTimers();
    listener.stop();
    await rm(tempDir, { recursive: true, force: true });
  });

  it("sends READY, STATUS and STOPPING in order", async () => {
    const notifier = new Notifier({ env: { NOTIFY_SOCKET: listener.socketPath } });

    const results = await Promise.all([
      notifier.ready("model loaded"),
      notifier.status("sorting\non line 1"),
      notifier.extendTimeout(2_500),
      notifier.stopping(),
    ]);

    expect(notifier.enabled).toBe(true);
    expect(results).toEqual([true, true, true, true]);
    expect(await listener.next()).toBe("READY=1\nSTATUS=model loaded");
    expect(await listener.next()).toBe("STATUS=sorting on line 1");
    expect(await listener.next()).toBe("EXTEND_TIMEOUT_USEC=2500000");
    expect(await listener.next()).toBe("STOPPING=1");
  });

  it("pings at half WATCHDOG_USEC only while healthy", async () => {
    vi.useFakeTimers({ toFake: ["setInterval", "clearInterval"] });
    const env = { NOTIFY_SOCKET: listener.socketPath, WATCHDOG_USEC: "400000" };
    const notifier = new Notifier({ env });
    let healthy = true;
    const keeper = new WatchdogKeeper(notifier, { env, isHealthy: () => healthy });

    expect(keeper.intervalMs).toBe(200);
    keeper.start();

    // Messages leave the notifier one at a time in call order, so a marker STATUS that arrives
    // before any WATCHDOG=1 proves that no ping was due until then.
    await vi.advanceTimersByTimeAsync(199);
    await notifier.status("marker 1");
    expect(await listener.next()).toBe("STATUS=marker 1");

    await vi.advanceTimersByTimeAsync(1);
    expect(await listener.next()).toBe("WATCHDOG=1");
    await vi.advanceTimersByTimeAsync(200);
    expect(await listener.next()).toBe("WATCHDOG=1");
    await vi.advanceTimersByTimeAsync(200);
    expect(await listener.next()).toBe("WATCHDOG=1");

    healthy = false;
    await vi.advanceTimersByTimeAsync(1_000);
    await notifier.status("marker 2");
    expect(await listener.next()).toBe("STATUS=marker 2");

    healthy = true;
    await vi.advanceTimersByTimeAsync(200);
    expect(await listener.next()).toBe("WATCHDOG=1");

    keeper.stop();
    await vi.advanceTimersByTimeAsync(1_000);
    await notifier.stopping();
    expect(await listener.next()).toBe("STOPPING=1");
  });

  it("logs failures rate-limited and resolves false", async () => {
    const { logger, records } = captureLogger();
    const notifier = new Notifier({ env: { NOTIFY_SOCKET: path.join(tempDir, "missing.sock") }, logger });

    const first = await notifier.watchdogPing();
    const second = await notifier.ready();
    const warnings = records.filter((record) => record.level === "warn");

    expect(first).toBe(false);
    expect(second).toBe(false);
    expect(warnings).toHaveLength(1);
    expect(String(warnings[0]?.error)).toMatch(/exit status 1/);
  });

  it("resolves false when systemd-notify is missing", async () => {
    const { logger, records } = captureLogger();
    const notifier = new Notifier({
      env: { NOTIFY_SOCKET: listener.socketPath },
      notifyPath: path.join(tempDir, "no-such-systemd-notify"),
      logger,
    });

    expect(await notifier.ready()).toBe(false);
    expect(String(records.find((record) => record.level === "warn")?.error)).toMatch(/ENOENT/);
  });
});

describe("sd_notify without NOTIFY_SOCKET", () => {
  let tempDir: string;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-notify-"));
  });

  afterEach(async () => {
    vi.useRealTimers();
    await rm(tempDir, { recursive: true, force: true });
  });

  /** Writes a stand-in for systemd-notify that appends its arguments to a file. */
  async function writeRecorder(): Promise<{ notifyPath: string; calls: () => Promise<string> }> {
    const notifyPath = path.join(tempDir, "record-notify");
    const callsPath = path.join(tempDir, "calls.txt");
    await writeFile(notifyPath, `#!/bin/sh\necho "$@" >> '${callsPath}'\n`);
    await chmod(notifyPath, 0o755);
    return { notifyPath, calls: () => readFile(callsPath, "utf8").catch(() => "") };
  }

  it("runs nothing and resolves false", async () => {
    const { notifyPath, calls } = await writeRecorder();
    const notifier = new Notifier({ env: {}, notifyPath });

    const results = await Promise.all([notifier.ready("x"), notifier.status("y"), notifier.watchdogPing(), notifier.stopping()]);

    expect(notifier.enabled).toBe(false);
    expect(results).toEqual([false, false, false, false]);
    expect(await calls()).toBe("");
  });

  it("runs the notify command once NOTIFY_SOCKET is set", async () => {
    const { notifyPath, calls } = await writeRecorder();
    const notifier = new Notifier({ env: { NOTIFY_SOCKET: "/run/sortline-test.sock" }, notifyPath });

    expect(await notifier.ready()).toBe(true);
    expect(await calls()).toBe("READY=1\n");
  });

  it("keeps the watchdog off", async () => {
    vi.useFakeTimers({ toFake: ["setInterval", "clearInterval"] });
    const { notifyPath, calls } = await writeRecorder();
    const env = { WATCHDOG_USEC: "400000" };
    const keeper = new WatchdogKeeper(new Notifier({ env, notifyPath }), { env, isHealthy: () => true });

    keeper.start();
    await vi.advanceTimersByTimeAsync(1_000);
    keeper.stop();

    expect(keeper.enabled).toBe(false);
    expect(vi.getTimerCount()).toBe(0);
    expect(await calls()).toBe("");
  });
});

describe("watchdogIntervalMs", () => {
  it.each([
    [{ WATCHDOG_USEC: "30000000" }, 15_000],
    [{ WATCHDOG_USEC: "400000" }, 200],
    [{ WATCHDOG_USEC: "400000", WATCHDOG_PID: "4242" }, 200],
    [{ WATCHDOG_USEC: "400000", WATCHDOG_PID: "1" }, undefined],
    [{ WATCHDOG_USEC: "0" }, undefined],
    [{ WATCHDOG_USEC: "soon" }, undefined],
    [{}, undefined],
  ])("reads %o as %s", (env, expected) => {
    expect(watchdogIntervalMs(env, 4242)).toBe(expected);
  });
});
