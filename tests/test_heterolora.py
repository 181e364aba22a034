"""HeteroLoRA: the five proxies, selection and rank reallocation, shortcut modules, and both modes end to end."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import micro_llama
from peft import LoraConfig, PeftModel, get_peft_model
from test_methods import method_config, run_all
from transformers import LlamaConfig, LlamaForCausalLM

from nlsflow.adapters import selection as hetero
from nlsflow.adapters.shortcuts import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    attach_shortcuts,
    load_shortcuts,
    save_shortcuts,
    shortcuts_off,
)
from nlsflow.artifacts import read_manifest, read_table, stage_dir
from nlsflow.errors import NlsflowError
from nlsflow.models import load_causal_lm
from stages import benchmark, evaluate, extract, prune, search, train

TOKENS = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64], [3, 8, 13, 21, 34, 55, 89, 4]])
BATCHES = [{"input_ids": TOKENS, "labels": TOKENS}, {"input_ids": TOKENS.flip(1), "labels": TOKENS.flip(1)}]


def _model(shortcut_layers=(0, 1)):
    model = get_peft_model(
        micro_llama(32), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    shortcuts = attach_shortcuts(model, list(shortcut_layers), 4, 8) if shortcut_layers else None
    return model, shortcuts, hetero.candidates(model, shortcuts)


def _scaling(c: hetero.Candidate) -> float:
    return c.module.scaling["default"] if c.kind == "lora" else c.module.scaling


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("proxy", hetero.PROXIES)
def test_each_proxy_gives_finite_scores_ranked_the_same_for_a_seed(proxy):
    model, _, cands = _model()
    state = {c.name: (c.A.detach().clone(), c.B.detach().clone(), _scaling(c)) for c in cands}
    scores = hetero.score(model, cands, BATCHES, proxy, probe_std=0.05, seed=3)
    assert list(scores) == [c.name for c in cands] and len(cands) == 2 * 3 + 2
    assert all(math.isfinite(s) for s in scores.values())
    twin, _, twin_cands = _model()
    again = hetero.score(twin, twin_cands, BATCHES, proxy, probe_std=0.05, seed=3)
    assert again == scores and hetero.ranking(again, 3) == hetero.ranking(scores, 3)
    if proxy == "constant":  # all tied: the order is the seed's random one
        assert set(scores.values()) == {1.0} and hetero.ranking(scores, 3) != hetero.ranking(scores, 4)
    else:  # untrained B is probed with random values: the scores tell the modules apart
        assert len({round(s, 12) for s in scores.values()}) == len(scores)
    # nothing is left changed: the factors (B back at zero), the scalings, the switches, the model's mode
    for c in cands:
        a, b, scaling = state[c.name]
        assert torch.equal(c.A, a) and torch.equal(c.B, b) and _scaling(c) == scaling == c.scaling
        assert c.A.requires_grad and c.B.requires_grad
    assert model.training


def test_switching_off_removes_a_module_and_its_gradients():
    model, shortcuts, cands = _model()
    for c in cands:  # give every module an effect
        torch.nn.init.normal_(c.B, std=0.1)
    full = _logits(model)
    hetero.set_enabled(cands, set())
    all_off = _logits(model)
    assert not any(p.requires_grad for c in cands for p in (c.A, c.B))
    hetero.set_enabled(cands, {c.name for c in cands})
    assert torch.allclose(_logits(model), full) and not torch.allclose(full, all_off)
    shortcuts.detach()
    with model.disable_adapter():  # all off is exactly the base model
        assert torch.allclose(_logits(model), all_off, atol=1e-6)


def test_selection_takes_the_top_fraction_together_or_per_kind():
    scores = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "shortcut.0": 1.0, "shortcut.1": 0.5}
    kinds = {n: "shortcut" if n.startswith("shortcut") else "lora" for n in scores}
    assert hetero.select_top(scores, kinds, 0.5, combined=True, seed=0) == {"a", "b", "c"}
    assert hetero.select_top(scores, kinds, 0.5, combined=False, seed=0) == {"a", "b", "shortcut.0"}
    assert hetero.select_top(scores, kinds, 0.01, combined=True, seed=0) == {"a"}  # at least one


def test_rank_reallocation_follows_the_scores_within_the_budget():
    scores = {"a": 4.0, "b": 2.0, "c": 1.0, "d": 0.0}
    choices = {n: (8, 6, 4) for n in scores}
    per_rank = {n: 100 for n in scores}
    full = sum(8 * 100 for _ in scores)
    for fraction in (1.0, 0.6, 0.3, 0.1):
        ranks = hetero.allocate_ranks(scores, choices, per_rank, int(fraction * full))
        assert sum(r * 100 for r in ranks.values()) <= fraction * full
        assert all(r in (0, 4, 6, 8) for r in ranks.values()) and ranks["d"] == 0
        assert ranks["a"] >= ranks["b"] >= ranks["c"]
    assert hetero.allocate_ranks(scores, choices, per_rank, full) == {"a": 8, "b": 8, "c": 8, "d": 0}
    assert hetero.allocate_ranks(scores, choices, per_rank, 800) == {"a": 8, "b": 0, "c": 0, "d": 0}


def test_shortcuts_round_trip_and_refuse_another_model(tmp_path):
    model, shortcuts, _ = _model()
    before = _logits(model)
    for s in shortcuts.values():
        torch.nn.init.normal_(s.B.weight, std=0.1)
    with_shortcuts = _logits(model)
    assert not torch.allclose(before, with_shortcuts)  # they carry a signal across the layer
    with shortcuts_off(model):  # e.g. the evaluate stage's pruned baseline
        assert torch.allclose(_logits(model), before)
    assert torch.allclose(_logits(model), with_shortcuts)
    save_shortcuts(shortcuts, tmp_path, layers=[1])
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {"rank": 4, "alpha": 8, "layers": [1]}
    shortcuts.detach()
    assert torch.allclose(_logits(model), before)
    loaded = load_shortcuts(model, tmp_path)
    assert list(loaded) == ["1"] and torch.equal(loaded["1"].B.weight, shortcuts["1"].B.weight)
    loaded.detach()
    wide = get_peft_model(
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            )
        ),
        LoraConfig(r=4, target_modules=["q_proj"]),
    )
    with pytest.raises(NlsflowError, match="does not fit this model"):
        load_shortcuts(wide, tmp_path)
    shallow = get_peft_model(
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
            )
        ),
        LoraConfig(r=4, target_modules=["q_proj"]),
    )
    with pytest.raises(NlsflowError, match=r"shortcut layers \[1\] are outside this model's 1 decoder layers"):
        load_shortcuts(shallow, tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"rank": 4}')
    with pytest.raises(NlsflowError, match="shortcuts in .* cannot be read .*KeyError"):
        load_shortcuts(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"rank": 4, "alpha": 8, "layers": [1]}')
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(NlsflowError, match="cannot be read"):
        load_shortcuts(model, tmp_path)


@pytest.mark.slow
def test_dynamic_mode_changes_the_enabled_set_and_logs_when(tmp_path, caplog):
    cfg = method_config(tmp_path, "heterolora", "train.max_steps=60", "method.selection.realloc_every=0.1")
    assert cfg.method.name == "heterolora" and cfg.method.selection.mode == "dynamic" and cfg.prune.sparsity == 0
    with caplog.at_level(logging.INFO):
        run_all(cfg)
    train_dir = stage_dir(tmp_path, "train")
    log = read_table(train_dir / "heterolora_log.parquet", "heterolora_log").to_pylist()
    assert [r["step"] for r in log] == [1, 21, 41]  # 200 steps an epoch: every 20 steps
    changes = [r for r in log[1:] if json.loads(r["turned_on"]) or json.loads(r["turned_off"])]
    assert changes, "the enabled set never changed during training"
    for row in changes:
        assert f"HeteroLoRA step {row['step']} " in caplog.text and "turned on" in caplog.text
    chosen = json.loads((train_dir / "heterolora.json").read_text())
    lora = [n for n in chosen["enabled"] if not n.startswith("shortcut")]
    assert len(chosen["enabled"]) == round(0.25 * 12) == log[-1]["enabled"]
    adapter = json.loads((train_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(lora)
    metrics = read_manifest(train_dir, "train").metrics
    assert metrics["heterolora_reallocations"] == len(log) and metrics["heterolora_enabled"] == len(chosen["enabled"])
    extracted = read_manifest(
        stage_dir(tmp_path, "extract"), "extract"
    ).metrics  # the adapter as saved searches and extracts
    assert extracted["max_abs_logit_diff"] <= 1e-4 and extracted["merged_max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_static_rank_budget_with_shortcuts_extracts_with_the_supernet_logits(tmp_path):
    cfg = method_config(
        tmp_path,
        "heterolora",
        "method.selection={mode: static, select: rank_budget, rank_budget: 0.4, proxy: alpha_test, shortcut_rank: 2}",
    )
    run_all(cfg, (prune, train, evaluate, search, extract, benchmark))
    train_dir, extract_dir = stage_dir(tmp_path, "train"), stage_dir(tmp_path, "extract")
    chosen = json.loads((train_dir / "heterolora.json").read_text())
    lora = {n: r for n, r in chosen["ranks"].items() if not n.startswith("shortcut")}
    candidates = 2 * len(cfg.train.target_modules)
    assert len(chosen["scores"]) == candidates + 2 and 0 < len(chosen["enabled"]) < candidates + 2
    trained = read_manifest(train_dir, "train").metrics
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + 2 * (64 + 172)) + 2 * (
        64 + 64
    )  # q, k, v, up, down at rank 8, shortcut
    full = 2 * per_layer  # every candidate at its full rank
    assert trained["trainable_params"] <= 0.4 * full
    adapter = PeftModel.from_pretrained(
        load_causal_lm(str(stage_dir(tmp_path, "prune") / "model"), "float32", torch.device("cpu")),
        str(train_dir / "adapter"),
    )
    assert {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in adapter.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})
    } == lora
    extracted = read_manifest(extract_dir, "extract").metrics  # the capped ranks slice and merge exactly
    assert extracted["max_abs_logit_diff"] <= 1e-4 and extracted["merged_max_abs_logit_diff"] <= 1e-4
    assert any(r < 8 for r in lora.values())  # this seed gives one module a lower rank: the cap is exercised


@pytest.mark.slow
def test_static_shortcuts_travel_with_the_extracted_adapter_and_merged_model(tmp_path):
    cfg = method_config(
        tmp_path,
        "heterolora",
        "method.selection={mode: static, ranking: separate, proxy: synflow, shortcut_rank: 2}",
        "evaluate.baselines=[pruned]",
    )
    run_all(cfg, (prune, train, evaluate, search, extract, benchmark))
    train_dir, extract_dir = stage_dir(tmp_path, "train"), stage_dir(tmp_path, "extract")
    chosen = json.loads((train_dir / "heterolora.json").read_text())
    shortcut_layers = sorted(int(n.split(".")[1]) for n in chosen["enabled"] if n.startswith("shortcut"))
    assert len(shortcut_layers) == 1 and len(chosen["enabled"]) == 1 + round(0.25 * 10)  # separate: 25% of each kind
    extracted = read_manifest(extract_dir, "extract").metrics
    assert (
        extracted["shortcuts"]
        and extracted["max_abs_logit_diff"] <= 1e-4
        and extracted["merged_max_abs_logit_diff"] <= 1e-4
    )
    for folder in ("adapter", "merged"):  # not stock: the manifest says what loading them takes
        assert extracted["loads_with"][folder].endswith("+ its shortcuts (nlsflow.adapters.shortcuts.load_shortcuts)")
        assert json.loads((extract_dir / folder / CONFIG_FILE).read_text())["layers"] == shortcut_layers
    merged = load_causal_lm(str(extract_dir / "merged"), "float32", torch.device("cpu"))
    plain = _logits(merged)
    assert load_shortcuts(merged, extract_dir / "merged") is not None
    assert not torch.allclose(plain, _logits(merged))  # trained from B = 0: they matter now
    results = read_manifest(stage_dir(tmp_path, "benchmark"), "benchmark").metrics["results"]
    assert results["extracted_merged"]["params"] == results["dense"]["params"] + 2 * 2 * 64


def test_config_refuses_what_heterolora_cannot_do(tmp_path):
    with pytest.raises(NlsflowError, match="train.adapter has moved; write method.name"):
        method_config(tmp_path, "heterolora", "train.adapter=nola")
    with pytest.raises(NlsflowError, match="unknown key 'method.heterolora.selection.dynamic.select'"):
        method_config(tmp_path, "heterolora", "method.selection.select=rank_budget")
    with pytest.raises(NlsflowError, match="method.heterolora.selection.dynamic.proxy"):
        method_config(tmp_path, "heterolora", "method.selection.proxy=fisher")
