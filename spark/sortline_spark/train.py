"""Training job: embed a labelled image set with Spark, train a head, export FP32 and INT8 packages.

Run ``python -m sortline_spark.train --help``. The Spark master comes from ``--master``,
``spark-submit --master`` or ``SPARK_MASTER`` and defaults to ``local[*]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pandas as pd
from pyspark.sql import SparkSession

from .backbone import RESNET50_IMAGENET, build_backbone, cache_dir
from .embed import VIEWS, FeatureJob, LabelledImage, list_images, split_of, task_session, view_pixels
from .evaluate import classification_report, machine_description, measure_latency, plot_confusion, write_json
from .head import HeadConfig, compose, train_head
from .images import ImageDecodeError, ResizePolicy, prepare
from .knowledge import EMBEDDING_DIM, build_knowledge, write_knowledge
from .package import MODEL_FILE, build_manifest, write_manifest
from .quantize import quantize_int8
from .session import create_session

log = logging.getLogger("sortline_spark.train")

# The images a package was validated on, as a CSV manifest (path,label), kept next to the model.
VALIDATION_FILE = "validation.csv"


@dataclass
class TrainConfig:
    """Inputs of one training run."""

    datasets: list[str]
    out: Path
    name: str = "sortline"
    version: str = "1.0.0"
    master: str | None = None
    validation_fraction: float = 0.2
    validation_sets: list[str] = field(default_factory=list)
    # Labelled sets evaluated as validation in addition to the content-hash split of ``datasets``.
    extra_validation: list[str] = field(default_factory=list)
    head: HeadConfig = HeadConfig()
    calibration_images: int = 256
    int8: bool = True
    latency_runs: int = 20
    feature_cache: Path | None = None


def _stack(frame: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in frame["features"]])


def _predict_partition_fn(model_files: dict[str, str], policy: ResizePolicy):
    """Return a mapInPandas function that runs every model on each image's centre view."""

    def predict(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        sessions = {key: task_session(name) for key, name in model_files.items()}
        for frame in batches:
            rows = []
            for start in range(0, len(frame), 8):
                chunk = frame.iloc[start:start + 8]
                pixels, paths = [], []
                for path in chunk["path"]:
                    try:
                        with open(path, "rb") as handle:
                            pixels.append(prepare(handle.read(), policy))
                        paths.append(path)
                    except (OSError, ImageDecodeError) as error:
                        rows.append({"path": path, "model": "", "prediction": -1, "error": str(error)})
                if not pixels:
                    continue
                batch = np.stack(pixels)
                for key, session in sessions.items():
                    probabilities = session.run(["probabilities"], {"pixels": batch})[0]
                    for path, index in zip(paths, probabilities.argmax(axis=1)):
                        rows.append({"path": path, "model": key, "prediction": int(index), "error": None})
            yield pd.DataFrame(rows, columns=["path", "model", "prediction", "error"])

    return predict


def evaluate_models(spark: SparkSession, models: dict[str, Path], images: pd.DataFrame, labels: list[str],
                    policy: ResizePolicy) -> dict[str, dict]:
    """Run each ONNX model end to end (decode, resize, crop, inference) on ``images`` inside Spark tasks."""
    names = {}
    for key, path in models.items():
        spark.sparkContext.addFile(str(path))
        names[key] = path.name
    frame = spark.createDataFrame(images[["path"]]).repartition(max(spark.sparkContext.defaultParallelism, 1) * 2)
    predicted = frame.mapInPandas(
        _predict_partition_fn(names, policy), "path string, model string, prediction int, error string"
    ).toPandas()
    failures = predicted[predicted["error"].notna()]
    if len(failures):
        log.warning("evaluation: %d images could not be decoded, first: %s", len(failures), failures.iloc[0]["error"])
    truth = dict(zip(images["path"], images["label"].map(labels.index)))
    reports = {}
    for key in models:
        rows = predicted[predicted["model"] == key]
        targets = np.array([truth[p] for p in rows["path"]])
        reports[key] = classification_report(targets, rows["prediction"].to_numpy(), labels)
    return reports


def _unique_file_name(path: Path) -> Path:
    """Copy a model under a name unique to its content, since SparkContext.addFile keeps names for the session."""
    from .backbone import sha256_file

    target = path.with_name(f"{path.stem}-{sha256_file(path)[:12]}{path.suffix}")
    shutil.copyfile(path, target)
    return target


def _dataset_summary(frame: pd.DataFrame, sources: list[str]) -> dict:
    counts = frame.groupby("label").size().to_dict()
    return {"sources": sources, "images": int(len(frame)), "perClass": {k: int(v) for k, v in sorted(counts.items())}}


def run(config: TrainConfig) -> dict:
    """Run the whole job and return the evaluation summary (also written next to the model)."""
    started = time.time()
    spark = create_session(config.master)
    policy = ResizePolicy()
    backbone_path, provenance = build_backbone()
    job = FeatureJob(spark, backbone_path, provenance["backboneId"], config.feature_cache or cache_dir() / "features", policy)

    images: list[LabelledImage] = [image for source in config.datasets for image in list_images(source)]
    hashed = job.hash_images(images)
    unreadable = hashed[hashed["sha256"].str.startswith("unreadable:")]
    if len(unreadable):
        log.warning("%d images are unreadable and left out, first: %s", len(unreadable), unreadable.iloc[0]["sha256"])
    hashed = hashed[~hashed["sha256"].str.startswith("unreadable:")].copy()
    if config.validation_sets:
        extra = job.hash_images([i for source in config.validation_sets for i in list_images(source)])
        hashed["split"] = "train"
        extra["split"] = "validation"
        hashed = pd.concat([hashed, extra[~extra["sha256"].str.startswith("unreadable:")]], ignore_index=True)
    else:
        hashed["split"] = [split_of(sha, config.validation_fraction) for sha in hashed["sha256"]]
    if config.extra_validation:
        extra = job.hash_images([i for source in config.extra_validation for i in list_images(source)])
        extra["split"] = "validation"
        hashed = pd.concat([hashed, extra[~extra["sha256"].str.startswith("unreadable:")]], ignore_index=True)
    # An image whose content also appears under the other split is dropped from training.
    hashed = hashed[~((hashed["split"] == "train") & hashed["sha256"].isin(hashed.loc[hashed["split"] == "validation", "sha256"]))]
    labels = sorted(hashed["label"].unique())
    train_set = hashed[hashed["split"] == "train"].sort_values("path").reset_index(drop=True)
    validation_set = hashed[hashed["split"] == "validation"].sort_values("path").reset_index(drop=True)
    log.info("%d training and %d validation images, classes: %s", len(train_set), len(validation_set), labels)

    feature_start = time.time()
    train_features = job.features(train_set, VIEWS)
    validation_features = job.features(validation_set, ("centre",))
    feature_seconds = time.time() - feature_start
    train_features = train_features[train_features["error"].isna()]
    validation_features = validation_features[validation_features["error"].isna()]

    head_start = time.time()
    head = train_head(_stack(train_features), train_features["label"].map(labels.index).to_numpy(), labels, config.head)
    head_seconds = time.time() - head_start
    feature_report = classification_report(
        validation_features["label"].map(labels.index).to_numpy(), head.predict_proba(_stack(validation_features)).argmax(axis=1), labels
    )
    log.info("head accuracy on validation features: %.4f", feature_report["accuracy"])
    centre = train_features[train_features["view"] == "centre"]
    if job.outputs[-1] != "embedding":
        raise RuntimeError(f"the feature vector must end with the embedding output, got {job.outputs}")
    knowledge = build_knowledge(np.stack([np.asarray(v, dtype=np.float32)[-EMBEDDING_DIM:] for v in centre["features"]]),
                                centre["label"].map(labels.index).to_numpy(), labels)

    work = config.out.parent / f".{config.out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fp32_path = work / "model.fp32.onnx"
    onnx.save(compose(onnx.load(str(backbone_path)), head, job.outputs), str(fp32_path))
    models = {"fp32": fp32_path}
    quantization = None
    if config.int8:
        rng = np.random.default_rng(config.head.seed)
        chosen = rng.choice(len(train_set), size=min(config.calibration_images, len(train_set)), replace=False)
        calibration = []
        for index in sorted(chosen):
            try:
                calibration.append(view_pixels(Path(train_set.loc[index, "path"]).read_bytes(), "centre", policy))
            except (OSError, ImageDecodeError) as error:
                log.warning("calibration image %s skipped: %s", train_set.loc[index, "path"], error)
        int8_path = work / "model.int8.onnx"
        quantization = quantize_int8(fp32_path, int8_path, calibration)
        models["int8"] = int8_path

    reports = evaluate_models(spark, {k: _unique_file_name(p) for k, p in models.items()}, validation_set, labels, policy)
    latency = {k: measure_latency(p, (policy.crop, policy.crop, 3), runs=config.latency_runs) for k, p in models.items()}
    shipped = "int8" if config.int8 else "fp32"

    config.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models[shipped], config.out / MODEL_FILE)
    for key, report in reports.items():
        plot_confusion(report, f"{config.name} {config.version} {key.upper()}", config.out / f"confusion-{key}.png")
    evaluation = {
        "model": {"name": config.name, "version": config.version, "shipped": shipped},
        "validation": {"images": int(len(validation_set)), "split": "content hash" if not config.validation_sets else "separate set",
                       "fraction": config.validation_fraction if not config.validation_sets else None},
        "fp32": reports["fp32"],
        **({"int8": reports["int8"]} if "int8" in reports else {}),
        "headOnValidationFeatures": {"accuracy": feature_report["accuracy"], "macroF1": feature_report["macroF1"]},
        "latency": latency,
        "fileBytes": {k: p.stat().st_size for k, p in models.items()},
        "machine": machine_description(),
        "timings": {"featuresSeconds": round(feature_seconds, 1), "headSeconds": round(head_seconds, 1),
                    "totalSeconds": round(time.time() - started, 1)},
    }
    write_json(config.out / "evaluation.json", evaluation)
    (config.out / "evaluation.md").write_text(render_markdown(evaluation))
    training = {
        "data": _dataset_summary(train_set, config.datasets),
        "validation": _dataset_summary(validation_set, config.validation_sets or config.datasets),
        "views": list(VIEWS),
        "head": {"type": "mlp" if config.head.hidden else "logistic", **asdict(config.head),
                 "features": list(job.outputs)},
        "sparkMaster": spark.sparkContext.master,
    }
    manifest = build_manifest(
        name=config.name, version=config.version, labels=labels, policy=policy, model_path=config.out / MODEL_FILE,
        precision=shipped, backbone=provenance, training=training,
        metrics={"validationAccuracy": reports[shipped]["accuracy"], "validationMacroF1": reports[shipped]["macroF1"],
                 "validationImages": int(len(validation_set))},
        quantization=quantization,
    )
    manifest["knowledge"] = write_knowledge(config.out, knowledge)
    write_manifest(config.out, manifest)
    validation_set[["path", "label"]].to_csv(config.out / VALIDATION_FILE, index=False)
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s in %.0f s", config.out, time.time() - started)
    return evaluation


def render_markdown(evaluation: dict) -> str:
    """Render the evaluation as a Markdown page for people."""
    model = evaluation["model"]
    keys = [k for k in ("fp32", "int8") if k in evaluation]
    lines = [f"# Evaluation of {model['name']} {model['version']}", "",
             f"Validation: {evaluation['validation']['images']} images never used for training "
             f"(split by {evaluation['validation']['split']}). Shipped precision: {model['shipped'].upper()}.", "",
             "| metric | " + " | ".join(k.upper() for k in keys) + " |", "| --- |" + " --- |" * len(keys),
             "| accuracy | " + " | ".join(f"{evaluation[k]['accuracy']:.4f}" for k in keys) + " |",
             "| macro F1 | " + " | ".join(f"{evaluation[k]['macroF1']:.4f}" for k in keys) + " |",
             "| file size (MB) | " + " | ".join(f"{evaluation['fileBytes'][k] / 1e6:.1f}" for k in keys) + " |"]
    for batch in ("batch1", "batch8"):
        lines.append(f"| CPU latency, {batch.replace('batch', 'batch ')} (median ms) | "
                     + " | ".join(f"{evaluation['latency'][k][batch]['medianMs']:.1f}" for k in keys) + " |")
    lines += ["", "## Per class", "", "| class | support | " + " | ".join(f"{k.upper()} precision | {k.upper()} recall | {k.upper()} F1" for k in keys) + " |",
              "| --- | --- |" + " --- | --- | --- |" * len(keys)]
    for label, stats in evaluation[keys[0]]["perClass"].items():
        cells = []
        for k in keys:
            c = evaluation[k]["perClass"][label]
            cells.append(f"{c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f}")
        lines.append(f"| {label} | {stats['support']} | " + " | ".join(cells) + " |")
    machine = evaluation["machine"]
    lines += ["", f"Latency measured on {machine['cpu']} ({machine['logicalCores']} logical cores), onnxruntime "
              f"{machine['onnxruntime']}, default thread count. Confusion matrices: "
              + ", ".join(f"`confusion-{k}.png`" for k in keys) + "; raw figures: `evaluation.json`.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> TrainConfig:
    parser = argparse.ArgumentParser(description="Train a sortline model package from labelled images.")
    parser.add_argument("--data", action="append", required=True,
                        help="labelled images: a folder with one subfolder per class, or a CSV manifest (path,label); repeatable")
    parser.add_argument("--validation-data", action="append", default=[],
                        help="a separate validation set; without it a content-hash split of --data is used")
    parser.add_argument("--extra-validation", action="append", default=[],
                        help="labelled images evaluated in addition to the content-hash split; repeatable")
    parser.add_argument("--out", required=True, type=Path, help="model package folder to write")
    parser.add_argument("--name", default="sortline", help="model name in the manifest")
    parser.add_argument("--version", default="1.0.0", help="semantic version in the manifest")
    parser.add_argument("--master", help="Spark master URL (default: spark-submit's, SPARK_MASTER, or local[*])")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="share of images held out (0 to 1)")
    parser.add_argument("--hidden", type=int, default=HeadConfig.hidden, help="hidden units of the head; 0 for logistic regression")
    parser.add_argument("--epochs", type=int, default=HeadConfig.epochs, help="training epochs of the head")
    parser.add_argument("--calibration-images", type=int, default=256, help="training images used to calibrate INT8")
    parser.add_argument("--fp32", action="store_true", help="ship the FP32 model instead of INT8")
    parser.add_argument("--latency-runs", type=int, default=20, help="timed runs per batch size")
    parser.add_argument("--feature-cache", type=Path, help="Parquet embedding cache (default: ~/.cache/sortline/features)")
    args = parser.parse_args(argv)
    if not 0 < args.validation_fraction < 1:
        parser.error(f"--validation-fraction {args.validation_fraction} must be between 0 and 1")
    return TrainConfig(
        datasets=args.data, out=args.out, name=args.name, version=args.version, master=args.master,
        validation_fraction=args.validation_fraction, validation_sets=args.validation_data,
        extra_validation=args.extra_validation,
        head=HeadConfig(hidden=args.hidden, epochs=args.epochs), calibration_images=args.calibration_images,
        int8=not args.fp32, latency_runs=args.latency_runs, feature_cache=args.feature_cache,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    config = parse_args(argv)
    evaluation = run(config)
    summary = {k: evaluation[k]["accuracy"] for k in ("fp32", "int8") if k in evaluation}
    print(json.dumps({"model": str(config.out), "accuracy": summary, "seconds": evaluation["timings"]["totalSeconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
