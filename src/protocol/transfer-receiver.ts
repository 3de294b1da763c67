/**
 * Receiving side of the chunked transfer. One receiver serves a data topic pattern, for example
 * `sortline/v1/+/+/up/data` on the trainer or the device's own `.../down/data`, and acknowledges
 * on the ack topic of the device each frame came from.
 *
 * On disk, under `dir`:
 * - `active/<key>/data`: the file being received, each chunk written at its offset.
 * - `active/<key>/state.json`: the begin header and the chunk indices that are synced to disk.
 * - `done/<key>.json`: a marker per completed transfer, so a repeated begin gets "complete".
 *
 * Durability: the receiver syncs the data file and then replaces state.json before it acknowledges
 * chunks, so an acknowledged chunk survives a crash of the receiver. A restart loses at most the
 * chunks received since the last acknowledgement.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, readFile, rename, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import path from "node:path";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { MqttLink, Unsubscribe } from "./link.js";
import { PROTOCOL_VERSION, type ChunkRange, type TransferAck } from "./messages.js";
import { ackTopicForDataTopic, parseDeviceTopic } from "./topics.js";
import { ChunkSet } from "./transfer-chunks.js";
import { chunkLength, decodeFrame, sha256Hex, type BeginHeader, type ChunkHeader } from "./transfer-frames.js";

/** Origin of a completed file. */
export interface TransferSource {
  dataTopic: string;
  /** Site and device parsed from a `sortline/v1/...` data topic; undefined for other topics. */
  site?: string;
  device?: string;
}

/**
 * Stores a completed, verified file. The receiver deletes `file` after this resolves, so move or
 * copy it here. A restart between the sha256 check and the done marker calls it again for the same
 * transfer, so it must tolerate a repeat.
 */
export type CompleteHandler = (file: string, begin: BeginHeader, source: TransferSource) => Promise<void>;

export interface TransferReceiverOptions {
  link: MqttLink;
  /** Subscription pattern of the data topics, e.g. `sortline/v1/+/+/up/data`. */
  dataTopic: string;
  /** Maps a concrete data topic to its ack topic (default: ackTopicForDataTopic, `.../data` to `.../ack`). */
  ackTopicFor?: (dataTopic: string) => string;
  /** State folder; created when missing. */
  dir: string;
  /** Largest file accepted, in bytes. A larger begin gets "failed". */
  maxBytes: number;
  /** Transfers in progress at once (default 4). A begin beyond this gets "failed". */
  maxConcurrent?: number;
  /** A partial transfer untouched this long is deleted, and so is a done marker this old (default 24 h). */
  staleAfterMs?: number;
  /** Stored chunks that trigger an acknowledgement (default: half the sender's window, else 4). */
  ackEveryChunks?: number;
  /** Maximum delay before stored chunks are acknowledged (default 200 ms). */
  ackIntervalMs?: number;
  onComplete: CompleteHandler;
  logger?: Logger;
}

/** Counters since start(). */
export interface ReceiverStats {
  chunksStored: number;
  /** Chunks whose sha256, length or index did not match; not stored, not acknowledged. */
  chunksRejected: number;
  chunksDuplicate: number;
  /** Chunks of a transfer the receiver has no begin for. */
  chunksUnknown: number;
  /** Frames that did not decode. */
  framesInvalid: number;
  transfersCompleted: number;
  transfersFailed: number;
}

/** The transfer state file's content. */
interface StateFile {
  version: 1;
  dataTopic: string;
  begin: BeginHeader;
  have: ChunkRange[];
  updatedAt: number;
}

interface DoneMarker {
  transferId: string;
  dataTopic: string;
  sha256: string;
  size: number;
  completedAt: number;
}

/** One transfer in progress. */
interface Incoming {
  key: string;
  dir: string;
  dataTopic: string;
  ackTopic: string;
  begin: BeginHeader;
  /** Chunks written to the data file, synced or not. */
  stored: ChunkSet;
  /** Chunks synced and recorded in state.json; acknowledgements report these. */
  durable: ChunkSet;
  file: FileHandle | undefined;
  unacknowledged: number;
  ackTimer: NodeJS.Timeout | undefined;
  lastActivity: number;
  finishing: boolean;
}

const DEFAULT_MAX_CONCURRENT = 4;
const DEFAULT_STALE_AFTER_MS = 24 * 3_600_000;
const DEFAULT_ACK_EVERY_CHUNKS = 4;
const DEFAULT_ACK_INTERVAL_MS = 200;
const MAX_SWEEP_INTERVAL_MS = 60_000;
/** Repeated warnings of one kind are logged at most this often. */
const WARN_INTERVAL_MS = 10_000;

/** Returns the state key of a transfer: its id plus a hash of the data topic, unique per sender. */
function transferKey(dataTopic: string, transferId: string): string {
  const topicHash = createHash("sha256").update(dataTopic).digest("hex").slice(0, 16);
  return `${transferId}-${topicHash}`;
}

async function fileSha256(file: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk as Buffer);
  }
  return hash.digest("hex");
}

/** Writes `content` to `file` via a synced temp file and a rename, then syncs the folder. */
async function writeFileDurably(file: string, content: string): Promise<void> {
  const temp = `${file}.tmp`;
  const handle = await open(temp, "w");
  try {
    await handle.writeFile(content);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temp, file);
  const folder = await open(path.dirname(file), "r");
  try {
    await folder.sync();
  } finally {
    await folder.close();
  }
}

export class TransferReceiver {
  readonly stats: ReceiverStats = {
    chunksStored: 0,
    chunksRejected: 0,
    chunksDuplicate: 0,
    chunksUnknown: 0,
    framesInvalid: 0,
    transfersCompleted: 0,
    transfersFailed: 0,
  };
  private readonly logger: Logger;
  private readonly activeDir: string;
  private readonly doneDir: string;
  private readonly incoming = new Map<string, Incoming>();
  /** Per-key promise chains, so the frames of one transfer are handled one after another. */
  private readonly queues = new Map<string, Promise<void>>();
  private readonly lastWarning = new Map<string, number>();
  private unsubscribe: Unsubscribe | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(private readonly options: TransferReceiverOptions) {
    if (!Number.isInteger(options.maxBytes) || options.maxBytes < 0) {
      throw new SortlineError(`maxBytes ${options.maxBytes} must be a whole number of bytes >= 0`);
    }
    this.logger = (options.logger ?? silentLogger).child({ component: "transfer-receiver", dataTopic: options.dataTopic });
    this.activeDir = path.join(options.dir, "active");
    this.doneDir = path.join(options.dir, "done");
  }

  /** Transfers in progress. */
  get activeTransfers(): number {
    return this.incoming.size;
  }

  /** Loads partial transfers from the state folder, deletes stale ones, and subscribes. */
  async start(): Promise<void> {
    await mkdir(this.activeDir, { recursive: true });
    await mkdir(this.doneDir, { recursive: true });
    await this.loadActive();
    await this.sweep();
    const interval = Math.min(this.staleAfterMs, MAX_SWEEP_INTERVAL_MS);
    this.sweepTimer = setInterval(() => {
      this.sweep().catch((error: unknown) => this.logger.warn({ err: describeError(error) }, "sweeping stale transfers failed"));
    }, interval);
    this.sweepTimer.unref();
    this.unsubscribe = await this.options.link.subscribe(this.options.dataTopic, (topic, payload) => this.onFrame(topic, payload));
    for (const transfer of this.incoming.values()) {
      if (transfer.durable.complete) {
        // A restart interrupted finishing; run it again.
        this.enqueue(transfer.key, () => this.finish(transfer));
      }
    }
    this.logger.info({ dir: this.options.dir, resumed: this.incoming.size }, "transfer receiver started");
  }

  /**
   * Unsubscribes, waits for frames being handled, syncs received chunks to the state folder and
   * closes the files. Chunks synced here are acknowledged when the sender sends begin again.
   */
  async close(): Promise<void> {
    if (this.closed) {
      return;
    }
    this.closed = true;
    clearInterval(this.sweepTimer);
    await this.unsubscribe?.().catch((error: unknown) => this.logger.warn({ err: describeError(error) }, "unsubscribing failed on close"));
    await Promise.all([...this.queues.values()]);
    for (const transfer of this.incoming.values()) {
      clearTimeout(transfer.ackTimer);
      try {
        await this.persist(transfer);
      } catch (error) {
        this.logger.warn({ transferId: transfer.begin.transferId, err: describeError(error) }, "saving transfer state failed on close");
      }
      await transfer.file?.close();
      transfer.file = undefined;
    }
    this.incoming.clear();
  }

  private get staleAfterMs(): number {
    return this.options.staleAfterMs ?? DEFAULT_STALE_AFTER_MS;
  }

  private async loadActive(): Promise<void> {
    for (const key of await readdir(this.activeDir)) {
      const dir = path.join(this.activeDir, key);
      try {
        const state = JSON.parse(await readFile(path.join(dir, "state.json"), "utf8")) as StateFile;
        const durable = ChunkSet.fromRanges(state.begin.chunks, state.have);
        this.incoming.set(key, {
          key,
          dir,
          dataTopic: state.dataTopic,
          ackTopic: this.ackTopicFor(state.dataTopic),
          begin: state.begin,
          stored: durable.clone(),
          durable,
          file: undefined,
          unacknowledged: 0,
          ackTimer: undefined,
          lastActivity: state.updatedAt,
          finishing: false,
        });
      } catch (error) {
        this.logger.warn({ dir, err: describeError(error) }, "unreadable transfer state; deleting the partial transfer");
        await rm(dir, { recursive: true, force: true });
      }
    }
  }

  /** Deletes partial transfers and done markers older than staleAfterMs. */
  private async sweep(): Promise<void> {
    const cutoff = Date.now() - this.staleAfterMs;
    for (const transfer of [...this.incoming.values()]) {
      if (transfer.lastActivity < cutoff && !transfer.finishing) {
        this.enqueue(transfer.key, async () => {
          if (this.incoming.get(transfer.key) === transfer && transfer.lastActivity < cutoff) {
            this.logger.info({ transferId: transfer.begin.transferId, dataTopic: transfer.dataTopic }, "deleting a stale partial transfer");
            await this.discard(transfer);
          }
        });
      }
    }
    for (const name of await readdir(this.doneDir)) {
      const file = path.join(this.doneDir, name);
      const info = await stat(file).catch(() => undefined);
      if (info && info.mtimeMs < cutoff) {
        await rm(file, { force: true });
      }
    }
  }

  private ackTopicFor(dataTopic: string): string {
    return (this.options.ackTopicFor ?? ackTopicForDataTopic)(dataTopic);
  }

  private enqueue(key: string, work: () => Promise<void>): void {
    const previous = this.queues.get(key) ?? Promise.resolve();
    const next = previous
      .then(work)
      .catch((error: unknown) => this.logger.error({ key, err: describeError(error) }, "transfer frame handling failed"))
      .finally(() => {
        if (this.queues.get(key) === next) {
          this.queues.delete(key);
        }
      });
    this.queues.set(key, next);
  }

  private warnRateLimited(kind: string, fields: object, message: string): void {
    const now = Date.now();
    if (now - (this.lastWarning.get(kind) ?? 0) >= WARN_INTERVAL_MS) {
      this.lastWarning.set(kind, now);
      this.logger.warn({ ...fields, stats: { ...this.stats } }, message);
    }
  }

  private onFrame(topic: string, payload: Buffer): void {
    if (this.closed) {
      return;
    }
    const decoded = decodeFrame(payload);
    if (!decoded.ok) {
      this.stats.framesInvalid++;
      this.warnRateLimited("invalid-frame", { topic, err: decoded.error }, "ignoring an invalid transfer frame");
      return;
    }
    const { header } = decoded.value;
    // The frame's payload is a view into the MQTT packet buffer, which mqtt.js does not reuse.
    const chunkPayload = decoded.value.payload;
    const key = transferKey(topic, header.transferId);
    if (header.type === "begin") {
      this.enqueue(key, () => this.onBegin(key, topic, header));
    } else {
      this.enqueue(key, () => this.onChunk(key, header, chunkPayload));
    }
  }

  private sendAck(ackTopic: string, transferId: string, state: TransferAck["state"], have: ChunkRange[], error?: string): void {
    const ack: TransferAck = { v: PROTOCOL_VERSION, transferId, state, have };
    if (error !== undefined) {
      ack.error = error;
    }
    this.options.link.publish(ackTopic, ack, { qos: 1 }).catch((publishError: unknown) => {
      this.logger.warn({ transferId, ackTopic, err: describeError(publishError) }, "acknowledgement publish failed");
    });
  }

  private async onBegin(key: string, dataTopic: string, begin: BeginHeader): Promise<void> {
    const ackTopic = this.ackTopicFor(dataTopic);
    const { transferId } = begin;
    const reject = (error: string): void => {
      this.stats.transfersFailed++;
      this.logger.warn({ transferId, dataTopic, size: begin.size, err: error }, "transfer rejected");
      this.sendAck(ackTopic, transferId, "failed", [], error);
    };

    const marker = await this.readDoneMarker(key);
    if (marker) {
      if (marker.sha256 === begin.sha256 && marker.size === begin.size) {
        this.sendAck(ackTopic, transferId, "complete", begin.chunks > 0 ? [[0, begin.chunks - 1]] : []);
      } else {
        reject(`transfer id ${transferId} already completed with different content (sha256 ${marker.sha256}); use a new transferId`);
      }
      return;
    }

    const existing = this.incoming.get(key);
    if (existing && sameFile(existing.begin, begin)) {
      existing.lastActivity = Date.now();
      this.sendAck(ackTopic, transferId, "partial", existing.durable.toRanges());
      return;
    }
    if (existing) {
      this.logger.info({ transferId, dataTopic }, "begin announces different content; restarting the transfer");
      await this.discard(existing);
    }

    if (begin.size > this.options.maxBytes) {
      reject(`transfer of ${begin.size} bytes exceeds the receiver limit of ${this.options.maxBytes} bytes`);
      return;
    }
    const maxConcurrent = this.options.maxConcurrent ?? DEFAULT_MAX_CONCURRENT;
    if (this.incoming.size >= maxConcurrent) {
      reject(`receiver busy: ${this.incoming.size} transfers in progress (maxConcurrent ${maxConcurrent}); retry later`);
      return;
    }

    const dir = path.join(this.activeDir, key);
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    const transfer: Incoming = {
      key,
      dir,
      dataTopic,
      ackTopic,
      begin,
      stored: new ChunkSet(begin.chunks),
      durable: new ChunkSet(begin.chunks),
      file: await open(path.join(dir, "data"), "w+"),
      unacknowledged: 0,
      ackTimer: undefined,
      lastActivity: Date.now(),
      finishing: false,
    };
    this.incoming.set(key, transfer);
    await this.persist(transfer);
    this.logger.info({ transferId, dataTopic, kind: begin.kind, name: begin.name, size: begin.size, chunks: begin.chunks }, "transfer started");
    if (begin.chunks === 0) {
      await this.finish(transfer);
      return;
    }
    this.sendAck(ackTopic, transferId, "partial", []);
  }

  private async onChunk(key: string, header: ChunkHeader, payload: Buffer): Promise<void> {
    const transfer = this.incoming.get(key);
    if (!transfer) {
      // Usually chunks in flight when the receiver restarted or discarded the transfer. The sender's next begin resynchronises.
      this.stats.chunksUnknown++;
      this.warnRateLimited("unknown-chunk", { transferId: header.transferId, index: header.index }, "ignoring a chunk of a transfer without begin");
      return;
    }
    if (transfer.finishing) {
      this.stats.chunksDuplicate++;
      return;
    }
    const { begin } = transfer;
    const { index } = header;
    transfer.lastActivity = Date.now();

    let problem: string | undefined;
    if (index >= begin.chunks) {
      problem = `index ${index} is beyond the last chunk ${begin.chunks - 1}`;
    } else if (payload.length !== chunkLength(begin, index)) {
      problem = `chunk ${index} has ${payload.length} bytes, expected ${chunkLength(begin, index)}`;
    } else if (sha256Hex(payload) !== header.sha256) {
      problem = `chunk ${index} does not match its sha256`;
    }
    if (problem !== undefined) {
      this.stats.chunksRejected++;
      this.warnRateLimited("bad-chunk", { transferId: begin.transferId, dataTopic: transfer.dataTopic, index, err: problem }, "rejected a transfer chunk");
      return;
    }

    if (transfer.stored.has(index)) {
      // The sender missed an acknowledgement, so send one soon.
      this.stats.chunksDuplicate++;
      this.scheduleAck(transfer);
      return;
    }

    transfer.file ??= await open(path.join(transfer.dir, "data"), "r+");
    await transfer.file.write(payload, 0, payload.length, index * begin.chunkSize);
    transfer.stored.add(index);
    transfer.unacknowledged++;
    this.stats.chunksStored++;

    if (transfer.stored.complete) {
      await this.finish(transfer);
      return;
    }
    const ackEvery = this.options.ackEveryChunks ?? (begin.window ? Math.max(1, Math.floor(begin.window / 2)) : DEFAULT_ACK_EVERY_CHUNKS);
    if (transfer.unacknowledged >= ackEvery) {
      await this.acknowledge(transfer);
    } else {
      this.scheduleAck(transfer);
    }
  }

  private scheduleAck(transfer: Incoming): void {
    if (transfer.ackTimer) {
      return;
    }
    transfer.ackTimer = setTimeout(() => {
      transfer.ackTimer = undefined;
      if (this.closed) {
        return;
      }
      this.enqueue(transfer.key, async () => {
        if (this.incoming.get(transfer.key) === transfer && !transfer.finishing) {
          await this.acknowledge(transfer);
        }
      });
    }, this.options.ackIntervalMs ?? DEFAULT_ACK_INTERVAL_MS);
  }

  /** Syncs the stored chunks and sends a "partial" acknowledgement with them. */
  private async acknowledge(transfer: Incoming): Promise<void> {
    clearTimeout(transfer.ackTimer);
    transfer.ackTimer = undefined;
    await this.persist(transfer);
    transfer.unacknowledged = 0;
    this.sendAck(transfer.ackTopic, transfer.begin.transferId, "partial", transfer.durable.toRanges());
  }

  /** Syncs the data file, then records the stored chunks in state.json. */
  private async persist(transfer: Incoming): Promise<void> {
    await transfer.file?.datasync();
    const state: StateFile = {
      version: 1,
      dataTopic: transfer.dataTopic,
      begin: transfer.begin,
      have: transfer.stored.toRanges(),
      updatedAt: Date.now(),
    };
    await writeFileDurably(path.join(transfer.dir, "state.json"), JSON.stringify(state));
    transfer.durable = transfer.stored.clone();
  }

  /**
   * Verifies the whole file, hands it to onComplete, and acknowledges "complete" after that
   * resolved. A sha256 mismatch or an onComplete error acknowledges "failed" and deletes the data.
   */
  private async finish(transfer: Incoming): Promise<void> {
    const { begin, ackTopic, dataTopic } = transfer;
    const { transferId } = begin;
    transfer.finishing = true;
    clearTimeout(transfer.ackTimer);
    transfer.ackTimer = undefined;
    await this.persist(transfer);
    await transfer.file?.close();
    transfer.file = undefined;

    const dataFile = path.join(transfer.dir, "data");
    const fileDir = path.join(transfer.dir, "file");
    const file = path.join(fileDir, begin.name);
    if (!(await exists(dataFile)) && (await exists(file))) {
      // An earlier run moved the verified file and stopped before the done marker.
      await rename(file, dataFile);
    }
    // A zero-byte transfer never writes the data file, so make sure it exists.
    await writeFile(dataFile, "", { flag: "a" });
    const actual = await fileSha256(dataFile);
    if (actual !== begin.sha256) {
      await this.discard(transfer);
      this.stats.transfersFailed++;
      const error = `sha256 mismatch: begin announced ${begin.sha256}, the received data hashes to ${actual}; the partial data was deleted`;
      this.logger.warn({ transferId, dataTopic, err: error }, "transfer failed verification");
      this.sendAck(ackTopic, transferId, "failed", [], error);
      return;
    }

    await mkdir(fileDir, { recursive: true });
    await rename(dataFile, file);
    const parsed = parseDeviceTopic(dataTopic);
    try {
      await this.options.onComplete(file, begin, { dataTopic, site: parsed?.site, device: parsed?.device });
    } catch (error) {
      await this.discard(transfer);
      this.stats.transfersFailed++;
      const message = `receiver could not store the file: ${describeError(error)}`;
      this.logger.error({ transferId, dataTopic, err: describeError(error) }, "onComplete failed; transfer failed");
      this.sendAck(ackTopic, transferId, "failed", [], message);
      return;
    }

    const marker: DoneMarker = { transferId, dataTopic, sha256: begin.sha256, size: begin.size, completedAt: Date.now() };
    await writeFileDurably(path.join(this.doneDir, `${transfer.key}.json`), JSON.stringify(marker));
    await this.discard(transfer);
    this.stats.transfersCompleted++;
    this.logger.info({ transferId, dataTopic, kind: begin.kind, name: begin.name, size: begin.size }, "transfer complete");
    this.sendAck(ackTopic, transferId, "complete", transfer.durable.toRanges());
  }

  /** Forgets a transfer and deletes its folder. */
  private async discard(transfer: Incoming): Promise<void> {
    clearTimeout(transfer.ackTimer);
    transfer.ackTimer = undefined;
    if (this.incoming.get(transfer.key) === transfer) {
      this.incoming.delete(transfer.key);
    }
    await transfer.file?.close().catch(() => undefined);
    transfer.file = undefined;
    await rm(transfer.dir, { recursive: true, force: true });
  }

  private async readDoneMarker(key: string): Promise<DoneMarker | undefined> {
    try {
      return JSON.parse(await readFile(path.join(this.doneDir, `${key}.json`), "utf8")) as DoneMarker;
    } catch {
      return undefined;
    }
  }
}

async function exists(file: string): Promise<boolean> {
  return (await stat(file).catch(() => undefined)) !== undefined;
}

function sameFile(a: BeginHeader, b: BeginHeader): boolean {
  return a.sha256 === b.sha256 && a.size === b.size && a.chunkSize === b.chunkSize;
}
