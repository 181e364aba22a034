"""The study's table and reading (flows/study.py), from rows as the published manifests give them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flows.compare import COLUMNS, against_lora, markdown
from flows.study import (
    CHANCE,
    COUNTS,
    RESULTS,
    SEED_CLAIMS,
    chance_row,
    dodged,
    plot_study,
    results_markdown,
    verdict,
)
from nlsflow.artifacts import read_table
from nlsflow.evaluation.answers import chance_level


def _row(method: str, accuracy: float, delta: float, low: float, high: float) -> dict:
    return {
        "method": method,
        "params": 100,
        "nonzero_params": 50,
        "nonzero_macs_per_token": 50,
        "trainable_params": 10,
        "adapter_bytes": 40,
        "accuracy_by_task": {"boolq": accuracy, "hellaswag": 0.25},
        "accuracy": accuracy,
        "accuracy_low": accuracy - 0.03,
        "accuracy_high": accuracy + 0.03,
        "delta_vs_lora": delta,
        "delta_low": low,
        "delta_high": high,
        "retention": 100 * accuracy / 0.5,
    }


def test_each_row_is_read_against_lora_by_its_paired_interval():
    assert "below LoRA beyond noise" in verdict(_row("shears", 0.45, -0.05, -0.08, -0.02))
    assert "above LoRA beyond noise" in verdict(_row("heterolora", 0.52, 0.02, 0.001, 0.04))
    within = verdict(_row("nola", 0.49, -0.01, -0.03, 0.01))
    assert "not separable from LoRA (the interval contains 0)" in within and "-1.0 [-3.0, +1.0] points" in within
    assert "98.0% of LoRA's accuracy" in within and SEED_CLAIMS["nola"] in within
    assert "the seed" not in verdict(_row("shears-30", 0.45, -0.05, -0.08, -0.02))  # no seed figure at 30%


def test_the_table_names_outside_sets_and_rows_not_run_yet():
    table = [_row("lora", 0.5, 0, 0, 0), _row("shears", 0.45, -0.05, -0.08, -0.02)]
    text = results_markdown(
        table, "commonsense", "smollm2", {"boolq": (200, True), "hellaswag": (36, False)}, {"lonas": "not run yet"}
    )
    assert "| shears | 100 | 50 | 50 | 10 | 40 | 45.0 | 25.0 | 45.0 [42.0, 48.0] | -5.0 [-8.0, -2.0] | 90.0 |" in text
    assert "Test records: boolq 200, hellaswag 36." in text and "outside_average): hellaswag" in text
    assert "- **shears**: -5.0 [-8.0, -2.0] points, 90.0% of LoRA's accuracy: below LoRA beyond noise" in text
    assert "**lora**:" not in text and text.endswith("Rows not run yet: lonas (not run yet).\n")


def test_a_chance_level_is_one_over_the_options_a_record_names():
    assert chance_level("Question?\n\nAnswer format: answer1/answer2/answer3") == 1 / 3
    assert chance_level("...Option2: Maria Answer format: option1/option2") == 0.5
    assert chance_level("A robe takes 2 bolts of blue fiber. How many bolts in total?") is None  # math: open answers


def test_the_chance_row_pairs_a_uniform_guess_with_lora_on_the_same_records(monkeypatch, tmp_path):
    import flows.compare
    import flows.study

    prompts = {"boolq": "Answer format: true/false", "ARC-Easy": "Answer format: answer1/answer2/answer3/answer4"}
    rows = [{"task": t, "index": i, "prompt": prompts[t]} for t in prompts for i in range(4)]
    monkeypatch.setattr(flows.study, "read_output", lambda *a, **k: SimpleNamespace(averaged=list(prompts)))
    monkeypatch.setattr(flows.study, "read_table", lambda *a: SimpleNamespace(to_pylist=lambda: rows))
    lora_answers = {"boolq": [True, True, True, False], "ARC-Easy": [True, False, False, False]}  # 75% and 25%
    cloze_answers = {"boolq": [True, True, False, False], "ARC-Easy": [True, True, True, False]}  # 50% and 75%
    answers = {"correct": lora_answers, "cloze_correct": cloze_answers}
    monkeypatch.setattr(flows.compare, "extracted_answers", lambda run_dir, key="correct": answers[key])
    chance = chance_row(tmp_path, [_row("lora", 0.5, 0, 0, 0)])
    assert chance["method"] == CHANCE and chance["accuracy_by_task"] == {"boolq": 0.5, "ARC-Easy": 0.25}
    assert chance["accuracy"] == 0.375 and chance["accuracy_low"] is None and chance["params"] is None
    assert chance["delta_vs_lora"] == pytest.approx(0.375 - 0.5) and chance["retention"] == 75
    assert chance["delta_low"] <= chance["delta_vs_lora"] <= chance["delta_high"]
    assert chance["accuracy_cloze"] is None and chance.get("delta_cloze_vs_lora") is None  # LoRA has no cloze
    # LoRA scored by the cloze too: the same expectation, paired with LoRA's cloze answers
    chance = chance_row(tmp_path, [{**_row("lora", 0.5, 0, 0, 0), "accuracy_cloze": 0.625}])
    assert chance["accuracy_cloze"] == 0.375 and chance["accuracy_cloze_by_task"] == chance["accuracy_by_task"]
    assert chance["delta_cloze_vs_lora"] == pytest.approx(0.375 - 0.625) and chance["retention_cloze"] == 60
    rows[0]["prompt"] = "How many apples?"  # one open answer: no chance row
    assert chance_row(tmp_path, [_row("lora", 0.5, 0, 0, 0)]) is None


def test_the_reading_first_says_whether_lora_beats_chance():
    lora = _row("lora", 0.5, 0, 0, 0)
    counts = dict.fromkeys(COUNTS)
    above = {**_row(CHANCE, 0.4, -0.1, -0.14, -0.06), **counts, "accuracy_low": None, "accuracy_high": None}
    text = results_markdown([lora, above], "commonsense", "smollm2", {"boolq": (200, True)})
    assert (
        "- **lora against chance** (a uniform guess among each record's options): +10.0 [+6.0, +14.0] points: " in text
    )
    assert "above chance beyond noise" in text and "**chance**:" not in text
    assert "| chance | – | – | – | – | – | 40.0 | 40.0 | -10.0 [-14.0, -6.0] | 80.0 |" in text
    level = {**above, "delta_vs_lora": -0.01, "delta_low": -0.04, "delta_high": 0.02}
    text = results_markdown([lora, level], "commonsense", "smollm2", {"boolq": (200, True)})
    assert "+1.0 [-2.0, +4.0] points: not above chance beyond noise" in text and "no retention below says" in text


def test_the_pilot_sets_the_choice_alone_beside_the_generated_answers(tmp_path):
    """A base that never answers in the expected form scores 0 generated; ranked by label likelihood it gets a fair
    score, and LoRA − dense base on the choice alone is what LoRA learned of the task."""
    from flows.study import write_pilot

    n = 40
    answers = {"LoRA": {"piqa": [True] * 24 + [False] * 16}, "dense base": {"piqa": [False] * n}}
    ranked = {"LoRA": {"piqa": [True] * 24 + [False] * 16}, "dense base": {"piqa": [True] * 22 + [False] * 18}}
    trained = SimpleNamespace(steps=200, train_records=15000)
    generation = SimpleNamespace(num_beams=1, max_new_tokens=32)
    cfg = SimpleNamespace(
        train=SimpleNamespace(batch_size=16, learning_rate=5e-4), search=SimpleNamespace(generation=generation)
    )
    clozed = {"LoRA": {"piqa": [True] * 25 + [False] * 15}, "dense base": {"piqa": [True] * 26 + [False] * 14}}
    out = write_pilot("commonsense", "smollm2", trained, cfg, n, answers, ranked, clozed, {"piqa": [0.5] * n}, tmp_path)
    text = out.read_text()
    assert (
        "| source | records | chance | dense base | LoRA | dense base, ranked | LoRA, ranked | dense base, cloze "
        "| LoRA, cloze | Δ vs dense |" in text
    )
    assert "LoRA, cloze − dense base, cloze over the 40 records: -2.5 points" in text
    assert "dense base, cloze − chance over the 40 records: +15.0 points" in text
    assert "at this budget the dense base" in text
    assert "| piqa | 40 | 50.0 | 0.0 | 60.0 | 55.0 | 60.0 | 65.0 | 62.5 | +60.0 |" in text
    assert "peak learning rate of 0.0005" in text
    assert "LoRA − dense base over the 40 records: +60.0 points" in text and "clearly beats the dense base." in text
    assert "LoRA, ranked − dense base, ranked over the 40 records: +5.0 points" in text
    assert "does not separably beat the dense base, on the choice alone." in text
    # open answers (math): no chance, nothing ranked
    text = write_pilot("math", "tiny", trained, cfg, n, answers, {}, {}, {"piqa": [None] * n}, tmp_path).read_text()
    assert "chance" not in text and "ranked" not in text and "| piqa | 40 | 0.0 | 60.0 | +60.0 |" in text


def test_the_cloze_gets_its_own_block_and_reading_where_lora_was_scored_by_it():
    def cloze(row, accuracy, delta, low, high):
        return {
            **row,
            "accuracy_cloze_by_task": {"boolq": accuracy, "hellaswag": 0.3},
            "accuracy_cloze": accuracy,
            "accuracy_cloze_low": accuracy - 0.02,
            "accuracy_cloze_high": accuracy + 0.02,
            "delta_cloze_vs_lora": delta,
            "delta_cloze_low": low,
            "delta_cloze_high": high,
            "retention_cloze": 100 * accuracy / 0.6,
        }

    lora = cloze(_row("lora", 0.5, 0, 0, 0), 0.6, 0, 0, 0)
    shears = cloze(_row("shears", 0.45, -0.05, -0.08, -0.02), 0.57, -0.03, -0.05, -0.01)
    chance = {
        **cloze(_row(CHANCE, 0.4, -0.1, -0.14, -0.06), 0.4, -0.2, -0.24, -0.16),
        **dict.fromkeys(COUNTS),
        "accuracy_low": None,
        "accuracy_high": None,
        "accuracy_cloze_low": None,
        "accuracy_cloze_high": None,
    }
    records = {"boolq": (200, True), "hellaswag": (36, False)}
    text = results_markdown([lora, shears, chance], "commonsense", "smollm2", records)
    block = text.split("#### By lm-eval's zero-shot cloze (commonsense on smollm2)", 1)[1]
    assert "| method | boolq | hellaswag | average [95%] | Δ vs LoRA [95%, paired] | % of LoRA |" in block
    assert "| shears | 57.0 | 30.0 | 57.0 [55.0, 59.0] | -3.0 [-5.0, -1.0] | 95.0 |" in block
    assert "| chance | 40.0 | 30.0 | 40.0 | -20.0 [-24.0, -16.0] | 66.7 |" in block
    assert "- **lora against chance by the cloze** (a uniform guess among each record's options): +20.0" in block
    assert "keeps of what the model knows" in block
    assert "- **shears (cloze)**: -3.0 [-5.0, -1.0] points, 95.0% of LoRA's accuracy: below LoRA beyond noise." in block
    assert "the seed" not in block  # the seeds' claims are read once, by the reference protocol
    assert "cloze" not in text.split("####", 1)[0]  # the first table is the reference protocol's alone
    assert "####" not in results_markdown([_row("lora", 0.5, 0, 0, 0)], "math", "tiny", {"boolq": (200, True)})


def test_the_plot_has_a_test_panel_per_protocol_scored_and_the_searched_fronts(tmp_path):
    """On the committed LoRA row (read as published, without weights): two rows of panels (against MACs, against
    parameters), each a panel per protocol scored plus the Pareto fronts; math's rows have no cloze panel."""
    from PIL import Image

    study = RESULTS / "commonsense-smollm2"
    table = read_table(study / "results.parquet", "study").to_pylist()
    plot_study(table, {"lora": study / "lora"}, tmp_path / "cloze.png")
    no_cloze = [{k: None if "cloze" in k else v for k, v in r.items()} for r in table]
    plot_study(no_cloze, {"lora": study / "lora"}, tmp_path / "generated.png")
    (width, height), (narrow, same) = (Image.open(tmp_path / f"{n}.png").size for n in ("cloze", "generated"))
    assert (height, same) == (880, 880) and (width, narrow) == (1810, 1260)  # 5.5 inches a panel, 1.6 the legend


def test_points_of_nearly_equal_cost_are_drawn_side_by_side_around_their_mean():
    """Three models within 1.5% of the span of each other spread by that step around their mean, in table order;
    a model far from them stays where it is, and a lone model too."""
    placed = dodged([134.0, 80.0, 134.2, 134.1])
    step = 0.015 * 54.2
    centre = (134.0 + 134.2 + 134.1) / 3
    assert placed[1] == 80.0
    assert [placed[i] for i in (0, 2, 3)] == pytest.approx([centre - step, centre, centre + step])
    assert dodged([134.0]) == [134.0] and dodged([]) == []
    assert dodged([10.0, 20.0]) == [10.0, 20.0]


def test_a_comparison_without_lora_leaves_its_against_lora_cells_empty(tmp_path):
    """A study whose only pending row is not LoRA (LoRA's is published) tabulates that row alone before the study
    pairs it: its Δ, interval and retention cells are empty, not missing."""
    measured = {c: None for c in COLUMNS if not c.startswith(("delta", "retention"))}
    rows = [measured | {"method": "shears", "params": 100, "accuracy": 0.45}]
    against_lora(rows, {"shears": tmp_path})
    assert all(rows[0][c] is None for c in ("delta_vs_lora", "delta_cloze_high", "retention", "retention_cloze"))
    assert markdown(rows).splitlines()[-1].startswith("| shears |")


def test_the_report_reads_published_rows_with_and_without_the_benchmark_pairs():
    from flows.report import run_report

    published = RESULTS / "commonsense-smollm2"
    if not (published / "heterolora").is_dir():
        pytest.skip("the commonsense study's HeteroLoRA row is not published")
    lora = run_report(published / "lora")  # its benchmark manifest predates the benchmark's pairs
    assert "\nheuristic - dense: " in lora and "extracted - " not in lora
    heterolora = run_report(published / "heterolora")
    assert "\nextracted - heuristic: " in heterolora and "\nextracted - heuristic by cloze: " in heterolora
