import { request as httpRequest } from "node:http";

import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { Catalogue } from "../../src/trainer/catalogue.js";
import { ReviewServer } from "../../src/trainer/review.js";
import { BASE_CLASSES, makeMeta, makeTempDir, readPhotos } from "./helpers.js";

const TOKEN = "s3cret-token_for.tests";
const glass = readPhotos("glass");
const metal = readPhotos("metal");

interface LogLine {
  level: number;
  msg: string;
  [field: string]: unknown;
}

/** Starts a ReviewServer over a fresh catalogue with three examples and captures its log lines. */
async function startServer(temp: { dir: string }, token?: string) {
  const catalogue = Catalogue.open(temp.dir, { baseClasses: BASE_CLASSES });
  const shas = [
    catalogue.add(glass[0]!, makeMeta("f-1", { priority: 0.2, truth: "glass" })).sha256,
    catalogue.add(glass[1]!, makeMeta("f-2", { priority: 0.9, truth: "glass" })).sha256,
    catalogue.add(metal[0]!, makeMeta("f-3", { priority: 0.5 })).sha256,
  ];
  const logs: LogLine[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => logs.push(JSON.parse(line) as LogLine) });
  const server = new ReviewServer({ catalogue, port: 0, token, logger, maxJsonBytes: 1024, maxCsvBytes: 4096 });
  await server.start();
  return { catalogue, shas, logs, server, baseUrl: `http://127.0.0.1:${server.port}` };
}

function postJson(url: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(url, { method: "POST", headers: { "Content-Type": "application/json", ...headers }, body: JSON.stringify(body) });
}

describe("ReviewServer", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let context: Awaited<ReturnType<typeof startServer>>;

  afterEach(async () => {
    await context.server.stop();
    context.catalogue.close();
    temp.remove();
  });

  describe("without a token", () => {
    beforeEach(async () => {
      temp = makeTempDir("review");
      context = await startServer(temp);
    });

    it("serves the page, script and style", async () => {
      for (const [path, type] of [
        ["/", "text/html; charset=utf-8"],
        ["/review.js", "text/javascript; charset=utf-8"],
        ["/review.css", "text/css; charset=utf-8"],
      ]) {
        const response = await fetch(`${context.baseUrl}${path}`);
        await response.text();

        expect(response.status, path).toBe(200);
        expect(response.headers.get("content-type"), path).toBe(type);
        expect(response.headers.get("content-security-policy"), path).toContain("default-src 'none'");
        expect(response.headers.get("x-content-type-options"), path).toBe("nosniff");
      }
    });

    it("lists pending examples by priority without the truth", async () => {
      const response = await fetch(`${context.baseUrl}/api/examples`);
      const body = (await response.json()) as { examples: Record<string, unknown>[]; total: number };

      expect(response.status).toBe(200);
      expect(body.total).toBe(3);
      expect(body.examples.map((example) => example.sha256)).toEqual([context.shas[1], context.shas[2], context.shas[0]]);
      expect(body.examples[0]).not.toHaveProperty("truth");
      expect(body.examples[0]!.imageUrl).toBe(`/examples/${context.shas[1]}.jpg`);
    });

    it("pages and filters the list", async () => {
      context.catalogue.label(context.shas[0]!, "glass", "ana");

      const page = (await (await fetch(`${context.baseUrl}/api/examples?status=pending&limit=1&offset=1`)).json()) as {
        examples: { sha256: string }[];
        total: number;
      };
      const labelled = (await (await fetch(`${context.baseUrl}/api/examples?status=labelled&order=received`)).json()) as {
        examples: { sha256: string }[];
        total: number;
      };

      expect(page.total).toBe(2);
      expect(page.examples.map((example) => example.sha256)).toEqual([context.shas[2]]);
      expect(labelled.examples.map((example) => example.sha256)).toEqual([context.shas[0]]);
    });

    it.each([
      ["status=done", "invalid status 'done'"],
      ["limit=0", "invalid limit '0'"],
      ["limit=501", "invalid limit '501'"],
      ["offset=-1", "invalid offset '-1'"],
      ["order=random", "invalid order 'random'"],
    ])("rejects the query %s", async (query, message) => {
      const response = await fetch(`${context.baseUrl}/api/examples?${query}`);
      const body = (await response.json()) as { error: string };

      expect(response.status).toBe(400);
      expect(body.error).toContain(message);
    });

    it("returns one example without the truth", async () => {
      const response = await fetch(`${context.baseUrl}/api/examples/${context.shas[0]}`);
      const body = (await response.json()) as Record<string, unknown>;

      expect(response.status).toBe(200);
      expect(body).toMatchObject({ sha256: context.shas[0], frameId: "f-1", status: "pending" });
      expect(body).not.toHaveProperty("truth");
    });

    it("answers 404 for unknown examples and routes", async () => {
      const unknown = await fetch(`${context.baseUrl}/api/examples/${"0".repeat(64)}`);
      const malformed = await fetch(`${context.baseUrl}/api/examples/xyz`);

      expect(unknown.status).toBe(404);
      expect(((await unknown.json()) as { error: string }).error).toBe(`example ${"0".repeat(64)} not found`);
      expect(malformed.status).toBe(404);
      expect(((await malformed.json()) as { error: string }).error).toBe("no route for /api/examples/xyz");
    });

    it("serves image bytes with an ETag", async () => {
      const url = `${context.baseUrl}/examples/${context.shas[0]}.jpg`;
      const response = await fetch(url);
      const bytes = Buffer.from(await response.arrayBuffer());

      expect(response.status).toBe(200);
      expect(response.headers.get("content-type")).toBe("image/jpeg");
      expect(bytes.equals(glass[0]!)).toBe(true);

      const cached = await fetch(url, { headers: { "If-None-Match": response.headers.get("etag")! } });
      expect(cached.status).toBe(304);
    });

    it.each([
      "/examples/../catalogue.db",
      "/examples/%2e%2e/catalogue.db",
      "/examples/..%2F..%2Fetc%2Fpasswd.jpg",
      `/examples/${"0".repeat(64)}.jpg`,
      `/examples/${"A".repeat(64)}.jpg`,
      "/catalogue.db",
    ])("answers 404 for the image path %s", async (path) => {
      const response = await fetch(`${context.baseUrl}${path}`);
      const body = (await response.json()) as { error: string };

      expect(response.status).toBe(404);
      expect(body.error).not.toContain("SQLite");
    });

    it.each(["/examples/../catalogue.db", `/examples/../examples/${"0".repeat(64)}.jpg`, "/examples/%2e%2e%2fcatalogue.db", "//examples/x.jpg"])(
      "answers 404 for the raw path %s",
      async (rawPath) => {
        // node:http sends the path as given, while fetch would normalize the dot segments first.
        const status = await new Promise<number>((resolve, reject) => {
          const request = httpRequest({ host: "127.0.0.1", port: context.server.port, path: rawPath }, (response) => {
            response.resume();
            resolve(response.statusCode ?? 0);
          });
          request.on("error", reject);
          request.end();
        });

        expect(status).toBe(404);
      },
    );

    it("labels, discards and unlabels", async () => {
      const [a, b] = context.shas;

      const labelled = await postJson(`${context.baseUrl}/api/examples/${a}/label`, { label: "glass", by: "ana" });
      const discarded = await postJson(`${context.baseUrl}/api/examples/${b}/discard`, {});

      expect(labelled.status).toBe(200);
      expect(await labelled.json()).toMatchObject({ sha256: a, status: "labelled", label: "glass", reviewedBy: "ana" });
      expect(discarded.status).toBe(200);
      expect(context.catalogue.get(b!)).toMatchObject({ status: "discarded", reviewedBy: "review-page" });

      const unlabelled = await fetch(`${context.baseUrl}/api/examples/${a}/unlabel`, { method: "POST", headers: { "Content-Type": "application/json" } });
      expect(unlabelled.status).toBe(200);
      expect(context.catalogue.get(a!)!.status).toBe("pending");
    });

    it("rejects an unknown class with the known ones", async () => {
      const response = await postJson(`${context.baseUrl}/api/examples/${context.shas[0]}/label`, { label: "styrofoam" });
      const body = (await response.json()) as { error: string; known: string[] };

      expect(response.status).toBe(400);
      expect(body.error).toContain("unknown class 'styrofoam'");
      expect(body.known).toEqual(BASE_CLASSES);
      expect(context.catalogue.get(context.shas[0]!)!.status).toBe("pending");
    });

    it.each([
      ["a missing label", JSON.stringify({}), "application/json", 400, "the body needs a label"],
      ["invalid JSON", "{label:", "application/json", 400, "invalid JSON body"],
      ["a JSON array", "[]", "application/json", 400, "must be an object"],
      ["a form body", "label=glass", "application/x-www-form-urlencoded", 415, "send application/json"],
      ["a body over the limit", JSON.stringify({ label: "glass", pad: "x".repeat(2000) }), "application/json", 413, "larger than the limit of 1024 bytes"],
    ])("rejects a label request with %s", async (_name, body, type, status, message) => {
      const response = await fetch(`${context.baseUrl}/api/examples/${context.shas[0]}/label`, { method: "POST", headers: { "Content-Type": type }, body });
      const reply = (await response.json()) as { error: string };

      expect(response.status).toBe(status);
      expect(reply.error).toContain(message);
      expect(context.catalogue.get(context.shas[0]!)!.status).toBe("pending");
    });

    it("answers 404 when labelling an unknown example", async () => {
      const response = await postJson(`${context.baseUrl}/api/examples/${"0".repeat(64)}/label`, { label: "glass" });

      expect(response.status).toBe(404);
    });

    it("answers 405 with Allow for a wrong method", async () => {
      const get = await fetch(`${context.baseUrl}/api/examples/${context.shas[0]}/label`);
      const post = await fetch(`${context.baseUrl}/api/stats`, { method: "POST" });

      expect(get.status).toBe(405);
      expect(get.headers.get("allow")).toBe("POST");
      expect(post.status).toBe(405);
      expect(post.headers.get("allow")).toBe("GET");
    });

    it("lists and adds classes", async () => {
      const created = await postJson(`${context.baseUrl}/api/classes`, { name: "styrofoam" });
      const again = await postJson(`${context.baseUrl}/api/classes`, { name: "styrofoam" });
      const invalid = await postJson(`${context.baseUrl}/api/classes`, { name: "Bad Name" });
      const listed = (await (await fetch(`${context.baseUrl}/api/classes`)).json()) as { classes: string[] };

      expect(created.status).toBe(201);
      expect(await created.json()).toMatchObject({ name: "styrofoam", added: true });
      expect(again.status).toBe(200);
      expect(invalid.status).toBe(400);
      expect(((await invalid.json()) as { error: string }).error).toContain("invalid class name 'Bad Name'");
      expect(listed.classes).toEqual([...BASE_CLASSES, "styrofoam"]);
    });

    it("imports a labels CSV", async () => {
      const text = `sha256,label\r\n${context.shas[0]},glass\r\n${context.shas[2]},styrofoam\r\n${"0".repeat(64)},metal\r\n`;

      const strict = await fetch(`${context.baseUrl}/api/labels/import?by=sheet`, { method: "POST", headers: { "Content-Type": "text/csv" }, body: text });
      const strictBody = (await strict.json()) as { applied: number; unknownExamples: string[]; errors: { line: number }[] };

      expect(strict.status).toBe(200);
      expect(strictBody.applied).toBe(1);
      expect(strictBody.unknownExamples).toEqual(["0".repeat(64)]);
      expect(strictBody.errors.map((error) => error.line)).toEqual([3]);
      expect(context.catalogue.get(context.shas[0]!)).toMatchObject({ label: "glass", reviewedBy: "sheet" });

      const lenient = await fetch(`${context.baseUrl}/api/labels/import?addClasses=1`, {
        method: "POST",
        headers: { "Content-Type": "text/csv; charset=utf-8" },
        body: text,
      });
      expect(((await lenient.json()) as { addedClasses: string[] }).addedClasses).toEqual(["styrofoam"]);
      expect(context.catalogue.get(context.shas[2]!)).toMatchObject({ label: "styrofoam", reviewedBy: "csv-import" });
    });

    it.each([
      ["a JSON body", "application/json", "sha256,label\n", 415, "send text/csv"],
      ["no header", "text/csv", `${"a".repeat(64)},glass\n`, 400, "invalid labels CSV: line 1"],
      ["an open quote", "text/csv", 'sha256,label\n"abc', 400, "no closing quote"],
      ["a body over the limit", "text/csv", `sha256,label\n${"x".repeat(5000)}`, 413, "larger than the limit of 4096 bytes"],
    ])("rejects an import with %s", async (_name, type, body, status, message) => {
      const response = await fetch(`${context.baseUrl}/api/labels/import`, { method: "POST", headers: { "Content-Type": type }, body });
      const reply = (await response.json()) as { error: string };

      expect(response.status).toBe(status);
      expect(reply.error).toContain(message);
    });

    it("returns stats", async () => {
      context.catalogue.label(context.shas[0]!, "glass", "ana");

      const response = await fetch(`${context.baseUrl}/api/stats`);
      const body = (await response.json()) as { byStatus: Record<string, number>; byLabel: Record<string, number> };

      expect(response.status).toBe(200);
      expect(body.byStatus).toEqual({ pending: 2, labelled: 1, discarded: 0 });
      expect(body.byLabel).toEqual({ glass: 1 });
    });

    it("logs each failed request", async () => {
      await fetch(`${context.baseUrl}/api/examples/${"0".repeat(64)}`);
      await postJson(`${context.baseUrl}/api/examples/${context.shas[0]}/label`, { label: "styrofoam" });

      const failures = context.logs.filter((line) => line.msg === "review request failed");
      expect(failures.map((line) => [line.method, line.path, line.status])).toEqual([
        ["GET", `/api/examples/${"0".repeat(64)}`, 404],
        ["POST", `/api/examples/${context.shas[0]}/label`, 400],
      ]);
    });
  });

  describe("with a token", () => {
    beforeEach(async () => {
      temp = makeTempDir("review-token");
      context = await startServer(temp, TOKEN);
    });

    it("rejects requests without the token", async () => {
      for (const path of ["/", "/review.js", "/api/stats", `/examples/${context.shas[0]}.jpg`]) {
        const response = await fetch(`${context.baseUrl}${path}`);
        const body = (await response.json()) as { error: string };

        expect(response.status, path).toBe(401);
        expect(response.headers.get("www-authenticate"), path).toBe('Bearer realm="sortline-review"');
        expect(body.error, path).toContain("missing or invalid token");
      }
    });

    it("rejects a wrong token", async () => {
      const bearer = await fetch(`${context.baseUrl}/api/stats`, { headers: { Authorization: "Bearer wrong" } });
      const cookie = await fetch(`${context.baseUrl}/api/stats`, { headers: { Cookie: `token=${TOKEN}x` } });
      const prefix = await fetch(`${context.baseUrl}/api/stats`, { headers: { Authorization: `Bearer ${TOKEN.slice(0, -1)}` } });

      expect(bearer.status).toBe(401);
      expect(cookie.status).toBe(401);
      expect(prefix.status).toBe(401);
    });

    it("accepts a bearer token", async () => {
      const response = await fetch(`${context.baseUrl}/api/stats`, { headers: { Authorization: `Bearer ${TOKEN}` } });

      expect(response.status).toBe(200);
    });

    it("sets a cookie on login that later requests can use", async () => {
      const login = await fetch(`${context.baseUrl}/login?token=${encodeURIComponent(TOKEN)}`, { redirect: "manual" });

      expect(login.status).toBe(303);
      expect(login.headers.get("location")).toBe("/");
      const cookie = login.headers.get("set-cookie")!;
      expect(cookie).toContain("HttpOnly");
      expect(cookie).toContain("SameSite=Strict");

      const page = await fetch(`${context.baseUrl}/`, { headers: { Cookie: `other=1; ${cookie.split(";")[0]}` } });
      expect(page.status).toBe(200);
      expect(await page.text()).toContain("sortline review");
    });

    it("rejects a login with a wrong token and logs no token", async () => {
      const login = await fetch(`${context.baseUrl}/login?token=guess-${TOKEN}`, { redirect: "manual" });

      expect(login.status).toBe(401);
      expect(login.headers.get("set-cookie")).toBeNull();
      const logged = JSON.stringify(context.logs);
      expect(logged).toContain('"path":"/login"');
      expect(logged).not.toContain(TOKEN);
    });

    it("rejects an invalid token option", () => {
      expect(() => new ReviewServer({ catalogue: context.catalogue, token: "has space" })).toThrow(RangeError);
      expect(() => new ReviewServer({ catalogue: context.catalogue, token: "a;b" })).toThrow(RangeError);
      expect(() => new ReviewServer({ catalogue: context.catalogue, token: "" })).toThrow(RangeError);
    });
  });
});
