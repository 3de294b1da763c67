// Child process of store-crash.test.ts. It writes, signs, installs and activates a new fake
// package version in a loop and prunes the store after each activation. It prints
// "activating <id>" before and "activated <id>" after each activation. The parent kills it
// with SIGKILL at a random moment.
//
// Arguments: URL of the compiled store module, URL of the compiled signing module, state
// folder, JSON file with the signing key pair, manifest template file, work folder, run id.
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";

const [storeModuleUrl, signingModuleUrl, stateDir, keyFile, templateFile, workDir, runId] = process.argv.slice(2);
const { ModelStore } = await import(storeModuleUrl);
const { signPackage } = await import(signingModuleUrl);

const keys = JSON.parse(readFileSync(keyFile, "utf8"));
// The packages have no knowledge file, so the entry of the template manifest goes.
const { knowledge: _knowledge, ...template } = JSON.parse(readFileSync(templateFile, "utf8"));
const store = await ModelStore.open(stateDir, { trustedKeys: [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }] });
process.stdout.write("ready\n");

for (let iteration = 0; ; iteration += 1) {
  const dir = path.join(workDir, `run${runId}-${iteration}`);
  mkdirSync(dir, { recursive: true });
  const model = randomBytes(256 * 1024 + Math.floor(Math.random() * 2 * 1024 * 1024));
  writeFileSync(path.join(dir, "model.onnx"), model);
  const manifest = {
    ...template,
    name: "sortline-crash",
    version: `1.${runId}.${iteration}`,
    file: { name: "model.onnx", sha256: createHash("sha256").update(model).digest("hex"), bytes: model.length },
  };
  writeFileSync(path.join(dir, "manifest.json"), JSON.stringify(manifest, null, 2));
  await signPackage(dir, keys.privateKeyPem);

  const id = await store.install(dir);
  process.stdout.write(`activating ${id}\n`);
  await store.activate(id);
  process.stdout.write(`activated ${id}\n`);
  await store.prune(3);
  rmSync(dir, { recursive: true, force: true });
}
