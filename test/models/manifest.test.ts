import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import path from "node:path";

import { afterEach, beforeEach, describe, expect, it } from "vitest";

import { ModelLoadError } from "../../src/lib/errors.js";
import { readModelPackage, sha256File, verifyModelFile } from "../../src/models/manifest.js";
import { makeTempDir } from "../audit/helpers.js";

/** Bytes standing in for model.onnx: the manifest checks only their size and sha256. */
const MODEL_BYTES = Buffer.from("not a real ONNX graph, only bytes to hash\n".repeat(50));

function validManifest(model: Buffer = MODEL_BYTES): Record<string, any> {
  return {
    schemaVersion: 1,
    name: "sortline-test",
    version: "1.2.3",
    createdAt: "2024-05-01T08:00:00Z",
    labels: ["cardboard", "glass", "metal"],
    input: { name: "pixels", dtype: "uint8", layout: "NHWC", pixelFormat: "RGB", shape: [null, 224, 224, 3] },
    outputs: { probabilities: "probabilities", embedding: "embedding" },
    preprocess: {
      orientation: "exif",
      colourspace: "srgb",
      alpha: { flatten: [255, 255, 255] },
      resize: { shortSide: 256, kernel: "lanczos3" },
      crop: { mode: "centre", width: 224, height: 224 },
    },
    file: { name: "model.onnx", sha256: createHash("sha256").update(model).digest("hex"), bytes: model.length },
    precision: "int8",
    backbone: { id: "test" },
  };
}

describe("readModelPackage", () => {
  let temp: ReturnType<typeof makeTempDir>;

  const writeManifest = (document: unknown): void => {
    writeFileSync(path.join(temp.dir, "manifest.json"), typeof document === "string" ? document : JSON.stringify(document));
  };

  /** Returns the ModelLoadError message that reading the package raises. */
  const loadError = async (): Promise<string> => {
    const error = await readModelPackage(temp.dir).then(
      () => null,
      (caught: unknown) => caught,
    );
    expect(error).toBeInstanceOf(ModelLoadError);
    return (error as ModelLoadError).message;
  };

  beforeEach(() => {
    temp = makeTempDir("manifest");
    writeFileSync(path.join(temp.dir, "model.onnx"), MODEL_BYTES);
  });

  afterEach(() => {
    temp.remove();
  });

  it("valid manifest loads", async () => {
    writeManifest(validManifest());

    const pkg = await readModelPackage(temp.dir);

    expect(pkg.dir).toBe(temp.dir);
    expect(pkg.modelPath).toBe(path.join(temp.dir, "model.onnx"));
    expect(pkg.manifest.labels).toEqual(["cardboard", "glass", "metal"]);
    expect(pkg.manifest.preprocess.resize.kernel).toBe("lanczos3");
  });

  it("missing manifest names the path", async () => {
    const message = await loadError();

    expect(message).toContain(path.join(temp.dir, "manifest.json"));
    expect(message).toContain("ENOENT");
  });

  it("invalid JSON is rejected", async () => {
    writeManifest('{"schemaVersion": 1, "name": ');

    const message = await loadError();

    expect(message).toContain("manifest.json is not valid JSON");
  });

  it("JSON that is not an object is rejected", async () => {
    writeManifest("[1, 2, 3]");

    const message = await loadError();

    expect(message).toContain("(root) must be object");
  });

  const schemaCases: { value: string; field: string; change: (manifest: Record<string, any>) => void }[] = [
    { value: "missing", field: "'labels'", change: (m) => delete m.labels },
    { value: "missing", field: "'outputs'", change: (m) => delete m.outputs },
    { value: "unknown", field: "/schemaVersion", change: (m) => (m.schemaVersion = 2) },
    { value: "space in name", field: "/name", change: (m) => (m.name = "my model") },
    { value: "two parts", field: "/version", change: (m) => (m.version = "1.0") },
    { value: "one label", field: "/labels", change: (m) => (m.labels = ["only-one"]) },
    { value: "duplicate", field: "/labels", change: (m) => (m.labels = ["glass", "glass", "metal"]) },
    { value: "empty label", field: "/labels/1", change: (m) => (m.labels = ["glass", "", "metal"]) },
    { value: "float32", field: "/input/dtype", change: (m) => (m.input.dtype = "float32") },
    { value: "NCHW", field: "/input/layout", change: (m) => (m.input.layout = "NCHW") },
    { value: "four channels", field: "/input/shape/3", change: (m) => (m.input.shape = [null, 224, 224, 4]) },
    { value: "zero height", field: "/input/shape/1", change: (m) => (m.input.shape = [null, 0, 224, 3]) },
    { value: "number", field: "/outputs/embedding", change: (m) => (m.outputs.embedding = 7) },
    { value: "none", field: "/preprocess/orientation", change: (m) => (m.preprocess.orientation = "none") },
    { value: "above 255", field: "/preprocess/alpha/flatten/2", change: (m) => (m.preprocess.alpha.flatten = [255, 255, 256]) },
    { value: "bicubic", field: "/preprocess/resize/kernel", change: (m) => (m.preprocess.resize.kernel = "bicubic") },
    { value: "fraction", field: "/preprocess/resize/shortSide", change: (m) => (m.preprocess.resize.shortSide = 25.5) },
    { value: "random", field: "/preprocess/crop/mode", change: (m) => (m.preprocess.crop.mode = "random") },
    { value: "parent folder", field: "/file/name", change: (m) => (m.file.name = "../model.onnx") },
    { value: "uppercase", field: "/file/sha256", change: (m) => (m.file.sha256 = "ABC") },
    { value: "zero", field: "/file/bytes", change: (m) => (m.file.bytes = 0) },
    { value: "fp16", field: "/precision", change: (m) => (m.precision = "fp16") },
  ];

  for (const { value, field, change } of schemaCases) {
    it(`schema error names ${field} (${value})`, async () => {
      const manifest = validManifest();
      change(manifest);
      writeManifest(manifest);

      const message = await loadError();

      expect(message).toContain("manifest.json is invalid");
      expect(message).toContain(field);
    });
  }

  it("schema errors list several fields", async () => {
    const manifest = validManifest();
    manifest.precision = "fp16";
    manifest.file.sha256 = "ABC";
    writeManifest(manifest);

    const message = await loadError();

    expect(message).toContain("/precision");
    expect(message).toContain("/file/sha256");
  });

  it("crop that differs from input shape is rejected", async () => {
    const manifest = validManifest();
    manifest.preprocess.crop.width = 200;
    manifest.preprocess.crop.height = 200;
    writeManifest(manifest);

    const message = await loadError();

    expect(message).toContain("crop 200x200 does not match input shape [null,224,224,3]");
  });
});

describe("verifyModelFile", () => {
  let temp: ReturnType<typeof makeTempDir>;

  /** Writes a package whose manifest describes MODEL_BYTES and whose model file contains `model`. */
  const writePackage = (model: Buffer | null): void => {
    writeFileSync(path.join(temp.dir, "manifest.json"), JSON.stringify(validManifest()));
    if (model !== null) {
      writeFileSync(path.join(temp.dir, "model.onnx"), model);
    }
  };

  const verifyError = async (): Promise<string> => {
    const pkg = await readModelPackage(temp.dir);
    const error = await verifyModelFile(pkg).then(
      () => null,
      (caught: unknown) => caught,
    );
    expect(error).toBeInstanceOf(ModelLoadError);
    return (error as ModelLoadError).message;
  };

  beforeEach(() => {
    temp = makeTempDir("verify");
  });

  afterEach(() => {
    temp.remove();
  });

  it("matching model file passes", async () => {
    writePackage(MODEL_BYTES);

    const pkg = await readModelPackage(temp.dir);

    await expect(verifyModelFile(pkg)).resolves.toBeUndefined();
  });

  it("sha256 mismatch is rejected", async () => {
    const tampered = Buffer.from(MODEL_BYTES);
    tampered.writeUInt8(tampered.readUInt8(tampered.length >> 1) ^ 0x01, tampered.length >> 1);
    writePackage(tampered);

    const message = await verifyError();

    expect(message).toContain(`has sha256 ${createHash("sha256").update(tampered).digest("hex")}`);
    expect(message).toContain(`the manifest says ${validManifest().file.sha256}`);
  });

  it("size mismatch is rejected", async () => {
    writePackage(Buffer.concat([MODEL_BYTES, Buffer.from("extra")]));

    const message = await verifyError();

    expect(message).toContain(`has ${MODEL_BYTES.length + 5} bytes; the manifest says ${MODEL_BYTES.length}`);
  });

  it("missing model file is rejected", async () => {
    writePackage(null);

    const message = await verifyError();

    expect(message).toBe(`model file ${path.join(temp.dir, "model.onnx")} not found`);
  });

  it("sha256File matches node crypto", async () => {
    const file = path.join(temp.dir, "big.bin");
    const data = Buffer.alloc(3 * 1024 * 1024 + 17, 0x5a);
    writeFileSync(file, data);

    expect(await sha256File(file)).toBe(createHash("sha256").update(data).digest("hex"));
  });
});
