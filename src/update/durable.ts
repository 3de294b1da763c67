import { randomBytes } from "node:crypto";
import { copyFile, open, readdir, rename, rm, stat } from "node:fs/promises";
import path from "node:path";

/** Fsyncs a folder, so that entries created, renamed or removed in it survive a power loss. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function fsyncFile(file: string): Promise<void> {
  const handle = await open(file, "r+");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Prefix of the temporary files that writeFileAtomic leaves behind when the process dies mid-write. */
export const TEMP_FILE_PREFIX = ".tmp-";

/**
 * Replaces `file` with `data` atomically: writes a temporary file in the same folder, fsyncs
 * it, renames it over `file` and fsyncs the folder. A reader sees the old or the new contents,
 * never a mix, even after a crash at any moment.
 */
export async function writeFileAtomic(file: string, data: string | Buffer): Promise<void> {
  const dir = path.dirname(file);
  const temp = path.join(dir, `${TEMP_FILE_PREFIX}${path.basename(file)}-${process.pid}-${randomBytes(4).toString("hex")}`);
  const handle = await open(temp, "wx");
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await rename(temp, file);
  } catch (error) {
    await rm(temp, { force: true });
    throw error;
  }
  await fsyncDir(dir);
}

/** Writes `value` as indented JSON with writeFileAtomic. */
export async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  await writeFileAtomic(file, `${JSON.stringify(value, null, 2)}\n`);
}

/**
 * Copies the plain files of `source` (not subfolders) into the existing folder `target`, fsyncs
 * each copy and then `target`. Symbolic links are followed.
 */
export async function copyFilesDurable(source: string, target: string): Promise<string[]> {
  const copied: string[] = [];
  for (const name of await readdir(source)) {
    const from = path.join(source, name);
    if (!(await stat(from)).isFile()) {
      continue;
    }
    const to = path.join(target, name);
    await copyFile(from, to);
    await fsyncFile(to);
    copied.push(name);
  }
  await fsyncDir(target);
  return copied;
}
