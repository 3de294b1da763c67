"""Labels-versus-accuracy curve of example selection strategies.

Each selection is a list of image paths that a reviewer would label (the label is the image's
class folder). For every strategy and label budget, a head is trained on the base training
split plus the selected images, exactly as the training job trains it, and evaluated on a
held-out stream set and on the base validation split. The result gives the accuracy each
strategy reaches per number of labels.

Run ``python -m sortline_spark.mining_curve --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .embed import VIEWS, FeatureJob, LabelledImage, list_images, split_of
from .head import HeadConfig, train_head

log = logging.getLogger("sortline_spark.mining_curve")


def _stack(frame: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in frame["features"]])


def _accuracy(head, frame: pd.DataFrame, labels: list[str]) -> float:
    predicted = head.predict_proba(_stack(frame)).argmax(axis=1)
    return float((np.array(labels)[predicted] == frame["label"].to_numpy()).mean())


def _per_class(head, frame: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    predicted = np.array(labels)[head.predict_proba(_stack(frame)).argmax(axis=1)]
    truth = frame["label"].to_numpy()
    return {label: float((predicted[truth == label] == label).mean()) for label in sorted(set(truth))}


def run(selections: dict, base: list[str], holdout: list[str], validation_fraction: float, master: str | None,
        head_config: HeadConfig) -> dict:
    from .backbone import build_backbone, cache_dir
    from .session import create_session

    spark = create_session(master)
    backbone_path, provenance = build_backbone()
    job = FeatureJob(spark, backbone_path, provenance["backboneId"], cache_dir() / "features")

    base_hashed = job.hash_images([i for source in base for i in list_images(source)])
    base_hashed["split"] = [split_of(sha, validation_fraction) for sha in base_hashed["sha256"]]
    selected_paths = sorted({p for strategy in selections.values() for budget in strategy.values()
                             for pick in (budget if budget and isinstance(budget[0], list) else [budget]) for p in pick})
    picked = job.hash_images([LabelledImage(p, Path(p).parent.name) for p in selected_paths])
    holdout_hashed = job.hash_images([i for source in holdout for i in list_images(source)])

    base_features = job.features(base_hashed[base_hashed["split"] == "train"], VIEWS)
    base_validation = job.features(base_hashed[base_hashed["split"] == "validation"], ("centre",))
    picked_features = job.features(picked, VIEWS)
    holdout_features = job.features(holdout_hashed, ("centre",))
    frames = [base_features, base_validation, picked_features, holdout_features]
    base_features, base_validation, picked_features, holdout_features = (f[f["error"].isna()] for f in frames)
    by_path = {path: rows for path, rows in picked_features.groupby("path")}

    def train_and_score(paths: list[str]) -> dict:
        extra = pd.concat([by_path[p] for p in paths if p in by_path]) if paths else picked_features.iloc[:0]
        train = pd.concat([base_features, extra], ignore_index=True)
        labels = sorted(set(train["label"]))
        head = train_head(_stack(train), train["label"].map(labels.index).to_numpy(), labels, head_config)
        return {"labels": len(paths), "stream": _accuracy(head, holdout_features, labels),
                "base": _accuracy(head, base_validation, labels), "streamPerClass": _per_class(head, holdout_features, labels)}

    started = time.time()
    baseline = train_and_score([])
    results: dict = {"baseline": baseline, "strategies": {}, "holdoutImages": int(len(holdout_features)),
                     "baseValidationImages": int(len(base_validation))}
    for strategy, budgets in selections.items():
        rows = {}
        for budget, picks in sorted(budgets.items(), key=lambda item: int(item[0])):
            runs = picks if picks and isinstance(picks[0], list) else [picks]
            scores = [train_and_score(pick) for pick in runs]
            stream = [s["stream"] for s in scores]
            rows[budget] = {"runs": len(scores), "stream": float(np.mean(stream)), "streamStd": float(np.std(stream)),
                            "base": float(np.mean([s["base"] for s in scores])),
                            "classesCovered": float(np.mean([len({Path(p).parent.name for p in pick}) for pick in runs]))}
            log.info("%s at %s labels: stream %.4f, base %.4f", strategy, budget, rows[budget]["stream"], rows[budget]["base"])
        results["strategies"][strategy] = rows
    results["seconds"] = round(time.time() - started, 1)
    return results


def render_markdown(results: dict) -> str:
    strategies = list(results["strategies"])
    budgets = sorted({int(b) for s in results["strategies"].values() for b in s})
    lines = ["| labels | " + " | ".join(f"{s} (stream)" for s in strategies) + " | "
             + " | ".join(f"{s} (base)" for s in strategies) + " |",
             "| --- |" + " --- |" * (2 * len(strategies))]
    for budget in budgets:
        cells, base_cells = [], []
        for strategy in strategies:
            row = results["strategies"][strategy].get(str(budget))
            if row is None:
                cells.append("")
                base_cells.append("")
                continue
            spread = f" ± {row['streamStd']:.3f}" if row["runs"] > 1 else ""
            cells.append(f"{row['stream']:.3f}{spread}")
            base_cells.append(f"{row['base']:.3f}")
        lines.append(f"| {budget} | " + " | ".join(cells) + " | " + " | ".join(base_cells) + " |")
    baseline = results["baseline"]
    lines.append(f"| 0 | base model: {baseline['stream']:.3f} on the stream, {baseline['base']:.3f} on the base split |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description="Accuracy per label budget of example selection strategies.")
    parser.add_argument("--selections", required=True, type=Path,
                        help='JSON {"strategy": {"budget": [paths] or [[paths], ...]}}; labels come from parent folder names')
    parser.add_argument("--base", action="append", required=True, help="base training set (class folders); repeatable")
    parser.add_argument("--holdout", action="append", required=True, help="held-out stream images (class folders or CSV)")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="share of the base set held out")
    parser.add_argument("--epochs", type=int, default=HeadConfig.epochs, help="head training epochs")
    parser.add_argument("--master", help="Spark master URL (default: local[*])")
    parser.add_argument("--out", type=Path, help="write the results as JSON here, and a Markdown table next to it")
    args = parser.parse_args(argv)
    selections = json.loads(args.selections.read_text())
    results = run(selections, args.base, args.holdout, args.validation_fraction, args.master, HeadConfig(epochs=args.epochs))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(render_markdown(results))
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
