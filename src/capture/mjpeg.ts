import { ConfigError } from "../lib/errors.js";

/** Default maximum size of one JPEG frame, 8 MiB; larger frames are dropped and counted. */
export const DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024;

/**
 * Bytes appended to the buffer per parsing step. A large `push` is fed in slices of this size, so
 * the buffer never contains more than `maxFrameBytes` plus one slice.
 */
const SLICE_BYTES = 64 * 1024;

// JPEG marker codes (ITU-T T.81, table B.1). Each marker is 0xFF followed by the code.
const MARKER_PREFIX = 0xff;
const SOI = 0xd8;
const EOI = 0xd9;
const SOS = 0xda;
const TEM = 0x01;
const RST0 = 0xd0;
const RST7 = 0xd7;
const STUFFED_ZERO = 0x00;
const SOI_BYTES = Buffer.from([MARKER_PREFIX, SOI]);

type ParseState = "seek" | "marker" | "entropy";

export interface MjpegSplitterOptions {
  /** Maximum bytes of one frame, SOI to EOI inclusive; default 8 MiB. */
  maxFrameBytes?: number;
}

export interface MjpegSplitterStats {
  /** Complete frames returned by `push`. */
  frames: number;
  /** Frames dropped because they grew beyond `maxFrameBytes`. */
  oversizeFrames: number;
  /** Frames dropped because their marker structure was invalid or a new SOI came before EOI. */
  corruptFrames: number;
  /** Bytes discarded: data outside any frame plus the bytes of dropped frames. */
  droppedBytes: number;
}

/**
 * Splits a Motion JPEG byte stream (JPEG images written back to back, as `rpicam-vid --codec mjpeg`
 * and GStreamer's `jpegenc ! fdsink` write them) into single JPEG frames.
 *
 * A frame starts at an SOI marker (FF D8). The splitter then walks the marker segments by their
 * length fields and scans entropy-coded data for the next marker. An EOI (FF D9) inside an APPn
 * segment, such as the end of an EXIF thumbnail, therefore does not end the frame early. Progressive
 * JPEGs, whose scans are separated by DHT and SOS segments, are handled the same way. Bytes
 * between frames are discarded and counted. Chunks may split a frame, or a marker, anywhere.
 *
 * NOTE: when a frame is cut off inside its header, the length field of the cut segment can skip
 * over the start of the next frame, so that frame is lost as well.
 */
export class MjpegSplitter {
  readonly maxFrameBytes: number;
  private buffer: Buffer;
  /** Valid bytes in `buffer`; while inside a frame, the frame starts at offset 0. */
  private length = 0;
  /** Next byte to examine. It may lie beyond `length` while a segment is being skipped. */
  private position = 0;
  private state: ParseState = "seek";
  private readonly counters: MjpegSplitterStats = { frames: 0, oversizeFrames: 0, corruptFrames: 0, droppedBytes: 0 };

  constructor(options: MjpegSplitterOptions = {}) {
    const maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    if (!Number.isSafeInteger(maxFrameBytes) || maxFrameBytes < 4) {
      throw new ConfigError("maxFrameBytes", `must be an integer of at least 4 bytes, got ${maxFrameBytes}`);
    }
    this.maxFrameBytes = maxFrameBytes;
    this.buffer = Buffer.allocUnsafe(Math.min(SLICE_BYTES, maxFrameBytes) + 2);
  }

  /** Counters since construction; `reset` keeps them. */
  get stats(): Readonly<MjpegSplitterStats> {
    return { ...this.counters };
  }

  /** Bytes held for a frame that is not complete yet. */
  get bufferedBytes(): number {
    return this.length;
  }

  /** Appends a chunk of the stream and returns the frames it completed, as copies. */
  push(chunk: Buffer): Buffer[] {
    const frames: Buffer[] = [];
    for (let offset = 0; offset < chunk.length; offset += SLICE_BYTES) {
      this.append(chunk.subarray(offset, offset + SLICE_BYTES));
      this.parse(frames);
      this.enforceMaxFrameBytes();
    }
    return frames;
  }

  /** Discards a partial frame, for example when the producing process restarts; counters are kept. */
  reset(): void {
    this.counters.droppedBytes += this.length;
    this.length = 0;
    this.position = 0;
    this.state = "seek";
  }

  private append(slice: Buffer): void {
    const needed = this.length + slice.length;
    if (needed > this.buffer.length) {
      const capacity = Math.max(needed, Math.min(this.buffer.length * 2, this.maxFrameBytes + SLICE_BYTES));
      const grown = Buffer.allocUnsafe(capacity);
      this.buffer.copy(grown, 0, 0, this.length);
      this.buffer = grown;
    }
    slice.copy(this.buffer, this.length);
    this.length = needed;
  }

  private parse(frames: Buffer[]): void {
    let progressed = true;
    while (progressed) {
      if (this.state === "seek") {
        progressed = this.seekStart();
      } else if (this.state === "marker") {
        progressed = this.readMarker(frames);
      } else {
        progressed = this.scanEntropy(frames);
      }
    }
  }

  /** Finds the next SOI; returns false when more data is needed. */
  private seekStart(): boolean {
    const index = this.buffer.subarray(0, this.length).indexOf(SOI_BYTES, this.position);
    if (index === -1) {
      // A trailing 0xFF may be the first byte of an SOI that the next chunk completes.
      const keep = this.length > 0 && this.buffer[this.length - 1] === MARKER_PREFIX ? 1 : 0;
      this.discard(this.length - keep);
      this.position = 0;
      return false;
    }
    this.discard(index);
    this.position = 2;
    this.state = "marker";
    return true;
  }

  /** Reads the marker at `position` and skips its segment; returns false when more data is needed. */
  private readMarker(frames: Buffer[]): boolean {
    let at = this.position;
    if (at >= this.length) {
      return false;
    }
    if (this.buffer[at] !== MARKER_PREFIX) {
      this.dropFrame(at);
      return true;
    }

    // Any number of 0xFF fill bytes may precede a marker code (T.81, B.1.1.2).
    while (at + 1 < this.length && this.buffer[at + 1] === MARKER_PREFIX) {
      at += 1;
    }
    this.position = at;
    if (at + 1 >= this.length) {
      return false;
    }
    const code = this.buffer[at + 1]!;

    if (code === EOI) {
      this.emit(at + 2, frames);
      return true;
    }
    if (code === SOI) {
      this.dropFrame(at);
      return true;
    }
    if (code === STUFFED_ZERO) {
      this.dropFrame(at + 2);
      return true;
    }
    if (code === TEM || (code >= RST0 && code <= RST7)) {
      this.position = at + 2;
      return true;
    }
    return this.skipSegment(at, code);
  }

  /** Skips a marker segment by its big-endian length field, which counts itself but not the marker. */
  private skipSegment(at: number, code: number): boolean {
    if (at + 3 >= this.length) {
      return false;
    }
    const segmentLength = this.buffer.readUInt16BE(at + 2);
    if (segmentLength < 2) {
      this.dropFrame(at + 4);
      return true;
    }
    this.position = at + 2 + segmentLength;
    if (code === SOS) {
      this.state = "entropy";
    }
    return true;
  }

  /** Scans entropy-coded data for the next marker; returns false when more data is needed. */
  private scanEntropy(frames: Buffer[]): boolean {
    if (this.position >= this.length) {
      return false;
    }
    const at = this.buffer.subarray(0, this.length).indexOf(MARKER_PREFIX, this.position);
    if (at === -1) {
      this.position = this.length;
      return false;
    }
    if (at + 1 >= this.length) {
      this.position = at;
      return false;
    }
    const code = this.buffer[at + 1]!;
    if (code === STUFFED_ZERO || (code >= RST0 && code <= RST7)) {
      this.position = at + 2;
    } else if (code === MARKER_PREFIX) {
      this.position = at + 1;
    } else if (code === EOI) {
      this.emit(at + 2, frames);
    } else if (code === SOI) {
      this.dropFrame(at);
    } else {
      // Another segment follows, for example the DHT and SOS of a progressive JPEG's next scan.
      this.position = at;
      this.state = "marker";
    }
    return true;
  }

  private emit(end: number, frames: Buffer[]): void {
    if (end > this.maxFrameBytes) {
      this.counters.oversizeFrames += 1;
      this.discard(end);
    } else {
      frames.push(Buffer.from(this.buffer.subarray(0, end)));
      this.counters.frames += 1;
      this.shift(end);
    }
    this.position = 0;
    this.state = "seek";
  }

  /** Drops the frame in progress up to `end` and looks for the next SOI from there. */
  private dropFrame(end: number): void {
    this.counters.corruptFrames += 1;
    this.discard(end);
    this.position = 0;
    this.state = "seek";
  }

  private enforceMaxFrameBytes(): void {
    if (this.state !== "seek" && this.length > this.maxFrameBytes) {
      this.counters.oversizeFrames += 1;
      this.discard(this.length);
      this.position = 0;
      this.state = "seek";
    }
  }

  /** Removes the first `count` bytes and counts them as dropped. */
  private discard(count: number): void {
    this.counters.droppedBytes += count;
    this.shift(count);
  }

  private shift(count: number): void {
    if (count <= 0) {
      return;
    }
    this.buffer.copyWithin(0, count, this.length);
    this.length -= count;
    this.position = Math.max(0, this.position - count);
  }
}
