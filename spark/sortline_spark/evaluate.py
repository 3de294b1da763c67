"""Model evaluation: accuracy, per-class precision/recall/F1, confusion matrix, CPU latency."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def classification_report(targets: np.ndarray, predictions: np.ndarray, labels: list[str]) -> dict:
    """Return accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    The confusion matrix is indexed [true class][predicted class] in ``labels`` order.
    """
    classes = len(labels)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (targets, predictions), 1)
    per_class = {}
    for index, label in enumerate(labels):
        true_positive = int(confusion[index, index])
        predicted = int(confusion[:, index].sum())
        actual = int(confusion[index, :].sum())
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    total = int(confusion.sum())
    return {
        "images": total,
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "macroF1": float(np.mean([c["f1"] for c in per_class.values()])),
        "perClass": per_class,
        "confusion": {"labels": labels, "rows": "true class", "columns": "predicted class", "matrix": confusion.tolist()},
    }


def plot_confusion(report: dict, title: str, path: Path) -> None:
    """Write the confusion matrix of a report as a PNG heat map with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["confusion"]["labels"]
    matrix = np.array(report["confusion"]["matrix"])
    figure, axes = plt.subplots(figsize=(1.1 * len(labels) + 2, 1.0 * len(labels) + 1.5), dpi=110)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{title}\naccuracy {report['accuracy']:.3f} on {report['images']} images")
    for row in range(len(labels)):
        for column in range(len(labels)):
            colour = "white" if normalised[row, column] > 0.5 else "black"
            axes.text(column, row, str(matrix[row, column]), ha="center", va="center", color=colour, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def measure_latency(model_path: Path, input_shape: tuple[int, int, int], batch_sizes=(1, 8), runs: int = 20) -> dict:
    """Measure CPU inference latency of a model file in this process.

    Runs two warm-up batches, then ``runs`` timed batches of each size with onnxruntime's
    default thread count, and reports the median and 90th percentile in milliseconds.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    result = {}
    for batch in batch_sizes:
        pixels = rng.integers(0, 256, size=(batch, *input_shape), dtype=np.uint8)
        for _ in range(2):
            session.run(None, {"pixels": pixels})
        timings = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, {"pixels": pixels})
            timings.append((time.perf_counter() - start) * 1000)
        result[f"batch{batch}"] = {
            "medianMs": float(np.median(timings)),
            "p90Ms": float(np.percentile(timings, 90)),
            "perImageMs": float(np.median(timings) / batch),
            "runs": runs,
        }
    return result


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "logicalCores": os.cpu_count(), "onnxruntime": __import__("onnxruntime").__version__}


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
