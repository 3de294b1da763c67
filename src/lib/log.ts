import { destination as pinoDestination, pino, stdTimeFunctions, type DestinationStream, type Logger } from "pino";

export type { Logger } from "pino";

export interface LoggerOptions {
  level?: string;
  /** File descriptor of the JSON log stream: 1 for services (journald), 2 for CLIs whose stdout carries results. */
  fd?: 1 | 2;
  base?: Record<string, unknown>;
  destination?: DestinationStream;
}

/** Creates the JSON logger; fields such as device, source, frame and model ids go in `base` or child loggers. */
export function createLogger(options: LoggerOptions = {}): Logger {
  const level = options.level ?? process.env.SORTLINE_LOG_LEVEL ?? "info";
  const destination = options.destination ?? pinoDestination({ fd: options.fd ?? 1, sync: false });
  return pino(
    {
      level,
      base: options.base ?? {},
      timestamp: stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
}

/** A logger that discards everything, for library callers that pass none. */
export const silentLogger: Logger = pino({ level: "silent" });
