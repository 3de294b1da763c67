/**
 * Configuration of the central trainer (`sortline trainer --config FILE`): the MQTT broker, the
 * data folder, the review page, the signing key, the base model and datasets, the training job
 * and the device groups that receive new models. YAML or JSON, validated by ajv with defaults
 * filled in. Relative paths are resolved against the folder of the configuration file.
 */
import { createPrivateKey, createPublicKey } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";

import { Ajv, type ErrorObject } from "ajv";

import { packageRoot } from "../cli/common.js";
import { ConfigValidationError, readConfigDocument, resolveSecret } from "../config/load.js";
import type { SecretRef } from "../config/schema.js";
import { ConfigError } from "../lib/errors.js";
import { keyIdOf } from "../models/signing.js";

/** A value given in the file as a path, or as a secret reference resolved at start. */
export type PathOrSecret = string | SecretRef;

/** The validated trainer configuration with defaults filled in and paths made absolute. */
export interface TrainerConfig {
  /** Absolute path of the configuration file. */
  file: string;
  broker: {
    url: string;
    protocolVersion: 4 | 5;
    clientId?: string;
    /** PEM files. `key` may name a systemd credential, whose file path is used. */
    tls?: { ca?: string; cert?: string; key?: string | { credential: string } };
    username?: string;
    password?: SecretRef;
  };
  dataDir: string;
  review: { host: string; port: number; token?: SecretRef };
  /** The ed25519 private key (PKCS#8 PEM) that signs model packages and fleet commands. */
  signing: { privateKey: PathOrSecret };
  base: { datasets: string[]; validationFraction: number; model: string };
  /** Fixed extra validation sets: class folders or `path,label` CSV files. */
  validation: string[];
  training: {
    python: string;
    sparkDir: string;
    master?: string;
    /** Model name of new packages; default: the base model's manifest name. */
    modelName?: string;
    featureCache?: string;
    /** A train or gate job running longer than this is stopped and the run fails. */
    timeoutMinutes: number;
    trigger: { minNewLabels: number; intervalMinutes: number };
    gate: { minGain: number; maxClassDrop: number };
    /** argv that replaces `python -m sortline_spark.train` and runs in sparkDir. The trainer appends the job's options. */
    command?: string[];
    /** argv that replaces `python -m sortline_spark.gate` and runs in sparkDir. The trainer appends the gate's options. */
    gateCommand?: string[];
  };
  fleet: { groups: Record<string, string[]>; publishTo: string };
  logging: { level: "fatal" | "error" | "warn" | "info" | "debug" | "trace" };
}

const secretRef = {
  type: "object",
  additionalProperties: false,
  minProperties: 1,
  maxProperties: 1,
  properties: { env: { type: "string", pattern: "^[A-Za-z_][A-Za-z0-9_]*$" }, credential: { type: "string", pattern: "^[A-Za-z0-9._-]+$" } },
} as const;
const credentialRef = {
  type: "object",
  additionalProperties: false,
  required: ["credential"],
  properties: { credential: { type: "string", pattern: "^[A-Za-z0-9._-]+$" } },
} as const;
const filePath = { type: "string", minLength: 1 } as const;
const argv = { type: "array", minItems: 1, items: { type: "string", minLength: 1 } } as const;
const fraction = { type: "number", minimum: 0, maximum: 1 } as const;

/** "site/device", each part as topics.ts NAME_PATTERN. */
export const DEVICE_REF_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";

/** JSON Schema of the trainer configuration file. Defaults are applied by the validator. */
export const trainerConfigSchema = {
  type: "object",
  additionalProperties: false,
  required: ["broker", "dataDir", "signing", "base", "fleet"],
  properties: {
    broker: {
      type: "object",
      additionalProperties: false,
      required: ["url"],
      properties: {
        url: { type: "string", pattern: "^(mqtt|mqtts|ws|wss)://" },
        protocolVersion: { enum: [4, 5], default: 5 },
        clientId: { type: "string", minLength: 1, maxLength: 64 },
        tls: {
          type: "object",
          additionalProperties: false,
          properties: { ca: filePath, cert: filePath, key: { anyOf: [filePath, credentialRef] } },
        },
        username: { type: "string", minLength: 1 },
        password: secretRef,
      },
    },
    dataDir: filePath,
    review: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        host: { type: "string", minLength: 1, default: "127.0.0.1" },
        port: { type: "integer", minimum: 0, maximum: 65_535, default: 8080 },
        token: secretRef,
      },
    },
    signing: {
      type: "object",
      additionalProperties: false,
      required: ["privateKey"],
      properties: { privateKey: { anyOf: [filePath, secretRef] } },
    },
    base: {
      type: "object",
      additionalProperties: false,
      required: ["datasets", "model"],
      properties: {
        datasets: { type: "array", minItems: 1, items: filePath },
        validationFraction: { type: "number", exclusiveMinimum: 0, exclusiveMaximum: 1, default: 0.2 },
        model: filePath,
      },
    },
    validation: { type: "array", items: filePath, default: [] },
    training: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        python: filePath,
        sparkDir: filePath,
        master: { type: "string", minLength: 1 },
        modelName: { type: "string", pattern: "^[A-Za-z0-9._-]{1,64}$" },
        featureCache: filePath,
        timeoutMinutes: { type: "number", exclusiveMinimum: 0, default: 360 },
        trigger: {
          type: "object",
          additionalProperties: false,
          default: {},
          properties: {
            minNewLabels: { type: "integer", minimum: 1, default: 50 },
            intervalMinutes: { type: "number", minimum: 0, default: 0 },
          },
        },
        gate: {
          type: "object",
          additionalProperties: false,
          default: {},
          properties: { minGain: { ...fraction, default: 0 }, maxClassDrop: { ...fraction, default: 0.02 } },
        },
        command: argv,
        gateCommand: argv,
      },
    },
    fleet: {
      type: "object",
      additionalProperties: false,
      required: ["groups", "publishTo"],
      properties: {
        groups: {
          type: "object",
          propertyNames: { pattern: "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$" },
          additionalProperties: { type: "array", uniqueItems: true, items: { type: "string", pattern: DEVICE_REF_PATTERN } },
        },
        publishTo: { type: "string", minLength: 1 },
      },
    },
    logging: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: { level: { enum: ["fatal", "error", "warn", "info", "debug", "trace"], default: "info" } },
    },
  },
} as const;

const ajv = new Ajv({ allErrors: true, useDefaults: true, strict: false });
const validate = ajv.compile(trainerConfigSchema);

/** Keywords whose errors only repeat a more specific error reported next to them. */
const WRAPPER_KEYWORDS = new Set(["if", "allOf", "anyOf"]);

function keyPath(pointer: string): string {
  return pointer
    .split("/")
    .slice(1)
    .map((part) => part.replace(/~1/g, "/").replace(/~0/g, "~"))
    .map((part) => (/^\d+$/.test(part) ? `[${part}]` : `.${part}`))
    .join("")
    .replace(/^\./, "");
}

function valueAt(document: unknown, pointer: string): unknown {
  let current = document;
  for (const part of pointer.split("/").slice(1)) {
    const key = part.replace(/~1/g, "/").replace(/~0/g, "~");
    current = current !== null && typeof current === "object" ? (current as Record<string, unknown>)[key] : undefined;
  }
  return current;
}

/** Turns one schema error into "key.path: value X is invalid; expected Y". */
function formatError(error: ErrorObject, document: unknown): ConfigError {
  const params = error.params as Record<string, unknown>;
  if (error.keyword === "additionalProperties") {
    return new ConfigError(keyPath(`${error.instancePath}/${String(params.additionalProperty)}`), "unknown key; check the spelling against the documented keys");
  }
  if (error.keyword === "required") {
    return new ConfigError(keyPath(`${error.instancePath}/${String(params.missingProperty)}`), "missing; this key is required");
  }
  if (error.keyword === "propertyNames" || (error.keyword === "pattern" && params.pattern === undefined)) {
    return new ConfigError(keyPath(error.instancePath), `key ${JSON.stringify(params.propertyName)} is not a valid group name`);
  }
  let expected = error.message ?? "is invalid";
  if (error.keyword === "enum") {
    expected = `one of ${(params.allowedValues as unknown[]).map((value) => JSON.stringify(value)).join(", ")}`;
  } else if (error.keyword === "pattern") {
    expected = `a string matching ${String(params.pattern)}`;
  }
  expected = expected.replace(/^must be /, "").replace(/^must /, "");
  const text = JSON.stringify(valueAt(document, error.instancePath)) ?? "undefined";
  const excerpt = text.length > 60 ? `${text.slice(0, 57)}...` : text;
  return new ConfigError(keyPath(error.instancePath), `value ${excerpt} is invalid; expected ${expected}`);
}

function resolveFrom(base: string, file: string): string {
  return path.isAbsolute(file) ? file : path.resolve(base, file);
}

/** Resolves a file path, or leaves a secret reference as it is. */
function resolvePathOrSecret<T extends object>(base: string, value: string | T): string | T {
  return typeof value === "string" ? resolveFrom(base, value) : value;
}

/**
 * Validates a parsed configuration document, fills in defaults and resolves relative paths
 * against `baseDir`. Throws ConfigValidationError naming every bad key.
 */
export function parseTrainerConfig(document: unknown, file: string, baseDir: string): TrainerConfig {
  const copy = structuredClone(document ?? {});
  if (!validate(copy)) {
    const problems = (validate.errors ?? []).filter((error) => !WRAPPER_KEYWORDS.has(error.keyword)).map((error) => formatError(error, copy));
    const unique = [...new Map(problems.map((problem) => [problem.message, problem])).values()];
    throw new ConfigValidationError(file, unique);
  }
  const config = copy as unknown as Omit<TrainerConfig, "file">;
  if (config.fleet.groups[config.fleet.publishTo] === undefined) {
    const known = Object.keys(config.fleet.groups).join(", ") || "none";
    throw new ConfigValidationError(file, [
      new ConfigError("fleet.publishTo", `value ${JSON.stringify(config.fleet.publishTo)} is not a group in fleet.groups (groups: ${known})`),
    ]);
  }

  const tls = config.broker.tls;
  if (tls) {
    tls.ca = tls.ca === undefined ? undefined : resolveFrom(baseDir, tls.ca);
    tls.cert = tls.cert === undefined ? undefined : resolveFrom(baseDir, tls.cert);
    tls.key = tls.key === undefined ? undefined : resolvePathOrSecret(baseDir, tls.key);
  }
  config.dataDir = resolveFrom(baseDir, config.dataDir);
  config.signing.privateKey = resolvePathOrSecret(baseDir, config.signing.privateKey);
  config.base.datasets = config.base.datasets.map((dataset) => resolveFrom(baseDir, dataset));
  config.base.model = resolveFrom(baseDir, config.base.model);
  config.validation = config.validation.map((dataset) => resolveFrom(baseDir, dataset));

  const training = config.training;
  training.sparkDir = training.sparkDir === undefined ? path.join(packageRoot, "spark") : resolveFrom(baseDir, training.sparkDir);
  training.python = training.python === undefined ? path.join(packageRoot, "spark", ".venv", "bin", "python") : resolveFrom(baseDir, training.python);
  if (training.featureCache !== undefined) {
    training.featureCache = resolveFrom(baseDir, training.featureCache);
  }
  // A program given with a relative path (./train.sh) is found from the configuration's folder, like the other paths.
  for (const command of [training.command, training.gateCommand]) {
    if (command !== undefined && command[0]!.includes("/")) {
      command[0] = resolveFrom(baseDir, command[0]!);
    }
  }
  return { file, ...config };
}

/** Reads, parses (YAML or JSON) and validates a trainer configuration file. */
export async function loadTrainerConfig(file: string): Promise<TrainerConfig> {
  const absolute = path.resolve(file);
  return parseTrainerConfig(await readConfigDocument(absolute), absolute, path.dirname(absolute));
}

/** Returns the path of a systemd credential file, $CREDENTIALS_DIRECTORY/<name>. */
export function credentialPath(name: string, keyPathName: string, env: NodeJS.ProcessEnv = process.env): string {
  const directory = env.CREDENTIALS_DIRECTORY;
  if (!directory) {
    throw new ConfigError(keyPathName, `credential "${name}" requested but CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the systemd unit)`);
  }
  return path.join(directory, name);
}

/** Returns the TLS file paths for MqttLink, with a credential key resolved to its file. */
export function resolveTlsFiles(config: TrainerConfig, env: NodeJS.ProcessEnv = process.env): { ca?: string; cert?: string; key?: string } | undefined {
  const tls = config.broker.tls;
  if (tls === undefined) {
    return undefined;
  }
  const key = typeof tls.key === "object" ? credentialPath(tls.key.credential, "broker.tls.key", env) : tls.key;
  return { ca: tls.ca, cert: tls.cert, key };
}

/** The loaded signing key. The PEM text is never logged. */
export interface SigningKey {
  keyId: string;
  privateKeyPem: string;
}

/**
 * Loads `signing.privateKey` from its file, environment variable or credential and checks that
 * it is an ed25519 private key. Raises ConfigError naming the key path.
 */
export async function loadSigningKey(config: TrainerConfig, env: NodeJS.ProcessEnv = process.env): Promise<SigningKey> {
  const source = config.signing.privateKey;
  let pem: string;
  if (typeof source === "string") {
    try {
      pem = await readFile(source, "utf8");
    } catch (error) {
      throw new ConfigError("signing.privateKey", `cannot read ${source}: ${(error as NodeJS.ErrnoException).code ?? error}`);
    }
  } else {
    pem = await resolveSecret(source, "signing.privateKey", env);
  }
  let privateKey;
  try {
    privateKey = createPrivateKey(pem);
  } catch (error) {
    // The parser's message is not included, because it may quote the key text.
    throw new ConfigError("signing.privateKey", `not a PEM private key (${(error as NodeJS.ErrnoException).code ?? "parse error"}); create one with 'sortline keys generate'`);
  }
  if (privateKey.asymmetricKeyType !== "ed25519") {
    throw new ConfigError("signing.privateKey", `expected an ed25519 private key, got ${privateKey.asymmetricKeyType ?? "an unknown key type"}`);
  }
  const publicKey = createPublicKey(privateKey);
  return { keyId: keyIdOf(publicKey), privateKeyPem: pem };
}

/** Parses "site/device" into its parts; the configuration schema has already checked the form. */
export function parseDeviceRef(ref: string): { site: string; device: string } {
  const separator = ref.indexOf("/");
  return { site: ref.slice(0, separator), device: ref.slice(separator + 1) };
}
