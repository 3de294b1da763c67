import { createWriteStream, existsSync } from "node:fs";
import { rm } from "node:fs/promises";
import { finished } from "node:stream/promises";
import { parseArgs } from "node:util";

import { DEFAULT_QUERY_LIMIT, MAX_QUERY_LIMIT } from "../audit/queries.js";
import { AuditOpenError, AuditStore, type AuditRow, type AuditSummary, type CountByKey, type TimeRange } from "../audit/store.js";
import { describeError } from "../lib/errors.js";
import { UsageError } from "./common.js";

export const DEFAULT_AUDIT_DB = "/var/lib/sortline/audit.db";

export const auditUsage = `Usage: sortline audit [--db FILE] [--from TIME] [--to TIME] summary|query|export [OPTIONS]

Reads the decision audit database that the agent writes.

Commands:
  summary        decisions per bin, label, source and model version, errors, accuracy, latency percentiles
  query          decisions, newest first
  export         decisions as CSV (RFC 4180), oldest first

Options:
  --db FILE      audit database (default: $SORTLINE_AUDIT_DB, else ${DEFAULT_AUDIT_DB})
  --from TIME    start of the decision-time range, inclusive (default: the first decision)
  --to TIME      end of the range, exclusive (default: no end)
  --json         summary, query: print JSON; query prints one object per line; times are ms since the Unix epoch
  --limit N      query: maximum decisions to print (default: ${DEFAULT_QUERY_LIMIT}, at most ${MAX_QUERY_LIMIT})
  --label NAME   query: only decisions with this top-1 label
  --bin NAME     query: only decisions sent to this bin
  --csv FILE     export: write the CSV to FILE instead of stdout
  -h, --help     print this help

TIME is ISO 8601 (2024-05-01, 2024-05-01T08:00:00Z; without a zone it is local time),
'now', or relative to now: -90s, -30m, -1h, -7d, -2w.`;

const SUBCOMMANDS = ["summary", "query", "export"] as const;
type Subcommand = (typeof SUBCOMMANDS)[number];

const RELATIVE_TIME = /^-(\d+(?:\.\d+)?)([smhdw])$/;
const UNIT_MS: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

/** Streams, environment and clock of one CLI run, so tests can pass their own. */
export interface AuditIo {
  out?: NodeJS.WritableStream;
  err?: NodeJS.WritableStream;
  env?: NodeJS.ProcessEnv;
  now?: number;
}

/** Parses an ISO 8601 time, 'now', or a relative time such as -30m into ms since the Unix epoch. */
export function parseTime(option: string, value: string, now: number): number {
  if (value === "now") {
    return now;
  }
  const relative = RELATIVE_TIME.exec(value);
  if (relative) {
    return now - Number(relative[1]) * UNIT_MS[relative[2]!]!;
  }
  const parsed = /^\d{4}-\d{2}-\d{2}/.test(value) ? Date.parse(value) : Number.NaN;
  if (Number.isNaN(parsed)) {
    throw new UsageError(`${option} ${value} is not an ISO 8601 time, 'now', or a relative time such as -30m, -1h, -7d`);
  }
  return parsed;
}

interface AuditArgs {
  subcommand: Subcommand;
  db: string;
  range: TimeRange;
  json: boolean;
  limit: number;
  label?: string;
  bin?: string;
  csv?: string;
}

type ParsedValues = ReturnType<typeof parseAuditArgv>["values"];

/**
 * Joins `--from -1h` into `--from=-1h`, because parseArgs rejects an option value that starts
 * with a dash as ambiguous, and relative times always do.
 */
function joinRelativeTimes(argv: string[]): string[] {
  const joined: string[] = [];
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i]!;
    const next = argv[i + 1];
    if ((arg === "--from" || arg === "--to") && next !== undefined && RELATIVE_TIME.test(next)) {
      joined.push(`${arg}=${next}`);
      i += 1;
    } else {
      joined.push(arg);
    }
  }
  return joined;
}

function parseAuditArgv(argv: string[]) {
  return parseArgs({
    args: joinRelativeTimes(argv),
    allowPositionals: true,
    options: {
      db: { type: "string" },
      from: { type: "string" },
      to: { type: "string" },
      json: { type: "boolean", default: false },
      limit: { type: "string" },
      label: { type: "string" },
      bin: { type: "string" },
      csv: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
}

/** Rejects options that the chosen subcommand does not use. */
function checkOptionsFit(subcommand: Subcommand, values: ParsedValues): void {
  const onlyFor: [keyof ParsedValues, Subcommand[]][] = [
    ["json", ["summary", "query"]],
    ["limit", ["query"]],
    ["label", ["query"]],
    ["bin", ["query"]],
    ["csv", ["export"]],
  ];
  for (const [option, allowed] of onlyFor) {
    if (values[option] !== undefined && values[option] !== false && !allowed.includes(subcommand)) {
      throw new UsageError(`--${option} applies to ${allowed.join(" and ")}, not to ${subcommand}`);
    }
  }
}

function parseLimit(value: string | undefined): number {
  if (value === undefined) {
    return DEFAULT_QUERY_LIMIT;
  }
  const limit = Number(value);
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_QUERY_LIMIT) {
    throw new UsageError(`--limit ${value} is not a whole number from 1 to ${MAX_QUERY_LIMIT}`);
  }
  return limit;
}

function toAuditArgs(values: ParsedValues, positionals: string[], io: Required<AuditIo>): AuditArgs {
  const [subcommand, ...extra] = positionals;
  if (subcommand === undefined) {
    throw new UsageError(`no command given; use one of ${SUBCOMMANDS.join(", ")}`);
  }
  if (!(SUBCOMMANDS as readonly string[]).includes(subcommand)) {
    throw new UsageError(`unknown command '${subcommand}'; use one of ${SUBCOMMANDS.join(", ")}`);
  }
  if (extra.length > 0) {
    throw new UsageError(`unexpected argument '${extra[0]}'`);
  }
  checkOptionsFit(subcommand as Subcommand, values);
  const from = values.from === undefined ? undefined : parseTime("--from", values.from, io.now);
  const to = values.to === undefined ? undefined : parseTime("--to", values.to, io.now);
  if (from !== undefined && to !== undefined && from >= to) {
    throw new UsageError(`--from ${values.from} is not before --to ${values.to}`);
  }
  return {
    subcommand: subcommand as Subcommand,
    db: values.db ?? io.env.SORTLINE_AUDIT_DB ?? DEFAULT_AUDIT_DB,
    range: { from, to },
    json: values.json ?? false,
    limit: parseLimit(values.limit),
    label: values.label,
    bin: values.bin,
    csv: values.csv,
  };
}

function formatRange(range: TimeRange): string {
  if (range.from === undefined && range.to === undefined) {
    return "all decisions";
  }
  return `${isoOrDash(range.from)} to ${isoOrDash(range.to)}`;
}

function isoOrDash(ms: number | null | undefined): string {
  return ms === null || ms === undefined ? "-" : new Date(ms).toISOString();
}

/** Replaces control characters so one stored value cannot break a line of a text table. */
function printable(value: string | number | null | undefined): string {
  if (value === null || value === undefined) {
    return "-";
  }
  return String(value).replace(/[\u0000-\u001f\u007f]+/g, " ");
}

/** Formats rows as columns padded to the widest cell. Columns listed in `rightAligned` are padded on the left. */
function formatTable(headers: string[], rows: string[][], rightAligned: number[] = []): string {
  const widths = headers.map((header, column) => Math.max(header.length, ...rows.map((row) => row[column]!.length)));
  const line = (cells: string[]): string =>
    cells
      .map((cell, column) => (rightAligned.includes(column) ? cell.padStart(widths[column]!) : cell.padEnd(widths[column]!)))
      .join("  ")
      .trimEnd();
  return [line(headers), ...rows.map(line)].join("\n");
}

function countTable(title: string, counts: CountByKey[] | { key: string; count: number }[], total: number): string {
  const rows = counts.map((entry) => [
    entry.key === null ? "(none)" : printable(entry.key),
    String(entry.count),
    `${((100 * entry.count) / total).toFixed(1)}%`,
  ]);
  return formatTable([title, "Decisions", "Share"], rows, [1, 2]);
}

function formatMs(value: number | null): string {
  return value === null ? "-" : `${value.toFixed(1)} ms`;
}

/** Formats the summary as a heading block followed by one count table per dimension. */
export function formatSummary(db: string, range: TimeRange, summary: AuditSummary): string {
  const { accuracy, totalLatencyMs: latency } = summary;
  const accuracyText =
    accuracy.ratio === null ? "- (no decisions with a truth label)" : `${(100 * accuracy.ratio).toFixed(1)}% (${accuracy.correct} of ${accuracy.labelled} with a truth label)`;
  const heading = formatTable(
    ["Audit database", db],
    [
      ["Range", formatRange(range)],
      ["Decisions", `${summary.total} (first ${isoOrDash(summary.firstDecidedAt)}, last ${isoOrDash(summary.lastDecidedAt)})`],
      ["Errors", String(summary.errors)],
      ["Accuracy", accuracyText],
      ["Total latency", `p50 ${formatMs(latency.p50)}, p95 ${formatMs(latency.p95)}, p99 ${formatMs(latency.p99)} (decisions without error: ${latency.count})`],
    ],
  );
  if (summary.total === 0) {
    return `${heading}\n`;
  }
  const models = summary.byModel.map((entry) => ({ key: `${entry.modelName} ${entry.modelVersion}`, count: entry.count }));
  const tables = [
    countTable("Bin", summary.byBin, summary.total),
    countTable("Label", summary.byLabel, summary.total),
    countTable("Source", summary.bySource, summary.total),
    countTable("Model version", models, summary.total),
  ];
  return `${[heading, ...tables].join("\n\n")}\n`;
}

/** Formats decisions as a text table, one line per decision. */
export function formatRows(rows: AuditRow[]): string {
  const headers = ["Decided at", "Frame", "Source", "Label", "Conf.", "Bin", "Total ms", "Reason / error"];
  const cells = rows.map((row) => [
    new Date(row.decidedAt).toISOString(),
    printable(row.frameId),
    printable(row.source),
    printable(row.label),
    row.confidence === null ? "-" : row.confidence.toFixed(3),
    printable(row.bin),
    row.latency.totalMs.toFixed(1),
    printable(row.error ?? row.reason),
  ]);
  return `${formatTable(headers, cells, [4, 6])}\n`;
}

/** Writes the CSV to `file`. A failed export removes the partial file. */
async function exportToFile(store: AuditStore, range: TimeRange, file: string): Promise<number> {
  const stream = createWriteStream(file);
  try {
    const rows = await store.exportCsv(range, stream);
    stream.end();
    await finished(stream);
    return rows;
  } catch (error) {
    stream.destroy();
    await rm(file, { force: true });
    throw error;
  }
}

/** Writes `text` and resolves once the stream has handed it on, or rejects with the write error. */
function writeAll(out: NodeJS.WritableStream, text: string): Promise<void> {
  return new Promise((resolve, reject) => {
    out.write(text, (error?: Error | null) => (error ? reject(error) : resolve()));
  });
}

function isBrokenPipe(error: unknown): boolean {
  return (error as NodeJS.ErrnoException | undefined)?.code === "EPIPE";
}

function isFileSystemError(error: unknown): error is NodeJS.ErrnoException {
  return error instanceof Error && typeof (error as NodeJS.ErrnoException).syscall === "string";
}

/** Runs the subcommand and returns its exit code: 1 when the --csv file cannot be written. */
async function runSubcommand(store: AuditStore, args: AuditArgs, out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  if (args.subcommand === "summary") {
    const summary = store.summary(args.range);
    const json = JSON.stringify({ db: args.db, from: args.range.from ?? null, to: args.range.to ?? null, ...summary });
    await writeAll(out, args.json ? `${json}\n` : formatSummary(args.db, args.range, summary));
    return 0;
  }
  if (args.subcommand === "query") {
    const rows = store.query({ ...args.range, limit: args.limit, label: args.label, bin: args.bin });
    await writeAll(out, args.json ? rows.map((row) => `${JSON.stringify(row)}\n`).join("") : formatRows(rows));
    return 0;
  }
  if (args.csv === undefined) {
    await store.exportCsv(args.range, out);
    return 0;
  }
  try {
    const rows = await exportToFile(store, args.range, args.csv);
    err.write(`sortline audit: wrote ${rows} decisions to ${args.csv}\n`);
    return 0;
  } catch (error) {
    if (!isFileSystemError(error)) {
      throw error;
    }
    err.write(`sortline audit: cannot write ${args.csv}: ${describeError(error)}\n`);
    return 1;
  }
}

/**
 * Runs the subcommand and treats EPIPE on `out` as success, because a reader that closes the pipe
 * early (`sortline audit export | head`) ends the output, not the command. The 'error' listener
 * keeps that EPIPE from going unhandled, and stays attached once an error arrived.
 */
async function runToClosedPipe(run: () => Promise<number>, out: NodeJS.WritableStream): Promise<number> {
  let outputError: unknown;
  const onOutputError = (error: unknown): void => {
    outputError = error;
  };
  out.on("error", onOutputError);
  let code = 0;
  try {
    code = await run();
  } catch (error) {
    if (!isBrokenPipe(error)) {
      throw error;
    }
  }
  if (outputError === undefined) {
    out.off("error", onOutputError);
  } else if (!isBrokenPipe(outputError)) {
    throw outputError;
  }
  return code;
}

/** Opens the database read-only, or prints why it cannot be opened and returns undefined. */
function openForReading(file: string, err: NodeJS.WritableStream): AuditStore | undefined {
  if (!existsSync(file)) {
    err.write(`sortline audit: audit database ${file} not found; pass --db FILE or set SORTLINE_AUDIT_DB\n`);
    return undefined;
  }
  try {
    return AuditStore.open(file, { readonly: true });
  } catch (error) {
    if (error instanceof AuditOpenError) {
      err.write(`sortline audit: ${describeError(error)}\n`);
      return undefined;
    }
    throw error;
  }
}

/**
 * Runs `sortline audit` and returns the exit code: 0, or 1 when the database is missing or cannot
 * be read or the --csv file cannot be written. Raises UsageError (exit 2) for an invalid command line.
 */
export async function runAudit(argv: string[], io: AuditIo = {}): Promise<number> {
  const full: Required<AuditIo> = {
    out: io.out ?? process.stdout,
    err: io.err ?? process.stderr,
    env: io.env ?? process.env,
    now: io.now ?? Date.now(),
  };
  const { values, positionals } = parseAuditArgv(argv);
  if (values.help) {
    full.out.write(`${auditUsage}\n`);
    return 0;
  }
  const args = toAuditArgs(values, positionals, full);
  const store = openForReading(args.db, full.err);
  if (store === undefined) {
    return 1;
  }
  try {
    return await runToClosedPipe(() => runSubcommand(store, args, full.out, full.err), full.out);
  } finally {
    store.close();
  }
}
