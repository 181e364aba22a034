"""METHOD=lora, the plain-LoRA baseline: a dense base, the profile's target modules at its maximal rank, one subnet.

End to end on the tiny profile (prune → train → evaluate → search → extract, in-process, sharing one run): the
trainable parameters are PEFT LoRA's at train.rank on the target modules, the search space holds one subnet and the
search scores it once, and extract/adapter/ is the trained adapter (stock PEFT, the same logits, rank train.rank
everywhere). The config loads for every shipped profile and task.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, needs_data, tiny_overrides
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from nlsflow.artifacts import read_manifest, read_table, stage_dir
from nlsflow.config import load_config
from nlsflow.layers import config_files
from nlsflow.methods import method_for
from nlsflow.methods.lora import Lora
from nlsflow.models import load_causal_lm, load_tokenizer

PROFILES = sorted(p.stem for p in (REPO / "configs" / "profiles").glob("*.yaml") if "." not in p.stem)
TASKS = sorted(p.stem for p in (REPO / "configs" / "tasks").glob("*.yaml"))
CPU = torch.device("cpu")


def lora_config(run_dir, *overrides: str, task: str = "math", profile: str = "tiny"):
    """What `make pipeline TASK=<task> PROFILE=<profile> METHOD=lora` loads, with overrides."""
    return load_config(config_files(task, profile, "lora"), tiny_overrides(run_dir, *overrides))


def test_the_shipped_profiles_and_tasks_are_what_this_file_covers():
    assert {"tiny", "smollm2", "llama7b"} <= set(PROFILES) and {"math", "commonsense"} <= set(TASKS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("profile", PROFILES)
def test_lora_config_loads_for_every_profile_and_task(tmp_path, profile, task):
    cfg = lora_config(tmp_path, task=task, profile=profile)
    assert cfg.method.name == "lora" and cfg.profile == profile and cfg.task == task
    assert cfg.prune.sparsity == 0  # the dense base
    method = method_for(cfg)
    assert type(method) is Lora
    groups = method.rank_groups()  # the profile's groups, each at its first choice: one subnet
    assert [g.modules for g in groups] == [tuple(g.modules) for g in cfg.train.groups]
    assert all(g.choices == (cfg.train.rank,) for g in groups)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The tiny math pipeline with METHOD=lora, all stages but benchmark, run in-process once (do not modify)."""
    from conftest import DATA_ROOT

    if not DATA_ROOT.is_dir():
        pytest.skip(f"no shared data at {DATA_ROOT}")
    from stages import evaluate, extract, prune, search, train
    from stages._common import run_stage

    run_dir = tmp_path_factory.mktemp("lora-tiny")
    cfg = lora_config(run_dir, "train.max_steps=20", "search.num_evals=4", "evaluate.max_samples=2")
    for module in (prune, train, evaluate, search, extract):
        assert run_stage(module.__name__.rsplit(".", 1)[-1], module.run, cfg) is not None
    return cfg


def _dir(cfg, stage):
    return stage_dir(cfg.run_dir, stage)


def _targets(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """The linears PEFT attaches LoRA to: those whose last name component is a target (PEFT's suffix rule)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }


@needs_data
@pytest.mark.slow
def test_lora_trains_peft_lora_parameters_at_the_profile_rank(lora_run):
    tc = lora_run.train
    base = load_causal_lm(str(_dir(lora_run, "prune") / "model"), "float32", CPU)
    targets = _targets(base, tc.target_modules)
    assert len(targets) == len(tc.target_modules) * base.config.num_hidden_layers  # every target in every layer
    expected = sum(tc.rank * (m.in_features + m.out_features) for m in targets.values())  # A: r×in, B: out×r
    peft = get_peft_model(base, LoraConfig(r=tc.rank, lora_alpha=tc.alpha, target_modules=tc.target_modules))
    assert peft.get_nb_trainable_parameters()[0] == expected  # stock PEFT agrees with the shapes
    assert read_manifest(_dir(lora_run, "train"), "train").metrics["trainable_params"] == expected

    assert read_manifest(_dir(lora_run, "prune"), "prune").metrics["sparsity"] == 0  # the dense base


@needs_data
@pytest.mark.slow
def test_lora_search_space_holds_one_subnet_scored_once(lora_run):
    space = json.loads((_dir(lora_run, "train") / "search_space.json").read_text())
    assert space["variables"] and all(v["choices"] == [lora_run.train.rank] for v in space["variables"])
    assert math.prod(len(v["choices"]) for v in space["variables"]) == 1
    only = {v["name"]: lora_run.train.rank for v in space["variables"]}
    assert all(subnet == only for subnet in space["subnets"].values())  # heuristic = maximal = minimal

    search = _dir(lora_run, "search")
    rows = read_table(search / "evaluations.parquet", "evaluations").to_pylist()
    assert len(rows) == 1 and json.loads(rows[0]["config"]) == only and rows[0]["pareto"]
    assert json.loads((search / "chosen.json").read_text()) == only
    assert read_manifest(_dir(lora_run, "evaluate"), "evaluate").metrics["subnet"] == only


@needs_data
@pytest.mark.slow
def test_lora_extract_is_the_trained_adapter(lora_run):
    """extract/adapter/ and train/adapter/, each loaded with stock PEFT on prune/model: the same logits."""
    base_dir, extracted = _dir(lora_run, "prune") / "model", _dir(lora_run, "extract") / "adapter"
    config = json.loads((extracted / "adapter_config.json").read_text())
    assert config["r"] == lora_run.train.rank
    assert all(r == lora_run.train.rank for r in config.get("rank_pattern", {}).values())  # no module below it
    assert sorted(p.name for p in _dir(lora_run, "extract").iterdir() if p.is_dir()) == ["adapter", "merged"]

    def stock(adapter_dir) -> PeftModel:
        return PeftModel.from_pretrained(load_causal_lm(str(base_dir), "float32", CPU), str(adapter_dir)).eval()

    trained, extract = stock(_dir(lora_run, "train") / "adapter"), stock(extracted)
    ranks = {name: m.r["default"] for name, m in extract.named_modules() if hasattr(m, "lora_A")}
    assert set(ranks.values()) == {lora_run.train.rank}
    targets = _targets(load_causal_lm(str(base_dir), "float32", CPU), lora_run.train.target_modules)
    assert ranks.keys() == {f"base_model.model.{name}" for name in targets}  # every target module, no other

    tokenizer = load_tokenizer(str(base_dir))
    batch = tokenizer(
        ["What is 2 plus 3?", "Tom has 7 apples and eats 2. How many are left?"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        want, got = trained(**batch).logits, extract(**batch).logits
        plain = extract.get_base_model()
        with extract.disable_adapter():
            base_only = plain(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)
    assert not torch.allclose(base_only[real], want[real], atol=1e-3, rtol=0)  # the adapter trained: it matters

    metrics = read_manifest(_dir(lora_run, "extract"), "extract").metrics
    assert metrics["deployable"] == "adapter" and metrics["max_abs_logit_diff"] <= lora_run.extract.tolerance
