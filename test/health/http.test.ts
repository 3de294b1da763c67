import { createServer } from "node:net";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { HealthServer, HealthServerError, type HealthReport } from "../../src/health/http.js";
import { AgentMetrics } from "../../src/health/metrics.js";

describe("HealthServer", () => {
  let metrics: AgentMetrics;
  let report: HealthReport | (() => never);
  let server: HealthServer;
  let baseUrl: string;

  beforeEach(async () => {
    metrics = new AgentMetrics({ systemSampler: async () => ({}) });
    report = { status: "ok" };
    server = new HealthServer({
      host: "127.0.0.1",
      port: 0,
      registry: metrics.registry,
      health: () => (typeof report === "function" ? report() : report),
    });
    await server.start();
    baseUrl = `http://127.0.0.1:${server.port}`;
  });

  afterEach(async () => {
    await server.stop();
  });

  it("exposes the bound port", () => {
    expect(server.port).toBeGreaterThan(0);
  });

  it("serves Prometheus text on /metrics", async () => {
    metrics.decision("pet");

    const response = await fetch(`${baseUrl}/metrics`);
    const body = await response.text();

    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toBe(metrics.contentType);
    expect(body).toContain('sortline_decisions_total{bin="pet"} 1');
    expect(body).toContain("process_resident_memory_bytes");
  });

  it.each([
    ["ok", 200],
    ["degraded", 200],
    ["starting", 503],
    ["stopping", 503],
  ] as const)("answers /healthz %s with %i", async (status, httpStatus) => {
    report = { status, lastFrameAgeSeconds: 0.4, model: "resnet50-waste", provider: "cuda", queueDepth: 2 };

    const response = await fetch(`${baseUrl}/healthz`);
    const body: unknown = await response.json();

    expect(response.status).toBe(httpStatus);
    expect(response.headers.get("content-type")).toBe("application/json; charset=utf-8");
    expect(response.headers.get("cache-control")).toBe("no-store");
    expect(body).toEqual(report);
  });

  it("answers HEAD without a body", async () => {
    const response = await fetch(`${baseUrl}/healthz`, { method: "HEAD" });

    expect(response.status).toBe(200);
    expect(await response.text()).toBe("");
  });

  it("answers unknown paths with 404", async () => {
    const response = await fetch(`${baseUrl}/metrics/extra`);

    expect(response.status).toBe(404);
  });

  it("rejects other methods with 405", async () => {
    const response = await fetch(`${baseUrl}/metrics`, { method: "POST", body: "x" });

    expect(response.status).toBe(405);
    expect(response.headers.get("allow")).toBe("GET, HEAD");
  });

  it("answers 500 when the health callback throws", async () => {
    report = () => {
      throw new Error("audit store closed");
    };

    const response = await fetch(`${baseUrl}/healthz`);
    const body = (await response.json()) as { error: string };

    expect(response.status).toBe(500);
    expect(body.error).toBe("audit store closed");
  });

  it("answers 500 for an unknown status", async () => {
    report = { status: "fine" as HealthReport["status"] };

    const response = await fetch(`${baseUrl}/healthz`);

    expect(response.status).toBe(500);
  });

  it("closes the port on stop", async () => {
    await fetch(`${baseUrl}/healthz`);

    await server.stop();

    expect(server.port).toBeUndefined();
    await expect(fetch(`${baseUrl}/healthz`)).rejects.toThrow();
  });
});

describe("HealthServer start", () => {
  it("rejects a port in use", async () => {
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", resolve));
    const address = blocker.address();
    const port = typeof address === "object" && address !== null ? address.port : 0;
    const server = new HealthServer({
      port,
      registry: new AgentMetrics({ systemSampler: async () => ({}), defaultMetrics: false }).registry,
      health: () => ({ status: "ok" }),
    });

    try {
      await expect(server.start()).rejects.toThrow(HealthServerError);
      await expect(server.start()).rejects.toThrow(/EADDRINUSE/);
    } finally {
      await new Promise<void>((resolve) => blocker.close(() => resolve()));
    }
  });

  it("rejects an invalid port", () => {
    const registry = new AgentMetrics({ systemSampler: async () => ({}), defaultMetrics: false }).registry;

    expect(() => new HealthServer({ port: 70_000, registry, health: () => ({ status: "ok" }) })).toThrow(RangeError);
  });
});
