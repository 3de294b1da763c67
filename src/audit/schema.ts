import type { Database } from "better-sqlite3";

import { silentLogger, type Logger } from "../lib/log.js";

/** One schema change, applied once to bring `PRAGMA user_version` from `version - 1` to `version`. */
export interface Migration {
  version: number;
  description: string;
  up(db: Database): void;
}

/**
 * Schema steps in order. Append new steps (for example `ALTER TABLE decisions ADD COLUMN ...`)
 * and never edit a released one, because databases in the field have already applied it.
 */
export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    description: "create the decisions table",
    up(db) {
      // Times are milliseconds since the Unix epoch, and latencies are milliseconds.
      db.exec(`
        CREATE TABLE decisions (
          id            INTEGER PRIMARY KEY,
          frame_id      TEXT    NOT NULL,
          source        TEXT    NOT NULL,
          captured_at   INTEGER NOT NULL,
          decided_at    INTEGER NOT NULL,
          model_name    TEXT    NOT NULL,
          model_version TEXT    NOT NULL,
          model_sha256  TEXT    NOT NULL,
          top_json      TEXT    NOT NULL,
          label         TEXT,
          confidence    REAL,
          bin           TEXT,
          reason        TEXT,
          queue_ms      REAL    NOT NULL,
          decode_ms     REAL    NOT NULL,
          inference_ms  REAL    NOT NULL,
          total_ms      REAL    NOT NULL,
          error         TEXT,
          truth         TEXT
        );
        CREATE INDEX decisions_decided_at ON decisions (decided_at);
        CREATE INDEX decisions_frame_id ON decisions (frame_id);
      `);
    },
  },
];

/** The schema version this build writes and reads. */
export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]!.version;

/** Reads `PRAGMA user_version`, the schema version stored in the database header. */
export function readSchemaVersion(db: Database): number {
  return db.pragma("user_version", { simple: true }) as number;
}

/**
 * Applies the pending migrations in one IMMEDIATE transaction, so two processes that open the
 * same new file at once cannot both apply a step. Returns the versions before and after.
 * The caller checks first that the stored version is not newer than SCHEMA_VERSION.
 */
export function migrate(db: Database, logger: Logger = silentLogger): { from: number; to: number } {
  const apply = db.transaction(() => {
    const from = readSchemaVersion(db);
    for (const step of MIGRATIONS) {
      if (step.version > from) {
        step.up(db);
        db.pragma(`user_version = ${step.version}`);
        logger.info({ schemaVersion: step.version, migration: step.description }, "audit schema migrated");
      }
    }
    return { from, to: readSchemaVersion(db) };
  });
  return apply.immediate();
}
