"""Release gate: a candidate package must beat the running one on a fixed validation set.

Both packages run end to end (decode, resize, crop, inference) inside Spark tasks on the same
labelled images. The candidate passes when its accuracy is higher than the baseline's by more
than ``min_gain`` and no class that both models have loses more than ``max_class_drop`` of
recall. Images of classes that only the candidate has count as errors for the baseline, because
the running model cannot name them on the line.

Run ``python -m sortline_spark.gate --help``; it prints the verdict as JSON on stdout and exits
0 when the candidate passes, 3 when it fails the gate, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .embed import list_images
from .images import ResizePolicy
from .package import MODEL_FILE, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    min_gain: float = 0.0
    max_class_drop: float = 0.02


def per_class_recall(truth: list[str], predicted: list[str]) -> dict[str, dict]:
    """Recall and support per true class."""
    frame = pd.DataFrame({"truth": truth, "predicted": predicted})
    result = {}
    for label, rows in frame.groupby("truth"):
        result[str(label)] = {"support": int(len(rows)), "recall": float((rows["truth"] == rows["predicted"]).mean())}
    return result


def decide(truth: list[str], baseline: list[str], candidate: list[str], baseline_labels: list[str],
           candidate_labels: list[str], config: GateConfig = GateConfig()) -> dict:
    """Compare two models' predictions (label names) on the same images and return the verdict."""
    if not (len(truth) == len(baseline) == len(candidate)) or not truth:
        raise ValueError("the gate needs the same non-empty image list for both models")
    truth_array = np.array(truth)
    baseline_accuracy = float((np.array(baseline) == truth_array).mean())
    candidate_accuracy = float((np.array(candidate) == truth_array).mean())
    baseline_classes = per_class_recall(truth, baseline)
    candidate_classes = per_class_recall(truth, candidate)
    shared = sorted(set(baseline_labels) & set(candidate_labels) & set(baseline_classes))
    reasons = []
    if candidate_accuracy <= baseline_accuracy + config.min_gain:
        reasons.append(f"accuracy {candidate_accuracy:.4f} does not beat the running model's {baseline_accuracy:.4f}"
                       + (f" by {config.min_gain}" if config.min_gain else ""))
    classes = {}
    for label in sorted(candidate_classes):
        before = baseline_classes[label]["recall"] if label in baseline_labels else None
        after = candidate_classes[label]["recall"]
        classes[label] = {"support": candidate_classes[label]["support"], "baselineRecall": before, "candidateRecall": after}
        if label in shared and before - after > config.max_class_drop:
            reasons.append(f"class {label!r} recall falls from {before:.3f} to {after:.3f}, more than {config.max_class_drop}")
    return {
        "passed": not reasons,
        "reasons": reasons,
        "images": len(truth),
        "baselineAccuracy": baseline_accuracy,
        "candidateAccuracy": candidate_accuracy,
        "newClasses": sorted(set(candidate_labels) - set(baseline_labels)),
        "maxClassDrop": config.max_class_drop,
        "minGain": config.min_gain,
        "perClass": classes,
    }


def predict(spark, models: dict[str, Path], images: pd.DataFrame, policy: ResizePolicy) -> dict[str, dict[str, str]]:
    """Return, per model key, the predicted label name of every image path."""
    from .backbone import sha256_file
    from .train import _predict_partition_fn

    names, labels = {}, {}
    scratch = Path(tempfile.mkdtemp(prefix="sortline-gate-"))
    for key, folder in models.items():
        # SparkContext.addFile keeps one file per name for the session, so each model gets a name unique to its content.
        source = Path(folder) / MODEL_FILE
        unique = scratch / f"model-{sha256_file(source)[:12]}.onnx"
        shutil.copyfile(source, unique)
        spark.sparkContext.addFile(str(unique))
        names[key] = unique.name
        labels[key] = read_manifest(folder)["labels"]
    frame = spark.createDataFrame(images[["path"]]).repartition(max(spark.sparkContext.defaultParallelism, 1) * 2)
    predicted = frame.mapInPandas(_predict_partition_fn(names, policy),
                                  "path string, model string, prediction int, error string").toPandas()
    failures = predicted[predicted["error"].notna()]
    if len(failures):
        log.warning("gate: %d images could not be decoded and count as errors, first: %s", len(failures), failures.iloc[0]["error"])
    result: dict[str, dict[str, str]] = {key: {} for key in models}
    for row in predicted[predicted["error"].isna()].itertuples():
        result[row.model][row.path] = labels[row.model][row.prediction]
    return result


def run(baseline: Path, candidate: Path, validation: list[str], master: str | None, config: GateConfig) -> dict:
    from .session import create_session

    images = pd.DataFrame([{"path": i.path, "label": i.label} for source in validation for i in list_images(source)])
    # Validation sets may overlap (a package's validation.csv already lists the fixed extra sets).
    images = images.drop_duplicates("path").reset_index(drop=True) if not images.empty else images
    if images.empty:
        raise ValueError(f"no labelled images in {validation}")
    spark = create_session(master)
    predictions = predict(spark, {"baseline": baseline, "candidate": candidate}, images, ResizePolicy())
    truth = images["label"].tolist()
    verdict = decide(
        truth,
        [predictions["baseline"].get(p, "") for p in images["path"]],
        [predictions["candidate"].get(p, "") for p in images["path"]],
        read_manifest(baseline)["labels"], read_manifest(candidate)["labels"], config,
    )
    verdict["baseline"] = {k: read_manifest(baseline)[k] for k in ("name", "version")}
    verdict["candidate"] = {k: read_manifest(candidate)[k] for k in ("name", "version")}
    return verdict


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description="Check that a candidate model package beats the running one.")
    parser.add_argument("--baseline", required=True, type=Path, help="package of the running model")
    parser.add_argument("--candidate", required=True, type=Path, help="package of the new model")
    parser.add_argument("--validation", action="append", required=True,
                        help="fixed validation set: class folders or a CSV manifest (path,label); repeatable")
    parser.add_argument("--min-gain", type=float, default=0.0, help="accuracy the candidate must add (0 to 1)")
    parser.add_argument("--max-class-drop", type=float, default=0.02, help="largest recall loss allowed on any shared class")
    parser.add_argument("--master", help="Spark master URL (default: local[*])")
    parser.add_argument("--out", type=Path, help="also write the verdict to this JSON file")
    args = parser.parse_args(argv)
    try:
        verdict = run(args.baseline, args.candidate, args.validation, args.master, GateConfig(args.min_gain, args.max_class_drop))
    except (OSError, ValueError, KeyError) as error:
        print(json.dumps({"passed": False, "error": str(error)}))
        return 2
    text = json.dumps(verdict, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(verdict))
    return 0 if verdict["passed"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
