import * as ort from "onnxruntime-node";

import { describeError, ModelLoadError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import { readModelPackage, verifyModelFile, type ModelManifest, type ModelPackage } from "../models/manifest.js";

/** Execution providers sortline can try, fastest first. */
export const KNOWN_PROVIDERS = ["tensorrt", "cuda", "cpu"] as const;
export type ProviderName = (typeof KNOWN_PROVIDERS)[number];

export interface RunnerOptions {
  /** Providers tried in order; the first that creates a session runs. Default: cpu. */
  providers?: readonly ProviderName[];
  /** Intra-op threads of the CPU provider; 0 lets onnxruntime choose one per core. */
  threads?: number;
  /** Skip the sha256 check, for callers that verified this exact file already. */
  skipVerify?: boolean;
  logger?: Logger;
}

export interface BatchResult {
  probabilities: Float32Array[];
  embeddings: Float32Array[];
}

export interface Scored {
  label: string;
  p: number;
}

/** Returns the k most probable labels, highest first. */
export function topK(probabilities: Float32Array, labels: readonly string[], k: number): Scored[] {
  const order = Array.from(probabilities.keys()).sort((a, b) => probabilities[b]! - probabilities[a]!);
  return order.slice(0, k).map((index) => ({ label: labels[index] ?? `class_${index}`, p: probabilities[index]! }));
}

function sessionOptions(provider: ProviderName, threads: number): ort.InferenceSession.SessionOptions {
  return {
    executionProviders: [provider],
    graphOptimizationLevel: "all",
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: "sequential",
  };
}

/** An onnxruntime session for one model package, with the package's manifest. */
export class ModelRunner {
  private constructor(
    readonly pkg: ModelPackage,
    readonly provider: ProviderName,
    private readonly session: ort.InferenceSession,
  ) {}

  get manifest(): ModelManifest {
    return this.pkg.manifest;
  }

  /** Loads a model package, verifying its sha256 unless `skipVerify` is set, and tries each provider in order. */
  static async load(dir: string, options: RunnerOptions = {}): Promise<ModelRunner> {
    const logger = options.logger ?? silentLogger;
    const pkg = await readModelPackage(dir);
    if (!options.skipVerify) {
      await verifyModelFile(pkg);
    }
    const providers = options.providers?.length ? options.providers : (["cpu"] as const);
    const failures: string[] = [];
    for (const provider of providers) {
      try {
        const session = await ort.InferenceSession.create(pkg.modelPath, sessionOptions(provider, options.threads ?? 0));
        const runner = new ModelRunner(pkg, provider, session);
        runner.checkSignature();
        logger.info(
          { provider, model: pkg.manifest.name, modelVersion: pkg.manifest.version, modelSha256: pkg.manifest.file.sha256 },
          "model loaded",
        );
        return runner;
      } catch (error) {
        if (error instanceof ModelLoadError) {
          throw error;
        }
        failures.push(`${provider}: ${describeError(error)}`);
        logger.warn({ provider, err: describeError(error) }, "execution provider unavailable, trying the next one");
      }
    }
    throw new ModelLoadError(`no execution provider could load ${pkg.modelPath}: ${failures.join("; ")}`);
  }

  private checkSignature(): void {
    const { input, outputs } = this.manifest;
    if (!this.session.inputNames.includes(input.name)) {
      throw new ModelLoadError(`model has inputs ${this.session.inputNames.join(", ")}; the manifest names '${input.name}'`);
    }
    for (const name of [outputs.probabilities, outputs.embedding]) {
      if (!this.session.outputNames.includes(name)) {
        throw new ModelLoadError(`model has outputs ${this.session.outputNames.join(", ")}; the manifest names '${name}'`);
      }
    }
    // A graph with a symbolic class dimension is checked by run() on the first batch instead.
    const scores = this.session.outputMetadata.find((metadata) => metadata.name === outputs.probabilities);
    const classes = scores?.isTensor ? scores.shape[1] : undefined;
    if (typeof classes === "number" && classes !== this.manifest.labels.length) {
      throw new ModelLoadError(`model returns ${classes} scores; the manifest lists ${this.manifest.labels.length} labels`);
    }
  }

  /** Runs one batch of prepared images (each crop.height x crop.width x 3 uint8 RGB). */
  async run(images: readonly Buffer[]): Promise<BatchResult> {
    const [, height, width] = this.manifest.input.shape;
    const frameBytes = height * width * 3;
    const batch = new Uint8Array(images.length * frameBytes);
    images.forEach((image, index) => {
      if (image.length !== frameBytes) {
        throw new RangeError(`image ${index} has ${image.length} bytes; the model takes ${frameBytes}`);
      }
      batch.set(image, index * frameBytes);
    });
    const feeds = { [this.manifest.input.name]: new ort.Tensor("uint8", batch, [images.length, height, width, 3]) };
    const { probabilities: probabilityName, embedding: embeddingName } = this.manifest.outputs;
    const results = await this.session.run(feeds, [probabilityName, embeddingName]);
    const probabilities = results[probabilityName]!;
    const embeddings = results[embeddingName]!;
    const classes = this.manifest.labels.length;
    if (probabilities.dims[1] !== classes) {
      throw new ModelLoadError(`model returns ${probabilities.dims[1]} scores; the manifest lists ${classes} labels`);
    }
    return {
      probabilities: split(probabilities.data as Float32Array, images.length),
      embeddings: split(embeddings.data as Float32Array, images.length),
    };
  }

  /** Runs a blank batch of each size once, so that the first real frame does not pay for allocation. */
  async warmUp(batchSizes: readonly number[] = [1]): Promise<void> {
    const [, height, width] = this.manifest.input.shape;
    for (const size of batchSizes) {
      await this.run(Array.from({ length: size }, () => Buffer.alloc(height * width * 3, 128)));
    }
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

function split(data: Float32Array, rows: number): Float32Array[] {
  const width = data.length / rows;
  return Array.from({ length: rows }, (_, row) => data.slice(row * width, (row + 1) * width));
}
