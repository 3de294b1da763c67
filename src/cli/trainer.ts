import { stat } from "node:fs/promises";
import { parseArgs } from "node:util";

import { resolveSecret } from "../config/load.js";
import { ConfigError, describeError } from "../lib/errors.js";
import { createLogger } from "../lib/log.js";
import { readModelPackage } from "../models/manifest.js";
import { loadSigningKey, loadTrainerConfig, resolveTlsFiles, type TrainerConfig } from "../trainer/config.js";
import { TrainerService } from "../trainer/service.js";
import { stopOnSignal, UsageError } from "./common.js";

export const trainerUsage = `Usage: sortline trainer --config FILE [--validate-config | --retrain]

Runs the central trainer: receives hard examples from the fleet, serves the review page,
retrains the model when enough new labels arrive and sends signed models to the devices.

Options:
  --config FILE        trainer configuration (YAML or JSON)
  --validate-config    check the configuration and the files it names, print the problems and exit (0 when valid)
  --retrain            ask the running trainer (review.host, review.port) to start a training run now,
                       print the run as JSON and exit (0 when started, 1 otherwise)
  -h, --help           print this help`;

export interface TrainerIo {
  out?: NodeJS.WritableStream;
  err?: NodeJS.WritableStream;
  env?: NodeJS.ProcessEnv;
}

async function checkPath(problems: string[], keyPath: string, file: string, kind: "file" | "folder" | "any"): Promise<void> {
  const info = await stat(file).catch(() => undefined);
  if (info === undefined) {
    problems.push(`${keyPath}: ${file} not found`);
  } else if (kind === "file" && !info.isFile()) {
    problems.push(`${keyPath}: ${file} is not a file`);
  } else if (kind === "folder" && !info.isDirectory()) {
    problems.push(`${keyPath}: ${file} is not a folder`);
  }
}

/** Returns problems with the files and secrets a valid configuration names. */
async function checkReferences(config: TrainerConfig, env: NodeJS.ProcessEnv): Promise<string[]> {
  const problems: string[] = [];
  try {
    await readModelPackage(config.base.model);
  } catch (error) {
    problems.push(`base.model: ${describeError(error)}`);
  }
  for (const [index, dataset] of config.base.datasets.entries()) {
    await checkPath(problems, `base.datasets[${index}]`, dataset, "any");
  }
  for (const [index, dataset] of config.validation.entries()) {
    await checkPath(problems, `validation[${index}]`, dataset, "any");
  }
  await checkPath(problems, "training.sparkDir", config.training.sparkDir, "folder");
  if (config.training.command === undefined || config.training.gateCommand === undefined) {
    await checkPath(problems, "training.python", config.training.python, "file");
  }
  const secrets: [string, () => Promise<unknown>][] = [
    ["signing.privateKey", () => loadSigningKey(config, env)],
    ["review.token", async () => config.review.token && resolveSecret(config.review.token, "review.token", env)],
    ["broker.password", async () => config.broker.password && resolveSecret(config.broker.password, "broker.password", env)],
  ];
  for (const [keyPath, load] of secrets) {
    try {
      await load();
    } catch (error) {
      problems.push(error instanceof ConfigError ? error.message : `${keyPath}: ${describeError(error)}`);
    }
  }
  try {
    const tls = resolveTlsFiles(config, env);
    for (const name of ["ca", "cert", "key"] as const) {
      if (tls?.[name] !== undefined) {
        await checkPath(problems, `broker.tls.${name}`, tls[name]!, "file");
      }
    }
  } catch (error) {
    problems.push(describeError(error));
  }
  return problems;
}

/** Posts to the running trainer's `/api/retrain` and prints its reply. */
async function requestRetrain(config: TrainerConfig, io: Required<TrainerIo>): Promise<number> {
  // A trainer listening on every address is reached through the loopback address.
  const host = ["0.0.0.0", "::", "[::]"].includes(config.review.host) ? "127.0.0.1" : config.review.host;
  const url = `http://${host.includes(":") ? `[${host}]` : host}:${config.review.port}/api/retrain`;
  const headers: Record<string, string> = { "Content-Type": "application/json" };
  if (config.review.token !== undefined) {
    headers.Authorization = `Bearer ${await resolveSecret(config.review.token, "review.token", io.env)}`;
  }
  let response: Response;
  try {
    response = await fetch(url, { method: "POST", headers, body: "{}" });
  } catch (error) {
    const cause = (error as { cause?: unknown }).cause;
    io.err.write(`sortline trainer: cannot reach the trainer at ${url}: ${describeError(cause ?? error)}; is it running?\n`);
    return 1;
  }
  const body = await response.text();
  if (response.status === 202) {
    io.out.write(body);
    return 0;
  }
  io.err.write(`sortline trainer: the trainer replied with status ${response.status}: ${body}`);
  return 1;
}

/** Runs `sortline trainer`; resolves with the exit code once the trainer has stopped. */
export async function runTrainer(argv: string[], ioOptions: TrainerIo = {}): Promise<number> {
  const io: Required<TrainerIo> = { out: ioOptions.out ?? process.stdout, err: ioOptions.err ?? process.stderr, env: ioOptions.env ?? process.env };
  const { values } = parseArgs({
    args: argv,
    options: {
      config: { type: "string" },
      "validate-config": { type: "boolean", default: false },
      retrain: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    io.out.write(`${trainerUsage}\n`);
    return 0;
  }
  if (!values.config) {
    throw new UsageError("--config FILE is required");
  }
  if (values["validate-config"] && values.retrain) {
    throw new UsageError("--validate-config and --retrain cannot be combined");
  }
  let config: TrainerConfig;
  try {
    config = await loadTrainerConfig(values.config);
  } catch (error) {
    if (error instanceof ConfigError) {
      io.err.write(`${error.message}\n`);
      return 1;
    }
    throw error;
  }
  if (values["validate-config"]) {
    const problems = await checkReferences(config, io.env);
    if (problems.length > 0) {
      io.err.write(`${values.config}: invalid configuration:\n${problems.map((problem) => `  - ${problem}`).join("\n")}\n`);
      return 1;
    }
    io.out.write(`${values.config}: configuration is valid\n`);
    return 0;
  }
  if (values.retrain) {
    try {
      return await requestRetrain(config, io);
    } catch (error) {
      if (error instanceof ConfigError) {
        io.err.write(`sortline trainer: ${error.message}\n`);
        return 1;
      }
      throw error;
    }
  }

  const logger = createLogger({ level: config.logging.level, base: { service: "trainer" } });
  const service = new TrainerService({ config, logger, env: io.env });
  const stopped = stopOnSignal(() => service.stop(), logger);
  try {
    await service.start();
  } catch (error) {
    logger.fatal({ err: describeError(error) }, "trainer failed to start");
    logger.flush();
    return 1;
  }
  const code = await stopped;
  logger.flush();
  return code;
}
