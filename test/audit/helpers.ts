import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import type { DecisionRecord } from "../../src/audit/types.js";

/** Creates a temporary folder and returns it with a function that removes it. */
export function makeTempDir(prefix: string): { dir: string; remove: () => void } {
  const dir = mkdtempSync(path.join(tmpdir(), `sortline-${prefix}-`));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Base time of the fixtures: 2024-05-01T08:00:00Z. */
export const T0 = Date.UTC(2024, 4, 1, 8, 0, 0);

/** Builds a successful decision for frame `frameId`; `overrides` replaces any field. */
export function makeRecord(frameId: string, overrides: Partial<DecisionRecord> = {}): DecisionRecord {
  return {
    frameId,
    source: "cam-1",
    capturedAt: T0 - 40,
    decidedAt: T0,
    modelName: "resnet50-waste",
    modelVersion: "1.2.0",
    modelSha256: "a".repeat(64),
    top: [
      { label: "pet-bottle", p: 0.91 },
      { label: "hdpe", p: 0.06 },
    ],
    label: "pet-bottle",
    confidence: 0.91,
    bin: "plastic",
    reason: null,
    latency: { queueMs: 5, decodeMs: 8, inferenceMs: 20, totalMs: 40 },
    error: null,
    truth: null,
    ...overrides,
  };
}

/** Builds a record for a frame that failed to decode, so no bin was sent to the actuator. */
export function makeFailedRecord(frameId: string, error: string, overrides: Partial<DecisionRecord> = {}): DecisionRecord {
  return makeRecord(frameId, { top: [], label: null, confidence: null, bin: null, reason: "decode-failed", error, ...overrides });
}

/** Parses RFC 4180 CSV (quoted fields may hold commas, doubled quotes, CR and LF) into rows of fields. */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const char = text[i]!;
    if (quoted) {
      if (char === '"' && text[i + 1] === '"') {
        field += '"';
        i += 1;
      } else if (char === '"') {
        quoted = false;
      } else {
        field += char;
      }
    } else if (char === '"') {
      quoted = true;
    } else if (char === ",") {
      row.push(field);
      field = "";
    } else if (char === "\r" && text[i + 1] === "\n") {
      row.push(field);
      rows.push(row);
      row = [];
      field = "";
      i += 1;
    } else {
      field += char;
    }
  }
  if (field !== "" || row.length > 0) {
    row.push(field);
    rows.push(row);
  }
  return rows;
}
