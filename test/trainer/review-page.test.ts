import { existsSync } from "node:fs";

import { chromium, type Browser, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { Catalogue } from "../../src/trainer/catalogue.js";
import { ReviewServer } from "../../src/trainer/review.js";
import { BASE_CLASSES, makeMeta, makeTempDir, readPhotos } from "./helpers.js";

const CHROMIUM = "/usr/bin/chromium";
const HAS_CHROMIUM = existsSync(CHROMIUM);
const TOKEN = "page-test-token";
const SECRET_TRUTH = "stored-truth-never-shown";

/** Waits until the page shows the example with this sha256 and its image has loaded. */
async function waitForExample(page: Page, sha256: string): Promise<void> {
  await page.waitForFunction((expected) => {
    const image = document.getElementById("image") as HTMLImageElement | null;
    return image !== null && image.dataset.sha256 === expected && image.complete && image.naturalWidth > 0;
  }, sha256);
}

async function counts(page: Page): Promise<{ pending: string; labelled: string }> {
  return {
    pending: (await page.textContent("#count-pending")) ?? "",
    labelled: (await page.textContent("#count-labelled")) ?? "",
  };
}

describe.skipIf(!HAS_CHROMIUM)(HAS_CHROMIUM ? "review page in Chromium" : `review page in Chromium (skipped: ${CHROMIUM} not found)`, () => {
  let temp: ReturnType<typeof makeTempDir>;
  let catalogue: Catalogue;
  let server: ReviewServer;
  let browser: Browser;
  let shas: string[];
  const pageErrors: string[] = [];

  beforeAll(async () => {
    temp = makeTempDir("review-page");
    catalogue = Catalogue.open(temp.dir, { baseClasses: BASE_CLASSES });
    const photos = [readPhotos("glass")[0]!, readPhotos("glass")[1]!, readPhotos("metal")[0]!, readPhotos("plastic")[0]!, readPhotos("paper")[0]!];
    shas = photos.map(
      (photo, index) =>
        catalogue.add(
          photo,
          makeMeta(`f-${index}`, {
            priority: 1 - index / 10,
            reasons: index === 0 ? ["small-margin", "novelty"] : ["low-confidence"],
            truth: SECRET_TRUTH,
          }),
        ).sha256,
    );
    server = new ReviewServer({ catalogue, port: 0, token: TOKEN });
    await server.start();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  });

  afterAll(async () => {
    await browser?.close();
    await server?.stop();
    catalogue?.close();
    temp?.remove();
  });

  it("labels, adds a class, discards and skips", async () => {
    const context = await browser.newContext({ viewport: { width: 1024, height: 768 }, hasTouch: true });
    const page = await context.newPage();
    page.on("pageerror", (error) => pageErrors.push(error.message));
    page.on("console", (message) => {
      if (message.type() === "error") {
        pageErrors.push(message.text());
      }
    });
    const baseUrl = `http://127.0.0.1:${server.port}`;

    await page.goto(`${baseUrl}/login?token=${TOKEN}`);
    expect(new URL(page.url()).pathname).toBe("/");
    await page.waitForSelector("body[data-ready=true]");
    await waitForExample(page, shas[0]!);

    // The first example shows its guesses, reasons and details, and never the stored truth.
    expect(await counts(page)).toEqual({ pending: "5", labelled: "0" });
    expect(await page.textContent("#guesses")).toContain("41.0%");
    expect(await page.textContent("#reasons")).toContain("Small margin between the two best guesses");
    expect(await page.textContent("#reasons")).toContain("Novelty");
    expect(await page.textContent("#details")).toContain("edge-1 (plant-a)");
    expect(await page.content()).not.toContain(SECRET_TRUTH);
    expect(await page.locator("#classes button").count()).toBe(BASE_CLASSES.length);
    const box = await page.locator("#classes button").first().boundingBox();
    expect(box!.height).toBeGreaterThanOrEqual(48);

    await page.click("#skip");
    await waitForExample(page, shas[1]!);

    await page.tap('#classes button[data-label="glass"]');
    await waitForExample(page, shas[2]!);
    expect(await counts(page)).toEqual({ pending: "4", labelled: "1" });

    // Key 3 selects the third class, metal.
    await page.keyboard.press("3");
    await waitForExample(page, shas[3]!);

    await page.fill("#new-class", "styrofoam");
    await page.click("#new-class-submit");
    await waitForExample(page, shas[4]!);
    expect(await page.locator('#classes button[data-label="styrofoam"]').count()).toBe(1);

    await page.keyboard.press("x");
    // Only the skipped example is left, so it comes back.
    await waitForExample(page, shas[0]!);
    expect(await counts(page)).toEqual({ pending: "1", labelled: "3" });

    // An invalid class name shows the server's error on the page and keeps the example.
    await page.fill("#new-class", "bad name");
    await page.click("#new-class-submit");
    await page.waitForSelector("#error:not([hidden])");
    expect(await page.textContent("#error")).toContain("invalid class name 'bad name'");
    expect(await page.getAttribute("#image", "data-sha256")).toBe(shas[0]);

    await page.keyboard.press("Escape");
    await page.keyboard.press("1");
    await page.waitForSelector("#empty:not([hidden])");
    expect(await counts(page)).toEqual({ pending: "0", labelled: "4" });
    expect(await page.isHidden("#error")).toBe(true);

    await context.close();

    expect(catalogue.get(shas[0]!)).toMatchObject({ status: "labelled", label: "cardboard", reviewedBy: "review-page" });
    expect(catalogue.get(shas[1]!)).toMatchObject({ status: "labelled", label: "glass" });
    expect(catalogue.get(shas[2]!)).toMatchObject({ status: "labelled", label: "metal" });
    expect(catalogue.get(shas[3]!)).toMatchObject({ status: "labelled", label: "styrofoam" });
    expect(catalogue.get(shas[4]!)).toMatchObject({ status: "discarded", label: null });
    expect(catalogue.classes()).toEqual([...BASE_CLASSES, "styrofoam"]);
    // The only failed request of the session is the invalid class name (HTTP 400).
    expect(pageErrors.filter((message) => !message.includes("400"))).toEqual([]);
  });
});
