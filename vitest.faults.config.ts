import { defineConfig } from "vitest/config";

/**
 * The fault-injection suite: `npx vitest run --config vitest.faults.config.ts`. The cases start
 * brokers, agents and child processes and measure recovery, so they run one file at a time.
 * SORTLINE_FAULT_SCALE (default 1) scales their durations and iteration counts.
 */
export default defineConfig({
  test: {
    include: ["test/faults/**/*.test.ts"],
    globalSetup: ["test/faults/global-setup.ts"],
    env: { SORTLINE_FAULT_SUITE: "1" },
    fileParallelism: false,
    maxWorkers: 1,
    pool: "forks",
    testTimeout: 30 * 60_000,
    hookTimeout: 5 * 60_000,
  },
});
