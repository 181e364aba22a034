"""95% bootstrap intervals for test-set accuracies, and for paired differences between two models on the same records.

Records are resampled within each test set (a stratified bootstrap: every resample keeps each set's size), with
scipy's `bootstrap` (percentile method, 2,000 resamples, a fixed seed: the same rows give the same interval). The
average's statistic is the mean of the per-set accuracies, as the tables report it. A paired difference resamples
the same records for both models, so what the two share (easy and hard questions) cancels out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0

Interval = tuple[float, float]
# A test set's correct answers, in record order or by index; or each record's expected accuracy (a chance level).
Answers = Sequence[bool] | Mapping[int, bool] | Mapping[int, float]


def _mean_of_means(*samples, axis=-1):
    return np.mean([s.mean(axis=axis) for s in samples], axis=0)


def _interval(samples: list[np.ndarray]) -> Interval:
    if all(np.all(s == s[0]) for s in samples):  # no spread to resample (e.g. every answer wrong)
        value = float(_mean_of_means(*samples))
        return value, value
    from scipy.stats import bootstrap  # scipy.stats takes seconds to import: only where an interval is computed

    # a one-record set resamples to itself; scipy wants 2 per sample, and two copies change no resample's mean
    samples = [np.repeat(s, 2) if len(s) == 1 else s for s in samples]
    result = bootstrap(
        samples,
        _mean_of_means,
        n_resamples=RESAMPLES,
        confidence_level=LEVEL,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def accuracy_intervals(
    correct: dict[str, list[bool]], averaged: list[str] | None = None
) -> tuple[dict[str, Interval], Interval]:
    """Per test set and for the average over the sets in `averaged` (None: all): the 95% interval of the accuracy."""
    arrays = {name: np.asarray(values, dtype=float) for name, values in correct.items()}
    spanned = [arrays[name] for name in (averaged or arrays)]
    return {name: _interval([a]) for name, a in arrays.items()}, _interval(spanned)


def paired_difference(
    ours: Mapping[str, Answers], theirs: Mapping[str, Answers]
) -> tuple[float, Interval, dict[str, tuple[float, Interval]]]:
    """Average accuracy of `ours` minus `theirs` on the same records: the difference, its 95% interval, and per set
    (difference, interval). Each set's answers are by record index (`correct_by_task`) or a list in record order."""
    ours, theirs = ({k: _by_index(v) for k, v in side.items()} for side in (ours, theirs))
    if ours.keys() != theirs.keys():
        raise ValueError(
            f"a paired difference needs the same test sets on both sides: {sorted(ours)} vs {sorted(theirs)}"
        )
    for k in ours:
        if ours[k].keys() != theirs[k].keys():
            raise ValueError(f"a paired difference needs the same records on both sides; {k}'s differ")
    diffs = {k: np.asarray([float(ours[k][i]) - float(theirs[k][i]) for i in ours[k]]) for k in ours}
    per_set = {k: (float(d.mean()), _interval([d])) for k, d in diffs.items()}
    return float(_mean_of_means(*diffs.values())), _interval(list(diffs.values())), per_set


def _by_index(answers: Answers) -> Mapping[int, bool]:
    return answers if isinstance(answers, Mapping) else dict(enumerate(answers))


def proportion_interval(accuracy: float, records: int) -> Interval:
    """The 95% Wilson interval of an accuracy measured on `records` records (when only the count is kept)."""
    from scipy.stats import binomtest

    interval = binomtest(round(accuracy * records), records).proportion_ci(LEVEL, method="wilson")
    return float(interval.low), float(interval.high)


def correct_by_task(
    rows: list[dict], tasks: list[str] | None = None, key: str = "correct"
) -> dict[str, dict[int, bool]]:
    """Prediction rows (task, index, `key`: "correct", or "cloze_correct") as each test set's correct answers by
    record index, in index order (only `tasks`'s, when given: the averaged sets a paired difference spans)."""
    found: dict[str, dict[int, bool]] = {}
    for row in rows:
        if tasks is None or row["task"] in tasks:
            found.setdefault(row["task"], {})[row["index"]] = row[key]
    return {task: dict(sorted(answers.items())) for task, answers in found.items()}


def excludes_zero(interval: Interval) -> bool:
    """Whether a difference is separable from noise at this level."""
    low, high = interval
    return low > 0 or high < 0


def points(value: float | None, signed: bool = False) -> str:
    """A fraction in percent (an accuracy) or percentage points (a difference), as tables show it: '52.3', '+1.4'."""
    return "–" if value is None else f"{100 * value:{'+' if signed else ''}.1f}"


def points_interval(interval: tuple[float | None, float | None] | None, signed: bool = False) -> str:
    """An interval of fractions in percent or points: '[48.1, 56.0]', '[-2.5, +3.0]'; '–' when there is none."""
    if interval is None or interval[0] is None:
        return "–"
    return f"[{points(interval[0], signed)}, {points(interval[1], signed)}]"


def points_with_interval(
    value: float | None, interval: tuple[float | None, float | None] | None = None, signed: bool = False
) -> str:
    """`points`, then its interval when there is one: '52.3 [48.1, 56.0]', '+1.4 [-0.5, +3.2]', '52.3'."""
    shown = points_interval(interval, signed)
    return points(value, signed) + ("" if shown == "–" else f" {shown}")
