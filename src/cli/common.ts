import path from "node:path";
import { fileURLToPath } from "node:url";

import { describeError, SortlineError } from "../lib/errors.js";
import type { Logger } from "../lib/log.js";

/** A command line that cannot be run as given; the CLI prints the message and exits with 2. */
export class UsageError extends SortlineError {}

/** Root of the installed package (the folder holding package.json). */
export const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Returns the bundled default model package folder, used when no --model is given. */
export function defaultModelDir(): string {
  return path.join(packageRoot, "models", "default");
}

/**
 * Calls `stop` once on the first SIGTERM or SIGINT and resolves with the exit code: 0 when it
 * finished, 1 when it failed (the failure is logged).
 */
export function stopOnSignal(stop: () => Promise<void>, logger: Logger): Promise<number> {
  return new Promise<number>((resolve) => {
    let stopping = false;
    const shutdown = (signal: string): void => {
      if (stopping) {
        return;
      }
      stopping = true;
      logger.info({ signal }, "shutdown requested");
      stop().then(
        () => resolve(0),
        (error: unknown) => {
          logger.error({ err: describeError(error) }, "shutdown failed");
          resolve(1);
        },
      );
    };
    process.once("SIGTERM", () => shutdown("SIGTERM"));
    process.once("SIGINT", () => shutdown("SIGINT"));
  });
}
