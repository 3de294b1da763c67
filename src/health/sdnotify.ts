/**
 * sd_notify(3) messages for a systemd `Type=notify` service.
 *
 * Node.js cannot open AF_UNIX datagram sockets, so each message is sent by running
 * systemd-notify(1) with the assignments as arguments. The alternative, the `unix-dgram` npm
 * addon, has no prebuilt binaries and would need a C++ toolchain on every target, including the
 * aarch64 Jetson boards. systemd-notify ships with systemd and costs one short child process
 * per message (about 15 ms on an x86-64 build host), that is one per watchdog ping.
 *
 * Because the sender is a child process and not the main PID, the unit needs `NotifyAccess=all`.
 * systemd-notify of systemd 246 and later waits until the manager has processed the message
 * (sd_notify_barrier(3)), so the manager can still attribute it to the unit.
 * NOTE: with systemd 245 and older (Ubuntu 20.04, JetPack 5) the manager may drop a message whose
 * sender has already exited; systemd-notify(1) documents this race.
 */
import { spawn } from "node:child_process";

import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";

export const DEFAULT_NOTIFY_PATH = "/usr/bin/systemd-notify";

export interface NotifierOptions {
  /** Environment that contains NOTIFY_SOCKET; defaults to process.env. */
  env?: NodeJS.ProcessEnv;
  /** Path of the systemd-notify executable. */
  notifyPath?: string;
  logger?: Logger;
  /** Kills a systemd-notify process that runs longer than this, in milliseconds. */
  timeoutMs?: number;
  /** Minimum time between two warnings about failed messages, in milliseconds. */
  warnIntervalMs?: number;
  /** Messages waiting to be sent beyond this count are dropped with a warning. */
  maxPending?: number;
}

/** Logs a warning at most once per interval and reports how many were suppressed in between. */
class RateLimitedWarning {
  private lastWarnAt = Number.NEGATIVE_INFINITY;
  private suppressed = 0;

  constructor(
    private readonly logger: Logger,
    private readonly intervalMs: number,
  ) {}

  warn(fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    if (now - this.lastWarnAt < this.intervalMs) {
      this.suppressed += 1;
      return;
    }
    this.logger.warn({ ...fields, suppressed: this.suppressed }, message);
    this.lastWarnAt = now;
    this.suppressed = 0;
  }
}

const ASSIGNMENT_KEY = /^[A-Z][A-Z0-9_]*$/;

/**
 * Sends sd_notify messages. When NOTIFY_SOCKET is unset, every method is a no-op that resolves to false.
 *
 * Messages are sent one at a time in call order. The returned promise resolves to true when
 * systemd-notify succeeded and to false otherwise. It never rejects, and failures are logged
 * as rate-limited warnings.
 */
export class Notifier {
  /** True when NOTIFY_SOCKET is set, that is when the process runs as a `Type=notify` service. */
  readonly enabled: boolean;

  private readonly socket: string | undefined;
  private readonly notifyPath: string;
  private readonly timeoutMs: number;
  private readonly maxPending: number;
  private readonly logger: Logger;
  private readonly failureWarning: RateLimitedWarning;
  private queue: Promise<unknown> = Promise.resolve();
  private pending = 0;
  private queuedWatchdogPing: Promise<boolean> | undefined;

  constructor(options: NotifierOptions = {}) {
    const env = options.env ?? process.env;
    this.socket = env.NOTIFY_SOCKET === "" ? undefined : env.NOTIFY_SOCKET;
    this.enabled = this.socket !== undefined;
    this.notifyPath = options.notifyPath ?? DEFAULT_NOTIFY_PATH;
    this.timeoutMs = options.timeoutMs ?? 5_000;
    this.maxPending = options.maxPending ?? 16;
    this.logger = options.logger ?? silentLogger;
    this.failureWarning = new RateLimitedWarning(this.logger, options.warnIntervalMs ?? 60_000);
  }

  /** Sends READY=1, with an optional STATUS= line, once start-up has finished. */
  ready(status?: string): Promise<boolean> {
    return this.send(status === undefined ? { READY: "1" } : { READY: "1", STATUS: status });
  }

  /** Sends STOPPING=1, with an optional STATUS= line, when shutdown begins. */
  stopping(status?: string): Promise<boolean> {
    return this.send(status === undefined ? { STOPPING: "1" } : { STOPPING: "1", STATUS: status });
  }

  /** Sends STATUS=, the one-line text that `systemctl status` shows. */
  status(text: string): Promise<boolean> {
    return this.send({ STATUS: text });
  }

  /** Sends WATCHDOG=1. A ping that is still waiting in the queue absorbs later ones. */
  watchdogPing(): Promise<boolean> {
    if (this.queuedWatchdogPing !== undefined) {
      return this.queuedWatchdogPing;
    }
    const ping = this.enqueue(["WATCHDOG=1"], () => {
      this.queuedWatchdogPing = undefined;
    });
    this.queuedWatchdogPing = ping;
    void ping.finally(() => {
      if (this.queuedWatchdogPing === ping) {
        this.queuedWatchdogPing = undefined;
      }
    });
    return ping;
  }

  /** Sends EXTEND_TIMEOUT_USEC= so that a slow start-up or shutdown step gets `ms` more milliseconds. */
  extendTimeout(ms: number): Promise<boolean> {
    if (!Number.isFinite(ms) || ms <= 0) {
      throw new RangeError(`timeout extension must be a positive number of milliseconds, got ${ms}`);
    }
    return this.send({ EXTEND_TIMEOUT_USEC: String(Math.round(ms * 1000)) });
  }

  /**
   * Sends the assignments as one message. Keys are sd_notify variable names such as READY or
   * STATUS, and a key of another form throws a TypeError. Line breaks in values become spaces,
   * because the protocol separates assignments by newlines.
   */
  send(assignments: Record<string, string>): Promise<boolean> {
    const args: string[] = [];
    for (const [key, value] of Object.entries(assignments)) {
      if (!ASSIGNMENT_KEY.test(key)) {
        throw new TypeError(`invalid sd_notify variable name '${key}'; expected upper-case letters, digits and '_'`);
      }
      args.push(`${key}=${value.replace(/[\r\n]+/g, " ")}`);
    }
    return this.enqueue(args);
  }

  /** Queues one systemd-notify run; `onStart` runs when the message leaves the queue. */
  private enqueue(args: string[], onStart?: () => void): Promise<boolean> {
    if (this.socket === undefined) {
      return Promise.resolve(false);
    }
    if (this.pending >= this.maxPending) {
      this.failureWarning.warn({ assignments: args, pending: this.pending }, "sd_notify queue is full; message dropped");
      return Promise.resolve(false);
    }

    this.pending += 1;
    const result = this.queue.then(() => {
      onStart?.();
      return this.run(args);
    });
    this.queue = result.finally(() => {
      this.pending -= 1;
    });
    return result;
  }

  private run(args: string[]): Promise<boolean> {
    return new Promise((resolve) => {
      let stderr = "";
      let settled = false;
      const finish = (error: string | undefined): void => {
        if (settled) {
          return;
        }
        settled = true;
        if (error !== undefined) {
          this.failureWarning.warn(
            { assignments: args, notifyPath: this.notifyPath, socket: this.socket, error },
            "sd_notify message failed; systemd may restart the service if watchdog pings are lost",
          );
        }
        resolve(error === undefined);
      };

      const child = spawn(this.notifyPath, args, {
        env: { NOTIFY_SOCKET: this.socket },
        stdio: ["ignore", "ignore", "pipe"],
        timeout: this.timeoutMs,
      });
      child.stderr.setEncoding("utf8");
      child.stderr.on("data", (chunk: string) => {
        stderr = (stderr + chunk).slice(0, 1_000);
      });
      child.on("error", (error) => finish(describeError(error)));
      child.on("close", (code, signal) => {
        if (code === 0) {
          finish(undefined);
        } else {
          const reason = signal === null ? `exit status ${code}` : `signal ${signal}`;
          finish(`${this.notifyPath} ended with ${reason}: ${stderr.trim()}`);
        }
      });
    });
  }
}

/**
 * Returns the watchdog ping interval in milliseconds, half of WATCHDOG_USEC as sd_watchdog_enabled(3)
 * recommends, or undefined when the watchdog is off. WATCHDOG_PID, when set, must equal `pid`.
 */
export function watchdogIntervalMs(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): number | undefined {
  const usecText = env.WATCHDOG_USEC;
  if (usecText === undefined || !/^\d+$/.test(usecText)) {
    return undefined;
  }
  const usec = Number(usecText);
  if (usec <= 0) {
    return undefined;
  }
  const pidText = env.WATCHDOG_PID;
  if (pidText !== undefined && pidText !== "" && Number(pidText) !== pid) {
    return undefined;
  }
  return Math.max(1, Math.floor(usec / 2_000));
}

export interface WatchdogKeeperOptions {
  /**
   * Returns whether the agent still works, for example whether a frame was decided recently.
   * systemd arms the watchdog once start-up has completed (systemd.service(5), WatchdogSec=), so
   * it should return true for a grace period after READY=1 until the first frame can be decided.
   */
  isHealthy: () => boolean;
  env?: NodeJS.ProcessEnv;
  pid?: number;
  logger?: Logger;
}

/**
 * Sends WATCHDOG=1 every half WATCHDOG_USEC while `isHealthy()` returns true.
 *
 * While it returns false the pings stop, so systemd kills the service once WatchdogSec= passes
 * without one, and Restart=on-failure starts it again. Inactive when NOTIFY_SOCKET or WATCHDOG_USEC is unset, or
 * when WATCHDOG_PID names another process.
 */
export class WatchdogKeeper {
  /** Ping period in milliseconds, or undefined when the watchdog is off. */
  readonly intervalMs: number | undefined;

  private readonly logger: Logger;
  private timer: NodeJS.Timeout | undefined;
  private healthy = true;

  constructor(
    private readonly notifier: Notifier,
    private readonly options: WatchdogKeeperOptions,
  ) {
    this.intervalMs = notifier.enabled ? watchdogIntervalMs(options.env, options.pid) : undefined;
    this.logger = options.logger ?? silentLogger;
  }

  get enabled(): boolean {
    return this.intervalMs !== undefined;
  }

  /** Starts the ping timer; does nothing when the watchdog is off or the timer runs already. */
  start(): void {
    if (this.intervalMs === undefined || this.timer !== undefined) {
      return;
    }
    this.timer = setInterval(() => this.tick(), this.intervalMs);
    this.timer.unref();
    this.logger.info({ intervalMs: this.intervalMs }, "systemd watchdog pings started");
  }

  stop(): void {
    if (this.timer === undefined) {
      return;
    }
    clearInterval(this.timer);
    this.timer = undefined;
    this.logger.info("systemd watchdog pings stopped");
  }

  private tick(): void {
    let healthy: boolean;
    try {
      healthy = this.options.isHealthy();
    } catch (error) {
      this.logger.error({ err: error }, "watchdog health check threw; treating the agent as unhealthy");
      healthy = false;
    }

    if (healthy !== this.healthy) {
      this.healthy = healthy;
      if (healthy) {
        this.logger.info("agent healthy again; systemd watchdog pings resumed");
      } else {
        this.logger.warn("agent unhealthy; systemd watchdog pings paused, systemd restarts the service after WatchdogSec");
      }
    }
    if (healthy) {
      void this.notifier.watchdogPing();
    }
  }
}
