/**
 * A bounded FIFO queue that drops its oldest item when full: on a sorting line a fresh frame is
 * worth more than a stale one. Consumers wait with `waitForItems`.
 */
export class DropOldestQueue<T> {
  private items: T[] = [];
  private head = 0;
  private waiters: (() => void)[] = [];
  /** Items dropped because the queue was full, since construction. */
  dropped = 0;

  constructor(readonly capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`queue capacity ${capacity} must be a positive whole number`);
    }
  }

  get size(): number {
    return this.items.length - this.head;
  }

  /** Adds an item; returns the item dropped to make room, if any. */
  push(item: T): T | undefined {
    let droppedItem: T | undefined;
    if (this.size >= this.capacity) {
      droppedItem = this.items[this.head];
      this.head++;
      this.dropped++;
    }
    this.items.push(item);
    this.compact();
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) {
      wake();
    }
    return droppedItem;
  }

  /** Removes and returns up to `max` items, oldest first. */
  take(max: number): T[] {
    const count = Math.min(max, this.size);
    const taken = this.items.slice(this.head, this.head + count);
    this.head += count;
    this.compact();
    return taken;
  }

  /** Removes everything, returning the items. */
  drain(): T[] {
    return this.take(this.size);
  }

  /** Resolves when the queue contains at least one item, or after `timeoutMs` when given. */
  waitForItems(timeoutMs?: number): Promise<void> {
    if (this.size > 0) {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const wake = (): void => {
        if (timer) {
          clearTimeout(timer);
        }
        resolve();
      };
      this.waiters.push(wake);
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== wake);
          resolve();
        }, timeoutMs);
      }
    });
  }

  /** Wakes every waiter, e.g. on shutdown. */
  wakeAll(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) {
      wake();
    }
  }

  private compact(): void {
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
  }
}
