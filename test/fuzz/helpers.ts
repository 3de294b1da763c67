/**
 * Shared parts of the fuzz tests: a seeded pseudo-random generator, the scale and seed taken from
 * the environment, and an RSS sampler.
 *
 * SORTLINE_FUZZ_SEED (an unsigned 32-bit integer) repeats a run. Without it, each run draws a seed
 * and prints it. SORTLINE_FUZZ_SCALE (default 1) multiplies the number of generated inputs.
 */
import { randomInt } from "node:crypto";

/**
 * A small seeded generator (mulberry32: a 32-bit state advanced by a Weyl sequence and mixed by
 * multiply-xorshift steps). Not for cryptography, only for repeatable test inputs.
 */
export class Prng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** Returns a float in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296;
  }

  /** Returns an integer in [0, limit). */
  int(limit: number): number {
    return Math.floor(this.next() * limit);
  }

  /** Returns an integer in [min, max], both inclusive. */
  between(min: number, max: number): number {
    return min + this.int(max - min + 1);
  }

  chance(probability: number): boolean {
    return this.next() < probability;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) {
      throw new RangeError("cannot pick from an empty list");
    }
    return items[this.int(items.length)]!;
  }

  /** Picks a key of `weights` with probability proportional to its weight. */
  weighted<K extends string>(weights: Readonly<Record<K, number>>): K {
    const entries = Object.entries(weights) as [K, number][];
    const total = entries.reduce((sum, [, weight]) => sum + weight, 0);
    let point = this.next() * total;
    for (const [key, weight] of entries) {
      point -= weight;
      if (point < 0) {
        return key;
      }
    }
    return entries[entries.length - 1]![0];
  }

  bytes(length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    for (let i = 0; i < length; i++) {
      out[i] = this.int(256);
    }
    return out;
  }

  /** Returns `length` random characters drawn from `alphabet`. */
  text(length: number, alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"): string {
    let out = "";
    for (let i = 0; i < length; i++) {
      out += alphabet[this.int(alphabet.length)];
    }
    return out;
  }
}

/** Returns SORTLINE_FUZZ_SEED, or a fresh random seed when it is not set. */
export function fuzzSeed(env: NodeJS.ProcessEnv = process.env): number {
  const value = env.SORTLINE_FUZZ_SEED;
  if (value === undefined || value === "") {
    return randomInt(0, 2 ** 32 - 1);
  }
  const seed = Number(value);
  if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) {
    throw new Error(`SORTLINE_FUZZ_SEED=${value} is invalid; expected an integer from 0 to 4294967295`);
  }
  return seed;
}

/** Returns SORTLINE_FUZZ_SCALE (default 1), the multiplier of input counts. */
export function fuzzScale(env: NodeJS.ProcessEnv = process.env): number {
  const value = env.SORTLINE_FUZZ_SCALE;
  if (value === undefined || value === "") {
    return 1;
  }
  const scale = Number(value);
  if (!Number.isFinite(scale) || scale <= 0) {
    throw new Error(`SORTLINE_FUZZ_SCALE=${value} is invalid; expected a number > 0`);
  }
  return scale;
}

const MIB = 1024 * 1024;

export interface RssFigures {
  startMiB: number;
  peakMiB: number;
  endMiB: number;
  samples: number;
}

/** Samples process.memoryUsage().rss on a timer and on demand, and keeps the start, peak and last value. */
export class RssSampler {
  private timer: NodeJS.Timeout | undefined;
  private start = 0;
  private peak = 0;
  private last = 0;
  private count = 0;

  /** Takes the first sample and then one every `intervalMs`. */
  begin(intervalMs = 100): void {
    this.start = this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs);
    this.timer.unref();
  }

  sample(): number {
    const rss = process.memoryUsage().rss;
    this.peak = Math.max(this.peak, rss);
    this.last = rss;
    this.count++;
    return rss;
  }

  /** Takes a last sample, stops the timer and returns the figures in MiB. */
  end(): RssFigures {
    if (this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
    this.sample();
    return this.figures();
  }

  figures(): RssFigures {
    const mib = (bytes: number): number => Math.round((bytes / MIB) * 10) / 10;
    return { startMiB: mib(this.start), peakMiB: mib(this.peak), endMiB: mib(this.last), samples: this.count };
  }
}

/** Polls `condition` every `intervalMs` until it holds; returns false when `timeoutMs` passes first. */
export async function pollUntil(condition: () => boolean, timeoutMs: number, intervalMs = 10): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      return false;
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
  return true;
}
