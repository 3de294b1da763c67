"""End-to-end training job on a small real image set: package contents, evaluation and split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from sortline_spark.backbone import sha256_file
from sortline_spark.embed import split_of
from sortline_spark.head import HeadConfig
from sortline_spark.images import ResizePolicy, prepare
from sortline_spark.train import TrainConfig, run

from conftest import copy_trashnet_subset

TRAIN_CLASSES = ("glass", "metal", "paper")
# The first seven TrashNet photos of each class by file name. A 0.34 content-hash split puts
# one or two of each class into validation, so every class has training images.
IMAGES_PER_CLASS = 7
VALIDATION_FRACTION = 0.34


@dataclass
class TrainRuns:
    """An INT8 run and an FP32 run over the same images, sharing one feature cache."""

    images: Path
    int8_out: Path
    fp32_out: Path
    int8_evaluation: dict
    fp32_evaluation: dict
    cache_rows_after_int8: int
    cache_rows_after_fp32: int


@pytest.fixture(scope="module")
def training_images(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_trashnet_subset(datasets, tmp_path_factory.mktemp("train") / "images", TRAIN_CLASSES, IMAGES_PER_CLASS)


@pytest.fixture(scope="module")
def train_runs(spark: SparkSession, backbone: tuple[Path, dict], training_images: Path) -> TrainRuns:
    work = training_images.parent
    cache = work / "features"

    def config(out: Path, int8: bool) -> TrainConfig:
        return TrainConfig(
            datasets=[str(training_images)],
            out=out,
            name="test-model",
            version="0.1.0",
            master="local[2]",
            validation_fraction=VALIDATION_FRACTION,
            head=HeadConfig(hidden=32, epochs=5),
            calibration_images=8,
            int8=int8,
            latency_runs=2,
            feature_cache=cache,
        )

    int8_evaluation = run(config(work / "int8-package", int8=True))
    rows_after_int8 = pq.read_table(cache).num_rows
    fp32_evaluation = run(config(work / "fp32-package", int8=False))
    rows_after_fp32 = pq.read_table(cache).num_rows
    return TrainRuns(training_images, work / "int8-package", work / "fp32-package", int8_evaluation, fp32_evaluation,
                     rows_after_int8, rows_after_fp32)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _expected_split(images: Path) -> dict[str, dict[str, int]]:
    """Return per-class image counts of each split, computed from the file contents."""
    counts: dict[str, dict[str, int]] = {"train": {}, "validation": {}}
    for path in sorted(images.glob("*/*.jpg")):
        split = split_of(hashlib.sha256(path.read_bytes()).hexdigest(), VALIDATION_FRACTION)
        counts[split][path.parent.name] = counts[split].get(path.parent.name, 0) + 1
    return counts


def test_package_files(train_runs: TrainRuns) -> None:
    package = train_runs.int8_out

    assert (package / "model.onnx").is_file()
    assert (package / "manifest.json").is_file()
    assert (package / "evaluation.json").is_file()
    assert (package / "evaluation.md").read_text().startswith("# Evaluation of test-model 0.1.0")
    for name in ("confusion-fp32.png", "confusion-int8.png"):
        assert (package / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (package.parent / f".{package.name}.work").exists()


def test_manifest_fields(train_runs: TrainRuns, backbone: tuple[Path, dict]) -> None:
    manifest = _manifest(train_runs.int8_out)
    model = train_runs.int8_out / "model.onnx"

    assert manifest["name"] == "test-model"
    assert manifest["version"] == "0.1.0"
    assert manifest["labels"] == list(TRAIN_CLASSES)
    assert manifest["input"] == {"name": "pixels", "dtype": "uint8", "layout": "NHWC", "pixelFormat": "RGB",
                                 "shape": [None, 224, 224, 3]}
    assert manifest["outputs"] == {"probabilities": "probabilities", "embedding": "embedding"}
    assert manifest["preprocess"] == ResizePolicy().to_manifest()
    assert manifest["file"] == {"name": "model.onnx", "sha256": sha256_file(model), "bytes": model.stat().st_size}
    assert manifest["precision"] == "int8"
    assert manifest["backbone"] == backbone[1]
    assert manifest["quantization"]["calibration"]["images"] == 8
    assert manifest["quantization"]["calibration"]["split"] == "train"
    assert manifest["training"]["head"]["features"] == ["stage4", "embedding"]


def test_evaluation_report(train_runs: TrainRuns) -> None:
    evaluation = json.loads((train_runs.int8_out / "evaluation.json").read_text())
    validation_images = evaluation["validation"]["images"]

    assert evaluation == train_runs.int8_evaluation
    assert evaluation["model"]["shipped"] == "int8"
    assert evaluation["validation"]["fraction"] == VALIDATION_FRACTION
    for key in ("fp32", "int8"):
        report = evaluation[key]
        matrix = np.array(report["confusion"]["matrix"])
        assert 0.0 <= report["accuracy"] <= 1.0, key
        assert set(report["perClass"]) == set(TRAIN_CLASSES), key
        assert matrix.shape == (3, 3), key
        assert matrix.sum() == validation_images, key
        assert report["accuracy"] == pytest.approx(np.trace(matrix) / validation_images), key
    assert set(evaluation["latency"]) == {"fp32", "int8"}
    assert evaluation["latency"]["int8"]["batch8"]["runs"] == 2
    assert evaluation["fileBytes"]["int8"] < evaluation["fileBytes"]["fp32"]


def test_packaged_model_runs_on_photo(train_runs: TrainRuns) -> None:
    manifest = _manifest(train_runs.int8_out)
    policy = ResizePolicy.from_manifest(manifest["preprocess"])
    photo = sorted((train_runs.images / "metal").glob("*.jpg"))[0]
    session = ort.InferenceSession(str(train_runs.int8_out / "model.onnx"), providers=["CPUExecutionProvider"])

    probabilities, embedding = session.run(["probabilities", "embedding"], {"pixels": prepare(photo.read_bytes(), policy)[None]})

    assert probabilities.shape == (1, len(manifest["labels"]))
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    assert (probabilities >= 0).all()
    assert embedding.shape == (1, 2048)


def test_split_follows_content_hash(train_runs: TrainRuns) -> None:
    training = _manifest(train_runs.int8_out)["training"]
    expected = _expected_split(train_runs.images)

    assert training["data"]["perClass"] == expected["train"]
    assert training["validation"]["perClass"] == expected["validation"]
    assert training["data"]["images"] + training["validation"]["images"] == len(TRAIN_CLASSES) * IMAGES_PER_CLASS
    assert set(expected["train"]) == set(TRAIN_CLASSES)


def test_split_same_across_runs(train_runs: TrainRuns) -> None:
    first = _manifest(train_runs.int8_out)["training"]
    second = _manifest(train_runs.fp32_out)["training"]

    assert first["data"] == second["data"]
    assert first["validation"] == second["validation"]
    assert train_runs.int8_evaluation["validation"] == train_runs.fp32_evaluation["validation"]


def test_second_run_reuses_feature_cache(train_runs: TrainRuns) -> None:
    assert train_runs.cache_rows_after_fp32 == train_runs.cache_rows_after_int8


def test_fp32_package(train_runs: TrainRuns) -> None:
    manifest = _manifest(train_runs.fp32_out)

    assert manifest["precision"] == "fp32"
    assert "quantization" not in manifest
    assert train_runs.fp32_evaluation["model"]["shipped"] == "fp32"
    assert "int8" not in train_runs.fp32_evaluation
    # Both runs train the same head on the same cached features.
    assert train_runs.fp32_evaluation["fp32"] == train_runs.int8_evaluation["fp32"]


def test_knowledge_file(train_runs: TrainRuns) -> None:
    package = train_runs.int8_out
    manifest = _manifest(package)
    knowledge = json.loads((package / "knowledge.json").read_text())
    expected = _expected_split(train_runs.images)["train"]

    assert manifest["knowledge"] == {"file": "knowledge.json", "sha256": sha256_file(package / "knowledge.json"),
                                     "bytes": (package / "knowledge.json").stat().st_size}
    assert knowledge["dim"] == 2048
    assert [c["label"] for c in knowledge["classes"]] == list(TRAIN_CLASSES)
    for entry in knowledge["classes"]:
        assert entry["count"] == expected[entry["label"]]
        assert np.linalg.norm(entry["centroid"]) == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= entry["p50"] <= entry["p95"] < 1.0


def test_validation_manifest(train_runs: TrainRuns) -> None:
    rows = (train_runs.int8_out / "validation.csv").read_text().splitlines()
    validation = _expected_split(train_runs.images)["validation"]

    assert rows[0] == "path,label"
    assert len(rows) - 1 == sum(validation.values())
    assert all(Path(row.split(",")[0]).is_file() for row in rows[1:])


def test_gate_compares_packages_on_validation_manifest(spark: SparkSession, train_runs: TrainRuns) -> None:
    from sortline_spark.gate import GateConfig, decide, predict
    from sortline_spark.embed import list_images
    import pandas as pd

    images = pd.DataFrame([{"path": i.path, "label": i.label} for i in list_images(train_runs.int8_out / "validation.csv")])
    predictions = predict(spark, {"baseline": train_runs.fp32_out, "candidate": train_runs.int8_out}, images, ResizePolicy())
    labels = list(TRAIN_CLASSES)
    verdict = decide(images["label"].tolist(), [predictions["baseline"][p] for p in images["path"]],
                     [predictions["candidate"][p] for p in images["path"]], labels, labels, GateConfig(max_class_drop=1.0))

    assert verdict["images"] == len(images)
    assert verdict["candidateAccuracy"] == pytest.approx(train_runs.int8_evaluation["int8"]["accuracy"])
    assert verdict["baselineAccuracy"] == pytest.approx(train_runs.fp32_evaluation["fp32"]["accuracy"])
    assert not (train_runs.int8_out / "model-").exists()
    assert sorted(p.name for p in train_runs.int8_out.glob("model*.onnx")) == ["model.onnx"]
