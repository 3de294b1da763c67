"""Model packages: a folder with ``model.onnx`` and ``manifest.json`` that the agent runs as is."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

from .backbone import sha256_file
from .convert import EMBEDDING, PIXELS, PROBABILITIES
from .images import ResizePolicy

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.+-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def build_manifest(
    *,
    name: str,
    version: str,
    labels: list[str],
    policy: ResizePolicy,
    model_path: Path,
    precision: str,
    backbone: dict,
    training: dict,
    metrics: dict,
    quantization: dict | None = None,
) -> dict:
    """Return the manifest of a model file; the field names match ``src/models/manifest.ts``.

    Raises
    ------
    ValueError
        If the name or version is not in the accepted form.
    """
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} may only contain letters, digits, '.', '_' and '-'")
    if not _SEMVER.match(version):
        raise ValueError(f"model version {version!r} is not a semantic version such as 1.2.0")
    manifest = {
        "schemaVersion": 1,
        "name": name,
        "version": version,
        "createdAt": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "labels": labels,
        "input": {"name": PIXELS, "dtype": "uint8", "layout": "NHWC", "pixelFormat": "RGB",
                  "shape": [None, policy.crop, policy.crop, 3]},
        "outputs": {"probabilities": PROBABILITIES, "embedding": EMBEDDING},
        "preprocess": policy.to_manifest(),
        "file": {"name": MODEL_FILE, "sha256": sha256_file(model_path), "bytes": model_path.stat().st_size},
        "precision": precision,
        "backbone": backbone,
        "training": training,
        "metrics": metrics,
    }
    if quantization:
        manifest["quantization"] = quantization
    return manifest


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename)."""
    path = folder / MANIFEST_FILE
    partial = folder / f".{MANIFEST_FILE}.partial"
    with open(partial, "w") as handle:
        handle.write(json.dumps(manifest, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST_FILE).read_text())
