"""Method variants on the tiny profile: Shears' sparsity-preserving merge, and a seed NNCF search-space file."""
from __future__ import annotations

import pytest

from conftest import REPO, tiny_config
from schemas import NlsflowError, read_manifest, read_table, stage_dir
from stages import evaluate, extract, prune, search, train
from stages._common import run_stage

pytestmark = pytest.mark.slow
SHEARS_TEMPLATE = REPO / "tests" / "fixtures" / "nncf" / "shears_llama_template.json"
LONAS = REPO / "tests" / "fixtures" / "nncf" / "lonas_llama_7b_commonsense_2layers.json"


def test_sparsity_preserving_training_merges_with_the_pruned_sparsity(tmp_path):
    cfg = tiny_config(tmp_path, "train.sparsity_preserving=true", "train.max_steps=20", "search.num_evals=4")
    for module in (prune, train, evaluate, search, extract):
        run_stage(module.__name__.rsplit(".", 1)[-1], module.run, cfg)
    metrics = read_manifest(stage_dir(tmp_path, "extract"), "extract").metrics
    pruned = read_table(stage_dir(tmp_path, "prune") / "sparsity.parquet", "sparsity").to_pylist()
    assert metrics["merged_sparsity"] == pytest.approx(sum(r["zeros"] for r in pruned) /
                                                       sum(r["in_features"] * r["out_features"] for r in pruned))
    assert metrics["max_abs_logit_diff"] <= 1e-4 and metrics["merged_max_abs_logit_diff"] <= 1e-4


def test_seed_nncf_file_fills_the_groups_and_search_defaults(tmp_path):
    cfg = tiny_config(tmp_path, f"train.search_space_file={SHEARS_TEMPLATE}", "train.rank=32", "train.alpha=64")
    assert [(g.name, g.modules, g.choices, g.per_layer) for g in cfg.train.groups] == [
        ("qkv", ["q_proj", "k_proj", "v_proj"], [32, 24, 16], True), ("up", ["up_proj"], [32, 24, 16], True),
        ("down", ["down_proj"], [32, 24, 16], True)]
    assert cfg.stage_config("train")["train"]["groups"][0]["choices"] == [32, 24, 16]  # content, not just the path


def test_search_block_gives_defaults_and_width_groups_fill_the_config(tmp_path):
    plain = tmp_path / "space.yaml"
    plain.write_text("groups:\n  - {name: qkv, modules: [q_proj, k_proj, v_proj], choices: [8, 6]}\n"
                     "  - {name: mlp, modules: [up_proj, down_proj], choices: [8, 4]}\n"
                     "search: {algorithm: NSGA2, num_evals: 99, ref_acc: 0.3, acc_delta: 0.02}\n")
    cfg = tiny_config(tmp_path, f"train.search_space_file={plain}")
    assert cfg.search.ref_acc == 0.3 and cfg.search.acc_delta == 0.02
    assert cfg.search.num_evals == 10  # the profile's own search.num_evals wins over the file's
    with pytest.raises(NlsflowError, match=r"group 'gate_up': modules \['gate_proj'\] are not in train.target_modules"):
        tiny_config(tmp_path, f"train.search_space_file={LONAS}", "train.rank=32")
    cfg = tiny_config(tmp_path, f"train.search_space_file={LONAS}", "train.rank=32",
                      "train.target_modules=[q_proj, k_proj, v_proj, up_proj, gate_proj, down_proj]")
    assert [(g.name, g.modules, g.choices) for g in cfg.train.width_groups] == [
        ("gate_up_width", ["gate_proj", "up_proj"], [11008, 9632, 8256, 6880, 5504])]
    assert cfg.search.population == 4 and cfg.search.acc_delta == 0.01 and cfg.search.ref_acc == 0.45


def test_commonsense_task_runs_end_to_end(tmp_path):
    from conftest import DATA_ROOT
    from schemas import load_config

    configs = [REPO / "configs" / "tasks" / "commonsense.yaml", REPO / "configs" / "profiles" / "tiny.yaml"]
    cfg = load_config(configs, [f"run_dir={tmp_path}", f"data.root={DATA_ROOT}", "train.max_steps=20",
                                "search.num_evals=4", "evaluate.max_samples=2"])
    for module in (prune, train, evaluate, search, extract):
        run_stage(module.__name__.rsplit(".", 1)[-1], module.run, cfg)
    metrics = read_manifest(stage_dir(tmp_path, "evaluate"), "evaluate").metrics
    assert set(metrics["accuracy"]) == set(cfg.evaluate.datasets) and len(cfg.evaluate.datasets) == 8
    sources = {r["source"] for r in read_table(stage_dir(tmp_path, "train") / "validation.parquet", "records").to_pylist()}
    assert sources <= {"boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"}
    assert read_manifest(stage_dir(tmp_path, "extract"), "extract").metrics["max_abs_logit_diff"] <= 1e-4
