import { spawn } from "node:child_process";
import { mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { defaultModelDir, packageRoot } from "../cli/common.js";
import { ModelRunner } from "../inference/runner.js";
import { sha256Hex, splitOf } from "../lib/split.js";
import { loadKnowledge } from "../mining/knowledge.js";
import { createRandom, randomPick, selectFromStream, type SelectorInput } from "../mining/selector.js";
import { prepareImage } from "../preprocess/image.js";
import { DecisionPolicy } from "../decision/policy.js";

const usage = `Usage: npm run bench:mining -- --stream DIR --base DIR [--model DIR] [--budgets 25,50,100,200] [--random-runs 5] [--out DIR]

Compares hard-example mining with random picking and with plain uncertainty picking at the same
number of labels. The model classifies the training split of the stream photos (class folders,
content-hash split as in the Spark job) in a seeded stream order. Each strategy chooses up to N
frames; a reviewer is simulated by the folder names. For each choice the Spark side trains a head
on the base set plus the chosen frames and measures accuracy on the stream's held-out split.`;

interface StreamFrame extends SelectorInput {
  file: string;
  truth: string;
}

async function listImages(root: string): Promise<{ file: string; label: string }[]> {
  const entries = await readdir(root, { recursive: true, withFileTypes: true });
  return entries
    .filter((e) => e.isFile() && /\.(jpe?g|png|webp)$/i.test(e.name))
    .map((e) => ({ file: path.join(e.parentPath, e.name), label: path.basename(e.parentPath) }))
    .sort((a, b) => a.file.localeCompare(b.file));
}

function shuffled<T>(items: T[], seed: number): T[] {
  const random = createRandom(seed);
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy;
}

/** Classifies the stream's training split in stream order; the held-out split is returned as paths. */
async function scoreStream(runner: ModelRunner, stream: string, validationFraction: number, seed: number): Promise<{ frames: StreamFrame[]; holdout: { file: string; label: string }[] }> {
  const images = await listImages(stream);
  const policy = new DecisionPolicy({ bins: {}, rejectBin: "reject", minConfidence: {}, defaultMinConfidence: 0.6, topK: 3 }, runner.manifest.labels);
  const train: { file: string; label: string; data: Buffer }[] = [];
  const holdout: { file: string; label: string }[] = [];
  for (const image of images) {
    const data = await readFile(image.file);
    if (splitOf(sha256Hex(data), validationFraction) === "validation") {
      holdout.push(image);
    } else {
      train.push({ ...image, data });
    }
  }
  const ordered = shuffled(train, seed);
  const frames: StreamFrame[] = [];
  const start = Date.UTC(2026, 0, 1);
  for (let offset = 0; offset < ordered.length; offset += 8) {
    const batch = ordered.slice(offset, offset + 8);
    const pixels = await Promise.all(batch.map(async (item) => (await prepareImage(item.data, runner.manifest.preprocess)).pixels));
    const result = await runner.run(pixels);
    batch.forEach((item, index) => {
      const probabilities = result.probabilities[index]!;
      frames.push({
        frameId: path.basename(item.file),
        capturedAt: start + (offset + index) * 1000,
        probabilities,
        labels: runner.manifest.labels,
        embedding: result.embeddings[index]!,
        decisionReason: policy.decide(probabilities).reason,
        file: item.file,
        truth: item.label,
      });
    });
  }
  return { frames, holdout };
}

function leastConfident(frames: readonly StreamFrame[], n: number): StreamFrame[] {
  const ranked = frames.map((frame) => ({ frame, confidence: Math.max(...Array.from(frame.probabilities)) }));
  return ranked
    .sort((a, b) => a.confidence - b.confidence)
    .slice(0, n)
    .map((entry) => entry.frame);
}

function runPython(args: string[], cwd: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(path.join(cwd, ".venv", "bin", "python"), args, { cwd, stdio: ["ignore", "inherit", "inherit"] });
    child.on("error", reject);
    child.on("exit", (code) => resolve(code ?? 1));
  });
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      stream: { type: "string" },
      base: { type: "string" },
      model: { type: "string" },
      budgets: { type: "string", default: "25,50,100,200" },
      "random-runs": { type: "string", default: "5" },
      "validation-fraction": { type: "string", default: "0.2" },
      seed: { type: "string", default: "7" },
      out: { type: "string", default: ".sortline-bench/mining" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help || !values.stream || !values.base) {
    console.log(usage);
    return values.help ? 0 : 2;
  }
  const budgets = values.budgets.split(",").map((b) => Number.parseInt(b, 10));
  const randomRuns = Number.parseInt(values["random-runs"], 10);
  const out = path.resolve(values.out);
  await mkdir(out, { recursive: true });
  const modelDir = values.model ?? defaultModelDir();
  const runner = await ModelRunner.load(modelDir);
  const knowledge = await loadKnowledge(modelDir);
  const started = Date.now();
  const { frames, holdout } = await scoreStream(runner, path.resolve(values.stream), Number(values["validation-fraction"]), Number(values.seed));
  const scoringSeconds = (Date.now() - started) / 1000;
  await runner.release();

  const selections: Record<string, Record<string, string[] | string[][]>> = { mined: {}, "mined-priority": {}, uncertainty: {}, random: {} };
  for (const budget of budgets) {
    selections.mined![budget] = selectFromStream(frames, { total: budget, knowledge, ranking: "typicality" }).map((f) => f.file);
    selections["mined-priority"]![budget] = selectFromStream(frames, { total: budget, knowledge, ranking: "priority" }).map((f) => f.file);
    selections.uncertainty![budget] = leastConfident(frames, budget).map((f) => f.file);
    selections.random![budget] = Array.from({ length: randomRuns }, (_, run) => randomPick(frames, budget, run + 1).map((f) => f.file));
  }
  const holdoutCsv = path.join(out, "holdout.csv");
  await writeFile(holdoutCsv, ["path,label", ...holdout.map((h) => `${h.file},${h.label}`)].join("\n") + "\n");
  const selectionsFile = path.join(out, "selections.json");
  await writeFile(selectionsFile, JSON.stringify(selections));
  const perClass: Record<string, Record<string, number>> = {};
  for (const [strategy, byBudget] of Object.entries(selections)) {
    const picks = byBudget[String(Math.max(...budgets))]!;
    const first = (Array.isArray(picks[0]) ? picks[0] : picks) as string[];
    perClass[strategy] = {};
    for (const file of first) {
      const label = path.basename(path.dirname(file));
      perClass[strategy]![label] = (perClass[strategy]![label] ?? 0) + 1;
    }
  }
  console.log(JSON.stringify({ streamFrames: frames.length, holdout: holdout.length, scoringSeconds, labelsPerClassAtLargestBudget: perClass }));

  const code = await runPython(
    ["-m", "sortline_spark.mining_curve", "--selections", selectionsFile, "--base", path.resolve(values.base), "--holdout", holdoutCsv, "--out", path.join(out, "curve.json")],
    path.join(packageRoot, "spark"),
  );
  return code;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      console.error(error instanceof Error ? error.message : error);
      process.exit(1);
    },
  );
}
