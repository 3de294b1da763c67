"""Release gate decisions on label lists."""

from __future__ import annotations

import pytest

from sortline_spark.gate import GateConfig, decide

OLD = ["glass", "metal", "paper"]
NEW = ["glass", "metal", "paper", "wood"]


def test_candidate_with_new_class_passes() -> None:
    truth = ["glass", "metal", "paper", "wood", "wood"]
    baseline = ["glass", "metal", "paper", "paper", "glass"]
    candidate = ["glass", "metal", "paper", "wood", "wood"]

    verdict = decide(truth, baseline, candidate, OLD, NEW)

    assert verdict["passed"]
    assert verdict["baselineAccuracy"] == pytest.approx(0.6)
    assert verdict["candidateAccuracy"] == pytest.approx(1.0)
    assert verdict["newClasses"] == ["wood"]
    assert verdict["perClass"]["wood"] == {"support": 2, "baselineRecall": None, "candidateRecall": 1.0}


def test_class_regression_fails_even_when_accuracy_rises() -> None:
    truth = ["glass"] * 10 + ["wood"] * 10
    baseline = ["glass"] * 10 + ["glass"] * 10
    candidate = ["glass"] * 8 + ["metal"] * 2 + ["wood"] * 10

    verdict = decide(truth, baseline, candidate, OLD, NEW, GateConfig(max_class_drop=0.1))

    assert not verdict["passed"]
    assert verdict["candidateAccuracy"] > verdict["baselineAccuracy"]
    assert verdict["reasons"] == ["class 'glass' recall falls from 1.000 to 0.800, more than 0.1"]


def test_equal_accuracy_does_not_beat_the_running_model() -> None:
    truth = ["glass", "metal", "paper"]
    better = ["glass", "metal", "metal"]

    assert not decide(truth, truth, truth, OLD, OLD)["passed"]
    assert decide(truth, better, truth, OLD, OLD)["passed"]
    assert not decide(truth, better, truth, OLD, OLD, GateConfig(min_gain=0.5))["passed"]


def test_mismatched_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="same non-empty image list"):
        decide(["glass"], [], ["glass"], OLD, OLD)
