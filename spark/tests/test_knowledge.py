"""Class centroids and novelty scores in embedding space."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sortline_spark.knowledge import build_knowledge, novelty, write_knowledge


def _clusters(rng: np.random.Generator, centres: np.ndarray, per_class: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rows = [centre + spread * rng.standard_normal((per_class, centres.shape[1])) for centre in centres]
    return np.concatenate(rows), np.repeat(np.arange(len(centres)), per_class)


def test_centroids_are_unit_length_and_quantiles_ordered() -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 64))
    embeddings, targets = _clusters(rng, centres, 40, 0.3)

    knowledge = build_knowledge(embeddings, targets, ["a", "b", "c"])

    assert knowledge["dim"] == 64
    assert [c["count"] for c in knowledge["classes"]] == [40, 40, 40]
    for entry, centre in zip(knowledge["classes"], centres):
        centroid = np.array(entry["centroid"])
        assert np.linalg.norm(centroid) == pytest.approx(1.0, abs=1e-5)
        assert centroid @ (centre / np.linalg.norm(centre)) > 0.95
        assert 0 <= entry["p50"] <= entry["p95"]


def test_novelty_is_high_far_from_every_class() -> None:
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((3, 64))
    embeddings, targets = _clusters(rng, centres, 50, 0.3)
    knowledge = build_knowledge(embeddings, targets, ["a", "b", "c"])
    known, _ = _clusters(rng, centres, 20, 0.3)
    unknown, _ = _clusters(rng, rng.standard_normal((2, 64)), 20, 0.3)

    assert np.median(novelty(known, knowledge)) < 1.0
    assert novelty(unknown, knowledge).min() > 1.5


def test_empty_class_is_refused() -> None:
    with pytest.raises(ValueError, match="class 'b' has no training embedding"):
        build_knowledge(np.ones((3, 4)), np.array([0, 0, 0]), ["a", "b"])


def test_written_file_matches_entry(tmp_path) -> None:
    knowledge = build_knowledge(np.eye(4)[:2].repeat(3, axis=0), np.array([0, 0, 0, 1, 1, 1]), ["a", "b"])

    entry = write_knowledge(tmp_path, knowledge)

    assert entry["file"] == "knowledge.json"
    assert json.loads((tmp_path / "knowledge.json").read_text())["classes"][1]["label"] == "b"
    assert not list(tmp_path.glob(".*partial"))
