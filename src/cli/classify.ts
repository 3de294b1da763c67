import { readdir, readFile, stat } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { describeError, ImageDecodeError } from "../lib/errors.js";
import { createLogger } from "../lib/log.js";
import { KNOWN_PROVIDERS, ModelRunner, topK, type ProviderName } from "../inference/runner.js";
import { prepareImage } from "../preprocess/image.js";
import { defaultModelDir, UsageError } from "./common.js";

const IMAGE_EXTENSIONS = new Set([".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif"]);
/** Images run through the model as one batch. */
const BATCH_SIZE = 8;

export const classifyUsage = `Usage: sortline classify [--model DIR] [--json] [--top K] [--provider NAME]... PATH...

Classifies image files, and folders walked recursively, with a model package.

Options:
  --model DIR        model package folder (default: models/default)
  --json             print one JSON object per image on its own line
  --top K            number of top labels to print (default: 3)
  --provider NAME    execution provider to try, in order: tensorrt, cuda, cpu (default: cpu)
  -h, --help         print this help`;

/** Expands folders into the image files below them, in sorted order; files are kept as given. */
async function* expandPaths(paths: string[]): AsyncGenerator<string> {
  for (const given of paths) {
    let info;
    try {
      info = await stat(given);
    } catch {
      yield given;
      continue;
    }
    if (!info.isDirectory()) {
      yield given;
      continue;
    }
    const entries = await readdir(given, { withFileTypes: true, recursive: true });
    const files = entries
      .filter((entry) => entry.isFile() && IMAGE_EXTENSIONS.has(path.extname(entry.name).toLowerCase()))
      .map((entry) => path.join(entry.parentPath, entry.name))
      .sort();
    yield* files;
  }
}

type ClassifyLine =
  | { file: string; label: string; confidence: number; top: { label: string; p: number }[] }
  | { file: string; error: string };

function formatText(line: ClassifyLine): string {
  if ("error" in line) {
    return `${line.file}\terror: ${line.error}`;
  }
  const others = line.top.map((entry) => `${entry.label} ${entry.p.toFixed(3)}`).join(", ");
  return `${line.file}\t${line.label}\t${line.confidence.toFixed(3)}\t(${others})`;
}

async function loadPixels(file: string, runner: ModelRunner): Promise<Buffer> {
  let data: Buffer;
  try {
    data = await readFile(file);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ImageDecodeError(code === "ENOENT" ? "file not found" : `cannot read file: ${code ?? describeError(error)}`);
  }
  return (await prepareImage(data, runner.manifest.preprocess)).pixels;
}

async function classifyBatch(files: string[], runner: ModelRunner, k: number): Promise<ClassifyLine[]> {
  // Decoded one at a time: concurrent sharp 0.34 pipelines share libvips' error buffer, so a
  // failing decode beside another one can lose its message and report "Unknown error".
  const decoded: PromiseSettledResult<Buffer>[] = [];
  for (const file of files) {
    decoded.push(
      await loadPixels(file, runner).then(
        (value) => ({ status: "fulfilled", value }) as const,
        (reason: unknown) => ({ status: "rejected", reason }) as const,
      ),
    );
  }
  const good = decoded.flatMap((result, index) => (result.status === "fulfilled" ? [{ index, pixels: result.value }] : []));
  const lines: ClassifyLine[] = decoded.map((result, index) => ({
    file: files[index]!,
    error: result.status === "rejected" ? describeError(result.reason) : "",
  }));
  if (good.length > 0) {
    const { probabilities } = await runner.run(good.map((entry) => entry.pixels));
    good.forEach((entry, row) => {
      const top = topK(probabilities[row]!, runner.manifest.labels, k);
      lines[entry.index] = { file: files[entry.index]!, label: top[0]!.label, confidence: top[0]!.p, top };
    });
  }
  return lines;
}

function parseProviders(values: string[] | undefined): ProviderName[] {
  for (const value of values ?? []) {
    if (!(KNOWN_PROVIDERS as readonly string[]).includes(value)) {
      throw new UsageError(`--provider ${value} is not one of ${KNOWN_PROVIDERS.join(", ")}`);
    }
  }
  return (values ?? ["cpu"]) as ProviderName[];
}

/** Runs `sortline classify`; returns the exit code (0, 1 for a model that will not load, 2 for usage errors). */
export async function runClassify(argv: string[], out: NodeJS.WritableStream = process.stdout): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      model: { type: "string" },
      json: { type: "boolean", default: false },
      top: { type: "string", default: "3" },
      provider: { type: "string", multiple: true },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    out.write(`${classifyUsage}\n`);
    return 0;
  }
  if (positionals.length === 0) {
    throw new UsageError("no image files or folders given");
  }
  const k = Number(values.top);
  if (!Number.isInteger(k) || k < 1) {
    throw new UsageError(`--top ${values.top} is not a positive whole number`);
  }
  const logger = createLogger({ fd: 2, level: process.env.SORTLINE_LOG_LEVEL ?? "warn" });
  const runner = await ModelRunner.load(values.model ?? defaultModelDir(), { providers: parseProviders(values.provider), logger });

  const pending: string[] = [];
  const flush = async (): Promise<void> => {
    for (const line of await classifyBatch(pending.splice(0), runner, Math.min(k, runner.manifest.labels.length))) {
      out.write(`${values.json ? JSON.stringify(line) : formatText(line)}\n`);
    }
  };
  for await (const file of expandPaths(positionals)) {
    pending.push(file);
    if (pending.length === BATCH_SIZE) {
      await flush();
    }
  }
  await flush();
  await runner.release();
  return 0;
}
