"""The end-of-run summary: per stage status, time and key metric; accuracy, chosen subnet, params before/after."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table


def key_metric(stage: str, m: dict) -> str:
    if stage == "prune":
        return f"sparsity {m['sparsity']:.3f}, WikiText-2 ppl {m['ppl_dense']:.1f} -> {m['ppl_pruned']:.1f}"
    if stage == "train":
        return f"{m['steps']} steps, final loss {m['final_loss']:.3f}"
    if stage == "evaluate":
        return (
            f"{m['subnet_name']} subnet: average accuracy {m['average_accuracy']:.4f} "
            f"(strict {m['average_accuracy_strict']:.4f})"
        )
    if stage == "search":
        return (
            f"{m['evaluations']} subnets, chosen accuracy {m['chosen_accuracy']:.4f} "
            f"at {m['cost']} {m['chosen_cost']:,}"
            f" (heuristic {m['heuristic_accuracy']:.4f} at {m['heuristic_cost']:,})"
        )
    if stage == "extract":
        text = f"max |Δlogit| {m['max_abs_logit_diff']:.2e}, adapter params {m['adapter_params']:,}"
        if "mlp_widths" in m:  # LoNAS: the channels are cut out of the base
            return (
                text + f", MLP widths {min(m['mlp_widths'])}-{max(m['mlp_widths'])}, base params {m['base_params']:,}"
            )
        return text + (f", merged sparsity {m['merged_sparsity']:.3f}" if "merged_sparsity" in m else "")
    if stage == "benchmark":
        return ", ".join(f"{name} {r['tokens_per_s']:.1f} tok/s" for name, r in m["results"].items())
    return ""


def describe_subnet(subnet: dict[str, int]) -> str:
    """The subnet itself when short; else how many variables take each choice."""
    if len(subnet) <= 8:
        return json.dumps(subnet)
    counts = Counter(subnet.values())
    return f"{len(subnet)} variables: " + ", ".join(
        f"{n} at {choice}" for choice, n in sorted(counts.items(), reverse=True)
    )


def _extras(results: list[dict]) -> list[tuple[str, str]]:
    by_stage = {r["stage"]: r["metrics"] for r in results}
    rows = []
    if "evaluate" in by_stage:
        ev = by_stage["evaluate"]
        scored = {**ev.get("baselines", {}), ev["subnet_name"]: ev}
        if "accuracy" in by_stage.get("extract", {}):
            scored["extracted"] = by_stage["extract"]
        rows.append(
            (
                "average accuracy (reference / strict)",
                ", ".join(
                    f"{name} {m['average_accuracy']:.4f} / {m['average_accuracy_strict']:.4f}"
                    for name, m in scored.items()
                ),
            )
        )
        rows.append(
            (f"{ev['subnet_name']} accuracy per task", ", ".join(f"{k} {v:.4f}" for k, v in ev["accuracy"].items()))
        )
    if "extract" in by_stage:
        rows.append(("chosen subnet", describe_subnet(by_stage["extract"]["subnet"])))
    if "benchmark" in by_stage:
        res = by_stage["benchmark"]["results"]
        dense, after = res["dense"], res["extracted_adapter"]  # the pruned (LoNAS: narrowed) base + the sub-adapter
        base = "narrowed" if "mlp_widths" in by_stage.get("extract", {}) else "pruned"
        rows.append(
            (
                "params before/after",
                f"dense {dense['params']:,} ({dense['nonzero_params']:,} non-zero) -> {base} + "
                f"sub-adapter {after['params']:,} ({after['nonzero_params']:,} non-zero)",
            )
        )
    return rows


def render_summary(results: list[dict]) -> None:
    table = Table(title="nlsflow pipeline")
    for column in ("stage", "status", "time (s)", "key metric"):
        table.add_column(column)
    for r in results:
        table.add_row(r["stage"], r["status"], f"{r['stage_seconds']:.1f}", key_metric(r["stage"], r["metrics"]))
    console = Console(width=160)
    console.print(table)
    for name, value in _extras(results):
        console.print(f"[bold]{name}[/bold]: {value}")


def summary_markdown(results: list[dict]) -> str:
    lines = ["| stage | status | time (s) | key metric |", "|---|---|---|---|"]
    lines += [
        f"| {r['stage']} | {r['status']} | {r['stage_seconds']:.1f} | {key_metric(r['stage'], r['metrics'])} |"
        for r in results
    ]
    lines += [""] + [f"- **{name}**: {value}" for name, value in _extras(results)]
    return "\n".join(lines)


def accuracy_table(results: list[dict]) -> list[dict]:
    """One row per scored model (baselines, heuristic subnet, extracted): accuracy per test set and averages."""
    by_stage = {r["stage"]: r["metrics"] for r in results}
    ev = by_stage.get("evaluate")
    if ev is None:
        return []
    scored = {**ev.get("baselines", {}), f"{ev['subnet_name']} subnet": ev}
    if "accuracy" in by_stage.get("extract", {}):
        scored["extracted"] = by_stage["extract"]
    return [
        {
            "model": name,
            **{t: round(a, 4) for t, a in m["accuracy"].items()},
            "average": round(m["average_accuracy"], 4),
            "average_strict": round(m["average_accuracy_strict"], 4),
        }
        for name, m in scored.items()
    ]


def pareto_table(evaluations: list[dict]) -> list[dict]:
    """The Pareto-optimal rows of search/evaluations.parquet, cheapest first."""
    front = sorted((e for e in evaluations if e["pareto"]), key=lambda e: (e["macs"], -e["accuracy"]))
    return [
        {
            "eval_id": e["eval_id"],
            "accuracy": round(e["accuracy"], 4),
            "params": e["params"],
            "macs": e["macs"],
            "label": e["label"],
            "config": e["config"],
        }
        for e in front
    ]


def benchmark_markdown(folder: Path) -> str:
    """The benchmark's table with its plots inlined (data URIs: the UI shows them without access to the run folder)."""
    text = (folder / "results.md").read_text()
    for plot in ("throughput_vs_macs.png", "accuracy_vs_macs.png"):
        data = base64.b64encode((folder / plot).read_bytes()).decode()
        text += f"\n![{plot}](data:image/png;base64,{data})\n\n`{folder / plot}`\n"
    return text
