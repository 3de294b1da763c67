import { describe, expect, it } from "vitest";

import { CsvParseError, formatCsvField, formatCsvRow, parseCsv, readLabelsCsv } from "../../src/trainer/labels-csv.js";

const SHA_A = "a".repeat(64);
const SHA_B = "b".repeat(64);

function fieldsOf(text: string): string[][] {
  return parseCsv(text).map((record) => record.fields);
}

function parseError(text: string): CsvParseError {
  try {
    parseCsv(text);
  } catch (error) {
    if (error instanceof CsvParseError) {
      return error;
    }
    throw error;
  }
  throw new Error(`parseCsv accepted ${JSON.stringify(text)}`);
}

describe("parseCsv", () => {
  it("splits plain fields and records", () => {
    expect(fieldsOf("a,b,c\n1,2,3\n")).toEqual([
      ["a", "b", "c"],
      ["1", "2", "3"],
    ]);
  });

  it("accepts a last record without a line break", () => {
    expect(fieldsOf("a,b\n1,2")).toEqual([
      ["a", "b"],
      ["1", "2"],
    ]);
  });

  it.each([
    ["CRLF", "a,b\r\n1,2\r\n"],
    ["LF", "a,b\n1,2\n"],
    ["lone CR", "a,b\r1,2\r"],
  ])("accepts %s line breaks", (_name, text) => {
    expect(fieldsOf(text)).toEqual([
      ["a", "b"],
      ["1", "2"],
    ]);
  });

  it("drops a leading byte order mark", () => {
    expect(fieldsOf("\uFEFFsha256,label\n")).toEqual([["sha256", "label"]]);
  });

  it("keeps empty fields", () => {
    expect(fieldsOf(",a,,\n")).toEqual([["", "a", "", ""]]);
  });

  it("skips blank lines", () => {
    const records = parseCsv("a\n\r\n\nb\n");

    expect(records.map((record) => record.fields)).toEqual([["a"], ["b"]]);
    expect(records.map((record) => record.line)).toEqual([1, 4]);
  });

  it("reads quoted fields with commas, quotes and line breaks", () => {
    const records = parseCsv('name,note\n"a, b","say ""hi""\r\nnext line"\nc,""\n');

    expect(records.map((record) => record.fields)).toEqual([
      ["name", "note"],
      ["a, b", 'say "hi"\r\nnext line'],
      ["c", ""],
    ]);
    expect(records.map((record) => record.line)).toEqual([1, 2, 4]);
  });

  it("returns no records for empty text", () => {
    expect(parseCsv("")).toEqual([]);
    expect(parseCsv("\uFEFF")).toEqual([]);
  });

  it("rejects an unterminated quoted field", () => {
    const error = parseError('a,b\n1,"open\n2,3\n');

    expect(error.line).toBe(2);
    expect(error.message).toContain("no closing quote");
  });

  it("rejects text after a closing quote", () => {
    const error = parseError('a\n"x"y\n');

    expect(error.line).toBe(2);
    expect(error.message).toContain("after a closing quote");
  });

  it("rejects a quote inside an unquoted field", () => {
    const error = parseError('a\nx"y\n');

    expect(error.line).toBe(2);
    expect(error.message).toContain("quote inside the unquoted field");
  });
});

describe("formatCsvRow", () => {
  it("quotes only fields that need it", () => {
    expect(formatCsvField("plain")).toBe("plain");
    expect(formatCsvField("a,b")).toBe('"a,b"');
    expect(formatCsvField('say "hi"')).toBe('"say ""hi"""');
    expect(formatCsvField("two\nlines")).toBe('"two\nlines"');
    expect(formatCsvField(" padded")).toBe('" padded"');
  });

  it("round-trips through parseCsv", () => {
    const values = ["/data/examples/ab/x,y.jpg", 'q"uote', "line\r\nbreak", "", "glass"];

    expect(fieldsOf(formatCsvRow(values))).toEqual([values]);
  });
});

describe("readLabelsCsv", () => {
  it("reads sha256 rows", () => {
    const result = readLabelsCsv(`sha256,label\r\n${SHA_A},glass\r\n${SHA_B.toUpperCase()}, Metal \r\n`);

    expect(result.errors).toEqual([]);
    expect(result.rows).toEqual([
      { line: 2, key: { sha256: SHA_A }, label: "glass" },
      { line: 3, key: { sha256: SHA_B }, label: "metal" },
    ]);
  });

  it("reads frame_id and device rows", () => {
    const result = readLabelsCsv("Device,Frame_ID,Label,comment\nedge-1,f-1,glass,looks green\n,f-2,discard,\n");

    expect(result.errors).toEqual([]);
    expect(result.rows).toEqual([
      { line: 2, key: { frameId: "f-1", device: "edge-1" }, label: "glass" },
      { line: 3, key: { frameId: "f-2" }, label: "discard" },
    ]);
  });

  it("prefers the sha256 when a row has both", () => {
    const result = readLabelsCsv(`sha256,frame_id,label\n${SHA_A},f-1,glass\n,f-2,metal\n`);

    expect(result.rows.map((row) => row.key)).toEqual([{ sha256: SHA_A }, { frameId: "f-2" }]);
  });

  it("reports invalid rows with their lines", () => {
    const result = readLabelsCsv(`sha256,frame_id,label\n${SHA_A},,\nnot-a-sha,,glass\n,,glass\n${SHA_A},glass\n${SHA_B},,metal\n`);

    expect(result.rows).toEqual([{ line: 6, key: { sha256: SHA_B }, label: "metal" }]);
    expect(result.errors).toHaveLength(4);
    expect(result.errors[0]).toEqual({ line: 2, message: "the label is empty" });
    expect(result.errors[1]!.line).toBe(3);
    expect(result.errors[1]!.message).toContain("invalid sha256 'not-a-sha'");
    expect(result.errors[2]).toEqual({ line: 4, message: "the row has neither a sha256 nor a frame_id" });
    expect(result.errors[3]).toEqual({ line: 5, message: "expected 3 fields as in the header, found 2" });
  });

  it.each([
    ["empty text", "", "the file is empty"],
    ["no label column", `sha256\n${SHA_A}\n`, "lacks a label column"],
    ["no example column", "device,label\nedge-1,glass\n", "lacks a label column or an example column"],
    ["a data row in place of the header", `${SHA_A},glass\n`, "lacks a label column"],
    ["a repeated column", "sha256,label,label\n", "names the column 'label' twice"],
  ])("rejects %s", (_name, text, message) => {
    expect(() => readLabelsCsv(text)).toThrow(CsvParseError);
    expect(() => readLabelsCsv(text)).toThrow(message);
  });
});
