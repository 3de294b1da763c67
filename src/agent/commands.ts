import sharp from "sharp";

import { ConfigError, describeError } from "../lib/errors.js";
import type { Logger } from "../lib/log.js";
import { CommandError } from "../protocol/commands.js";
import type { UpdateStatus } from "../update/updater.js";
import type { Agent } from "./agent.js";
import type { DeviceFleet } from "./fleet.js";
import { validateChange, writeOverrides, type Overrides } from "./overrides.js";

/** How long a deploy command waits for the final state before it replies with the current one. */
const DEPLOY_REPLY_WAIT_MS = 20_000;
/** Largest width or height of a snapshot image, in pixels. */
const SNAPSHOT_SIDE = 640;

const noArgs = { type: "object", additionalProperties: false, properties: {} } as const;

function updateReply(status: UpdateStatus): Record<string, unknown> {
  if (status.state === "rejected") {
    throw new CommandError("failed", `model ${status.version ?? "?"} rejected: ${status.reason ?? status.error ?? "unknown reason"}`);
  }
  return { state: status.state, version: status.version, id: status.id, reason: status.reason ?? null, report: status.report ?? null };
}

/**
 * Registers the fleet commands on the device's command server. Each one replies once; a bad
 * request gets an error reply and changes nothing.
 */
export function registerCommands(agent: Agent, fleet: DeviceFleet, options: { configFile?: string; overrides: Overrides; logger: Logger }): void {
  let overrides = { ...options.overrides };
  const logger = options.logger.child({ component: "commands" });
  const server = fleet.commands;

  server.handle("status", { argsSchema: noArgs, run: async () => ({ device: agent.agentConfig.device, ...agent.statusExtras() }) });

  server.handle<{ version: string; name?: string; sha256?: string }>("deploy", {
    exclusive: true,
    argsSchema: {
      type: "object",
      additionalProperties: false,
      required: ["version"],
      properties: {
        version: { type: "string", pattern: "^[0-9]+\\.[0-9]+\\.[0-9]+([-+][0-9A-Za-z.+-]+)?$" },
        name: { type: "string", pattern: "^[A-Za-z0-9._-]{1,128}$" },
        sha256: { type: "string", pattern: "^[0-9a-f]{64}$" },
      },
    },
    run: async (args) => {
      const active = agent.activeRunner?.manifest;
      if (active && active.version === args.version && (!args.name || args.name === active.name)) {
        return { state: "active", version: active.version, unchanged: true };
      }
      const bundle = await fleet.findReceived(args.version, args.name);
      if (!bundle) {
        throw new CommandError("failed", `model version ${args.version} has not been received by this device; publish it first`);
      }
      const deployment = agent.updater!.deploy(bundle);
      const timeout = new Promise<undefined>((resolve) => {
        const timer: NodeJS.Timeout = setTimeout(() => resolve(undefined), DEPLOY_REPLY_WAIT_MS);
        timer.unref();
      });
      const status = await Promise.race([deployment, timeout]).catch((error: unknown) => {
        throw new CommandError("failed", describeError(error));
      });
      if (!status) {
        deployment.catch((error: unknown) => logger.error({ err: describeError(error) }, "model deployment failed"));
        return { state: agent.updater!.status?.state ?? "verifying", version: args.version, pending: true };
      }
      return updateReply(status);
    },
  });

  server.handle("rollback", {
    exclusive: true,
    argsSchema: noArgs,
    run: async () => {
      const status = await agent.updater!.rollback("fleet command").catch((error: unknown) => {
        throw new CommandError("failed", describeError(error));
      });
      return updateReply(status);
    },
  });

  server.handle("set-config", {
    exclusive: true,
    argsSchema: { type: "object", minProperties: 1, maxProperties: 50 },
    run: async (args) => {
      if (!options.configFile) {
        throw new CommandError("failed", "this agent was started without a configuration file, so settings cannot be changed");
      }
      let change;
      try {
        change = await validateChange(options.configFile, overrides, args);
      } catch (error) {
        if (error instanceof ConfigError) {
          throw new CommandError("invalid-args", error.message);
        }
        throw error;
      }
      await writeOverrides(agent.agentConfig.update.stateDir, change.overrides);
      overrides = change.overrides;
      const live = Object.keys(change.effects).filter((key) => change.effects[key] === "live");
      const restart = Object.keys(change.effects).filter((key) => change.effects[key] === "restart");
      if (live.length) {
        await agent.applyLiveConfig(change.config);
      }
      logger.info({ applied: live, restartRequired: restart }, "settings changed by fleet command");
      return { applied: live, restartRequired: restart, persisted: true };
    },
  });

  server.handle("pause", {
    argsSchema: noArgs,
    run: async () => {
      agent.pipeline!.pause();
      await fleet.publishStatus("paused");
      return { paused: true };
    },
  });

  server.handle("resume", {
    argsSchema: noArgs,
    run: async () => {
      agent.pipeline!.resume();
      await fleet.publishStatus("online");
      return { paused: false };
    },
  });

  server.handle("upload-now", {
    argsSchema: noArgs,
    run: async () => {
      const outbox = agent.outboxStore;
      if (!outbox || !fleet.uplink) {
        throw new CommandError("failed", "hard-example mining is off on this device");
      }
      fleet.uplink.drainNow();
      return { outbox: outbox.size() };
    },
  });

  server.handle("snapshot", {
    argsSchema: noArgs,
    run: async () => {
      const frame = agent.lastFrame;
      if (!frame) {
        throw new CommandError("failed", "no frame has been classified yet");
      }
      const jpeg = await sharp(frame.frame.data)
        .rotate()
        .resize({ width: SNAPSHOT_SIDE, height: SNAPSHOT_SIDE, fit: "inside", withoutEnlargement: true })
        .jpeg({ quality: 80 })
        .toBuffer()
        .catch((error: unknown) => {
          throw new CommandError("failed", `latest frame cannot be encoded: ${describeError(error)}`);
        });
      return {
        frameId: frame.frame.id,
        capturedAt: frame.frame.capturedAt,
        label: frame.record.label,
        confidence: frame.record.confidence,
        bin: frame.record.bin,
        jpegBase64: jpeg.toString("base64"),
      };
    },
  });
}
