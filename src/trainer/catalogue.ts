/**
 * The trainer's catalogue of hard examples: camera frames that edge models were unsure about, the
 * labels people gave them, and which examples went into which model.
 *
 * Layout under the data folder: `catalogue.db` (SQLite in WAL mode with synchronous=FULL, so a
 * committed label survives power loss on a disk that honours fsync) and
 * `examples/<first two hex digits>/<sha256>.jpg`. Each image is written to a temporary file, synced
 * and renamed before its row is inserted, so every row has a complete image file. A crash between the
 * two steps leaves an image without a row, which the next `add` of the same bytes overwrites.
 */
import { randomBytes, createHash } from "node:crypto";
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from "node:fs";
import path from "node:path";

import Database from "better-sqlite3";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { formatCsvRow, readLabelsCsv, type ExampleKey, type LabelsCsvRowError } from "./labels-csv.js";
import { rankByTypicality } from "../mining/ranking.js";

/** Examples considered by the "typical" order, highest priority first; the ranking costs O(n^2). */
const TYPICAL_POOL = 2000;

/** Base class of the catalogue's own errors. */
export class CatalogueError extends SortlineError {}

/** The catalogue database cannot be opened: not SQLite, unreadable, or a schema newer than this build. */
export class CatalogueOpenError extends CatalogueError {
  constructor(
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
  }
}

/** An argument the catalogue rejects: invalid metadata, bytes that are not a JPEG, a malformed sha256. */
export class CatalogueInputError extends CatalogueError {}

/** An image larger than the catalogue's `maxImageBytes`. */
export class ExampleTooLargeError extends CatalogueInputError {
  constructor(
    readonly bytes: number,
    readonly maxBytes: number,
  ) {
    super(`image of ${bytes} bytes is larger than the limit of ${maxBytes} bytes`);
  }
}

/** A label that is not one of the catalogue's classes. `known` lists the classes in effect. */
export class UnknownClassError extends CatalogueInputError {
  constructor(
    readonly label: string,
    readonly known: readonly string[],
  ) {
    super(`unknown class '${label}'; known classes: ${known.join(", ")}. Add the class first`);
  }
}

/** A class name that does not match CLASS_NAME_PATTERN or is reserved. */
export class InvalidClassNameError extends CatalogueInputError {}

/** No example with this sha256 is in the catalogue. */
export class ExampleNotFoundError extends CatalogueError {
  constructor(readonly sha256: string) {
    super(`example ${sha256} not found`);
  }
}

/** Class names: a lower-case letter, then up to 31 lower-case letters, digits, '_' or '-'. */
export const CLASS_NAME_PATTERN = /^[a-z][a-z0-9_-]{0,31}$/;

/** The label that discards an example in a labels file, so it cannot be a class name. */
export const DISCARD_LABEL = "discard";

export const EXAMPLE_STATUSES = ["pending", "labelled", "discarded"] as const;
export type ExampleStatus = (typeof EXAMPLE_STATUSES)[number];

/** Default of `maxImageBytes`: 8 MiB, several times a full-HD JPEG frame. */
export const DEFAULT_MAX_IMAGE_BYTES = 8 * 1024 * 1024;
/** Default and maximum page size of `list`. */
export const DEFAULT_LIST_LIMIT = 50;
export const MAX_LIST_LIMIT = 500;

const SHA256_PATTERN = /^[0-9a-f]{64}$/;
const MAX_TEXT_LENGTH = 200;
const MAX_REASONS = 16;
const MAX_TOP = 32;
const MAX_EMBEDDING_LENGTH = 16_384;
const BUSY_TIMEOUT_MS = 5_000;

/** One class probability of the edge model, p from 0 to 1. */
export interface ClassScore {
  label: string;
  p: number;
}

/** Metadata that the edge device sends with a hard example. */
export interface ExampleMeta {
  site: string;
  device: string;
  frameId: string;
  /** Capture time, in milliseconds since the Unix epoch or as an ISO 8601 string. */
  capturedAt: number | string;
  modelName: string;
  modelVersion: string;
  /** Selection reasons of the edge, for example low-confidence, small-margin, novelty, reject, random. */
  reasons: string[];
  /** Higher values are reviewed first. */
  priority: number;
  top: ClassScore[];
  predicted: string | null;
  /** A label known at capture time, set only for replayed data sets. Stored, never shown to reviewers. */
  truth?: string | null;
  embedding?: Float32Array;
}

/** A catalogue row. Times are milliseconds since the Unix epoch. */
export interface ExampleRecord {
  sha256: string;
  site: string;
  device: string;
  frameId: string;
  capturedAt: number;
  receivedAt: number;
  lastSeenAt: number;
  /** How many times the same image bytes were added. */
  seen: number;
  bytes: number;
  modelName: string;
  modelVersion: string;
  reasons: string[];
  priority: number;
  top: ClassScore[];
  predicted: string | null;
  truth: string | null;
  hasEmbedding: boolean;
  status: ExampleStatus;
  label: string | null;
  /** Name of the reviewer who labelled or discarded the example. */
  reviewedBy: string | null;
  reviewedAt: number | null;
}

export interface AddResult {
  sha256: string;
  /** True when the same bytes were already catalogued; the first metadata is kept. */
  duplicate: boolean;
}

export interface ListOptions {
  status?: ExampleStatus | "all";
  limit?: number;
  offset?: number;
  /** priority: highest priority first, then oldest received. received: newest received first. */
  /**
   * "priority" (highest first), "received" (newest first) or "typical": the most typical example
   * of each of `offset + limit` clusters of the examples' embeddings (rankByTypicality), which
   * spreads a labelling round over the groups in the pool. Examples without an embedding follow
   * in priority order.
   */
  order?: "priority" | "received" | "typical";
}

export interface ImportOptions {
  /** Adds labels that are not yet classes as new classes; otherwise such rows are errors. */
  addClasses?: boolean;
}

export interface ImportResult {
  /** Rows that labelled or discarded an example. */
  applied: number;
  /** Keys of rows whose example is not in the catalogue: the sha256, or `device/frame_id` or the frame id. */
  unknownExamples: string[];
  errors: LabelsCsvRowError[];
  /** Classes created by this import. */
  addedClasses: string[];
}

export interface ExportOptions {
  /** ISO 8601 time: only examples labelled at or after it are written. */
  since?: string;
}

export interface ExportResult {
  rows: number;
  perClass: Record<string, number>;
}

export interface TrainingRecord {
  id: number;
  modelVersion: string;
  trainedAt: number;
  examples: number;
}

export interface DeviceStats {
  site: string;
  device: string;
  pending: number;
  labelled: number;
  discarded: number;
  /** Adds of this device's examples, duplicates included. */
  seen: number;
}

export interface CatalogueStats {
  total: number;
  byStatus: Record<ExampleStatus, number>;
  /** Labelled examples per label. */
  byLabel: Record<string, number>;
  lastTraining: TrainingRecord | null;
  /** Examples labelled after the last markTrained call, or all labelled ones before the first. */
  labelledSinceLastTraining: number;
  devices: DeviceStats[];
}

export interface CatalogueOptions {
  /** The classes of the current model; `addClass` adds more. */
  baseClasses: readonly string[];
  logger?: Logger;
  /** Largest accepted image (default DEFAULT_MAX_IMAGE_BYTES). */
  maxImageBytes?: number;
  /** Clock in milliseconds since the Unix epoch (default Date.now). */
  now?: () => number;
}

interface Migration {
  version: number;
  description: string;
  sql: string;
}

/**
 * Schema steps in order. Append new steps and never edit a released one. Times are milliseconds
 * since the Unix epoch. `training_epoch` is the id of the latest training when the example was
 * reviewed (0 before the first), which counts labels since the last training without comparing clocks.
 */
const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    description: "create the examples, classes and trainings tables",
    sql: `
      CREATE TABLE examples (
        sha256          TEXT    PRIMARY KEY,
        site            TEXT    NOT NULL,
        device          TEXT    NOT NULL,
        frame_id        TEXT    NOT NULL,
        captured_at     INTEGER NOT NULL,
        received_at     INTEGER NOT NULL,
        last_seen_at    INTEGER NOT NULL,
        seen            INTEGER NOT NULL DEFAULT 1,
        bytes           INTEGER NOT NULL,
        model_name      TEXT    NOT NULL,
        model_version   TEXT    NOT NULL,
        reasons_json    TEXT    NOT NULL,
        priority        REAL    NOT NULL,
        top_json        TEXT    NOT NULL,
        predicted       TEXT,
        truth           TEXT,
        embedding       BLOB,
        status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'labelled', 'discarded')),
        label           TEXT,
        reviewed_by     TEXT,
        reviewed_at     INTEGER,
        training_epoch  INTEGER
      ) WITHOUT ROWID;
      CREATE INDEX examples_queue ON examples (status, priority DESC, received_at);
      CREATE INDEX examples_received ON examples (status, received_at DESC);
      CREATE INDEX examples_frame ON examples (frame_id, device);
      CREATE TABLE classes (
        name      TEXT    PRIMARY KEY,
        added_at  INTEGER NOT NULL
      );
      CREATE TABLE trainings (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        model_version  TEXT    NOT NULL,
        trained_at     INTEGER NOT NULL
      );
      CREATE TABLE training_examples (
        training_id  INTEGER NOT NULL REFERENCES trainings (id),
        sha256       TEXT    NOT NULL REFERENCES examples (sha256),
        label        TEXT    NOT NULL,
        PRIMARY KEY (training_id, sha256)
      ) WITHOUT ROWID;
    `,
  },
];

const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]!.version;

interface ExampleRow {
  sha256: string;
  site: string;
  device: string;
  frame_id: string;
  captured_at: number;
  received_at: number;
  last_seen_at: number;
  seen: number;
  bytes: number;
  model_name: string;
  model_version: string;
  reasons_json: string;
  priority: number;
  top_json: string;
  predicted: string | null;
  truth: string | null;
  has_embedding: number;
  status: ExampleStatus;
  label: string | null;
  reviewed_by: string | null;
  reviewed_at: number | null;
}

const EXAMPLE_COLUMNS = `
  sha256, site, device, frame_id, captured_at, received_at, last_seen_at, seen, bytes, model_name,
  model_version, reasons_json, priority, top_json, predicted, truth, embedding IS NOT NULL AS has_embedding,
  status, label, reviewed_by, reviewed_at`;

function toRecord(row: ExampleRow): ExampleRecord {
  return {
    sha256: row.sha256,
    site: row.site,
    device: row.device,
    frameId: row.frame_id,
    capturedAt: row.captured_at,
    receivedAt: row.received_at,
    lastSeenAt: row.last_seen_at,
    seen: row.seen,
    bytes: row.bytes,
    modelName: row.model_name,
    modelVersion: row.model_version,
    reasons: JSON.parse(row.reasons_json) as string[],
    priority: row.priority,
    top: JSON.parse(row.top_json) as ClassScore[],
    predicted: row.predicted,
    truth: row.truth,
    hasEmbedding: row.has_embedding === 1,
    status: row.status,
    label: row.label,
    reviewedBy: row.reviewed_by,
    reviewedAt: row.reviewed_at,
  };
}

/** Raises CatalogueInputError unless `sha256` is 64 lower-case hexadecimal digits. */
export function checkSha256(sha256: string): void {
  if (typeof sha256 !== "string" || !SHA256_PATTERN.test(sha256)) {
    throw new CatalogueInputError(`invalid sha256 '${String(sha256)}'; expected 64 lower-case hexadecimal digits`);
  }
}

/** Raises InvalidClassNameError unless `name` can be a class. */
export function checkClassName(name: string): void {
  if (typeof name !== "string" || !CLASS_NAME_PATTERN.test(name)) {
    throw new InvalidClassNameError(
      `invalid class name '${String(name)}'; a class name starts with a lower-case letter, followed by up to 31 lower-case letters, digits, '_' or '-'`,
    );
  }
  if (name === DISCARD_LABEL) {
    throw new InvalidClassNameError(`'${DISCARD_LABEL}' is reserved for discarding examples and cannot be a class name`);
  }
}

function checkText(field: string, value: unknown, options: { nullable?: boolean } = {}): void {
  if (value === null && options.nullable) {
    return;
  }
  if (typeof value !== "string" || value.length === 0 || value.length > MAX_TEXT_LENGTH) {
    throw new CatalogueInputError(`invalid ${field} ${JSON.stringify(value)}; expected a string of 1 to ${MAX_TEXT_LENGTH} characters`);
  }
}

function parseTime(field: string, value: unknown): number {
  const ms = typeof value === "string" ? Date.parse(value) : value;
  if (typeof ms !== "number" || !Number.isFinite(ms)) {
    throw new CatalogueInputError(`invalid ${field} ${JSON.stringify(value)}; expected milliseconds since the Unix epoch or an ISO 8601 time`);
  }
  return Math.round(ms);
}

/** Checks the metadata of `add` and returns the capture time in milliseconds. */
function checkMeta(meta: ExampleMeta): number {
  if (typeof meta !== "object" || meta === null) {
    throw new CatalogueInputError("example metadata is missing");
  }
  checkText("site", meta.site);
  checkText("device", meta.device);
  checkText("frameId", meta.frameId);
  checkText("modelName", meta.modelName);
  checkText("modelVersion", meta.modelVersion);
  checkText("predicted", meta.predicted, { nullable: true });
  checkText("truth", meta.truth ?? null, { nullable: true });

  if (!Array.isArray(meta.reasons) || meta.reasons.length > MAX_REASONS) {
    throw new CatalogueInputError(`invalid reasons ${JSON.stringify(meta.reasons)}; expected an array of at most ${MAX_REASONS} strings`);
  }
  meta.reasons.forEach((reason, index) => checkText(`reasons[${index}]`, reason));

  if (typeof meta.priority !== "number" || !Number.isFinite(meta.priority)) {
    throw new CatalogueInputError(`invalid priority ${JSON.stringify(meta.priority)}; expected a finite number`);
  }

  if (!Array.isArray(meta.top) || meta.top.length > MAX_TOP) {
    throw new CatalogueInputError(`invalid top ${JSON.stringify(meta.top)}; expected an array of at most ${MAX_TOP} {label, p} entries`);
  }
  meta.top.forEach((score, index) => {
    checkText(`top[${index}].label`, score?.label);
    if (typeof score.p !== "number" || !(score.p >= 0 && score.p <= 1)) {
      throw new CatalogueInputError(`invalid top[${index}].p ${JSON.stringify(score.p)}; expected a probability from 0 to 1`);
    }
  });

  if (meta.embedding !== undefined) {
    if (!(meta.embedding instanceof Float32Array) || meta.embedding.length === 0 || meta.embedding.length > MAX_EMBEDDING_LENGTH) {
      throw new CatalogueInputError(`invalid embedding; expected a Float32Array of 1 to ${MAX_EMBEDDING_LENGTH} values`);
    }
  }
  return parseTime("capturedAt", meta.capturedAt);
}

/** Checks for the SOI marker FF D8 and the FF of the next marker, which start every JPEG file. */
function isJpeg(bytes: Buffer): boolean {
  return bytes.length >= 4 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff;
}

/** Writes `data` to a temporary file next to `file`, syncs it, renames it over `file` and syncs the folder. */
export function writeFileAtomic(file: string, data: Buffer | string): void {
  const temp = `${file}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  const bytes = typeof data === "string" ? Buffer.from(data, "utf8") : data;
  let fd: number | undefined;
  try {
    fd = openSync(temp, "wx", 0o644);
    let written = 0;
    while (written < bytes.length) {
      written += writeSync(fd, bytes, written, bytes.length - written);
    }
    fsyncSync(fd);
    closeSync(fd);
    fd = undefined;
    renameSync(temp, file);
  } catch (error) {
    if (fd !== undefined) {
      closeSync(fd);
    }
    rmSync(temp, { force: true });
    throw error;
  }
  // The folder entry of the rename reaches the disk only when the folder itself is synced.
  const folder = openSync(path.dirname(file), "r");
  try {
    fsyncSync(folder);
  } finally {
    closeSync(folder);
  }
}

/** Opens the database, checks its schema version, sets the pragmas and applies pending migrations. */
function openDatabase(file: string, logger: Logger): Database.Database {
  let db: Database.Database | undefined;
  try {
    db = new Database(file);
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    const mode = db.pragma("journal_mode = WAL", { simple: true });
    if (mode !== "wal") {
      throw new CatalogueOpenError(file, `journal_mode is ${String(mode)}, WAL is required`);
    }
    db.pragma("synchronous = FULL");
    db.pragma("foreign_keys = ON");
    const connection = db;
    const migrate = connection.transaction(() => {
      const from = connection.pragma("user_version", { simple: true }) as number;
      if (from > SCHEMA_VERSION) {
        throw new CatalogueOpenError(file, `schema version ${from} is newer than this sortline reads (${SCHEMA_VERSION}); upgrade sortline`);
      }
      for (const step of MIGRATIONS) {
        if (step.version > from) {
          connection.exec(step.sql);
          connection.pragma(`user_version = ${step.version}`);
          logger.info({ file, schemaVersion: step.version, migration: step.description }, "catalogue schema migrated");
        }
      }
    });
    migrate.immediate();
    return db;
  } catch (error) {
    db?.close();
    if (error instanceof CatalogueOpenError) {
      throw error;
    }
    throw new CatalogueOpenError(file, `cannot open catalogue database: ${describeError(error)}`, { cause: error });
  }
}

function describeKey(key: ExampleKey): string {
  if ("sha256" in key) {
    return key.sha256;
  }
  return key.device === undefined ? key.frameId : `${key.device}/${key.frameId}`;
}

/** The example catalogue. Every method runs synchronously on one better-sqlite3 connection. */
export class Catalogue {
  readonly file: string;
  readonly examplesDir: string;
  private readonly baseClasses: readonly string[];
  private readonly maxImageBytes: number;
  private readonly now: () => number;
  private closed = false;

  private constructor(
    readonly dataDir: string,
    private readonly db: Database.Database,
    options: CatalogueOptions,
    private readonly logger: Logger,
  ) {
    this.file = path.join(dataDir, "catalogue.db");
    this.examplesDir = path.join(dataDir, "examples");
    this.baseClasses = [...options.baseClasses];
    this.maxImageBytes = options.maxImageBytes ?? DEFAULT_MAX_IMAGE_BYTES;
    this.now = options.now ?? Date.now;
  }

  /**
   * Opens or creates the catalogue in `dataDir` (created if missing). Raises CatalogueOpenError when
   * the database cannot be opened, and InvalidClassNameError for an invalid base class.
   */
  static open(dataDir: string, options: CatalogueOptions): Catalogue {
    const logger = options.logger ?? silentLogger;
    options.baseClasses.forEach(checkClassName);
    if (options.maxImageBytes !== undefined && !(Number.isInteger(options.maxImageBytes) && options.maxImageBytes > 0)) {
      throw new RangeError(`maxImageBytes ${options.maxImageBytes} is invalid; expected a whole number of bytes > 0`);
    }
    const root = path.resolve(dataDir);
    mkdirSync(path.join(root, "examples"), { recursive: true });
    const file = path.join(root, "catalogue.db");
    const db = openDatabase(file, logger);
    const catalogue = new Catalogue(root, db, options, logger);
    logger.info({ file, examples: catalogue.count("all"), classes: catalogue.classes().length }, "catalogue opened");
    return catalogue;
  }

  /**
   * Stores a hard example. The same bytes added again increment `seen` and keep the first metadata.
   * Raises CatalogueInputError for bytes that are not a JPEG or for invalid metadata, and
   * ExampleTooLargeError above `maxImageBytes`. Only the SOI marker is checked, not that the JPEG decodes.
   */
  add(jpeg: Buffer, meta: ExampleMeta): AddResult {
    this.checkOpen();
    if (!Buffer.isBuffer(jpeg)) {
      throw new CatalogueInputError("image must be a Buffer of JPEG bytes");
    }
    if (jpeg.length > this.maxImageBytes) {
      throw new ExampleTooLargeError(jpeg.length, this.maxImageBytes);
    }
    if (!isJpeg(jpeg)) {
      throw new CatalogueInputError(`image of ${jpeg.length} bytes is not a JPEG: it does not start with the SOI marker FF D8 FF`);
    }
    const capturedAt = checkMeta(meta);
    const sha256 = createHash("sha256").update(jpeg).digest("hex");
    const now = this.now();
    const file = this.imagePath(sha256);

    const bumped = this.db.prepare("UPDATE examples SET seen = seen + 1, last_seen_at = ? WHERE sha256 = ?").run(now, sha256);
    if (bumped.changes > 0) {
      if (!existsSync(file)) {
        this.logger.warn({ sha256, file }, "catalogue image file was missing; writing it again");
        this.writeImage(file, jpeg);
      }
      return { sha256, duplicate: true };
    }

    this.writeImage(file, jpeg);
    try {
      this.insertExample(sha256, jpeg.length, meta, capturedAt, now);
    } catch (error) {
      // Another connection inserted the same bytes between the UPDATE above and this INSERT.
      if (error instanceof Database.SqliteError && error.code === "SQLITE_CONSTRAINT_PRIMARYKEY") {
        this.db.prepare("UPDATE examples SET seen = seen + 1, last_seen_at = ? WHERE sha256 = ?").run(now, sha256);
        return { sha256, duplicate: true };
      }
      throw error;
    }
    this.logger.debug({ sha256, site: meta.site, device: meta.device, frameId: meta.frameId }, "catalogue example added");
    return { sha256, duplicate: false };
  }

  private insertExample(sha256: string, bytes: number, meta: ExampleMeta, capturedAt: number, now: number): void {
    const embedding = meta.embedding === undefined ? null : Buffer.from(meta.embedding.buffer, meta.embedding.byteOffset, meta.embedding.byteLength);
    this.db
      .prepare(
        `INSERT INTO examples (
          sha256, site, device, frame_id, captured_at, received_at, last_seen_at, bytes, model_name, model_version,
          reasons_json, priority, top_json, predicted, truth, embedding
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(
        sha256,
        meta.site,
        meta.device,
        meta.frameId,
        capturedAt,
        now,
        now,
        bytes,
        meta.modelName,
        meta.modelVersion,
        JSON.stringify(meta.reasons),
        meta.priority,
        JSON.stringify(meta.top.map(({ label, p }) => ({ label, p }))),
        meta.predicted,
        meta.truth ?? null,
        embedding,
      );
  }

  private writeImage(file: string, jpeg: Buffer): void {
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileAtomic(file, jpeg);
  }

    /** Returns a page of examples with the given status (default pending, in priority order). */
  list(options: ListOptions = {}): ExampleRecord[] {
    this.checkOpen();
    const status = options.status ?? "pending";
    const limit = options.limit ?? DEFAULT_LIST_LIMIT;
    const offset = options.offset ?? 0;
    const order = options.order ?? "priority";
    if (status !== "all" && !EXAMPLE_STATUSES.includes(status)) {
      throw new CatalogueInputError(`invalid status '${String(status)}'; expected all, ${EXAMPLE_STATUSES.join(", ")}`);
    }
    if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIST_LIMIT) {
      throw new CatalogueInputError(`invalid limit ${limit}; expected a whole number from 1 to ${MAX_LIST_LIMIT}`);
    }
    if (!Number.isInteger(offset) || offset < 0) {
      throw new CatalogueInputError(`invalid offset ${offset}; expected a whole number >= 0`);
    }
    if (order !== "priority" && order !== "received" && order !== "typical") {
      throw new CatalogueInputError(`invalid order '${String(order)}'; expected priority, received or typical`);
    }
    const where = status === "all" ? "" : "WHERE status = @status";
    if (order === "typical") {
      const pool = (this.db
        .prepare(`SELECT ${EXAMPLE_COLUMNS} FROM examples ${where} ORDER BY priority DESC, received_at, sha256 LIMIT @limit`)
        .all({ status, limit: TYPICAL_POOL }) as ExampleRow[]).map(toRecord);
      const withEmbedding = pool.map((record) => ({ record, embedding: this.embedding(record.sha256) }));
      const ranked = withEmbedding.filter((entry) => entry.embedding !== null);
      const order = rankByTypicality(ranked.map((entry) => entry.embedding!), { count: offset + limit });
      const chosen = order.map((index) => ranked[index]!.record);
      const rest = withEmbedding.filter((entry) => entry.embedding === null).map((entry) => entry.record);
      const picked = new Set(chosen.map((record) => record.sha256));
      const remainder = ranked.map((entry) => entry.record).filter((record) => !picked.has(record.sha256));
      return [...chosen, ...rest, ...remainder].slice(offset, offset + limit);
    }
    const orderBy = order === "priority" ? "priority DESC, received_at, sha256" : "received_at DESC, sha256";
    const rows = this.db
      .prepare(`SELECT ${EXAMPLE_COLUMNS} FROM examples ${where} ORDER BY ${orderBy} LIMIT @limit OFFSET @offset`)
      .all({ status, limit, offset }) as ExampleRow[];
    return rows.map(toRecord);
  }

  /** Returns the number of examples with the status. */
  count(status: ExampleStatus | "all"): number {
    this.checkOpen();
    const sql = status === "all" ? "SELECT count(*) AS n FROM examples" : "SELECT count(*) AS n FROM examples WHERE status = ?";
    const row = (status === "all" ? this.db.prepare(sql).get() : this.db.prepare(sql).get(status)) as { n: number };
    return row.n;
  }

  /** Returns the example, or undefined when it is not catalogued. Raises CatalogueInputError for a malformed sha256. */
  get(sha256: string): ExampleRecord | undefined {
    this.checkOpen();
    checkSha256(sha256);
    const row = this.db.prepare(`SELECT ${EXAMPLE_COLUMNS} FROM examples WHERE sha256 = ?`).get(sha256) as ExampleRow | undefined;
    return row === undefined ? undefined : toRecord(row);
  }

  /** Returns the stored embedding of the example, or null when the edge sent none. */
  embedding(sha256: string): Float32Array | null {
    this.checkOpen();
    checkSha256(sha256);
    const row = this.db.prepare("SELECT embedding FROM examples WHERE sha256 = ?").get(sha256) as { embedding: Buffer | null } | undefined;
    if (row === undefined) {
      throw new ExampleNotFoundError(sha256);
    }
    if (row.embedding === null) {
      return null;
    }
    // Copy into a fresh buffer, because a Float32Array view needs a 4-byte-aligned offset.
    const copy = new Uint8Array(row.embedding);
    return new Float32Array(copy.buffer, 0, copy.byteLength / 4);
  }

  /** Returns the absolute path of the example's image file, whether or not it exists. */
  imagePath(sha256: string): string {
    checkSha256(sha256);
    return path.join(this.examplesDir, sha256.slice(0, 2), `${sha256}.jpg`);
  }

  /**
   * Labels the example, whatever its status, and returns it. Raises UnknownClassError when `label`
   * is not a class, and ExampleNotFoundError.
   */
  label(sha256: string, label: string, by: string): ExampleRecord {
    this.checkOpen();
    checkSha256(sha256);
    checkText("reviewer", by);
    this.checkKnownClass(label);
    this.review(sha256, "labelled", label, by);
    return this.getExisting(sha256);
  }

  /** Marks the example as not useful for training and returns it. Raises ExampleNotFoundError. */
  discard(sha256: string, by: string): ExampleRecord {
    this.checkOpen();
    checkSha256(sha256);
    checkText("reviewer", by);
    this.review(sha256, "discarded", null, by);
    return this.getExisting(sha256);
  }

  /** Returns a labelled or discarded example to the pending queue. Raises ExampleNotFoundError. */
  unlabel(sha256: string): ExampleRecord {
    this.checkOpen();
    checkSha256(sha256);
    const result = this.db
      .prepare("UPDATE examples SET status = 'pending', label = NULL, reviewed_by = NULL, reviewed_at = NULL, training_epoch = NULL WHERE sha256 = ?")
      .run(sha256);
    if (result.changes === 0) {
      throw new ExampleNotFoundError(sha256);
    }
    return this.getExisting(sha256);
  }

  private review(sha256: string, status: "labelled" | "discarded", label: string | null, by: string): void {
    const result = this.db
      .prepare(
        `UPDATE examples SET status = ?, label = ?, reviewed_by = ?, reviewed_at = ?,
           training_epoch = (SELECT coalesce(max(id), 0) FROM trainings)
         WHERE sha256 = ?`,
      )
      .run(status, label, by, this.now(), sha256);
    if (result.changes === 0) {
      throw new ExampleNotFoundError(sha256);
    }
  }

  private getExisting(sha256: string): ExampleRecord {
    const record = this.get(sha256);
    if (record === undefined) {
      throw new ExampleNotFoundError(sha256);
    }
    return record;
  }

  /** Returns the base classes in their given order, then the added classes in the order they were added. */
  classes(): string[] {
    this.checkOpen();
    const added = this.db.prepare("SELECT name FROM classes ORDER BY added_at, name").pluck().all() as string[];
    return [...new Set([...this.baseClasses, ...added])];
  }

  /** Adds a class. Returns false when it already exists. Raises InvalidClassNameError. */
  addClass(name: string): boolean {
    this.checkOpen();
    checkClassName(name);
    if (this.baseClasses.includes(name)) {
      return false;
    }
    const result = this.db.prepare("INSERT OR IGNORE INTO classes (name, added_at) VALUES (?, ?)").run(name, this.now());
    if (result.changes > 0) {
      this.logger.info({ className: name }, "catalogue class added");
    }
    return result.changes > 0;
  }

  private checkKnownClass(label: string): void {
    const known = this.classes();
    if (typeof label !== "string" || !known.includes(label)) {
      throw new UnknownClassError(String(label), known);
    }
  }

  /**
   * Applies a labels file (see readLabelsCsv) in one transaction. The label `discard` discards the
   * example. Rows with errors or unknown examples are reported and skipped, and the other rows are
   * applied. Raises CsvParseError when the text is not CSV or the header is unusable, and then applies nothing.
   */
  importLabelsCsv(text: string, by: string, options: ImportOptions = {}): ImportResult {
    this.checkOpen();
    checkText("reviewer", by);
    const parsed = readLabelsCsv(text);
    const result: ImportResult = { applied: 0, unknownExamples: [], errors: [...parsed.errors], addedClasses: [] };
    const findByFrame = this.db.prepare("SELECT sha256, device FROM examples WHERE frame_id = ? ORDER BY device");

    const apply = this.db.transaction(() => {
      for (const row of parsed.rows) {
        let sha256: string | undefined;
        if ("sha256" in row.key) {
          sha256 = this.get(row.key.sha256)?.sha256;
        } else {
          const device = row.key.device;
          const matches = (findByFrame.all(row.key.frameId) as { sha256: string; device: string }[]).filter(
            (match) => device === undefined || match.device === device,
          );
          if (matches.length > 1) {
            const devices = matches.map((match) => match.device).join(", ");
            result.errors.push({ line: row.line, message: `frame_id '${row.key.frameId}' matches examples of several devices (${devices}); add a device column` });
            continue;
          }
          sha256 = matches[0]?.sha256;
        }
        if (sha256 === undefined) {
          result.unknownExamples.push(describeKey(row.key));
          continue;
        }
        if (row.label === DISCARD_LABEL) {
          this.review(sha256, "discarded", null, by);
          result.applied += 1;
          continue;
        }
        if (!this.classes().includes(row.label)) {
          if (!options.addClasses) {
            result.errors.push({ line: row.line, message: `unknown class '${row.label}'; known classes: ${this.classes().join(", ")}. Import with addClasses to add it` });
            continue;
          }
          if (!CLASS_NAME_PATTERN.test(row.label)) {
            result.errors.push({ line: row.line, message: `invalid class name '${row.label}'; expected ${CLASS_NAME_PATTERN.source}` });
            continue;
          }
          this.addClass(row.label);
          result.addedClasses.push(row.label);
        }
        this.review(sha256, "labelled", row.label, by);
        result.applied += 1;
      }
    });
    apply.immediate();
    result.errors.sort((a, b) => a.line - b.line);
    this.logger.info(
      { applied: result.applied, unknownExamples: result.unknownExamples.length, errors: result.errors.length, addedClasses: result.addedClasses },
      "catalogue labels imported",
    );
    return result;
  }

  /**
   * Writes a `path,label` CSV of every labelled example, with absolute image paths, via a temporary
   * file and a rename. Rows are sorted by label, then sha256.
   */
  exportTrainingCsv(file: string, options: ExportOptions = {}): ExportResult {
    this.checkOpen();
    let since = 0;
    if (options.since !== undefined) {
      since = Date.parse(options.since);
      if (!Number.isFinite(since)) {
        throw new CatalogueInputError(`invalid since '${options.since}'; expected an ISO 8601 time such as 2024-05-01T08:00:00Z`);
      }
    }
    const rows = this.db
      .prepare("SELECT sha256, label FROM examples WHERE status = 'labelled' AND reviewed_at >= ? ORDER BY label, sha256")
      .all(since) as { sha256: string; label: string }[];
    const perClass: Record<string, number> = {};
    let text = formatCsvRow(["path", "label"]);
    for (const row of rows) {
      text += formatCsvRow([this.imagePath(row.sha256), row.label]);
      perClass[row.label] = (perClass[row.label] ?? 0) + 1;
    }
    const target = path.resolve(file);
    writeFileAtomic(target, text);
    this.logger.info({ file: target, rows: rows.length, perClass }, "catalogue training CSV exported");
    return { rows: rows.length, perClass };
  }

  /**
   * Records that a model version was trained on the examples, with their current labels. Raises
   * ExampleNotFoundError for an unknown sha256 and CatalogueInputError for an example that is not
   * labelled, and then records nothing.
   */
  markTrained(modelVersion: string, shas: readonly string[]): TrainingRecord {
    this.checkOpen();
    checkText("modelVersion", modelVersion);
    const unique = [...new Set(shas)];
    unique.forEach(checkSha256);
    const trainedAt = this.now();
    const record = this.db.transaction((): TrainingRecord => {
      const labels = unique.map((sha256) => {
        const example = this.getExisting(sha256);
        if (example.status !== "labelled" || example.label === null) {
          throw new CatalogueInputError(`example ${sha256} is ${example.status}; only labelled examples can be marked as trained`);
        }
        return { sha256, label: example.label };
      });
      const id = Number(this.db.prepare("INSERT INTO trainings (model_version, trained_at) VALUES (?, ?)").run(modelVersion, trainedAt).lastInsertRowid);
      const insert = this.db.prepare("INSERT INTO training_examples (training_id, sha256, label) VALUES (?, ?, ?)");
      for (const { sha256, label } of labels) {
        insert.run(id, sha256, label);
      }
      return { id, modelVersion, trainedAt, examples: labels.length };
    }).immediate();
    this.logger.info({ trainingId: record.id, modelVersion, examples: record.examples }, "catalogue training recorded");
    return record;
  }

  /** Returns the sha256 of the examples recorded for a training, with the labels they had. */
  trainedExamples(trainingId: number): { sha256: string; label: string }[] {
    this.checkOpen();
    return this.db.prepare("SELECT sha256, label FROM training_examples WHERE training_id = ? ORDER BY sha256").all(trainingId) as {
      sha256: string;
      label: string;
    }[];
  }

  /** Returns counts by status, by label and per device, and the labels added since the last training. */
  stats(): CatalogueStats {
    this.checkOpen();
    const byStatus: Record<ExampleStatus, number> = { pending: 0, labelled: 0, discarded: 0 };
    for (const row of this.db.prepare("SELECT status, count(*) AS n FROM examples GROUP BY status").all() as { status: ExampleStatus; n: number }[]) {
      byStatus[row.status] = row.n;
    }
    const byLabel: Record<string, number> = {};
    const labelRows = this.db
      .prepare("SELECT label, count(*) AS n FROM examples WHERE status = 'labelled' GROUP BY label ORDER BY label")
      .all() as { label: string; n: number }[];
    for (const row of labelRows) {
      byLabel[row.label] = row.n;
    }
    const last = this.db
      .prepare(
        `SELECT t.id, t.model_version, t.trained_at, (SELECT count(*) FROM training_examples e WHERE e.training_id = t.id) AS examples
         FROM trainings t ORDER BY t.id DESC LIMIT 1`,
      )
      .get() as { id: number; model_version: string; trained_at: number; examples: number } | undefined;
    const epoch = last?.id ?? 0;
    const labelledSince = this.db.prepare("SELECT count(*) AS n FROM examples WHERE status = 'labelled' AND training_epoch >= ?").get(epoch) as {
      n: number;
    };
    const devices = this.db
      .prepare(
        `SELECT site, device,
           sum(status = 'pending') AS pending, sum(status = 'labelled') AS labelled,
           sum(status = 'discarded') AS discarded, sum(seen) AS seen
         FROM examples GROUP BY site, device ORDER BY site, device`,
      )
      .all() as DeviceStats[];
    return {
      total: byStatus.pending + byStatus.labelled + byStatus.discarded,
      byStatus,
      byLabel,
      lastTraining: last === undefined ? null : { id: last.id, modelVersion: last.model_version, trainedAt: last.trained_at, examples: last.examples },
      labelledSinceLastTraining: labelledSince.n,
      devices,
    };
  }

  /** Checkpoints and truncates the WAL, then closes the database. Calling it again does nothing. */
  close(): void {
    if (this.closed) {
      return;
    }
    this.closed = true;
    try {
      this.db.pragma("wal_checkpoint(TRUNCATE)");
    } catch (error) {
      this.logger.warn({ file: this.file, err: error }, "catalogue WAL checkpoint on close failed; SQLite replays the WAL on the next open");
    }
    this.db.close();
  }

  private checkOpen(): void {
    if (this.closed) {
      throw new CatalogueError(`catalogue ${this.file} is closed`);
    }
  }
}
