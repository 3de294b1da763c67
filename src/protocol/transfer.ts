/**
 * Chunked binary transfer with resume over MQTT: hard examples from devices to the trainer
 * (`up/data`, `up/ack`) and model packages from the trainer to devices (`down/data`, `down/ack`).
 * Frame format, sender and receiver live in the modules re-exported here.
 */
export { ChunkSet } from "./transfer-chunks.js";
export {
  chunkCount,
  chunkLength,
  decodeFrame,
  encodeFrame,
  FILE_NAME_PATTERN,
  MAX_CHUNK_SIZE,
  MAX_CHUNKS,
  MAX_HEADER_BYTES,
  sha256Hex,
  TRANSFER_ID_PATTERN,
  type BeginHeader,
  type ChunkHeader,
  type Frame,
  type FrameHeader,
} from "./transfer-frames.js";
export { TransferError, TransferSender, type SendRequest, type TransferProgress, type TransferResult, type TransferSenderOptions } from "./transfer-sender.js";
export {
  TransferReceiver,
  type CompleteHandler,
  type ReceiverStats,
  type TransferReceiverOptions,
  type TransferSource,
} from "./transfer-receiver.js";
