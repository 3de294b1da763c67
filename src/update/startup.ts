import { describeError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { TrustedKey } from "../models/signing.js";
import type { CrashLoopGuard } from "./guard.js";
import type { ModelStore, ResolvedModel } from "./store.js";

export interface StartupModel extends ResolvedModel {
  /** Id of the version that was rolled back at this start because it kept crashing the agent. */
  rolledBackFrom?: string;
}

/**
 * Chooses the model for an agent start: the store's verified active version, recorded as a
 * start in the crash-loop guard. When that version has started too often without being marked
 * healthy, it rolls back to the previous verified version (or the bundled default) first. The
 * agent calls guard.markHealthy once the model has decided enough frames.
 */
export async function resolveStartupModel(options: {
  store: ModelStore;
  guard: CrashLoopGuard;
  bundledDefault: string;
  trustedKeys?: readonly TrustedKey[];
  logger?: Logger;
}): Promise<StartupModel> {
  const { store, guard, bundledDefault, trustedKeys } = options;
  const logger = options.logger ?? silentLogger;
  const resolved = await store.resolveActive({ bundledDefault, trustedKeys });
  if (resolved.source !== "store") {
    return resolved;
  }
  const starts = await guard.recordStart(resolved.id);
  if (!guard.shouldRollBack(resolved.id)) {
    return resolved;
  }

  logger.error({ version: resolved.id, starts }, "model version keeps crashing the agent; rolling back");
  try {
    await store.rollback();
  } catch (error) {
    logger.warn({ err: describeError(error) }, "no earlier stored version verifies; falling back to the bundled default model");
    await store.deactivate();
  }
  const fallback: StartupModel = await store.resolveActive({ bundledDefault, trustedKeys });
  fallback.rolledBackFrom = resolved.id;
  if (fallback.source === "store") {
    await guard.recordStart(fallback.id);
  }
  return fallback;
}
