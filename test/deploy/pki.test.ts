import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, statSync } from "node:fs";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

const pkiScript = fileURLToPath(new URL("../../deploy/pki.sh", import.meta.url));

interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

let workDir: string;
let pkiDir: string;
let inventory: string;
/** stdout and stderr of every pki.sh call, to check that no key was printed. */
let transcript = "";

function pki(...args: string[]): RunResult {
  const result = spawnSync(pkiScript, args, { encoding: "utf8" });
  transcript += `${result.stdout}${result.stderr}`;
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

function mode(file: string): string {
  return (statSync(file).mode & 0o777).toString(8);
}

function subject(certificate: string): string {
  const result = spawnSync("openssl", ["x509", "-in", certificate, "-noout", "-subject", "-nameopt", "RFC2253"], { encoding: "utf8" });
  return result.stdout.trim();
}

/** Splits ACL text into a map from user name to its topic lines. */
function aclBlocks(acl: string): Map<string, string[]> {
  const blocks = new Map<string, string[]>();
  let user: string | undefined;
  for (const line of acl.split("\n")) {
    if (line.startsWith("user ")) {
      user = line.slice("user ".length);
      blocks.set(user, []);
    } else if (line.startsWith("topic ") || line.startsWith("pattern ")) {
      expect(user, `topic line before the first user line: ${line}`).toBeDefined();
      blocks.get(user ?? "")?.push(line);
    }
  }
  return blocks;
}

beforeAll(async () => {
  workDir = await mkdtemp(path.join(tmpdir(), "sortline-pki-"));
  pkiDir = path.join(workDir, "pki");
  inventory = path.join(workDir, "fleet.txt");
  await writeFile(inventory, "# site device\nplant-a cam-1\r\nplant-a cam.2\n\nplant-b sorter_1\n");

  expect(pki("init", pkiDir).status).toBe(0);
  expect(pki("broker", pkiDir, "mqtt.plant.example", "127.0.0.1", "::1").status).toBe(0);
  expect(pki("fleet", pkiDir, inventory).status).toBe(0);
  expect(pki("trainer", pkiDir).status).toBe(0);
});

afterAll(async () => {
  if (workDir !== undefined) {
    await rm(workDir, { recursive: true, force: true });
  }
});

describe("pki.sh", () => {
  it("writes keys with mode 600", () => {
    expect(mode(path.join(pkiDir, "private", "ca.key"))).toBe("600");
    expect(mode(path.join(pkiDir, "private"))).toBe("700");
    expect(mode(path.join(pkiDir, "broker", "broker.key"))).toBe("600");
    expect(mode(path.join(pkiDir, "trainer", "trainer.key"))).toBe("600");
    expect(mode(path.join(pkiDir, "devices", "plant-a", "cam.2", "device.key"))).toBe("600");
  });

  it("names devices SITE/DEVICE in the CN", () => {
    expect(subject(path.join(pkiDir, "devices", "plant-a", "cam.2", "device.crt"))).toBe("subject=CN=plant-a/cam.2");
    expect(subject(path.join(pkiDir, "devices", "plant-b", "sorter_1", "device.crt"))).toBe("subject=CN=plant-b/sorter_1");
    expect(subject(path.join(pkiDir, "trainer", "trainer.crt"))).toBe("subject=CN=trainer");
  });

  it("puts every broker name in subjectAltName", () => {
    const result = spawnSync("openssl", ["x509", "-in", path.join(pkiDir, "broker", "broker.crt"), "-noout", "-ext", "subjectAltName"], {
      encoding: "utf8",
    });

    expect(result.stdout).toContain("DNS:mqtt.plant.example");
    expect(result.stdout).toContain("IP Address:127.0.0.1");
    expect(result.stdout).toContain("IP Address:0:0:0:0:0:0:0:1");
  });

  it("keeps existing keys and certificates on a rerun", () => {
    const files = [
      path.join(pkiDir, "private", "ca.key"),
      path.join(pkiDir, "ca.crt"),
      path.join(pkiDir, "devices", "plant-a", "cam-1", "device.key"),
      path.join(pkiDir, "devices", "plant-a", "cam-1", "device.crt"),
    ];
    const before = files.map((file) => readFileSync(file, "utf8"));

    const init = pki("init", pkiDir);
    const fleet = pki("fleet", pkiDir, inventory);

    expect(init.status).toBe(0);
    expect(fleet.status).toBe(0);
    expect(fleet.stdout).toContain("exists:");
    expect(files.map((file) => readFileSync(file, "utf8"))).toEqual(before);
  });

  it.each([
    ["a parent path", "..", "cam"],
    ["a slash", "plant-a", "cam/1"],
    ["a leading dash", "-rf", "cam"],
    ["a space", "plant a", "cam"],
    ["a wildcard", "plant-a", "+"],
    ["65 characters", "plant-a", "c".repeat(65)],
  ])("rejects a name with %s", (_case, site, device) => {
    const result = pki("device", pkiDir, site, device);

    expect(result.status).toBe(1);
    expect(result.stderr).toMatch(/invalid (site|device) name/);
    expect(existsSync(path.join(pkiDir, "devices", site, device))).toBe(false);
  });

  it("rejects a bad inventory before issuing", async () => {
    const bad = path.join(workDir, "bad.txt");
    await writeFile(bad, "plant-c new-1\nplant-c new-1\n");

    const result = pki("fleet", pkiDir, bad);

    expect(result.status).toBe(1);
    expect(result.stderr).toContain("bad.txt:2: device plant-c new-1 is listed twice");
    expect(existsSync(path.join(pkiDir, "devices", "plant-c"))).toBe(false);
  });

  it("writes one ACL block per device and the trainer", () => {
    const result = pki("acl", pkiDir, inventory);
    const blocks = aclBlocks(result.stdout);

    expect(result.status).toBe(0);
    expect([...blocks.keys()]).toEqual(["trainer", "plant-a/cam-1", "plant-a/cam.2", "plant-b/sorter_1", "observer:plant-a", "observer:plant-b"]);
    expect(blocks.get("plant-a/cam.2")).toEqual([
      "topic readwrite sortline/v1/plant-a/cam.2/status",
      "topic write sortline/v1/plant-a/cam.2/decision",
      "topic write sortline/v1/plant-a/cam.2/reply",
      "topic write sortline/v1/plant-a/cam.2/up/data",
      "topic write sortline/v1/plant-a/cam.2/down/ack",
      "topic read sortline/v1/plant-a/cam.2/cmd",
      "topic read sortline/v1/plant-a/cam.2/up/ack",
      "topic read sortline/v1/plant-a/cam.2/down/data",
    ]);
    expect(blocks.get("observer:plant-b")).toEqual(["topic read sortline/v1/plant-b/+/decision"]);
    expect(blocks.get("trainer")?.filter((line) => line.startsWith("topic write"))).toEqual([
      "topic write sortline/v1/+/+/cmd",
      "topic write sortline/v1/+/+/up/ack",
      "topic write sortline/v1/+/+/down/data",
    ]);
  });

  it("revokes a device and issues a new key", async () => {
    const keyFile = path.join(pkiDir, "devices", "plant-b", "sorter_1", "device.key");
    const oldKey = readFileSync(keyFile, "utf8");

    const revoke = pki("revoke", pkiDir, "device", "plant-b", "sorter_1");
    const crl = spawnSync("openssl", ["crl", "-in", path.join(pkiDir, "ca.crl"), "-noout", "-text"], { encoding: "utf8" });
    const reissue = pki("device", pkiDir, "plant-b", "sorter_1");

    expect(revoke.status).toBe(0);
    expect(crl.stdout).toContain("Revoked Certificates:");
    expect(await readdir(path.join(pkiDir, "revoked"))).toHaveLength(1);
    expect(reissue.status).toBe(0);
    expect(readFileSync(keyFile, "utf8")).not.toBe(oldKey);
  });

  it("never prints a private key", () => {
    expect(transcript).not.toContain("PRIVATE KEY");
  });
});
