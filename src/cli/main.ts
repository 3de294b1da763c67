import { describeError, ModelLoadError } from "../lib/errors.js";
import { agentUsage, runAgent } from "./agent.js";
import { auditUsage, runAudit } from "./audit.js";
import { classifyUsage, runClassify } from "./classify.js";
import { UsageError } from "./common.js";
import { demoUsage, runDemo } from "./demo.js";
import { demoLoopUsage, runDemoLoop } from "./demo-loop.js";
import { fleetUsage, runFleet } from "./fleet.js";
import { keysUsage, runKeys } from "./keys.js";
import { runTrainer, trainerUsage } from "./trainer.js";

const usage = `Usage: sortline COMMAND [OPTIONS]

Commands:
  agent      run the edge agent from a configuration file
  demo       run the agent on bundled photos with an embedded MQTT broker
  demo-loop  run the closed loop: mining, labelling, Spark retraining, signed update
  audit      summarize, list and export the decision audit database
  classify   classify image files and folders with a model package
  trainer    run the central trainer: fleet uploads, review page, retraining, model delivery
  fleet      send a signed command to a device, or list the devices' statuses
  keys       generate the key pair that signs model packages and fleet commands

Run 'sortline COMMAND --help' for the options of a command.`;

type Command = (argv: string[]) => Promise<number>;

const commands: Record<string, { run: Command; usage: string }> = {
  agent: { run: runAgent, usage: agentUsage },
  demo: { run: runDemo, usage: demoUsage },
  "demo-loop": { run: runDemoLoop, usage: demoLoopUsage },
  audit: { run: runAudit, usage: auditUsage },
  classify: { run: runClassify, usage: classifyUsage },
  trainer: { run: runTrainer, usage: trainerUsage },
  fleet: { run: runFleet, usage: fleetUsage },
  keys: { run: runKeys, usage: keysUsage },
};

/** Runs the sortline CLI and returns its exit code. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    process.stdout.write(`${usage}\n`);
    return name === undefined ? 2 : 0;
  }
  const command = commands[name];
  if (command === undefined) {
    process.stderr.write(`sortline: unknown command '${name}'\n\n${usage}\n`);
    return 2;
  }
  try {
    return await command.run(rest);
  } catch (error) {
    if (error instanceof UsageError || (error as NodeJS.ErrnoException).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`sortline ${name}: ${describeError(error)}\n\n${command.usage}\n`);
      return 2;
    }
    if (error instanceof ModelLoadError) {
      process.stderr.write(`sortline ${name}: ${describeError(error)}\n`);
      return 1;
    }
    throw error;
  }
}
