"""Bootstrap intervals of accuracies and of paired differences (nlsflow.evaluation.intervals)."""

from __future__ import annotations

import random

import pytest

from nlsflow.evaluation.intervals import (
    accuracy_intervals,
    correct_by_task,
    excludes_zero,
    paired_difference,
    points,
    points_interval,
    points_with_interval,
)


def _answers(accuracy: float, n: int, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < accuracy for _ in range(n)]


def test_an_interval_holds_the_accuracy_narrows_with_records_and_repeats_exactly():
    small = {"a": _answers(0.6, 50, 1)}
    large = {"a": _answers(0.6, 2000, 1)}
    low, high = accuracy_intervals(small)[0]["a"]
    assert low < sum(small["a"]) / 50 < high
    large_low, large_high = accuracy_intervals(large)[0]["a"]
    assert large_high - large_low < (high - low) / 4  # about 1/sqrt(40) as wide
    assert accuracy_intervals(small) == accuracy_intervals(small)  # seeded


def test_the_average_resamples_within_each_set():
    sets = {"a": _answers(0.9, 100, 2), "b": _answers(0.2, 400, 3)}
    per_set, (low, high) = accuracy_intervals(sets)
    average = (sum(sets["a"]) / 100 + sum(sets["b"]) / 400) / 2  # the mean of the set accuracies, not of records
    assert low < average < high and set(per_set) == {"a", "b"}
    assert accuracy_intervals({"a": [False] * 30})[0]["a"] == (0.0, 0.0)  # no spread: a point
    # a one-record set resamples to itself (scipy needs 2 per sample)
    assert (
        accuracy_intervals({"a": [True], "b": [True, False]})[1]
        == accuracy_intervals({"a": [True, True], "b": [True, False]})[1]
    )
    # a set outside the average keeps its own interval and leaves the average's alone
    per_set_b, (low_b, high_b) = accuracy_intervals(sets, averaged=["b"])
    assert per_set_b == per_set and (low_b, high_b) == accuracy_intervals({"b": sets["b"]})[1]


def test_a_paired_difference_cancels_what_both_models_share():
    ours = {"a": _answers(0.5, 300, 4)}
    flipped = [not v if i % 10 == 0 and v else v for i, v in enumerate(ours["a"])]  # ours loses ~5%, same records
    delta, interval, per_set = paired_difference(ours, {"a": flipped})
    assert delta == pytest.approx((sum(ours["a"]) - sum(flipped)) / 300) and delta > 0
    assert excludes_zero(interval) and per_set["a"][0] == delta
    # unpaired, the two accuracies' intervals overlap: only pairing separates a 5-point difference on 300 records
    ours_low, _ = accuracy_intervals(ours)[1]
    _, theirs_high = accuracy_intervals({"a": flipped})[1]
    assert ours_low < theirs_high
    assert paired_difference(ours, ours)[:2] == (0.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="same records"):
        paired_difference(ours, {"a": flipped[:-1]})


def test_a_paired_difference_matches_records_by_index():
    """Prediction rows in any order pair by (task, index); the same count of other records is refused."""
    rows = [{"task": "a", "index": i, "correct": i % 3 == 0} for i in (4, 0, 2, 1, 3)]
    ours = correct_by_task(rows)
    assert list(ours["a"]) == [0, 1, 2, 3, 4]
    assert paired_difference(ours, {"a": [i % 3 == 0 for i in range(5)]})[:2] == (0.0, (0.0, 0.0))
    shifted = correct_by_task([{**r, "index": r["index"] + 1} for r in rows])
    with pytest.raises(ValueError, match="same records on both sides; a's differ"):
        paired_difference(ours, shifted)
    with pytest.raises(ValueError, match=r"same test sets on both sides: \['a'\] vs \['b'\]"):
        paired_difference(ours, {"b": ours["a"]})


def test_accuracies_and_differences_read_the_same_everywhere():
    """One formatter for the tables, the summaries, the report and the model card: percent and points."""
    assert points(0.5234) == "52.3" and points(0.014, signed=True) == "+1.4" and points(None) == "–"
    assert points_interval((0.481, 0.56)) == "[48.1, 56.0]" and points_interval((None, None)) == "–"
    assert points_with_interval(0.5234, (0.481, 0.56)) == "52.3 [48.1, 56.0]"
    assert points_with_interval(0.014, (-0.005, 0.032), signed=True) == "+1.4 [-0.5, +3.2]"
    assert points_with_interval(0.5234) == points_with_interval(0.5234, (None, None)) == "52.3"


def test_named_pairs_of_prediction_rows_pair_by_each_protocol_both_were_scored_by():
    from nlsflow.evaluation.scoring import paired_differences

    def rows(model: str, correct: list[bool], cloze: list[bool] | None) -> list[dict]:
        return [
            {"model": model, "task": task, "index": i, "correct": c, **({"cloze_correct": z} if cloze else {})}
            for task in ("a", "b")
            for i, (c, z) in enumerate(zip(correct, cloze or correct))
        ]

    found = [
        *rows("extracted", [True, True, False, True], [True, False, False, True]),
        *rows("heuristic", [True, False, False, True], [True, False, True, True]),
        *rows("export", [False, False, False, True], None),  # generates only: no cloze
    ]
    pairs = [("extracted", "heuristic"), ("export", "extracted")]
    by_answers = paired_differences(found, pairs, ["a", "b"])
    assert list(by_answers) == ["extracted - heuristic", "export - extracted"]
    assert by_answers["extracted - heuristic"].difference == pytest.approx(0.25)
    assert by_answers["export - extracted"].difference == pytest.approx(-0.5)
    assert by_answers["export - extracted"].per_set == {"a": pytest.approx(-0.5), "b": pytest.approx(-0.5)}
    by_cloze = paired_differences(found, pairs, ["a", "b"], "cloze_correct")
    assert list(by_cloze) == ["extracted - heuristic"] and by_cloze["extracted - heuristic"].difference == -0.25
    only_a = paired_differences(found, pairs, ["a"])  # the averaged sets alone
    assert set(only_a["extracted - heuristic"].per_set) == {"a"}
    with pytest.raises(ValueError, match="no prediction rows of model 'dense'"):
        paired_differences(found, [("extracted", "dense")], None)
