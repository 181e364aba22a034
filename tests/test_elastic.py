"""Elastic-rank LoRA on a tiny random 2-layer Llama: space, activation, counts, extraction round trip."""

import copy
import json
import random
import re

import pytest
import torch
from conftest import micro_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from transformers import LlamaForCausalLM

from nlsflow.adapters.elastic import (
    ElasticGroup,
    ElasticLinear,
    Variable,
    activate,
    active_subnet,
    adapter_parameters,
    extract_sub_adapter,
    heuristic_subnet,
    linear_macs_per_token,
    make_elastic,
    maximal_subnet,
    minimal_subnet,
    random_subnet,
    resolve_space,
    validate_subnet,
)

GROUPS = [
    ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (8, 6, 4)),
    ElasticGroup("up", ("up_proj",), (8, 6, 4)),
    ElasticGroup("down", ("down_proj",), (8, 6, 4)),
]
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])


def _base() -> LlamaForCausalLM:
    return micro_llama().eval()


def _super() -> PeftModel:
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(_base(), lora).eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero; make the adapter visible
            torch.nn.init.normal_(p, std=0.1)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture
def elastic():
    model = _super()
    make_elastic(model)
    return model, resolve_space(model, GROUPS)


def test_resolve_space_names_and_modules(elastic):
    _, space = elastic
    assert [v.name for v in space] == [f"layers.{i}.{g}" for i in (0, 1) for g in ("qkv", "up", "down")]
    qkv0 = space[0]
    prefix = "base_model.model.model.layers.0."
    assert qkv0.modules == tuple(prefix + f"self_attn.{p}_proj" for p in "qkv")
    assert space[5].modules == ("base_model.model.model.layers.1.mlp.down_proj",)
    assert all(v.choices == (8, 6, 4) for v in space)


def test_shared_group_is_one_variable():
    model = _super()
    shared = [ElasticGroup(g.name, g.modules, g.choices, per_layer=False) for g in GROUPS]
    space = resolve_space(model, shared)
    assert [v.name for v in space] == ["qkv", "up", "down"]
    assert len(space[0].modules) == 6


@pytest.mark.parametrize(
    "groups, match",
    [
        (GROUPS + [ElasticGroup("gate", ("gate_proj",), (8, 4))], "'gate' matches no LoRA module"),
        (GROUPS + [ElasticGroup("mlp", ("up_proj",), (8, 4))], r"\['up', 'mlp'\]"),
        (GROUPS[:2], "down_proj.*target_modules"),
        ([ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (8, 4, 6))] + GROUPS[1:], "'qkv'.*descending"),
        ([ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (8, 4, 0))] + GROUPS[1:], "'qkv'.*positive"),
        ([ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (16, 12))] + GROUPS[1:], "'qkv'.*r=8, not one of"),
    ],
)
def test_resolve_space_errors(groups, match):
    with pytest.raises(ValueError, match=match):
        resolve_space(_super(), groups)


def test_elastic_linear_slices_weight():
    lin = torch.nn.Linear(5, 4)
    el = ElasticLinear.sharing(lin)
    assert el.weight is lin.weight and el.bias is lin.bias
    x = torch.randn(3, 5)
    assert torch.equal(el(x), lin(x))
    el.active_out, el.active_in = 2, 3
    ref = torch.nn.functional.linear(x[:, :3], lin.weight[:2, :3], lin.bias[:2])
    assert torch.equal(el(x), ref)


def test_make_elastic_keeps_parameters_and_outputs():
    model = _super()
    before = _logits(model)
    params = dict(model.named_parameters())
    keys = set(get_peft_model_state_dict(model))
    layers = make_elastic(model)
    make_elastic(model)  # idempotent
    assert len(layers) == 10
    assert all(p is params[n] for n, p in model.named_parameters())
    assert set(get_peft_model_state_dict(model)) == keys
    assert torch.equal(_logits(model), before)
    space = resolve_space(model, GROUPS)
    activate(model, space, maximal_subnet(space))
    assert torch.equal(_logits(model), before)


def test_activate_matches_zeroed_rows(elastic):
    model, space = elastic
    subnet = {v.name: c for v, c in zip(space, (6, 4, 8, 4, 6, 4))}
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for v in space:
            for name in v.modules:
                modules[name].lora_A["default"].weight[subnet[v.name] :] = 0
    activate(model, space, subnet)
    assert active_subnet(model, space) == subnet
    assert torch.allclose(_logits(model), _logits(reference), atol=1e-5)
    assert not torch.allclose(_logits(model), _logits(_super()), atol=1e-3)  # the rank change is visible


def test_activate_needs_make_elastic():
    model = _super()
    space = resolve_space(model, GROUPS)
    with pytest.raises(ValueError, match="make_elastic"):
        activate(model, space, maximal_subnet(space))


def test_subnet_helpers():
    def var(choices):
        return [Variable("v", ("m",), choices)]

    assert heuristic_subnet(var((8, 6, 4))) == {"v": 6}
    assert heuristic_subnet(var((32, 24, 16))) == {"v": 24}
    assert heuristic_subnet(var((32, 24, 16, 8))) == {"v": 24}
    assert maximal_subnet(var((8, 6, 4))) == {"v": 8} and minimal_subnet(var((8, 6, 4))) == {"v": 4}
    assert random_subnet(var((8, 6, 4)), random.Random(0))["v"] in (8, 6, 4)
    for bad, match in [({"v": 5}, "'v'=5"), ({}, "missing.*'v'"), ({"v": 8, "w": 4}, r"\['w'\]")]:
        with pytest.raises(ValueError, match=match):
            validate_subnet(var((8, 6, 4)), bad)


def test_inactive_ranks_get_zero_grad(elastic):
    model, space = elastic
    activate(model, space, {v.name: 4 for v in space})
    model(TOKENS).logits.square().mean().backward()
    layer = dict(model.named_modules())[space[0].modules[0]]
    a, b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert a[4:].abs().max() == 0 and b[:, 4:].abs().max() == 0
    assert a[:4].abs().max() > 0 and b[:, :4].abs().max() > 0


def test_counts_match_hand_numbers(elastic):
    model, space = elastic
    # per layer: q 64->64, k,v 64->32, up 64->128, down 128->64; sum of (in+out) over LoRA layers = 704
    base = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 128  # decoder linears + lm_head
    assert base == 81920
    assert adapter_parameters(model, space, maximal_subnet(space)) == 2 * 8 * 704 == 11264
    assert adapter_parameters(model, space, heuristic_subnet(space)) == 2 * 6 * 704 == 8448
    mixed = {v.name: c for v, c in zip(space, (8, 4, 6, 4, 4, 4))}
    mixed_params = 8 * 320 + 4 * 192 + 6 * 192 + 4 * 704
    assert adapter_parameters(model, space, mixed) == mixed_params == 7296
    assert linear_macs_per_token(model, space, mixed) == base + mixed_params
    assert linear_macs_per_token(model, space, minimal_subnet(space)) == base + 2 * 4 * 704


@pytest.mark.parametrize("which", ["heuristic", "minimal", "random"])
def test_extract_round_trip_with_stock_peft(elastic, tmp_path, which):
    model, space = elastic
    subnet = {
        "heuristic": heuristic_subnet(space),
        "minimal": minimal_subnet(space),
        "random": random_subnet(space, random.Random(3)),
    }[which]
    activate(model, space, subnet)
    out = tmp_path / "sub"
    extract_sub_adapter(model, space, maximal_subnet(space), out)  # then overwrite: replaced whole
    extract_sub_adapter(model, space, subnet, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    modules = dict(model.named_modules())
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        for v in space:
            for name in v.modules:
                r, layer = subnet[v.name], modules[name]
                assert f.get_slice(f"{name}.lora_A.weight").get_shape() == [r, layer.in_features]
                assert f.get_slice(f"{name}.lora_B.weight").get_shape() == [layer.out_features, r]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"].keys() == config["alpha_pattern"].keys()
    names = [n for n, _ in _base().named_modules()]
    for key in config["rank_pattern"]:  # PEFT 0.21's get_pattern_key rule: each key hits one module
        assert sum(bool(re.match(rf"(.*\.)?({key})$", n)) for n in names) == 1

    loaded = PeftModel.from_pretrained(_base(), out).eval()
    layers = dict(loaded.named_modules())
    for v in space:
        for name in v.modules:
            assert layers[name].r["default"] == subnet[v.name]
            assert layers[name].scaling["default"] == 2.0  # lora_alpha / r_max of the super-adapter
    assert (_logits(loaded) - _logits(model)).abs().max() <= 1e-4
