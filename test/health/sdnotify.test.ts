import { spawnSync } from "node:child_process";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { createLogger } from "../../src/lib/log.js";
import { DEFAULT_NOTIFY_PATH, Notifier, WatchdogKeeper, watchdogIntervalMs } from "../../src/health/sdnotify.js";
import { NotifySocket } from "../helpers/notify-socket.js";

const hasPython = spawnSync("python3", ["--version"]).status === 0;
const hasSystemdNotify = spawnSync(DEFAULT_NOTIFY_PATH, ["--version"]).status === 0;
let skipReason = "";
if (!hasPython) {
  skipReason = "python3 is not installed";
} else if (!hasSystemdNotify) {
  skipReason = `${DEFAULT_NOTIFY_PATH} is not installed`;
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
  let listener: NotifySocket;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-notify-"));
    listener = await NotifySocket.start(path.join(tempDir, "notify.sock"));
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
