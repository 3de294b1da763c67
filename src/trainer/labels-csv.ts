/**
 * CSV reading and writing for label files.
 *
 * `parseCsv` reads RFC 4180 CSV as spreadsheets write it: fields separated by commas, records by
 * CRLF, LF or a lone CR, fields in double quotes may contain commas, line breaks and doubled quotes
 * (`""`), and a leading UTF-8 byte order mark is ignored. `readLabelsCsv` turns the records of a
 * labels file into rows that name one example and one label each.
 */
import { SortlineError } from "../lib/errors.js";

/** A CSV text that cannot be parsed, or a labels file whose header is unusable. `line` is 1-based. */
export class CsvParseError extends SortlineError {
  constructor(
    readonly line: number,
    message: string,
  ) {
    super(`line ${line}: ${message}`);
  }
}

/** One CSV record and the 1-based line on which it starts. */
export interface CsvRecord {
  line: number;
  fields: string[];
}

const BYTE_ORDER_MARK = "\uFEFF";

/**
 * Parses CSV text into records. Records with one empty field (blank lines) are left out.
 * Raises CsvParseError for an unterminated quoted field, a character after a closing quote, or a
 * quote inside an unquoted field.
 */
export function parseCsv(text: string): CsvRecord[] {
  const input = text.startsWith(BYTE_ORDER_MARK) ? text.slice(1) : text;
  const records: CsvRecord[] = [];
  let line = 1;
  let recordLine = 1;
  let fields: string[] = [];
  let position = 0;

  const endRecord = (): void => {
    if (!(fields.length === 1 && fields[0] === "")) {
      records.push({ line: recordLine, fields });
    }
    fields = [];
  };

  while (position <= input.length) {
    if (fields.length === 0) {
      recordLine = line;
    }
    let value: string;
    if (input[position] === '"') {
      const startLine = line;
      value = "";
      position += 1;
      for (;;) {
        if (position >= input.length) {
          throw new CsvParseError(startLine, "quoted field has no closing quote");
        }
        const char = input[position]!;
        if (char === '"') {
          if (input[position + 1] === '"') {
            value += '"';
            position += 2;
            continue;
          }
          position += 1;
          break;
        }
        if (char === "\n" || (char === "\r" && input[position + 1] !== "\n")) {
          line += 1;
        }
        value += char;
        position += 1;
      }
      const next = input[position];
      if (next !== undefined && next !== "," && next !== "\r" && next !== "\n") {
        throw new CsvParseError(line, `unexpected character '${next}' after a closing quote; a quoted field must end at a comma or line break`);
      }
    } else {
      let end = position;
      while (end < input.length && input[end] !== "," && input[end] !== "\r" && input[end] !== "\n") {
        end += 1;
      }
      value = input.slice(position, end);
      if (value.includes('"')) {
        throw new CsvParseError(line, `quote inside the unquoted field '${value}'; put the whole field in quotes and double the inner quotes`);
      }
      position = end;
    }
    fields.push(value);

    const separator = input[position];
    if (separator === ",") {
      position += 1;
      continue;
    }
    endRecord();
    if (separator === undefined) {
      break;
    }
    position += separator === "\r" && input[position + 1] === "\n" ? 2 : 1;
    line += 1;
    if (position === input.length) {
      break;
    }
  }
  return records;
}

/** Quotes a field when it contains a comma, quote, line break or leading or trailing space. */
export function formatCsvField(value: string): string {
  if (/[",\r\n]/.test(value) || value.trim() !== value) {
    return `"${value.replaceAll('"', '""')}"`;
  }
  return value;
}

/** Formats one CSV record, terminated by LF. */
export function formatCsvRow(values: readonly string[]): string {
  return `${values.map(formatCsvField).join(",")}\n`;
}

/**
 * The example reference of a labels row: the image sha256, or the edge frame id with an optional
 * device, because frame ids are only unique per device.
 */
export type ExampleKey = { sha256: string } | { frameId: string; device?: string };

/** One usable row of a labels file. `label` is trimmed and lower-cased. */
export interface LabelsCsvRow {
  line: number;
  key: ExampleKey;
  label: string;
}

/** A row of a labels file that was skipped, with the reason. */
export interface LabelsCsvRowError {
  line: number;
  message: string;
}

export interface LabelsCsv {
  rows: LabelsCsvRow[];
  errors: LabelsCsvRowError[];
}

const SHA256_PATTERN = /^[0-9a-f]{64}$/;
const HEADER_HINT = "expected a header such as 'sha256,label' or 'device,frame_id,label'";

/**
 * Reads a labels file: a header row with a `label` column and a `sha256` or `frame_id` column
 * (plus an optional `device` column), then one row per example. Header names are matched without
 * case, and other columns are ignored. When a row has a sha256 it is used, otherwise its frame id.
 *
 * Raises CsvParseError when the text is not valid CSV or the header lacks the required columns.
 * Rows with missing or invalid values are returned in `errors`.
 */
export function readLabelsCsv(text: string): LabelsCsv {
  const records = parseCsv(text);
  const header = records[0];
  if (header === undefined) {
    throw new CsvParseError(1, `the file is empty; ${HEADER_HINT}`);
  }
  const columns = header.fields.map((name) => name.trim().toLowerCase());
  const duplicate = columns.find((name, index) => name !== "" && columns.indexOf(name) !== index);
  if (duplicate !== undefined) {
    throw new CsvParseError(header.line, `the header names the column '${duplicate}' twice`);
  }
  const labelColumn = columns.indexOf("label");
  const shaColumn = columns.indexOf("sha256");
  const frameColumn = columns.indexOf("frame_id");
  const deviceColumn = columns.indexOf("device");
  if (labelColumn < 0 || (shaColumn < 0 && frameColumn < 0)) {
    throw new CsvParseError(header.line, `the header '${header.fields.join(",")}' lacks a label column or an example column; ${HEADER_HINT}`);
  }

  const result: LabelsCsv = { rows: [], errors: [] };
  for (const record of records.slice(1)) {
    if (record.fields.length !== columns.length) {
      result.errors.push({ line: record.line, message: `expected ${columns.length} fields as in the header, found ${record.fields.length}` });
      continue;
    }
    const cell = (column: number): string => (column < 0 ? "" : record.fields[column]!.trim());
    const label = cell(labelColumn).toLowerCase();
    if (label === "") {
      result.errors.push({ line: record.line, message: "the label is empty" });
      continue;
    }
    const sha256 = cell(shaColumn).toLowerCase();
    const frameId = cell(frameColumn);
    const device = cell(deviceColumn);
    if (sha256 !== "") {
      if (!SHA256_PATTERN.test(sha256)) {
        result.errors.push({ line: record.line, message: `invalid sha256 '${sha256}'; expected 64 hexadecimal digits` });
        continue;
      }
      result.rows.push({ line: record.line, key: { sha256 }, label });
    } else if (frameId !== "") {
      result.rows.push({ line: record.line, key: device === "" ? { frameId } : { frameId, device }, label });
    } else {
      result.errors.push({ line: record.line, message: "the row has neither a sha256 nor a frame_id" });
    }
  }
  return result;
}
