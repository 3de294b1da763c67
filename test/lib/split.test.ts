import { describe, expect, it } from "vitest";

import { sha256Hex, splitOf } from "../../src/lib/split.js";

describe("splitOf", () => {
  // Values computed with sortline_spark.embed.split_of, so agent-side tools hold out the same photos as the Spark job.
  it.each([
    ["a".repeat(64), "train", "train"],
    [sha256Hex(Buffer.from("x")), "train", "train"],
    [sha256Hex(Buffer.from("y")), "train", "validation"],
    [sha256Hex(Buffer.from("zz")), "train", "validation"],
  ] as const)("puts %s in the same split as the Spark job", (sha, at20, at50) => {
    expect(splitOf(sha, 0.2)).toBe(at20);
    expect(splitOf(sha, 0.5)).toBe(at50);
  });

  it("holds out about the requested share", () => {
    const shas = Array.from({ length: 2000 }, (_, i) => sha256Hex(Buffer.from(`image-${i}`)));
    const share = shas.filter((sha) => splitOf(sha, 0.2) === "validation").length / shas.length;
    expect(share).toBeGreaterThan(0.17);
    expect(share).toBeLessThan(0.23);
  });
});
