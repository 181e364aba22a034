"""`make study TASK=commonsense PROFILE=smollm2`: every method against plain LoRA on one committed setting, and the
seeds' table generated from the manifests.

The study's settings are `configs/studies/<task>-<profile>.yaml`, added after each method's configs, so that every
method gets the same data, steps and evaluation. The runs go through `flows.compare` (runs/<task>-<profile>-<method>-
study), and each resumes stage by stage, and within training from its last checkpoint. The study then writes
`runs/study-<task>-<profile>/`:
- `results.md`: the table (method | total params | non-zero params | MACs/token | trainable params | adapter bytes |
  per-task accuracy | average [95% interval] | Δ vs LoRA [paired 95% interval] | % of LoRA), plus the dense base;
- `results.parquet`: the same rows;
- `accuracy_vs_macs.png`: test accuracy against non-zero MACs per token (LoRA and the dense base marked), beside each
  method's searched Pareto front on the validation slice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.compare import METHODS, compare
from flows.runners import RUNNERS
from nlsflow.artifacts import read_output, read_table, stage_dir, write_table
from nlsflow.cli import expand_args
from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_write_text
from schemas.outputs import EvaluateOutput, ExtractOutput, SearchOutput

STUDIES = Path(__file__).resolve().parent.parent / "configs" / "studies"
BASE = "dense base"
COUNTS = ("params", "nonzero_params", "nonzero_macs_per_token", "trainable_params", "adapter_bytes")


def study_config(task: str, profile: str) -> Path:
    path = STUDIES / f"{task}-{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDIES.glob("*.yaml"))) or "none"
        raise NlsflowError(f"no study config {path}; studies: {known} (add configs/studies/{task}-{profile}.yaml)")
    return path


def run_study(
    task: str, profile: str, methods=METHODS, runs: Path = Path("runs"), overrides=(), runner: str = "local"
) -> Path:
    """Run (or resume) the study's methods and write its results folder; returns that folder."""
    if "lora" not in methods:
        raise NlsflowError("a study needs plain LoRA, its baseline row: add lora to the methods")
    rows = compare(
        task,
        profile,
        methods,
        runs,
        overrides,
        runner,
        extra_configs=[study_config(task, profile)],
        suffix="-study",
        method_overrides={"lora": ["evaluate.baselines=[dense]"]},  # the dense base, scored once, by LoRA's run
    )
    out = runs / f"study-{task}-{profile}"
    run_dirs = {m: runs / f"{task}-{profile}-{m}-study" for m in methods}
    table = results_rows(rows, run_dirs)
    write_table(out / "results.parquet", "study", table)
    atomic_write_text(out / "results.md", results_markdown(table, task, profile))
    plot_study(table, run_dirs, out / "accuracy_vs_macs.png")
    return out


def results_rows(rows: list[dict], run_dirs: dict[str, Path]) -> list[dict]:
    """compare's rows with each method's per-task accuracies, then the dense base (scored by LoRA's evaluate)."""
    table = []
    for row in rows:
        extracted: ExtractOutput = read_output(run_dirs[row["method"]], "extract", verify=False)
        table.append({**row, **{f"acc:{t}": a for t, a in extracted.accuracy.items()}})
    evaluate: EvaluateOutput = read_output(run_dirs["lora"], "evaluate", verify=False)
    if dense := evaluate.baselines.get("dense"):
        lora = next(r for r in table if r["method"] == "lora")
        interval = dense.average_accuracy_interval or (None, None)
        difference = evaluate.differences.get(f"{evaluate.subnet_name} - dense")
        table.append(
            {
                **dict.fromkeys(table[0]),
                "method": BASE,
                "params": lora["params"],
                "nonzero_params": lora["params"],
                "macs_per_token": lora["macs_per_token"],
                "nonzero_macs_per_token": lora["macs_per_token"],
                "trainable_params": 0,
                "accuracy": dense.average_accuracy,
                "accuracy_low": interval[0],
                "accuracy_high": interval[1],
                # LoRA minus the dense base, negated: the base against the baseline, on the same records
                "delta_vs_lora": None if difference is None else -difference.difference,
                "delta_low": None if difference is None else -difference.interval[1],
                "delta_high": None if difference is None else -difference.interval[0],
                "retention": 100 * dense.average_accuracy / lora["accuracy"] if lora["accuracy"] else None,
                **{f"acc:{t}": a for t, a in dense.accuracy.items()},
            }
        )
    return table


def _points(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _interval(low, high, sign: str = "") -> str:
    return "–" if low is None else f"[{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def results_markdown(table: list[dict], task: str, profile: str) -> str:
    tasks = [k.removeprefix("acc:") for k in table[0] if k.startswith("acc:")]
    header = [
        "method",
        "total params",
        "non-zero params",
        "MACs/token (non-zero)",
        "trainable params",
        "adapter bytes",
        *tasks,
        "average [95%]",
        "Δ vs LoRA [95%, paired]",
        "% of LoRA",
    ]
    lines = [
        f"### {task} on {profile}: every method against plain LoRA",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for r in table:
        count = {k: "–" if r[k] is None else f"{r[k]:,}" for k in COUNTS}
        delta = "–" if r["delta_vs_lora"] is None else f"{100 * r['delta_vs_lora']:+.1f}"
        cells = [
            r["method"],
            count["params"],
            count["nonzero_params"],
            count["nonzero_macs_per_token"],
            count["trainable_params"],
            count["adapter_bytes"],
            *[_points(r[f"acc:{t}"]) for t in tasks],
            f"{_points(r['accuracy'])} {_interval(r['accuracy_low'], r['accuracy_high'])}",
            f"{delta} {_interval(r['delta_low'], r['delta_high'], '+')}",
            "–" if r["retention"] is None else f"{r['retention']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracies in percent on the test records (reference protocol, greedy); intervals are 95% bootstrap "
        "intervals over records (stratified by test set); Δ is paired on the same records, and an interval that "
        "contains 0 means the difference is within noise.",
    ]
    return "\n".join(lines) + "\n"


def plot_study(table: list[dict], run_dirs: dict[str, Path], path: Path) -> None:
    """Test accuracy vs non-zero MACs per token (intervals as bars), and each method's validation Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in table:
        x, y = r["nonzero_macs_per_token"], 100 * r["accuracy"]
        bar = None if r["accuracy_low"] is None else [[y - 100 * r["accuracy_low"]], [100 * r["accuracy_high"] - y]]
        marker = {"lora": "s", BASE: "D"}.get(r["method"], "o")
        left.errorbar([x], [y], yerr=bar, fmt=marker, capsize=4, label=r["method"], markersize=8)
    lora = next(r for r in table if r["method"] == "lora")
    left.axhline(100 * lora["accuracy"], color="gray", linestyle=":", linewidth=1)
    left.set(xlabel="non-zero MACs per token", ylabel="test accuracy (%)", title="deployed models (95% intervals)")
    left.legend(fontsize=8)
    for method, run_dir in run_dirs.items():
        rows = read_table(stage_dir(run_dir, "search") / SearchOutput.files.evaluations, "evaluations").to_pylist()
        front = sorted((e for e in rows if e["pareto"]), key=lambda e: e["macs"])
        right.plot([e["macs"] for e in front], [100 * e["accuracy"] for e in front], "o-", label=method, markersize=4)
    right.set(
        xlabel="MACs per token (search's count)", ylabel="validation accuracy (%)", title="searched Pareto fronts"
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="commonsense")
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, lora among them")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--runner", default="local", choices=sorted(RUNNERS))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every method (none for the record)")
    try:
        args = parser.parse_intermixed_args(expand_args(sys.argv[1:] if argv is None else argv))
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        out = run_study(args.task, args.profile, methods, Path(args.runs), args.overrides, args.runner)
    except NlsflowError as e:
        print(f"error: study: {e}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.parquet and accuracy_vs_macs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
