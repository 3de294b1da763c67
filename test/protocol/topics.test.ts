import { describe, expect, it } from "vitest";

import {
  ackTopicForDataTopic,
  assertValidName,
  deviceBase,
  deviceTopic,
  DEVICE_LEAVES,
  fleetPattern,
  isValidName,
  parseDeviceTopic,
  TopicError,
  topicMatches,
  type DeviceLeaf,
} from "../../src/protocol/topics.js";

describe("topic names", () => {
  it("accepts valid site and device names", () => {
    for (const name of ["a", "Z9", "plant-a", "line_3.cam", "0", "a".repeat(64)]) {
      expect(isValidName(name), name).toBe(true);
    }
  });

  it("rejects invalid names", () => {
    for (const name of ["", "-a", ".a", "_a", "a/b", "a+b", "a#", "a b", "é", "a".repeat(65), "+"]) {
      expect(isValidName(name), name).toBe(false);
    }
    expect(isValidName(42)).toBe(false);
  });

  it("assertValidName names the field and value", () => {
    expect(() => assertValidName("site", "a/b")).toThrow(TopicError);
    expect(() => assertValidName("site", "a/b")).toThrow(/invalid site name "a\/b"/);
    expect(() => assertValidName("device", "")).toThrow(/invalid device name ""/);
  });
});

describe("deviceTopic", () => {
  it("builds every leaf under the base", () => {
    expect(deviceBase("plant-a", "line-3")).toBe("sortline/v1/plant-a/line-3");
    for (const leaf of DEVICE_LEAVES) {
      expect(deviceTopic("plant-a", "line-3", leaf)).toBe(`sortline/v1/plant-a/line-3/${leaf}`);
    }
  });

  it("rejects bad names and leaves", () => {
    expect(() => deviceTopic("plant/a", "line-3", "cmd")).toThrow(/invalid site name/);
    expect(() => deviceTopic("plant-a", "+", "cmd")).toThrow(/invalid device name/);
    expect(() => deviceTopic("plant-a", "line-3", "up" as DeviceLeaf)).toThrow(/unknown topic leaf "up"/);
  });
});

describe("parseDeviceTopic", () => {
  it("round-trips every leaf", () => {
    for (const leaf of DEVICE_LEAVES) {
      expect(parseDeviceTopic(deviceTopic("s1", "d.2", leaf))).toEqual({ site: "s1", device: "d.2", leaf });
    }
  });

  it("returns undefined outside the tree", () => {
    const outside = [
      "sortline/v2/s/d/status",
      "sortline/v1/s/d",
      "sortline/v1/s/d/",
      "sortline/v1/s/d/up",
      "sortline/v1/s/d/up/data/x",
      "sortline/v1/s/d/unknown",
      "sortline/v1/-s/d/status",
      "sortline/v1/s/+/status",
      "other/v1/s/d/status",
      "",
    ];
    for (const topic of outside) {
      expect(parseDeviceTopic(topic), topic).toBeUndefined();
    }
  });
});

describe("fleetPattern", () => {
  it("builds wildcard patterns", () => {
    expect(fleetPattern("status")).toBe("sortline/v1/+/+/status");
    expect(fleetPattern("up/data", "plant-a")).toBe("sortline/v1/plant-a/+/up/data");
    expect(fleetPattern("reply", "plant-a", "line-3")).toBe("sortline/v1/plant-a/line-3/reply");
    expect(() => fleetPattern("status", "a/b")).toThrow(TopicError);
  });

  it("patterns match the topics they describe", () => {
    expect(topicMatches(fleetPattern("status"), deviceTopic("s", "d", "status"))).toBe(true);
    expect(topicMatches(fleetPattern("status"), deviceTopic("s", "d", "reply"))).toBe(false);
    expect(topicMatches(fleetPattern("up/data", "s"), deviceTopic("s", "d", "up/data"))).toBe(true);
    expect(topicMatches(fleetPattern("up/data", "s"), deviceTopic("t", "d", "up/data"))).toBe(false);
  });
});

describe("topicMatches", () => {
  const cases: [string, string, boolean][] = [
    ["a/b", "a/b", true],
    ["a/b", "a/c", false],
    ["a/+", "a/b", true],
    ["a/+", "a/b/c", false],
    ["a/#", "a", true],
    ["a/#", "a/b/c", true],
    ["#", "a/b", true],
    ["+/+", "a/b", true],
    ["+", "$SYS", false],
    ["#", "$SYS/broker", false],
    ["a/b/c", "a/b", false],
  ];
  it.each(cases)("pattern %s on topic %s is %s", (pattern, topic, expected) => {
    expect(topicMatches(pattern, topic)).toBe(expected);
  });
});

describe("ackTopicForDataTopic", () => {
  it("maps data topics to ack topics", () => {
    expect(ackTopicForDataTopic("sortline/v1/s/d/up/data")).toBe("sortline/v1/s/d/up/ack");
    expect(ackTopicForDataTopic("sortline/v1/s/d/down/data")).toBe("sortline/v1/s/d/down/ack");
  });

  it("rejects other topics", () => {
    expect(() => ackTopicForDataTopic("sortline/v1/s/d/status")).toThrow(/is not a transfer data topic/);
    expect(() => ackTopicForDataTopic("x/up/data")).toThrow(TopicError);
  });
});
