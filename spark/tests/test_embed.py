"""Image listing, the content-hash split and the cached Spark feature job on a real local session."""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from sortline_spark.embed import FeatureJob, LabelledImage, list_images, split_of

# stage4 (1024) followed by embedding (2048), the default FeatureJob outputs.
FEATURE_SIZE = 1024 + 2048

# Photos per class embedded by the feature job tests, kept small because ResNet-50 runs on the CPU.
EMBEDDED_PER_CLASS = 2
EMBEDDED_PHOTOS = 3 * EMBEDDED_PER_CLASS


class _ListHandler(logging.Handler):
    """Keep the formatted messages of the records it receives."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class FeatureRuns:
    """Two feature runs over the same images with one cache, and the cache row count after each."""

    folder: Path
    corrupt: Path
    duplicate: Path
    missing: Path
    hashed: pd.DataFrame
    first: pd.DataFrame
    second: pd.DataFrame
    rows_after_first: int
    rows_after_second: int
    log_messages: list[str]


def _cache_rows(cache: Path) -> int:
    return pq.read_table(cache).num_rows


@pytest.fixture(scope="module")
def feature_runs(
    spark: SparkSession, backbone: tuple[Path, dict], photo_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> FeatureRuns:
    folder = tmp_path_factory.mktemp("embed") / "images"
    for class_folder in sorted(photo_folder.iterdir()):
        (folder / class_folder.name).mkdir(parents=True)
        for photo in sorted(class_folder.glob("*.jpg"))[:EMBEDDED_PER_CLASS]:
            shutil.copyfile(photo, folder / class_folder.name / photo.name)
    corrupt = folder / "glass" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after the marker")
    original = sorted((folder / "metal").glob("*.jpg"))[0]
    duplicate = folder / "metal" / f"copy-of-{original.name}"
    shutil.copyfile(original, duplicate)
    missing = folder / "glass" / "deleted.jpg"
    cache = folder.parent / "features"

    path, provenance = backbone
    job = FeatureJob(spark, path, provenance["backboneId"], cache)
    images = list_images(folder) + [LabelledImage(str(missing), "glass")]

    handler = _ListHandler()
    logger = logging.getLogger("sortline_spark.embed")
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        hashed = job.hash_images(images)
        first = job.features(hashed)
        rows_after_first = _cache_rows(cache)
        second = job.features(hashed)
        rows_after_second = _cache_rows(cache)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

    return FeatureRuns(folder, corrupt, duplicate, missing, hashed, first, second,
                       rows_after_first, rows_after_second, handler.messages)


def _row(frame: pd.DataFrame, path: Path, view: str) -> pd.Series:
    match = frame[(frame["path"] == str(path)) & (frame["view"] == view)]
    assert len(match) == 1, f"expected one row for {path} / {view}, found {len(match)}"
    return match.iloc[0]


def test_list_images_folder(tmp_path: Path, photo_folder: Path) -> None:
    folder = tmp_path / "images"
    shutil.copytree(photo_folder, folder)
    (folder / "glass" / "notes.txt").write_text("not an image")
    (folder / "glass" / "nested").mkdir()
    shutil.copyfile(next((folder / "paper").glob("*.jpg")), folder / "glass" / "nested" / "deep.JPG")
    (folder / "stray.jpg").write_bytes(b"outside any class folder")

    images = list_images(folder)

    assert len(images) == 3 * 6 + 1
    assert {image.label for image in images} == {"glass", "metal", "paper"}
    assert LabelledImage(str((folder / "glass" / "nested" / "deep.JPG").resolve()), "glass") in images
    assert all(Path(image.path).is_absolute() for image in images)
    assert not any(image.path.endswith(("notes.txt", "stray.jpg")) for image in images)


def test_list_images_manifest(tmp_path: Path, photo_folder: Path) -> None:
    photos = sorted(photo_folder.glob("*/*.jpg"))
    (tmp_path / "data").mkdir()
    shutil.copyfile(photos[0], tmp_path / "data" / "a.jpg")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,label\ndata/a.jpg,glass\n{photos[7]},metal\n")

    images = list_images(manifest)

    assert images == [
        LabelledImage(str((tmp_path / "data" / "a.jpg").resolve()), "glass"),
        LabelledImage(str(photos[7].resolve()), "metal"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label\ndata/a.jpg,glass\ndata/b.jpg,\n", ":3: a manifest row needs both"),
        ("path,label\n,glass\n", ":2: a manifest row needs both"),
        ("file,class\ndata/a.jpg,glass\n", ":2: a manifest row needs both"),
        ("path,label\n", "no images found"),
    ],
    ids=["missing-label", "missing-path", "wrong-columns", "no-rows"],
)
def test_list_images_bad_manifest(tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)

    with pytest.raises(ValueError, match=message):
        list_images(manifest)


def test_list_images_missing_or_empty_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder or a manifest"):
        list_images(tmp_path / "absent")
    (tmp_path / "empty" / "glass").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        list_images(tmp_path / "empty")


def test_split_of_deterministic() -> None:
    sha = hashlib.sha256(b"photo").hexdigest()

    assert len({split_of(sha, 0.3) for _ in range(5)}) == 1
    assert split_of(sha, 0.0) == "train"


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_of_fraction(fraction: float) -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]

    share = sum(split_of(sha, fraction) == "validation" for sha in hashes) / len(hashes)

    # The binomial standard deviation at n = 20000 is at most 0.0036.
    assert share == pytest.approx(fraction, abs=0.015)


def test_split_of_nested_fractions() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2_000)]

    small = {sha for sha in hashes if split_of(sha, 0.1) == "validation"}
    large = {sha for sha in hashes if split_of(sha, 0.3) == "validation"}
    salted = {sha for sha in hashes if split_of(sha, 0.3, salt="other") == "validation"}

    assert small <= large
    assert salted != large


def test_hash_images(feature_runs: FeatureRuns) -> None:
    hashed = feature_runs.hashed.set_index("path")

    # The photos, the corrupt file, the duplicate and the missing file.
    assert len(hashed) == EMBEDDED_PHOTOS + 3
    assert hashed.loc[str(feature_runs.duplicate), "sha256"] == hashlib.sha256(feature_runs.duplicate.read_bytes()).hexdigest()
    assert hashed.loc[str(feature_runs.missing), "sha256"].startswith("unreadable:")


def test_features_first_run_computes_all(feature_runs: FeatureRuns) -> None:
    # The photos and the corrupt file in two views. The duplicate adds no cache row and the
    # missing file is never embedded, but both count as requested pairs.
    computed, requested = (EMBEDDED_PHOTOS + 1) * 2, (EMBEDDED_PHOTOS + 3) * 2
    assert feature_runs.rows_after_first == computed
    assert f"feature cache: {computed} of {requested} (image, view) pairs to compute" in feature_runs.log_messages


def test_features_second_run_computes_none(feature_runs: FeatureRuns) -> None:
    assert feature_runs.rows_after_second == feature_runs.rows_after_first
    requested = (EMBEDDED_PHOTOS + 3) * 2
    assert f"feature cache: 0 of {requested} (image, view) pairs to compute" in feature_runs.log_messages


def test_features_equal_across_runs(feature_runs: FeatureRuns) -> None:
    first, second = feature_runs.first, feature_runs.second
    good = first["error"].isna()

    assert list(first["path"]) == list(second["path"])
    assert list(first["view"]) == list(second["view"])
    # The photos and the duplicate, in two views.
    assert good.sum() == (EMBEDDED_PHOTOS + 1) * 2
    for a, b in zip(first.loc[good, "features"], second.loc[good, "features"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_features_shape_and_views(feature_runs: FeatureRuns) -> None:
    photo = sorted((feature_runs.folder / "paper").glob("*.jpg"))[0]
    centre = np.asarray(_row(feature_runs.first, photo, "centre")["features"], dtype=np.float32)
    flipped = np.asarray(_row(feature_runs.first, photo, "centre-hflip")["features"], dtype=np.float32)

    assert centre.shape == (FEATURE_SIZE,)
    assert np.isfinite(centre).all()
    assert not np.array_equal(centre, flipped)


def test_corrupt_file_gives_error_row(feature_runs: FeatureRuns) -> None:
    for view in ("centre", "centre-hflip"):
        row = _row(feature_runs.first, feature_runs.corrupt, view)
        assert row["features"] is None
        assert row["error"].startswith("ImageDecodeError: cannot decode image")


def test_missing_file_gives_error_row(feature_runs: FeatureRuns) -> None:
    row = _row(feature_runs.first, feature_runs.missing, "centre")

    assert row["features"] is None
    assert row["error"].startswith("unreadable:")


def test_duplicate_content_shares_features(feature_runs: FeatureRuns) -> None:
    original = feature_runs.folder / "metal" / feature_runs.duplicate.name.removeprefix("copy-of-")
    copy_row = _row(feature_runs.first, feature_runs.duplicate, "centre")
    original_row = _row(feature_runs.first, original, "centre")

    assert copy_row["sha256"] == original_row["sha256"]
    np.testing.assert_array_equal(np.asarray(copy_row["features"]), np.asarray(original_row["features"]))
