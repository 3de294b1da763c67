import { createHash, randomBytes } from "node:crypto";
import { mkdir, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import path from "node:path";

import { describeError, ModelLoadError, SortlineError } from "../lib/errors.js";
import { silentLogger, type Logger } from "../lib/log.js";
import type { ModelManifest } from "../models/manifest.js";
import { verifyPackage, verifyPackageFiles, type TrustedKey, type VerifiedPackage } from "../models/signing.js";
import { copyFilesDurable, fsyncDir, TEMP_FILE_PREFIX, writeJsonAtomic } from "./durable.js";

/** Pointer to the active version, stored in `<stateDir>/models/active.json`. */
export interface ActivePointer {
  id: string;
  /** Absolute folder of the version when it was activated; readers use `versions/<id>` under the store root. */
  dir: string;
  /** Hex sha256 of the version's manifest.json, which pins the sha256 of every other file. */
  sha256: string;
  activatedAt: string;
  /** The version that was active before this one, which resolveActive falls back to. */
  previous: string | null;
  /** Earlier active versions, most recent first, without the active one; rollback walks this list. */
  history: string[];
}

export interface StoredVersion {
  id: string;
  dir: string;
  name: string | null;
  version: string | null;
  active: boolean;
  previous: boolean;
  /** Modification time of the version folder, in ms since the epoch. */
  modifiedAt: number;
}

/** The model package an agent should run, as chosen by resolveActive. */
export interface ResolvedModel {
  dir: string;
  id: string;
  source: "store" | "bundled";
  /** True when the chosen package is not the one active.json points to. */
  fellBack: boolean;
  /** Reason the store's active version was not used, set when fellBack is true or active.json is missing. */
  reason?: string;
  manifest: ModelManifest;
}

export interface ModelStoreOptions {
  /** Keys that may sign installed packages. */
  trustedKeys: readonly TrustedKey[];
  logger?: Logger;
}

/** A store operation that cannot be done: unknown version, nothing to roll back to, a protected version. */
export class ModelStoreError extends SortlineError {}

const STAGING_PREFIX = ".staging-";
const TRASH_PREFIX = ".trash-";
const MAX_HISTORY = 16;
const VERSION_ID = /^[A-Za-z0-9][A-Za-z0-9._+-]*-[0-9a-f]{12}$/;

/** Returns the store id of a package: `<name>-<version>-<first 12 hex of the manifest sha256>`. */
export function packageId(manifest: Pick<ModelManifest, "name" | "version">, manifestSha256: string): string {
  return `${manifest.name}-${manifest.version}-${manifestSha256.slice(0, 12)}`;
}

function randomSuffix(): string {
  return randomBytes(6).toString("hex");
}

function parsePointer(text: string, file: string): ActivePointer {
  let document: Partial<ActivePointer>;
  try {
    document = JSON.parse(text) as Partial<ActivePointer>;
  } catch (error) {
    throw new ModelStoreError(`${file} is not valid JSON: ${(error as Error).message}`);
  }
  const isId = (value: unknown): value is string => typeof value === "string" && VERSION_ID.test(value);
  if (typeof document !== "object" || document === null || !isId(document.id)) {
    throw new ModelStoreError(`${file} is invalid: id is missing or not a version id`);
  }
  if (typeof document.sha256 !== "string" || typeof document.activatedAt !== "string" || typeof document.dir !== "string") {
    throw new ModelStoreError(`${file} is invalid: dir, sha256 and activatedAt must be strings`);
  }
  if (document.previous !== null && !isId(document.previous)) {
    throw new ModelStoreError(`${file} is invalid: previous must be a version id or null`);
  }
  if (!Array.isArray(document.history) || !document.history.every(isId)) {
    throw new ModelStoreError(`${file} is invalid: history must be a list of version ids`);
  }
  return document as ActivePointer;
}

/**
 * Signed model packages on the device, under `<stateDir>/models/`: one folder per version in
 * `versions/<id>/` and the pointer `active.json`.
 *
 * Every step that changes the store is crash-safe. A package is copied and fsynced into a
 * staging folder, verified, then renamed into `versions/`. The pointer is replaced by an atomic
 * rename. Removed versions are renamed away before deletion. A process killed at any moment
 * leaves only dot-prefixed leftovers, which `open` deletes. The store assumes a single writer:
 * one agent process per state folder.
 */
export class ModelStore {
  readonly root: string;
  readonly versionsDir: string;
  readonly pointerFile: string;
  private readonly scratchDir: string;
  private readonly logger: Logger;

  private constructor(
    stateDir: string,
    private readonly options: ModelStoreOptions,
  ) {
    this.root = path.join(path.resolve(stateDir), "models");
    this.versionsDir = path.join(this.root, "versions");
    this.pointerFile = path.join(this.root, "active.json");
    this.scratchDir = path.join(this.root, "incoming");
    this.logger = options.logger ?? silentLogger;
  }

  /** Opens the store, creating its folders, and deletes what interrupted operations left behind. */
  static async open(stateDir: string, options: ModelStoreOptions): Promise<ModelStore> {
    const store = new ModelStore(stateDir, options);
    await mkdir(store.versionsDir, { recursive: true });
    await store.sweep();
    return store;
  }

  private async sweep(): Promise<void> {
    const leftovers: string[] = [];
    for (const name of await readdir(this.versionsDir)) {
      if (name.startsWith(STAGING_PREFIX) || name.startsWith(TRASH_PREFIX)) {
        leftovers.push(path.join(this.versionsDir, name));
      }
    }
    for (const name of await readdir(this.root)) {
      if (name.startsWith(TEMP_FILE_PREFIX)) {
        leftovers.push(path.join(this.root, name));
      }
    }
    leftovers.push(this.scratchDir);
    for (const leftover of leftovers) {
      await rm(leftover, { recursive: true, force: true });
    }
    if (leftovers.length > 1) {
      this.logger.info({ removed: leftovers.length - 1 }, "model store: removed leftovers of interrupted operations");
    }
  }

  /** Creates an empty folder under `<root>/incoming/` for unpacking; `open` deletes whatever is left there. */
  async createScratchDir(prefix: string): Promise<string> {
    const dir = path.join(this.scratchDir, `${prefix}-${randomSuffix()}`);
    await mkdir(dir, { recursive: true });
    return dir;
  }

  /** Returns the folder of a version id, after checking that the id has the store's form. */
  versionDir(id: string): string {
    if (!VERSION_ID.test(id)) {
      throw new ModelStoreError(`invalid version id '${id}': expected <name>-<version>-<12 hex digits>`);
    }
    return path.join(this.versionsDir, id);
  }

  /** Verifies a stored version: signature by a trusted key and the sha256 of every file. */
  async verify(id: string): Promise<VerifiedPackage> {
    return verifyPackage(this.versionDir(id), this.options.trustedKeys);
  }

  /**
   * Copies a package folder into the store and returns its id. The copy is verified before it
   * becomes visible under `versions/`. Installing a version that is already stored and intact
   * returns its id without copying; a stored copy that no longer verifies is replaced.
   */
  async install(packageDir: string): Promise<string> {
    const staging = path.join(this.versionsDir, `${STAGING_PREFIX}${randomSuffix()}`);
    await mkdir(staging);
    let id: string;
    try {
      await copyFilesDurable(packageDir, staging);
      const verified = await verifyPackage(staging, this.options.trustedKeys);
      id = packageId(verified.manifest, verified.manifestSha256);
      if (!VERSION_ID.test(id)) {
        throw new ModelStoreError(`cannot install ${packageDir}: its name '${verified.manifest.name}' must start with a letter or digit`);
      }
    } catch (error) {
      await rm(staging, { recursive: true, force: true });
      throw error;
    }

    const target = this.versionDir(id);
    if (await this.exists(target)) {
      try {
        await this.verify(id);
        await rm(staging, { recursive: true, force: true });
        this.logger.info({ version: id }, "model store: version already installed");
        return id;
      } catch (error) {
        this.logger.warn({ version: id, err: describeError(error) }, "model store: replacing a stored version that no longer verifies");
        await this.moveToTrash(target);
      }
    }
    await rename(staging, target);
    await fsyncDir(this.versionsDir);
    await this.emptyTrash();
    this.logger.info({ version: id }, "model store: version installed");
    return id;
  }

  private async exists(file: string): Promise<boolean> {
    try {
      await stat(file);
      return true;
    } catch {
      return false;
    }
  }

  private async moveToTrash(dir: string): Promise<void> {
    await rename(dir, path.join(this.versionsDir, `${TRASH_PREFIX}${randomSuffix()}`));
    await fsyncDir(this.versionsDir);
  }

  private async emptyTrash(): Promise<void> {
    for (const name of await readdir(this.versionsDir)) {
      if (name.startsWith(TRASH_PREFIX)) {
        await rm(path.join(this.versionsDir, name), { recursive: true, force: true });
      }
    }
  }

  /** Returns the active pointer, or null when no version was activated. Throws ModelStoreError when active.json is invalid. */
  async readPointer(): Promise<ActivePointer | null> {
    let text: string;
    try {
      text = await readFile(this.pointerFile, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") {
        return null;
      }
      throw error;
    }
    return parsePointer(text, this.pointerFile);
  }

  /** Returns the active pointer, or null when active.json is missing or invalid, which is logged. */
  private async currentPointer(): Promise<ActivePointer | null> {
    try {
      return await this.readPointer();
    } catch (error) {
      if (!(error instanceof ModelStoreError)) {
        throw error;
      }
      this.logger.warn({ err: describeError(error) }, "model store: active.json is invalid; it will be replaced");
      return null;
    }
  }

  private async writePointer(id: string, manifestSha256: string, history: string[]): Promise<ActivePointer> {
    const pointer: ActivePointer = {
      id,
      dir: this.versionDir(id),
      sha256: manifestSha256,
      activatedAt: new Date().toISOString(),
      previous: history[0] ?? null,
      history: history.slice(0, MAX_HISTORY),
    };
    await writeJsonAtomic(this.pointerFile, pointer);
    return pointer;
  }

  /** Verifies a stored version and makes it the active one; the version active until now becomes `previous`. */
  async activate(id: string): Promise<ActivePointer> {
    const verified = await this.verify(id);
    const current = await this.currentPointer();
    if (current?.id === id) {
      return current;
    }
    const history = current ? [current.id, ...current.history] : [];
    const pointer = await this.writePointer(id, verified.manifestSha256, [...new Set(history)].filter((entry) => entry !== id));
    this.logger.info({ version: id, previous: pointer.previous }, "model store: version activated");
    return pointer;
  }

  /**
   * Activates the most recent earlier version that still verifies and returns its id. The
   * version rolled back from, and any skipped because they failed verification, leave the
   * history, so neither becomes a fallback target later.
   */
  async rollback(): Promise<string> {
    const current = await this.currentPointer();
    if (!current) {
      throw new ModelStoreError("cannot roll back: no version is active");
    }
    for (const [position, id] of current.history.entries()) {
      let verified: VerifiedPackage;
      try {
        verified = await this.verify(id);
      } catch (error) {
        this.logger.warn({ version: id, err: describeError(error) }, "model store: skipping an earlier version that does not verify");
        continue;
      }
      await this.writePointer(id, verified.manifestSha256, current.history.slice(position + 1));
      this.logger.warn({ version: id, from: current.id }, "model store: rolled back");
      return id;
    }
    throw new ModelStoreError(`cannot roll back from ${current.id}: no earlier version verifies`);
  }

  /** Deletes active.json, so that resolveActive returns the bundled default package. */
  async deactivate(): Promise<void> {
    await rm(this.pointerFile, { force: true });
    await fsyncDir(this.root);
    this.logger.warn("model store: no version is active; the bundled default model applies");
  }

  /** Lists the stored versions, newest folder first. */
  async list(): Promise<StoredVersion[]> {
    const pointer = await this.currentPointer();
    const versions: StoredVersion[] = [];
    for (const id of await readdir(this.versionsDir)) {
      if (!VERSION_ID.test(id)) {
        continue;
      }
      const dir = path.join(this.versionsDir, id);
      let manifest: Partial<ModelManifest> = {};
      try {
        manifest = JSON.parse(await readFile(path.join(dir, "manifest.json"), "utf8")) as Partial<ModelManifest>;
      } catch {
        // A version without a readable manifest is still listed, so that prune can delete it.
      }
      versions.push({
        id,
        dir,
        name: typeof manifest.name === "string" ? manifest.name : null,
        version: typeof manifest.version === "string" ? manifest.version : null,
        active: pointer?.id === id,
        previous: pointer?.previous === id,
        modifiedAt: (await stat(dir)).mtimeMs,
      });
    }
    return versions.sort((a, b) => b.modifiedAt - a.modifiedAt);
  }

  /**
   * Deletes stored versions beyond the `keep` most recent and returns their ids. The active and
   * the previous version are always kept, even when `keep` is smaller than 2. Versions in the
   * rollback history rank before others, then newer folders before older ones.
   */
  async prune(keep = 3): Promise<string[]> {
    const pointer = await this.currentPointer();
    const versions = await this.list();
    const ranked = [
      ...(pointer ? [pointer.id, ...(pointer.previous ? [pointer.previous] : []), ...pointer.history] : []),
      ...versions.map((version) => version.id),
    ];
    const protectedIds = new Set(pointer ? [pointer.id, pointer.previous].filter((id): id is string => id !== null) : []);
    const keptIds = new Set(protectedIds);
    for (const id of ranked) {
      if (keptIds.size >= keep) {
        break;
      }
      if (versions.some((version) => version.id === id)) {
        keptIds.add(id);
      }
    }
    const removed: string[] = [];
    for (const version of versions) {
      if (!keptIds.has(version.id)) {
        await this.moveToTrash(version.dir);
        removed.push(version.id);
      }
    }
    await this.emptyTrash();
    if (removed.length) {
      this.logger.info({ removed, kept: [...keptIds] }, "model store: pruned old versions");
    }
    return removed;
  }

  /** Deletes one stored version. The active and the previous version cannot be removed. */
  async remove(id: string): Promise<void> {
    const dir = this.versionDir(id);
    const pointer = await this.currentPointer();
    if (pointer && (pointer.id === id || pointer.previous === id)) {
      throw new ModelStoreError(`cannot remove ${id}: it is the ${pointer.id === id ? "active" : "previous"} version`);
    }
    if (!(await this.exists(dir))) {
      return;
    }
    await this.moveToTrash(dir);
    await this.emptyTrash();
    this.logger.info({ version: id }, "model store: version removed");
  }

  /**
   * Chooses the package the agent should run. That is the active version if it verifies
   * (signature and sha256 of every file), else the previous version if it verifies, else the
   * bundled default. The bundled default is checked by sha256 only, because it ships with the
   * software. Throws ModelLoadError when even the bundled default fails its check.
   */
  async resolveActive(options: { bundledDefault: string; trustedKeys?: readonly TrustedKey[] }): Promise<ResolvedModel> {
    const trustedKeys = options.trustedKeys ?? this.options.trustedKeys;
    const reasons: string[] = [];
    let pointer: ActivePointer | null = null;
    let pointerFailed = false;
    try {
      pointer = await this.readPointer();
    } catch (error) {
      pointerFailed = true;
      reasons.push(describeError(error));
    }

    const candidates = pointer ? [pointer.id, ...(pointer.previous ? [pointer.previous] : [])] : [];
    for (const id of candidates) {
      try {
        const verified = await verifyPackage(this.versionDir(id), trustedKeys);
        const fellBack = id !== pointer!.id;
        const resolved: ResolvedModel = { dir: verified.dir, id, source: "store", fellBack, manifest: verified.manifest };
        if (fellBack) {
          resolved.reason = reasons.join("; ");
          this.logger.warn({ version: id, active: pointer!.id, reason: resolved.reason }, "model store: active version does not verify; using the previous one");
        }
        return resolved;
      } catch (error) {
        reasons.push(`version ${id} does not verify: ${describeError(error)}`);
      }
    }

    const bundledDefault = path.resolve(options.bundledDefault);
    let pkg;
    try {
      pkg = await verifyPackageFiles(bundledDefault);
    } catch (error) {
      throw new ModelLoadError(`no usable model: ${[...reasons, `bundled default ${bundledDefault}: ${describeError(error)}`].join("; ")}`, { cause: error });
    }
    const manifestSha256 = createHash("sha256").update(await readFile(path.join(bundledDefault, "manifest.json"))).digest("hex");
    const fellBack = pointer !== null || pointerFailed;
    const resolved: ResolvedModel = { dir: bundledDefault, id: packageId(pkg.manifest, manifestSha256), source: "bundled", fellBack, manifest: pkg.manifest };
    if (fellBack) {
      resolved.reason = reasons.join("; ");
      this.logger.warn({ reason: resolved.reason }, "model store: no stored version verifies; using the bundled default model");
    } else {
      resolved.reason = "no version is active";
    }
    return resolved;
  }
}
