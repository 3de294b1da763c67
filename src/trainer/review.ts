/**
 * The labelling web server of the trainer: serves the review page, the example images and a JSON
 * API over a Catalogue, on node:http.
 *
 * Access: with a `token`, every request except `/login` needs `Authorization: Bearer <token>` or the
 * `token` cookie that `GET /login?token=<token>` sets (HttpOnly, SameSite=Strict). Every POST needs a
 * JSON or CSV content type. Browsers send those types cross-site only after a CORS preflight, which
 * this server never grants, so other web sites cannot post labels through an operator's browser.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { readFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

import { describeError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import {
  CatalogueInputError,
  DEFAULT_LIST_LIMIT,
  EXAMPLE_STATUSES,
  ExampleNotFoundError,
  ExampleTooLargeError,
  MAX_LIST_LIMIT,
  UnknownClassError,
  type Catalogue,
  type ExampleRecord,
  type ExampleStatus,
} from "./catalogue.js";
import { CsvParseError } from "./labels-csv.js";
import { REVIEW_PAGE_HTML, REVIEW_PAGE_SCRIPT, REVIEW_PAGE_STYLE } from "./review-page.js";

export interface ReviewServerOptions {
  catalogue: Catalogue;
  /** Address to listen on (default 127.0.0.1). Set a token before listening on other addresses. */
  host?: string;
  /** TCP port; 0 picks a free port, which `port` returns after `start()`. */
  port?: number;
  /** Shared secret that every request must present. Without it the server accepts every request. */
  token?: string;
  logger?: Logger;
  /** Largest JSON request body (default 16 KiB). */
  maxJsonBytes?: number;
  /** Largest labels CSV body of `POST /api/labels/import` (default 4 MiB). */
  maxCsvBytes?: number;
  /** More JSON routes, served with the same token check and error replies, e.g. the trainer's `/api/fleet`. */
  routes?: readonly ApiRoute[];
}

/** A JSON route served next to the review API. */
export interface ApiRoute {
  method: "GET" | "POST";
  path: string;
  /** Returns the HTTP status and JSON body. `body` is the JSON request body of a POST, {} for a GET. */
  handle(body: Record<string, unknown>, url: URL): ApiReply | Promise<ApiReply>;
}

export interface ApiReply {
  status: number;
  body: unknown;
}

/** The review server could not listen on its address. */
export class ReviewServerError extends SortlineError {}

/** An example as the API returns it: the catalogue record without the capture-time truth. */
export type PublicExample = Omit<ExampleRecord, "truth"> & { imageUrl: string };

/** A request that fails with an HTTP status and a message for the `error` field. */
class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const DEFAULT_MAX_JSON_BYTES = 16 * 1024;
const DEFAULT_MAX_CSV_BYTES = 4 * 1024 * 1024;
const DEFAULT_REVIEWER = "review-page";
const DEFAULT_IMPORTER = "csv-import";
const TOKEN_PATTERN = /^[\x21-\x7e]+$/;
const TOKEN_FORBIDDEN = /[;,"\\]/;
const SHA256_PATTERN = "[0-9a-f]{64}";
const EXAMPLE_ROUTE = new RegExp(`^/api/examples/(${SHA256_PATTERN})$`);
const EXAMPLE_ACTION_ROUTE = new RegExp(`^/api/examples/(${SHA256_PATTERN})/(label|discard|unlabel)$`);
const IMAGE_ROUTE = new RegExp(`^/examples/(${SHA256_PATTERN})\\.jpg$`);
const CONTENT_SECURITY_POLICY =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const STATIC_FILES: Record<string, { type: string; body: string }> = {
  "/": { type: "text/html; charset=utf-8", body: REVIEW_PAGE_HTML },
  "/review.js": { type: "text/javascript; charset=utf-8", body: REVIEW_PAGE_SCRIPT },
  "/review.css": { type: "text/css; charset=utf-8", body: REVIEW_PAGE_STYLE },
};

function digest(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

/** Returns the example without `truth`, because reviewers must not see a stored answer. */
export function toPublicExample(record: ExampleRecord): PublicExample {
  const { truth: _truth, ...visible } = record;
  return { ...visible, imageUrl: `/examples/${record.sha256}.jpg` };
}

function readCookie(request: IncomingMessage, name: string): string | undefined {
  for (const part of (request.headers.cookie ?? "").split(";")) {
    const separator = part.indexOf("=");
    if (separator > 0 && part.slice(0, separator).trim() === name) {
      return part.slice(separator + 1).trim();
    }
  }
  return undefined;
}

function mediaType(request: IncomingMessage): string {
  return (request.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
}

/** Reads the request body, raising HttpError 413 as soon as it exceeds `maxBytes`. */
async function readBody(request: IncomingMessage, maxBytes: number): Promise<Buffer> {
  const declared = Number(request.headers["content-length"] ?? 0);
  if (declared > maxBytes) {
    request.resume();
    throw new HttpError(413, `request body of ${declared} bytes is larger than the limit of ${maxBytes} bytes`);
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of request as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBytes) {
      request.resume();
      throw new HttpError(413, `request body is larger than the limit of ${maxBytes} bytes`);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function parseWholeNumber(name: string, value: string | null, fallback: number, min: number, max: number): number {
  if (value === null || value === "") {
    return fallback;
  }
  const number = /^\d{1,9}$/.test(value) ? Number(value) : Number.NaN;
  if (!(number >= min && number <= max)) {
    throw new HttpError(400, `invalid ${name} '${value}'; expected a whole number from ${min} to ${max}`);
  }
  return number;
}

function optionalReviewer(value: unknown, fallback: string): string {
  if (value === undefined || value === null || value === "") {
    return fallback;
  }
  if (typeof value !== "string" || value.length > 64) {
    throw new HttpError(400, `invalid reviewer name ${JSON.stringify(value)}; expected a string of at most 64 characters`);
  }
  return value;
}

/** Parses the request target. Only the path and query are used, so any host in it is ignored. */
function parseRequestUrl(request: IncomingMessage): URL {
  const target = request.url ?? "/";
  try {
    return new URL(target.startsWith("/") ? `http://localhost${target}` : target);
  } catch {
    throw new HttpError(400, "invalid request target");
  }
}

function sendJson(response: ServerResponse, status: number, body: unknown): void {
  const text = `${JSON.stringify(body)}\n`;
  response.statusCode = status;
  response.setHeader("Content-Type", "application/json; charset=utf-8");
  response.setHeader("Cache-Control", "no-store");
  response.setHeader("Content-Length", Buffer.byteLength(text));
  response.end(text);
}

/** Maps an error to the HTTP status and JSON body of its reply. */
function describeFailure(error: unknown): { status: number; body: Record<string, unknown>; headers: Record<string, string> } {
  if (error instanceof HttpError) {
    return { status: error.status, body: { error: error.message }, headers: error.headers };
  }
  if (error instanceof ExampleNotFoundError) {
    return { status: 404, body: { error: error.message }, headers: {} };
  }
  if (error instanceof ExampleTooLargeError) {
    return { status: 413, body: { error: error.message }, headers: {} };
  }
  if (error instanceof UnknownClassError) {
    return { status: 400, body: { error: error.message, known: error.known }, headers: {} };
  }
  if (error instanceof CatalogueInputError) {
    return { status: 400, body: { error: error.message }, headers: {} };
  }
  if (error instanceof CsvParseError) {
    return { status: 400, body: { error: `invalid labels CSV: ${error.message}`, line: error.line }, headers: {} };
  }
  return { status: 500, body: { error: `internal error: ${describeError(error)}` }, headers: {} };
}

/** Serves the review page and its JSON API over a Catalogue. */
export class ReviewServer {
  private readonly catalogue: Catalogue;
  private readonly host: string;
  private readonly requestedPort: number;
  private readonly tokenDigest: Buffer | undefined;
  private readonly logger: Logger;
  private readonly maxJsonBytes: number;
  private readonly maxCsvBytes: number;
  private readonly routes: readonly ApiRoute[];
  private server: Server | undefined;
  private boundPort: number | undefined;

  constructor(options: ReviewServerOptions) {
    this.catalogue = options.catalogue;
    this.host = options.host ?? "127.0.0.1";
    this.requestedPort = options.port ?? 0;
    if (!Number.isInteger(this.requestedPort) || this.requestedPort < 0 || this.requestedPort > 65_535) {
      throw new RangeError(`review server port must be an integer from 0 to 65535, got ${this.requestedPort}`);
    }
    if (options.token !== undefined && (!TOKEN_PATTERN.test(options.token) || TOKEN_FORBIDDEN.test(options.token))) {
      throw new RangeError("review server token is invalid; use printable ASCII without spaces, ';', ',', '\"' or '\\'");
    }
    this.tokenDigest = options.token === undefined ? undefined : digest(options.token);
    this.logger = options.logger ?? silentLogger;
    this.maxJsonBytes = options.maxJsonBytes ?? DEFAULT_MAX_JSON_BYTES;
    this.maxCsvBytes = options.maxCsvBytes ?? DEFAULT_MAX_CSV_BYTES;
    this.routes = options.routes ?? [];
  }

  /** The bound TCP port while the server listens, otherwise undefined. */
  get port(): number | undefined {
    return this.boundPort;
  }

  /** Starts listening; rejects with ReviewServerError when the address cannot be bound. */
  async start(): Promise<void> {
    if (this.server !== undefined) {
      return;
    }
    const server = createServer((request, response) => {
      void this.handle(request, response);
    });
    await new Promise<void>((resolve, reject) => {
      const onError = (error: Error): void => {
        reject(new ReviewServerError(`failed to listen on ${this.host}:${this.requestedPort}: ${describeError(error)}`, { cause: error }));
      };
      server.once("error", onError);
      server.listen(this.requestedPort, this.host, () => {
        server.off("error", onError);
        resolve();
      });
    });
    server.on("error", (error) => {
      this.logger.error({ err: error }, "review server error");
    });
    this.server = server;
    this.boundPort = (server.address() as AddressInfo).port;
    this.logger.info({ host: this.host, port: this.boundPort, token: this.tokenDigest !== undefined }, "review server listening");
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
    this.logger.info({ host: this.host, port: this.boundPort }, "review server stopped");
    this.boundPort = undefined;
  }

  private async handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    let url = new URL("http://localhost/");
    try {
      response.setHeader("X-Content-Type-Options", "nosniff");
      url = parseRequestUrl(request);
      if (url.pathname === "/login") {
        this.login(request, response, url);
        return;
      }
      this.checkAuthorized(request);
      await this.route(request, response, url);
    } catch (error) {
      const failure = describeFailure(error);
      // The path is logged without the query, which may contain the token.
      const fields = { method: request.method, path: url.pathname, status: failure.status, error: failure.body.error };
      if (failure.status >= 500) {
        this.logger.error({ ...fields, err: error }, "review request failed");
      } else {
        this.logger.warn(fields, "review request failed");
      }
      if (response.headersSent) {
        response.destroy();
        return;
      }
      for (const [name, value] of Object.entries(failure.headers)) {
        response.setHeader(name, value);
      }
      sendJson(response, failure.status, failure.body);
    }
  }

  /** Compares SHA-256 digests with timingSafeEqual, so the time taken does not depend on the token. */
  private tokenMatches(candidate: string | undefined): boolean {
    if (this.tokenDigest === undefined) {
      return true;
    }
    return candidate !== undefined && timingSafeEqual(digest(candidate), this.tokenDigest);
  }

  private checkAuthorized(request: IncomingMessage): void {
    if (this.tokenDigest === undefined) {
      return;
    }
    const header = request.headers.authorization;
    const bearer = header?.startsWith("Bearer ") ? header.slice("Bearer ".length).trim() : undefined;
    if (this.tokenMatches(bearer) || this.tokenMatches(readCookie(request, "token"))) {
      return;
    }
    throw new HttpError(401, "missing or invalid token; open /login?token=<token> once or send 'Authorization: Bearer <token>'", {
      "WWW-Authenticate": 'Bearer realm="sortline-review"',
    });
  }

  /** Sets the token cookie and redirects to the page, which removes the token from the address bar. */
  private login(request: IncomingMessage, response: ServerResponse, url: URL): void {
    if (request.method !== "GET") {
      throw new HttpError(405, `method ${request.method} not allowed on /login; use GET`, { Allow: "GET" });
    }
    if (this.tokenDigest !== undefined) {
      const token = url.searchParams.get("token") ?? undefined;
      if (!this.tokenMatches(token)) {
        throw new HttpError(401, "invalid token in /login?token=");
      }
      response.setHeader("Set-Cookie", `token=${token}; Path=/; HttpOnly; SameSite=Strict`);
    }
    response.statusCode = 303;
    response.setHeader("Location", "/");
    response.setHeader("Cache-Control", "no-store");
    response.end();
  }

  private async route(request: IncomingMessage, response: ServerResponse, url: URL): Promise<void> {
    const method = request.method ?? "GET";
    const path = url.pathname;
    const allow = (allowed: string): void => {
      if (!allowed.split(", ").includes(method)) {
        throw new HttpError(405, `method ${method} not allowed on ${path}; use ${allowed}`, { Allow: allowed });
      }
    };

    const file = STATIC_FILES[path];
    if (file !== undefined) {
      allow("GET");
      this.serveStatic(response, file.type, file.body);
      return;
    }
    if (path === "/favicon.ico") {
      // Browsers request it for every page; 204 keeps a 404 out of the console.
      allow("GET");
      response.statusCode = 204;
      response.setHeader("Cache-Control", "max-age=86400");
      response.end();
      return;
    }
    const image = IMAGE_ROUTE.exec(path);
    if (image !== null) {
      allow("GET");
      await this.serveImage(request, response, image[1]!);
      return;
    }
    if (path === "/api/examples") {
      allow("GET");
      sendJson(response, 200, this.listExamples(url));
      return;
    }
    const example = EXAMPLE_ROUTE.exec(path);
    if (example !== null) {
      allow("GET");
      sendJson(response, 200, toPublicExample(this.getExample(example[1]!)));
      return;
    }
    const action = EXAMPLE_ACTION_ROUTE.exec(path);
    if (action !== null) {
      allow("POST");
      const body = await this.readJson(request);
      sendJson(response, 200, toPublicExample(this.reviewExample(action[1]!, action[2]!, body)));
      return;
    }
    if (path === "/api/classes") {
      allow("GET, POST");
      if (method === "GET") {
        sendJson(response, 200, { classes: this.catalogue.classes() });
        return;
      }
      const body = await this.readJson(request);
      if (typeof body.name !== "string") {
        throw new HttpError(400, "the body needs a class name: {\"name\": \"...\"}");
      }
      const added = this.catalogue.addClass(body.name);
      sendJson(response, added ? 201 : 200, { name: body.name, added, classes: this.catalogue.classes() });
      return;
    }
    if (path === "/api/labels/import") {
      allow("POST");
      await this.importLabels(request, response, url);
      return;
    }
    if (path === "/api/stats") {
      allow("GET");
      sendJson(response, 200, this.catalogue.stats());
      return;
    }
    const extra = this.routes.filter((route) => route.path === path);
    if (extra.length > 0) {
      allow(extra.map((route) => route.method).join(", "));
      const matched = extra.find((route) => route.method === method)!;
      const body = method === "POST" ? await this.readJson(request) : {};
      const reply = await matched.handle(body, url);
      sendJson(response, reply.status, reply.body);
      return;
    }
    throw new HttpError(404, `no route for ${path}`);
  }

  private serveStatic(response: ServerResponse, type: string, body: string): void {
    response.statusCode = 200;
    response.setHeader("Content-Type", type);
    response.setHeader("Cache-Control", "no-cache");
    response.setHeader("Content-Security-Policy", CONTENT_SECURITY_POLICY);
    response.setHeader("Referrer-Policy", "no-referrer");
    response.setHeader("Content-Length", Buffer.byteLength(body));
    response.end(body);
  }

  /** Serves a catalogued image. Only sha256 names reach this point, so the path cannot leave the examples folder. */
  private async serveImage(request: IncomingMessage, response: ServerResponse, sha256: string): Promise<void> {
    this.getExample(sha256);
    const etag = `"${sha256}"`;
    response.setHeader("ETag", etag);
    response.setHeader("Cache-Control", "private, max-age=31536000, immutable");
    if (request.headers["if-none-match"] === etag) {
      response.statusCode = 304;
      response.end();
      return;
    }
    let bytes: Buffer;
    try {
      bytes = await readFile(this.catalogue.imagePath(sha256));
    } catch (error) {
      throw new HttpError(404, `image file of example ${sha256} cannot be read: ${describeError(error)}`);
    }
    response.statusCode = 200;
    response.setHeader("Content-Type", "image/jpeg");
    response.setHeader("Content-Length", bytes.length);
    response.end(bytes);
  }

  private listExamples(url: URL): { examples: PublicExample[]; total: number } {
    const status = url.searchParams.get("status") || "pending";
    if (status !== "all" && !(EXAMPLE_STATUSES as readonly string[]).includes(status)) {
      throw new HttpError(400, `invalid status '${status}'; expected all, ${EXAMPLE_STATUSES.join(", ")}`);
    }
    const order = url.searchParams.get("order") || "priority";
    if (order !== "priority" && order !== "received" && order !== "typical") {
      throw new HttpError(400, `invalid order '${order}'; expected priority, received or typical`);
    }
    const limit = parseWholeNumber("limit", url.searchParams.get("limit"), DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT);
    const offset = parseWholeNumber("offset", url.searchParams.get("offset"), 0, 0, 999_999_999);
    const typedStatus = status as ExampleStatus | "all";
    const examples = this.catalogue.list({ status: typedStatus, limit, offset, order });
    return { examples: examples.map(toPublicExample), total: this.catalogue.count(typedStatus) };
  }

  private getExample(sha256: string): ExampleRecord {
    const record = this.catalogue.get(sha256);
    if (record === undefined) {
      throw new ExampleNotFoundError(sha256);
    }
    return record;
  }

  private reviewExample(sha256: string, action: string, body: Record<string, unknown>): ExampleRecord {
    const by = optionalReviewer(body.by, DEFAULT_REVIEWER);
    if (action === "label") {
      if (typeof body.label !== "string" || body.label === "") {
        throw new HttpError(400, "the body needs a label: {\"label\": \"...\"}");
      }
      return this.catalogue.label(sha256, body.label, by);
    }
    if (action === "discard") {
      return this.catalogue.discard(sha256, by);
    }
    return this.catalogue.unlabel(sha256);
  }

  /** Reads a JSON object body. An empty body reads as {}. Raises HttpError 415 for other content types. */
  private async readJson(request: IncomingMessage): Promise<Record<string, unknown>> {
    if (mediaType(request) !== "application/json") {
      request.resume();
      throw new HttpError(415, `content type '${request.headers["content-type"] ?? ""}' is not supported; send application/json`);
    }
    const text = (await readBody(request, this.maxJsonBytes)).toString("utf8");
    if (text.trim() === "") {
      return {};
    }
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw new HttpError(400, `invalid JSON body: ${describeError(error)}`);
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new HttpError(400, "the JSON body must be an object");
    }
    return value as Record<string, unknown>;
  }

  private async importLabels(request: IncomingMessage, response: ServerResponse, url: URL): Promise<void> {
    if (mediaType(request) !== "text/csv") {
      request.resume();
      throw new HttpError(415, `content type '${request.headers["content-type"] ?? ""}' is not supported; send text/csv`);
    }
    const flag = url.searchParams.get("addClasses");
    const addClasses = flag === "1" || flag === "true";
    const by = optionalReviewer(url.searchParams.get("by"), DEFAULT_IMPORTER);
    const text = (await readBody(request, this.maxCsvBytes)).toString("utf8");
    const result = this.catalogue.importLabelsCsv(text, by, { addClasses });
    sendJson(response, 200, result);
  }
}
