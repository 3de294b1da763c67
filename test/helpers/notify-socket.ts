import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { createInterface } from "node:readline";

/**
 * Binds an AF_UNIX datagram socket at argv[1], as systemd does for NOTIFY_SOCKET, and prints each
 * datagram as one JSON string per line. recv() without an ancillary buffer makes the kernel close
 * the pipe fd that systemd-notify sends with BARRIER=1, which releases the sender.
 */
const LISTENER = `
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
print(json.dumps("LISTENING"), flush=True)
while True:
    data = sock.recv(65536)
    print(json.dumps(data.decode("utf-8", "replace")), flush=True)
`;

/** A real notify socket served by a python3 child, because Node.js cannot bind AF_UNIX datagram sockets. */
export class NotifySocket {
  /** Every datagram received, in order, without the BARRIER=1 that systemd-notify sends after each message. */
  readonly messages: string[] = [];
  private cursor = 0;
  private listening = false;
  private waiter: (() => void) | undefined;

  private constructor(
    readonly socketPath: string,
    private readonly child: ChildProcessWithoutNullStreams,
  ) {
    createInterface({ input: child.stdout }).on("line", (line) => {
      const message = JSON.parse(line) as string;
      if (message === "LISTENING") {
        this.listening = true;
      } else if (message !== "BARRIER=1") {
        this.messages.push(message);
      }
      this.waiter?.();
    });
  }

  /** Starts the listener and resolves once python3 has bound the socket. */
  static async start(socketPath: string, timeoutMs = 10_000): Promise<NotifySocket> {
    const child = spawn("python3", ["-u", "-c", LISTENER, socketPath]);
    const socket = new NotifySocket(socketPath, child);
    await socket.waitFor(() => socket.listening, timeoutMs, `python3 to bind ${socketPath}`);
    return socket;
  }

  /** Returns the next datagram not returned before, waiting up to `timeoutMs` of real time for it. */
  async next(timeoutMs = 5_000): Promise<string> {
    await this.waitFor(() => this.cursor < this.messages.length, timeoutMs, `a datagram on ${this.socketPath}`);
    return this.messages[this.cursor++]!;
  }

  private async waitFor(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!condition()) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
  }

  stop(): void {
    this.child.kill();
  }
}
