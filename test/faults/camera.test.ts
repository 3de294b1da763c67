import { readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { writeStandIns, type SampleImage, type StandIns } from "../capture/helpers.js";
import { agentConfig, fetchMetrics, InProcessAgent, makeWorkDir, metricValue, PHOTOS_DIR, readAudit, seconds, sleep, writeConfig } from "./harness.js";
import { faultCase, lostText, scaled } from "./report.js";

const WINDOW_MS = scaled(30_000, 10_000);
const STALL_SECONDS = 2;

interface Mode {
  mode: "stall" | "die" | "garbage";
  injected: string;
  expected: string;
  /** Restart reason that the fault must cause. */
  reason: "stall" | "error";
}

const MODES: Mode[] = [
  {
    mode: "stall",
    injected: "the camera process sends the photos once, then stays alive and silent (first run only)",
    expected: `the watchdog restarts it after ${STALL_SECONDS} s without a frame; decisions resume`,
    reason: "stall",
  },
  {
    mode: "die",
    injected: 'the camera process sends the photos once, prints "sensor timeout" and exits with status 3, on every run',
    expected: "the watchdog restarts it after each exit with backoff; decisions continue between exits",
    reason: "error",
  },
  {
    mode: "garbage",
    injected: "the camera process writes text lines instead of JPEG frames (first run only)",
    expected: `the garbage is discarded, no frame is decided from it; the watchdog restarts the process after ${STALL_SECONDS} s without a frame; decisions resume`,
    reason: "stall",
  },
];

let work: Awaited<ReturnType<typeof makeWorkDir>>;
let standIns: StandIns;

/** Reads the first photo of each class in demo/photos. */
async function demoPhotos(): Promise<SampleImage[]> {
  const photos: SampleImage[] = [];
  for (const label of (await readdir(PHOTOS_DIR)).sort()) {
    const name = (await readdir(path.join(PHOTOS_DIR, label))).filter((file) => file.endsWith(".jpg")).sort()[0];
    if (name) {
      const file = path.join(PHOTOS_DIR, label, name);
      photos.push({ label, file, data: await readFile(file) });
    }
  }
  return photos;
}

describe.skipIf(process.env.SORTLINE_FAULT_SUITE !== "1")("camera faults", () => {
  beforeAll(async () => {
    work = await makeWorkDir("camera");
    standIns = await writeStandIns(work.dir, await demoPhotos());
  });

  afterAll(async () => {
    await work?.remove();
  });

  it.each(MODES)("recovers from camera mode $mode", async ({ mode, injected, expected, reason }) => {
    await faultCase({ case: `6. Camera: ${mode}`, injected: `${injected}; stand-in camera script as a gstreamer source, stallSeconds ${STALL_SECONDS}, observed for ${seconds(WINDOW_MS)}`, expected }, async (row) => {
      // The agent runs the wrapper as gst-launch-1.0; it ignores the pipeline arguments and runs the stand-in camera.
      const wrapper = path.join(work.dir, `gst-${mode}.sh`);
      const state = await standIns.stateDir();
      const frames = standIns.frames.map((frame) => `"${frame}"`).join(" ");
      await writeFile(wrapper, `#!/usr/bin/env bash\nexec "${standIns.camera}" ${mode} "${state}" ${frames}\n`, { mode: 0o755 });
      const source = `cam-${mode}`;
      const config = agentConfig({
        dir: path.join(work.dir, mode),
        sources: [{ type: "gstreamer", name: source, pipeline: ["videotestsrc"], binaryPath: wrapper, stallSeconds: STALL_SECONDS }],
        actuators: [],
        mining: { enabled: false },
      });
      const agent = await InProcessAgent.start(await writeConfig(path.join(work.dir, mode, "agent.yaml"), config));
      try {
        const startedAt = Date.now();
        await sleep(WINDOW_MS);
        const endedAt = Date.now();
        const metrics = await fetchMetrics(agent.agent.healthPort!);
        agent.agent.pipeline!.pause();
        await sleep(1_000);

        const restarts = (restartReason: string): number => metricValue(metrics, "sortline_camera_restarts_total", { source, reason: restartReason });
        const received = metricValue(metrics, "sortline_frames_total", { source });
        const queueDrops = metricValue(metrics, "sortline_frames_dropped_total", { source, reason: "queue_full" });
        const otherDrops = metricValue(metrics, "sortline_frames_dropped_total", { source }) - queueDrops;
        const decided = agent.decisionsBetween(startedAt, endedAt);
        const errors = agent.decisions.filter((record) => record.error !== null).length;
        const firstDecisionMs = (agent.decidedAt[0] ?? endedAt) - startedAt;
        const gap = agent.longestGap(agent.decidedAt[0] ?? startedAt, endedAt);
        const audit = readAudit(agent.agent.agentConfig.audit.path);
        const notAudited = agent.decisions.filter((record) => !audit.frameIds.has(record.frameId)).length;
        const restartLines = agent.logsWith("restarting camera source").length;

        row.observed =
          `restarts: ${restarts("stall")} after a stall, ${restarts("error")} after an exit, ${restarts("start-failed")} failed starts (${restartLines} restart log lines); ` +
          `${received} frames received, ${decided} decided (${errors} with an error); first decision ${seconds(firstDecisionMs)} after the start, longest time without a decision afterwards ${seconds(gap)}`;
        row.lost = lostText({ "decisions made but not audited": notAudited }, [
          `${queueDrops} frames dropped by the drop-oldest queue (the stand-in sent ${(received / (WINDOW_MS / 1000)).toFixed(0)} frames/s on average; inference decided ${(decided / (WINDOW_MS / 1000)).toFixed(0)}/s)`,
          `${otherDrops} frames dropped for other reasons`,
          "frames the camera did not send while stalled or restarting are not counted",
        ]);

        expect(restarts(reason)).toBeGreaterThanOrEqual(1);
        expect(decided).toBeGreaterThan(0);
        expect(errors).toBe(0);
        expect(notAudited).toBe(0);
        // Frames flow again after the fault: a decision in the last third of the window.
        expect(agent.decisionsBetween(endedAt - WINDOW_MS / 3, endedAt)).toBeGreaterThan(0);
      } finally {
        await agent.stop();
      }
    });
  });
});
