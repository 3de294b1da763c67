import { afterEach, describe, expect, it, vi } from "vitest";

import { DropOldestQueue } from "../../src/pipeline/queue.js";

/** Resolves to "resolved" when `promise` settles before the pending microtasks run out, else "pending". */
async function settledState(promise: Promise<void>): Promise<"resolved" | "pending"> {
  let state: "resolved" | "pending" = "pending";
  void promise.then(() => {
    state = "resolved";
  });
  // Two turns of the microtask queue are enough for an already-resolved promise chain.
  await Promise.resolve();
  await Promise.resolve();
  return state;
}

describe("DropOldestQueue capacity", () => {
  it.each([0, -1, 1.5, Number.NaN])("rejects capacity %s", (capacity) => {
    expect(() => new DropOldestQueue(capacity)).toThrow(RangeError);
  });

  it("keeps items in order below capacity", () => {
    const queue = new DropOldestQueue<number>(3);

    expect(queue.push(1)).toBeUndefined();
    expect(queue.push(2)).toBeUndefined();

    expect(queue.size).toBe(2);
    expect(queue.dropped).toBe(0);
    expect(queue.take(10)).toEqual([1, 2]);
  });

  it("drops the oldest item when full", () => {
    const queue = new DropOldestQueue<number>(3);
    for (const item of [1, 2, 3]) {
      queue.push(item);
    }

    const dropped = queue.push(4);

    expect(dropped).toBe(1);
    expect(queue.size).toBe(3);
    expect(queue.drain()).toEqual([2, 3, 4]);
  });

  it("counts every dropped item", () => {
    const queue = new DropOldestQueue<number>(2);
    const droppedItems: number[] = [];

    for (let item = 1; item <= 10; item++) {
      const dropped = queue.push(item);
      if (dropped !== undefined) {
        droppedItems.push(dropped);
      }
    }

    expect(queue.dropped).toBe(8);
    expect(droppedItems).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(queue.drain()).toEqual([9, 10]);
  });

  it("keeps the count after draining", () => {
    const queue = new DropOldestQueue<string>(1);
    queue.push("a");
    queue.push("b");

    queue.drain();
    queue.push("c");

    expect(queue.dropped).toBe(1);
    expect(queue.size).toBe(1);
  });

  it("stays correct across many pushes", () => {
    // Enough items to pass the internal compaction threshold several times.
    const queue = new DropOldestQueue<number>(5);
    for (let item = 0; item < 5_000; item++) {
      queue.push(item);
    }

    expect(queue.dropped).toBe(4_995);
    expect(queue.drain()).toEqual([4_995, 4_996, 4_997, 4_998, 4_999]);
  });
});

describe("DropOldestQueue take and drain", () => {
  it("takes up to max items, oldest first", () => {
    const queue = new DropOldestQueue<number>(10);
    for (const item of [1, 2, 3, 4, 5]) {
      queue.push(item);
    }

    expect(queue.take(2)).toEqual([1, 2]);
    expect(queue.size).toBe(3);
    expect(queue.take(2)).toEqual([3, 4]);
    expect(queue.take(2)).toEqual([5]);
    expect(queue.take(2)).toEqual([]);
  });

  it("takes nothing for max 0", () => {
    const queue = new DropOldestQueue<number>(4);
    queue.push(1);

    expect(queue.take(0)).toEqual([]);
    expect(queue.size).toBe(1);
  });

  it("drains everything and empties", () => {
    const queue = new DropOldestQueue<number>(4);
    queue.push(1);
    queue.push(2);

    expect(queue.drain()).toEqual([1, 2]);
    expect(queue.size).toBe(0);
    expect(queue.drain()).toEqual([]);
  });

  it("accepts items again after draining", () => {
    const queue = new DropOldestQueue<number>(2);
    queue.push(1);
    queue.drain();

    queue.push(2);
    queue.push(3);

    expect(queue.dropped).toBe(0);
    expect(queue.drain()).toEqual([2, 3]);
  });
});

describe("DropOldestQueue waitForItems", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("resolves at once when items are queued", async () => {
    const queue = new DropOldestQueue<number>(2);
    queue.push(1);

    expect(await settledState(queue.waitForItems())).toBe("resolved");
  });

  it("resolves on the next push", async () => {
    const queue = new DropOldestQueue<number>(2);
    const waiting = queue.waitForItems();

    expect(await settledState(waiting)).toBe("pending");
    queue.push(1);

    expect(await settledState(waiting)).toBe("resolved");
  });

  it("wakes every waiter on one push", async () => {
    const queue = new DropOldestQueue<number>(2);
    const first = queue.waitForItems();
    const second = queue.waitForItems();

    queue.push(1);

    expect(await settledState(first)).toBe("resolved");
    expect(await settledState(second)).toBe("resolved");
  });

  it("resolves after the timeout when empty", async () => {
    vi.useFakeTimers();
    const queue = new DropOldestQueue<number>(2);
    const waiting = queue.waitForItems(100);

    await vi.advanceTimersByTimeAsync(99);
    expect(await settledState(waiting)).toBe("pending");

    await vi.advanceTimersByTimeAsync(1);
    expect(await settledState(waiting)).toBe("resolved");
    expect(queue.size).toBe(0);
  });

  it("clears the timer when a push comes first", async () => {
    vi.useFakeTimers();
    const queue = new DropOldestQueue<number>(2);
    const waiting = queue.waitForItems(1_000);
    expect(vi.getTimerCount()).toBe(1);

    queue.push(1);

    expect(await settledState(waiting)).toBe("resolved");
    expect(vi.getTimerCount()).toBe(0);
  });

  it("waits without a timeout until woken", async () => {
    vi.useFakeTimers();
    const queue = new DropOldestQueue<number>(2);
    const waiting = queue.waitForItems();

    await vi.advanceTimersByTimeAsync(60_000);
    expect(await settledState(waiting)).toBe("pending");
    expect(vi.getTimerCount()).toBe(0);

    queue.wakeAll();

    expect(await settledState(waiting)).toBe("resolved");
    expect(queue.size).toBe(0);
  });
});
