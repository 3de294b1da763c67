/**
 * Rows of the fault-injection report. Each case appends one JSON line to
 * `$SORTLINE_FAULT_REPORT_DIR/rows.jsonl` (default `.sortline-faults/` in the repository), and
 * scripts/fault-report.mjs turns that file into docs/faults.md.
 */
import { appendFileSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { describeError } from "../../src/lib/errors.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

/** One row of the report table. Every field is plain text with the measured numbers in it. */
export interface FaultRow {
  case: string;
  injected: string;
  expected: string;
  observed: string;
  /** What was lost among acknowledged items, then what was dropped by design. */
  lost: string;
}

/** Folder of rows.jsonl and run.json. */
export function reportDir(): string {
  return path.resolve(process.env.SORTLINE_FAULT_REPORT_DIR ?? path.join(repoRoot, ".sortline-faults"));
}

/** Multiplier of durations and iteration counts from SORTLINE_FAULT_SCALE; 1 runs the full figures. */
export function faultScale(): number {
  const text = process.env.SORTLINE_FAULT_SCALE;
  if (text === undefined || text === "") {
    return 1;
  }
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) {
    throw new RangeError(`SORTLINE_FAULT_SCALE=${text} is invalid; expected a number > 0, such as 1 or 0.1`);
  }
  return value;
}

/** Scales a count or a duration and keeps it at least `minimum`, so that a small scale still injects the fault. */
export function scaled(full: number, minimum: number): number {
  return Math.max(minimum, Math.round(full * faultScale()));
}

/** Appends one row to rows.jsonl. */
export function appendRow(row: FaultRow): void {
  const dir = reportDir();
  mkdirSync(dir, { recursive: true });
  appendFileSync(path.join(dir, "rows.jsonl"), `${JSON.stringify(row)}\n`);
}

/**
 * Returns the text of the `lost` column. `acknowledged` counts, by kind, items lost after the
 * agent, the broker or the trainer acknowledged them. `droppedByDesign` lists what a bound or a
 * policy dropped on purpose.
 */
export function lostText(acknowledged: Record<string, number>, droppedByDesign: readonly string[] = []): string {
  const total = Object.values(acknowledged).reduce((sum, count) => sum + count, 0);
  const kinds = Object.entries(acknowledged)
    .map(([kind, count]) => `${kind} ${count}`)
    .join(", ");
  const byDesign = droppedByDesign.length ? droppedByDesign.join("; ") : "none";
  return `acknowledged and lost: ${total}${kinds ? ` (${kinds})` : ""}. Dropped by design: ${byDesign}`;
}

/** The measured fields of a row, filled in by the case as it goes. */
export interface RowDraft {
  observed: string;
  lost: string;
}

/**
 * Runs one fault case and appends its row, also when the case fails. A failure is appended to
 * the observed text, so the report shows how far the case got.
 */
export async function faultCase(meta: Pick<FaultRow, "case" | "injected" | "expected">, body: (row: RowDraft) => Promise<void>): Promise<void> {
  const draft: RowDraft = { observed: "", lost: "" };
  try {
    await body(draft);
  } catch (error) {
    const failure = `FAILED: ${describeError(error).split("\n")[0]}`;
    draft.observed = draft.observed ? `${draft.observed}; ${failure}` : failure;
    throw error;
  } finally {
    appendRow({ ...meta, observed: draft.observed || "nothing measured", lost: draft.lost || "not measured" });
  }
}
