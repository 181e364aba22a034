"""The study's table and reading (flows/study.py), from rows as the published manifests give them."""

from __future__ import annotations

from flows.study import SEED_CLAIMS, results_markdown, verdict


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
