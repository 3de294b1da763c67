import { spawn, type ChildProcess } from "node:child_process";
import { StringDecoder } from "node:string_decoder";

import { CameraError, ConfigError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { MjpegSplitter, type MjpegSplitterStats } from "./mjpeg.js";
import type { Frame, FrameHandler, FrameSource } from "./types.js";

const DEFAULT_STOP_TIMEOUT_MS = 3000;
const DEFAULT_STDERR_LINES_PER_WINDOW = 20;
const DEFAULT_STDERR_WINDOW_MS = 60_000;
/** Longer stderr lines are cut to this many characters. */
const MAX_STDERR_LINE_CHARS = 1000;

/** Options shared by `ProcessSource` and the camera factories. */
export interface CameraProcessOptions {
  /** Maximum bytes of one JPEG frame; larger frames are dropped and counted. Default 8 MiB. */
  maxFrameBytes?: number;
  /** Milliseconds between SIGTERM and SIGKILL when stopping; default 3000. */
  stopTimeoutMs?: number;
  /** Stderr lines logged per window; further lines are counted and summarised. Default 20. */
  stderrLinesPerWindow?: number;
  /** Length of the stderr rate-limit window in milliseconds; default 60000. */
  stderrWindowMs?: number;
  /** Environment of the child process; default: this process's environment. */
  env?: NodeJS.ProcessEnv;
  logger?: Logger;
}

export interface ProcessSourceOptions extends CameraProcessOptions {
  /** Source name, used in frame ids and logs. */
  name: string;
  /** Executable, found on PATH unless it contains a slash. */
  command: string;
  /** Arguments, passed as an array without a shell. */
  args?: readonly string[];
  cwd?: string;
}

export interface ProcessSourceStats extends MjpegSplitterStats {
  /** Processes spawned. */
  starts: number;
  /** Processes that exited without a `stop` request. */
  unexpectedExits: number;
  /** Stderr lines not logged because of the rate limit. */
  stderrLinesSuppressed: number;
}

/** A camera process that exited without a `stop` request. */
export class CameraExitError extends CameraError {
  constructor(
    readonly command: string,
    readonly exitCode: number | null,
    readonly signal: NodeJS.Signals | null,
    readonly lastStderrLine: string | undefined,
  ) {
    const status = signal === null ? `code ${exitCode}` : `signal ${signal}`;
    const detail = lastStderrLine === undefined ? "" : `; last stderr line: ${lastStderrLine}`;
    super(`camera command ${command} exited with ${status}${detail}`);
  }
}

/**
 * A camera that runs as a child process writing Motion JPEG to stdout, such as `rpicam-vid` or
 * `gst-launch-1.0`. The child runs in its own process group so that `stop` also ends helpers it
 * started. Its stderr lines are logged at info level, rate limited. An exit without a `stop`
 * request is reported once through `onError` as a `CameraExitError`; restarting is the caller's job.
 */
export class ProcessSource implements FrameSource {
  readonly name: string;
  private readonly logger: Logger;
  private readonly splitter: MjpegSplitter;
  private readonly stderr: StderrLog;
  private sequence = 0;
  private child: ChildProcess | undefined;
  private closed: Promise<void> = Promise.resolve();
  private stopping = false;
  private starts = 0;
  private unexpectedExits = 0;

  constructor(private readonly options: ProcessSourceOptions) {
    this.name = options.name;
    this.logger = (options.logger ?? silentLogger).child({ source: options.name });
    this.splitter = new MjpegSplitter(options.maxFrameBytes === undefined ? {} : { maxFrameBytes: options.maxFrameBytes });
    this.stderr = new StderrLog(
      this.logger,
      options.stderrLinesPerWindow ?? DEFAULT_STDERR_LINES_PER_WINDOW,
      options.stderrWindowMs ?? DEFAULT_STDERR_WINDOW_MS,
    );
  }

  /** The command and arguments this source runs. */
  get argv(): string[] {
    return [this.options.command, ...(this.options.args ?? [])];
  }

  /** Process id of the running child, if any. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  get stats(): Readonly<ProcessSourceStats> {
    return {
      ...this.splitter.stats,
      starts: this.starts,
      unexpectedExits: this.unexpectedExits,
      stderrLinesSuppressed: this.stderr.suppressedTotal,
    };
  }

  /**
   * Spawns the command; resolves once the process runs. Rejects with a `CameraError` when it
   * cannot be spawned (for example, the executable is missing).
   */
  async start(onFrame: FrameHandler, onError: (error: Error) => void): Promise<void> {
    if (this.child) {
      throw new CameraError(`camera source ${this.name} is already running`);
    }
    const { command } = this.options;
    this.splitter.reset();
    this.stderr.lastLine = undefined;
    this.stopping = false;
    const child = spawn(command, this.options.args ?? [], {
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
      env: this.options.env ?? process.env,
      ...(this.options.cwd === undefined ? {} : { cwd: this.options.cwd }),
    });
    this.child = child;
    this.closed = this.watch(child, onFrame, onError);

    try {
      await new Promise<void>((resolve, reject) => {
        child.once("spawn", resolve);
        child.once("error", reject);
      });
    } catch (error) {
      throw new CameraError(`failed to start camera command ${command} for source ${this.name}`, { cause: error });
    }
    this.starts += 1;
    this.logger.info({ pid: child.pid, argv: this.argv }, "camera process started");
  }

  /**
   * Sends SIGTERM to the process group, then SIGKILL after `stopTimeoutMs`, and resolves when the
   * process has exited. A process that SIGKILL does not end within another `stopTimeoutMs`, such as
   * one stuck in a driver call, is logged and abandoned.
   */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child) {
      return;
    }
    this.stopping = true;
    const timeoutMs = this.options.stopTimeoutMs ?? DEFAULT_STOP_TIMEOUT_MS;
    signalGroup(child, "SIGTERM");
    const killTimer = setTimeout(() => signalGroup(child, "SIGKILL"), timeoutMs);
    let abandonTimer: NodeJS.Timeout | undefined;
    const abandoned = new Promise<boolean>((resolve) => {
      abandonTimer = setTimeout(() => resolve(true), 2 * timeoutMs);
    });
    const wasAbandoned = await Promise.race([this.closed.then(() => false), abandoned]);
    clearTimeout(killTimer);
    clearTimeout(abandonTimer);

    if (wasAbandoned) {
      this.logger.error({ pid: child.pid }, "camera process did not exit after SIGKILL; abandoned");
      child.stdout?.destroy();
      child.stderr?.destroy();
    }
    if (this.child === child) {
      this.child = undefined;
    }
    this.logger.info({ pid: child.pid }, "camera process stopped");
  }

  /** Wires the child's streams and events; resolves when the child has exited and closed its pipes. */
  private watch(child: ChildProcess, onFrame: FrameHandler, onError: (error: Error) => void): Promise<void> {
    child.stdout?.on("data", (chunk: Buffer) => {
      if (!this.stopping && this.child === child) {
        this.deliver(this.splitter.push(chunk), onFrame);
      }
    });
    child.stderr?.on("data", (chunk: Buffer) => this.stderr.push(chunk));
    for (const stream of [child.stdout, child.stderr]) {
      stream?.on("error", (error) => this.logger.warn({ pid: child.pid, err: error }, "camera process pipe error"));
    }
    child.on("exit", () => {
      // Ends helpers left in the group, which would otherwise keep the pipes open.
      signalGroup(child, "SIGKILL");
    });

    return new Promise<void>((resolve) => {
      child.on("error", (error) => {
        if (child.pid === undefined) {
          this.child = undefined;
          resolve();
        } else {
          this.logger.warn({ pid: child.pid, err: error }, "camera process error");
        }
      });
      child.once("close", (exitCode: number | null, signal: NodeJS.Signals | null) => {
        this.stderr.flush();
        this.onClose(child, exitCode, signal, onError);
        resolve();
      });
    });
  }

  private onClose(child: ChildProcess, exitCode: number | null, signal: NodeJS.Signals | null, onError: (error: Error) => void): void {
    if (this.child !== child) {
      return;
    }
    this.child = undefined;
    if (this.stopping) {
      return;
    }
    this.unexpectedExits += 1;
    const error = new CameraExitError(this.options.command, exitCode, signal, this.stderr.lastLine);
    this.logger.warn({ pid: child.pid, exitCode, signal, err: error }, "camera process exited");
    try {
      onError(error);
    } catch (handlerError) {
      this.logger.error({ err: handlerError }, "onError handler failed");
    }
  }

  private deliver(chunks: Buffer[], onFrame: FrameHandler): void {
    for (const data of chunks) {
      this.sequence += 1;
      // The time the frame was read from the pipe; the camera's own timestamp is not in the stream.
      const frame: Frame = { id: `${this.name}-${this.sequence}`, source: this.name, sequence: this.sequence, data, capturedAt: Date.now() };
      try {
        onFrame(frame);
      } catch (error) {
        this.logger.error({ frame: frame.id, err: error }, "frame handler failed");
      }
    }
  }
}

/** Sends a signal to the child's process group, falling back to the child alone. */
function signalGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined) {
    return;
  }
  try {
    process.kill(-child.pid, signal);
  } catch {
    // ESRCH: the group is already gone. Try the child itself in case it left the group.
    child.kill(signal);
  }
}

/** Splits stderr into lines and logs them, at most `linesPerWindow` per window. */
class StderrLog {
  lastLine: string | undefined;
  suppressedTotal = 0;
  private readonly decoder = new StringDecoder("utf8");
  private partial = "";
  private windowStart = 0;
  private loggedInWindow = 0;
  private suppressedInWindow = 0;

  constructor(
    private readonly logger: Logger,
    private readonly linesPerWindow: number,
    private readonly windowMs: number,
  ) {}

  push(chunk: Buffer): void {
    const lines = (this.partial + this.decoder.write(chunk)).split(/\r?\n|\r/);
    this.partial = lines.pop() ?? "";
    if (this.partial.length > MAX_STDERR_LINE_CHARS) {
      lines.push(this.partial);
      this.partial = "";
    }
    for (const line of lines) {
      this.log(line);
    }
  }

  /** Logs a final unterminated line and the count of suppressed lines. */
  flush(): void {
    this.log(this.partial + this.decoder.end());
    this.partial = "";
    this.reportSuppressed();
  }

  private log(raw: string): void {
    const line = raw.trim().slice(0, MAX_STDERR_LINE_CHARS);
    if (line.length === 0) {
      return;
    }
    this.lastLine = line;
    const now = Date.now();
    if (now - this.windowStart >= this.windowMs) {
      this.reportSuppressed();
      this.windowStart = now;
      this.loggedInWindow = 0;
    }
    if (this.loggedInWindow < this.linesPerWindow) {
      this.loggedInWindow += 1;
      this.logger.info({ stderr: line }, "camera stderr");
    } else {
      this.suppressedInWindow += 1;
      this.suppressedTotal += 1;
    }
  }

  private reportSuppressed(): void {
    if (this.suppressedInWindow > 0) {
      this.logger.warn({ suppressed: this.suppressedInWindow, windowMs: this.windowMs }, "camera stderr lines suppressed by the rate limit");
      this.suppressedInWindow = 0;
    }
  }
}


/** Default executable of Raspberry Pi cameras (rpicam-apps). */
export const RPICAM_VID = "rpicam-vid";
/** Default GStreamer launcher. */
export const GST_LAUNCH = "gst-launch-1.0";

export interface RpicamSourceOptions extends CameraProcessOptions {
  name: string;
  /** Output width in pixels. */
  width: number;
  /** Output height in pixels. */
  height: number;
  /** Frames per second, passed to `--framerate`. */
  fps: number;
  /** Camera index as `rpicam-vid --list-cameras` prints it; default 0. */
  camera?: number;
  /** MJPEG quality from 1 to 100 (`--quality`); default: rpicam-vid's own default. */
  quality?: number;
  /** Further rpicam-vid options, inserted before `-o -`. */
  extraArgs?: readonly string[];
  /** Executable to run in place of `rpicam-vid` from PATH. */
  binaryPath?: string;
}

/**
 * Returns the rpicam-vid arguments that stream MJPEG to stdout without a preview window and
 * without a time limit (`-t 0`). `--flush` makes rpicam-vid flush stdout after every frame, so
 * the end of a frame does not wait in its stdio buffer until the next frame is written.
 */
export function rpicamArgs(options: RpicamSourceOptions): string[] {
  requireInteger("width", options.width, 1);
  requireInteger("height", options.height, 1);
  requirePositive("fps", options.fps);
  const camera = options.camera ?? 0;
  requireInteger("camera", camera, 0);

  const args = ["--codec", "mjpeg", "--nopreview", "-t", "0"];
  args.push("--width", String(options.width), "--height", String(options.height), "--framerate", String(options.fps));
  args.push("--camera", String(camera), "--flush");
  if (options.quality !== undefined) {
    requireInteger("quality", options.quality, 1, 100);
    args.push("--quality", String(options.quality));
  }
  args.push(...(options.extraArgs ?? []), "-o", "-");
  return args;
}

/** Creates a source that runs rpicam-vid, the Raspberry Pi camera application. */
export function rpicamSource(options: RpicamSourceOptions): ProcessSource {
  return new ProcessSource({ ...options, command: options.binaryPath ?? RPICAM_VID, args: rpicamArgs(options) });
}

/**
 * Capture pipelines for common cameras. `jetson-csi` reads a CSI camera through the Jetson's
 * Argus stack (NVIDIA L4T). `v4l2` reads a USB (UVC) camera, either raw frames that GStreamer
 * encodes, or MJPEG that the camera encodes itself and that is passed through unchanged.
 */
export type GstreamerPreset =
  | { kind: "jetson-csi"; sensorId?: number; width: number; height: number; fps: number }
  | { kind: "v4l2"; device?: string; width: number; height: number; fps: number; input?: "raw" | "mjpeg" };

export interface GstreamerSourceOptions extends CameraProcessOptions {
  name: string;
  /**
   * Pipeline elements before the encoder, each an element or caps string with its properties,
   * such as `"v4l2src device=/dev/video0"`; or a preset.
   */
  pipeline: readonly string[] | GstreamerPreset;
  /**
   * JPEG encoder element with its properties, such as `"jpegenc quality=85"`, or null when the
   * pipeline already produces JPEG. Default `jpegenc`, or null for the `v4l2` preset with MJPEG input.
   */
  encoder?: string | null;
  /** Executable to run in place of `gst-launch-1.0` from PATH. */
  binaryPath?: string;
}

/** Returns the pipeline elements of a preset, without encoder and sink. */
export function gstreamerPresetElements(preset: GstreamerPreset): string[] {
  requireInteger("pipeline.width", preset.width, 1);
  requireInteger("pipeline.height", preset.height, 1);
  requireInteger("pipeline.fps", preset.fps, 1);
  const size = `width=${preset.width},height=${preset.height},framerate=${preset.fps}/1`;

  if (preset.kind === "jetson-csi") {
    const sensorId = preset.sensorId ?? 0;
    requireInteger("pipeline.sensorId", sensorId, 0);
    return [`nvarguscamerasrc sensor-id=${sensorId}`, `video/x-raw(memory:NVMM),${size}`, "nvvidconv", "video/x-raw,format=I420"];
  }
  const device = preset.device ?? "/dev/video0";
  if (preset.input === "mjpeg") {
    return [`v4l2src device=${device}`, `image/jpeg,${size}`];
  }
  return [`v4l2src device=${device}`, `video/x-raw,${size}`, "videoconvert"];
}

/**
 * Returns the gst-launch-1.0 arguments: `-q` (no progress messages on stdout), then the elements
 * linked with `!`, the encoder and `fdsink fd=1`. gst-launch-1.0 escapes spaces inside each
 * argument, so every element string is split on whitespace into separate arguments.
 * NOTE: a property value that contains a space cannot be expressed.
 */
export function gstreamerArgs(options: GstreamerSourceOptions): string[] {
  const { pipeline } = options;
  const elements = isPreset(pipeline) ? gstreamerPresetElements(pipeline) : [...pipeline];
  const passThrough = isPreset(pipeline) && pipeline.kind === "v4l2" && pipeline.input === "mjpeg";
  let encoder = options.encoder;
  if (encoder === undefined) {
    encoder = passThrough ? null : "jpegenc";
  }
  if (encoder !== null) {
    elements.push(encoder);
  }
  elements.push("fdsink fd=1");

  const args = ["-q"];
  elements.forEach((element, index) => {
    const tokens = element.trim().split(/\s+/).filter((token) => token.length > 0);
    if (tokens.length === 0) {
      throw new ConfigError(`pipeline[${index}]`, "must not be empty");
    }
    if (index > 0) {
      args.push("!");
    }
    args.push(...tokens);
  });
  return args;
}

/** Creates a source that runs a GStreamer pipeline ending in a JPEG encoder and stdout. */
export function gstreamerSource(options: GstreamerSourceOptions): ProcessSource {
  return new ProcessSource({ ...options, command: options.binaryPath ?? GST_LAUNCH, args: gstreamerArgs(options) });
}

function isPreset(pipeline: readonly string[] | GstreamerPreset): pipeline is GstreamerPreset {
  return !Array.isArray(pipeline);
}

function requireInteger(key: string, value: number, min: number, max = Number.MAX_SAFE_INTEGER): void {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `at least ${min}` : `from ${min} to ${max}`;
    throw new ConfigError(key, `must be an integer ${range}, got ${value}`);
  }
}

function requirePositive(key: string, value: number): void {
  if (!Number.isFinite(value) || value <= 0) {
    throw new ConfigError(key, `must be a positive number, got ${value}`);
  }
}
