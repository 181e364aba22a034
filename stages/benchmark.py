"""Stage 6, benchmark: every variant of the model, measured the same way, side by side.

Variants: the dense base, the pruned base, the super-adapter (unmerged, at evaluate's subnet), the extracted model
(merged where the method allows, and unmerged), its OpenVINO exports (FP32, and NNCF INT8/INT4 weight compression,
on the CPU), and on a CUDA host PyTorch's 2:4 semi-structured sparse kernels for an N:M-pruned base. Each is timed
at every batch size (prefill, decode per token, tokens/s: medians ± half range over repeats), in its own process for
its peak memory. Writes `results.parquet`, `results.md`, `throughput_vs_macs.png`, `accuracy_vs_macs.png`, the
OpenVINO exports under `openvino/`, and the exports' test-set predictions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from tqdm.auto import tqdm

from nlsflow.artifacts import read_table, write_table
from nlsflow.deploy.measure import Variant, measure_in_subprocess
from nlsflow.deploy.report import plot_results, results_markdown, with_speedups
from nlsflow.evaluation.scoring import paired_differences
from nlsflow.io import atomic_write_text
from nlsflow.methods import method_for
from nlsflow.models import resolve_device
from schemas.outputs import BenchmarkOutput, EvaluateOutput, ExtractOutput, PruneOutput, Scores, TrainOutput
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def pytorch_variants(ctx: StageContext) -> list[Variant]:
    cfg, method = ctx.cfg, method_for(ctx.cfg)
    pruned, extracted, train = (
        ctx.input_dir("prune") / PruneOutput.files.model,
        ctx.input_dir("extract"),
        ctx.input_dir("train"),
    )
    prune = ctx.output("prune")
    variants = [
        Variant("dense", prune.base_model, weights=cfg.dtype, revision=prune.base_revision),
        Variant("pruned", str(pruned), weights=cfg.dtype),
    ]
    if cfg.benchmark.super_adapter:
        subnet = ctx.output("evaluate").subnet
        variants.append(
            Variant(
                "super_adapter",
                str(pruned),
                weights=cfg.dtype,
                adapter_dir=str(train / TrainOutput.files.adapter),
                search_space=str(train / TrainOutput.files.search_space),
                subnet=tuple(sorted(subnet.items())),
                masked=method.masked,
            )
        )
    merged, narrowed = extracted / ExtractOutput.files.merged, extracted / ExtractOutput.files.base
    if merged.is_dir():
        variants.append(Variant("extracted_merged", str(merged), weights=cfg.dtype))
    adapter_base = narrowed if narrowed.is_dir() else pruned  # LoNAS: the narrowed base
    variants.append(
        Variant(
            "extracted_adapter",
            str(adapter_base),
            weights=cfg.dtype,
            adapter_dir=str(extracted / method.adapter_folder),
            masked=method.masked,
        )
    )  # as extract scored it
    return variants


def semi_structured_variants(ctx: StageContext, variants: list[Variant]) -> tuple[list[Variant], str]:
    """fp16 pairs (dense kernels, 2:4 sparse kernels) of the N:M-pruned models; or why there are none."""
    cfg = ctx.cfg
    if not cfg.benchmark.semi_structured:
        return [], "off (benchmark.semi_structured=false)"
    if resolve_device(cfg.device).type != "cuda":
        return [], "skipped: PyTorch's semi-structured sparse kernels need a CUDA device"
    if cfg.prune.structure != "2:4" or not cfg.prune.sparsity:
        return [], f"skipped: the base is pruned {cfg.prune.structure!r}, not 2:4"
    sparse = {"pruned"} | ({"extracted_merged"} if method_for(cfg).masked else set())  # a plain merge densifies
    pairs = []
    for v in variants:
        if v.name in sparse:
            pairs += [
                Variant(f"{v.name}@fp16", v.model_dir, weights="float16", dtype="float16"),
                Variant(
                    f"{v.name}@2:4",
                    v.model_dir,
                    weights="float16, 2:4 sparse kernels",
                    dtype="float16",
                    semi_structured=True,
                ),
            ]
    return pairs, "measured"


def openvino_rows(ctx: StageContext, source: Variant, source_row: dict, measure) -> tuple[list[dict], list[dict], str]:
    """Export the deployable model to OpenVINO (NNCF weight compression), time it, and score it on the test sets."""
    from nlsflow.deploy.openvino_format import OpenVINODecoder, export_openvino_formats
    from nlsflow.evaluation.scoring import evaluate_test_sets
    from nlsflow.models import load_tokenizer

    bc, ec, rows, predictions = ctx.cfg.benchmark, ctx.cfg.evaluate, [], []
    folders = {weights: ctx.out_dir / BenchmarkOutput.files.openvino / weights for weights in bc.openvino}
    exports = export_openvino_formats(
        source.model_dir, folders, group_size=bc.int4_group_size, int4_ratio=bc.int4_ratio
    )
    score = bc.openvino_accuracy and ec.generation.num_beams == 1
    status = "measured on CPU" + (
        ""
        if score or not bc.openvino_accuracy
        else f"; not scored: greedy only, evaluate.generation.num_beams={ec.generation.num_beams}"
    )
    stats = {k: source_row[k] for k in ("params", "nonzero_params", "macs_per_token", "nonzero_macs_per_token")}
    for weights, folder in tqdm(folders.items(), desc="openvino"):
        name = f"{source.name}@openvino-{weights}"
        log.info("%s: %.1f MB, %s", name, exports[weights]["size_on_disk_mb"], exports[weights]["weight_formats"])
        scored = None
        if score:
            decoder = OpenVINODecoder(folder, ctx.cfg.num_threads)
            found, scores = evaluate_test_sets(
                None, load_tokenizer(source.model_dir), ctx.data_root, ec, name, decoder=decoder
            )
            predictions += found
            scored = Scores.model_validate(scores)
        rows += [
            {
                **stats,
                **measure(Variant(name, str(folder), runtime="openvino", weights=weights), batch_size),
                "model": name,
                "runtime": "openvino",
                "weights": weights,
                **_accuracy(scored),
                "note": "CPU",
            }
            for batch_size in bc.batch_sizes
        ]
    return rows, predictions, status


def _accuracy(scores: Scores | None) -> dict:
    if scores is None:
        return {"accuracy": None, "accuracy_strict": None}
    return {"accuracy": scores.average_accuracy, "accuracy_strict": scores.average_accuracy_strict}


def known_accuracies(ctx: StageContext) -> dict[str, Scores]:
    """What earlier stages scored, by variant name."""
    evaluate, extract = ctx.output("evaluate"), ctx.output("extract")
    known = {**evaluate.baselines, "super_adapter": evaluate.scores}
    if extract.scores is not None:
        known["extracted_merged"] = known["extracted_adapter"] = extract.scores
    return known


def run(ctx: StageContext) -> BenchmarkOutput:
    cfg, bc = ctx.cfg, ctx.cfg.benchmark
    scored = earlier_predictions(ctx)  # read before the measurements, which take long
    measure = measurer(ctx)
    variants = pytorch_variants(ctx)
    extra, semi_structured = semi_structured_variants(ctx, variants)
    rows = pytorch_rows(variants + extra, known_accuracies(ctx), bc.batch_sizes, measure)

    openvino, predictions = "off (benchmark.openvino=[])", []
    deployable = next((v for v in variants if v.name == "extracted_merged"), None)
    if bc.openvino and deployable is None:
        openvino = "skipped: no merged model to export (extract.merge=false)"
    elif bc.openvino:
        source_row = next(r for r in rows if r["model"] == deployable.name)
        found, predictions, openvino = openvino_rows(ctx, deployable, source_row, measure)
        rows += found
    rows = with_speedups(
        rows,
        unstructured=cfg.prune.structure == "unstructured" and cfg.prune.sparsity > 0,
        same_device=resolve_device(cfg.device).type == "cpu",
    )
    write_report(ctx, rows, predictions)
    differences, differences_cloze = accuracy_differences(ctx, scored, predictions)
    by_batch = {bs: {r["model"]: r for r in rows if r["batch_size"] == bs} for bs in bc.batch_sizes}
    return BenchmarkOutput(
        results=by_batch[bc.batch_sizes[0]],
        results_by_batch={str(bs): v for bs, v in by_batch.items()},
        openvino=openvino,
        semi_structured=semi_structured,
        differences=differences,
        differences_cloze=differences_cloze,
        settings=bc,
    )


def earlier_predictions(ctx: StageContext) -> list[dict]:
    """The evaluate and extract stages' test-set predictions; none where extract.evaluate was off."""
    if ctx.output("extract").scores is None:
        return []
    return [
        *read_table(ctx.input_dir("evaluate") / EvaluateOutput.files.predictions, "predictions").to_pylist(),
        *read_table(ctx.input_dir("extract") / ExtractOutput.files.predictions, "predictions").to_pylist(),
    ]


def accuracy_differences(ctx: StageContext, scored: list[dict], openvino_predictions: list[dict]) -> tuple[dict, dict]:
    """The extracted model against each model the evaluate stage scored (the super-network at its subnet, the
    bases), and each scored OpenVINO export against the extracted model: paired differences on the same records, by
    the generated answers and by the cloze (where both sides have it). Empty where extract.evaluate was off."""
    if not scored:
        return {}, {}
    evaluate, rows = ctx.output("evaluate"), scored + openvino_predictions
    exports = sorted({r["model"] for r in openvino_predictions})
    pairs = [("extracted", name) for name in (evaluate.subnet_name, *evaluate.baselines)]
    pairs += [(export, "extracted") for export in exports]
    averaged = ctx.cfg.evaluate.averaged
    return paired_differences(rows, pairs, averaged), paired_differences(rows, pairs, averaged, "cloze_correct")


def measurer(ctx: StageContext) -> Callable[[Variant, int], dict]:
    """`measure(variant, batch_size)`: a variant timed at a batch size in its own process, with the run's settings."""
    cfg, bc = ctx.cfg, ctx.cfg.benchmark
    model_config = ctx.input_dir("prune") / PruneOutput.files.model / "config.json"
    vocab_size = json.loads(model_config.read_text())["vocab_size"]
    settings = dict(
        dtype=cfg.dtype,
        device=cfg.device,
        vocab_size=vocab_size,
        prompt_len=bc.prompt_len,
        new_tokens=bc.new_tokens,
        warmup=bc.warmup,
        repeats=bc.repeats,
        num_threads=cfg.num_threads,
    )

    def measure(variant: Variant, batch_size: int) -> dict:
        return measure_in_subprocess(variant, batch_size=batch_size, **settings)

    return measure


def pytorch_rows(
    variants: list[Variant], known: dict[str, Scores], batch_sizes: list[int], measure: Callable[[Variant, int], dict]
) -> list[dict]:
    """Every PyTorch variant measured at every batch size, with the accuracy an earlier stage scored it at."""
    rows = []
    for variant in tqdm(variants, desc="benchmark"):
        accuracy = _accuracy(known.get(variant.name.split("@")[0]))  # 2:4 kernels run the same weights
        for batch_size in batch_sizes:
            row = {
                **measure(variant, batch_size),
                "model": variant.name,
                "runtime": "pytorch",
                "weights": variant.weights,
                **accuracy,
            }
            log.info("%s, batch %d: %.1f tokens/s", variant.name, batch_size, row["tokens_per_s"])
            rows.append(row)
    return rows


def write_report(ctx: StageContext, rows: list[dict], predictions: list[dict]) -> None:
    """The results as a table, as markdown and as plots; the OpenVINO exports' predictions, where scored."""
    files = BenchmarkOutput.files
    write_table(ctx.out_dir / files.results, "results", rows)
    if predictions:
        write_table(ctx.out_dir / files.predictions, "predictions", predictions)
    atomic_write_text(ctx.out_dir / files.results_markdown, results_markdown(rows))
    plot_results(rows, ctx.out_dir)


if __name__ == "__main__":
    raise SystemExit(main("benchmark", run))
