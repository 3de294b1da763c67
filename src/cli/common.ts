import path from "node:path";
import { fileURLToPath } from "node:url";

import { SortlineError } from "../lib/errors.js";

/** A command line that cannot be run as given; the CLI prints the message and exits with 2. */
export class UsageError extends SortlineError {}

/** Root of the installed package (the folder holding package.json). */
export const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Returns the bundled default model package folder, used when no --model is given. */
export function defaultModelDir(): string {
  return path.join(packageRoot, "models", "default");
}
