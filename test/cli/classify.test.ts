import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { makeTempDir } from "../audit/helpers.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const bin = path.join(root, "bin", "sortline.js");
const photosDir = path.join(root, "demo", "photos");
const modelDir = path.join(root, "models", "default");
const uprightPhoto = path.join(photosDir, "glass", "glass143.jpg");
const secondPhoto = path.join(photosDir, "cardboard", "cardboard139.jpg");

/** Limit on the CLI's peak resident set size for the huge image. One demo photo peaks near 220 MB on x86-64 Linux. */
const MAX_RSS_BYTES = 1.5 * 1024 ** 3;

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

interface ClassifiedLine {
  file: string;
  label: string;
  confidence: number;
  top: { label: string; p: number }[];
}

interface ErrorLine {
  file: string;
  error: string;
}

type JsonLine = ClassifiedLine | ErrorLine;

/** Runs the built CLI as a user would, with `nodeArgs` passed to node before the script. */
function runCli(args: string[], nodeArgs: string[] = []): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...nodeArgs, bin, ...args], {
      cwd: root,
      env: { ...process.env, SORTLINE_LOG_LEVEL: "warn" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on("data", (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => stderr.push(chunk));
    child.on("error", reject);
    child.on("close", (code) => {
      resolve({ code, stdout: Buffer.concat(stdout).toString("utf8"), stderr: Buffer.concat(stderr).toString("utf8") });
    });
  });
}

function parseJsonLines(stdout: string): JsonLine[] {
  return stdout
    .split("\n")
    .filter((line) => line.length > 0)
    .map((line) => JSON.parse(line) as JsonLine);
}

function readLabels(): string[] {
  return (JSON.parse(readFileSync(path.join(modelDir, "manifest.json"), "utf8")) as { labels: string[] }).labels;
}

/** Checks one successful JSON line against the output contract and the manifest labels. */
function expectClassified(line: JsonLine | undefined, labels: string[], top: number): ClassifiedLine {
  expect(line, "line present").toBeDefined();
  expect(line, JSON.stringify(line)).not.toHaveProperty("error");
  const classified = line as ClassifiedLine;
  expect(Object.keys(classified).sort()).toEqual(["confidence", "file", "label", "top"]);
  expect(labels).toContain(classified.label);
  expect(classified.top).toHaveLength(top);
  expect(classified.top[0]!.label).toBe(classified.label);
  expect(classified.top[0]!.p).toBe(classified.confidence);
  expect(classified.confidence).toBeGreaterThan(0);
  expect(classified.confidence).toBeLessThanOrEqual(1);
  for (let i = 1; i < classified.top.length; i++) {
    expect(classified.top[i]!.p).toBeLessThanOrEqual(classified.top[i - 1]!.p);
    expect(labels).toContain(classified.top[i]!.label);
  }
  return classified;
}

function expectErrorLine(line: JsonLine | undefined, file: string): ErrorLine {
  expect(line, `line for ${file}`).toBeDefined();
  expect(Object.keys(line!).sort()).toEqual(["error", "file"]);
  expect(line!.file).toBe(file);
  const { error } = line as ErrorLine;
  expect(error.length).toBeGreaterThan(0);
  return line as ErrorLine;
}

describe("sortline classify", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let labels: string[];
  let demoRun: Promise<Result> | undefined;

  /** Runs classify on demo/photos once and shares the result between tests. */
  const classifyDemoPhotos = (): Promise<Result> => {
    demoRun ??= runCli(["classify", "--json", photosDir]);
    return demoRun;
  };

  beforeAll(async () => {
    await promisify(execFile)(process.execPath, [path.join(root, "node_modules", "typescript", "bin", "tsc"), "-p", root], { cwd: root });
    if (!existsSync(path.join(modelDir, "manifest.json"))) {
      throw new Error(`${modelDir}/manifest.json not found; build the default model with 'npm run model:default'`);
    }
    labels = readLabels();
    temp = makeTempDir("cli-classify");
  }, 180_000);

  afterAll(() => {
    temp?.remove();
  });

  it("demo photos give one JSON line each", async () => {
    const { code, stdout, stderr } = await classifyDemoPhotos();

    expect(code, stderr).toBe(0);
    const lines = parseJsonLines(stdout);
    const expectedFiles = readdirSync(photosDir, { recursive: true, encoding: "utf8" })
      .filter((name) => name.endsWith(".jpg"))
      .map((name) => path.join(photosDir, name))
      .sort();
    expect(expectedFiles).toHaveLength(36);
    expect(lines.map((line) => line.file)).toEqual(expectedFiles);
    for (const line of lines) {
      expectClassified(line, labels, 3);
    }
  });

  it("most demo photos match their folder", async () => {
    const { stdout } = await classifyDemoPhotos();

    const lines = parseJsonLines(stdout) as ClassifiedLine[];
    const wrong = lines.filter((line) => line.label !== path.basename(path.dirname(line.file)));
    expect(lines).toHaveLength(36);
    expect(wrong.length, wrong.map((line) => `${line.file} -> ${line.label}`).join("\n")).toBeLessThanOrEqual(6);
  });

  it("text output has one line per photo", async () => {
    const { code, stdout } = await runCli(["classify", path.join(photosDir, "metal"), path.join(photosDir, "paper")]);

    expect(code).toBe(0);
    const lines = stdout.trim().split("\n");
    expect(lines).toHaveLength(12);
    for (const line of lines) {
      const [file, label, confidence, top, ...rest] = line.split("\t");
      expect(rest).toEqual([]);
      expect(file).toMatch(/\/(metal|paper)\/\w+\.jpg$/);
      expect(labels).toContain(label);
      expect(confidence).toMatch(/^[01]\.\d{3}$/);
      expect(top).toMatch(new RegExp(`^\\(${label} ${confidence}, \\w+ [01]\\.\\d{3}, \\w+ [01]\\.\\d{3}\\)$`));
    }
  });

  it("--top 1 prints one label", async () => {
    const { code, stdout } = await runCli(["classify", "--json", "--top", "1", uprightPhoto, secondPhoto]);

    expect(code).toBe(0);
    const lines = parseJsonLines(stdout);
    expect(lines).toHaveLength(2);
    expectClassified(lines[0], labels, 1);
    expectClassified(lines[1], labels, 1);
  });

  it("--top above class count lists every label", async () => {
    const { code, stdout } = await runCli(["classify", "--json", "--top", "50", uprightPhoto]);

    expect(code).toBe(0);
    const line = expectClassified(parseJsonLines(stdout)[0], labels, labels.length);
    expect(line.top.map((entry) => entry.label).sort()).toEqual([...labels].sort());
  });

  it("folder walk skips files that are not images", async () => {
    const folder = path.join(temp.dir, "walk");
    mkdirSync(path.join(folder, "nested"), { recursive: true });
    copyFileSync(uprightPhoto, path.join(folder, "nested", "photo.JPG"));
    writeFileSync(path.join(folder, "README.txt"), "notes\n");

    const { code, stdout } = await runCli(["classify", "--json", folder]);

    expect(code).toBe(0);
    const lines = parseJsonLines(stdout);
    expect(lines.map((line) => line.file)).toEqual([path.join(folder, "nested", "photo.JPG")]);
  });

  describe("unusual files", () => {
    const files: Record<string, string> = {};
    let upright: ClassifiedLine;
    let lines: Map<string, JsonLine>;
    let result: Result;

    beforeAll(async () => {
      const dir = path.join(temp.dir, "unusual");
      mkdirSync(dir);
      const add = (name: string): string => (files[name] = path.join(dir, name));
      const photo = readFileSync(uprightPhoto);

      // Stored 90 degrees counter-clockwise with EXIF orientation 6, so viewers show it upright.
      await sharp(photo).rotate(-90).withMetadata({ orientation: 6 }).jpeg({ quality: 95 }).toFile(add("exif6.jpg"));
      await sharp(photo).toColourspace("cmyk").jpeg().toFile(add("cmyk.jpg"));
      await sharp(photo).greyscale().jpeg().toFile(add("grey.jpg"));
      await sharp(photo).ensureAlpha(0.5).png().toFile(add("rgba.png"));
      await sharp(photo).webp().toFile(add("photo.webp"));
      await sharp(photo).toColourspace("rgb16").png().toFile(add("16bit.png"));
      await sharp(photo).resize(20, 15, { fit: "fill" }).png().toFile(add("tiny.png"));
      writeFileSync(add("truncated.jpg"), photo.subarray(0, photo.length >> 1));
      writeFileSync(add("random.jpg"), randomBytes(4096));
      writeFileSync(add("empty.jpg"), Buffer.alloc(0));
      writeFileSync(add("notes.txt"), "cardboard box, flattened\n");
      files["missing.jpg"] = path.join(dir, "missing.jpg");

      const order = ["exif6.jpg", "cmyk.jpg", "truncated.jpg", "grey.jpg", "random.jpg", "rgba.png", "empty.jpg"];
      order.push("missing.jpg", "photo.webp", "notes.txt", "16bit.png", "tiny.png");
      result = await runCli(["classify", "--json", uprightPhoto, ...order.map((name) => files[name]!)]);
      const parsed = parseJsonLines(result.stdout);
      lines = new Map(parsed.map((line) => [line.file, line]));
      upright = parsed[0] as ClassifiedLine;
    }, 120_000);

    it("run continues past bad files", () => {
      expect(result.code, result.stderr).toBe(0);
      expect(lines.size).toBe(Object.keys(files).length + 1);
      expectClassified(upright, labels, 3);
    });

    it("EXIF orientation 6 matches upright", () => {
      const rotated = expectClassified(lines.get(files["exif6.jpg"]!), labels, 3);

      expect(rotated.label).toBe(upright.label);
      expect(rotated.confidence).toBeCloseTo(upright.confidence, 1);
    });

    it.each(["cmyk.jpg", "grey.jpg", "rgba.png", "photo.webp", "16bit.png"])("%s classifies", (name) => {
      expectClassified(lines.get(files[name]!), labels, 3);
    });

    it("tiny image is scaled up and classifies", () => {
      expectClassified(lines.get(files["tiny.png"]!), labels, 3);
    });

    it("truncated JPEG gives an error line", () => {
      const line = expectErrorLine(lines.get(files["truncated.jpg"]!), files["truncated.jpg"]!);

      expect(line.error).toContain("premature end of JPEG");
    });

    it.each(["random.jpg", "notes.txt"])("%s gives an unsupported format error", (name) => {
      const line = expectErrorLine(lines.get(files[name]!), files[name]!);

      expect(line.error).toContain("unsupported image format");
    });

    it("empty file gives an error line", () => {
      const line = expectErrorLine(lines.get(files["empty.jpg"]!), files["empty.jpg"]!);

      expect(line.error).toContain("empty");
    });

    it("missing path gives file not found", () => {
      const line = expectErrorLine(lines.get(files["missing.jpg"]!), files["missing.jpg"]!);

      expect(line.error).toBe("file not found");
    });

    it("text mode prints error lines", async () => {
      const { code, stdout } = await runCli(["classify", files["truncated.jpg"]!, uprightPhoto]);

      expect(code).toBe(0);
      const [bad, good] = stdout.trim().split("\n");
      expect(bad!.startsWith(`${files["truncated.jpg"]!}\terror: `)).toBe(true);
      expect(bad).toContain("premature end of JPEG");
      expect(good!.split("\t")[1]).toBe(upright.label);
    });
  });

  describe("large images", () => {
    it("huge image classifies with bounded memory", async () => {
      const dir = path.join(temp.dir, "large");
      mkdirSync(dir, { recursive: true });
      const huge = path.join(dir, "huge-10000x7500.jpg");
      // 75 megapixels, under the 100-megapixel decode limit.
      await sharp(uprightPhoto).resize(10_000, 7_500, { fit: "fill" }).jpeg({ quality: 90 }).toFile(huge);
      const peakFile = path.join(dir, "peak-rss.txt");
      const hook = path.join(dir, "peak-rss.cjs");
      // process.resourceUsage().maxRSS is in kilobytes (Node.js 20 docs).
      writeFileSync(
        hook,
        `process.on("exit", () => require("node:fs").writeFileSync(${JSON.stringify(peakFile)}, String(process.resourceUsage().maxRSS * 1024)));\n`,
      );

      const { code, stdout, stderr } = await runCli(["classify", "--json", huge], ["--require", hook]);

      expect(code, stderr).toBe(0);
      const line = expectClassified(parseJsonLines(stdout)[0], labels, 3);
      expect(line.file).toBe(huge);
      const peakBytes = Number(readFileSync(peakFile, "utf8"));
      expect(peakBytes).toBeGreaterThan(0);
      expect(peakBytes).toBeLessThan(MAX_RSS_BYTES);
    }, 180_000);

    it("image over 100 megapixels gives an error line", async () => {
      const dir = path.join(temp.dir, "large");
      mkdirSync(dir, { recursive: true });
      const tooLarge = path.join(dir, "over-limit-12000x9000.jpg");
      await sharp({ create: { width: 12_000, height: 9_000, channels: 3, background: "#7a6a50" } }).jpeg().toFile(tooLarge);

      const { code, stdout } = await runCli(["classify", "--json", tooLarge, uprightPhoto]);

      expect(code).toBe(0);
      const [first, second] = parseJsonLines(stdout);
      const line = expectErrorLine(first, tooLarge);
      expect(line.error).toContain("pixel limit");
      expectClassified(second, labels, 3);
    }, 180_000);
  });

  describe("exit codes", () => {
    const usageCases: { name: string; args: string[]; message: string }[] = [
      { name: "no paths", args: ["classify"], message: "no image files or folders given" },
      { name: "zero --top", args: ["classify", "--top", "0", uprightPhoto], message: "--top 0 is not a positive whole number" },
      { name: "text --top", args: ["classify", "--top", "three", uprightPhoto], message: "--top three is not a positive whole number" },
      { name: "fractional --top", args: ["classify", "--top", "1.5", uprightPhoto], message: "--top 1.5 is not a positive whole number" },
      { name: "unknown --provider", args: ["classify", "--provider", "gpu", uprightPhoto], message: "--provider gpu is not one of tensorrt, cuda, cpu" },
      { name: "unknown option", args: ["classify", "--colour", uprightPhoto], message: "--colour" },
      { name: "--model without value", args: ["classify", uprightPhoto, "--model"], message: "--model" },
    ];

    for (const { name, args, message } of usageCases) {
      it(`${name} exits 2`, async () => {
        const { code, stdout, stderr } = await runCli(args);

        expect(code).toBe(2);
        expect(stdout).toBe("");
        expect(stderr).toContain(`sortline classify: `);
        expect(stderr).toContain(message);
        expect(stderr).toContain("Usage: sortline classify");
      });
    }

    it("--help exits 0 with usage", async () => {
      const { code, stdout } = await runCli(["classify", "--help"]);

      expect(code).toBe(0);
      expect(stdout).toContain("Usage: sortline classify");
    });

    it("missing model folder exits 1", async () => {
      const missing = path.join(temp.dir, "no-such-model");

      const { code, stdout, stderr } = await runCli(["classify", "--model", missing, uprightPhoto]);

      expect(code).toBe(1);
      expect(stdout).toBe("");
      expect(stderr).toContain(`sortline classify: cannot read ${path.join(missing, "manifest.json")}: ENOENT`);
    });

    it("invalid manifest JSON exits 1", async () => {
      const broken = path.join(temp.dir, "broken-manifest");
      mkdirSync(broken);
      writeFileSync(path.join(broken, "manifest.json"), '{"schemaVersion": 1,');

      const { code, stdout, stderr } = await runCli(["classify", "--model", broken, uprightPhoto]);

      expect(code).toBe(1);
      expect(stdout).toBe("");
      expect(stderr).toContain(`${path.join(broken, "manifest.json")} is not valid JSON`);
    });

    it("tampered model exits 1", async () => {
      const tampered = path.join(temp.dir, "tampered-model");
      mkdirSync(tampered);
      copyFileSync(path.join(modelDir, "manifest.json"), path.join(tampered, "manifest.json"));
      const model = readFileSync(path.join(modelDir, "model.onnx"));
      model.writeUInt8(model.readUInt8(model.length >> 1) ^ 0xff, model.length >> 1);
      writeFileSync(path.join(tampered, "model.onnx"), model);

      const { code, stdout, stderr } = await runCli(["classify", "--model", tampered, uprightPhoto]);

      expect(code).toBe(1);
      expect(stdout).toBe("");
      expect(stderr).toContain(`sortline classify: model file ${path.join(tampered, "model.onnx")} has sha256`);
      expect(stderr).toContain("the manifest says");
    });

    it("cuda alone exits 1", async () => {
      const { code, stdout, stderr } = await runCli(["classify", "--provider", "cuda", uprightPhoto]);

      expect(code).toBe(1);
      expect(stdout).toBe("");
      expect(stderr).toContain("sortline classify: no execution provider could load");
    });

    it("cuda then cpu falls back and warns", async () => {
      const { code, stdout, stderr } = await runCli(["classify", "--json", "--provider", "cuda", "--provider", "cpu", uprightPhoto]);

      expect(code).toBe(0);
      expectClassified(parseJsonLines(stdout)[0], labels, 3);
      const warnings = stderr
        .split("\n")
        .filter((line) => line.startsWith("{"))
        .map((line) => JSON.parse(line) as { level: string; provider?: string });
      expect(warnings.some((line) => line.level === "warn" && line.provider === "cuda")).toBe(true);
    });
  });
});
