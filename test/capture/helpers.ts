import { existsSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { createLogger, type Logger } from "../../src/lib/log.js";

export const repoRoot = fileURLToPath(new URL("../..", import.meta.url));

/** Folder of the shared datasets: SORTLINE_DATASETS, or shared/datasets beside the repository. */
export function datasetsDir(): string {
  return process.env.SORTLINE_DATASETS ?? path.resolve(repoRoot, "..", "shared", "datasets");
}

export interface SampleImage {
  label: string;
  file: string;
  data: Buffer;
}

/** Reads the first `perClass` TrashNet photos (in file-name order) of each class. */
export async function trashnetSamples(classes: readonly string[], perClass: number): Promise<SampleImage[]> {
  const root = path.join(datasetsDir(), "trashnet");
  if (!existsSync(root)) {
    throw new Error(`TrashNet photos not found at ${root}; set SORTLINE_DATASETS to the folder that contains trashnet/`);
  }
  const samples: SampleImage[] = [];
  for (const label of classes) {
    const names = (await readdir(path.join(root, label))).filter((name) => name.endsWith(".jpg")).sort();
    for (const name of names.slice(0, perClass)) {
      const file = path.join(root, label, name);
      samples.push({ label, file, data: await readFile(file) });
    }
  }
  return samples;
}

/** Copies samples into `root/<label>/<name>` and returns the copies' paths in the same order. */
export async function copySamples(root: string, samples: readonly SampleImage[]): Promise<string[]> {
  const copies: string[] = [];
  for (const sample of samples) {
    const target = path.join(root, sample.label, path.basename(sample.file));
    await mkdir(path.dirname(target), { recursive: true });
    await copyFile(sample.file, target);
    copies.push(target);
  }
  return copies;
}

export async function makeTempDir(prefix: string): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(tmpdir(), `sortline-${prefix}-`));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

export interface LogRecord {
  level: string;
  msg: string;
  [field: string]: unknown;
}

/** Creates a debug-level logger that keeps its JSON records in memory. */
export function memoryLogger(): { logger: Logger; records: LogRecord[] } {
  const records: LogRecord[] = [];
  const logger = createLogger({
    level: "debug",
    destination: { write: (line: string) => void records.push(JSON.parse(line) as LogRecord) },
  });
  return { logger, records };
}

/**
 * Bash script that plays a camera: it writes the JPEG files given after MODE and STATE_DIR to
 * stdout, back to back with 20 ms pauses. STATE_DIR records whether it ran before, so that a mode
 * can misbehave on the first run only and stream normally once restarted.
 */
const STANDIN_CAMERA = `#!/usr/bin/env bash
set -u
mode=$1
state=$2
shift 2
first_run=0
if mkdir "$state/started" 2>/dev/null; then first_run=1; fi
echo "stand-in camera mode=$mode first_run=$first_run" >&2

stream() {
  while true; do
    for frame in "$@"; do cat "$frame"; sleep 0.02; done
  done
}

case "$mode" in
  stream) stream "$@" ;;
  noisy)
    while true; do
      for frame in "$@"; do printf 'noise before %s\\n' "$frame"; cat "$frame"; sleep 0.02; done
    done ;;
  stall)
    if [ "$first_run" = 1 ]; then cat "$@"; sleep 600; fi
    stream "$@" ;;
  die)
    for frame in "$@"; do cat "$frame"; sleep 0.02; done
    echo "sensor timeout" >&2
    exit 3 ;;
  garbage)
    if [ "$first_run" = 1 ]; then
      while true; do printf 'garbage, not a JPEG frame\\n'; sleep 0.005; done
    fi
    stream "$@" ;;
  stubborn) trap '' TERM; stream "$@" ;;
  chatty)
    for i in $(seq 1 50); do echo "diagnostic line $i" >&2; done
    stream "$@" ;;
  *) echo "unknown mode $mode" >&2; exit 64 ;;
esac
`;

/** Bash script that records its arguments, one per line, in $STANDIN_ARGS_FILE and streams $STANDIN_FRAMES_DIR/*.jpg. */
const STANDIN_LAUNCHER = `#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STANDIN_ARGS_FILE"
while true; do
  for frame in "$STANDIN_FRAMES_DIR"/*.jpg; do cat "$frame"; sleep 0.02; done
done
`;

export interface StandIns {
  /** Path of the stand-in camera script. */
  camera: string;
  /** Path of the stand-in launcher for rpicam-vid and gst-launch-1.0. */
  launcher: string;
  /** Folder of the photos the stand-ins stream, as frame-000.jpg, frame-001.jpg, … */
  framesDir: string;
  /** The photos' paths in streaming order. */
  frames: string[];
  /** Returns a fresh, empty state folder for one stand-in run sequence. */
  stateDir: () => Promise<string>;
}

/** Writes the stand-in scripts and the photos they stream into `dir`. */
export async function writeStandIns(dir: string, photos: readonly SampleImage[]): Promise<StandIns> {
  const camera = path.join(dir, "camera.sh");
  const launcher = path.join(dir, "launcher.sh");
  await writeFile(camera, STANDIN_CAMERA, { mode: 0o755 });
  await writeFile(launcher, STANDIN_LAUNCHER, { mode: 0o755 });

  const framesDir = path.join(dir, "frames");
  await mkdir(framesDir);
  const frames: string[] = [];
  for (const [index, photo] of photos.entries()) {
    const file = path.join(framesDir, `frame-${String(index).padStart(3, "0")}.jpg`);
    await writeFile(file, photo.data);
    frames.push(file);
  }

  let states = 0;
  const stateDir = async (): Promise<string> => {
    states += 1;
    const state = path.join(dir, `state-${states}`);
    await mkdir(state);
    return state;
  };
  return { camera, launcher, framesDir, frames, stateDir };
}
