import { mkdtemp, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";

import { ConfigValidationError, loadAgentConfig, parseAgentConfig, resolveSecret } from "../../src/config/load.js";
import { ConfigError } from "../../src/lib/errors.js";

const minimal = { device: { id: "line1" }, sources: [{ type: "directory", name: "replay", path: "photos" }] };

function problemsOf(document: unknown): string[] {
  try {
    parseAgentConfig(document, "agent.yaml", "/etc/sortline");
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigValidationError);
    return (error as ConfigValidationError).problems.map((p) => p.message);
  }
  throw new Error("configuration was accepted");
}

describe("agent configuration", () => {
  it("fills defaults and resolves paths", () => {
    const config = parseAgentConfig(minimal, "agent.yaml", "/etc/sortline");
    expect(config.device.site).toBe("default");
    expect(config.model.providers).toEqual(["cpu"]);
    expect(config.pipeline).toEqual({ maxBatch: 8, maxWaitMs: 10, queueSize: 32 });
    expect(config.sources[0]).toMatchObject({ path: "/etc/sortline/photos", fps: 10, loop: true, stallSeconds: 10 });
    expect(config.audit.path).toBe("/var/lib/sortline/audit.db");
    expect(config.actuators).toEqual([{ type: "log" }]);
    expect(path.isAbsolute(config.model.dir)).toBe(true);
  });

  it("names key path, value and expected form", () => {
    const problems = problemsOf({ ...minimal, pipeline: { maxBatch: 0, queueSize: "big" } });
    expect(problems).toContain("pipeline.maxBatch: value 0 is invalid; expected >= 1");
    expect(problems).toContain('pipeline.queueSize: value "big" is invalid; expected integer');
  });

  it("reports unknown and missing keys", () => {
    const problems = problemsOf({ device: { id: "line1", colour: "red" } });
    expect(problems).toContain("device.colour: unknown key; check the spelling against the documented keys");
    expect(problems).toContain("sources: missing; this key is required");
  });

  it("checks each source type's own keys", () => {
    const problems = problemsOf({ device: { id: "a" }, sources: [{ type: "rpicam", name: "cam", fps: -1, path: "/x" }] });
    expect(problems).toContain("sources[0].fps: value -1 is invalid; expected > 0");
    expect(problems).toContain("sources[0].path: unknown key; check the spelling against the documented keys");
  });

  it("rejects an unknown provider and source type", () => {
    const problems = problemsOf({ ...minimal, model: { providers: ["openvino"] } });
    expect(problems).toContain('model.providers[0]: value "openvino" is invalid; expected one of "tensorrt", "cuda", "cpu"');
    const typeProblems = problemsOf({ device: { id: "a" }, sources: [{ type: "webcam", name: "cam" }] });
    expect(typeProblems[0]).toMatch(/^sources\[0\]\.type: value "webcam" is invalid; expected one of "directory", "rpicam", "gstreamer"/);
  });

  it("refuses a password written in the file", () => {
    const problems = problemsOf({ ...minimal, actuators: [{ type: "mqtt", url: "mqtt://127.0.0.1:1883", password: "hunter2" }] });
    expect(problems).toContain('actuators[0].password: value "hunter2" is invalid; expected object');
  });

  it("rejects duplicate source names", () => {
    const sources = [minimal.sources[0], { ...minimal.sources[0] }];
    expect(problemsOf({ ...minimal, sources })).toEqual(['sources[1].name: value "replay" is used by another source; names must be unique']);
  });

  it("loads YAML and reports syntax errors", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sortline-config-"));
    const good = path.join(dir, "agent.yaml");
    await writeFile(good, "device:\n  id: line1\nsources:\n  - type: directory\n    name: replay\n    path: photos\n");
    expect((await loadAgentConfig(good)).sources[0]).toMatchObject({ path: path.join(dir, "photos") });
    const bad = path.join(dir, "bad.yaml");
    await writeFile(bad, "device: [\n");
    await expect(loadAgentConfig(bad)).rejects.toThrow(/bad\.yaml is not valid YAML or JSON/);
    await expect(loadAgentConfig(path.join(dir, "missing.yaml"))).rejects.toThrow(/cannot read configuration file .*ENOENT/);
  });
});

describe("secrets", () => {
  it("come from the environment", async () => {
    await expect(resolveSecret({ env: "MQTT_PW" }, "actuators[0].password", { MQTT_PW: "s3cret" })).resolves.toBe("s3cret");
    await expect(resolveSecret({ env: "MQTT_PW" }, "actuators[0].password", {})).rejects.toThrow(ConfigError);
  });

  it("come from systemd credentials", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sortline-credentials-"));
    await writeFile(path.join(dir, "mqtt-password"), "from-credential\n");
    await expect(resolveSecret({ credential: "mqtt-password" }, "k", { CREDENTIALS_DIRECTORY: dir })).resolves.toBe("from-credential");
    await expect(resolveSecret({ credential: "mqtt-password" }, "k", {})).rejects.toThrow(/CREDENTIALS_DIRECTORY is not set/);
  });
});
