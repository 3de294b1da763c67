import type { ChunkRange } from "./messages.js";

/** A set of chunk indices in [0, total), stored as a bitmap and exchanged as inclusive ranges. */
export class ChunkSet {
  private readonly bits: Uint8Array;
  private held = 0;

  constructor(readonly total: number) {
    this.bits = new Uint8Array(total);
  }

  /** Builds a set from inclusive ranges; indices outside [0, total) are ignored. */
  static fromRanges(total: number, ranges: readonly ChunkRange[]): ChunkSet {
    const set = new ChunkSet(total);
    for (const [first, last] of ranges) {
      for (let index = Math.max(0, first); index <= Math.min(last, total - 1); index++) {
        set.add(index);
      }
    }
    return set;
  }

  get count(): number {
    return this.held;
  }

  /** True when every index is in the set (also for total 0). */
  get complete(): boolean {
    return this.held === this.total;
  }

  has(index: number): boolean {
    return this.bits[index] === 1;
  }

  /** Adds an index; returns false when it was present already or is out of range. */
  add(index: number): boolean {
    if (!Number.isInteger(index) || index < 0 || index >= this.total || this.bits[index] === 1) {
      return false;
    }
    this.bits[index] = 1;
    this.held++;
    return true;
  }

  /** Makes this set equal to `other`, which must have the same total. */
  replaceWith(other: ChunkSet): void {
    if (other.total !== this.total) {
      throw new RangeError(`cannot replace a set of ${this.total} chunks with one of ${other.total}`);
    }
    this.bits.set(other.bits);
    this.held = other.held;
  }

  clone(): ChunkSet {
    const copy = new ChunkSet(this.total);
    copy.bits.set(this.bits);
    copy.held = this.held;
    return copy;
  }

  /** Returns the indices as sorted, disjoint, inclusive ranges. */
  toRanges(): ChunkRange[] {
    const ranges: ChunkRange[] = [];
    let start = -1;
    for (let index = 0; index <= this.total; index++) {
      const present = index < this.total && this.bits[index] === 1;
      if (present && start < 0) {
        start = index;
      } else if (!present && start >= 0) {
        ranges.push([start, index - 1]);
        start = -1;
      }
    }
    return ranges;
  }
}
