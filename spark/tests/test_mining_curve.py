"""The label-budget table of the mining curve."""

from __future__ import annotations

from sortline_spark.mining_curve import render_markdown


def test_table_rows_per_budget() -> None:
    results = {
        "baseline": {"stream": 0.3, "base": 0.92},
        "strategies": {
            "mined": {"25": {"runs": 1, "stream": 0.6, "streamStd": 0.0, "base": 0.9}},
            "random": {"25": {"runs": 3, "stream": 0.5, "streamStd": 0.02, "base": 0.91},
                       "50": {"runs": 3, "stream": 0.6, "streamStd": 0.01, "base": 0.9}},
        },
    }

    table = render_markdown(results).splitlines()

    assert table[0] == "| labels | mined (stream) | random (stream) | mined (base) | random (base) |"
    assert table[2] == "| 25 | 0.600 | 0.500 ± 0.020 | 0.900 | 0.910 |"
    assert table[3] == "| 50 |  | 0.600 ± 0.010 |  | 0.900 |"
    assert table[4].startswith("| 0 | base model: 0.300 on the stream")
