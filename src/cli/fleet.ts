import { writeFile } from "node:fs/promises";
import { parseArgs } from "node:util";

import { resolveSecret } from "../config/load.js";
import { ConfigError, describeError } from "../lib/errors.js";
import { silentLogger } from "../lib/log.js";
import { CommandTimeoutError } from "../protocol/commands.js";
import { LinkError, MqttLink } from "../protocol/link.js";
import type { CommandReply } from "../protocol/messages.js";
import { isValidName } from "../protocol/topics.js";
import { loadSigningKey, loadTrainerConfig, parseDeviceRef, resolveTlsFiles, type TrainerConfig } from "../trainer/config.js";
import { collectFleetStatuses, FleetUsageError, parseCommandArgs, sendFleetCommand, type DeviceStatusRecord } from "../trainer/fleet.js";
import { UsageError } from "./common.js";

export const fleetUsage = `Usage: sortline fleet --config FILE SITE/DEVICE COMMAND [KEY=VALUE ... | --json OBJECT]
       sortline fleet --config FILE list

Sends one command, signed with the trainer's key, to one device and prints the device's
reply as JSON. 'list' prints the last status of every device on the broker and of every
device in the configured groups.

Commands of the agent:
  status                      model, state and counters
  deploy version=X.Y.Z        switch to a model version the device has received (optional sha256=HEX)
  rollback                    switch back to the previous model
  set-config KEY=VALUE ...    change settings, with dotted keys (mining.perHour=20)
  pause, resume               stop or restart sorting decisions
  upload-now                  send the queued hard examples now
  snapshot                    the latest camera frame as a base64 JPEG (see --out)

A VALUE that is valid JSON (20, 0.8, true, null, "text", [1,2]) is sent as that JSON value,
any other VALUE as a string.

Options:
  --config FILE       trainer configuration: broker, signing key and device groups
  --json OBJECT       the command arguments as one JSON object instead of KEY=VALUE words
  --timeout SECONDS   time to wait for the broker connection and for the reply (default 10)
  --out FILE          write a base64 JPEG of the reply (snapshot) to FILE and leave it out of the printed reply
  -h, --help          print this help

Exit status: 0 when the device replied ok, 1 when it replied with an error or the broker
rejected the connection, 2 on a timeout or a usage error.`;

export interface FleetIo {
  out?: NodeJS.WritableStream;
  err?: NodeJS.WritableStream;
  env?: NodeJS.ProcessEnv;
}

/** Returns the key of the first string in `result` that decodes from base64 to a JPEG, or undefined. */
function findJpegField(result: Record<string, unknown>): string | undefined {
  return Object.keys(result).find((key) => {
    const value = result[key];
    if (typeof value !== "string" || value.length < 8) {
      return false;
    }
    const head = Buffer.from(value.slice(0, 8), "base64");
    return head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff;
  });
}

function formatTime(ms: number): string {
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** Prints one line per device: site/device, state, model version, time of the last status and groups. */
function printStatusTable(out: NodeJS.WritableStream, config: TrainerConfig, statuses: DeviceStatusRecord[]): void {
  const rows = new Map<string, string[]>();
  const groupsOf = (ref: string): string =>
    Object.entries(config.fleet.groups)
      .filter(([, refs]) => refs.includes(ref))
      .map(([group]) => group)
      .join(",") || "-";
  for (const status of statuses) {
    const ref = `${status.site}/${status.device}`;
    rows.set(ref, [ref, status.state, status.model?.version ?? "-", formatTime(status.statusAt), groupsOf(ref)]);
  }
  for (const refs of Object.values(config.fleet.groups)) {
    for (const ref of refs) {
      if (!rows.has(ref)) {
        rows.set(ref, [ref, "unknown", "-", "-", groupsOf(ref)]);
      }
    }
  }
  const table = [["DEVICE", "STATE", "MODEL", "LAST STATUS", "GROUPS"], ...[...rows.values()].sort((a, b) => a[0]!.localeCompare(b[0]!))];
  const widths = table[0]!.map((_, column) => Math.max(...table.map((row) => row[column]!.length)));
  for (const row of table) {
    out.write(`${row.map((cell, column) => cell.padEnd(widths[column]!)).join("  ").trimEnd()}\n`);
  }
}

/** Runs `sortline fleet`; returns the exit code. */
export async function runFleet(argv: string[], io: FleetIo = {}): Promise<number> {
  const out = io.out ?? process.stdout;
  const err = io.err ?? process.stderr;
  const env = io.env ?? process.env;
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: "string" },
      json: { type: "string" },
      timeout: { type: "string", default: "10" },
      out: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    out.write(`${fleetUsage}\n`);
    return 0;
  }
  if (!values.config) {
    throw new UsageError("--config FILE is required");
  }
  const timeoutSeconds = Number(values.timeout);
  if (!(Number.isFinite(timeoutSeconds) && timeoutSeconds > 0)) {
    throw new UsageError(`--timeout ${values.timeout} is invalid; expected a number of seconds > 0`);
  }
  const timeoutMs = Math.round(timeoutSeconds * 1000);
  const [target, command, ...words] = positionals;
  const listing = target === "list";
  let site = "";
  let device = "";
  let args: Record<string, unknown> = {};
  if (listing) {
    if (command !== undefined || values.json !== undefined) {
      throw new UsageError("'list' takes no arguments and no --json");
    }
  } else {
    if (target === undefined || command === undefined) {
      throw new UsageError("expected SITE/DEVICE COMMAND or 'list'");
    }
    ({ site, device } = parseDeviceRef(target.includes("/") ? target : `/${target}`));
    if (!isValidName(site) || !isValidName(device)) {
      throw new UsageError(`'${target}' is not SITE/DEVICE; both names use A-Z, a-z, 0-9, '.', '_', '-' and start with a letter or digit`);
    }
    try {
      args = parseCommandArgs(words, values.json);
    } catch (error) {
      if (error instanceof FleetUsageError) {
        throw new UsageError(error.message);
      }
      throw error;
    }
  }

  let config: TrainerConfig;
  let link: MqttLink;
  try {
    config = await loadTrainerConfig(values.config);
    const password = config.broker.password === undefined ? undefined : await resolveSecret(config.broker.password, "broker.password", env);
    // A random client id, so the CLI does not take over the running trainer's connection.
    // NOTE: a broker that sets the client id from the certificate (use_username_as_clientid)
    // still closes the trainer's connection while the CLI is connected with the same certificate.
    link = new MqttLink({
      url: config.broker.url,
      role: "trainer",
      protocolVersion: config.broker.protocolVersion,
      tls: resolveTlsFiles(config, env),
      username: config.broker.username,
      password,
      logger: silentLogger,
    });
  } catch (error) {
    if (error instanceof ConfigError) {
      err.write(`sortline fleet: ${error.message}\n`);
      return 1;
    }
    throw error;
  }

  try {
    await link.connect({ timeoutMs });
  } catch (error) {
    err.write(`sortline fleet: ${describeError(error)}\n`);
    return error instanceof LinkError && /within \d+ ms/.test(error.message) ? 2 : 1;
  }
  try {
    if (listing) {
      const statuses = await collectFleetStatuses(link, { maxWaitMs: timeoutMs });
      printStatusTable(out, config, statuses);
      return 0;
    }
    const signingKey = await loadSigningKey(config, env);
    let reply: CommandReply;
    try {
      reply = await sendFleetCommand({ link, signingKey, site, device, command: command!, args, timeoutMs });
    } catch (error) {
      if (error instanceof CommandTimeoutError) {
        err.write(`sortline fleet: ${error.message}\n`);
        return 2;
      }
      throw error;
    }
    if (values.out !== undefined && reply.ok && reply.result !== undefined) {
      const field = findJpegField(reply.result);
      if (field === undefined) {
        err.write(`sortline fleet: the reply contains no base64 JPEG, so ${values.out} was not written\n`);
      } else {
        const jpeg = Buffer.from(reply.result[field] as string, "base64");
        await writeFile(values.out, jpeg);
        reply = { ...reply, result: { ...reply.result, [field]: `${jpeg.length} bytes written to ${values.out}` } };
      }
    }
    out.write(`${JSON.stringify(reply, null, 2)}\n`);
    return reply.ok ? 0 : 1;
  } catch (error) {
    if (error instanceof ConfigError) {
      err.write(`sortline fleet: ${error.message}\n`);
      return 1;
    }
    throw error;
  } finally {
    await link.close();
  }
}
