/**
 * Publishes model packages to the fleet. A published package is packed into one bundle and sent
 * to every device of the configured group on its `down/data` topic, with kind "model" and meta
 * {name, version, sha256 of model.onnx, deploy: true}. The device verifies, installs and deploys
 * it by itself.
 *
 * Delivery state lives in the trainer database, one row per model and device: pending, sending,
 * delivered, failed (the device rejected the bundle) or superseded (a newer model was published
 * first). A device gets its pending bundle while its status is online or paused. After a transfer
 * without progress the row returns to pending and is tried again on the device's next "online"
 * status or after `retryIntervalMs`. Rows left in "sending" by a stopped trainer return to pending
 * on start. The transfer id depends only on the version and the bundle bytes, so the device's
 * receiver replies to the repeated begin with the chunks it has stored, and the transfer resumes.
 */
import { createHash } from "node:crypto";

import type { Database } from "better-sqlite3";

import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { packBundle } from "../models/bundle.js";
import { readModelPackage } from "../models/manifest.js";
import type { MqttLink } from "../protocol/link.js";
import { deviceTopic } from "../protocol/topics.js";
import { TransferError, TransferSender } from "../protocol/transfer.js";
import { parseDeviceRef } from "./config.js";
import { isReachable, type DeviceStatusRecord, type DeviceTracker } from "./fleet.js";

/** A model the fleet runs or was sent. Times are milliseconds since the Unix epoch. */
export interface PublishedModel {
  id: number;
  name: string;
  version: string;
  /** Package folder on the trainer. */
  dir: string;
  /** Hex sha256 of the model file (manifest.json `file.sha256`). */
  modelSha256: string;
  /** "base": the package the fleet runs at first, recorded but never sent. "trained": a package the trainer built and sent. */
  source: "base" | "trained";
  runId: number | null;
  publishedAt: number;
}

export const DELIVERY_STATES = ["pending", "sending", "delivered", "failed", "superseded"] as const;
export type DeliveryState = (typeof DELIVERY_STATES)[number];

/** The delivery of one model to one device. */
export interface DeliveryRecord {
  modelId: number;
  version: string;
  site: string;
  device: string;
  state: DeliveryState;
  transferId: string | null;
  /** Transfers started for this delivery. */
  attempts: number;
  /** Reason of the last failed attempt, or of the device's rejection for state "failed". */
  error: string | null;
  createdAt: number;
  updatedAt: number;
  deliveredAt: number | null;
}

export interface PublisherOptions {
  link: MqttLink;
  /** Trainer state database with the `models` and `deliveries` tables. */
  db: Database;
  tracker: DeviceTracker;
  /** Devices that receive new models, as "site/device". */
  devices: readonly string[];
  logger?: Logger;
  /** Transfers running at once, to different devices (default 4). */
  maxConcurrent?: number;
  /** Wait before a device that stayed online is tried again after a failed attempt (default 60000 ms). */
  retryIntervalMs?: number;
  /** Bytes per transfer chunk (default 65536). */
  chunkSize?: number;
  /** Time without acknowledged progress before the sender sends begin again (default 10000 ms). */
  ackTimeoutMs?: number;
  /** Begin frames without progress before an attempt fails (default 5). */
  maxAttempts?: number;
  now?: () => number;
}

interface ModelRow {
  id: number;
  name: string;
  version: string;
  dir: string;
  model_sha256: string;
  source: "base" | "trained";
  run_id: number | null;
  published_at: number;
}

interface DeliveryRow {
  model_id: number;
  version: string;
  site: string;
  device: string;
  state: DeliveryState;
  transfer_id: string | null;
  attempts: number;
  error: string | null;
  created_at: number;
  updated_at: number;
  delivered_at: number | null;
  next_attempt_at: number;
}

function toModel(row: ModelRow): PublishedModel {
  return {
    id: row.id,
    name: row.name,
    version: row.version,
    dir: row.dir,
    modelSha256: row.model_sha256,
    source: row.source,
    runId: row.run_id,
    publishedAt: row.published_at,
  };
}

function toDelivery(row: DeliveryRow): DeliveryRecord {
  return {
    modelId: row.model_id,
    version: row.version,
    site: row.site,
    device: row.device,
    state: row.state,
    transferId: row.transfer_id,
    attempts: row.attempts,
    error: row.error,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    deliveredAt: row.delivered_at,
  };
}

/** Replaces characters that transfer ids and file names do not allow. */
function safeName(text: string, maxLength: number): string {
  return text.replace(/[^A-Za-z0-9._-]/g, "-").slice(0, maxLength);
}

const DELIVERY_SELECT = `SELECT d.*, m.version FROM deliveries d JOIN models m ON m.id = d.model_id`;

export class Publisher {
  private readonly db: Database;
  private readonly logger: Logger;
  private readonly now: () => number;
  private readonly sender: TransferSender;
  private readonly inFlight = new Map<string, Promise<void>>();
  private readonly maxConcurrent: number;
  private readonly retryIntervalMs: number;
  private bundle: { modelId: number; data: Buffer; sha256: string } | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private running = false;
  private readonly onStatus = (current: DeviceStatusRecord, previous: DeviceStatusRecord | undefined): void => {
    if (isReachable(current.state) && (previous === undefined || !isReachable(previous.state))) {
      // A device that came back gets its pending bundle at once, whatever its retry time.
      this.db
        .prepare("UPDATE deliveries SET next_attempt_at = 0 WHERE site = ? AND device = ? AND state = 'pending'")
        .run(current.site, current.device);
    }
    this.kick();
  };

  constructor(private readonly options: PublisherOptions) {
    this.db = options.db;
    this.logger = (options.logger ?? silentLogger).child({ component: "publisher" });
    this.now = options.now ?? Date.now;
    this.sender = new TransferSender({ link: options.link, logger: options.logger });
    this.maxConcurrent = options.maxConcurrent ?? 4;
    this.retryIntervalMs = options.retryIntervalMs ?? 60_000;
  }

  /**
   * Returns deliveries left in "sending" by a stopped trainer to pending and starts sending. The
   * tracker's status events then start the deliveries of devices that are online.
   */
  start(): void {
    if (this.running) {
      return;
    }
    this.running = true;
    const resumed = this.db.prepare("UPDATE deliveries SET state = 'pending', next_attempt_at = 0 WHERE state = 'sending'").run().changes;
    const pending = (this.db.prepare("SELECT count(*) AS n FROM deliveries WHERE state = 'pending'").get() as { n: number }).n;
    this.options.tracker.on("status", this.onStatus);
    this.retryTimer = setInterval(() => this.kick(), Math.min(this.retryIntervalMs, 60_000));
    this.retryTimer.unref();
    this.logger.info({ pending, resumed }, "publisher started");
    this.kick();
  }

  /** Stops the transfers in flight; their deliveries stay pending and resume after the next start. */
  async stop(): Promise<void> {
    if (!this.running) {
      return;
    }
    this.running = false;
    clearInterval(this.retryTimer);
    this.options.tracker.off("status", this.onStatus);
    await this.sender.close();
    await Promise.all(this.inFlight.values());
    this.logger.info("publisher stopped");
  }

  /** Records the package the fleet runs at first, unless a model is already recorded. Returns the current model. */
  async registerBase(dir: string): Promise<PublishedModel> {
    const current = this.current();
    if (current !== undefined) {
      return current;
    }
    const pkg = await readModelPackage(dir);
    this.db
      .prepare("INSERT INTO models (name, version, dir, model_sha256, source, run_id, published_at) VALUES (?, ?, ?, ?, 'base', NULL, ?)")
      .run(pkg.manifest.name, pkg.manifest.version, dir, pkg.manifest.file.sha256, this.now());
    this.logger.info({ name: pkg.manifest.name, version: pkg.manifest.version, dir }, "base model recorded");
    return this.current()!;
  }

  /** Returns the latest published model, or undefined before registerBase. */
  current(): PublishedModel | undefined {
    const row = this.db.prepare("SELECT * FROM models ORDER BY id DESC LIMIT 1").get() as ModelRow | undefined;
    return row === undefined ? undefined : toModel(row);
  }

  /** Returns every recorded model, newest first. */
  models(): PublishedModel[] {
    return (this.db.prepare("SELECT * FROM models ORDER BY id DESC").all() as ModelRow[]).map(toModel);
  }

  /** Returns the deliveries of one model, or of all models, newest model first. */
  deliveries(modelId?: number): DeliveryRecord[] {
    const rows =
      modelId === undefined
        ? this.db.prepare(`${DELIVERY_SELECT} ORDER BY d.model_id DESC, d.site, d.device`).all()
        : this.db.prepare(`${DELIVERY_SELECT} WHERE d.model_id = ? ORDER BY d.site, d.device`).all(modelId);
    return (rows as DeliveryRow[]).map(toDelivery);
  }

  /**
   * Records a signed package folder as the current model and queues it for every device of the
   * group. Pending deliveries of older models become superseded. Raises ModelLoadError for an
   * invalid manifest.
   */
  async publish(dir: string, runId: number | null = null): Promise<PublishedModel> {
    const pkg = await readModelPackage(dir);
    const now = this.now();
    const model = this.db.transaction((): PublishedModel => {
      const id = Number(
        this.db
          .prepare("INSERT INTO models (name, version, dir, model_sha256, source, run_id, published_at) VALUES (?, ?, ?, ?, 'trained', ?, ?)")
          .run(pkg.manifest.name, pkg.manifest.version, dir, pkg.manifest.file.sha256, runId, now).lastInsertRowid,
      );
      const superseded = this.db
        .prepare("UPDATE deliveries SET state = 'superseded', updated_at = ? WHERE state = 'pending' AND model_id <> ?")
        .run(now, id).changes;
      if (superseded > 0) {
        this.logger.info({ superseded, version: pkg.manifest.version }, "pending deliveries of older models superseded");
      }
      const insert = this.db.prepare(
        `INSERT INTO deliveries (model_id, site, device, state, attempts, created_at, updated_at, next_attempt_at)
         VALUES (?, ?, ?, 'pending', 0, ?, ?, 0)`,
      );
      for (const ref of new Set(this.options.devices)) {
        const { site, device } = parseDeviceRef(ref);
        insert.run(id, site, device, now, now);
      }
      return toModel(this.db.prepare("SELECT * FROM models WHERE id = ?").get(id) as ModelRow);
    })();
    this.logger.info({ name: model.name, version: model.version, dir, devices: this.options.devices.length }, "model published");
    this.kick();
    return model;
  }

  /** Starts pending deliveries to reachable devices, up to maxConcurrent at once. */
  kick(): void {
    if (!this.running) {
      return;
    }
    const rows = this.db
      .prepare(`${DELIVERY_SELECT} WHERE d.state = 'pending' AND d.next_attempt_at <= ? ORDER BY d.model_id, d.site, d.device`)
      .all(this.now()) as DeliveryRow[];
    for (const row of rows) {
      if (this.inFlight.size >= this.maxConcurrent) {
        return;
      }
      const key = `${row.site}/${row.device}`;
      if (this.inFlight.has(key)) {
        continue;
      }
      const status = this.options.tracker.get(row.site, row.device);
      if (status === undefined || !isReachable(status.state)) {
        continue;
      }
      const model = toModel(this.db.prepare("SELECT * FROM models WHERE id = ?").get(row.model_id) as ModelRow);
      if (status.model?.sha256 === model.modelSha256) {
        this.setState(row, "delivered", null);
        this.logger.info({ site: row.site, device: row.device, version: model.version }, "device already runs the model; delivery complete");
        continue;
      }
      const work = this.deliver(model, row).finally(() => {
        this.inFlight.delete(key);
        this.kick();
      });
      this.inFlight.set(key, work);
    }
  }

  private setState(row: Pick<DeliveryRow, "model_id" | "site" | "device">, state: DeliveryState, error: string | null, nextAttemptAt = 0): void {
    const now = this.now();
    this.db
      .prepare(
        `UPDATE deliveries SET state = ?, error = ?, updated_at = ?, next_attempt_at = ?,
           delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END
         WHERE model_id = ? AND site = ? AND device = ?`,
      )
      .run(state, error, now, nextAttemptAt, state, now, row.model_id, row.site, row.device);
  }

  private async bundleFor(model: PublishedModel): Promise<{ data: Buffer; sha256: string }> {
    if (this.bundle?.modelId !== model.id) {
      const data = await packBundle(model.dir);
      // Only the newest bundle is cached, since each contains a whole package in memory.
      this.bundle = { modelId: model.id, data, sha256: createHash("sha256").update(data).digest("hex") };
    }
    return this.bundle;
  }

  private async deliver(model: PublishedModel, row: DeliveryRow): Promise<void> {
    const { site, device } = row;
    const fields = { site, device, version: model.version };
    let bundle: { data: Buffer; sha256: string };
    try {
      bundle = await this.bundleFor(model);
    } catch (error) {
      this.setState(row, "failed", `cannot pack ${model.dir}: ${describeError(error)}`);
      this.logger.error({ ...fields, dir: model.dir, err: describeError(error) }, "packing the model bundle failed");
      return;
    }
    const transferId = `model-${safeName(model.version, 40)}-${bundle.sha256.slice(0, 12)}`;
    this.db
      .prepare(
        "UPDATE deliveries SET state = 'sending', transfer_id = ?, attempts = attempts + 1, updated_at = ? WHERE model_id = ? AND site = ? AND device = ?",
      )
      .run(transferId, this.now(), row.model_id, site, device);
    this.logger.info({ ...fields, transferId, bytes: bundle.data.length, attempt: row.attempts + 1 }, "sending model bundle");
    try {
      await this.sender.send({
        dataTopic: deviceTopic(site, device, "down/data"),
        ackTopic: deviceTopic(site, device, "down/ack"),
        transferId,
        kind: "model",
        name: `${safeName(`${model.name}-${model.version}`, 120)}.slpkg`,
        data: bundle.data,
        meta: { name: model.name, version: model.version, sha256: model.modelSha256, deploy: true },
        chunkSize: this.options.chunkSize,
        ackTimeoutMs: this.options.ackTimeoutMs,
        maxAttempts: this.options.maxAttempts,
      });
      this.setState(row, "delivered", null);
      this.logger.info({ ...fields, transferId }, "model bundle delivered");
    } catch (error) {
      const message = describeError(error);
      if (!this.running) {
        this.setState(row, "pending", null);
        return;
      }
      // The receiver replies "receiver busy: ..." while it runs its maximum of transfers, which a later attempt can fix.
      if (error instanceof TransferError && error.receiverError !== undefined && !error.receiverError.startsWith("receiver busy")) {
        this.setState(row, "failed", error.receiverError);
        this.logger.error({ ...fields, transferId, err: error.receiverError }, "device rejected the model bundle");
        return;
      }
      this.setState(row, "pending", message, this.now() + this.retryIntervalMs);
      this.logger.warn({ ...fields, transferId, err: message, retryInMs: this.retryIntervalMs }, "model bundle delivery failed; retrying later");
    }
  }
}
