"""Each stage's artifacts on the tiny math run: they exist, validate, and hold what the stage promises."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from nlsflow.adapters.elastic import activate, resolve_space
from nlsflow.adapters.supernet import load_search_space_groups
from nlsflow.artifacts import read_manifest, read_table, stage_dir
from nlsflow.data.datasets import calibration_batch, calibration_documents, generate_prompt
from nlsflow.methods import method_for
from nlsflow.models import load_causal_lm, load_tokenizer
from nlsflow.pruning import wanda_scores
from schemas import STAGES

pytestmark = pytest.mark.slow


def _dir(cfg, stage):
    return stage_dir(cfg.run_dir, stage)


def test_all_manifests_validate_and_chain(math_run):
    manifests = {s: read_manifest(_dir(math_run, s), s) for s in STAGES}
    assert manifests["extract"].inputs == {s: manifests[s].fingerprint() for s in ("prune", "train", "search")}
    assert all(m.config == json.loads(json.dumps(math_run.stage_config(s))) for s, m in manifests.items())
    assert not list(_dir(math_run, "prune").parent.glob(".*.tmp"))  # no temp folders left behind


def test_prune_rows_have_exactly_the_lowest_wanda_scores_zeroed(math_run):
    """Every pruned row has floor(ratio * in) zeros; the lowest |W|*||X|| for the activations the pruner saw."""
    model_dir = _dir(math_run, "prune") / "model"
    pruned = load_causal_lm(str(model_dir), "float32", torch.device("cpu"))
    dense = load_causal_lm(
        read_manifest(_dir(math_run, "prune"), "prune").metrics["base_model"], "float32", torch.device("cpu")
    )
    table = read_table(_dir(math_run, "prune") / "sparsity.parquet", "sparsity").to_pylist()
    assert len(table) == 14  # 7 linears in each of 2 layers
    ratio = math_run.prune.sparsity
    for row in table:
        weight = pruned.get_submodule(row["layer"]).weight
        assert ((weight == 0).sum(dim=1) == math.floor(ratio * row["in_features"])).all(), row["layer"]
        # Dense weights that were kept are unchanged.
        kept = weight != 0
        assert torch.equal(weight[kept], dense.get_submodule(row["layer"]).weight[kept])
    # The lowest-score property, recomputed on layer 0 (its inputs are the dense embeddings of the calibration set).
    tokenizer = load_tokenizer(str(model_dir))
    cc = math_run.prune.calibration
    calib = calibration_batch(
        tokenizer, calibration_documents(math_run.data.root, cc.source), cc.num_samples, cc.seqlen, cc.seed
    )
    captured = {}
    q_proj = dense.model.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        for sample in calib:  # one sample at a time, as the pruner feeds the layer
            captured.pop("x", None)
            dense(sample[None])
            captured.setdefault("sq", torch.zeros(q_proj.in_features))
            captured["sq"] += captured["x"].reshape(-1, q_proj.in_features).float().pow(2).sum(0)
    hook.remove()
    scores = wanda_scores(q_proj.weight, captured["sq"] / len(calib))
    zeros = pruned.model.layers[0].self_attn.q_proj.weight == 0
    assert (
        scores.masked_fill(~zeros, -1).max(dim=1).values <= scores.masked_fill(zeros, float("inf")).min(dim=1).values
    ).all()


def test_train_writes_peft_adapter_log_and_disjoint_validation(math_run):
    folder = _dir(math_run, "train")
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == math_run.train.rank
    weights = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.shape[0] == 8 or t.shape[1] == 8 for t in weights.values())
    log = read_table(folder / "training_log.parquet", "training_log").to_pylist()
    assert log[-1]["step"] == read_manifest(folder, "train").metrics["steps"]
    assert len({row["active_config"] for row in log}) > 1  # different subnets were trained
    assert all(math.isfinite(row["loss"]) for row in log) and log[-1]["loss"] < log[0]["loss"]
    validation = read_table(folder / "validation.parquet", "records").to_pylist()
    assert len(validation) == math_run.train.val_size
    assert {r["source"] for r in validation} <= {"gsm8k", "mawps"}
    report = read_manifest(folder, "train").metrics["contamination"]
    assert report["dropped"] == 1192 and report["overlaps"]["mawps_test"] == 27
    space = json.loads((folder / "search_space.json").read_text())
    assert len(space["variables"]) == 6 and set(space["subnets"]["heuristic"].values()) == {6}


def test_evaluate_predictions_match_metrics(math_run):
    rows = read_table(_dir(math_run, "evaluate") / "predictions.parquet", "predictions").to_pylist()
    metrics = read_manifest(_dir(math_run, "evaluate"), "evaluate").metrics
    assert len(rows) == len(math_run.evaluate.datasets) * math_run.evaluate.max_samples
    for task in math_run.evaluate.datasets:
        task_rows = [r for r in rows if r["task"] == task]
        assert metrics["accuracy"][task] == sum(r["correct"] for r in task_rows) / len(task_rows)
    assert metrics["subnet"] == {name: 6 for name in metrics["subnet"]}
    assert metrics["protocols"] == ["llm-adapters", "strict"] and {r["model"] for r in rows} == {"heuristic"}
    for task in math_run.evaluate.datasets:
        task_rows = [r for r in rows if r["task"] == task]
        assert metrics["accuracy_strict"][task] == sum(r["strict_correct"] for r in task_rows) / len(task_rows)
        low, high = metrics["accuracy_interval"][task]  # a 95% bootstrap interval around each set's accuracy
        assert low <= metrics["accuracy"][task] <= high
    low, high = metrics["average_accuracy_interval"]
    assert low <= metrics["average_accuracy"] <= high and metrics["differences"] == {}  # no baselines asked


def test_search_evaluations_are_unique_and_the_choice_is_on_record(math_run):
    folder = _dir(math_run, "search")
    rows = read_table(folder / "evaluations.parquet", "evaluations").to_pylist()
    assert len({r["config"] for r in rows}) == len(rows) >= math_run.search.population
    assert {"heuristic", "maximal", "minimal"} <= {r["label"] for r in rows}
    chosen = json.loads((folder / "chosen.json").read_text())
    assert json.dumps(chosen, sort_keys=True) in {r["config"] for r in rows}
    for r in rows:  # a Pareto point is dominated by no other evaluation
        dominated = any(
            o["accuracy"] >= r["accuracy"]
            and o["params"] <= r["params"]
            and (o["accuracy"] > r["accuracy"] or o["params"] < r["params"])
            for o in rows
        )
        assert r["pareto"] == (not dominated)
    assert (folder / "pareto_front.png").stat().st_size > 10_000 and (folder / "search_progression.png").is_file()
    assert len((folder / "search_progression.csv").read_text().splitlines()) == len(rows) + 1


def test_extracted_adapter_loads_with_stock_peft_and_matches_supernet(math_run):
    """No nlsflow code on the extracted side: PeftModel.from_pretrained on the pruned base (the run is Shears
    without masking, the default of a config with no method file; the masked adapter has its own tests)."""
    base_dir, train_dir = _dir(math_run, "prune") / "model", _dir(math_run, "train")
    chosen = json.loads((_dir(math_run, "search") / "chosen.json").read_text())
    supernet, tokenizer, space = method_for(math_run).load(base_dir, train_dir, "float32", torch.device("cpu"))
    activate(supernet, space, chosen)
    extract_dir = _dir(math_run, "extract")
    assert read_manifest(extract_dir, "extract").metrics["deployable"] == "adapter"
    extracted = PeftModel.from_pretrained(
        load_causal_lm(str(base_dir), "float32", torch.device("cpu")), str(extract_dir / "adapter")
    ).eval()
    batch = tokenizer(
        [generate_prompt("What is 2 plus 3?"), generate_prompt("Name a prime.", "", "7")],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        diff = (supernet(**batch).logits - extracted(**batch).logits)[batch["attention_mask"].bool()].abs().max().item()
    assert diff <= 1e-4
    ranks = {name: layer.r["default"] for name, layer in extracted.named_modules() if hasattr(layer, "lora_A")}
    expected = {
        m: chosen[v.name]
        for v in resolve_space(supernet, load_search_space_groups(train_dir / "search_space.json")[0])
        for m in v.modules
    }
    assert ranks == expected
    metrics = read_manifest(_dir(math_run, "extract"), "extract").metrics
    assert metrics["max_abs_logit_diff"] <= 1e-4 and metrics["merged_max_abs_logit_diff"] <= 1e-4
    assert (_dir(math_run, "extract") / "merged" / "config.json").is_file()
    rows = read_table(_dir(math_run, "extract") / "predictions.parquet", "predictions").to_pylist()
    assert {r["model"] for r in rows} == {"extracted"} and set(metrics["accuracy"]) == set(math_run.evaluate.datasets)


def test_benchmark_measures_every_variant(math_run):
    out = _dir(math_run, "benchmark")
    rows = read_table(out / "results.parquet", "results").to_pylist()
    openvino = {f"extracted_merged@openvino-{w}" for w in ("fp32", "int8", "int4")}
    assert {r["model"] for r in rows} == {
        "dense",
        "pruned",
        "super_adapter",
        "extracted_merged",
        "extracted_adapter",
        *openvino,
    }
    assert sorted(r["batch_size"] for r in rows if r["model"] == "dense") == math_run.benchmark.batch_sizes
    one = {r["model"]: r for r in rows if r["batch_size"] == 1}
    assert one["pruned"]["nonzero_params"] < one["dense"]["nonzero_params"]
    assert one["pruned"]["params"] == one["dense"]["params"]
    assert one["pruned"]["macs_per_token"] == one["dense"]["macs_per_token"] > one["pruned"]["nonzero_macs_per_token"]
    assert one["extracted_adapter"]["params"] > one["pruned"]["params"]
    assert one["super_adapter"]["params"] >= one["extracted_adapter"]["params"]  # it holds every rank
    assert all(
        r["tokens_per_s"] > 0
        and r["peak_memory_mb"] > 0
        and r["prefill_ms"] > 0
        and r["decode_ms_per_token"] > 0
        and r["tokens_per_s_spread"] >= 0
        for r in rows
    )
    sizes = {w: one[f"extracted_merged@openvino-{w}"]["size_on_disk_mb"] for w in ("fp32", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    assert all(0 <= one[name]["accuracy"] <= 1 and one[name]["runtime"] == "openvino" for name in openvino)
    assert one["dense"]["speedup"] == 1.0 and one["dense"]["note"] == "reference"
    assert all(
        r["speedup"] > 0 and ("no speed-up" in r["note"]) == (r["speedup"] < 1.05)
        for r in rows
        if r["model"] != "dense"
    )
    metrics = read_manifest(out, "benchmark").metrics
    assert "need a CUDA device" in metrics["semi_structured"] and metrics["openvino"] == "measured on CPU"
    assert set(metrics["results"]) == {r["model"] for r in rows}
    assert "| extracted_merged@openvino-int4 |" in (out / "results.md").read_text()
    assert (out / "throughput_vs_macs.png").stat().st_size > 0 and (out / "accuracy_vs_macs.png").stat().st_size > 0
    predictions = read_table(out / "predictions.parquet", "predictions").to_pylist()
    assert {r["model"] for r in predictions} == openvino
    # Paired on the same records: the extracted model against the super-network at evaluate's subnet, each export
    # against the extracted model (math's answers are open: no cloze)
    extracted = read_manifest(_dir(math_run, "extract"), "extract").metrics["average_accuracy"]
    at_subnet = read_manifest(_dir(math_run, "evaluate"), "evaluate").metrics["average_accuracy"]
    differences = metrics["differences"]
    assert set(differences) == {"extracted - heuristic", *(f"{name} - extracted" for name in openvino)}
    assert differences["extracted - heuristic"]["difference"] == pytest.approx(extracted - at_subnet)
    for name in openvino:
        assert differences[f"{name} - extracted"]["difference"] == pytest.approx(one[name]["accuracy"] - extracted)
    assert all(d["interval"][0] <= d["difference"] <= d["interval"][1] for d in differences.values())
    assert metrics["differences_cloze"] == {}


def test_report_quotes_the_manifests(math_run):
    from flows.report import run_report

    text = run_report(math_run.run_dir)
    evaluate = read_manifest(_dir(math_run, "evaluate"), "evaluate").metrics
    assert f"| pruned + heuristic subnet | {100 * evaluate['accuracy']['gsm8k']:.1f} |" in text
    assert "pruned + extracted (searched) subnet" in text
    assert "| extracted_merged@openvino-int8 | openvino | int8 | 1 |" in text  # the benchmark table follows
    assert "\nextracted - heuristic: " in text and "(paired, same records" in text
