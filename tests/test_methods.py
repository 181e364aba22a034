"""Method variants on the tiny profile: Shears' sparsity-preserving merge, and a seed NNCF search-space file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, TINY_CONFIGS, tiny_config, tiny_overrides
from transformers import AutoModelForCausalLM

from nlsflow.adapters.masking import zero_counts
from nlsflow.artifacts import read_manifest, read_table, stage_dir
from nlsflow.errors import NlsflowError
from nlsflow.models import load_causal_lm
from stages import benchmark, evaluate, extract, prune, search, train
from stages._common import run_stage

pytestmark = pytest.mark.slow
SHEARS_TEMPLATE = REPO / "tests" / "fixtures" / "nncf" / "shears_llama_template.json"
LONAS = REPO / "tests" / "fixtures" / "nncf" / "lonas_llama_7b_commonsense_2layers.json"


def method_config(run_dir, method: str, *overrides: str):
    """What `make pipeline TASK=math PROFILE=tiny METHOD=<method>` loads, with overrides."""
    from nlsflow.config import load_config

    profiles = REPO / "configs" / "profiles"
    files = [*TINY_CONFIGS, REPO / "configs" / "methods" / f"{method}.yaml"]
    files += [f for f in (profiles / f"tiny.{method}.yaml", profiles / f"tiny.{method}.math.yaml") if f.is_file()]
    return load_config(files, tiny_overrides(run_dir, "train.max_steps=20", "search.num_evals=4", *overrides))


def run_all(cfg, modules=(prune, train, evaluate, search, extract)):
    for module in modules:
        run_stage(module.__name__.rsplit(".", 1)[-1], module.run, cfg)


def test_shears_merges_with_the_pruned_sparsity_in_every_layer(tmp_path):
    cfg = method_config(tmp_path, "shears")
    assert cfg.method.name == "shears" and cfg.method.sparsity_preserving and cfg.prune.sparsity == 0.5
    run_all(cfg)
    metrics = read_manifest(stage_dir(tmp_path, "extract"), "extract").metrics
    pruned = read_table(stage_dir(tmp_path, "prune") / "sparsity.parquet", "sparsity").to_pylist()
    merged = load_causal_lm(str(stage_dir(tmp_path, "extract") / "merged"), "float32", torch.device("cpu"))
    assert zero_counts(merged) == {r["layer"]: r["zeros"] for r in pruned}
    assert metrics["merged_sparsity"] == pytest.approx(
        sum(r["zeros"] for r in pruned) / sum(r["in_features"] * r["out_features"] for r in pruned)
    )
    assert metrics["max_abs_logit_diff"] <= 1e-4 and metrics["merged_max_abs_logit_diff"] <= 1e-4


def test_lonas_extracts_a_smaller_model_with_the_supernet_logits(tmp_path):
    cfg = method_config(tmp_path, "lonas")
    assert cfg.method.name == "lonas" and cfg.prune.sparsity == 0 and cfg.method.width_groups[0].choices[0] == 172
    run_all(cfg, (prune, train, evaluate, search, extract, benchmark))
    extract_dir = stage_dir(tmp_path, "extract")
    metrics = read_manifest(extract_dir, "extract").metrics
    chosen = metrics["subnet"]
    assert metrics["mlp_widths"] == [chosen[f"layers.{i}.gate_up_width"] for i in range(2)]
    assert metrics["max_abs_logit_diff"] <= 1e-4 and metrics["merged_max_abs_logit_diff"] <= 1e-4
    dense_params = read_manifest(stage_dir(tmp_path, "prune"), "prune").metrics["params"]
    assert (
        metrics["merged_params"] == dense_params - 3 * 64 * sum(172 - w for w in metrics["mlp_widths"]) < dense_params
    )
    results = read_manifest(stage_dir(tmp_path, "benchmark"), "benchmark").metrics["results"]
    assert results["extracted_merged"]["params"] == metrics["merged_params"]
    assert results["extracted_merged"]["macs_per_token"] < results["dense"]["macs_per_token"]

    # a given subnet with a different width in every layer: a per-layer folder that stock transformers loads
    subnet = {**chosen, "layers.0.gate_up_width": 150, "layers.1.gate_up_width": 108}
    run_stage("extract", extract.run, method_config(tmp_path, "lonas", f"extract.subnet={json.dumps(subnet)}"))
    metrics = read_manifest(extract_dir, "extract").metrics
    assert metrics["subnet_name"] == "given" and metrics["mlp_widths"] == [150, 108]
    assert metrics["max_abs_logit_diff"] <= 1e-4 and metrics["merged_max_abs_logit_diff"] <= 1e-4
    stock = AutoModelForCausalLM.from_pretrained(extract_dir / "merged", trust_remote_code=True)
    assert [layer.mlp.up_proj.out_features for layer in stock.model.layers] == [150, 108]
    with pytest.raises(
        NlsflowError, match=r"extract.subnet: subnet variable 'layers.0.gate_up_width'=151 is not one of"
    ):
        run_stage(
            "extract",
            extract.run,
            method_config(tmp_path, "lonas", "extract.subnet=" + json.dumps({**subnet, "layers.0.gate_up_width": 151})),
        )


def test_seed_nncf_file_fills_the_groups_and_search_defaults(tmp_path):
    cfg = tiny_config(tmp_path, f"train.search_space_file={SHEARS_TEMPLATE}", "train.rank=32", "train.alpha=64")
    assert [(g.name, g.modules, g.choices, g.per_layer) for g in cfg.train.groups] == [
        ("qkv", ["q_proj", "k_proj", "v_proj"], [32, 24, 16], True),
        ("up", ["up_proj"], [32, 24, 16], True),
        ("down", ["down_proj"], [32, 24, 16], True),
    ]
    assert cfg.stage_config("train")["train"]["groups"][0]["choices"] == [32, 24, 16]  # content, not just the path


def test_search_block_gives_defaults_and_width_groups_fill_the_config(tmp_path):
    plain = tmp_path / "space.yaml"
    plain.write_text(
        "groups:\n  - {name: qkv, modules: [q_proj, k_proj, v_proj], choices: [8, 6]}\n"
        "  - {name: mlp, modules: [up_proj, down_proj], choices: [8, 4]}\n"
        "search: {algorithm: NSGA2, num_evals: 99, ref_acc: 0.3, acc_delta: 0.02}\n"
    )
    cfg = tiny_config(tmp_path, f"train.search_space_file={plain}")
    assert cfg.search.ref_acc == 0.3 and cfg.search.acc_delta == 0.02
    assert cfg.search.num_evals == 10  # the profile's own search.num_evals wins over the file's
    with pytest.raises(NlsflowError, match=r"group 'gate_up': modules \['gate_proj'\] are not in train.target_modules"):
        tiny_config(tmp_path, "method=lonas", f"train.search_space_file={LONAS}", "train.rank=32")
    with pytest.raises(NlsflowError, match=r"has width groups, which only method lonas trains \(method is 'shears'\)"):
        tiny_config(
            tmp_path,
            f"train.search_space_file={LONAS}",
            "train.rank=32",
            "train.target_modules=[q_proj, k_proj, v_proj, up_proj, gate_proj, down_proj]",
        )
    cfg = tiny_config(
        tmp_path,
        "method=lonas",
        f"train.search_space_file={LONAS}",
        "train.rank=32",
        "train.target_modules=[q_proj, k_proj, v_proj, up_proj, gate_proj, down_proj]",
    )
    assert [(g.name, g.modules, g.choices) for g in cfg.method.width_groups] == [
        ("gate_up_width", ["gate_proj", "up_proj"], [11008, 9632, 8256, 6880, 5504])
    ]
    assert cfg.search.population == 4 and cfg.search.acc_delta == 0.01 and cfg.search.ref_acc == 0.45


def test_commonsense_task_runs_end_to_end(tmp_path):
    from conftest import DATA_ROOT

    from nlsflow.config import load_config

    configs = [REPO / "configs" / "tasks" / "commonsense.yaml", REPO / "configs" / "profiles" / "tiny.yaml"]
    cfg = load_config(
        configs,
        [
            f"run_dir={tmp_path}",
            f"data.root={DATA_ROOT}",
            "train.max_steps=20",
            "search.num_evals=4",
            "evaluate.max_samples=2",
            "evaluate.baselines=[pruned]",
        ],
    )
    for module in (prune, train, evaluate, search, extract):
        run_stage(module.__name__.rsplit(".", 1)[-1], module.run, cfg)
    metrics = read_manifest(stage_dir(tmp_path, "evaluate"), "evaluate").metrics
    assert set(metrics["accuracy"]) == set(cfg.evaluate.datasets) and len(cfg.evaluate.datasets) == 8
    # HellaSwag (36 records, no training split offline) is reported apart: the averages span the other seven
    averaged = [t for t in cfg.evaluate.datasets if t != "hellaswag"]
    assert metrics["averaged"] == averaged
    assert metrics["average_accuracy"] == pytest.approx(sum(metrics["accuracy"][t] for t in averaged) / 7)
    assert metrics["differences"] and all(set(d["per_set"]) == set(averaged) for d in metrics["differences"].values())
    sources = {
        r["source"] for r in read_table(stage_dir(tmp_path, "train") / "validation.parquet", "records").to_pylist()
    }
    assert sources <= {"boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"}
    assert read_manifest(stage_dir(tmp_path, "extract"), "extract").metrics["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("bits", [None, 3])
def test_nola_trains_coefficients_only_and_extracts_stock_lora_with_its_logits(tmp_path, bits):
    from peft import PeftModel, get_peft_model

    from nlsflow.adapters.elastic import activate, make_elastic, resolve_space
    from nlsflow.adapters.nola import CONFIG_FILE, WEIGHTS_FILE, load_nola, materialize, nola_lora_config
    from nlsflow.adapters.supernet import load_search_space_groups

    cfg = method_config(tmp_path, "nola", *([f"method.bits={bits}"] if bits else []))
    assert cfg.method.name == "nola" and cfg.prune.sparsity == 0 and cfg.method.bits == bits
    run_all(cfg)
    trained = read_manifest(stage_dir(tmp_path, "train"), "train").metrics
    lora_layers = 2 * len(cfg.train.target_modules)
    assert trained["trainable_params"] == lora_layers * (cfg.method.num_basis_a + cfg.method.num_basis_b)
    adapter = stage_dir(tmp_path, "train") / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    bytes_per_coefficient = 1 if bits else 4  # quantized: one-byte level indices
    assert trained["adapter_bytes"] < bytes_per_coefficient * trained["trainable_params"] + 16384  # + headers, no basis

    extracted = read_manifest(stage_dir(tmp_path, "extract"), "extract").metrics
    assert extracted["max_abs_logit_diff"] <= cfg.extract.tolerance  # NOLA's large delta carries float32 noise
    assert extracted["merged_max_abs_logit_diff"] <= cfg.extract.merge_tolerance
    nola_dir = stage_dir(tmp_path, "extract") / "nola"
    assert json.loads((nola_dir / "subnet.json").read_text()) == extracted["subnet"]

    # The compact form rebuilds the same sub-adapter as the stock one in extract/adapter/.
    base_dir = stage_dir(tmp_path, "prune") / "model"
    tokens = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])
    stock = PeftModel.from_pretrained(
        load_causal_lm(str(base_dir), "float32", torch.device("cpu")), str(stage_dir(tmp_path, "extract") / "adapter")
    ).eval()
    rebuilt = get_peft_model(load_causal_lm(str(base_dir), "float32", torch.device("cpu")), nola_lora_config(nola_dir))
    make_elastic(rebuilt)
    space = resolve_space(rebuilt, load_search_space_groups(stage_dir(tmp_path, "train") / "search_space.json")[0])
    load_nola(rebuilt, nola_dir)
    materialize(rebuilt)
    activate(rebuilt.eval(), space, extracted["subnet"])
    with torch.no_grad():
        assert torch.allclose(rebuilt(input_ids=tokens).logits, stock(input_ids=tokens).logits, atol=1e-5)
    if bits is None:  # bases too large for the budget: refused before they are made, the trained adapter kept
        with pytest.raises(NlsflowError, match=r"NOLA bases would take .* GB > method.max_basis_gb=1e-06"):
            run_stage("train", train.run, method_config(tmp_path, "nola", "method.max_basis_gb=1e-6"))
        assert read_manifest(stage_dir(tmp_path, "train"), "train").metrics == trained


def test_nola_refuses_what_it_cannot_do_yet(tmp_path):
    with pytest.raises(NlsflowError, match="unknown key 'method.nola.sparsity_preserving'"):
        method_config(tmp_path, "nola", "method.sparsity_preserving=true")
