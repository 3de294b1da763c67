/**
 * Drains the hard-example outbox to the trainer through an injected `send`. An item is deleted
 * only after its send resolved, which means the trainer acknowledged it. A failed send leaves the
 * item in the outbox, and the uplink retries after an exponential backoff with jitter.
 *
 * Two backoffs apply. After any failure, no send starts until the uplink backoff ends; it grows
 * with consecutive failures, as when the broker is down. The failed item is also held back for its
 * own backoff, which grows with that item's failures. Other items go first meanwhile, so one item
 * that the trainer keeps rejecting does not block the queue.
 */
import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { OutboxItem } from "./outbox.js";

/** The part of the outbox the uplink needs. */
export interface UplinkQueue {
  /** Returns the item to send next, skipping the ids in `exclude` (items in flight). */
  next(exclude: Iterable<number>): OutboxItem | undefined;
  /** Deletes a sent item; returns false when it was gone already. */
  ack(id: number): boolean;
}

/** Optional counters of the uplink. */
export interface UplinkMetrics {
  sent(item: OutboxItem): void;
  failed(item: OutboxItem | undefined, error: unknown): void;
}

export interface UplinkOptions {
  outbox: UplinkQueue;
  /** Sends one item and resolves only when the trainer acknowledged it. */
  send: (item: OutboxItem) => Promise<void>;
  /** Sends in flight at once, 1 or 2. Default 1. */
  concurrency?: 1 | 2;
  /** Backoff after the first failure, in milliseconds. Default 1000. */
  initialBackoffMs?: number;
  /** Upper bound of the backoff, in milliseconds. Default 300000 (5 minutes). */
  maxBackoffMs?: number;
  /** How often an empty outbox is checked again, in milliseconds; `drainNow` checks at once. Default 5000. */
  idlePollMs?: number;
  /**
   * A send that has not settled after this many milliseconds counts as failed and its item stays.
   * The send itself is not cancelled, so the trainer may receive the item twice. Default 120000.
   */
  sendTimeoutMs?: number;
  /** Source of the backoff jitter, values in [0, 1). Default Math.random. */
  random?: () => number;
  metrics?: UplinkMetrics;
  logger?: Logger;
}

export interface UplinkStats {
  /** Sends that resolved. */
  sent: number;
  /** Failed sends, acks and outbox reads. */
  failed: number;
  /** Failures since the last successful send. */
  consecutiveFailures: number;
  inFlight: number;
  /** Time of the next attempt while backing off, in milliseconds since the Unix epoch. */
  retryAt: number | undefined;
}

/** Items whose backoff the uplink tracks at most; the oldest entry is dropped beyond it. */
const MAX_HELD_ITEMS = 10_000;

/** Thrown into the failure path when a send exceeds sendTimeoutMs. */
export class SendTimeoutError extends Error {
  constructor(id: number, timeoutMs: number) {
    super(`send of outbox item ${id} did not settle within ${timeoutMs} ms`);
    this.name = "SendTimeoutError";
  }
}

function checkOptions(options: UplinkOptions): void {
  const checks: [string, number | undefined][] = [
    ["initialBackoffMs", options.initialBackoffMs],
    ["maxBackoffMs", options.maxBackoffMs],
    ["idlePollMs", options.idlePollMs],
    ["sendTimeoutMs", options.sendTimeoutMs],
  ];
  for (const [name, value] of checks) {
    if (value !== undefined && !(Number.isFinite(value) && value > 0)) {
      throw new RangeError(`uplink ${name} ${value} is invalid; expected a number of milliseconds > 0`);
    }
  }
  if (options.concurrency !== undefined && options.concurrency !== 1 && options.concurrency !== 2) {
    throw new RangeError(`uplink concurrency ${String(options.concurrency)} is invalid; expected 1 or 2`);
  }
}

/** Sends outbox items one or two at a time while started. */
export class Uplink {
  private readonly logger: Logger;
  private readonly concurrency: number;
  private readonly initialBackoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly idlePollMs: number;
  private readonly sendTimeoutMs: number;
  private readonly random: () => number;
  private readonly inFlight = new Map<number, Promise<void>>();
  /** Failed items by id: their failure count and the time before which they are not sent again. */
  private readonly held = new Map<number, { failures: number; until: number }>();
  private running = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private retryAt: number | undefined;
  private sent = 0;
  private failed = 0;
  private consecutiveFailures = 0;

  constructor(private readonly options: UplinkOptions) {
    checkOptions(options);
    this.logger = options.logger ?? silentLogger;
    this.concurrency = options.concurrency ?? 1;
    this.initialBackoffMs = options.initialBackoffMs ?? 1_000;
    this.maxBackoffMs = Math.max(this.initialBackoffMs, options.maxBackoffMs ?? 300_000);
    this.idlePollMs = options.idlePollMs ?? 5_000;
    this.sendTimeoutMs = options.sendTimeoutMs ?? 120_000;
    this.random = options.random ?? Math.random;
  }

  get stats(): UplinkStats {
    return {
      sent: this.sent,
      failed: this.failed,
      consecutiveFailures: this.consecutiveFailures,
      inFlight: this.inFlight.size,
      retryAt: this.retryAt,
    };
  }

  /** Starts sending. Calling it again has no effect. */
  start(): void {
    if (this.running) {
      return;
    }
    this.running = true;
    this.logger.info({ concurrency: this.concurrency }, "uplink started");
    this.pump();
  }

  /** Stops starting new sends and waits for the sends in flight, each bounded by sendTimeoutMs. */
  async stop(): Promise<void> {
    if (!this.running) {
      await Promise.all(this.inFlight.values());
      return;
    }
    this.running = false;
    this.clearTimers();
    await Promise.all(this.inFlight.values());
    this.logger.info({ sent: this.sent, failed: this.failed }, "uplink stopped");
  }

  /** Ends a backoff or idle wait and sends at once, for example after the broker reconnected. */
  drainNow(): void {
    if (!this.running) {
      return;
    }
    this.clearTimers();
    this.pump();
  }

  private clearTimers(): void {
    clearTimeout(this.retryTimer);
    clearTimeout(this.idleTimer);
    this.retryTimer = undefined;
    this.idleTimer = undefined;
    this.retryAt = undefined;
  }

  private pump(): void {
    if (!this.running || this.retryTimer !== undefined) {
      return;
    }
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    while (this.inFlight.size < this.concurrency) {
      const now = Date.now();
      const heldBack = [...this.held].filter(([, hold]) => hold.until > now).map(([id]) => id);
      let item: OutboxItem | undefined;
      try {
        item = this.options.outbox.next([...this.inFlight.keys(), ...heldBack]);
      } catch (error) {
        this.fail(undefined, error, "outbox read failed");
        return;
      }
      if (item === undefined) {
        if (this.inFlight.size === 0) {
          const release = Math.min(...heldBack.map((id) => this.held.get(id)!.until));
          this.idleTimer = setTimeout(() => this.pump(), Math.max(1, Math.min(this.idlePollMs, release - now)));
          this.idleTimer.unref();
        }
        return;
      }
      // sendOne removes the id from inFlight itself before it starts the next send.
      this.inFlight.set(item.id, this.sendOne(item));
    }
  }

  private async sendOne(item: OutboxItem): Promise<void> {
    try {
      await this.sendWithTimeout(item);
    } catch (error) {
      this.inFlight.delete(item.id);
      this.fail(item, error, "hard-example send failed; the item stays in the outbox");
      return;
    }
    this.inFlight.delete(item.id);
    this.sent++;
    this.options.metrics?.sent(item);
    try {
      this.options.outbox.ack(item.id);
    } catch (error) {
      // The trainer has the item, but it stays in the outbox and is sent again after the backoff.
      this.fail(item, error, "outbox ack failed after a successful send; the item will be sent again");
      return;
    }
    this.consecutiveFailures = 0;
    this.held.delete(item.id);
    this.pump();
  }

  private sendWithTimeout(item: OutboxItem): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new SendTimeoutError(item.id, this.sendTimeoutMs)), this.sendTimeoutMs);
    });
    const sending = Promise.resolve().then(() => this.options.send(item));
    return Promise.race([sending, timeout]).finally(() => clearTimeout(timer));
  }

  /** Counts a failed send, ack or read, logs it, and schedules the next attempt after the backoff. */
  private fail(item: OutboxItem | undefined, error: unknown, message: string): void {
    this.failed++;
    this.consecutiveFailures++;
    this.options.metrics?.failed(item, error);

    const delay = this.backoffMs(this.consecutiveFailures);
    let itemDelay: number | undefined;
    if (item) {
      itemDelay = this.holdItem(item.id);
    }
    this.logger.warn(
      {
        item: item?.id,
        frame: item?.meta.frameId,
        err: describeError(error),
        failures: this.consecutiveFailures,
        retryInMs: Math.round(delay),
        itemRetryInMs: itemDelay === undefined ? undefined : Math.round(itemDelay),
      },
      message,
    );

    if (!this.running || this.retryTimer !== undefined) {
      return;
    }
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.retryAt = undefined;
      this.pump();
    }, delay);
    this.retryTimer.unref();
  }

  /** Holds a failed item back for its own backoff and returns that delay. */
  private holdItem(id: number): number {
    const failures = (this.held.get(id)?.failures ?? 0) + 1;
    const delay = this.backoffMs(failures);
    this.held.delete(id);
    this.held.set(id, { failures, until: Date.now() + delay });
    if (this.held.size > MAX_HELD_ITEMS) {
      this.held.delete(this.held.keys().next().value!);
    }
    return delay;
  }

  /** Equal jitter: a random delay between half and all of initial * 2^(failures - 1), capped at maxBackoffMs. */
  private backoffMs(failures: number): number {
    const exponent = Math.min(failures - 1, 30);
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** exponent);
    return ceiling / 2 + (this.random() * ceiling) / 2;
  }
}
