import { spawnSync } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

const systemdDir = fileURLToPath(new URL("../../systemd/", import.meta.url));
const unitName = "sortline-agent.service";

function toolMissing(tool: string): string {
  const result = spawnSync(tool, ["--version"]);
  return result.error === undefined && result.status === 0 ? "" : ` (skipped: ${tool} is not installed)`;
}

const analyzeMissing = toolMissing("systemd-analyze");
const sysusersMissing = toolMissing("systemd-sysusers");

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

describe("sortline-agent.service", () => {
  let tempDir: string;
  let unit: string;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-unit-"));
    unit = await readFile(path.join(systemdDir, unitName), "utf8");
  });

  afterEach(async () => {
    await rm(tempDir, { recursive: true, force: true });
  });

  it("sets the notify, watchdog and hardening options", () => {
    const service = new Map(sectionEntries(unit, "Service"));

    expect(service.get("Type")).toBe("notify");
    expect(service.get("NotifyAccess")).toBe("all");
    expect(service.get("WatchdogSec")).toBe("30");
    expect(service.get("User")).toBe("sortline");
    expect(service.get("StateDirectory")).toBe("sortline");
    expect(service.get("NoNewPrivileges")).toBe("yes");
    expect(service.get("ProtectSystem")).toBe("strict");
    expect(service.get("CapabilityBoundingSet")).toBe("");
    expect(service.get("MemoryDenyWriteExecute")).toBe("no");
    expect(service.get("DevicePolicy")).toBe("closed");
    expect(service.get("ExecStart")).toBe("/usr/bin/node /opt/sortline/bin/sortline.js agent --config /etc/sortline/agent.yaml");
  });

  it("names devices without path wildcards", () => {
    // DeviceAllow= matches wildcards only in char-/block- driver names, never in /dev paths.
    const devices = sectionEntries(unit, "Service")
      .filter(([key]) => key === "DeviceAllow")
      .map(([, value]) => value.split(" ")[0] ?? "");

    expect(devices).toContain("char-video4linux");
    for (const device of devices.filter((name) => name.startsWith("/dev/"))) {
      expect(device).not.toMatch(/[*?[]/);
    }
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

    expect(result.status).toBe(0);
    expect(complaints).toEqual([]);
  });
});

describe("sysusers.d/sortline.conf", () => {
  let tempRoot: string;

  beforeEach(async () => {
    tempRoot = await mkdtemp(path.join(tmpdir(), "sortline-sysusers-"));
    await mkdir(path.join(tempRoot, "etc"));
  });

  afterEach(async () => {
    await rm(tempRoot, { recursive: true, force: true });
  });

  it.skipIf(sysusersMissing !== "")(`creates the sortline user in a scratch root${sysusersMissing}`, async () => {
    const config = await readFile(path.join(systemdDir, "sysusers.d", "sortline.conf"), "utf8");

    const result = spawnSync("systemd-sysusers", [`--root=${tempRoot}`, "-"], { input: config, encoding: "utf8" });
    const passwd = await readFile(path.join(tempRoot, "etc", "passwd"), "utf8");
    const group = await readFile(path.join(tempRoot, "etc", "group"), "utf8");

    expect(result.status, result.stderr).toBe(0);
    expect(passwd).toMatch(/^sortline:x:\d+:\d+:sortline edge agent:\/var\/lib\/sortline:\/usr\/sbin\/nologin$/m);
    expect(group).toMatch(/^video:x:\d+:sortline$/m);
    expect(group).toMatch(/^render:x:\d+:sortline$/m);
  });
});
