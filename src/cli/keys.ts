import { existsSync } from "node:fs";
import { mkdir, open } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { generateKeyPair } from "../models/signing.js";
import { UsageError } from "./common.js";

export const keysUsage = `Usage: sortline keys generate --out DIR [--force]

Creates the ed25519 key pair that signs model packages and fleet commands:
DIR/signing.key (private, PKCS#8 PEM, mode 600) and DIR/signing.pub (public, SPKI PEM).
Prints the key id. Give signing.key to the trainer (signing.privateKey) and signing.pub
to every agent (fleet.trustedKeys).

Options:
  --out DIR     folder for the two files; created when missing
  --force       replace existing files
  -h, --help    print this help`;

export interface KeysIo {
  out?: NodeJS.WritableStream;
  err?: NodeJS.WritableStream;
}

/** Writes `text` to a new file with `mode`, synced; `exclusive` fails when the file exists. */
async function writeKeyFile(file: string, text: string, mode: number, exclusive: boolean): Promise<void> {
  const handle = await open(file, exclusive ? "wx" : "w", mode);
  try {
    // The mode of open() applies only to a new file, so an existing file is narrowed too.
    await handle.chmod(mode);
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Runs `sortline keys`; returns the exit code. */
export async function runKeys(argv: string[], io: KeysIo = {}): Promise<number> {
  const out = io.out ?? process.stdout;
  const err = io.err ?? process.stderr;
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      out: { type: "string" },
      force: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    out.write(`${keysUsage}\n`);
    return 0;
  }

  if (positionals.length !== 1 || positionals[0] !== "generate") {
    throw new UsageError(positionals.length === 0 ? "missing subcommand; expected 'generate'" : `unknown subcommand '${positionals.join(" ")}'; expected 'generate'`);
  }
  if (!values.out) {
    throw new UsageError("--out DIR is required");
  }

  const privateFile = path.join(values.out, "signing.key");
  const publicFile = path.join(values.out, "signing.pub");
  if (!values.force) {
    const existing = [privateFile, publicFile].filter((file) => existsSync(file));
    if (existing.length > 0) {
      err.write(`sortline keys: ${existing.join(" and ")} already exist; pass --force to replace them\n`);
      return 1;
    }
  }

  const keys = generateKeyPair();
  await mkdir(values.out, { recursive: true, mode: 0o700 });
  await writeKeyFile(privateFile, keys.privateKeyPem, 0o600, !values.force);
  await writeKeyFile(publicFile, keys.publicKeyPem, 0o644, !values.force);
  out.write(`keyId ${keys.keyId}\nprivate key: ${privateFile}\npublic key: ${publicFile}\n`);
  return 0;
}
