import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { MqttLink, type MqttLinkOptions } from "../../src/protocol/link.js";

export function makeTempDir(prefix: string): { dir: string; remove: () => void } {
  const dir = mkdtempSync(path.join(tmpdir(), `sortline-${prefix}-`));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Polls `condition` every 20 ms until it returns true, or throws after `timeoutMs` naming `what`. */
export async function waitFor(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Tracks links made in a test so afterEach can close them all. */
export class LinkPool {
  private readonly links: MqttLink[] = [];

  async open(options: MqttLinkOptions): Promise<MqttLink> {
    const link = new MqttLink({ reconnectPeriodMs: 200, ...options });
    this.links.push(link);
    await link.connect({ timeoutMs: 10_000 });
    return link;
  }

  async closeAll(): Promise<void> {
    await Promise.all(this.links.splice(0).map((link) => link.close()));
  }
}

/** A message received by a test subscriber. */
export interface Received {
  topic: string;
  payload: Buffer;
}

/** Subscribes `link` to `pattern` and collects every message into the returned array. */
export async function collect(link: MqttLink, pattern: string): Promise<Received[]> {
  const received: Received[] = [];
  await link.subscribe(pattern, (topic, payload) => {
    received.push({ topic, payload });
  });
  return received;
}
