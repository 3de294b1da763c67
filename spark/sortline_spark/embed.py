"""Distributed feature extraction with an embedding cache in Parquet.

Each image is read, hashed and embedded inside Spark tasks; the driver only lists paths. The
cache contains one row per (backbone id, view, content sha256), so retraining, a new split or a
new class never recomputes a feature that was computed before.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark import SparkFiles
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .images import ImageDecodeError, ResizePolicy, prepare

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".heic", ".avif"}

# Augmented views embedded for training; "centre" is the view the agent classifies at run time.
VIEWS = ("centre", "centre-hflip")

CACHE_SCHEMA = T.StructType([
    T.StructField("backbone_id", T.StringType(), False),
    T.StructField("view", T.StringType(), False),
    T.StructField("sha256", T.StringType(), False),
    T.StructField("features", T.ArrayType(T.FloatType()), True),
    T.StructField("error", T.StringType(), True),
])


@dataclass(frozen=True)
class LabelledImage:
    path: str
    label: str


def list_images(source: str | Path) -> list[LabelledImage]:
    """List a labelled image set.

    Parameters
    ----------
    source
        A folder with one subfolder per class (the subfolder name is the label, searched
        recursively), or a CSV manifest with ``path`` and ``label`` columns (relative paths
        are resolved against the manifest's folder).

    Raises
    ------
    ValueError
        If the source contains no images or a manifest row lacks a path or label.
    """
    source = Path(source)
    images: list[LabelledImage] = []
    if source.is_file():
        with open(source, newline="") as handle:
            for row_number, row in enumerate(csv.DictReader(handle), start=2):
                path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not path or not label:
                    raise ValueError(f"{source}:{row_number}: a manifest row needs both 'path' and 'label'")
                resolved = Path(path) if os.path.isabs(path) else source.parent / path
                images.append(LabelledImage(str(resolved.resolve()), label))
    elif source.is_dir():
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(LabelledImage(str(path.resolve()), class_dir.name))
    else:
        raise ValueError(f"{source}: not a folder or a manifest file")
    if not images:
        raise ValueError(f"{source}: no images found (expected one subfolder per class, or a CSV manifest)")
    return images


def view_pixels(data: bytes, view: str, policy: ResizePolicy) -> np.ndarray:
    """Return the model input of one augmented view of an encoded image."""
    pixels = prepare(data, policy)
    if view == "centre":
        return pixels
    if view == "centre-hflip":
        return np.ascontiguousarray(pixels[:, ::-1, :])
    raise ValueError(f"unknown view {view!r}; known views: {', '.join(VIEWS)}")


def _hash_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for frame in batches:
        hashes = []
        for path in frame["path"]:
            try:
                with open(path, "rb") as handle:
                    hashes.append(hashlib.sha256(handle.read()).hexdigest())
            except OSError as error:
                hashes.append(f"unreadable:{error.strerror}:{path}")
        yield frame.assign(sha256=hashes)


def task_session(file_name: str):
    """Open an onnxruntime CPU session on a file shipped to the executors with ``SparkContext.addFile``.

    Spark runs one task per core, so each session gets one thread unless ``SORTLINE_ORT_THREADS`` says otherwise.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("SORTLINE_ORT_THREADS", "1"))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(SparkFiles.get(file_name), options, providers=["CPUExecutionProvider"])


def _embed_partition_fn(backbone_file: str, backbone_id: str, policy: ResizePolicy, batch_size: int, outputs: list[str]):
    def embed(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        session = task_session(backbone_file)
        for frame in batches:
            rows = []
            for start in range(0, len(frame), batch_size):
                chunk = frame.iloc[start:start + batch_size]
                pixels, good = [], []
                for path, view, sha in zip(chunk["path"], chunk["view"], chunk["sha256"]):
                    try:
                        with open(path, "rb") as handle:
                            pixels.append(view_pixels(handle.read(), view, policy))
                        good.append((view, sha))
                    except (OSError, ImageDecodeError) as error:
                        rows.append((backbone_id, view, sha, None, f"{type(error).__name__}: {error}"))
                if pixels:
                    results = session.run(outputs, {"pixels": np.stack(pixels)})
                    features = np.concatenate(results, axis=1).astype(np.float32)
                    for (view, sha), vector in zip(good, features):
                        rows.append((backbone_id, view, sha, vector.tolist(), None))
            yield pd.DataFrame(rows, columns=[f.name for f in CACHE_SCHEMA.fields])
    return embed


@dataclass
class FeatureJob:
    """Embeds a labelled image set with a backbone, reusing the Parquet cache."""

    spark: SparkSession
    backbone_path: Path
    backbone_id: str
    cache_path: Path
    policy: ResizePolicy = ResizePolicy()
    # Backbone outputs concatenated into the feature vector, in this order.
    outputs: tuple[str, ...] = ("stage4", "embedding")
    batch_size: int = 8

    def hash_images(self, images: list[LabelledImage]) -> pd.DataFrame:
        """Return path, label and content sha256 of every image, hashed inside Spark tasks.

        Unreadable files get ``sha256`` = ``unreadable:<reason>:<path>`` instead of a hash.
        """
        frame = self.spark.createDataFrame([(i.path, i.label) for i in images], "path string, label string")
        partitions = max(self.spark.sparkContext.defaultParallelism, 1)
        hashed_schema = "path string, label string, sha256 string"
        return frame.repartition(partitions).mapInPandas(_hash_partition, hashed_schema).toPandas()

    def _cached(self) -> DataFrame | None:
        if not any(self.cache_path.glob("**/*.parquet")):
            return None
        return self.spark.read.schema(CACHE_SCHEMA).parquet(str(self.cache_path)).where(
            F.col("backbone_id") == self.backbone_id
        )

    def features(self, hashed: pd.DataFrame, views: tuple[str, ...] = VIEWS) -> pd.DataFrame:
        """Return path, label, sha256, view, features and error for every image and view.

        Features missing from the cache are computed across partitions and appended to the
        cache first. A failed decode is cached as an error, so it is not retried either.
        """
        wanted = self.spark.createDataFrame(hashed[["path", "label", "sha256"]]).crossJoin(
            self.spark.createDataFrame([(v,) for v in views], "view string")
        ).cache()
        cached = self._cached()
        missing = wanted if cached is None else wanted.join(cached.select("view", "sha256"), ["view", "sha256"], "left_anti")
        missing = missing.dropDuplicates(["view", "sha256"]).where(~F.col("sha256").startswith("unreadable:"))
        count = missing.count()
        log.info("feature cache: %d of %d (image, view) pairs to compute", count, wanted.count())
        if count:
            self.spark.sparkContext.addFile(str(self.backbone_path))
            partitions = max(self.spark.sparkContext.defaultParallelism, 1) * 4
            embed = _embed_partition_fn(
                self.backbone_path.name, self.backbone_id, self.policy, self.batch_size, list(self.outputs)
            )
            computed = missing.repartition(partitions).mapInPandas(embed, CACHE_SCHEMA)
            computed.write.mode("append").parquet(str(self.cache_path))
        cached = self._cached().dropDuplicates(["view", "sha256"])
        joined = wanted.join(cached, ["view", "sha256"], "left").select(
            "path", "label", "sha256", "view", "features",
            F.when(F.col("sha256").startswith("unreadable:"), F.col("sha256")).otherwise(F.col("error")).alias("error"),
        )
        result = joined.toPandas()
        wanted.unpersist()
        return result.drop_duplicates(["path", "view"]).sort_values(["path", "view"]).reset_index(drop=True)


def split_of(sha256: str, validation_fraction: float, salt: str = "sortline-split-v1") -> str:
    """Assign an image to "train" or "validation" from its content hash alone.

    The assignment does not depend on file names, order or the other images, so adding images
    never moves an existing one between the splits, and duplicates land in the same split.
    """
    bucket = int(hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_fraction else "train"
