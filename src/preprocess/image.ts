import sharp from "sharp";

import { ImageDecodeError } from "../lib/errors.js";
import type { PreprocessPolicy } from "../models/manifest.js";

/** libvips refuses to decode images with more pixels than this, which bounds memory per image. */
export const MAX_INPUT_PIXELS = 100_000_000;

// One frame at a time per call; concurrency comes from the caller's pipeline, not from libvips threads.
sharp.concurrency(1);
sharp.cache(false);

/** Returns the size after scaling the short side to `shortSide`, rounded to whole pixels. */
export function scaledSize(width: number, height: number, shortSide: number): [number, number] {
  if (Math.min(width, height) === shortSide) {
    return [width, height];
  }
  if (width <= height) {
    return [shortSide, Math.max(1, roundHalfEven((height * shortSide) / width))];
  }
  return [Math.max(1, roundHalfEven((width * shortSide) / height)), shortSide];
}

/** Rounds like Python's round(), so that both sides of training and serving agree on sizes. */
function roundHalfEven(value: number): number {
  const floor = Math.floor(value);
  const fraction = value - floor;
  if (Math.abs(fraction - 0.5) > 1e-9) {
    return Math.round(value);
  }
  return floor % 2 === 0 ? floor : floor + 1;
}

export interface PreparedImage {
  /** Model input: uint8 RGB, row-major, crop.height x crop.width x 3. */
  pixels: Buffer;
  /** Size of the decoded image after EXIF orientation. */
  sourceWidth: number;
  sourceHeight: number;
}

/**
 * Decodes an encoded image (JPEG, PNG, WebP, TIFF, GIF, AVIF) into the model input that
 * `policy` describes: EXIF orientation, 8-bit sRGB, alpha flattened, short side scaled with
 * the policy's kernel, centre crop. Mirrors `sortline_spark.images.prepare` step for step.
 * Throws ImageDecodeError for anything that cannot be decoded, including truncated files.
 */
export async function prepareImage(input: Buffer | string, policy: PreprocessPolicy): Promise<PreparedImage> {
  // ignoreIcc: the training side (pyvips) converts by interpretation only, so both sides ignore embedded profiles.
  // NOTE: photos with a Display P3 or Adobe RGB profile therefore reach the model with shifted colours.
  const options = { failOn: "truncated", limitInputPixels: MAX_INPUT_PIXELS, sequentialRead: true, pages: 1, ignoreIcc: true } as const;
  try {
    const metadata = await sharp(input, options).metadata();
    const oriented = metadata.autoOrient ?? { width: metadata.width, height: metadata.height };
    if (!oriented.width || !oriented.height) {
      throw new ImageDecodeError("image has no dimensions");
    }
    const [width, height] = scaledSize(oriented.width, oriented.height, policy.resize.shortSide);
    const { width: cropWidth, height: cropHeight } = policy.crop;
    if (width < cropWidth || height < cropHeight) {
      throw new ImageDecodeError(`image of ${width}x${height} is smaller than the ${cropWidth}x${cropHeight} crop`);
    }

    // pipelineColourspace converts to 8-bit sRGB right after decoding, as the training side does
    // before resizing. It also turns off JPEG shrink-on-load, which would decode large JPEGs
    // at 1/2, 1/4 or 1/8 size and give different pixels from a full decode (sharp 0.34).
    let pipeline = sharp(input, options)
      .rotate()
      .pipelineColourspace("srgb")
      .toColourspace("srgb")
      .flatten({ background: { r: policy.alpha.flatten[0], g: policy.alpha.flatten[1], b: policy.alpha.flatten[2] } });
    if (width !== oriented.width || height !== oriented.height) {
      pipeline = pipeline.resize(width, height, { fit: "fill", kernel: policy.resize.kernel, fastShrinkOnLoad: false });
    }
    const { data, info } = await pipeline
      .extract({ left: Math.floor((width - cropWidth) / 2), top: Math.floor((height - cropHeight) / 2), width: cropWidth, height: cropHeight })
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
    return { pixels: toRgb(data, info.channels, cropWidth * cropHeight), sourceWidth: oriented.width, sourceHeight: oriented.height };
  } catch (error) {
    if (error instanceof ImageDecodeError) {
      throw error;
    }
    const message = error instanceof Error ? error.message.split("\n")[0] : String(error);
    throw new ImageDecodeError(`cannot decode image: ${message}`, { cause: error });
  }
}

function toRgb(data: Buffer, channels: number, pixelCount: number): Buffer {
  if (channels === 3) {
    return data;
  }
  const rgb = Buffer.allocUnsafe(pixelCount * 3);
  for (let i = 0; i < pixelCount; i++) {
    for (let c = 0; c < 3; c++) {
      rgb[i * 3 + c] = data[i * channels + (channels >= 3 ? c : 0)]!;
    }
  }
  return rgb;
}
