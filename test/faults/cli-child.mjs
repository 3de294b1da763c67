// Runs one sortline command (`agent` or `trainer`) from a build of its src/cli module, without
// the rest of the CLI. Arguments: file URL of the compiled module, the name of its run function
// (runAgent or runTrainer), then the command's arguments.
const [moduleUrl, runName, ...args] = process.argv.slice(2);
const module = await import(moduleUrl);
if (typeof module[runName] !== "function") {
  process.stderr.write(`${moduleUrl} exports no function ${runName}\n`);
  process.exit(2);
}
process.exitCode = await module[runName](args);
