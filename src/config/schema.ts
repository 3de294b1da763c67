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
  | { type: "log" }
  /** Publishes decisions on the device's decision topic over the fleet connection (one TLS identity per device). */
  | { type: "fleet"; qos: 0 | 1 | 2; maxQueued: number };

export interface TlsFiles {
  ca?: string;
  cert?: string;
  key?: string;
}

/** Connection to the fleet broker and the keys the agent trusts. */
export interface FleetConfig {
  url: string;
  protocolVersion: 4 | 5;
  clientId?: string;
  tls?: TlsFiles;
  username?: string;
  password?: SecretRef;
  /** Public keys (PEM files) whose signatures the agent accepts on model packages and commands. */
  trustedKeys: string[];
  /** Commands must be signed by a trusted key; off only for a broker whose ACL is the only guard. */
  requireSignedCommands: boolean;
  statusIntervalSeconds: number;
  /** Largest model bundle accepted over the fleet connection. */
  maxDownloadBytes: number;
}

export interface MiningConfig {
  enabled: boolean;
  lowConfidence: number;
  minMargin: number;
  noveltyThreshold: number;
  randomRate: number;
  minDistance: number;
  clusterRadius: number;
  maxClusterShare: number;
  perHour: number;
  outbox: { maxBytes: number; maxItems: number };
}

export interface UpdateConfig {
  /** Model store, outbox, downloads and settings changed by fleet commands; default: the audit database's folder. */
  stateDir: string;
  shadowFrames: number;
  shadowTimeoutSeconds: number;
  maxLatencyRatio: number;
  keepVersions: number;
  crashLoop: { starts: number; windowSeconds: number };
  healthyAfterFrames: number;
  regression: { windowFrames: number; maxErrorRateIncrease: number; maxLatencyFactor: number } | false;
}

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
  fleet?: FleetConfig;
  mining: MiningConfig;
  update: UpdateConfig;
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
        properties: { type: { enum: ["mqtt", "log", "fleet"] } },
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
          {
            if: { properties: { type: { const: "fleet" } } },
            then: {
              additionalProperties: false,
              properties: {
                type: {},
                qos: { enum: [0, 1, 2], default: 1 },
                maxQueued: { type: "integer", minimum: 0, maximum: 100000, default: 100 },
              },
            },
          },
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
    fleet: {
      type: "object",
      additionalProperties: false,
      required: ["url"],
      properties: {
        url: { type: "string", pattern: "^(mqtts?|wss?|tcp|ssl)://" },
        protocolVersion: { enum: [4, 5], default: 5 },
        clientId: { type: "string", minLength: 1, maxLength: 128 },
        tls: {
          type: "object",
          additionalProperties: false,
          properties: { ca: { type: "string", minLength: 1 }, cert: { type: "string", minLength: 1 }, key: { type: "string", minLength: 1 } },
        },
        username: { type: "string" },
        password: secretRef,
        trustedKeys: { type: "array", items: { type: "string", minLength: 1 }, default: [] },
        requireSignedCommands: { type: "boolean", default: true },
        statusIntervalSeconds: { type: "number", minimum: 1, maximum: 86400, default: 60 },
        maxDownloadBytes: { type: "integer", minimum: 1048576, default: 536870912 },
      },
    },
    mining: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        enabled: { type: "boolean", default: true },
        lowConfidence: { type: "number", minimum: 0, maximum: 1, default: 0.6 },
        minMargin: { type: "number", minimum: 0, maximum: 1, default: 0.15 },
        noveltyThreshold: { type: "number", exclusiveMinimum: 0, default: 1 },
        randomRate: { type: "number", minimum: 0, maximum: 1, default: 0.005 },
        minDistance: { type: "number", minimum: 0, maximum: 2, default: 0.1 },
        clusterRadius: { type: "number", exclusiveMinimum: 0, maximum: 2, default: 0.35 },
        maxClusterShare: { type: "number", exclusiveMinimum: 0, maximum: 1, default: 0.25 },
        perHour: { type: "number", minimum: 0, maximum: 1000000, default: 60 },
        outbox: {
          type: "object",
          additionalProperties: false,
          default: {},
          properties: {
            maxBytes: { type: "integer", minimum: 1048576, default: 268435456 },
            maxItems: { type: "integer", minimum: 1, default: 10000 },
          },
        },
      },
    },
    update: {
      type: "object",
      additionalProperties: false,
      default: {},
      properties: {
        stateDir: { type: "string", minLength: 1 },
        shadowFrames: { type: "integer", minimum: 0, maximum: 1000000, default: 200 },
        shadowTimeoutSeconds: { type: "number", exclusiveMinimum: 0, default: 600 },
        maxLatencyRatio: { type: "number", minimum: 1, default: 1.5 },
        keepVersions: { type: "integer", minimum: 2, maximum: 100, default: 3 },
        crashLoop: {
          type: "object",
          additionalProperties: false,
          default: {},
          properties: {
            starts: { type: "integer", minimum: 2, default: 3 },
            windowSeconds: { type: "number", exclusiveMinimum: 0, default: 600 },
          },
        },
        healthyAfterFrames: { type: "integer", minimum: 1, default: 500 },
        regression: {
          default: {},
          oneOf: [
            { const: false },
            {
              type: "object",
              additionalProperties: false,
              properties: {
                windowFrames: { type: "integer", minimum: 10, default: 500 },
                maxErrorRateIncrease: { type: "number", minimum: 0, maximum: 1, default: 0.02 },
                maxLatencyFactor: { type: "number", minimum: 1, default: 2 },
              },
            },
          ],
        },
      },
    },
  },
} as const;
