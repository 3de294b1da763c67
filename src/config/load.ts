import { readFile } from "node:fs/promises";
import path from "node:path";
import { Ajv, type ErrorObject } from "ajv";
import { parse as parseYaml } from "yaml";

import { defaultModelDir } from "../cli/common.js";
import { ConfigError } from "../lib/errors.js";
import { agentConfigSchema, type AgentConfig, type SecretRef } from "./schema.js";

const ajv = new Ajv({ allErrors: true, useDefaults: true, strict: false });
const validate = ajv.compile(agentConfigSchema);

/** Keywords whose errors only repeat a more specific error reported next to them. */
const WRAPPER_KEYWORDS = new Set(["if", "allOf", "anyOf"]);

function valueAt(document: unknown, pointer: string): unknown {
  let current = document;
  for (const part of pointer.split("/").slice(1)) {
    const key = part.replace(/~1/g, "/").replace(/~0/g, "~");
    current = current !== null && typeof current === "object" ? (current as Record<string, unknown>)[key] : undefined;
  }
  return current;
}

function keyPath(pointer: string): string {
  return pointer
    .split("/")
    .slice(1)
    .map((part) => (/^\d+$/.test(part) ? `[${part}]` : `.${part}`))
    .join("")
    .replace(/^\./, "");
}

function describeValue(value: unknown): string {
  const text = JSON.stringify(value);
  if (text === undefined) {
    return "undefined";
  }
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

/** Turns one schema error into "key.path: value is X; expected Y". */
function formatError(error: ErrorObject, document: unknown): ConfigError {
  const params = error.params as Record<string, unknown>;
  if (error.keyword === "additionalProperties") {
    const pointer = `${error.instancePath}/${String(params.additionalProperty)}`;
    return new ConfigError(keyPath(pointer), "unknown key; check the spelling against the documented keys");
  }
  if (error.keyword === "required") {
    const pointer = `${error.instancePath}/${String(params.missingProperty)}`;
    return new ConfigError(keyPath(pointer), "missing; this key is required");
  }
  let expected = error.message ?? "is invalid";
  if (error.keyword === "enum") {
    expected = `one of ${(params.allowedValues as unknown[]).map((v) => JSON.stringify(v)).join(", ")}`;
  } else if (error.keyword === "pattern") {
    expected = `a string matching ${String(params.pattern)}`;
  } else if (error.keyword === "oneOf") {
    expected = "exactly one of the alternatives (for gstreamer: either pipeline or preset)";
  }
  expected = expected.replace(/^must be /, "").replace(/^must /, "");
  return new ConfigError(keyPath(error.instancePath), `value ${describeValue(valueAt(document, error.instancePath))} is invalid; expected ${expected}`);
}

/** Validation failure listing every invalid key. */
export class ConfigValidationError extends ConfigError {
  constructor(
    readonly file: string,
    readonly problems: ConfigError[],
  ) {
    super("", `${file}: invalid configuration:\n${problems.map((p) => `  - ${p.message}`).join("\n")}`);
  }
}

/** Resolves a relative path against the folder of the configuration file. */
function resolveFrom(base: string, file: string): string {
  return path.isAbsolute(file) ? file : path.resolve(base, file);
}

/**
 * Validates a parsed configuration document, fills in defaults and resolves relative paths
 * against `baseDir`. Throws ConfigValidationError naming every bad key.
 */
export function parseAgentConfig(document: unknown, file: string, baseDir: string): AgentConfig {
  const copy = structuredClone(document ?? {});
  if (!validate(copy)) {
    const problems = (validate.errors ?? []).filter((e) => !WRAPPER_KEYWORDS.has(e.keyword)).map((e) => formatError(e, copy));
    const unique = [...new Map(problems.map((p) => [p.message, p])).values()];
    throw new ConfigValidationError(file, unique);
  }
  const config = copy as unknown as AgentConfig;
  const names = new Set<string>();
  config.sources.forEach((source, index) => {
    if (names.has(source.name)) {
      throw new ConfigValidationError(file, [new ConfigError(`sources[${index}].name`, `value "${source.name}" is used by another source; names must be unique`)]);
    }
    names.add(source.name);
    if (source.type === "directory") {
      source.path = resolveFrom(baseDir, source.path);
    }
  });
  config.model.dir = config.model.dir ? resolveFrom(baseDir, config.model.dir) : defaultModelDir();
  config.audit.path = resolveFrom(baseDir, config.audit.path);
  config.update.stateDir = config.update.stateDir ? resolveFrom(baseDir, config.update.stateDir) : path.dirname(config.audit.path);
  if (config.fleet) {
    config.fleet.trustedKeys = config.fleet.trustedKeys.map((key) => resolveFrom(baseDir, key));
    const tls = config.fleet.tls;
    if (tls) {
      for (const field of ["ca", "cert", "key"] as const) {
        if (tls[field]) {
          tls[field] = resolveFrom(baseDir, tls[field]);
        }
      }
    }
  }
  if (config.actuators.some((actuator) => actuator.type === "fleet") && !config.fleet) {
    throw new ConfigValidationError(file, [new ConfigError("actuators", 'an actuator of type "fleet" needs a "fleet" section')]);
  }
  return config;
}

/** Reads and parses a configuration file (YAML or JSON); raises ConfigError when it cannot be read or parsed. */
export async function readConfigDocument(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (error) {
    throw new ConfigError("", `cannot read configuration file ${file}: ${(error as NodeJS.ErrnoException).code ?? error}`);
  }
  try {
    return parseYaml(text, { prettyErrors: true });
  } catch (error) {
    throw new ConfigError("", `${file} is not valid YAML or JSON: ${(error as Error).message.split("\n")[0]}`);
  }
}

/** Reads, parses (YAML or JSON) and validates an agent configuration file. */
export async function loadAgentConfig(file: string): Promise<AgentConfig> {
  return parseAgentConfig(await readConfigDocument(file), file, path.dirname(path.resolve(file)));
}

/**
 * Returns the value of a secret from the environment or from a systemd credential
 * ($CREDENTIALS_DIRECTORY/<name>). The value is never logged.
 */
export async function resolveSecret(ref: SecretRef, keyPathName: string, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  if (ref.env !== undefined) {
    const value = env[ref.env];
    if (value === undefined) {
      throw new ConfigError(keyPathName, `environment variable ${ref.env} is not set`);
    }
    return value;
  }
  const directory = env.CREDENTIALS_DIRECTORY;
  if (!directory) {
    throw new ConfigError(keyPathName, `credential "${ref.credential}" requested but CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the systemd unit)`);
  }
  try {
    return (await readFile(path.join(directory, ref.credential!), "utf8")).replace(/\r?\n$/, "");
  } catch (error) {
    throw new ConfigError(keyPathName, `cannot read credential "${ref.credential}": ${(error as NodeJS.ErrnoException).code ?? error}`);
  }
}
