"""Class centroids of a model in embedding space, for novelty scores on the agent.

``knowledge.json`` contains, per class, the unit-length centroid of the L2-normalised training
embeddings and quantiles of their cosine distance to it. The agent divides a frame's distance
to the nearest centroid by that class's 95th percentile: above 1, the frame lies outside the
usual spread of every class the model was trained on.

Run ``python -m sortline_spark.knowledge --help`` to add the file to an existing package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from .backbone import sha256_file

KNOWLEDGE_FILE = "knowledge.json"
EMBEDDING_DIM = 2048

log = logging.getLogger(__name__)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def build_knowledge(embeddings: np.ndarray, targets: np.ndarray, labels: list[str]) -> dict:
    """Return the knowledge document for embeddings (N x D) with class indices ``targets``.

    Raises
    ------
    ValueError
        If a class has no embedding or the shapes disagree.
    """
    if embeddings.ndim != 2 or len(embeddings) != len(targets):
        raise ValueError(f"expected N x D embeddings and N targets, got {embeddings.shape} and {len(targets)}")
    unit = _unit(embeddings.astype(np.float64))
    classes = []
    for index, label in enumerate(labels):
        members = unit[targets == index]
        if not len(members):
            raise ValueError(f"class {label!r} has no training embedding")
        centroid = _unit(members.mean(axis=0))
        distances = 1.0 - members @ centroid
        classes.append({
            "label": label,
            "count": int(len(members)),
            "p50": float(np.quantile(distances, 0.5)),
            "p95": float(np.quantile(distances, 0.95)),
            "centroid": [round(float(v), 6) for v in centroid],
        })
    return {"version": 1, "output": "embedding", "dim": int(embeddings.shape[1]), "classes": classes}


def novelty(embeddings: np.ndarray, knowledge: dict) -> np.ndarray:
    """Distance to the nearest centroid over that class's 95th percentile distance, per row."""
    centroids = np.array([c["centroid"] for c in knowledge["classes"]], dtype=np.float64)
    spread = np.array([max(c["p95"], 1e-6) for c in knowledge["classes"]])
    distances = 1.0 - _unit(embeddings.astype(np.float64)) @ centroids.T
    return (distances / spread).min(axis=1)


def write_knowledge(folder: Path, knowledge: dict) -> dict:
    """Write ``knowledge.json`` atomically and return the manifest entry that names it."""
    path = Path(folder) / KNOWLEDGE_FILE
    partial = path.with_name(f".{KNOWLEDGE_FILE}.partial")
    with open(partial, "w") as handle:
        handle.write(json.dumps(knowledge, separators=(",", ":")) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return {"file": KNOWLEDGE_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def add_to_package(folder: Path, datasets: list[str], validation_fraction: float, master: str | None,
                   feature_cache: Path | None) -> dict:
    """Compute knowledge from the training split of ``datasets`` and add it to an existing package."""
    from .backbone import build_backbone, cache_dir
    from .embed import FeatureJob, list_images, split_of
    from .package import read_manifest, write_manifest
    from .session import create_session

    manifest = read_manifest(folder)
    spark = create_session(master)
    backbone_path, provenance = build_backbone()
    job = FeatureJob(spark, backbone_path, provenance["backboneId"], feature_cache or cache_dir() / "features")
    hashed = job.hash_images([image for source in datasets for image in list_images(source)])
    hashed = hashed[~hashed["sha256"].str.startswith("unreadable:")]
    hashed = hashed[[split_of(sha, validation_fraction) == "train" for sha in hashed["sha256"]]]
    features = job.features(hashed.reset_index(drop=True), ("centre",))
    features = features[features["error"].isna() & features["label"].isin(manifest["labels"])]
    embeddings = np.stack([np.asarray(v, dtype=np.float32)[-EMBEDDING_DIM:] for v in features["features"]])
    targets = features["label"].map(manifest["labels"].index).to_numpy()
    manifest["knowledge"] = write_knowledge(folder, build_knowledge(embeddings, targets, manifest["labels"]))
    write_manifest(folder, manifest)
    return manifest["knowledge"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description="Add knowledge.json (class centroids in embedding space) to a model package.")
    parser.add_argument("--model", required=True, type=Path, help="model package folder")
    parser.add_argument("--data", action="append", required=True, help="the labelled images the model was trained on; repeatable")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="share held out when the model was trained")
    parser.add_argument("--master", help="Spark master URL (default: local[*])")
    parser.add_argument("--feature-cache", type=Path, help="Parquet embedding cache (default: ~/.cache/sortline/features)")
    args = parser.parse_args(argv)
    entry = add_to_package(args.model, args.data, args.validation_fraction, args.master, args.feature_cache)
    print(json.dumps({"model": str(args.model), "knowledge": entry}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
