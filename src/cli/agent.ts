import { stat } from "node:fs/promises";
import { parseArgs } from "node:util";

import { Agent } from "../agent/agent.js";
import { loadWithOverrides } from "../agent/overrides.js";
import { loadAgentConfig } from "../config/load.js";
import type { AgentConfig } from "../config/schema.js";
import { readModelPackage } from "../models/manifest.js";
import { ConfigError, describeError } from "../lib/errors.js";
import { createLogger } from "../lib/log.js";
import { stopOnSignal, UsageError } from "./common.js";

export const agentUsage = `Usage: sortline agent --config FILE [--validate-config]

Runs the edge agent: cameras in, sorting decisions out, every decision audited.

Options:
  --config FILE        agent configuration (YAML or JSON)
  --validate-config    check the configuration, print the problems and exit (0 when valid)
  -h, --help           print this help`;

/** Returns problems with the files a valid configuration points at: the model package and replay folders. */
async function checkReferencedFiles(config: AgentConfig): Promise<string[]> {
  const problems: string[] = [];
  try {
    await readModelPackage(config.model.dir);
  } catch (error) {
    problems.push(`model.dir: ${describeError(error)}`);
  }
  for (const [index, source] of config.sources.entries()) {
    if (source.type === "directory") {
      const info = await stat(source.path).catch(() => undefined);
      if (!info?.isDirectory()) {
        problems.push(`sources[${index}].path: folder ${source.path} not found`);
      }
    }
  }
  return problems;
}

/** Runs `sortline agent`; resolves with the exit code once the agent has stopped. */
export async function runAgent(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      config: { type: "string" },
      "validate-config": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${agentUsage}\n`);
    return 0;
  }
  if (!values.config) {
    throw new UsageError("--config FILE is required");
  }
  let config;
  try {
    config = await loadAgentConfig(values.config);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`);
      return 1;
    }
    throw error;
  }
  if (values["validate-config"]) {
    const problems = await checkReferencedFiles(config);
    if (problems.length) {
      process.stderr.write(`${values.config}: invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}\n`);
      return 1;
    }
    process.stdout.write(`${values.config}: configuration is valid\n`);
    return 0;
  }

  let logger = createLogger({ level: config.logging.level, base: { device: config.device.id } });
  const loaded = await loadWithOverrides(values.config, config, logger);
  if (loaded.config !== config) {
    config = loaded.config;
    logger = createLogger({ level: config.logging.level, base: { device: config.device.id } });
  }
  const agent = new Agent({ config, logger, configFile: values.config, overrides: loaded.overrides });
  const stopped = stopOnSignal(() => agent.stop(), logger);
  try {
    await agent.start();
  } catch (error) {
    logger.fatal({ err: describeError(error) }, "agent failed to start");
    await agent.stop().catch(() => undefined);
    logger.flush();
    return 1;
  }
  const code = await stopped;
  logger.flush();
  return code;
}
