import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";

import { register as globalRegistry } from "prom-client";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { AgentMetrics, createSystemSampler, type SystemSample } from "../../src/health/metrics.js";

/** Returns the value of the sample line `series` (name plus labels exactly as rendered), or undefined. */
function sampleValue(text: string, series: string): string | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(`${series} `)) {
      return line.slice(series.length + 1);
    }
  }
  return undefined;
}

describe("AgentMetrics", () => {
  let tempDir: string;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-metrics-"));
  });

  afterEach(async () => {
    vi.useRealTimers();
    await rm(tempDir, { recursive: true, force: true });
  });

  it("renders recorded pipeline series", async () => {
    const metrics = new AgentMetrics({ systemSampler: async () => ({}) });
    const camera = metrics.source("cam0");
    camera.frameReceived();
    camera.frameReceived();
    metrics.frameReceived("cam0");
    metrics.frameDropped("cam0", "queue_full");
    camera.cameraRestarted("stalled");
    metrics.decision("pet");
    metrics.decision("pet");
    metrics.decision("hdpe");
    metrics.error("inference");
    metrics.auditWriteFailed();
    metrics.observeLatency("inference", 0.02);
    metrics.observeLatency("total", 0.004);
    metrics.observeLatency("total", Number.NaN);
    metrics.observeLatency("total", -1);
    metrics.observeBatchSize(4);
    metrics.setQueueDepth("frames", 3);
    metrics.setModel({ name: "resnet50-waste", version: "1.2.0", sha256: "ab12", provider: "cuda" });
    metrics.setReady(true);

    const text = await metrics.metricsText();

    expect(sampleValue(text, 'sortline_frames_total{source="cam0"}')).toBe("3");
    expect(sampleValue(text, 'sortline_frames_dropped_total{source="cam0",reason="queue_full"}')).toBe("1");
    expect(sampleValue(text, 'sortline_frames_dropped_total{source="cam0",reason="decode_error"}')).toBe("0");
    expect(sampleValue(text, 'sortline_camera_restarts_total{source="cam0",reason="stalled"}')).toBe("1");
    expect(sampleValue(text, 'sortline_decisions_total{bin="pet"}')).toBe("2");
    expect(sampleValue(text, 'sortline_decisions_total{bin="hdpe"}')).toBe("1");
    expect(sampleValue(text, 'sortline_errors_total{stage="inference"}')).toBe("1");
    expect(sampleValue(text, "sortline_audit_write_failures_total")).toBe("1");
    expect(sampleValue(text, 'sortline_stage_latency_seconds_bucket{le="0.025",stage="inference"}')).toBe("1");
    expect(sampleValue(text, 'sortline_stage_latency_seconds_bucket{le="0.01",stage="inference"}')).toBe("0");
    expect(sampleValue(text, 'sortline_stage_latency_seconds_count{stage="total"}')).toBe("1");
    expect(sampleValue(text, 'sortline_stage_latency_seconds_count{stage="queue"}')).toBe("0");
    expect(sampleValue(text, 'sortline_stage_latency_seconds_bucket{le="5",stage="decode"}')).toBe("0");
    expect(sampleValue(text, 'sortline_batch_size_bucket{le="4"}')).toBe("1");
    expect(sampleValue(text, 'sortline_queue_depth{queue="frames"}')).toBe("3");
    expect(sampleValue(text, 'sortline_model_info{name="resnet50-waste",version="1.2.0",sha256="ab12",provider="cuda"}')).toBe("1");
    expect(sampleValue(text, "sortline_ready")).toBe("1");
    // prom-client 15 writes NaN as "Nan"; Prometheus parses values with Go's strconv.ParseFloat, which ignores case.
    expect(sampleValue(text, "sortline_system_cpu_load_percent")).toMatch(/^nan$/i);
    expect(text).toContain("# TYPE process_cpu_user_seconds_total counter");
    expect(text).toContain("# TYPE nodejs_eventloop_lag_seconds gauge");
  });

  it("replaces the model info series", async () => {
    const metrics = new AgentMetrics({ systemSampler: async () => ({}), defaultMetrics: false });
    metrics.setModel({ name: "a", version: "1", sha256: "00", provider: "cpu" });
    metrics.setModel({ name: "b", version: "2", sha256: "11", provider: "cuda" });

    const text = await metrics.metricsText();

    expect(sampleValue(text, 'sortline_model_info{name="a",version="1",sha256="00",provider="cpu"}')).toBeUndefined();
    expect(sampleValue(text, 'sortline_model_info{name="b",version="2",sha256="11",provider="cuda"}')).toBe("1");
  });

  it("uses a registry of its own", async () => {
    const first = new AgentMetrics({ systemSampler: async () => ({}) });
    const second = new AgentMetrics({ systemSampler: async () => ({}) });
    first.decision("pet");

    expect(globalRegistry.getSingleMetric("sortline_decisions_total")).toBeUndefined();
    expect(sampleValue(await second.metricsText(), 'sortline_decisions_total{bin="pet"}')).toBeUndefined();
  });

  it("samples the host on a timer, never on scrape", async () => {
    vi.useFakeTimers({ toFake: ["setInterval", "clearInterval"] });
    let calls = 0;
    const sampler = async (): Promise<SystemSample> => {
      calls += 1;
      return {
        cpuLoadPercent: 12.5,
        memoryUsedBytes: 1_000 * calls,
        memoryTotalBytes: 8_000,
        cpuTemperature: { zone: "cpu-thermal", celsius: 48.5 },
        diskFreeBytes: 5_000,
      };
    };
    const metrics = new AgentMetrics({ systemSampler: sampler, systemIntervalMs: 15_000, dataDir: "/var/lib/sortline" });

    metrics.start();
    await metrics.sampleSystem();
    expect(calls).toBe(1);

    for (let i = 0; i < 5; i++) {
      await metrics.metricsText();
    }
    expect(calls).toBe(1);

    await vi.advanceTimersByTimeAsync(14_999);
    expect(calls).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    await metrics.sampleSystem();
    const text = await metrics.metricsText();

    expect(calls).toBe(3);
    expect(sampleValue(text, "sortline_system_cpu_load_percent")).toBe("12.5");
    expect(sampleValue(text, "sortline_system_memory_total_bytes")).toBe("8000");
    expect(sampleValue(text, 'sortline_system_cpu_temperature_celsius{zone="cpu-thermal"}')).toBe("48.5");
    expect(sampleValue(text, 'sortline_system_disk_free_bytes{path="/var/lib/sortline"}')).toBe("5000");

    await metrics.stop();
    const callsAtStop = calls;
    await vi.advanceTimersByTimeAsync(60_000);
    expect(calls).toBe(callsAtStop);
  });

  it("marks failed host readings as unknown", async () => {
    let fail = false;
    const metrics = new AgentMetrics({
      defaultMetrics: false,
      dataDir: "/var/lib/sortline",
      systemSampler: async () => {
        if (fail) {
          throw new Error("sampler broke");
        }
        return { memoryUsedBytes: 10, memoryTotalBytes: 20, diskFreeBytes: 30 };
      },
    });

    await metrics.sampleSystem();
    expect(sampleValue(await metrics.metricsText(), "sortline_system_memory_used_bytes")).toBe("10");

    fail = true;
    await metrics.sampleSystem();
    const text = await metrics.metricsText();

    expect(sampleValue(text, "sortline_system_memory_used_bytes")).toMatch(/^nan$/i);
    expect(sampleValue(text, 'sortline_system_disk_free_bytes{path="/var/lib/sortline"}')).toBeUndefined();
  });
});

describe("createSystemSampler", () => {
  let tempDir: string;

  beforeEach(async () => {
    tempDir = await mkdtemp(path.join(tmpdir(), "sortline-sampler-"));
  });

  afterEach(async () => {
    await rm(tempDir, { recursive: true, force: true });
  });

  async function writeZone(index: number, type: string, temp: string): Promise<void> {
    const zone = path.join(tempDir, "thermal", `thermal_zone${index}`);
    await mkdir(zone, { recursive: true });
    await writeFile(path.join(zone, "type"), `${type}\n`);
    await writeFile(path.join(zone, "temp"), `${temp}\n`);
  }

  it("reads memory, disk, CPU load and temperature", async () => {
    await writeZone(0, "AO-therm", "30000");
    await writeZone(1, "CPU-therm", "45500");
    const sampler = createSystemSampler({ dataDir: tempDir, thermalDir: path.join(tempDir, "thermal") });

    const first = await sampler();
    const second = await sampler();

    expect(first.failures).toBeUndefined();
    expect(first.cpuLoadPercent).toBeUndefined();
    expect(first.memoryUsedBytes).toBeGreaterThan(0);
    expect(first.memoryTotalBytes).toBeGreaterThanOrEqual(first.memoryUsedBytes ?? 0);
    expect(first.diskFreeBytes).toBeGreaterThan(0);
    expect(first.cpuTemperature).toEqual({ zone: "CPU-therm", celsius: 45.5 });
    if (second.cpuLoadPercent !== undefined) {
      expect(second.cpuLoadPercent).toBeGreaterThanOrEqual(0);
      expect(second.cpuLoadPercent).toBeLessThanOrEqual(100);
    }
  });

  it("omits temperature without a CPU zone", async () => {
    await writeZone(0, "acpitz", "30000");
    const sampler = createSystemSampler({ thermalDir: path.join(tempDir, "thermal") });

    const sample = await sampler();

    expect(sample.cpuTemperature).toBeUndefined();
    expect(sample.diskFreeBytes).toBeUndefined();
    expect(sample.failures).toBeUndefined();
  });

  it("reports a missing data directory", async () => {
    const sampler = createSystemSampler({ dataDir: path.join(tempDir, "missing"), thermalDir: path.join(tempDir, "none") });

    const sample = await sampler();

    expect(sample.diskFreeBytes).toBeUndefined();
    expect(sample.failures?.disk).toMatch(/ENOENT/);
  });
});
