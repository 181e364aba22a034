"""`make compare TASK=math PROFILE=tiny`: every method on the same model and task, run and measured in one go.

Runs (or resumes, by content digests; ARGS=--force re-runs all) runs/<task>-<profile>-<method> for each method
through the pipeline flow, then tabulates per method what a user weighs: trainable parameters, adapter bytes on
disk (as trained, and the deployable sub-adapter), total and non-zero parameters and MACs per token of the
deployable model, accuracy of the extracted model with its 95% interval, its paired difference from plain LoRA
on the same test records (with its interval) and its retention (% of LoRA's accuracy), and training time. Writes
<runs>/compare-<task>-<profile>.parquet and .md, and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flows.pipeline import pipeline
from flows.runners import RUNNERS
from nlsflow.artifacts import describe_plan, read_manifest, read_output, read_table, stage_dir, stage_plan, write_table
from nlsflow.cli import expand_args
from nlsflow.config import load_config
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.intervals import correct_by_task, paired_difference, points, points_interval
from nlsflow.io import atomic_write_text
from nlsflow.layers import config_files
from schemas.outputs import ExtractOutput

METHODS = ("lora", "shears", "lonas", "nola", "heterolora")  # plain LoRA first: the baseline row
# accuracy's columns per protocol: suffix -> the prediction rows' key. "_cloze": lm-eval's zero-shot cloze, scored
# for multiple-choice tasks only (`scoring.predict`): accuracy_cloze, accuracy_cloze_low, delta_cloze_vs_lora, ...
PROTOCOL_KEYS = {"": "correct", "_cloze": "cloze_correct"}


@dataclass(frozen=True)
class Variant:
    """A row of a comparison: a method (configs/methods/<method>.yaml) with overrides of its own."""

    method: str
    overrides: tuple[str, ...] = ()


COLUMNS = {  # column -> header
    "method": "method",
    "trainable_params": "trainable params",
    "train_adapter_bytes": "adapter bytes (trained)",
    "adapter_bytes": "adapter bytes (extracted)",
    "compact_bytes": "NOLA compact bytes",
    "params": "params",
    "nonzero_params": "non-zero params",
    "macs_per_token": "MACs/token",
    "nonzero_macs_per_token": "non-zero MACs/token",
    "accuracy": "accuracy (%)",
    "accuracy_95": "95% interval",
    "delta_vs_lora": "Δ vs LoRA (points)",
    "delta_95": "Δ 95% interval (paired)",
    "retention": "% of LoRA",
    "accuracy_strict": "accuracy (strict, %)",
    "accuracy_cloze": "accuracy (cloze, %)",
    "accuracy_cloze_95": "cloze 95% interval",
    "delta_cloze_vs_lora": "cloze Δ vs LoRA (points)",
    "delta_cloze_95": "cloze Δ 95% interval (paired)",
    "retention_cloze": "% of LoRA (cloze)",
    "train_seconds": "train time (s)",
}


def method_row(run_dir: Path, method: str, missing_ok: bool = False) -> dict:
    """The comparison row of one finished run (`missing_ok`: of its published evidence, without its weights)."""
    train, extract, bench = (
        read_manifest(stage_dir(run_dir, s), s, missing_ok=missing_ok) for s in ("train", "extract", "benchmark")
    )
    trained, extracted, results = train.output, extract.output, bench.output.results
    if extracted.scores is None:
        raise NlsflowError(
            f"{run_dir}: the extracted model was not scored (extract.evaluate=false); re-run it with --force"
        )
    deployed = results.get("extracted_merged") or results["extracted_adapter"]
    return {
        "method": method,
        "trainable_params": trained.trainable_params,
        "train_adapter_bytes": trained.adapter_bytes,
        "adapter_bytes": extracted.adapter_bytes,
        "compact_bytes": extracted.nola_bytes,
        "params": deployed.params,
        "nonzero_params": deployed.nonzero_params,
        "macs_per_token": deployed.macs_per_token,
        "nonzero_macs_per_token": deployed.nonzero_macs_per_token,
        **accuracy_columns(extracted.scores),
        "accuracy_strict": extracted.average_accuracy_strict,
        "train_seconds": train.duration_s,
    }


def accuracy_columns(scores) -> dict:
    """A `Scores`' averages with their 95% intervals, by each protocol: accuracy, accuracy_low, accuracy_high,
    accuracy_cloze, ... (None where it was not scored)."""
    columns = {}
    for suffix in PROTOCOL_KEYS:
        interval = getattr(scores, f"average_accuracy{suffix}_interval") or (None, None)
        columns |= {
            f"accuracy{suffix}": getattr(scores, f"average_accuracy{suffix}"),
            f"accuracy{suffix}_low": interval[0],
            f"accuracy{suffix}_high": interval[1],
        }
    return columns


def extracted_answers(run_dir: Path, key: str = "correct") -> dict[str, list[bool]]:
    """The extracted model's answers (`key`: correct by the reference rules, or "cloze_correct") per averaged test
    set, in record order (extract/predictions.parquet)."""
    extracted: ExtractOutput = read_output(run_dir, "extract", verify=False)
    return correct_by_task(
        read_table(stage_dir(run_dir, "extract") / ExtractOutput.files.predictions, "predictions").to_pylist(),
        extracted.averaged,
        key,
    )


def against_lora(rows: list[dict], run_dirs: dict[str, Path]) -> None:
    """Each method's paired difference from plain LoRA on the same test records, its interval and the retention
    (accuracy as % of LoRA's), by each protocol both were scored by, added to the rows in place; empty when LoRA
    is not among them."""
    if "lora" not in run_dirs:
        for row in rows:
            row |= dict.fromkeys(column for suffix in PROTOCOL_KEYS for column in against_lora_columns(suffix))
        return
    lora_row = next(r for r in rows if r["method"] == "lora")
    for row in rows:
        try:
            pair_with_lora(row, lora_row, partial(extracted_answers, run_dirs[row["method"]]), run_dirs["lora"])
        except ValueError as e:
            raise NlsflowError(
                f"{row['method']} vs lora: {e} (compare runs of the same task and evaluate settings)"
            ) from None


def pair_with_lora(row: dict, lora_row: dict, answers: Callable[[str], dict], lora_dir: Path) -> None:
    """`row`'s paired difference from LoRA's extracted model (its interval, its retention), in place, by each
    protocol both were scored by; `answers(key)` are the row's answers by the prediction rows' `key`."""
    for suffix, key in PROTOCOL_KEYS.items():
        lora_accuracy = lora_row.get(f"accuracy{suffix}")
        if row.get(f"accuracy{suffix}") is None or lora_accuracy is None:  # one of them not scored by it
            row |= dict.fromkeys(against_lora_columns(suffix))
            continue
        delta, (low, high), _ = paired_difference(answers(key), extracted_answers(lora_dir, key))
        retention = 100 * row[f"accuracy{suffix}"] / lora_accuracy if lora_accuracy else None
        row |= dict(zip(against_lora_columns(suffix), (delta, low, high, retention)))


def against_lora_columns(suffix: str) -> tuple[str, ...]:
    """The columns a row's pairing with LoRA fills, by the protocol whose columns end in `suffix`."""
    return f"delta{suffix}_vs_lora", f"delta{suffix}_low", f"delta{suffix}_high", f"retention{suffix}"


def _display(r: dict) -> dict:
    """A row's cells as shown: accuracies in percent, differences and intervals in percentage points."""
    return {
        **r,
        "accuracy": points(r.get("accuracy")),
        "accuracy_strict": points(r.get("accuracy_strict")),
        "accuracy_95": points_interval((r.get("accuracy_low"), r.get("accuracy_high"))),
        "delta_vs_lora": points(r.get("delta_vs_lora"), signed=True),
        "delta_95": points_interval((r.get("delta_low"), r.get("delta_high")), signed=True),
        "accuracy_cloze": points(r.get("accuracy_cloze")),
        "accuracy_cloze_95": points_interval((r.get("accuracy_cloze_low"), r.get("accuracy_cloze_high"))),
        "delta_cloze_vs_lora": points(r.get("delta_cloze_vs_lora"), signed=True),
        "delta_cloze_95": points_interval((r.get("delta_cloze_low"), r.get("delta_cloze_high")), signed=True),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for r in map(_display, rows):
        cells = [
            "–"
            if r[c] is None
            else r[c]
            if isinstance(r[c], str)
            else f"{r[c]:,}"
            if isinstance(r[c], int)
            else f"{r[c]:.1f}"
            if isinstance(r[c], float)
            else str(r[c])
            for c in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def row_config(
    task: str,
    profile: str,
    name: str,
    runs: Path,
    overrides=(),
    extra_configs: list[Path] = (),
    suffix: str = "",
    variants: dict[str, Variant] | None = None,
) -> tuple[list[str], list[str]]:
    """A row's config files and settings: the method's (or variant's) config files, then `extra_configs` (a study's
    settings), in <runs>/<task>-<profile>-<name><suffix>."""
    variant = (variants or {}).get(name, Variant(name))
    files = [str(f) for f in [*config_files(task, profile, variant.method), *extra_configs]]
    return files, [f"run_dir={runs / f'{task}-{profile}-{name}{suffix}'}", *overrides, *variant.overrides]


def print_plans(task: str, profile: str, methods, runs: Path, force: bool = False, **row) -> None:
    """`--plan`: check each row's config and print which stages of its run would run; run nothing."""
    for name in methods:
        cfg = load_config(*row_config(task, profile, name, runs, **row))
        print(f"{name}: " + describe_plan(cfg, stage_plan(cfg, force=force)))


def compare(
    task: str,
    profile: str,
    methods=METHODS,
    runs: Path = Path("runs"),
    overrides=(),
    runner: str = "local",
    force: bool = False,
    runner_options: dict | None = None,
    existing: bool = False,
    extra_configs: list[Path] = (),
    suffix: str = "",
    variants: dict[str, Variant] | None = None,
    finished: Callable[[str, Path], None] | None = None,
) -> list[dict]:
    """Run (or resume) each method, then tabulate; `existing`: tabulate the finished runs as they are, run nothing.
    `extra_configs` follow each method's own config files (a study's settings); a name in `variants` is a method
    with overrides of its own (a row of its own, e.g. Shears at 30% sparsity, or LoRA scoring the dense base); runs
    are <runs>/<task>-<profile>-<name><suffix>; `finished(name, run_dir)` is called as each run completes."""
    rows = []
    for name in methods:
        files, settings = row_config(task, profile, name, runs, overrides, extra_configs, suffix, variants)
        run_dir = runs / f"{task}-{profile}-{name}{suffix}"
        if not existing:
            state = pipeline(files, settings, runner, force, runner_options, return_state=True)
            if state.is_failed():
                raise NlsflowError(f"{name}: {state.message}")
            if finished:
                finished(name, run_dir)
        rows.append(method_row(run_dir, name))
    against_lora(rows, {method: runs / f"{task}-{profile}-{method}{suffix}" for method in methods})
    name = runs / f"compare-{task}-{profile}{suffix}"
    write_table(name.with_suffix(".parquet"), "comparison", rows)
    atomic_write_text(name.with_suffix(".md"), markdown(rows))
    return rows


def render(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for header in COLUMNS.values():
        table.add_column(header, justify="left" if header == "method" else "right")
    for line in markdown(rows).splitlines()[2:]:
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="math")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--runs", default="runs", help="folder of the runs and the comparison files")
    parser.add_argument("--runner", default="local", choices=sorted(RUNNERS))
    parser.add_argument("--gpus", help="docker: GPUs per stage container (all, a count, device=0,1, none)")
    parser.add_argument("--image", help="docker: image name with {stage}")
    parser.add_argument("--force", action="store_true", help="re-run every stage of every method")
    parser.add_argument(
        "--existing",
        action="store_true",
        help="tabulate the runs as they are (each made by `make "
        "pipeline ... METHOD=<method>`, maybe at other times); run nothing",
    )
    parser.add_argument(
        "--plan", action="store_true", help="check each method's config; say what would run, run nothing"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every method")
    try:
        argv = expand_args(sys.argv[1:] if argv is None else argv)  # make's ARGS, as one `--args TEXT`
    except NlsflowError as e:
        print(f"error: compare: {e}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after flags
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    try:
        if args.plan:
            print_plans(args.task, args.profile, methods, Path(args.runs), args.force, overrides=args.overrides)
            return 0
        options = {k: v for k, v in {"gpus": args.gpus, "image": args.image}.items() if v}
        rows = compare(
            args.task,
            args.profile,
            methods,
            Path(args.runs),
            args.overrides,
            args.runner,
            args.force,
            options,
            args.existing,
        )
    except NlsflowError as e:
        print(f"error: compare: {e}", file=sys.stderr)
        return 2
    render(rows, f"{args.task} / {args.profile}: methods compared")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
