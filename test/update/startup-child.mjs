// Child process of startup.test.ts: one agent start. It chooses the model with
// resolveStartupModel, loads it, prints the choice as one JSON line and then either exits
// with status 70 before the model is marked healthy ("crash"), or marks it healthy and exits
// with status 0 ("healthy").
//
// Arguments: URL of the compiled startup, guard, store and runner modules, state folder,
// bundled default folder, JSON file with the trusted keys, mode.
const [startupUrl, guardUrl, storeUrl, runnerUrl, stateDir, bundledDefault, keysFile, mode] = process.argv.slice(2);
const { resolveStartupModel } = await import(startupUrl);
const { CrashLoopGuard } = await import(guardUrl);
const { ModelStore } = await import(storeUrl);
const { ModelRunner } = await import(runnerUrl);
const { readFileSync } = await import("node:fs");

const trustedKeys = JSON.parse(readFileSync(keysFile, "utf8"));
const store = await ModelStore.open(stateDir, { trustedKeys });
const guard = await CrashLoopGuard.open(stateDir, { maxStarts: 3, windowMs: 60_000 });
const resolved = await resolveStartupModel({ store, guard, bundledDefault, trustedKeys });
const runner = await ModelRunner.load(resolved.dir, { skipVerify: true });
await runner.warmUp([1]);
process.stdout.write(`${JSON.stringify({ id: resolved.id, source: resolved.source, version: runner.manifest.version, rolledBackFrom: resolved.rolledBackFrom ?? null })}\n`);
if (mode === "healthy") {
  await guard.markHealthy(resolved.id);
  await runner.release();
  process.exit(0);
}
process.exit(70);
