/** Base class of the errors sortline raises on purpose; `cause` keeps the underlying error. */
export class SortlineError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** An invalid configuration value: names the key path, the value and the expected form. */
export class ConfigError extends SortlineError {
  constructor(
    readonly keyPath: string,
    message: string,
  ) {
    super(keyPath ? `${keyPath}: ${message}` : message);
  }
}

/** A model package that cannot be loaded: missing files, bad manifest, checksum mismatch. */
export class ModelLoadError extends SortlineError {}

/** An image or camera frame that cannot be decoded into a model input. */
export class ImageDecodeError extends SortlineError {}

/** A camera source that failed to start or stopped producing frames. */
export class CameraError extends SortlineError {}

/** Returns a one-line description of any thrown value for logs and replies. */
export function describeError(error: unknown): string {
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}
