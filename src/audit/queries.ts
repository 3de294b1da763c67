import { once } from "node:events";
import type { Writable } from "node:stream";

import type { Database } from "better-sqlite3";

import type { DecisionRecord } from "./types.js";

/** Decision-time range in milliseconds since the Unix epoch: `from` inclusive, `to` exclusive, open when absent. */
export interface TimeRange {
  from?: number;
  to?: number;
}

export interface DecisionQuery extends TimeRange {
  /** Maximum rows returned (default 100, at most MAX_QUERY_LIMIT). */
  limit?: number;
  label?: string;
  bin?: string;
}

/** A stored decision with its row id. `truth` is null when unknown. */
export type AuditRow = DecisionRecord & { id: number; truth: string | null };

/** Number of decisions with one value of a column. `key` is null for rows where the column is NULL. */
export interface CountByKey {
  key: string | null;
  count: number;
}

export interface ModelCount {
  modelName: string;
  modelVersion: string;
  count: number;
}

/** Nearest-rank percentiles of the capture-to-decision time, over decisions without an error. */
export interface LatencyPercentiles {
  count: number;
  p50: number | null;
  p95: number | null;
  p99: number | null;
}

export interface AuditSummary {
  total: number;
  errors: number;
  firstDecidedAt: number | null;
  lastDecidedAt: number | null;
  byBin: CountByKey[];
  byLabel: CountByKey[];
  bySource: CountByKey[];
  byModel: ModelCount[];
  /** Decisions with a known truth label, how many of them had label = truth, and the ratio (null when none). */
  accuracy: { labelled: number; correct: number; ratio: number | null };
  totalLatencyMs: LatencyPercentiles;
}

export const DEFAULT_QUERY_LIMIT = 100;
export const MAX_QUERY_LIMIT = 100_000;
/** Rows read per statement during a CSV export. The statement is reset between pages. */
const EXPORT_PAGE_ROWS = 1_000;

const RANGE_WHERE = "decided_at >= @from AND decided_at < @to";

interface DecisionRow {
  id: number;
  frame_id: string;
  source: string;
  captured_at: number;
  decided_at: number;
  model_name: string;
  model_version: string;
  model_sha256: string;
  top_json: string;
  label: string | null;
  confidence: number | null;
  bin: string | null;
  reason: string | null;
  queue_ms: number;
  decode_ms: number;
  inference_ms: number;
  total_ms: number;
  error: string | null;
  truth: string | null;
}

function rangeParams(range: TimeRange): { from: number; to: number } {
  return { from: range.from ?? Number.MIN_SAFE_INTEGER, to: range.to ?? Number.MAX_SAFE_INTEGER };
}

function toAuditRow(row: DecisionRow): AuditRow {
  return {
    id: row.id,
    frameId: row.frame_id,
    source: row.source,
    capturedAt: row.captured_at,
    decidedAt: row.decided_at,
    modelName: row.model_name,
    modelVersion: row.model_version,
    modelSha256: row.model_sha256,
    top: JSON.parse(row.top_json) as AuditRow["top"],
    label: row.label,
    confidence: row.confidence,
    bin: row.bin,
    reason: row.reason,
    latency: { queueMs: row.queue_ms, decodeMs: row.decode_ms, inferenceMs: row.inference_ms, totalMs: row.total_ms },
    error: row.error,
    truth: row.truth,
  };
}

function countBy(db: Database, column: "bin" | "label" | "source", range: TimeRange): CountByKey[] {
  const sql = `SELECT ${column} AS key, count(*) AS count FROM decisions WHERE ${RANGE_WHERE} GROUP BY ${column} ORDER BY count DESC, key`;
  return db.prepare(sql).all(rangeParams(range)) as CountByKey[];
}

/** Reads the nearest-rank p50/p95/p99 while stepping through the sorted latencies, never holding them all. */
function latencyPercentiles(db: Database, range: TimeRange): LatencyPercentiles {
  const where = `${RANGE_WHERE} AND error IS NULL`;
  const params = rangeParams(range);
  const { count } = db.prepare(`SELECT count(*) AS count FROM decisions WHERE ${where}`).get(params) as { count: number };
  const result: LatencyPercentiles = { count, p50: null, p95: null, p99: null };
  if (count === 0) {
    return result;
  }
  const ranks = { p50: Math.ceil(0.5 * count), p95: Math.ceil(0.95 * count), p99: Math.ceil(0.99 * count) };
  const sorted = db.prepare(`SELECT total_ms FROM decisions WHERE ${where} ORDER BY total_ms`).pluck();
  let rank = 0;
  for (const value of sorted.iterate(params) as IterableIterator<number>) {
    rank += 1;
    for (const key of ["p50", "p95", "p99"] as const) {
      if (rank === ranks[key]) {
        result[key] = value;
      }
    }
    if (rank === ranks.p99) {
      break;
    }
  }
  return result;
}

/** Computes counts, accuracy and latency percentiles of the decisions in the range. */
export function summarize(db: Database, range: TimeRange): AuditSummary {
  const params = rangeParams(range);
  const totals = db
    .prepare(
      `SELECT count(*) AS total, count(error) AS errors, min(decided_at) AS first, max(decided_at) AS last,
              count(truth) AS labelled, coalesce(sum(label = truth), 0) AS correct
       FROM decisions WHERE ${RANGE_WHERE}`,
    )
    .get(params) as { total: number; errors: number; first: number | null; last: number | null; labelled: number; correct: number };
  const byModel = db
    .prepare(
      `SELECT model_name AS modelName, model_version AS modelVersion, count(*) AS count FROM decisions
       WHERE ${RANGE_WHERE} GROUP BY model_name, model_version ORDER BY count DESC, modelName, modelVersion`,
    )
    .all(params) as ModelCount[];
  return {
    total: totals.total,
    errors: totals.errors,
    firstDecidedAt: totals.first,
    lastDecidedAt: totals.last,
    byBin: countBy(db, "bin", range),
    byLabel: countBy(db, "label", range),
    bySource: countBy(db, "source", range),
    byModel,
    accuracy: {
      labelled: totals.labelled,
      correct: totals.correct,
      ratio: totals.labelled > 0 ? totals.correct / totals.labelled : null,
    },
    totalLatencyMs: latencyPercentiles(db, range),
  };
}

/** Returns the matching decisions, newest first. Raises RangeError for a limit outside 1..MAX_QUERY_LIMIT. */
export function queryDecisions(db: Database, query: DecisionQuery): AuditRow[] {
  const limit = query.limit ?? DEFAULT_QUERY_LIMIT;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_QUERY_LIMIT) {
    throw new RangeError(`limit ${limit} is not a whole number from 1 to ${MAX_QUERY_LIMIT}`);
  }
  const rows = db
    .prepare(
      `SELECT * FROM decisions WHERE ${RANGE_WHERE}
         AND (@label IS NULL OR label = @label) AND (@bin IS NULL OR bin = @bin)
       ORDER BY decided_at DESC, id DESC LIMIT @limit`,
    )
    .all({ ...rangeParams(query), label: query.label ?? null, bin: query.bin ?? null, limit }) as DecisionRow[];
  return rows.map(toAuditRow);
}

/** CSV header. Times are ISO 8601 in UTC, latencies milliseconds, and `top` is the top-k list as JSON. */
export const CSV_COLUMNS = [
  "id", "frame_id", "source", "captured_at", "decided_at", "model_name", "model_version", "model_sha256",
  "label", "confidence", "bin", "reason", "queue_ms", "decode_ms", "inference_ms", "total_ms", "error", "truth", "top",
] as const;

/** Quotes a CSV field as RFC 4180 requires, which is when it contains a comma, a double quote, CR or LF. */
export function csvField(value: string | number | null): string {
  if (value === null) {
    return "";
  }
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function csvLine(row: DecisionRow): string {
  const fields = [
    row.id, row.frame_id, row.source, new Date(row.captured_at).toISOString(), new Date(row.decided_at).toISOString(),
    row.model_name, row.model_version, row.model_sha256, row.label, row.confidence, row.bin, row.reason,
    row.queue_ms, row.decode_ms, row.inference_ms, row.total_ms, row.error, row.truth, row.top_json,
  ];
  return `${fields.map(csvField).join(",")}\r\n`;
}

async function writeChunk(out: Writable | NodeJS.WritableStream, chunk: string): Promise<void> {
  if (!out.write(chunk)) {
    await once(out as Writable, "drain");
  }
}

/**
 * Writes the decisions in the range as CSV, oldest first. It reads pages of rows by keyset
 * (decided_at, id), so memory stays bounded and the connection is free for other statements
 * between pages. Returns the number of rows written. The caller ends the stream.
 */
export async function exportCsv(db: Database, range: TimeRange, out: Writable | NodeJS.WritableStream): Promise<number> {
  const page = db.prepare(
    `SELECT * FROM decisions WHERE ${RANGE_WHERE} AND (decided_at, id) > (@afterAt, @afterId)
     ORDER BY decided_at, id LIMIT ${EXPORT_PAGE_ROWS}`,
  );
  await writeChunk(out, `${CSV_COLUMNS.join(",")}\r\n`);
  let after = { afterAt: Number.MIN_SAFE_INTEGER, afterId: 0 };
  let written = 0;
  for (;;) {
    const rows = page.all({ ...rangeParams(range), ...after }) as DecisionRow[];
    if (rows.length === 0) {
      return written;
    }
    await writeChunk(out, rows.map(csvLine).join(""));
    written += rows.length;
    const last = rows[rows.length - 1]!;
    after = { afterAt: last.decided_at, afterId: last.id };
  }
}
