/**
 * MQTT topic tree of the fleet protocol, version 1. Every topic of one device starts with the
 * device base `sortline/v1/{site}/{device}`:
 *
 * | leaf        | publisher | payload                                           |
 * |-------------|-----------|---------------------------------------------------|
 * | `status`    | device    | StatusMessage JSON, retained; also the last will   |
 * | `decision`  | device    | sorting decisions for the actuators                |
 * | `cmd`       | trainer   | CommandRequest JSON                                |
 * | `reply`     | device    | CommandReply JSON                                  |
 * | `up/data`   | device    | transfer frames (hard examples)                    |
 * | `up/ack`    | trainer   | TransferAck JSON                                   |
 * | `down/data` | trainer   | transfer frames (model packages)                   |
 * | `down/ack`  | device    | TransferAck JSON                                   |
 */
import { SortlineError } from "../lib/errors.js";

/** Topic prefix of protocol version 1. */
export const TOPIC_PREFIX = "sortline/v1";

/** The topic leaves under a device base. */
export const DEVICE_LEAVES = ["status", "decision", "cmd", "reply", "up/data", "up/ack", "down/data", "down/ack"] as const;

export type DeviceLeaf = (typeof DEVICE_LEAVES)[number];

/** Site and device names: an ASCII letter or digit, then up to 63 letters, digits, dots, underscores or hyphens. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** A site name, device name, topic leaf or topic that does not fit the topic tree. */
export class TopicError extends SortlineError {}

/** A parsed device topic. */
export interface DeviceTopic {
  site: string;
  device: string;
  leaf: DeviceLeaf;
}

const LEAF_SET: ReadonlySet<string> = new Set(DEVICE_LEAVES);

/** Returns true when `value` is a valid site or device name. */
export function isValidName(value: unknown): value is string {
  return typeof value === "string" && NAME_PATTERN.test(value);
}

/** Throws TopicError unless `value` is a valid site or device name. `field` names it in the message. */
export function assertValidName(field: "site" | "device", value: unknown): asserts value is string {
  if (!isValidName(value)) {
    throw new TopicError(
      `invalid ${field} name ${JSON.stringify(value)}: expected 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", "-", starting with a letter or digit`,
    );
  }
}

/** Builds the base topic `sortline/v1/{site}/{device}`. Throws TopicError on an invalid name. */
export function deviceBase(site: string, device: string): string {
  assertValidName("site", site);
  assertValidName("device", device);
  return `${TOPIC_PREFIX}/${site}/${device}`;
}

/** Builds the topic of one leaf of one device, e.g. `sortline/v1/plant-a/line-3/cmd`. Throws TopicError on invalid input. */
export function deviceTopic(site: string, device: string, leaf: DeviceLeaf): string {
  if (!LEAF_SET.has(leaf)) {
    throw new TopicError(`unknown topic leaf ${JSON.stringify(leaf)}: expected one of ${DEVICE_LEAVES.join(", ")}`);
  }
  return `${deviceBase(site, device)}/${leaf}`;
}

/** Parses a concrete device topic. Returns undefined for any topic outside the version 1 tree. */
export function parseDeviceTopic(topic: string): DeviceTopic | undefined {
  if (!topic.startsWith(`${TOPIC_PREFIX}/`)) {
    return undefined;
  }
  const parts = topic.slice(TOPIC_PREFIX.length + 1).split("/");
  if (parts.length < 3) {
    return undefined;
  }
  const [site, device, ...rest] = parts;
  const leaf = rest.join("/");
  if (!isValidName(site) || !isValidName(device) || !LEAF_SET.has(leaf)) {
    return undefined;
  }
  return { site, device, leaf: leaf as DeviceLeaf };
}

/**
 * Builds a subscription pattern for one leaf across the fleet, e.g. `sortline/v1/+/+/status`.
 * A given `site` narrows it to one site, and a given `device` to one device.
 */
export function fleetPattern(leaf: DeviceLeaf, site?: string, device?: string): string {
  if (!LEAF_SET.has(leaf)) {
    throw new TopicError(`unknown topic leaf ${JSON.stringify(leaf)}: expected one of ${DEVICE_LEAVES.join(", ")}`);
  }
  if (site !== undefined) {
    assertValidName("site", site);
  }
  if (device !== undefined) {
    assertValidName("device", device);
  }
  return `${TOPIC_PREFIX}/${site ?? "+"}/${device ?? "+"}/${leaf}`;
}

/**
 * Returns the acknowledgement topic that belongs to a transfer data topic: `.../up/data` maps to
 * `.../up/ack` and `.../down/data` to `.../down/ack` of the same device. Throws TopicError for any
 * other topic.
 */
export function ackTopicForDataTopic(dataTopic: string): string {
  const parsed = parseDeviceTopic(dataTopic);
  if (parsed?.leaf === "up/data") {
    return deviceTopic(parsed.site, parsed.device, "up/ack");
  }
  if (parsed?.leaf === "down/data") {
    return deviceTopic(parsed.site, parsed.device, "down/ack");
  }
  throw new TopicError(`${JSON.stringify(dataTopic)} is not a transfer data topic (expected ${TOPIC_PREFIX}/{site}/{device}/up/data or .../down/data)`);
}

/**
 * Returns true when a concrete topic matches an MQTT subscription pattern with `+` and `#`
 * wildcards (MQTT 3.1.1 section 4.7). Patterns starting with `$share/` are not supported.
 */
export function topicMatches(pattern: string, topic: string): boolean {
  const patternLevels = pattern.split("/");
  const topicLevels = topic.split("/");
  // Wildcards at the first level do not match topics starting with "$" (e.g. $SYS).
  if (topic.startsWith("$") && (patternLevels[0] === "+" || patternLevels[0] === "#")) {
    return false;
  }
  for (let index = 0; index < patternLevels.length; index++) {
    const level = patternLevels[index];
    if (level === "#") {
      return true;
    }
    if (index >= topicLevels.length) {
      return false;
    }
    if (level !== "+" && level !== topicLevels[index]) {
      return false;
    }
  }
  return patternLevels.length === topicLevels.length;
}
