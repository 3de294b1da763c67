/**
 * The central trainer service (`sortline trainer`): receives hard examples from the fleet into
 * the catalogue, serves the review page, tracks device statuses, retrains and publishes models.
 *
 * State under the data folder: `trainer.db` (devices, published models, deliveries, training
 * runs; SQLite in WAL mode with synchronous=FULL), `catalogue/` (examples and labels),
 * `uploads/` (transfers in progress), `runs/` and `models/` (see training.ts).
 */
import { mkdir, readFile } from "node:fs/promises";
import path from "node:path";

import Database from "better-sqlite3";

import { resolveSecret } from "../config/load.js";
import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { readModelPackage } from "../models/manifest.js";
import { MqttLink } from "../protocol/link.js";
import { fleetPattern } from "../protocol/topics.js";
import { TransferReceiver, type BeginHeader, type TransferSource } from "../protocol/transfer.js";
import { Catalogue, CatalogueInputError, DEFAULT_MAX_IMAGE_BYTES, type ExampleMeta } from "./catalogue.js";
import { loadSigningKey, parseDeviceRef, resolveTlsFiles, type TrainerConfig } from "./config.js";
import { DeviceTracker, isReachable, type DeviceStatusRecord } from "./fleet.js";
import { Publisher, type PublisherOptions } from "./publisher.js";
import { ReviewServer, type ApiRoute } from "./review.js";
import { Retrainer } from "./training.js";

/** Transfer kind of a hard example on `up/data`. */
export const EXAMPLE_KIND = "example";

const STATE_MIGRATIONS: readonly { version: number; sql: string }[] = [
  {
    version: 1,
    sql: `
      CREATE TABLE devices (
        site           TEXT    NOT NULL,
        device         TEXT    NOT NULL,
        state          TEXT    NOT NULL,
        model_json     TEXT,
        agent_version  TEXT,
        status_at      INTEGER NOT NULL,
        received_at    INTEGER NOT NULL,
        stats_json     TEXT,
        PRIMARY KEY (site, device)
      ) WITHOUT ROWID;
      CREATE TABLE models (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        name          TEXT    NOT NULL,
        version       TEXT    NOT NULL,
        dir           TEXT    NOT NULL,
        model_sha256  TEXT    NOT NULL,
        source        TEXT    NOT NULL CHECK (source IN ('base', 'trained')),
        run_id        INTEGER,
        published_at  INTEGER NOT NULL
      );
      CREATE TABLE deliveries (
        model_id         INTEGER NOT NULL REFERENCES models (id),
        site             TEXT    NOT NULL,
        device           TEXT    NOT NULL,
        state            TEXT    NOT NULL CHECK (state IN ('pending', 'sending', 'delivered', 'failed', 'superseded')),
        transfer_id      TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        error            TEXT,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        delivered_at     INTEGER,
        next_attempt_at  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model_id, site, device)
      );
      CREATE INDEX deliveries_state ON deliveries (state, next_attempt_at);
      CREATE TABLE runs (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        trigger             TEXT    NOT NULL,
        status              TEXT    NOT NULL CHECK (status IN ('running', 'published', 'rejected', 'failed')),
        step                TEXT    NOT NULL,
        version             TEXT,
        started_at          INTEGER NOT NULL,
        finished_at         INTEGER,
        labelled_at_start   INTEGER NOT NULL,
        examples            INTEGER,
        candidate_dir       TEXT,
        model_dir           TEXT,
        bytes               INTEGER,
        train_json          TEXT,
        verdict_json        TEXT,
        baseline_accuracy   REAL,
        candidate_accuracy  REAL,
        error               TEXT,
        log_tail_json       TEXT
      );
    `,
  },
];

/**
 * Opens `<dataDir>/trainer.db`, creating it and applying schema steps as needed. Raises
 * SortlineError for a database written by a newer build.
 */
export function openStateDb(dataDir: string): Database.Database {
  const file = path.join(dataDir, "trainer.db");
  const db = new Database(file);
  try {
    db.pragma("journal_mode = WAL");
    db.pragma("synchronous = FULL");
    db.pragma("busy_timeout = 5000");
    db.pragma("foreign_keys = ON");
    const current = db.pragma("user_version", { simple: true }) as number;
    const latest = STATE_MIGRATIONS.at(-1)!.version;
    if (current > latest) {
      throw new SortlineError(`${file} has schema version ${current}, newer than this build's ${latest}; run a newer sortline`);
    }
    for (const migration of STATE_MIGRATIONS.filter((step) => step.version > current)) {
      db.transaction(() => {
        db.exec(migration.sql);
        db.pragma(`user_version = ${migration.version}`);
      })();
    }
  } catch (error) {
    db.close();
    throw error;
  }
  return db;
}

/** Converts the begin meta of a hard example into catalogue metadata. Raises CatalogueInputError. */
export function exampleMetaFrom(meta: Record<string, unknown>, site: string, device: string): ExampleMeta {
  const model = meta.model as { name?: unknown; version?: unknown } | undefined;
  if (model === null || typeof model !== "object") {
    throw new CatalogueInputError("example meta has no model {name, version, sha256}");
  }
  let embedding: Float32Array | undefined;
  if (meta.embedding !== undefined && meta.embedding !== null) {
    if (typeof meta.embedding !== "string") {
      throw new CatalogueInputError("example meta embedding must be a base64 string of float32 values");
    }
    const bytes = Buffer.from(meta.embedding, "base64");
    if (bytes.length === 0 || bytes.length % 4 !== 0) {
      throw new CatalogueInputError(`example meta embedding has ${bytes.length} bytes; expected a non-empty multiple of 4 (float32 values)`);
    }
    // Copy into a fresh buffer, because a Float32Array view needs a 4-byte-aligned offset.
    embedding = new Float32Array(new Uint8Array(bytes).buffer);
  }
  return {
    site,
    device,
    frameId: meta.frameId as string,
    capturedAt: meta.capturedAt as number | string,
    modelName: model.name as string,
    modelVersion: model.version as string,
    reasons: meta.reasons as string[],
    priority: meta.priority as number,
    top: meta.top as ExampleMeta["top"],
    predicted: (meta.predicted as string | null | undefined) ?? null,
    truth: (meta.truth as string | null | undefined) ?? null,
    embedding,
  };
}

/** A device of the fleet as `/api/fleet` returns it. */
export interface FleetDevice {
  site: string;
  device: string;
  /** Configured groups that list the device. */
  groups: string[];
  reachable: boolean;
  /** The last status, or null for a configured device that never sent one. */
  status: DeviceStatusRecord | null;
}

export interface TrainerServiceOptions {
  config: TrainerConfig;
  logger?: Logger;
  /** Environment for secret references (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Transfer and retry settings of the publisher. */
  publisher?: Pick<PublisherOptions, "maxConcurrent" | "retryIntervalMs" | "chunkSize" | "ackTimeoutMs" | "maxAttempts">;
  /** How often the retrain trigger is checked (default 60000 ms). */
  retrainCheckIntervalMs?: number;
}

export class TrainerService {
  private readonly config: TrainerConfig;
  private readonly logger: Logger;
  private db: Database.Database | undefined;
  private link: MqttLink | undefined;
  private receiver: TransferReceiver | undefined;
  private review: ReviewServer | undefined;
  private catalogueInstance: Catalogue | undefined;
  private trackerInstance: DeviceTracker | undefined;
  private publisherInstance: Publisher | undefined;
  private retrainerInstance: Retrainer | undefined;

  constructor(private readonly options: TrainerServiceOptions) {
    this.config = options.config;
    this.logger = options.logger ?? silentLogger;
  }

  get catalogue(): Catalogue {
    return this.require(this.catalogueInstance);
  }

  get tracker(): DeviceTracker {
    return this.require(this.trackerInstance);
  }

  get publisher(): Publisher {
    return this.require(this.publisherInstance);
  }

  get retrainer(): Retrainer {
    return this.require(this.retrainerInstance);
  }

  /** The review server's bound port after start(). */
  get reviewPort(): number | undefined {
    return this.review?.port;
  }

  private require<T>(value: T | undefined): T {
    if (value === undefined) {
      throw new SortlineError("the trainer service is not started");
    }
    return value;
  }

  /**
   * Opens the state, starts the review server, connects to the broker and starts receiving,
   * tracking, publishing and retraining. Resolves once the broker connection is up. Rejects when
   * the broker refuses the connection, or when a secret, the base model or the data folder is unusable.
   */
  async start(): Promise<void> {
    const { config } = this;
    const env = this.options.env ?? process.env;
    try {
      const signingKey = await loadSigningKey(config, env);
      const token = config.review.token === undefined ? undefined : await resolveSecret(config.review.token, "review.token", env);
      const password = config.broker.password === undefined ? undefined : await resolveSecret(config.broker.password, "broker.password", env);
      const tls = resolveTlsFiles(config, env);
      const base = await readModelPackage(config.base.model);

      await mkdir(config.dataDir, { recursive: true });
      this.db = openStateDb(config.dataDir);
      this.catalogueInstance = Catalogue.open(path.join(config.dataDir, "catalogue"), { baseClasses: base.manifest.labels, logger: this.logger });

      this.link = new MqttLink({
        url: config.broker.url,
        role: "trainer",
        clientId: config.broker.clientId,
        protocolVersion: config.broker.protocolVersion,
        tls,
        username: config.broker.username,
        password,
        logger: this.logger,
      });
      this.trackerInstance = new DeviceTracker({ link: this.link, db: this.db, logger: this.logger });
      const devices = config.fleet.groups[config.fleet.publishTo]!;
      this.publisherInstance = new Publisher({ ...this.options.publisher, link: this.link, db: this.db, tracker: this.trackerInstance, devices, logger: this.logger });
      await this.publisherInstance.registerBase(config.base.model);
      this.retrainerInstance = new Retrainer({
        config,
        catalogue: this.catalogueInstance,
        publisher: this.publisherInstance,
        db: this.db,
        signingKey,
        logger: this.logger,
        checkIntervalMs: this.options.retrainCheckIntervalMs,
        env,
      });

      this.review = new ReviewServer({ catalogue: this.catalogueInstance, host: config.review.host, port: config.review.port, token, logger: this.logger, routes: this.routes() });
      await this.review.start();

      // connect() creates the client at once, so the subscriptions below are sent with the first CONNECT.
      const connected = this.link.connect();
      this.receiver = new TransferReceiver({
        link: this.link,
        dataTopic: fleetPattern("up/data"),
        dir: path.join(config.dataDir, "uploads"),
        maxBytes: DEFAULT_MAX_IMAGE_BYTES,
        maxConcurrent: 16,
        onComplete: (file, begin, source) => this.storeExample(file, begin, source),
        logger: this.logger,
      });
      await this.receiver.start();
      await this.trackerInstance.start();
      await connected;
      this.publisherInstance.start();
      this.retrainerInstance.start();
      this.logger.info(
        { dataDir: config.dataDir, broker: config.broker.url, reviewPort: this.review.port, keyId: signingKey.keyId, publishTo: config.fleet.publishTo, devices: devices.length },
        "trainer started",
      );
    } catch (error) {
      await this.stop().catch((stopError: unknown) => this.logger.warn({ err: describeError(stopError) }, "cleanup after a failed start failed"));
      throw error;
    }
  }

  /** Stops retraining and deliveries, closes the broker link, the review server and the databases. */
  async stop(): Promise<void> {
    const steps: [string, (() => Promise<void> | void) | undefined][] = [
      ["retrainer", this.retrainerInstance && (() => this.retrainerInstance!.stop())],
      ["publisher", this.publisherInstance && (() => this.publisherInstance!.stop())],
      ["receiver", this.receiver && (() => this.receiver!.close())],
      ["tracker", this.trackerInstance && (() => this.trackerInstance!.stop())],
      ["link", this.link && (() => this.link!.close())],
      ["review server", this.review && (() => this.review!.stop())],
      ["catalogue", this.catalogueInstance && (() => this.catalogueInstance!.close())],
      ["state database", this.db && (() => this.db!.close())],
    ];
    for (const [name, stop] of steps) {
      try {
        await stop?.();
      } catch (error) {
        this.logger.warn({ component: name, err: describeError(error) }, "stopping a trainer component failed");
      }
    }
    this.retrainerInstance = undefined;
    this.publisherInstance = undefined;
    this.receiver = undefined;
    this.trackerInstance = undefined;
    this.link = undefined;
    this.review = undefined;
    this.catalogueInstance = undefined;
    this.db = undefined;
    this.logger.info("trainer stopped");
  }

  /**
   * Stores an uploaded hard example. A throw makes the receiver acknowledge "failed" with the
   * message, so the device drops the example instead of sending it again.
   */
  private async storeExample(file: string, begin: BeginHeader, source: TransferSource): Promise<void> {
    const fields = { site: source.site, device: source.device, transferId: begin.transferId, frameId: begin.meta.frameId };
    try {
      if (begin.kind !== EXAMPLE_KIND) {
        throw new CatalogueInputError(`unexpected transfer kind '${begin.kind}' on up/data; expected '${EXAMPLE_KIND}'`);
      }
      if (source.site === undefined || source.device === undefined) {
        throw new CatalogueInputError(`topic ${source.dataTopic} names no site and device`);
      }
      const meta = exampleMetaFrom(begin.meta, source.site, source.device);
      const result = this.catalogue.add(await readFile(file), meta);
      this.logger.info({ ...fields, sha256: result.sha256, duplicate: result.duplicate }, "hard example stored");
    } catch (error) {
      this.logger.error({ ...fields, err: describeError(error) }, "hard example rejected");
      throw error;
    }
  }

  /** Returns the configured and the seen devices with their groups and last status. */
  fleet(): FleetDevice[] {
    const devices = new Map<string, FleetDevice>();
    for (const [group, refs] of Object.entries(this.config.fleet.groups)) {
      for (const ref of refs) {
        const entry = devices.get(ref) ?? { ...parseDeviceRef(ref), groups: [], reachable: false, status: null };
        entry.groups.push(group);
        devices.set(ref, entry);
      }
    }
    for (const status of this.tracker.list()) {
      const ref = `${status.site}/${status.device}`;
      const entry = devices.get(ref) ?? { site: status.site, device: status.device, groups: [], reachable: false, status: null };
      entry.status = status;
      entry.reachable = isReachable(status.state);
      devices.set(ref, entry);
    }
    return [...devices.values()].sort((a, b) => a.site.localeCompare(b.site) || a.device.localeCompare(b.device));
  }

  private routes(): ApiRoute[] {
    return [
      { method: "GET", path: "/api/fleet", handle: () => ({ status: 200, body: { devices: this.fleet() } }) },
      {
        method: "GET",
        path: "/api/models",
        handle: () => ({
          status: 200,
          body: {
            current: this.publisher.current() ?? null,
            models: this.publisher.models().map((model) => ({ ...model, deliveries: this.publisher.deliveries(model.id) })),
          },
        }),
      },
      { method: "GET", path: "/api/runs", handle: () => ({ status: 200, body: { active: this.retrainer.active ?? null, runs: this.retrainer.runs() } }) },
      {
        method: "POST",
        path: "/api/retrain",
        handle: () => {
          const result = this.retrainer.retrain("manual");
          if (!result.started) {
            return { status: 409, body: { error: `training run ${result.run.id} is in progress; retry when it has finished`, run: result.run } };
          }
          return { status: 202, body: { run: result.run } };
        },
      },
    ];
  }
}
