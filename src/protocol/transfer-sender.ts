/**
 * Sending side of the chunked transfer. The sender publishes a begin frame and waits for the
 * receiver's acknowledgement, which lists the chunks the receiver already holds. It then sends the
 * missing chunks with at most `window` of them unacknowledged. When no acknowledgement brings
 * progress within `ackTimeoutMs`, it sends begin again. The receiver replies with what it holds,
 * so a transfer cut by a broker restart, a dropped link or a receiver restart resumes from the
 * chunks already stored rather than from zero.
 */
import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { MqttLink, Unsubscribe } from "./link.js";
import { decodeTransferAck, PROTOCOL_VERSION, type ChunkRange, type TransferAck } from "./messages.js";
import { ChunkSet } from "./transfer-chunks.js";
import { chunkCount, encodeFrame, FILE_NAME_PATTERN, MAX_CHUNK_SIZE, MAX_CHUNKS, sha256Hex, TRANSFER_ID_PATTERN, type BeginHeader } from "./transfer-frames.js";

/** A transfer that failed: rejected by the receiver, invalid input, no progress, or sender closed. */
export class TransferError extends SortlineError {
  constructor(
    message: string,
    /** The receiver's error from a "failed" acknowledgement, when that ended the transfer. */
    readonly receiverError?: string,
  ) {
    super(message);
  }
}

export interface SendRequest {
  /** Topic the frames go to, e.g. `sortline/v1/{site}/{device}/down/data`. */
  dataTopic: string;
  /** Topic the receiver acknowledges on, e.g. `sortline/v1/{site}/{device}/down/ack`. */
  ackTopic: string;
  transferId: string;
  kind: string;
  name: string;
  data: Buffer;
  meta?: Record<string, unknown>;
  /** Bytes per chunk (default 65536). */
  chunkSize?: number;
  /** Chunks sent but not yet acknowledged, at most (default 8). */
  window?: number;
  /** Time without acknowledged progress before begin is sent again (default 10000 ms). */
  ackTimeoutMs?: number;
  /**
   * Begin frames sent without progress before the transfer fails (default 5). Time while the
   * link is disconnected does not count.
   */
  maxAttempts?: number;
  /** Called after each "partial" acknowledgement with the chunks the receiver holds. */
  onProgress?: (progress: TransferProgress) => void;
}

export interface TransferProgress {
  /** Chunks the receiver holds. */
  acknowledged: number;
  chunks: number;
  /** The held chunk indices as inclusive ranges. */
  have: ChunkRange[];
}

export interface TransferResult {
  transferId: string;
  bytes: number;
  chunks: number;
  /** Begin frames published. */
  beginSends: number;
  /** Publishes of each chunk, by index; above 1 means the chunk was re-sent. */
  sendCounts: number[];
}

export interface TransferSenderOptions {
  link: MqttLink;
  logger?: Logger;
}

const DEFAULTS = { chunkSize: 65_536, window: 8, ackTimeoutMs: 10_000, maxAttempts: 5 };
const TRANSFER_ID_REGEX = new RegExp(TRANSFER_ID_PATTERN);
const FILE_NAME_REGEX = new RegExp(FILE_NAME_PATTERN);

/** One running send. */
class OutgoingTransfer {
  readonly begin: BeginHeader;
  readonly acked: ChunkSet;
  private readonly inFlight = new Set<number>();
  private readonly sendCounts: Uint32Array;
  private beginSends = 0;
  private attempts = 0;
  private awaitingBeginAck = true;
  private timer: NodeJS.Timeout | undefined;
  private done = false;
  readonly result: Promise<TransferResult>;
  private resolve!: (result: TransferResult) => void;
  private reject!: (error: Error) => void;

  constructor(
    private readonly link: MqttLink,
    private readonly request: Required<Omit<SendRequest, "onProgress" | "meta">> & Pick<SendRequest, "onProgress" | "meta">,
    private readonly logger: Logger,
    private readonly onSettled: () => void,
  ) {
    const { data, chunkSize } = request;
    const chunks = chunkCount(data.length, chunkSize);
    this.begin = {
      v: PROTOCOL_VERSION,
      type: "begin",
      transferId: request.transferId,
      kind: request.kind,
      name: request.name,
      size: data.length,
      sha256: sha256Hex(data),
      chunkSize,
      chunks,
      meta: request.meta ?? {},
      window: request.window,
    };
    this.acked = new ChunkSet(chunks);
    this.sendCounts = new Uint32Array(chunks);
    this.result = new Promise<TransferResult>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // close() can fail the transfer while send() still waits for the ack subscription, before any
    // caller awaits the promise. This handler keeps that from becoming an unhandled rejection,
    // and the caller of send() still receives the error.
    this.result.catch(() => undefined);
  }

  start(): void {
    this.attempts = 1;
    this.sendBegin();
  }

  /** Sends begin again right away, e.g. after the link reconnected; not counted as an attempt. */
  resync(): void {
    if (!this.done) {
      this.sendBegin();
    }
  }

  onAck(ack: TransferAck): void {
    if (this.done) {
      return;
    }
    if (ack.state === "complete") {
      this.finish();
      return;
    }
    if (ack.state === "failed") {
      const reason = ack.error ?? "no reason given";
      this.fail(new TransferError(`receiver rejected transfer ${this.begin.transferId}: ${reason}`, reason));
      return;
    }

    const have = ChunkSet.fromRanges(this.begin.chunks, ack.have);
    const progressed = have.count > this.acked.count;
    // The receiver's list replaces ours, since it may have lost unacknowledged chunks on a restart.
    this.acked.replaceWith(have);
    for (const index of [...this.inFlight]) {
      if (this.acked.has(index)) {
        this.inFlight.delete(index);
      }
    }

    this.request.onProgress?.({ acknowledged: this.acked.count, chunks: this.begin.chunks, have: ack.have });
    if (progressed || this.acked.complete) {
      // The receiver stores chunks or is finishing the file, so the attempt count starts over.
      this.attempts = 1;
      this.armTimer();
    } else if (this.awaitingBeginAck) {
      // The receiver replied to begin. Attempts keep counting, so a chunk it rejects every time ends the transfer.
      this.armTimer();
    }

    this.awaitingBeginAck = false;
    this.fillWindow();
  }

  /** Ends the transfer with an error, e.g. when the sender closes. */
  fail(error: Error): void {
    if (this.done) {
      return;
    }
    this.done = true;
    clearTimeout(this.timer);
    this.logger.warn({ transferId: this.begin.transferId, err: describeError(error) }, "transfer failed");
    this.onSettled();
    this.reject(error);
  }

  private finish(): void {
    this.done = true;
    clearTimeout(this.timer);
    this.logger.info({ transferId: this.begin.transferId, bytes: this.begin.size, beginSends: this.beginSends }, "transfer complete");
    this.onSettled();
    this.resolve({
      transferId: this.begin.transferId,
      bytes: this.begin.size,
      chunks: this.begin.chunks,
      beginSends: this.beginSends,
      sendCounts: [...this.sendCounts],
    });
  }

  private sendBegin(): void {
    this.inFlight.clear();
    this.awaitingBeginAck = true;
    this.beginSends++;
    this.publish(encodeFrame(this.begin), "begin");
    this.armTimer();
  }

  private fillWindow(): void {
    if (this.awaitingBeginAck) {
      return;
    }
    for (let index = 0; index < this.begin.chunks && this.inFlight.size < this.request.window; index++) {
      if (this.acked.has(index) || this.inFlight.has(index)) {
        continue;
      }
      this.inFlight.add(index);
      this.sendChunk(index);
    }
  }

  private sendChunk(index: number): void {
    const { data, chunkSize } = this.request;
    const payload = data.subarray(index * chunkSize, Math.min(data.length, (index + 1) * chunkSize));
    this.sendCounts[index]! += 1;
    this.publish(encodeFrame({ v: PROTOCOL_VERSION, type: "chunk", transferId: this.begin.transferId, index, sha256: sha256Hex(payload) }, payload), `chunk ${index}`);
  }

  private publish(frame: Buffer, what: string): void {
    this.link.publish(this.request.dataTopic, frame, { qos: 1 }).catch((error: unknown) => {
      if (!this.done) {
        this.logger.warn({ transferId: this.begin.transferId, frame: what, err: describeError(error) }, "transfer frame publish failed; the ack timeout will resend it");
      }
    });
  }

  private armTimer(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.onTimeout(), this.request.ackTimeoutMs);
  }

  private onTimeout(): void {
    if (this.done) {
      return;
    }
    if (!this.link.connected) {
      // Waiting for the broker is not the receiver's fault; the link's connect event resends begin.
      this.armTimer();
      return;
    }
    if (this.attempts >= this.request.maxAttempts) {
      this.fail(
        new TransferError(
          `transfer ${this.begin.transferId} made no progress after ${this.attempts} attempts of ${this.request.ackTimeoutMs} ms (${this.acked.count} of ${this.begin.chunks} chunks acknowledged); is the receiver subscribed to ${this.request.dataTopic}?`,
        ),
      );
      return;
    }
    this.attempts++;
    this.logger.info({ transferId: this.begin.transferId, attempt: this.attempts, acknowledged: this.acked.count, chunks: this.begin.chunks }, "no acknowledgement in time; sending begin again");
    this.sendBegin();
  }
}

interface AckSubscription {
  transfers: Map<string, OutgoingTransfer>;
  unsubscribe: Promise<Unsubscribe>;
}

/** Sends files over MQTT in chunks. One sender runs any number of transfers at once. */
export class TransferSender {
  private readonly logger: Logger;
  private readonly subscriptions = new Map<string, AckSubscription>();
  private closed = false;
  private readonly onConnect = (): void => {
    for (const subscription of this.subscriptions.values()) {
      for (const transfer of subscription.transfers.values()) {
        transfer.resync();
      }
    }
  };

  constructor(private readonly options: TransferSenderOptions) {
    this.logger = (options.logger ?? silentLogger).child({ component: "transfer-sender" });
    options.link.on("connect", this.onConnect);
  }

  /**
   * Sends one file and resolves when the receiver acknowledges "complete", which it does only after
   * it has stored the file. Rejects with TransferError on a "failed" acknowledgement, after
   * `maxAttempts` begin frames without progress, on invalid input, or when the sender closes.
   */
  async send(request: SendRequest): Promise<TransferResult> {
    if (this.closed) {
      throw new TransferError("transfer sender is closed");
    }
    const resolved = { ...DEFAULTS, ...withoutUndefined(request) } as ConstructorParameters<typeof OutgoingTransfer>[1];
    validateRequest(resolved);

    let subscription = this.subscriptions.get(request.ackTopic);
    if (subscription?.transfers.has(request.transferId)) {
      throw new TransferError(`transfer ${request.transferId} to ${request.dataTopic} is already running`);
    }
    if (!subscription) {
      const ackTopic = request.ackTopic;
      const created: AckSubscription = {
        transfers: new Map(),
        unsubscribe: this.options.link.subscribe(ackTopic, (_topic, payload) => this.onAck(ackTopic, payload)),
      };
      subscription = created;
      this.subscriptions.set(ackTopic, created);
    }
    const ackSubscription = subscription;
    const transfer = new OutgoingTransfer(this.options.link, resolved, this.logger, () => this.release(request.ackTopic, request.transferId));
    ackSubscription.transfers.set(request.transferId, transfer);
    try {
      await ackSubscription.unsubscribe;
    } catch (error) {
      transfer.fail(new TransferError(`cannot subscribe to ${request.ackTopic}: ${describeError(error)}`));
      return transfer.result;
    }
    this.logger.info({ transferId: request.transferId, dataTopic: request.dataTopic, bytes: request.data.length, chunks: transfer.begin.chunks }, "starting transfer");
    transfer.start();
    return transfer.result;
  }

  /** Rejects every running transfer and drops the ack subscriptions. */
  async close(): Promise<void> {
    this.closed = true;
    this.options.link.off("connect", this.onConnect);
    const subscriptions = [...this.subscriptions.values()];
    for (const subscription of subscriptions) {
      for (const transfer of [...subscription.transfers.values()]) {
        transfer.fail(new TransferError(`transfer ${transfer.begin.transferId} stopped: the sender was closed`));
      }
    }
  }

  private onAck(ackTopic: string, payload: Buffer): void {
    const decoded = decodeTransferAck(payload);
    if (!decoded.ok) {
      this.logger.warn({ ackTopic, err: decoded.error }, "ignoring an invalid transfer acknowledgement");
      return;
    }
    this.subscriptions.get(ackTopic)?.transfers.get(decoded.value.transferId)?.onAck(decoded.value);
  }

  /** Forgets a settled transfer and unsubscribes from its ack topic when no other transfer uses it. */
  private release(ackTopic: string, transferId: string): void {
    const subscription = this.subscriptions.get(ackTopic);
    if (!subscription) {
      return;
    }
    subscription.transfers.delete(transferId);
    if (subscription.transfers.size > 0) {
      return;
    }
    this.subscriptions.delete(ackTopic);
    subscription.unsubscribe
      .then((unsubscribe) => unsubscribe())
      .catch((error: unknown) => this.logger.warn({ ackTopic, err: describeError(error) }, "unsubscribing from the ack topic failed"));
  }
}

function withoutUndefined<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, entry]) => entry !== undefined)) as Partial<T>;
}

function validateRequest(request: ConstructorParameters<typeof OutgoingTransfer>[1]): void {
  const problems: string[] = [];
  if (!TRANSFER_ID_REGEX.test(request.transferId)) {
    problems.push(`transferId ${JSON.stringify(request.transferId)} must match ${TRANSFER_ID_PATTERN}`);
  }
  if (!FILE_NAME_REGEX.test(request.name)) {
    problems.push(`name ${JSON.stringify(request.name)} must match ${FILE_NAME_PATTERN}`);
  }
  if (typeof request.kind !== "string" || request.kind.length < 1 || request.kind.length > 64) {
    problems.push("kind must be 1 to 64 characters");
  }
  if (!Number.isInteger(request.chunkSize) || request.chunkSize < 1 || request.chunkSize > MAX_CHUNK_SIZE) {
    problems.push(`chunkSize ${request.chunkSize} must be a whole number from 1 to ${MAX_CHUNK_SIZE}`);
  } else if (chunkCount(request.data.length, request.chunkSize) > MAX_CHUNKS) {
    problems.push(`${request.data.length} bytes at chunkSize ${request.chunkSize} need more than ${MAX_CHUNKS} chunks; raise chunkSize`);
  }
  for (const key of ["window", "ackTimeoutMs", "maxAttempts"] as const) {
    if (!Number.isInteger(request[key]) || request[key] < 1) {
      problems.push(`${key} ${request[key]} must be a whole number >= 1`);
    }
  }
  if (problems.length > 0) {
    throw new TransferError(`invalid transfer request: ${problems.join("; ")}`);
  }
}
