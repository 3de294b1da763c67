import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

const systemdDir = fileURLToPath(new URL("../../systemd/", import.meta.url));
const unitName = "sortline-trainer.service";

const analyzeResult = spawnSync("systemd-analyze", ["--version"]);
const analyzeMissing =
  analyzeResult.error === undefined && analyzeResult.status === 0 ? "" : " (skipped: systemd-analyze is not installed)";

/** Parses `Key=value` lines of one unit file section. */
function sectionEntries(unit: string, section: string): Array<[string, string]> {
  const entries: Array<[string, string]> = [];
  let current = "";
  for (const rawLine of unit.split("\n")) {
    const line = rawLine.trim();
    if (line.startsWith("[")) {
      current = line;
    } else if (current === `[${section}]` && line !== "" && !line.startsWith("#")) {
      const separator = line.indexOf("=");
      entries.push([line.slice(0, separator), line.slice(separator + 1)]);
    }
  }
  return entries;
}

describe("sortline-trainer.service", () => {
  let tempDir: string;
  let unit: string;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-trainer-unit-"));
    unit = await readFile(path.join(systemdDir, unitName), "utf8");
  });

  afterEach(async () => {
    await rm(tempDir, { recursive: true, force: true });
  });

  it("runs the trainer CLI as its own user", () => {
    const service = new Map(sectionEntries(unit, "Service"));

    expect(service.get("Type")).toBe("simple");
    expect(service.get("ExecStart")).toBe("/usr/bin/node /opt/sortline/bin/sortline.js trainer --config /etc/sortline/trainer.yaml");
    expect(service.get("User")).toBe("sortline-trainer");
    expect(service.get("Group")).toBe("sortline-trainer");
    expect(service.get("StateDirectory")).toBe("sortline-trainer");
    expect(service.get("WorkingDirectory")).toBe("/var/lib/sortline-trainer");
  });

  it("sets the hardening options", () => {
    const service = new Map(sectionEntries(unit, "Service"));

    expect(service.get("NoNewPrivileges")).toBe("yes");
    expect(service.get("ProtectSystem")).toBe("strict");
    expect(service.get("ProtectHome")).toBe("yes");
    expect(service.get("PrivateTmp")).toBe("yes");
    expect(service.get("CapabilityBoundingSet")).toBe("");
    expect(service.get("AmbientCapabilities")).toBe("");
    expect(service.get("SystemCallFilter")).toBe("@system-service");
    expect(service.get("RestrictAddressFamilies")?.split(" ")).toEqual(["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]);
  });

  it("leaves write-execute memory to the JVM", () => {
    // The Spark job's JVM and Node.js compile code at run time.
    const keys = sectionEntries(unit, "Service").map(([key]) => key);

    expect(keys).not.toContain("MemoryDenyWriteExecute");
  });

  it("writes only to its state directory", () => {
    const keys = sectionEntries(unit, "Service").map(([key]) => key);
    const service = new Map(sectionEntries(unit, "Service"));

    expect(keys).not.toContain("ReadWritePaths");
    expect(keys).not.toContain("CacheDirectory");
    expect(keys).not.toContain("LogsDirectory");
    expect(keys).not.toContain("RuntimeDirectory");
    for (const [key, value] of sectionEntries(unit, "Service").filter(([name]) => name === "Environment")) {
      const [, target] = value.split("=");
      if (target?.startsWith("/")) {
        expect(target, `${key}=${value}`).toMatch(/^\/var\/lib\/sortline-trainer(\/|$)/);
      }
    }
    expect(service.get("StateDirectoryMode")).toBe("0750");
  });

  it("loads the keys as credentials", () => {
    const credentials = sectionEntries(unit, "Service")
      .filter(([key]) => key === "LoadCredential")
      .map(([, value]) => value.split(":")[0]);

    expect(credentials).toEqual(["signing-key", "mqtt-tls-key"]);
  });

  it.skipIf(analyzeMissing !== "")(`passes systemd-analyze verify${analyzeMissing}`, async () => {
    // verify requires the ExecStart= executable to exist, so the copy runs this Node.js on an empty script.
    const script = path.join(tempDir, "sortline.js");
    await writeFile(script, "");
    const copy = unit.replace(
      "ExecStart=/usr/bin/node /opt/sortline/bin/sortline.js",
      `ExecStart=${process.execPath} ${script}`,
    );
    expect(copy).not.toBe(unit);
    const unitPath = path.join(tempDir, unitName);
    await writeFile(unitPath, copy);

    const result = spawnSync("systemd-analyze", ["verify", unitPath], { encoding: "utf8", cwd: tempDir });
    const complaints = `${result.stdout}${result.stderr}`
      .split("\n")
      .filter((line) => line.includes(unitName));

    expect(result.status, result.stderr).toBe(0);
    expect(complaints).toEqual([]);
  });
});
