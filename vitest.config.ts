import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // The fault-injection suite has its own configuration and scale (npm run test:faults).
    exclude: ["test/faults/**", "**/node_modules/**"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Tests load ResNet-50 sessions and spawn processes; two workers fit a 2-core machine.
    maxWorkers: 2,
    pool: "forks",
  },
});
