"""The training job in Spark's local-cluster mode: executors are separate JVMs with their own Python
workers, so anything that only lives in the driver process (files, globals, the backbone path)
would fail here while it passes in local mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_trashnet_subset

CLASSES = ("glass", "metal", "paper")
IMAGES_PER_CLASS = 6


@pytest.fixture(scope="module")
def small_set(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_trashnet_subset(datasets, tmp_path_factory.mktemp("cluster") / "images", CLASSES, IMAGES_PER_CLASS)


def test_train_in_local_cluster_mode(small_set: Path, backbone: tuple[Path, dict]) -> None:
    out = small_set.parent / "package"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Two executor JVMs with one core and 1024 MB each; the job runs in its own process because
    # a Python process can have only one SparkContext and the test session already has a local one.
    command = [
        sys.executable, "-m", "sortline_spark.train",
        "--data", str(small_set), "--out", str(out), "--name", "cluster-test", "--version", "0.1.0",
        "--master", "local-cluster[2,1,1024]", "--validation-fraction", "0.34",
        "--hidden", "16", "--epochs", "3", "--calibration-images", "4", "--latency-runs", "1",
        "--feature-cache", str(small_set.parent / "features"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["model"] == str(out)
    assert manifest["training"]["sparkMaster"] == "local-cluster[2,1,1024]"
    assert manifest["labels"] == list(CLASSES)
    assert manifest["training"]["data"]["images"] + manifest["training"]["validation"]["images"] == len(CLASSES) * IMAGES_PER_CLASS
    assert (out / "model.onnx").stat().st_size == manifest["file"]["bytes"]
