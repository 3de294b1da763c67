import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { ModelRunner, topK } from "../../src/inference/runner.js";
import { packBundle } from "../../src/models/bundle.js";
import type { ModelManifest } from "../../src/models/manifest.js";
import { generateKeyPair, signPackage, type PackageSignature } from "../../src/models/signing.js";
import { prepareImage } from "../../src/preprocess/image.js";
import type { BatchObserver, BatchTap, ObservedBatch } from "../../src/update/observe.js";
import { ModelStore } from "../../src/update/store.js";
import { ModelUpdater, type ModelUpdaterOptions, type UpdateStatus } from "../../src/update/updater.js";
import { makeTempDir } from "../audit/helpers.js";
import { copyDefaultPackage, defaultModelDir, repoRoot } from "./helpers.js";

const PHOTOS = ["glass/glass143.jpg", "metal/metal108.jpg", "paper/paper163.jpg", "cardboard/cardboard139.jpg"];

/** Forwards each emitted batch to the attached observers, as the agent does with pipeline batches. */
class FakeTap implements BatchTap {
  readonly observers = new Set<BatchObserver>();

  attach(observer: BatchObserver): void {
    this.observers.add(observer);
  }

  detach(observer: BatchObserver): void {
    this.observers.delete(observer);
  }

  emit(batch: ObservedBatch): void {
    for (const observer of [...this.observers]) {
      observer.onBatch(batch);
    }
  }
}

describe("ModelUpdater", () => {
  let temp: ReturnType<typeof makeTempDir>;
  let stateTemp: ReturnType<typeof makeTempDir>;
  const keys = generateKeyPair();
  const trustedKeys = [{ keyId: keys.keyId, publicKeyPem: keys.publicKeyPem }];
  const runners: ModelRunner[] = [];
  let pixels: Buffer[];
  let package101: string;
  let bundle101: Buffer;
  let bundle102: Buffer;
  let defaultRunner: ModelRunner;

  // State of one test: the store, the tap, the model the simulated line runs, and the swaps.
  let store: ModelStore;
  let tap: FakeTap;
  let current: ModelRunner;
  let swaps: ModelManifest[];
  let statuses: UpdateStatus[];

  /** Copies the default model as `version`, lets `options.manifest` edit its manifest, and signs it unless `options.sign` is false. */
  const makePackage = async (version: string, options: { sign?: boolean; privateKeyPem?: string; manifest?: (manifest: ModelManifest) => void } = {}): Promise<string> => {
    const dir = copyDefaultPackage(path.join(temp.dir, `pkg-${version}-${Math.random().toString(16).slice(2)}`), (manifest) => {
      manifest.version = version;
      options.manifest?.(manifest);
    });
    if (options.sign !== false) {
      await signPackage(dir, options.privateKeyPem ?? keys.privateKeyPem);
    }
    return dir;
  };

  const load = async (dir: string): Promise<ModelRunner> => {
    const runner = await ModelRunner.load(dir, { skipVerify: true });
    runners.push(runner);
    return runner;
  };

  const createUpdater = (options: Partial<ModelUpdaterOptions> = {}): ModelUpdater =>
    new ModelUpdater({
      store,
      trustedKeys,
      bundledDefault: defaultModelDir,
      tap,
      swap: async (runner, manifest) => {
        current = runner;
        swaps.push(manifest);
      },
      activeManifest: () => current.manifest,
      load,
      shadowFrames: 4,
      // Both models share two cores here, so the latency ratio is noisy. These tests check decisions, not speed.
      maxLatencyRatio: 50,
      regression: false,
      onStatus: (status) => statuses.push(status),
      ...options,
    });

  /**
   * Runs the current model on two photos per batch and emits each batch, from the moment the
   * updater starts shadowing until `until` settles. The line stays idle before shadowing,
   * because inference on the test machine's two cores would slow the hashing steps down a lot.
   */
  const driveLine = async (until: Promise<unknown>): Promise<void> => {
    let settled = false;
    void until.finally(() => (settled = true));
    while (!settled && statuses.at(-1)?.state !== "shadowing") {
      await sleep(20);
    }
    for (let index = 0; !settled; index += 2) {
      const batch = [pixels[index % pixels.length]!, pixels[(index + 1) % pixels.length]!];
      const runner = current;
      const started = Date.now();
      const result = await runner.run(batch);
      const { name, version, file, labels } = runner.manifest;
      tap.emit({
        pixels: batch,
        labels: result.probabilities.map((scores) => topK(scores, labels, 1)[0]!.label),
        inferenceMs: Date.now() - started,
        model: { name, version, sha256: file.sha256 },
      });
      await sleep(10);
    }
  };

  const deployWhileRunning = async (updater: ModelUpdater, bundle: Buffer): Promise<UpdateStatus> => {
    const deployed = updater.deploy(bundle);
    await driveLine(deployed);
    return deployed;
  };

  beforeAll(async () => {
    temp = makeTempDir("updater");
    const manifest = JSON.parse(readFileSync(path.join(defaultModelDir, "manifest.json"), "utf8")) as ModelManifest;
    pixels = await Promise.all(PHOTOS.map(async (photo) => (await prepareImage(path.join(repoRoot, "demo", "photos", photo), manifest.preprocess)).pixels));
    package101 = await makePackage("1.0.1");
    bundle101 = await packBundle(package101);
    bundle102 = await packBundle(await makePackage("1.0.2"));
    defaultRunner = await ModelRunner.load(defaultModelDir);
  });

  afterAll(async () => {
    await defaultRunner?.release();
    temp?.remove();
  });

  beforeEach(async () => {
    stateTemp = makeTempDir("updater-state");
    store = await ModelStore.open(stateTemp.dir, { trustedKeys });
    tap = new FakeTap();
    current = defaultRunner;
    swaps = [];
    statuses = [];
  });

  afterEach(async () => {
    // The updater releases the runners it rejects, so some are released already.
    for (const runner of runners.splice(0)) {
      await runner.release().catch(() => undefined);
    }
    stateTemp.remove();
  });

  it("deploys a signed copy of the default model", async () => {
    const updater = createUpdater();
    const status = await deployWhileRunning(updater, bundle101);

    expect(status.state, status.reason).toBe("active");
    expect(status.version).toBe("1.0.1");
    expect(status.id).toMatch(/^sortline-trashnet-1\.0\.1-[0-9a-f]{12}$/);
    expect(statuses.map((entry) => entry.state)).toEqual(["verifying", "verifying", "shadowing", "active"]);
    expect((await store.readPointer())?.id).toBe(status.id);
    expect(swaps.map((manifest) => manifest.version)).toEqual(["1.0.1"]);
    expect(current.manifest.version).toBe("1.0.1");

    const report = status.report!;
    expect(report.complete).toBe(true);
    expect(report.frames).toBeGreaterThanOrEqual(4);
    expect(report.errors).toBe(0);
    // The candidate has the same weights as the active model, so every top-1 label agrees.
    expect(report.agreement.overall.rate).toBe(1);
    expect(report.agreement.sharedLabels.rate).toBe(1);
    expect(report.latency.candidate.count).toBe(report.batches);
    expect(tap.observers.size).toBe(0);
    expect(readdirSync(store.root).sort()).toEqual(["active.json", "incoming", "versions"]);
    expect(readdirSync(path.join(store.root, "incoming"))).toEqual([]);
  });

  it("rejects a second deploy while one is running", async () => {
    const updater = createUpdater();
    const first = updater.deploy(bundle101);
    const second = await updater.deploy(bundle102);
    expect(second.state).toBe("rejected");
    expect(second.error).toBe("UpdateBusyError");
    await driveLine(first);
    expect((await first).state).toBe("active");
  });

  it("reports an already active version", async () => {
    await store.activate(await store.install(package101));
    const status = await createUpdater().deploy(bundle101);
    expect(status.state).toBe("active");
    expect(status.reason).toBe("this version is already active");
    expect(swaps).toEqual([]);
  });

  describe("rejects bad packages and keeps the active model", () => {
    const cases: Array<{ name: string; error: string; reason: RegExp; bundle: () => Promise<Buffer> }> = [
      {
        name: "unsigned",
        error: "PackageUnsignedError",
        reason: /not signed/,
        bundle: async () => packBundle(await makePackage("1.0.3", { sign: false })),
      },
      {
        name: "wrongly signed",
        error: "BadSignatureError",
        reason: /does not match manifest.json/,
        bundle: async () => {
          const dir = await makePackage("1.0.3");
          const own = JSON.parse(readFileSync(path.join(dir, "signature.json"), "utf8")) as PackageSignature;
          const other = JSON.parse(readFileSync(path.join(package101, "signature.json"), "utf8")) as PackageSignature;
          writeFileSync(path.join(dir, "signature.json"), JSON.stringify({ ...own, signature: other.signature }));
          return packBundle(dir);
        },
      },
      {
        name: "untrusted key",
        error: "UntrustedKeyError",
        reason: /which is not trusted/,
        bundle: async () => packBundle(await makePackage("1.0.3", { privateKeyPem: generateKeyPair().privateKeyPem })),
      },
      {
        name: "tampered model.onnx",
        error: "ModelLoadError",
        reason: /model file .*model\.onnx has sha256 [0-9a-f]{64}; the manifest says/,
        bundle: async () => {
          const dir = await makePackage("1.0.3");
          const model = readFileSync(path.join(dir, "model.onnx"));
          model[model.length - 1000] = model[model.length - 1000]! ^ 0x01;
          writeFileSync(path.join(dir, "model.onnx"), model);
          return packBundle(dir);
        },
      },
      {
        name: "tampered manifest",
        error: "BadSignatureError",
        reason: /does not match manifest.json/,
        bundle: async () => {
          const dir = await makePackage("1.0.3");
          const file = path.join(dir, "manifest.json");
          writeFileSync(file, readFileSync(file, "utf8").replace('"version": "1.0.3"', '"version": "9.9.9"'));
          return packBundle(dir);
        },
      },
      {
        name: "truncated bundle",
        error: "BundleError",
        reason: /truncated/,
        bundle: async () => bundle102.subarray(0, bundle102.length - 4096),
      },
      {
        name: "labels that do not match the model output",
        error: "ModelLoadError",
        reason: /model returns 6 scores; the manifest lists 5 labels/,
        bundle: async () => packBundle(await makePackage("1.0.3", { manifest: (manifest) => manifest.labels.pop() })),
      },
    ];

    for (const testCase of cases) {
      it(testCase.name, async () => {
        const activeId = await store.install(package101);
        await store.activate(activeId);
        const pointerBefore = readFileSync(store.pointerFile, "utf8");
        const versionsBefore = readdirSync(store.versionsDir);

        const status = await createUpdater().deploy(await testCase.bundle());

        expect(status.state).toBe("rejected");
        expect(status.error).toBe(testCase.error);
        expect(status.reason).toMatch(testCase.reason);
        expect(readFileSync(store.pointerFile, "utf8")).toBe(pointerBefore);
        expect(readdirSync(store.versionsDir)).toEqual(versionsBefore);
        expect(readdirSync(path.join(store.root, "incoming"))).toEqual([]);
        expect(swaps).toEqual([]);
        expect(current.manifest.version).toBe("1.0.0");
      });
    }
  });

  it("rejects a candidate that fails in the shadow run", async () => {
    let calls = 0;
    const failingLoad = async (dir: string): Promise<ModelRunner> => {
      const runner = await load(dir);
      const run = runner.run.bind(runner);
      // The first run is the updater's output check; the shadow runs after it fail.
      runner.run = async (images) => {
        calls += 1;
        if (calls > 1) {
          throw new Error("simulated inference failure");
        }
        return run(images);
      };
      return runner;
    };
    const status = await deployWhileRunning(createUpdater({ load: failingLoad }), bundle101);
    expect(status.state).toBe("rejected");
    expect(status.error).toBe("UpdateRejectedError");
    expect(status.reason).toMatch(/candidate inference failed on \d+ of \d+ shadow frames: simulated inference failure/);
    expect(status.report?.errors).toBeGreaterThan(0);
    expect(await store.readPointer()).toBeNull();
    expect(readdirSync(store.versionsDir)).toEqual([]);
    expect(swaps).toEqual([]);
  });

  it("rejects a candidate slower than the latency limit", async () => {
    const status = await deployWhileRunning(createUpdater({ maxLatencyRatio: 0.000001 }), bundle101);
    expect(status.state).toBe("rejected");
    expect(status.reason).toMatch(/candidate p95 latency .* the limit is 0.000001 x/);
    expect(await store.readPointer()).toBeNull();
  });

  it("rejects when the shadow run times out", async () => {
    const status = await createUpdater({ shadowTimeoutMs: 200 }).deploy(bundle101);
    expect(status.state).toBe("rejected");
    expect(status.reason).toMatch(/shadow run timed out after 200 ms with 0 of 4 frames/);
    expect(tap.observers.size).toBe(0);
  });

  it("rolls back after a regression", async () => {
    const previousId = await store.install(package101);
    await store.activate(previousId);
    current = await load(store.versionDir(previousId));
    const updater = createUpdater({ regression: { windowFrames: 10, maxErrorRateIncrease: 0.05, maxLatencyFactor: 1000 } });

    const status = await deployWhileRunning(updater, bundle102);
    expect(status.state, status.reason).toBe("active");
    expect(tap.observers.size).toBe(1);

    // The new model fails on every frame of the next batches.
    const model = { name: current.manifest.name, version: "1.0.2", sha256: current.manifest.file.sha256 };
    for (let batch = 0; batch < 5; batch += 1) {
      tap.emit({ pixels: pixels.slice(0, 2), labels: [], inferenceMs: 50, errors: 2, model });
    }
    const verdict = await updater.regressionWatch!;

    expect(verdict.rollBack).toBe(true);
    // Batches the line ran with 1.0.2 before deploy returned count too, so the rate may be below 100%.
    expect(verdict.reason).toMatch(/error rate \d+\.\d% over \d+ frames exceeds the limit 5\.0%/);
    const rolledBack = statuses.find((entry) => entry.state === "rolled-back")!;
    expect(rolledBack.id).toBe(previousId);
    expect(rolledBack.version).toBe("1.0.1");
    expect(rolledBack.reason).toMatch(/regression after the switch to 1\.0\.2/);
    expect(swaps.map((manifest) => manifest.version)).toEqual(["1.0.2", "1.0.1"]);
    expect((await store.readPointer())?.id).toBe(previousId);
    expect(tap.observers.size).toBe(0);
  });

  it("rolls back to the bundled default without an earlier version", async () => {
    const updater = createUpdater();
    expect((await deployWhileRunning(updater, bundle101)).state).toBe("active");
    const status = await updater.rollback("operator request");
    expect(status.state).toBe("rolled-back");
    expect(status.version).toBe("1.0.0");
    expect(status.reason).toBe("operator request");
    expect(await store.readPointer()).toBeNull();
    expect(current.manifest.version).toBe("1.0.0");
    expect((await store.resolveActive({ bundledDefault: defaultModelDir })).source).toBe("bundled");
  });
});
