/**
 * The decision audit: one row per frame the agent decided about, in a SQLite file.
 *
 * Durability contract: `recordBatch` returns only after its transaction has committed, and the
 * pipeline calls it BEFORE it sends the batch's decisions to the actuator. So a decision the
 * actuator received is in the audit, also when the agent is killed with SIGKILL right after sending
 * it. The one exception is a batch whose recordBatch raised and that the pipeline chose to send anyway.
 * In WAL mode a commit survives a process crash with either `synchronous` setting. It survives power
 * loss only with `synchronous=FULL` (the default), which syncs the WAL on every commit, on a disk
 * that honours fsync.
 *
 * Failure contract: a write that SQLite rejects (disk full, I/O error, database locked past the busy
 * timeout, read-only file) raises `AuditWriteError` with the SQLite error as `cause` and nothing of
 * that batch is stored. The store does not retry or drop on its own: the pipeline catches the error
 * and decides whether to keep sorting without an audit row or to hold the line.
 */
import { existsSync, statSync } from "node:fs";
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import type { Writable } from "node:stream";

import Database from "better-sqlite3";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { exportCsv, queryDecisions, summarize, type AuditRow, type AuditSummary, type DecisionQuery, type TimeRange } from "./queries.js";
import { migrate, readSchemaVersion, SCHEMA_VERSION } from "./schema.js";
import type { DecisionRecord } from "./types.js";

export type { AuditRow, AuditSummary, CountByKey, DecisionQuery, ModelCount, TimeRange } from "./queries.js";

/** A write to the audit database that did not commit. `code` is the SQLite result code, e.g. SQLITE_FULL. */
export class AuditWriteError extends SortlineError {
  constructor(
    message: string,
    readonly code: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** An audit database that cannot be opened: missing file, not SQLite, or a schema newer than this build. */
export class AuditOpenError extends SortlineError {
  constructor(
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
  }
}

export interface AuditStoreOptions {
  /** FULL syncs the WAL on every commit and survives power loss. NORMAL survives process crashes only. */
  synchronous?: "FULL" | "NORMAL";
  /** How long a write waits for another connection's lock before it fails with SQLITE_BUSY. */
  busyTimeoutMs?: number;
  /**
   * Hard cap on the database size (max_page_count times page size). Writes past it fail with
   * AuditWriteError code SQLITE_FULL, so a cap below the free disk space makes the audit fail
   * before the disk fills up. Default: no cap beyond SQLite's own.
   */
  maxDatabaseBytes?: number;
  /** Opens an existing database for reading only, without migrating it (for the CLI). */
  readonly?: boolean;
  logger?: Logger;
}

/** Retention limits, each skipped when absent. */
export interface RetentionPolicy {
  /** Rows whose decision time is older than this many days are deleted. */
  maxAgeDays?: number;
  /** Oldest rows are deleted until the pages in use take at most this many bytes. */
  maxBytes?: number;
}

export interface PruneOptions {
  /** Clock for the age limit, in milliseconds since the Unix epoch (default: Date.now()). */
  now?: number;
  /** Rows deleted per transaction. The event loop runs between transactions. */
  chunkRows?: number;
  /** Free pages returned to the file system per incremental_vacuum step. */
  vacuumPages?: number;
}

export interface PruneResult {
  deletedByAge: number;
  deletedBySize: number;
  /** Free pages released by incremental_vacuum, so the file shrank by this many pages once checkpointed. */
  vacuumedPages: number;
  bytesInUse: number;
}

/** Size of the database: pages holding data, and the main file on disk (excluding the WAL). */
export interface AuditStats {
  rows: number;
  bytesInUse: number;
  freeBytes: number;
  fileBytes: number;
}

const DEFAULT_BUSY_TIMEOUT_MS = 5_000;
const DEFAULT_CHUNK_ROWS = 500;
const DEFAULT_VACUUM_PAGES = 256;
/** After a checkpoint resets the WAL, SQLite truncates the WAL file back to this size. */
const JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024;
const DAY_MS = 86_400_000;

const INSERT_SQL = `
  INSERT INTO decisions (
    frame_id, source, captured_at, decided_at, model_name, model_version, model_sha256, top_json,
    label, confidence, bin, reason, queue_ms, decode_ms, inference_ms, total_ms, error, truth
  ) VALUES (
    @frameId, @source, @capturedAt, @decidedAt, @modelName, @modelVersion, @modelSha256, @topJson,
    @label, @confidence, @bin, @reason, @queueMs, @decodeMs, @inferenceMs, @totalMs, @error, @truth
  )`;

function insertParams(record: DecisionRecord): Record<string, string | number | null> {
  return {
    frameId: record.frameId,
    source: record.source,
    capturedAt: Math.round(record.capturedAt),
    decidedAt: Math.round(record.decidedAt),
    modelName: record.modelName,
    modelVersion: record.modelVersion,
    modelSha256: record.modelSha256,
    topJson: JSON.stringify(record.top),
    label: record.label,
    confidence: record.confidence,
    bin: record.bin,
    reason: record.reason,
    queueMs: record.latency.queueMs,
    decodeMs: record.latency.decodeMs,
    inferenceMs: record.latency.inferenceMs,
    totalMs: record.latency.totalMs,
    error: record.error,
    truth: record.truth ?? null,
  };
}

function sqliteCode(error: unknown): string | undefined {
  return error instanceof Database.SqliteError ? error.code : undefined;
}

/** Opens the connection and checks that it contains a sortline audit schema this build can read. */
function openDatabase(file: string, options: AuditStoreOptions, logger: Logger): Database.Database {
  if (options.readonly && !existsSync(file)) {
    throw new AuditOpenError(file, "audit database not found");
  }
  let db: Database.Database | undefined;
  try {
    db = new Database(file, { readonly: options.readonly ?? false, fileMustExist: options.readonly ?? false });
    db.pragma(`busy_timeout = ${options.busyTimeoutMs ?? DEFAULT_BUSY_TIMEOUT_MS}`);
    const version = readSchemaVersion(db);
    if (version > SCHEMA_VERSION) {
      throw new AuditOpenError(file, `schema version ${version} is newer than this sortline reads (${SCHEMA_VERSION}); upgrade sortline`);
    }
    if (options.readonly) {
      if (version < SCHEMA_VERSION) {
        throw new AuditOpenError(file, `schema version ${version} is older than ${SCHEMA_VERSION}; start the agent once to migrate it`);
      }
      return db;
    }
    configureWriter(db, options.synchronous ?? "FULL");
    const { from, to } = migrate(db, logger);
    if (options.maxDatabaseBytes !== undefined) {
      setMaxPageCount(db, options.maxDatabaseBytes);
    }
    logger.info({ file, schemaVersion: to, migratedFrom: from === to ? undefined : from }, "audit database opened");
    return db;
  } catch (error) {
    db?.close();
    if (error instanceof AuditOpenError) {
      throw error;
    }
    throw new AuditOpenError(file, `cannot open audit database: ${describeError(error)}`, { cause: error });
  }
}

/** Sets the per-file and per-connection pragmas of a writing connection. */
function configureWriter(db: Database.Database, synchronous: "FULL" | "NORMAL"): void {
  // auto_vacuum can only change before the first table exists, so it must precede the migrations
  // and journal_mode. On a file that already has tables SQLite ignores it.
  db.pragma("auto_vacuum = INCREMENTAL");
  const mode = db.pragma("journal_mode = WAL", { simple: true });
  if (mode !== "wal") {
    throw new Error(`journal_mode is ${String(mode)}, WAL is required`);
  }
  db.pragma(`synchronous = ${synchronous}`);
  db.pragma(`journal_size_limit = ${JOURNAL_SIZE_LIMIT_BYTES}`);
}

/** Sets max_page_count from a byte cap and returns the cap in effect, in bytes. */
function setMaxPageCount(db: Database.Database, maxBytes: number): number {
  if (!Number.isFinite(maxBytes) || maxBytes <= 0) {
    throw new RangeError(`maxDatabaseBytes ${maxBytes} is not a positive number of bytes`);
  }
  const pageSize = db.pragma("page_size", { simple: true }) as number;
  // SQLite never sets the cap below the current page count and returns the value in effect.
  const pages = db.pragma(`max_page_count = ${Math.max(1, Math.floor(maxBytes / pageSize))}`, { simple: true }) as number;
  return pages * pageSize;
}

function checkPruneArguments(policy: RetentionPolicy, options: PruneOptions): void {
  const nonNegative = (value: number): boolean => Number.isFinite(value) && value >= 0;
  const positiveInteger = (value: number): boolean => Number.isInteger(value) && value >= 1;
  const checks: [string, number | undefined, (value: number) => boolean, string][] = [
    ["maxAgeDays", policy.maxAgeDays, nonNegative, "a number of days >= 0"],
    ["maxBytes", policy.maxBytes, nonNegative, "a number of bytes >= 0"],
    ["chunkRows", options.chunkRows, positiveInteger, "a whole number >= 1"],
    ["vacuumPages", options.vacuumPages, positiveInteger, "a whole number >= 1"],
  ];
  for (const [name, value, valid, expected] of checks) {
    if (value !== undefined && !valid(value)) {
      throw new RangeError(`prune ${name} ${value} is invalid; expected ${expected}`);
    }
  }
}

/** The decision audit database. The contracts are at the top of this file. */
export class AuditStore {
  private readonly insertAll: ((records: readonly DecisionRecord[]) => void) | undefined;
  private closed = false;
  private pruning: Promise<PruneResult> | undefined;

  private constructor(
    readonly file: string,
    private readonly db: Database.Database,
    private readonly logger: Logger,
  ) {
    if (!db.readonly) {
      const insert = db.prepare(INSERT_SQL);
      this.insertAll = db.transaction((records: readonly DecisionRecord[]) => {
        for (const record of records) {
          insert.run(insertParams(record));
        }
      });
    }
  }

  /** Opens or creates the database and applies pending migrations. Raises AuditOpenError. */
  static open(file: string, options: AuditStoreOptions = {}): AuditStore {
    const logger = options.logger ?? silentLogger;
    const db = openDatabase(file, options, logger);
    if (!options.readonly && db.pragma("auto_vacuum", { simple: true }) !== 2) {
      logger.warn({ file }, "audit database has no incremental auto_vacuum, so pruning cannot shrink the file; run VACUUM once offline");
    }
    return new AuditStore(file, db, logger);
  }

  /**
   * Stores the records in one transaction and returns after it has committed.
   * Raises AuditWriteError, with nothing of the batch stored, when SQLite rejects the write.
   */
  recordBatch(records: readonly DecisionRecord[]): void {
    if (records.length === 0) {
      return;
    }
    this.checkWritable();
    try {
      this.insertAll!(records);
    } catch (error) {
      const code = sqliteCode(error);
      if (code === undefined) {
        throw error;
      }
      throw new AuditWriteError(`audit write of ${records.length} decisions failed: ${describeError(error)}`, code, { cause: error });
    }
  }

  /**
   * Deletes rows older than `maxAgeDays`, then the oldest rows until the pages in use fit in
   * `maxBytes`, then returns the freed pages to the file system. Works in transactions of
   * `chunkRows` rows and yields to the event loop between them, so recordBatch calls interleave.
   * A call made while a prune runs returns the running prune's result.
   */
  prune(policy: RetentionPolicy, options: PruneOptions = {}): Promise<PruneResult> {
    this.pruning ??= this.runPrune(policy, options).finally(() => {
      this.pruning = undefined;
    });
    return this.pruning;
  }

  private async runPrune(policy: RetentionPolicy, options: PruneOptions): Promise<PruneResult> {
    this.checkWritable();
    checkPruneArguments(policy, options);
    const chunkRows = options.chunkRows ?? DEFAULT_CHUNK_ROWS;
    const result: PruneResult = { deletedByAge: 0, deletedBySize: 0, vacuumedPages: 0, bytesInUse: 0 };
    if (policy.maxAgeDays !== undefined) {
      const cutoff = (options.now ?? Date.now()) - policy.maxAgeDays * DAY_MS;
      const deleteOld = this.db.prepare(
        "DELETE FROM decisions WHERE id IN (SELECT id FROM decisions WHERE decided_at < ? ORDER BY decided_at LIMIT ?)",
      );
      result.deletedByAge = await this.deleteInChunks(() => deleteOld.run(cutoff, chunkRows).changes, () => true);
    }
    if (policy.maxBytes !== undefined) {
      const maxBytes = policy.maxBytes;
      const deleteOldest = this.db.prepare(
        "DELETE FROM decisions WHERE id IN (SELECT id FROM decisions ORDER BY decided_at, id LIMIT ?)",
      );
      result.deletedBySize = await this.deleteInChunks(
        () => deleteOldest.run(chunkRows).changes,
        () => this.bytesInUse() > maxBytes,
      );
    }
    result.vacuumedPages = await this.vacuumFreePages(options.vacuumPages ?? DEFAULT_VACUUM_PAGES);
    result.bytesInUse = this.closed ? 0 : this.bytesInUse();
    if (result.deletedByAge + result.deletedBySize > 0) {
      this.logger.info({ file: this.file, ...result }, "audit database pruned");
    }
    return result;
  }

  /** Runs `deleteChunk` while `needed()` is true and the last chunk deleted rows. Returns the rows deleted. */
  private async deleteInChunks(deleteChunk: () => number, needed: () => boolean): Promise<number> {
    let total = 0;
    while (!this.closed && needed()) {
      const deleted = this.writeOrRaise("audit prune", deleteChunk);
      total += deleted;
      if (deleted === 0) {
        break;
      }
      await yieldToEventLoop();
    }
    return total;
  }

  /** Releases free pages in steps, then checkpoints without waiting so the main file shrinks. */
  private async vacuumFreePages(pagesPerStep: number): Promise<number> {
    let released = 0;
    while (!this.closed) {
      const free = this.db.pragma("freelist_count", { simple: true }) as number;
      if (free === 0 || this.db.pragma("auto_vacuum", { simple: true }) !== 2) {
        break;
      }
      this.writeOrRaise("audit incremental_vacuum", () => this.db.exec(`PRAGMA incremental_vacuum(${pagesPerStep})`));
      released += Math.min(free, pagesPerStep);
      await yieldToEventLoop();
    }
    if (!this.closed && released > 0) {
      // PASSIVE does not wait for readers or writers (SQLite docs, PRAGMA wal_checkpoint). The main
      // file shrinks once a checkpoint has copied the whole WAL, so with a reader open it may shrink later.
      this.db.pragma("wal_checkpoint(PASSIVE)");
    }
    return released;
  }

  private writeOrRaise<T>(what: string, write: () => T): T {
    try {
      return write();
    } catch (error) {
      const code = sqliteCode(error);
      if (code === undefined) {
        throw error;
      }
      throw new AuditWriteError(`${what} failed: ${describeError(error)}`, code, { cause: error });
    }
  }

  /**
   * Changes the hard cap of `maxDatabaseBytes` on this connection, for example after disk space was
   * freed. Returns the cap in effect, which is never below the current database size.
   */
  setMaxDatabaseBytes(maxBytes: number): number {
    this.checkWritable();
    return setMaxPageCount(this.db, maxBytes);
  }

  /** Returns the bytes of the pages that contain data, free pages excluded. It reads three pragmas and no rows. */
  private bytesInUse(): number {
    const pageSize = this.db.pragma("page_size", { simple: true }) as number;
    const pages = this.db.pragma("page_count", { simple: true }) as number;
    const free = this.db.pragma("freelist_count", { simple: true }) as number;
    return (pages - free) * pageSize;
  }

  /** Returns the row count and the database size in bytes. Counting the rows reads the whole table. */
  stats(): AuditStats {
    const pageSize = this.db.pragma("page_size", { simple: true }) as number;
    const free = this.db.pragma("freelist_count", { simple: true }) as number;
    const rows = (this.db.prepare("SELECT count(*) AS n FROM decisions").get() as { n: number }).n;
    return { rows, bytesInUse: this.bytesInUse(), freeBytes: free * pageSize, fileBytes: statSync(this.file).size };
  }

  /** Counts, accuracy and latency percentiles of the decisions in the range. */
  summary(range: TimeRange = {}): AuditSummary {
    return summarize(this.db, range);
  }

  /** Returns matching decisions, newest first, at most `limit` of them. */
  query(options: DecisionQuery = {}): AuditRow[] {
    return queryDecisions(this.db, options);
  }

  /**
   * Writes the decisions in the range as RFC 4180 CSV, oldest first, reading a page of rows at a
   * time and waiting for 'drain' when the stream is full. Returns the number of rows written.
   */
  exportCsv(range: TimeRange, out: Writable | NodeJS.WritableStream): Promise<number> {
    return exportCsv(this.db, range, out);
  }

  /** Checkpoints and truncates the WAL of a writing connection, then closes. Calling it again does nothing. */
  close(): void {
    if (this.closed) {
      return;
    }
    this.closed = true;
    if (!this.db.readonly) {
      try {
        this.db.pragma("wal_checkpoint(TRUNCATE)");
      } catch (error) {
        this.logger.warn({ file: this.file, err: error }, "audit WAL checkpoint on close failed; SQLite replays the WAL on the next open");
      }
    }
    this.db.close();
  }

  private checkWritable(): void {
    if (this.closed) {
      throw new AuditWriteError(`audit store ${this.file} is closed`, "SQLITE_MISUSE");
    }
    if (this.db.readonly) {
      throw new AuditWriteError(`audit store ${this.file} is open read-only`, "SQLITE_READONLY");
    }
  }
}
