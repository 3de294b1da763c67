import { readdir, readFile, stat } from "node:fs/promises";
import path from "node:path";

import { CameraError, ConfigError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { createRandom } from "../lib/random.js";
import type { Frame, FrameHandler, FrameSource } from "./types.js";

/** File extensions replayed by default, compared case-insensitively. */
export const DEFAULT_IMAGE_EXTENSIONS: readonly string[] = [".jpg", ".jpeg", ".png", ".webp"];

const DEFAULT_MAX_FILES = 100_000;
const DEFAULT_MAX_FILE_BYTES = 32 * 1024 * 1024;
/** Folders nested deeper than this below the root are skipped. */
const MAX_DEPTH = 16;

export interface DirectorySourceOptions {
  /** Source name, used in frame ids and logs. */
  name: string;
  /** Root folder of the images. */
  path: string;
  /** Frames per second; the source waits between frames to hold this rate. */
  fps: number;
  /** Start again from the first image after the last one; default false. */
  loop?: boolean;
  /** Set `frame.label` to the name of the folder directly under the root; default true. */
  labelsFromFolders?: boolean;
  /** When set, replays in a shuffled order: a new permutation each pass, the same sequence for the same seed. */
  shuffleSeed?: number;
  /** File extensions to replay, with the dot; default .jpg, .jpeg, .png and .webp. */
  extensions?: readonly string[];
  /** Maximum number of images listed; the rest are ignored with a warning. Default 100000. */
  maxFiles?: number;
  /** Larger files are skipped with a warning; default 32 MiB. */
  maxFileBytes?: number;
  /**
   * Called once after the last image was delivered when `loop` is false. It is not called after
   * `stop`, nor when a pass ends without any readable image (that is reported through `onError`).
   * The source is already stopped when it runs, so it may call `start` again.
   */
  onEnd?: () => void;
  logger?: Logger;
}

export interface DirectorySourceStats {
  /** Frames delivered since construction. */
  frames: number;
  /** Passes over the image list that delivered at least one frame. */
  passes: number;
  /** Files skipped because they could not be read or were too large. */
  skippedFiles: number;
}

/** An image found under the root. */
interface ImageEntry {
  file: string;
  label: string | undefined;
}

/** State of one `start` … `stop` run. */
interface Run {
  stopped: boolean;
  timer: NodeJS.Timeout | undefined;
  wake: (() => void) | undefined;
  done: Promise<void>;
}

/**
 * Replays image files from a folder as frames, for demos, tests and live-accuracy checks.
 *
 * Images are found recursively and replayed in code-point order of their relative paths (or
 * shuffled with a seed). Files and folders whose names start with a dot are ignored, and
 * symbolic links to folders are not followed. Files are read one at a time, while the source
 * waits for the next frame's due time. A file that fails to read is logged and skipped.
 */
export class DirectorySource implements FrameSource {
  readonly name: string;
  private readonly intervalMs: number;
  private readonly extensions: ReadonlySet<string>;
  private readonly logger: Logger;
  private sequence = 0;
  private run: Run | undefined;
  private readonly counters: DirectorySourceStats = { frames: 0, passes: 0, skippedFiles: 0 };

  constructor(private readonly options: DirectorySourceOptions) {
    if (!Number.isFinite(options.fps) || options.fps <= 0) {
      throw new ConfigError("fps", `must be a positive number of frames per second, got ${options.fps}`);
    }
    if (options.shuffleSeed !== undefined && !Number.isSafeInteger(options.shuffleSeed)) {
      throw new ConfigError("shuffleSeed", `must be an integer, got ${options.shuffleSeed}`);
    }
    this.name = options.name;
    this.intervalMs = 1000 / options.fps;
    this.extensions = new Set((options.extensions ?? DEFAULT_IMAGE_EXTENSIONS).map((ext) => ext.toLowerCase()));
    this.logger = (options.logger ?? silentLogger).child({ source: options.name });
  }

  get stats(): Readonly<DirectorySourceStats> {
    return { ...this.counters };
  }

  /**
   * Lists the images and starts replaying them. Rejects with a `CameraError` when the folder
   * cannot be read or contains no image. Frame sequence numbers continue across restarts.
   */
  async start(onFrame: FrameHandler, onError: (error: Error) => void): Promise<void> {
    if (this.run) {
      throw new CameraError(`directory source ${this.name} is already running`);
    }
    const run: Run = { stopped: false, timer: undefined, wake: undefined, done: Promise.resolve() };
    this.run = run;
    try {
      const images = await this.listImages();
      if (run.stopped) {
        return;
      }
      run.done = this.replayAndFinish(run, images, onFrame, onError);
      this.logger.info({ path: this.options.path, images: images.length, fps: this.options.fps }, "directory source started");
    } catch (error) {
      this.run = undefined;
      throw error;
    }
  }

  /** Stops the replay; resolves once no further frame will be delivered. */
  async stop(): Promise<void> {
    const run = this.run;
    if (!run) {
      return;
    }
    run.stopped = true;
    clearTimeout(run.timer);
    run.wake?.();
    await run.done;
    if (this.run === run) {
      this.run = undefined;
    }
    this.logger.info({ frames: this.counters.frames }, "directory source stopped");
  }

  private async listImages(): Promise<ImageEntry[]> {
    const root = this.options.path;
    const maxFiles = this.options.maxFiles ?? DEFAULT_MAX_FILES;
    const images: ImageEntry[] = [];
    try {
      // One image past the limit shows whether the folder contains more.
      await this.walk(root, [], images, maxFiles + 1);
    } catch (error) {
      throw new CameraError(`failed to read image folder ${root} of directory source ${this.name}`, { cause: error });
    }
    if (images.length === 0) {
      const extensions = [...this.extensions].join(", ");
      throw new CameraError(`no images (${extensions}) found under ${root} for directory source ${this.name}`);
    }
    if (images.length > maxFiles) {
      images.length = maxFiles;
      this.logger.warn({ path: root, maxFiles }, "image folder contains more images than maxFiles; only the first maxFiles are replayed");
    }
    return images;
  }

  /** Appends up to `limit` images under `folder` depth-first, each folder's entries in code-point order. */
  private async walk(folder: string, segments: string[], images: ImageEntry[], limit: number): Promise<void> {
    if (segments.length > MAX_DEPTH) {
      this.logger.warn({ folder, maxDepth: MAX_DEPTH }, "image folder nested too deep; skipped");
      return;
    }
    const entries = await readdir(folder, { withFileTypes: true });
    entries.sort((a, b) => compareCodePoints(a.name, b.name));

    for (const entry of entries) {
      if (images.length >= limit || entry.name.startsWith(".")) {
        continue;
      }
      const full = path.join(folder, entry.name);
      if (entry.isDirectory()) {
        await this.walk(full, [...segments, entry.name], images, limit);
      } else if ((entry.isFile() || entry.isSymbolicLink()) && this.extensions.has(path.extname(entry.name).toLowerCase())) {
        const labelled = (this.options.labelsFromFolders ?? true) && segments.length > 0;
        images.push({ file: full, label: labelled ? segments[0] : undefined });
      }
    }
  }

  /** Replays, then marks the source as stopped before `onEnd` runs, so that `onEnd` may start it again. */
  private async replayAndFinish(run: Run, images: ImageEntry[], onFrame: FrameHandler, onError: (error: Error) => void): Promise<void> {
    let error: CameraError | undefined;
    try {
      error = await this.replay(run, images, onFrame);
    } finally {
      if (this.run === run) {
        this.run = undefined;
      }
    }
    if (run.stopped) {
      return;
    }
    try {
      if (error) {
        onError(error);
      } else {
        this.logger.info({ frames: this.counters.frames }, "directory source reached the last image");
        this.options.onEnd?.();
      }
    } catch (callbackError) {
      this.logger.error({ err: callbackError }, error ? "onError handler failed" : "onEnd handler failed");
    }
  }

  /**
   * Delivers the images until stopped or, without `loop`, until the last one. Returns an error when
   * no image of a pass could be read.
   */
  private async replay(run: Run, images: ImageEntry[], onFrame: FrameHandler): Promise<CameraError | undefined> {
    const random = this.options.shuffleSeed === undefined ? undefined : createRandom(this.options.shuffleSeed);
    let dueAt = Date.now();

    do {
      const order = random ? shuffled(images, random) : images;
      let delivered = 0;
      for (const image of order) {
        const data = await this.readImage(image.file);
        if (run.stopped) {
          return undefined;
        }
        if (!data) {
          continue;
        }
        await this.waitUntil(run, dueAt);
        if (run.stopped) {
          return undefined;
        }
        this.deliver(image, data, onFrame);
        delivered += 1;
        // A frame more than one interval late moves the schedule instead of causing a burst.
        dueAt = Math.max(dueAt + this.intervalMs, Date.now());
      }
      if (delivered === 0) {
        return new CameraError(`none of the ${images.length} images under ${this.options.path} could be read`);
      }
      this.counters.passes += 1;
    } while (this.options.loop === true);
    return undefined;
  }

  /** Returns the file's bytes, or undefined after logging why it was skipped. */
  private async readImage(file: string): Promise<Buffer | undefined> {
    const maxFileBytes = this.options.maxFileBytes ?? DEFAULT_MAX_FILE_BYTES;
    try {
      const info = await stat(file);
      if (info.size > maxFileBytes) {
        this.counters.skippedFiles += 1;
        this.logger.warn({ file, bytes: info.size, maxFileBytes }, "image file larger than maxFileBytes; skipped");
        return undefined;
      }
      return await readFile(file);
    } catch (error) {
      this.counters.skippedFiles += 1;
      this.logger.warn({ file, err: error }, "cannot read image file; skipped");
      return undefined;
    }
  }

  private async waitUntil(run: Run, dueAt: number): Promise<void> {
    const delayMs = dueAt - Date.now();
    if (delayMs <= 0) {
      return;
    }
    await new Promise<void>((resolve) => {
      run.wake = resolve;
      run.timer = setTimeout(resolve, delayMs);
    });
    run.wake = undefined;
    run.timer = undefined;
  }

  private deliver(image: ImageEntry, data: Buffer, onFrame: FrameHandler): void {
    this.sequence += 1;
    this.counters.frames += 1;
    const frame: Frame = {
      id: `${this.name}-${this.sequence}`,
      source: this.name,
      sequence: this.sequence,
      data,
      capturedAt: Date.now(),
      file: image.file,
    };
    if (image.label !== undefined) {
      frame.label = image.label;
    }
    try {
      onFrame(frame);
    } catch (error) {
      this.logger.error({ frame: frame.id, err: error }, "frame handler failed");
    }
  }
}

function compareCodePoints(a: string, b: string): number {
  if (a < b) {
    return -1;
  }
  return a > b ? 1 : 0;
}


/** Returns a Fisher-Yates shuffled copy. */
function shuffled<T>(items: readonly T[], random: () => number): T[] {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i -= 1) {
    const j = Math.floor(random() * (i + 1));
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy;
}
