"""Markdown tables of a finished run's measured numbers, read from its manifests (what the README quotes).

python -m flows.report runs/math-smollm2 [runs/commonsense-smollm2 ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nlsflow.artifacts import read_manifest, stage_dir


def _accuracy_rows(run_dir: Path, base: str) -> list[tuple[str, dict]]:
    evaluate = read_manifest(stage_dir(run_dir, "evaluate"), "evaluate", verify=False).metrics
    rows = [(name, m) for name, m in evaluate.get("baselines", {}).items()]
    rows.append((f"{base} + {evaluate['subnet_name']} subnet", evaluate))
    extract = read_manifest(stage_dir(run_dir, "extract"), "extract", verify=False).metrics
    if "accuracy" in extract:
        rows.append((f"{base} + extracted ({extract['subnet_name']}) subnet", extract))
    return rows


def run_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    prune = read_manifest(stage_dir(run_dir, "prune"), "prune", verify=False)
    train = read_manifest(stage_dir(run_dir, "train"), "train", verify=False)
    search = read_manifest(stage_dir(run_dir, "search"), "search", verify=False).metrics
    extract = read_manifest(stage_dir(run_dir, "extract"), "extract", verify=False).metrics
    shared = prune.config["shared"]
    model = shared["model"]["gguf_file"] or shared["model"]["name_or_path"]
    pc = prune.config["prune"]
    pruning = (
        f"{pc['method'].capitalize()} {pc['sparsity']:.0%} {pc['structure']}: WikiText-2 perplexity "
        f"{prune.metrics['ppl_dense']:.2f} → {prune.metrics['ppl_pruned']:.2f}"
        if pc["sparsity"]
        else f"dense base (no pruning), WikiText-2 perplexity {prune.metrics['ppl_dense']:.2f}"
    )
    narrowed = (
        f" on the base narrowed to MLP widths {sorted(set(extract['mlp_widths']))} ({extract['base_params']:,} "
        f"of {prune.metrics['params']:,} base parameters)"
        if "mlp_widths" in extract
        else ""
    )
    lines = [
        f"### {shared['task']} on {model} ({run_dir.name})",
        "",
        f"{pruning}; super-adapter {train.metrics['steps']} steps on {train.metrics['train_records']} records, final "
        f"loss {train.metrics['final_loss']:.3f}; search: {search['evaluations']} subnets on {search['cost']}; "
        f"extracted adapter {extract['adapter_params']:,} parameters{narrowed}, max |Δlogit| vs super-network "
        f"{extract['max_abs_logit_diff']:.1e}.",
        "",
    ]
    rows = _accuracy_rows(run_dir, "pruned" if pc["sparsity"] else "dense")
    tasks = list(rows[-1][1]["accuracy"])
    lines.append("| model | " + " | ".join(tasks) + " | average | average (strict) |")
    lines.append("|---" * (len(tasks) + 3) + "|")
    for name, m in rows:
        cells = [f"{100 * m['accuracy'][t]:.1f}" for t in tasks]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {100 * m['average_accuracy']:.1f} | "
            f"{100 * m['average_accuracy_strict']:.1f} |"
        )
    benchmark = stage_dir(run_dir, "benchmark") / "results.md"
    if benchmark.is_file():
        lines += ["", "Benchmark:", "", benchmark.read_text().rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    for run_dir in parser.parse_args(argv).run_dirs:
        print(run_report(run_dir), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
