import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

import type { Registry } from "prom-client";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";

export const HEALTH_STATUSES = ["ok", "starting", "degraded", "stopping"] as const;
export type HealthStatus = (typeof HEALTH_STATUSES)[number];

/** Body of `GET /healthz`: the status plus details such as last frame age, model and queue depth. */
export interface HealthReport {
  status: HealthStatus;
  [detail: string]: unknown;
}

export type HealthCallback = () => HealthReport | Promise<HealthReport>;

export interface HealthServerOptions {
  /** Address to listen on; defaults to 127.0.0.1 so that only local scrapers reach it. */
  host?: string;
  /** TCP port; 0 picks a free port, which `port` returns after `start()`. */
  port?: number;
  registry: Registry;
  health: HealthCallback;
  logger?: Logger;
}

/** The health server could not listen on its address. */
export class HealthServerError extends SortlineError {}

const ALLOWED_METHODS = "GET, HEAD";

/** HTTP status of `/healthz`: 200 while the agent sorts (ok or degraded), 503 otherwise. */
export function healthHttpStatus(status: HealthStatus): 200 | 503 {
  return status === "ok" || status === "degraded" ? 200 : 503;
}

/** Serves `GET /metrics` (Prometheus text) and `GET /healthz` (JSON) on node:http. */
export class HealthServer {
  private readonly host: string;
  private readonly requestedPort: number;
  private readonly logger: Logger;
  private server: Server | undefined;
  private boundPort: number | undefined;

  constructor(private readonly options: HealthServerOptions) {
    this.host = options.host ?? "127.0.0.1";
    this.requestedPort = options.port ?? 0;
    if (!Number.isInteger(this.requestedPort) || this.requestedPort < 0 || this.requestedPort > 65_535) {
      throw new RangeError(`health server port must be an integer from 0 to 65535, got ${this.requestedPort}`);
    }
    this.logger = options.logger ?? silentLogger;
  }

  /** The bound TCP port while the server listens, otherwise undefined. */
  get port(): number | undefined {
    return this.boundPort;
  }

  /** Starts listening; rejects with `HealthServerError` when the address cannot be bound. */
  async start(): Promise<void> {
    if (this.server !== undefined) {
      return;
    }
    const server = createServer((request, response) => {
      void this.handle(request, response);
    });

    await new Promise<void>((resolve, reject) => {
      const onError = (error: Error): void => {
        reject(
          new HealthServerError(`failed to listen on ${this.host}:${this.requestedPort}: ${describeError(error)}`, {
            cause: error,
          }),
        );
      };
      server.once("error", onError);
      server.listen(this.requestedPort, this.host, () => {
        server.off("error", onError);
        resolve();
      });
    });

    server.on("error", (error) => {
      this.logger.error({ err: error }, "health server error");
    });
    this.server = server;
    this.boundPort = (server.address() as AddressInfo).port;
    this.logger.info({ host: this.host, port: this.boundPort }, "health server listening");
  }

  /** Stops listening and closes open connections, including idle keep-alive ones. */
  async stop(): Promise<void> {
    const server = this.server;
    if (server === undefined) {
      return;
    }
    this.server = undefined;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeAllConnections();
    await closed;
    this.logger.info({ host: this.host, port: this.boundPort }, "health server stopped");
    this.boundPort = undefined;
  }

  private async handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    try {
      const pathname = new URL(request.url ?? "/", "http://localhost").pathname;
      if (pathname !== "/metrics" && pathname !== "/healthz") {
        sendText(response, 404, "not found\n", request.method === "HEAD");
        return;
      }
      if (request.method !== "GET" && request.method !== "HEAD") {
        response.setHeader("Allow", ALLOWED_METHODS);
        sendText(response, 405, "method not allowed\n", false);
        return;
      }
      if (pathname === "/metrics") {
        await this.serveMetrics(request, response);
      } else {
        await this.serveHealth(request, response);
      }
    } catch (error) {
      this.logger.error({ err: error, url: request.url }, "health server request failed");
      if (!response.headersSent) {
        sendJson(response, 500, { error: describeError(error) }, request.method === "HEAD");
      } else {
        response.destroy();
      }
    }
  }

  private async serveMetrics(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const body = await this.options.registry.metrics();
    response.statusCode = 200;
    response.setHeader("Content-Type", this.options.registry.contentType);
    response.setHeader("Cache-Control", "no-store");
    response.setHeader("Content-Length", Buffer.byteLength(body));
    response.end(request.method === "HEAD" ? undefined : body);
  }

  private async serveHealth(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const report = await this.options.health();
    if (!HEALTH_STATUSES.includes(report.status)) {
      throw new TypeError(`health callback returned status '${String(report.status)}'; expected one of ${HEALTH_STATUSES.join(", ")}`);
    }
    sendJson(response, healthHttpStatus(report.status), report, request.method === "HEAD");
  }
}

function sendJson(response: ServerResponse, statusCode: number, body: unknown, headOnly: boolean): void {
  const text = `${JSON.stringify(body)}\n`;
  response.statusCode = statusCode;
  response.setHeader("Content-Type", "application/json; charset=utf-8");
  response.setHeader("Cache-Control", "no-store");
  response.setHeader("Content-Length", Buffer.byteLength(text));
  response.end(headOnly ? undefined : text);
}

function sendText(response: ServerResponse, statusCode: number, text: string, headOnly: boolean): void {
  response.statusCode = statusCode;
  response.setHeader("Content-Type", "text/plain; charset=utf-8");
  response.setHeader("Content-Length", Buffer.byteLength(text));
  response.end(headOnly ? undefined : text);
}
