/**
 * The hard-example outbox: a bounded queue in a SQLite file that survives agent restarts and
 * broker outages. Each row is one example with its image, embedding and metadata.
 *
 * Durability: `add` and `ack` return after their transaction committed. With `synchronous=FULL`
 * (the default) in WAL mode, a commit also survives power loss on a disk that honours fsync.
 *
 * Bounds: the sum of the payload bytes (image + embedding + metadata JSON) stays at or below
 * `maxBytes`, and the row count at or below `maxItems`. To make room, `add` evicts the lowest
 * priority first and the oldest first among equal priorities. It never evicts an item of higher
 * priority than the new one; it rejects the new one instead. Evictions and rejections are counted
 * in a table of the same file, so the counts survive restarts.
 *
 * Failures: SQLite errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY past the busy timeout, a
 * read-only file) raise OutboxWriteError on writes and OutboxError on reads, with the SQLite
 * result code. Nothing of a failed write is stored. The caller logs and counts the error and
 * carries on.
 */
import Database from "better-sqlite3";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";

/** Schema version in `PRAGMA user_version`. */
export const OUTBOX_SCHEMA_VERSION = 1;

const DEFAULT_BUSY_TIMEOUT_MS = 5_000;

/** A SQLite operation on the outbox that failed. `code` is the SQLite result code, e.g. SQLITE_IOERR. */
export class OutboxError extends SortlineError {
  constructor(
    message: string,
    readonly code: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A write to the outbox that did not commit, for example SQLITE_FULL on a full disk. */
export class OutboxWriteError extends OutboxError {}

/** An outbox file that cannot be opened: not SQLite, unreadable, or a schema newer than this build. */
export class OutboxOpenError extends SortlineError {
  constructor(
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
  }
}

/** Metadata of one example, stored as JSON. */
export interface ExampleMeta {
  frameId: string;
  /** Milliseconds since the Unix epoch. */
  capturedAt: number;
  /** Camera source name. */
  source?: string;
  model: { name: string; version: string; sha256: string };
  /** Top-k labels with probabilities, highest first. */
  top: { label: string; p: number }[];
  /** Selection reasons, highest weight first. */
  reasons: string[];
  novelty: number | null;
  margin: number;
  /** Bin and reject reason the decision policy gave the frame. */
  decision?: { bin: string | null; reason: string | null };
  site: string;
  device: string;
}

/** An example to store. */
export interface NewExample {
  priority: number;
  meta: ExampleMeta;
  /** Encoded image as the camera sent it (JPEG for camera sources). */
  jpeg: Buffer;
  embedding: Float32Array;
  /** Milliseconds since the Unix epoch; default Date.now(). */
  createdAt?: number;
}

/** A stored example. */
export interface OutboxItem {
  /** Row id; SQLite AUTOINCREMENT never reuses it, also across restarts. */
  id: number;
  createdAt: number;
  priority: number;
  /** Payload bytes counted against maxBytes. */
  bytes: number;
  meta: ExampleMeta;
  jpeg: Buffer;
  embedding: Float32Array;
}

export type AddResult =
  | { stored: true; id: number; evicted: number }
  | { stored: false; reason: "lower-priority" | "too-large"; evicted: 0 };

export interface OutboxStats {
  items: number;
  bytes: number;
  maxItems: number;
  maxBytes: number;
  /** Counters kept in the file since it was created. */
  added: number;
  evicted: number;
  /** Examples not stored: larger than maxBytes, or no room without evicting a higher priority. */
  rejected: number;
  acked: number;
}

export interface OutboxOptions {
  /** Maximum sum of payload bytes (image + embedding + metadata JSON) of the stored examples. */
  maxBytes: number;
  /** Maximum number of stored examples. */
  maxItems: number;
  /** FULL syncs the WAL on every commit and survives power loss. NORMAL survives process crashes only. */
  synchronous?: "FULL" | "NORMAL";
  /** How long a write waits for another connection's lock before it fails with SQLITE_BUSY. */
  busyTimeoutMs?: number;
  /**
   * Hard cap on the file size (max_page_count times page size). Writes past it fail with
   * OutboxWriteError code SQLITE_FULL. Default: no cap beyond SQLite's own.
   */
  maxDatabaseBytes?: number;
  logger?: Logger;
}

const COUNTERS = ["added", "evicted", "rejected", "acked"] as const;
type CounterName = (typeof COUNTERS)[number];

const SCHEMA_SQL = `
  CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL,
    priority REAL NOT NULL,
    bytes INTEGER NOT NULL,
    meta TEXT NOT NULL,
    jpeg BLOB NOT NULL,
    embedding BLOB NOT NULL
  );
  CREATE INDEX IF NOT EXISTS examples_by_priority ON examples (priority, created_at, id);
  CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
  );`;

interface ItemRow {
  id: number;
  created_at: number;
  priority: number;
  bytes: number;
  meta: string;
  jpeg: Buffer;
  embedding: Buffer;
}

function sqliteCode(error: unknown): string | undefined {
  return error instanceof Database.SqliteError ? error.code : undefined;
}

/** Encodes an embedding as little-endian float32, so the stored bytes do not depend on the host. */
export function encodeEmbedding(embedding: Float32Array): Buffer {
  const bytes = Buffer.alloc(embedding.length * 4);
  embedding.forEach((value, index) => bytes.writeFloatLE(value, index * 4));
  return bytes;
}

export function decodeEmbedding(bytes: Buffer): Float32Array {
  const embedding = new Float32Array(bytes.length / 4);
  for (let index = 0; index < embedding.length; index++) {
    embedding[index] = bytes.readFloatLE(index * 4);
  }
  return embedding;
}

function checkOptions(options: OutboxOptions): void {
  const positiveInteger = (value: number): boolean => Number.isInteger(value) && value >= 1;
  if (!positiveInteger(options.maxBytes)) {
    throw new RangeError(`outbox maxBytes ${options.maxBytes} is invalid; expected a whole number of bytes >= 1`);
  }
  if (!positiveInteger(options.maxItems)) {
    throw new RangeError(`outbox maxItems ${options.maxItems} is invalid; expected a whole number >= 1`);
  }
  if (options.maxDatabaseBytes !== undefined && !(Number.isFinite(options.maxDatabaseBytes) && options.maxDatabaseBytes > 0)) {
    throw new RangeError(`outbox maxDatabaseBytes ${options.maxDatabaseBytes} is invalid; expected a number of bytes > 0`);
  }
}

function openDatabase(file: string, options: OutboxOptions): Database.Database {
  let db: Database.Database | undefined;
  try {
    db = new Database(file);
    db.pragma(`busy_timeout = ${options.busyTimeoutMs ?? DEFAULT_BUSY_TIMEOUT_MS}`);
    const version = db.pragma("user_version", { simple: true }) as number;
    if (version > OUTBOX_SCHEMA_VERSION) {
      throw new OutboxOpenError(file, `schema version ${version} is newer than this sortline reads (${OUTBOX_SCHEMA_VERSION}); upgrade sortline`);
    }
    const mode = db.pragma("journal_mode = WAL", { simple: true });
    if (mode !== "wal") {
      throw new Error(`journal_mode is ${String(mode)}, WAL is required`);
    }
    db.pragma(`synchronous = ${options.synchronous ?? "FULL"}`);
    db.transaction(() => {
      db!.exec(SCHEMA_SQL);
      const insert = db!.prepare("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)");
      for (const name of COUNTERS) {
        insert.run(name);
      }
      db!.pragma(`user_version = ${OUTBOX_SCHEMA_VERSION}`);
    })();
    if (options.maxDatabaseBytes !== undefined) {
      const pageSize = db.pragma("page_size", { simple: true }) as number;
      // SQLite never sets the cap below the current page count.
      db.pragma(`max_page_count = ${Math.max(1, Math.floor(options.maxDatabaseBytes / pageSize))}`);
    }
    return db;
  } catch (error) {
    db?.close();
    if (error instanceof OutboxOpenError) {
      throw error;
    }
    throw new OutboxOpenError(file, `cannot open the outbox database: ${describeError(error)}`, { cause: error });
  }
}

/** The hard-example outbox. The contracts are at the top of this file. */
export class Outbox {
  private items: number;
  private bytes: number;
  private closed = false;
  private readonly statements: {
    insert: Database.Statement;
    evictionOrder: Database.Statement;
    remove: Database.Statement;
    bytesOf: Database.Statement;
    next: Database.Statement;
    counter: Database.Statement;
    counters: Database.Statement;
    totals: Database.Statement;
  };

  private constructor(
    readonly file: string,
    private readonly db: Database.Database,
    private readonly options: OutboxOptions,
    private readonly logger: Logger,
  ) {
    this.statements = {
      insert: db.prepare("INSERT INTO examples (created_at, priority, bytes, meta, jpeg, embedding) VALUES (?, ?, ?, ?, ?, ?)"),
      evictionOrder: db.prepare("SELECT id, priority, bytes FROM examples ORDER BY priority ASC, created_at ASC, id ASC"),
      remove: db.prepare("DELETE FROM examples WHERE id = ?"),
      bytesOf: db.prepare("SELECT bytes FROM examples WHERE id = ?"),
      next: db.prepare(
        "SELECT * FROM examples WHERE id NOT IN (SELECT value FROM json_each(?)) ORDER BY priority DESC, created_at ASC, id ASC LIMIT 1",
      ),
      counter: db.prepare("UPDATE counters SET value = value + ? WHERE name = ?"),
      counters: db.prepare("SELECT name, value FROM counters"),
      totals: db.prepare("SELECT COUNT(*) AS items, COALESCE(SUM(bytes), 0) AS bytes FROM examples"),
    };
    const totals = this.statements.totals.get() as { items: number; bytes: number };
    this.items = totals.items;
    this.bytes = totals.bytes;
  }

  /** Opens or creates the outbox file. Raises OutboxOpenError, or RangeError for invalid options. */
  static open(file: string, options: OutboxOptions): Outbox {
    checkOptions(options);
    const logger = options.logger ?? silentLogger;
    const db = openDatabase(file, options);
    const outbox = new Outbox(file, db, options, logger);
    logger.info({ file, items: outbox.items, bytes: outbox.bytes }, "outbox opened");
    if (outbox.items > options.maxItems || outbox.bytes > options.maxBytes) {
      // Lower limits than the file was filled with take effect as new examples arrive.
      logger.warn({ file, items: outbox.items, bytes: outbox.bytes, maxItems: options.maxItems, maxBytes: options.maxBytes }, "outbox contains more than its limits allow");
    }
    return outbox;
  }

  /**
   * Stores an example, evicting lower or equal priority items when the outbox is full.
   * Returns whether it was stored. It is not stored when it is larger than maxBytes on its own
   * ("too-large"), or when room would require evicting a higher priority item ("lower-priority").
   * Raises OutboxWriteError, with nothing stored or evicted, when SQLite rejects the write.
   */
  add(example: NewExample): AddResult {
    this.checkOpen();
    if (!Number.isFinite(example.priority)) {
      throw new RangeError(`example priority ${example.priority} is not a finite number`);
    }
    const meta = JSON.stringify(example.meta);
    const embedding = encodeEmbedding(example.embedding);
    const size = example.jpeg.length + embedding.length + Buffer.byteLength(meta);
    if (size > this.options.maxBytes) {
      this.write("count a rejected example", () => this.statements.counter.run(1, "rejected"));
      return { stored: false, reason: "too-large", evicted: 0 };
    }
    const result = this.write(`add of example ${example.meta.frameId}`, () => this.db.transaction(() => this.insertWithEviction(example, meta, embedding, size))());
    if (result.stored) {
      this.items += 1 - result.evicted.length;
      this.bytes += size - result.evictedBytes;
      return { stored: true, id: result.id, evicted: result.evicted.length };
    }
    return { stored: false, reason: "lower-priority", evicted: 0 };
  }

  /** Returns the highest priority item (oldest first among equals) whose id is not in `exclude`. */
  next(exclude: Iterable<number> = []): OutboxItem | undefined {
    this.checkOpen();
    let row: ItemRow | undefined;
    try {
      row = this.statements.next.get(JSON.stringify([...exclude])) as ItemRow | undefined;
    } catch (error) {
      throw this.wrap(error, "read of the next example", OutboxError);
    }
    return row === undefined ? undefined : toItem(row);
  }

  /** Deletes an item after the trainer acknowledged it. Returns false when it was gone already (evicted). */
  ack(id: number): boolean {
    this.checkOpen();
    const removed = this.write(`ack of example ${id}`, () =>
      this.db.transaction(() => {
        const row = this.statements.bytesOf.get(id) as { bytes: number } | undefined;
        if (row === undefined) {
          return undefined;
        }
        this.statements.remove.run(id);
        this.statements.counter.run(1, "acked");
        return row.bytes;
      })(),
    );
    if (removed === undefined) {
      return false;
    }
    this.items--;
    this.bytes -= removed;
    return true;
  }

  /** Returns the stored items and their payload bytes without reading the file. */
  size(): { items: number; bytes: number } {
    return { items: this.items, bytes: this.bytes };
  }

  /** Returns the size, the limits and the counters kept in the file. */
  stats(): OutboxStats {
    this.checkOpen();
    const counters = Object.fromEntries(COUNTERS.map((name) => [name, 0])) as Record<CounterName, number>;
    for (const row of this.statements.counters.all() as { name: string; value: number }[]) {
      if ((COUNTERS as readonly string[]).includes(row.name)) {
        counters[row.name as CounterName] = row.value;
      }
    }
    return { items: this.items, bytes: this.bytes, maxItems: this.options.maxItems, maxBytes: this.options.maxBytes, ...counters };
  }

  close(): void {
    if (this.closed) {
      return;
    }
    this.closed = true;
    this.db.close();
    this.logger.info({ file: this.file }, "outbox closed");
  }

  /** Runs inside the add transaction. Plans the evictions first, so a rejection deletes nothing. */
  private insertWithEviction(
    example: NewExample,
    meta: string,
    embedding: Buffer,
    size: number,
  ): { stored: true; id: number; evicted: number[]; evictedBytes: number } | { stored: false } {
    let items = this.items;
    let bytes = this.bytes;
    const victims: number[] = [];
    let victimBytes = 0;
    if (items + 1 > this.options.maxItems || bytes + size > this.options.maxBytes) {
      for (const row of this.statements.evictionOrder.iterate() as IterableIterator<{ id: number; priority: number; bytes: number }>) {
        if (row.priority > example.priority) {
          break;
        }
        victims.push(row.id);
        victimBytes += row.bytes;
        items--;
        bytes -= row.bytes;
        if (items + 1 <= this.options.maxItems && bytes + size <= this.options.maxBytes) {
          break;
        }
      }
      if (items + 1 > this.options.maxItems || bytes + size > this.options.maxBytes) {
        this.statements.counter.run(1, "rejected");
        return { stored: false };
      }
    }
    for (const id of victims) {
      this.statements.remove.run(id);
    }
    const createdAt = Math.round(example.createdAt ?? Date.now());
    const info = this.statements.insert.run(createdAt, example.priority, size, meta, example.jpeg, embedding);
    this.statements.counter.run(1, "added");
    if (victims.length > 0) {
      this.statements.counter.run(victims.length, "evicted");
    }
    return { stored: true, id: Number(info.lastInsertRowid), evicted: victims, evictedBytes: victimBytes };
  }

  private write<T>(description: string, operation: () => T): T {
    try {
      return operation();
    } catch (error) {
      throw this.wrap(error, description, OutboxWriteError);
    }
  }

  private wrap(error: unknown, description: string, type: typeof OutboxError): unknown {
    const code = sqliteCode(error);
    if (code === undefined) {
      return error;
    }
    return new type(`outbox ${description} failed: ${describeError(error)} (${this.file})`, code, { cause: error });
  }

  private checkOpen(): void {
    if (this.closed) {
      throw new Error(`outbox ${this.file} is closed`);
    }
  }
}

function toItem(row: ItemRow): OutboxItem {
  return {
    id: row.id,
    createdAt: row.created_at,
    priority: row.priority,
    bytes: row.bytes,
    meta: JSON.parse(row.meta) as ExampleMeta,
    jpeg: row.jpeg,
    embedding: decodeEmbedding(row.embedding),
  };
}
