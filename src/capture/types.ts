/** One encoded camera frame as it leaves a source. */
export interface Frame {
  /** Unique within the agent's lifetime: `<source>-<sequence>`. */
  id: string;
  /** Source name from the configuration. */
  source: string;
  /** Per-source sequence number, starting at 1 and restarting when the agent restarts. */
  sequence: number;
  /** Encoded image bytes (JPEG for camera sources; any format sharp reads for the directory source). */
  data: Buffer;
  /** Capture time, milliseconds since the Unix epoch. */
  capturedAt: number;
  /** Ground-truth label, known only when replaying labelled images (the folder name). */
  label?: string;
  /** Original file, for replayed images. */
  file?: string;
}

export type FrameHandler = (frame: Frame) => void;

/**
 * A frame source. `start` resolves once the source is running (the first frame may come later);
 * frames arrive through the handler until `stop` resolves. A source that fails reports it through
 * the `onError` handler and stays stopped until started again; restarts are the watchdog's job.
 */
export interface FrameSource {
  readonly name: string;
  start(onFrame: FrameHandler, onError: (error: Error) => void): Promise<void>;
  stop(): Promise<void>;
}
