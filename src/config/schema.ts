import type { ProviderName } from "../inference/runner.js";

/** A secret reference: the value comes from an environment variable or a systemd credential, never from the file. */
export interface SecretRef {
  env?: string;
  credential?: string;
}

export type SourceConfig =
  | { type: "directory"; name: string; path: string; fps: number; loop: boolean; shuffleSeed?: number; stallSeconds: number }
  | {
      type: "rpicam";
      name: string;
      width: number;
      height: number;
      fps: number;
      camera: number;
      extraArgs: string[];
      binaryPath?: string;
      stallSeconds: number;
    }
  | {
      type: "gstreamer";
      name: string;
      pipeline?: string[];
      preset?: { kind: "jetson-csi" | "v4l2"; width: number; height: number; fps: number; sensorId?: number; device?: string; input?: "raw" | "mjpeg" };
      binaryPath?: string;
      stallSeconds: number;
    };

export type ActuatorConfig =
  | {
      type: "mqtt";
      url: string;
      topic: string;
      qos: 0 | 1 | 2;
      clientId?: string;
      username?: string;
      password?: SecretRef;
      /** Decisions produced while the broker is unreachable are dropped after this many are queued. */
      maxQueued: number;
    }
  | { type: "log" };

/** The validated agent configuration with defaults filled in. */
export interface AgentConfig {
  device: { id: string; site: string };
  model: { dir: string; providers: ProviderName[]; threads: number };
  sources: SourceConfig[];
  pipeline: { maxBatch: number; maxWaitMs: number; queueSize: number };
  decisions: {
    bins: Record<string, string>;
    rejectBin: string;
    minConfidence: Record<string, number>;
    defaultMinConfidence: number;
    topK: number;
    deadlineMs: number;
  };
  actuators: ActuatorConfig[];
  audit: { path: string; synchronous: "FULL" | "NORMAL"; maxAgeDays: number; maxBytes: number; pruneIntervalSeconds: number };
  health: { host: string; port: number; stallSeconds: number };
  logging: { level: "fatal" | "error" | "warn" | "info" | "debug" | "trace" };
}

const name = { type: "string", pattern: "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$" } as const;
const positive = { type: "number", exclusiveMinimum: 0 } as const;
const stallSeconds = { type: "number", exclusiveMinimum: 0, default: 10 } as const;
const secretRef = {
  type: "object",
  additionalProperties: false,
  minProperties: 1,
  maxProperties: 1,
  properties: { env: { type: "string", pattern: "^[A-Za-z_][A-Za-z0-9_]*$" }, credential: { type: "string", pattern: "^[A-Za-z0-9._-]+$" } },
} as const;

/** JSON Schema of the agent configuration file (YAML or JSON). Defaults are applied by the validator. */
export const agentConfigSchema = {
  type: "object",
  additionalProperties: false,
  required: ["device", "sources"],
  properties: {
    device: {
      type: "object",
      additionalProperties: false,
      required: ["id"],
      properties: { id: name, site: { ...name, default: "default" } },
    },
    model: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        dir: { type: "string", minLength: 1 },
        providers: {
          type: "array",
          minItems: 1,
          uniqueItems: true,
          items: { enum: ["tensorrt", "cuda", "cpu"] },
          default: ["cpu"],
        },
        threads: { type: "integer", minimum: 0, maximum: 256, default: 0 },
      },
    },
    sources: {
      type: "array",
      minItems: 1,
      items: {
        type: "object",
        required: ["type", "name"],
        properties: { type: { enum: ["directory", "rpicam", "gstreamer"] }, name },
        allOf: [
          {
            if: { properties: { type: { const: "directory" } } },
            then: {
              additionalProperties: false,
              required: ["path"],
              properties: {
                type: {},
                name: {},
                path: { type: "string", minLength: 1 },
                fps: { ...positive, maximum: 1000, default: 10 },
                loop: { type: "boolean", default: true },
                shuffleSeed: { type: "integer" },
                stallSeconds,
              },
            },
          },
          {
            if: { properties: { type: { const: "rpicam" } } },
            then: {
              additionalProperties: false,
              properties: {
                type: {},
                name: {},
                width: { type: "integer", minimum: 64, maximum: 8192, default: 1280 },
                height: { type: "integer", minimum: 64, maximum: 8192, default: 720 },
                fps: { ...positive, maximum: 240, default: 15 },
                camera: { type: "integer", minimum: 0, default: 0 },
                extraArgs: { type: "array", items: { type: "string" }, default: [] },
                binaryPath: { type: "string", minLength: 1 },
                stallSeconds,
              },
            },
          },
          {
            if: { properties: { type: { const: "gstreamer" } } },
            then: {
              additionalProperties: false,
              oneOf: [{ required: ["pipeline"] }, { required: ["preset"] }],
              properties: {
                type: {},
                name: {},
                pipeline: { type: "array", minItems: 1, items: { type: "string", minLength: 1 } },
                preset: {
                  type: "object",
                  additionalProperties: false,
                  required: ["kind"],
                  properties: {
                    kind: { enum: ["jetson-csi", "v4l2"] },
                    width: { type: "integer", minimum: 64, maximum: 8192, default: 1280 },
                    height: { type: "integer", minimum: 64, maximum: 8192, default: 720 },
                    fps: { ...positive, maximum: 240, default: 15 },
                    sensorId: { type: "integer", minimum: 0 },
                    device: { type: "string", pattern: "^/dev/" },
                    input: { enum: ["raw", "mjpeg"] },
                  },
                },
                binaryPath: { type: "string", minLength: 1 },
                stallSeconds,
              },
            },
          },
        ],
      },
    },
    pipeline: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        maxBatch: { type: "integer", minimum: 1, maximum: 64, default: 8 },
        maxWaitMs: { type: "number", minimum: 0, maximum: 1000, default: 10 },
        queueSize: { type: "integer", minimum: 1, maximum: 10000, default: 32 },
      },
    },
    decisions: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        bins: { type: "object", additionalProperties: { type: "string", minLength: 1 }, default: {} },
        rejectBin: { type: "string", minLength: 1, default: "reject" },
        minConfidence: { type: "object", additionalProperties: { type: "number", minimum: 0, maximum: 1 }, default: {} },
        defaultMinConfidence: { type: "number", minimum: 0, maximum: 1, default: 0.5 },
        topK: { type: "integer", minimum: 1, maximum: 20, default: 3 },
        deadlineMs: { type: "integer", minimum: 1, maximum: 60000, default: 1000 },
      },
    },
    actuators: {
      type: "array",
      default: [{ type: "log" }],
      items: {
        type: "object",
        required: ["type"],
        properties: { type: { enum: ["mqtt", "log"] } },
        allOf: [
          {
            if: { properties: { type: { const: "mqtt" } } },
            then: {
              additionalProperties: false,
              required: ["url"],
              properties: {
                type: {},
                url: { type: "string", pattern: "^(mqtts?|wss?|tcp|ssl)://" },
                topic: { type: "string", minLength: 1, default: "sortline/v1/{site}/{device}/decision" },
                qos: { enum: [0, 1, 2], default: 1 },
                clientId: { type: "string", minLength: 1, maxLength: 128 },
                username: { type: "string" },
                password: secretRef,
                maxQueued: { type: "integer", minimum: 0, maximum: 100000, default: 100 },
              },
            },
          },
          { if: { properties: { type: { const: "log" } } }, then: { additionalProperties: false, properties: { type: {} } } },
        ],
      },
    },
    audit: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        path: { type: "string", minLength: 1, default: "/var/lib/sortline/audit.db" },
        synchronous: { enum: ["FULL", "NORMAL"], default: "FULL" },
        maxAgeDays: { type: "number", exclusiveMinimum: 0, default: 90 },
        maxBytes: { type: "integer", minimum: 1048576, default: 2147483648 },
        pruneIntervalSeconds: { type: "number", minimum: 1, default: 600 },
      },
    },
    health: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        host: { type: "string", default: "127.0.0.1" },
        port: { type: "integer", minimum: 0, maximum: 65535, default: 9464 },
        stallSeconds: { type: "number", exclusiveMinimum: 0, default: 30 },
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
