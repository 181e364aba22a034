"""The end-of-run summary: per stage status, time and key metric; accuracy, chosen subnet, params before/after."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nlsflow.evaluation.intervals import points, points_interval, points_with_interval
from schemas.outputs import (
    STAGE_OUTPUTS,
    BenchmarkOutput,
    EvaluateOutput,
    ExtractOutput,
    PairedDifference,
    PruneOutput,
    Scores,
    SearchOutput,
    StageOutput,
    TrainOutput,
)


def stage_output(result: dict) -> StageOutput:
    """A pipeline result's metrics (as flows.pipeline.run_stage returns them) as the stage's output model."""
    return STAGE_OUTPUTS[result["stage"]].model_validate(result["metrics"])


def listed(differences: dict[str, PairedDifference]) -> str:
    """Paired differences, each after a semicolon, in points with their intervals."""
    return "".join(
        f"; {pair} {points_with_interval(d.difference, d.interval, True)} points" for pair, d in differences.items()
    )


def key_metric(out: StageOutput) -> str:
    if isinstance(out, PruneOutput):
        return f"sparsity {out.sparsity:.3f}, WikiText-2 ppl {out.ppl_dense:.1f} -> {out.ppl_pruned:.1f}"
    if isinstance(out, TrainOutput):
        return f"{out.steps} steps, final loss {out.final_loss:.3f}"
    if isinstance(out, EvaluateOutput):
        cloze = out.average_accuracy_cloze
        cloze = (
            ""
            if cloze is None
            else f", by cloze {points(cloze)}% {points_interval(out.average_accuracy_cloze_interval)}"
        )
        return (
            f"{out.subnet_name} subnet: average accuracy {points(out.average_accuracy)}% "
            f"{points_interval(out.average_accuracy_interval)} "
            f"(strict {100 * out.average_accuracy_strict:.1f}%){cloze}{listed(out.differences)}"
        )
    if isinstance(out, SearchOutput):
        return (
            f"{out.evaluations} subnets, chosen accuracy {out.chosen_accuracy:.4f} at {out.cost} {out.chosen_cost:,}"
            f" (heuristic {out.heuristic_accuracy:.4f} at {out.heuristic_cost:,})"
        )
    if isinstance(out, ExtractOutput):
        text = f"max |Δlogit| {out.max_abs_logit_diff:.2e}, adapter params {out.adapter_params:,}"
        if out.mlp_widths is not None:  # LoNAS: the channels are cut out of the base
            return text + f", MLP widths {min(out.mlp_widths)}-{max(out.mlp_widths)}, base params {out.base_params:,}"
        return text + (f", merged sparsity {out.merged_sparsity:.3f}" if out.merged_sparsity is not None else "")
    if isinstance(out, BenchmarkOutput):
        return ", ".join(f"{name} {r.tokens_per_s:.1f} tok/s" for name, r in out.results.items()) + listed(
            out.differences
        )
    return ""


def describe_subnet(subnet: dict[str, int]) -> str:
    """The subnet itself when short; else how many variables take each choice."""
    if len(subnet) <= 8:
        return json.dumps(subnet)
    counts = Counter(subnet.values())
    return f"{len(subnet)} variables: " + ", ".join(
        f"{n} at {choice}" for choice, n in sorted(counts.items(), reverse=True)
    )


def scored_models(evaluate: EvaluateOutput, extract: ExtractOutput | None) -> dict[str, Scores]:
    """Every model scored on the test sets, by name: the baselines, evaluate's subnet, the extracted model."""
    scored = {**evaluate.baselines, evaluate.subnet_name: evaluate.scores}
    if extract is not None and extract.scores is not None:
        scored["extracted"] = extract.scores
    return scored


def _extras(results: list[dict]) -> list[tuple[str, str]]:
    by_stage = {r["stage"]: stage_output(r) for r in results}
    extract = by_stage.get("extract")
    rows = []
    if "evaluate" in by_stage:
        ev = by_stage["evaluate"]
        rows.append(
            (
                "average accuracy (reference / strict)",
                ", ".join(
                    f"{name} {m.average_accuracy:.4f} / {m.average_accuracy_strict:.4f}"
                    for name, m in scored_models(ev, extract).items()
                ),
            )
        )
        rows.append((f"{ev.subnet_name} accuracy per task", ", ".join(f"{k} {v:.4f}" for k, v in ev.accuracy.items())))
    if extract is not None:
        rows.append(("chosen subnet", describe_subnet(extract.subnet)))
    if "benchmark" in by_stage:
        res = by_stage["benchmark"].results
        dense, after = res["dense"], res["extracted_adapter"]  # the pruned (LoNAS: narrowed) base + the sub-adapter
        base = "narrowed" if extract is not None and extract.mlp_widths is not None else "pruned"
        rows.append(
            (
                "params before/after",
                f"dense {dense.params:,} ({dense.nonzero_params:,} non-zero) -> {base} + "
                f"sub-adapter {after.params:,} ({after.nonzero_params:,} non-zero)",
            )
        )
    return rows


def render_summary(results: list[dict]) -> None:
    table = Table(title="nlsflow pipeline")
    for column in ("stage", "status", "time (s)", "key metric"):
        table.add_column(column)
    for r in results:
        table.add_row(r["stage"], r["status"], f"{r['stage_seconds']:.1f}", key_metric(stage_output(r)))
    console = Console(width=160)
    console.print(table)
    for name, value in _extras(results):
        console.print(f"[bold]{name}[/bold]: {value}")


def summary_markdown(results: list[dict]) -> str:
    lines = ["| stage | status | time (s) | key metric |", "|---|---|---|---|"]
    lines += [
        f"| {r['stage']} | {r['status']} | {r['stage_seconds']:.1f} | {key_metric(stage_output(r))} |" for r in results
    ]
    lines += [""] + [f"- **{name}**: {value}" for name, value in _extras(results)]
    return "\n".join(lines)


def accuracy_table(results: list[dict]) -> list[dict]:
    """One row per scored model (baselines, heuristic subnet, extracted): accuracy per test set and averages."""
    by_stage = {r["stage"]: stage_output(r) for r in results}
    ev = by_stage.get("evaluate")
    if ev is None:
        return []
    scored = {
        f"{name} subnet" if name == ev.subnet_name else name: m
        for name, m in scored_models(ev, by_stage.get("extract")).items()
    }
    return [
        {
            "model": name,
            **{t: round(a, 4) for t, a in m.accuracy.items()},
            "average": round(m.average_accuracy, 4),
            "average_95%": _rounded(m.average_accuracy_interval),
            "average_strict": round(m.average_accuracy_strict, 4),
        }
        for name, m in scored.items()
    ]


def _rounded(interval) -> str:
    return "–" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


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
    files = BenchmarkOutput.files
    text = (folder / files.results_markdown).read_text()
    for plot in (files.throughput_plot, files.accuracy_plot):
        data = base64.b64encode((folder / plot).read_bytes()).decode()
        text += f"\n![{plot}](data:image/png;base64,{data})\n\n`{folder / plot}`\n"
    return text
