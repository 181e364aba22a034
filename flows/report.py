"""Markdown tables of a finished run's measured numbers, read from its manifests (what the README quotes).

python -m flows.report runs/math-smollm2 [runs/commonsense-smollm2 ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.summary import scored_models
from nlsflow.artifacts import MANIFEST_NAME, read_manifest, read_output, stage_dir
from nlsflow.evaluation.intervals import excludes_zero, points, points_interval, points_with_interval
from schemas.outputs import (
    BenchmarkOutput,
    EvaluateOutput,
    ExtractOutput,
    PairedDifference,
    Scores,
    SearchOutput,
    TrainOutput,
)


def _accuracy_rows(evaluate: EvaluateOutput, extract: ExtractOutput, base: str) -> list[tuple[str, Scores]]:
    names = {evaluate.subnet_name: f"{base} + {evaluate.subnet_name} subnet"}
    names["extracted"] = f"{base} + extracted ({extract.subnet_name}) subnet"
    return [(names.get(name, name), m) for name, m in scored_models(evaluate, extract).items()]


def run_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    prune = read_manifest(stage_dir(run_dir, "prune"), "prune", verify=False)
    train: TrainOutput = read_output(run_dir, "train", verify=False)
    search: SearchOutput = read_output(run_dir, "search", verify=False)
    extract: ExtractOutput = read_output(run_dir, "extract", verify=False)
    evaluate: EvaluateOutput = read_output(run_dir, "evaluate", verify=False)
    shared = prune.config["shared"]
    model = shared["model"]["gguf_file"] or shared["model"]["name_or_path"]
    pc, pruned = prune.config["prune"], prune.output
    pruning = (
        f"{pc['method'].capitalize()} {pc['sparsity']:.0%} {pc['structure']}: WikiText-2 perplexity "
        f"{pruned.ppl_dense:.2f} → {pruned.ppl_pruned:.2f}"
        if pc["sparsity"]
        else f"dense base (no pruning), WikiText-2 perplexity {pruned.ppl_dense:.2f}"
    )
    narrowed = (
        f" on the base narrowed to MLP widths {sorted(set(extract.mlp_widths))} ({extract.base_params:,} "
        f"of {pruned.params:,} base parameters)"
        if extract.mlp_widths is not None
        else ""
    )
    lines = [
        f"### {shared['task']} on {model} ({run_dir.name})",
        "",
        f"{pruning}; super-adapter {train.steps} steps on {train.train_records} records, final "
        f"loss {train.final_loss:.3f}; search: {search.evaluations} subnets on {search.cost}; "
        f"extracted adapter {extract.adapter_params:,} parameters{narrowed}, max |Δlogit| vs super-network "
        f"{extract.max_abs_logit_diff:.1e}.",
        "",
    ]
    rows = _accuracy_rows(evaluate, extract, "pruned" if pc["sparsity"] else "dense")
    tasks = list(rows[-1][1].accuracy)
    cloze = evaluate.average_accuracy_cloze is not None  # multiple choice: lm-eval's cloze as well
    header = ["model", *tasks, "average [95% interval]", "average (strict)", *["average by cloze [95%]"] * cloze]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" * len(header) + "|")
    for name, m in rows:
        cells = [
            name,
            *[f"{100 * m.accuracy[t]:.1f}" for t in tasks],
            points_with_interval(m.average_accuracy, m.average_accuracy_interval),
            f"{100 * m.average_accuracy_strict:.1f}",
            *[points_with_interval(m.average_accuracy_cloze, m.average_accuracy_cloze_interval)] * cloze,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if outside := [t for t in tasks if evaluate.averaged is not None and t not in evaluate.averaged]:
        lines.append(f"\nNot in the averages or the differences (evaluate.outside_average): {', '.join(outside)}.")
    lines += difference_lines(evaluate.differences, evaluate.differences_cloze)
    if (stage_dir(run_dir, "benchmark") / MANIFEST_NAME).is_file():
        benchmark: BenchmarkOutput = read_output(run_dir, "benchmark", verify=False)
        lines += difference_lines(benchmark.differences, benchmark.differences_cloze)
    results = stage_dir(run_dir, "benchmark") / BenchmarkOutput.files.results_markdown
    if results.is_file():
        lines += ["", "Benchmark:", "", results.read_text().rstrip()]
    return "\n".join(lines)


def difference_lines(differences: dict[str, PairedDifference], differences_cloze: dict[str, PairedDifference]):
    """Each paired difference as a line, by the generated answers and then by the cloze."""
    lines = []
    for by, found in (("", differences), (" by cloze", differences_cloze)):
        for pair, d in found.items():
            noise = "" if excludes_zero(d.interval) else ", within noise"
            lines.append(
                f"\n{pair}{by}: {points(d.difference, True)} points, 95% interval {points_interval(d.interval, True)} "
                f"(paired, same records{noise})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    for run_dir in parser.parse_args(argv).run_dirs:
        print(run_report(run_dir), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
