import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";

import { EmbeddedBroker } from "../../src/broker/embedded.js";

export const MOSQUITTO_BINARY = "/usr/sbin/mosquitto";

export interface MosquittoOptions {
  /** TCP port on 127.0.0.1; default: a free port picked by the kernel. */
  port?: number;
  /** Extra mosquitto.conf lines, appended after the listener settings. */
  config?: string[];
  /** Folder for the config, persistence file and log; default: a new temp folder that close() removes. */
  dir?: string;
}

/** A Mosquitto child process on 127.0.0.1 with persistence in its own folder. */
export interface MosquittoBroker {
  url: string;
  port: number;
  dir: string;
  /** Stops the broker with SIGTERM, so it writes its persistence file. The folder stays for restart(). */
  stop(): Promise<void>;
  /** Kills the broker with SIGKILL; state since the last autosave is lost. */
  kill(): Promise<void>;
  /** Starts the broker again on the same port and folder, stopping it first if it runs. */
  restart(): Promise<void>;
  /** Stops the broker and removes the folder if this helper created it. */
  close(): Promise<void>;
  /** The broker's stderr log so far, for failure messages. */
  log(): string;
}

/** Returns a TCP port that was free on 127.0.0.1 a moment ago. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

function waitForExit(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    child.once("exit", () => resolve());
    child.kill(signal);
  });
}

/**
 * Starts /usr/sbin/mosquitto with a config written to a temp folder: one listener on
 * 127.0.0.1, anonymous access, persistence in the folder. Resolves once the port accepts TCP
 * connections. The config sets `user root` because Mosquitto 2.0 started as root otherwise
 * switches to the `mosquitto` user, which cannot write the temp folder.
 */
export async function startMosquitto(options: MosquittoOptions = {}): Promise<MosquittoBroker> {
  const ownsDir = options.dir === undefined;
  const dir = options.dir ?? mkdtempSync(path.join(tmpdir(), "sortline-mosquitto-"));
  const port = options.port ?? (await freePort());
  const configFile = path.join(dir, "mosquitto.conf");
  const lines = [
    `listener ${port} 127.0.0.1`,
    "allow_anonymous true",
    "persistence true",
    `persistence_location ${dir}/`,
    "autosave_interval 1",
    "user root",
    "log_dest stderr",
    "log_type error",
    "log_type warning",
    "log_type notice",
    ...(options.config ?? []),
  ];
  writeFileSync(configFile, `${lines.join("\n")}\n`);

  let child: ChildProcess | undefined;
  let stderr = "";

  const start = async (): Promise<void> => {
    const spawned = spawn(MOSQUITTO_BINARY, ["-c", configFile], { stdio: ["ignore", "ignore", "pipe"] });
    child = spawned;
    spawned.stderr?.on("data", (data: Buffer) => {
      stderr += data.toString("utf8");
    });
    const deadline = Date.now() + 10_000;
    while (!(await canConnect(port))) {
      if (spawned.exitCode !== null || spawned.signalCode !== null) {
        throw new Error(`mosquitto exited (code ${spawned.exitCode}, signal ${spawned.signalCode}) before listening on port ${port}:\n${stderr}`);
      }
      if (Date.now() > deadline) {
        await waitForExit(spawned, "SIGKILL");
        throw new Error(`mosquitto did not listen on port ${port} within 10 s:\n${stderr}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };

  const stopWith = async (signal: NodeJS.Signals): Promise<void> => {
    const running = child;
    child = undefined;
    if (running) {
      await waitForExit(running, signal);
    }
  };

  await start();
  return {
    url: `mqtt://127.0.0.1:${port}`,
    port,
    dir,
    stop: () => stopWith("SIGTERM"),
    kill: () => stopWith("SIGKILL"),
    restart: async () => {
      await stopWith("SIGTERM");
      await start();
    },
    close: async () => {
      await stopWith("SIGTERM");
      if (ownsDir) {
        rmSync(dir, { recursive: true, force: true });
      }
    },
    log: () => stderr,
  };
}

/** An aedes broker (MQTT 3.1.1 only, no persistence) with the same stop and restart calls. */
export interface AedesBroker {
  url: string;
  port: number;
  /** Closes the broker and every client connection. */
  stop(): Promise<void>;
  /** Starts a fresh broker on the same port, stopping the old one first if it runs. Retained messages and sessions are lost. */
  restart(): Promise<void>;
  close(): Promise<void>;
}

/** Starts src/broker/embedded.ts on 127.0.0.1 and a free port, or on `port`. */
export async function startAedes(options: { port?: number } = {}): Promise<AedesBroker> {
  let broker: EmbeddedBroker | undefined = new EmbeddedBroker("127.0.0.1");
  await broker.start(options.port ?? 0);
  const port = broker.port;

  const stop = async (): Promise<void> => {
    const running = broker;
    broker = undefined;
    await running?.stop();
  };

  return {
    url: `mqtt://127.0.0.1:${port}`,
    port,
    stop,
    restart: async () => {
      await stop();
      const fresh = new EmbeddedBroker("127.0.0.1");
      await fresh.start(port);
      broker = fresh;
    },
    close: stop,
  };
}
