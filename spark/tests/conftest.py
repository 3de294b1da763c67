"""Shared fixtures: one real local Spark session, the converted backbone and small real image sets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from sortline_spark.backbone import build_backbone
from sortline_spark.session import create_session

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_PHOTOS = REPO_ROOT / "demo" / "photos"

# Classes and images per class copied into the small image set.
FIXTURE_CLASSES = ("glass", "metal", "paper")
FIXTURE_IMAGES_PER_CLASS = 6


def copy_trashnet_subset(datasets: Path, root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """Copy the first ``per_class`` TrashNet photos by file name of each class into ``root/<class>/``."""
    for label in classes:
        (root / label).mkdir(parents=True)
        for photo in sorted((datasets / "trashnet" / label).glob("*.jpg"))[:per_class]:
            shutil.copyfile(photo, root / label / photo.name)
    return root


@pytest.fixture(scope="session")
def spark() -> SparkSession:
    """Return a real two-core local SparkSession, stopped after the last test."""
    session = create_session("local[2]", app_name="sortline-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def datasets() -> Path:
    """Return the datasets folder (``SORTLINE_DATASETS``, default ``<repo>/../shared/datasets``).

    Tests that need it are skipped when it has no ``trashnet/`` folder.
    """
    root = Path(os.environ.get("SORTLINE_DATASETS") or REPO_ROOT.parent / "shared" / "datasets")
    if not (root / "trashnet").is_dir():
        pytest.skip(f"TrashNet not found under {root}; set SORTLINE_DATASETS to the folder that holds trashnet/")
    return root


@pytest.fixture(scope="session")
def backbone() -> tuple[Path, dict]:
    """Return the converted ImageNet backbone and its provenance (fetched and converted once per machine)."""
    return build_backbone()


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder with one subfolder per class containing real TrashNet photos from ``demo/photos``."""
    root = tmp_path_factory.mktemp("photos")
    for label in FIXTURE_CLASSES:
        sources = sorted((DEMO_PHOTOS / label).glob("*.jpg"))[:FIXTURE_IMAGES_PER_CLASS]
        if len(sources) < FIXTURE_IMAGES_PER_CLASS:
            raise FileNotFoundError(f"{DEMO_PHOTOS / label} contains {len(sources)} photos, the fixture needs {FIXTURE_IMAGES_PER_CLASS}")
        (root / label).mkdir()
        for source in sources:
            shutil.copyfile(source, root / label / source.name)
    return root


@pytest.fixture(scope="session")
def photo_bytes() -> bytes:
    """Return one real 256x341 JPEG photo (TrashNet, short side already 256 px)."""
    return (DEMO_PHOTOS / "glass" / "glass143.jpg").read_bytes()
