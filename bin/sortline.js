#!/usr/bin/env node
import("../dist/cli/main.js")
  .then((cli) => cli.main(process.argv.slice(2)))
  .then((code) => {
    process.exitCode = code;
  })
  .catch((error) => {
    if (error && error.code === "ERR_MODULE_NOT_FOUND" && String(error.message).includes("dist/cli/main.js")) {
      console.error("sortline: the TypeScript build is missing; run `npm run build` (npm ci runs it too)");
    } else {
      console.error(error);
    }
    process.exitCode = 1;
  });
