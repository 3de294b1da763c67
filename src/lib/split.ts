import { createHash } from "node:crypto";

/** Salt of the content-hash split; the Spark job (`sortline_spark.embed.split_of`) uses the same one. */
export const SPLIT_SALT = "sortline-split-v1";

/**
 * Assigns an image to "train" or "validation" from its content sha256 alone, exactly as the Spark
 * training job does, so a photo held out by the trainer is held out here too.
 */
export function splitOf(sha256: string, validationFraction: number, salt = SPLIT_SALT): "train" | "validation" {
  const digest = createHash("sha256").update(`${salt}:${sha256}`).digest("hex");
  const bucket = Number.parseInt(digest.slice(0, 8), 16) / 0xffffffff;
  return bucket < validationFraction ? "validation" : "train";
}

/** Hex sha256 of a buffer. */
export function sha256Hex(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}
