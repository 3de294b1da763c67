/**
 * The trainer's view of the fleet: device statuses from the retained `status` messages, and
 * signed commands to one device for `sortline fleet`.
 */
import { EventEmitter } from "node:events";

import type { Database } from "better-sqlite3";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { CommandClient } from "../protocol/commands.js";
import type { MqttLink, Unsubscribe } from "../protocol/link.js";
import { decodeStatusMessage, type CommandReply, type DeviceState, type ModelInfo } from "../protocol/messages.js";
import { parseDeviceTopic, fleetPattern } from "../protocol/topics.js";
import type { SigningKey } from "./config.js";

/** The last status of one device. Times are milliseconds since the Unix epoch. */
export interface DeviceStatusRecord {
  site: string;
  device: string;
  state: DeviceState;
  model: ModelInfo | null;
  agentVersion: string | null;
  /** The `at` field of the status message, set by the device's clock. */
  statusAt: number;
  /** When the trainer received the status, by the trainer's clock. */
  receivedAt: number;
  stats: Record<string, unknown> | null;
}

/** True for the states in which a device is connected and receives transfers and commands. */
export function isReachable(state: DeviceState): boolean {
  return state === "online" || state === "paused";
}

interface DeviceRow {
  site: string;
  device: string;
  state: DeviceState;
  model_json: string | null;
  agent_version: string | null;
  status_at: number;
  received_at: number;
  stats_json: string | null;
}

function toRecord(row: DeviceRow): DeviceStatusRecord {
  return {
    site: row.site,
    device: row.device,
    state: row.state,
    model: row.model_json === null ? null : (JSON.parse(row.model_json) as ModelInfo),
    agentVersion: row.agent_version,
    statusAt: row.status_at,
    receivedAt: row.received_at,
    stats: row.stats_json === null ? null : (JSON.parse(row.stats_json) as Record<string, unknown>),
  };
}

interface TrackerEvents {
  /** A status arrived; `previous` is the record before it, undefined for a device seen the first time. */
  status: [current: DeviceStatusRecord, previous: DeviceStatusRecord | undefined];
}

export interface DeviceTrackerOptions {
  link: MqttLink;
  /** Trainer state database with the `devices` table; without it the tracker keeps statuses in memory only. */
  db?: Database;
  logger?: Logger;
  now?: () => number;
}

/**
 * Subscribes to `sortline/v1/+/+/status` and keeps the latest status of every device. Statuses
 * are retained, so the broker sends each device's last one right after the subscription.
 */
export class DeviceTracker extends EventEmitter<TrackerEvents> {
  private readonly devices = new Map<string, DeviceStatusRecord>();
  private readonly logger: Logger;
  private readonly now: () => number;
  private unsubscribe: Unsubscribe | undefined;
  private invalidLogged = 0;

  constructor(private readonly options: DeviceTrackerOptions) {
    super();
    this.logger = (options.logger ?? silentLogger).child({ component: "device-tracker" });
    this.now = options.now ?? Date.now;
    const rows = (options.db?.prepare("SELECT * FROM devices").all() ?? []) as DeviceRow[];
    for (const row of rows) {
      this.devices.set(`${row.site}/${row.device}`, toRecord(row));
    }
  }

  async start(): Promise<void> {
    this.unsubscribe ??= await this.options.link.subscribe(fleetPattern("status"), (topic, payload) => this.onStatus(topic, payload));
  }

  async stop(): Promise<void> {
    const unsubscribe = this.unsubscribe;
    this.unsubscribe = undefined;
    await unsubscribe?.().catch((error: unknown) => this.logger.warn({ err: describeError(error) }, "unsubscribing from device statuses failed"));
  }

  /** Returns the devices sorted by site and device name. */
  list(): DeviceStatusRecord[] {
    return [...this.devices.values()].sort((a, b) => a.site.localeCompare(b.site) || a.device.localeCompare(b.device));
  }

  get(site: string, device: string): DeviceStatusRecord | undefined {
    return this.devices.get(`${site}/${device}`);
  }

  private onStatus(topic: string, payload: Buffer): void {
    if (payload.length === 0) {
      // An empty retained message deletes the retained status; the device record stays.
      return;
    }

    const parsed = parseDeviceTopic(topic);
    const decoded = decodeStatusMessage(payload);
    if (parsed === undefined || !decoded.ok || decoded.value.site !== parsed.site || decoded.value.device !== parsed.device) {
      this.invalidLogged++;
      // The first invalid status and then every 100th are logged, so a broken device cannot flood the log.
      if (this.invalidLogged % 100 === 1) {
        const err = decoded.ok ? "site or device differs from the topic" : decoded.error;
        this.logger.warn({ topic, err, invalidStatuses: this.invalidLogged }, "ignoring an invalid device status");
      }
      return;
    }

    const status = decoded.value;
    const record: DeviceStatusRecord = {
      site: status.site,
      device: status.device,
      state: status.state,
      model: status.model ?? null,
      agentVersion: status.agentVersion ?? null,
      statusAt: status.at,
      receivedAt: this.now(),
      stats: status.stats ?? null,
    };
    const key = `${record.site}/${record.device}`;
    const previous = this.devices.get(key);
    this.devices.set(key, record);

    this.options.db
      ?.prepare(
        `INSERT INTO devices (site, device, state, model_json, agent_version, status_at, received_at, stats_json)
         VALUES (@site, @device, @state, @model_json, @agent_version, @status_at, @received_at, @stats_json)
         ON CONFLICT (site, device) DO UPDATE SET state = excluded.state, model_json = excluded.model_json,
           agent_version = excluded.agent_version, status_at = excluded.status_at, received_at = excluded.received_at,
           stats_json = excluded.stats_json`,
      )
      .run({
        site: record.site,
        device: record.device,
        state: record.state,
        model_json: record.model === null ? null : JSON.stringify(record.model),
        agent_version: record.agentVersion,
        status_at: record.statusAt,
        received_at: record.receivedAt,
        stats_json: record.stats === null ? null : JSON.stringify(record.stats),
      });

    if (previous?.state !== record.state) {
      this.logger.info({ site: record.site, device: record.device, state: record.state, model: record.model?.version }, "device state changed");
    }
    this.emit("status", record, previous);
  }
}

/** A `sortline fleet` command line that cannot be turned into command arguments. */
export class FleetUsageError extends SortlineError {}

/**
 * Builds command arguments from `key=value` words, or from one JSON object. A value that parses
 * as JSON (numbers, true, false, null, quoted strings, arrays, objects) is used as parsed, any
 * other value as a string. Keys stay as written, so dotted keys of `set-config` stay flat.
 */
export function parseCommandArgs(words: readonly string[], json?: string): Record<string, unknown> {
  if (json !== undefined) {
    if (words.length > 0) {
      throw new FleetUsageError(`give the arguments either as key=value words or with --json, not both (got ${words.join(" ")})`);
    }
    let value: unknown;
    try {
      value = JSON.parse(json);
    } catch (error) {
      throw new FleetUsageError(`--json is not valid JSON: ${describeError(error)}`);
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new FleetUsageError("--json must be a JSON object, for example '{\"version\": \"1.1.0\"}'");
    }
    return value as Record<string, unknown>;
  }
  const args: Record<string, unknown> = {};
  for (const word of words) {
    const separator = word.indexOf("=");
    if (separator <= 0) {
      throw new FleetUsageError(`argument '${word}' is not key=value`);
    }
    const key = word.slice(0, separator);
    const text = word.slice(separator + 1);
    let value: unknown = text;
    try {
      value = JSON.parse(text);
    } catch {
      // Not JSON, so the text is the value.
    }
    args[key] = value;
  }
  return args;
}

export interface FleetCommandRequest {
  link: MqttLink;
  signingKey: SigningKey;
  site: string;
  device: string;
  command: string;
  args: Record<string, unknown>;
  timeoutMs: number;
  logger?: Logger;
}

/**
 * Sends one command signed with the trainer key and resolves with the device's reply, also when
 * the reply is an error. Rejects with CommandTimeoutError when no reply arrives in time.
 */
export async function sendFleetCommand(request: FleetCommandRequest): Promise<CommandReply> {
  const client = new CommandClient({
    link: request.link,
    signingKey: { keyId: request.signingKey.keyId, privateKey: request.signingKey.privateKeyPem },
    logger: request.logger,
  });
  try {
    return await client.request(request.site, request.device, request.command, request.args, { timeoutMs: request.timeoutMs });
  } finally {
    await client.close();
  }
}

/**
 * Collects the retained statuses of the fleet. The broker sends them right after the
 * subscription; the function waits `settleMs` after the last one arrived, at most `maxWaitMs`.
 */
export async function collectFleetStatuses(link: MqttLink, options: { settleMs?: number; maxWaitMs?: number } = {}): Promise<DeviceStatusRecord[]> {
  const tracker = new DeviceTracker({ link });
  const settleMs = options.settleMs ?? 500;
  const deadline = Date.now() + (options.maxWaitMs ?? 5_000);
  let last = Date.now();
  tracker.on("status", () => {
    last = Date.now();
  });
  await tracker.start();
  last = Date.now();
  while (Date.now() - last < settleMs && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await tracker.stop();
  return tracker.list();
}
