import { readFile } from "node:fs/promises";
import path from "node:path";

import { parseAgentConfig, readConfigDocument } from "../config/load.js";
import type { AgentConfig } from "../config/schema.js";
import { ConfigError, describeError } from "../lib/errors.js";
import type { Logger } from "../lib/log.js";
import { writeJsonAtomic } from "../update/durable.js";

/** Settings changed by fleet commands, kept in the state folder and applied over the file at every start. */
export const OVERRIDES_FILE = "config-overrides.json";

export type Overrides = Record<string, unknown>;

/** Effect of a changed key: at once, or at the next start. */
export type KeyEffect = "live" | "restart";

const LIVE_PREFIXES = ["decisions.", "logging.level", "mining.lowConfidence", "mining.minMargin", "mining.noveltyThreshold", "mining.randomRate",
  "mining.minDistance", "mining.clusterRadius", "mining.maxClusterShare", "mining.perHour", "mining.enabled"];
const RESTART_PREFIXES = ["pipeline.", "update.", "mining.outbox.", "audit.", "health.", "fleet.statusIntervalSeconds"];

/**
 * Returns how a dotted key takes effect, or undefined for keys a fleet command may not change:
 * the device identity, the model folder, sources, actuators and the fleet connection and keys.
 */
export function keyEffect(key: string): KeyEffect | undefined {
  const matches = (prefix: string): boolean => (prefix.endsWith(".") ? key.startsWith(prefix) && key.length > prefix.length : key === prefix);
  if (LIVE_PREFIXES.some(matches)) {
    return "live";
  }
  if (RESTART_PREFIXES.some(matches)) {
    return "restart";
  }
  return undefined;
}

/**
 * True when a dotted key has a `__proto__` segment. `node["__proto__"]` is Object.prototype, so
 * setting `decisions.__proto__.x` would add `x` to every object in the process.
 */
function hasProtoSegment(key: string): boolean {
  return key.split(".").includes("__proto__");
}

/**
 * Sets dotted keys on a copy of a configuration document; `null` removes a key. Throws
 * ConfigError for a key with a `__proto__` segment.
 */
export function applyOverrides(document: unknown, overrides: Overrides): Record<string, unknown> {
  const copy = structuredClone((document ?? {}) as Record<string, unknown>);
  for (const [key, value] of Object.entries(overrides)) {
    if (hasProtoSegment(key)) {
      throw new ConfigError(key, 'contains the segment "__proto__", which no configuration key has');
    }
    const parts = key.split(".");
    let node: Record<string, unknown> = copy;
    for (const part of parts.slice(0, -1)) {
      const next = Object.hasOwn(node, part) ? node[part] : undefined;
      if (typeof next !== "object" || next === null || Array.isArray(next)) {
        node[part] = {};
      }
      node = node[part] as Record<string, unknown>;
    }
    const last = parts[parts.length - 1]!;
    if (value === null) {
      delete node[last];
    } else {
      node[last] = value;
    }
  }
  return copy;
}

export async function readOverrides(stateDir: string): Promise<Overrides> {
  const file = path.join(stateDir, OVERRIDES_FILE);
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      return {};
    }
    throw new ConfigError("", `cannot read ${file}: ${describeError(error)}`);
  }
  const parsed = JSON.parse(text) as unknown;
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new ConfigError("", `${file} must hold a JSON object of dotted keys`);
  }
  return parsed as Overrides;
}

export async function writeOverrides(stateDir: string, overrides: Overrides): Promise<void> {
  await writeJsonAtomic(path.join(stateDir, OVERRIDES_FILE), overrides);
}

/**
 * Loads the configuration file plus the persisted overrides. Overrides that no longer validate (after a
 * software update changed the schema, say) are logged and left out, so the device still starts.
 */
export async function loadWithOverrides(file: string, base: AgentConfig, logger: Logger): Promise<{ config: AgentConfig; overrides: Overrides }> {
  let overrides: Overrides;
  try {
    overrides = await readOverrides(base.update.stateDir);
  } catch (error) {
    logger.error({ err: describeError(error) }, "settings changed by fleet commands cannot be read; starting with the configuration file alone");
    return { config: base, overrides: {} };
  }
  if (Object.keys(overrides).length === 0) {
    return { config: base, overrides };
  }
  try {
    const config = parseAgentConfig(applyOverrides(await readConfigDocument(file), overrides), file, path.dirname(path.resolve(file)));
    logger.info({ keys: Object.keys(overrides) }, "applied settings changed by fleet commands");
    return { config, overrides };
  } catch (error) {
    logger.error({ err: describeError(error), keys: Object.keys(overrides) }, "settings changed by fleet commands no longer validate; starting with the configuration file alone");
    return { config: base, overrides: {} };
  }
}

/**
 * Validates a change of dotted keys against the configuration file plus the current overrides and
 * returns the new configuration and overrides. Throws ConfigError naming the first bad key.
 */
export async function validateChange(file: string, current: Overrides, change: Overrides): Promise<{ config: AgentConfig; overrides: Overrides; effects: Record<string, KeyEffect> }> {
  const effects: Record<string, KeyEffect> = {};
  for (const key of Object.keys(change)) {
    if (!/^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z0-9_-]+)*$/.test(key) || hasProtoSegment(key)) {
      throw new ConfigError(key, "is not a dotted configuration key such as decisions.defaultMinConfidence");
    }
    const effect = keyEffect(key);
    if (!effect) {
      throw new ConfigError(key, "cannot be changed by a fleet command; edit the configuration file on the device");
    }
    effects[key] = effect;
  }
  const overrides = { ...current, ...change };
  const config = parseAgentConfig(applyOverrides(await readConfigDocument(file), overrides), file, path.dirname(path.resolve(file)));
  return { config, overrides, effects };
}
