"""LoNAS elastic MLP width: activation, exact cost, and extraction that really removes channels."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import micro_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from nlsflow.adapters.elastic import (
    ElasticGroup,
    activate,
    active_subnet,
    adapter_parameters,
    extract_sub_adapter,
    linear_macs_per_token,
)
from nlsflow.adapters.supernet import make_supernet
from nlsflow.adapters.width import (
    WidthGroup,
    make_width_elastic,
    narrow_model,
    reorder_mlp_channels,
    save_narrowed,
)
from nlsflow.errors import NlsflowError
from nlsflow.models import is_per_layer, load_causal_lm

WIDTHS = (64, 48, 32)
GROUPS = [
    ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (8, 4)),
    ElasticGroup("mlp", ("gate_proj", "up_proj", "down_proj"), (8, 6, 4)),
]
WIDTH_GROUPS = [WidthGroup("gate_up_width", ("gate_proj", "up_proj"), WIDTHS)]


def tiny_llama(layers=3) -> LlamaForCausalLM:
    return micro_llama(32, layers).eval()


@pytest.fixture
def supernet(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: B is zero at init
            nn.init.normal_(p, std=0.2)
    space = make_supernet(model.eval(), GROUPS, WIDTH_GROUPS)
    return model, space


def subnet_of(space, widths):
    rng = random.Random(0)
    subnet = {v.name: rng.choice(v.choices) for v in space if v.kind == "rank"}
    subnet.update({f"layers.{i}.gate_up_width": w for i, w in enumerate(widths)})
    return subnet


INPUT = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def out(model):
    return model(INPUT).logits


def test_width_variables_follow_the_rank_variables(supernet):
    model, space = supernet
    widths = [v for v in space if v.kind == "width"]
    assert [v.name for v in widths] == [f"layers.{i}.gate_up_width" for i in range(3)]
    assert widths[0].modules == (
        "base_model.model.model.layers.0.mlp.gate_proj",
        "base_model.model.model.layers.0.mlp.up_proj",
    )
    assert widths[0].consumers == ("base_model.model.model.layers.0.mlp.down_proj",) and widths[0].choices == WIDTHS
    assert space.index(widths[0]) == sum(v.kind == "rank" for v in space)


def test_activation_equals_zeroed_channels(supernet):
    """Width w computes what the full model computes with channels w.. of gate/up (base and LoRA) zeroed."""
    model, space = supernet
    subnet = subnet_of(space, [48, 32, 64])
    activate(model, space, subnet)
    assert active_subnet(model, space) == subnet
    narrow = out(model)
    activate(model, space, {**subnet, **{v.name: v.choices[0] for v in space if v.kind == "width"}})
    with torch.no_grad():
        for i, w in enumerate([48, 32, 64]):
            mlp = model.base_model.model.model.layers[i].mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.base_layer.weight[w:] = 0
                proj.lora_B["default"].weight[w:] = 0
    assert torch.allclose(out(model), narrow, atol=1e-5)


@pytest.mark.parametrize("widths", [[48, 32, 64], [32, 32, 32]], ids=["per-layer", "uniform"])
def test_extraction_removes_channels_and_keeps_the_logits(supernet, tmp_path, widths):
    model, space = supernet
    subnet = subnet_of(space, widths)
    activate(model, space, subnet)
    expected = out(model)
    extract_sub_adapter(model, space, subnet, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "narrow"))
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    full_params = sum(p.numel() for p in plain.parameters())
    assert narrow_model(plain, space, subnet) == widths
    save_narrowed(plain, widths, tmp_path / "narrow")
    assert is_per_layer(tmp_path / "narrow") == (len(set(widths)) > 1)
    # stock transformers (remote code for per-layer widths, shipped in the folder), stock PEFT
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", trust_remote_code=True).eval()
    assert sum(p.numel() for p in stock.parameters()) == full_params - 3 * sum(64 - w for w in widths) * 32
    base_macs = sum(m.in_features * m.out_features for m in stock.modules() if isinstance(m, nn.Linear))
    extracted = PeftModel.from_pretrained(stock, str(tmp_path / "adapter")).eval()
    assert (out(extracted) - expected).abs().max() <= 1e-5
    assert sum(p.numel() for n, p in extracted.named_parameters() if "lora_" in n) == adapter_parameters(
        model, space, subnet
    )
    # exact MACs: the supernet's subnet cost = the narrowed model's linears + the sub-adapter's factors
    assert linear_macs_per_token(model, space, subnet) == base_macs + adapter_parameters(model, space, subnet)
    merged = extracted.merge_and_unload()
    assert (out(merged) - expected).abs().max() <= 1e-4
    ours = load_causal_lm(str(tmp_path / "narrow"), "float32", torch.device("cpu"))  # nlsflow's loader, no remote code
    assert (out(PeftModel.from_pretrained(ours, str(tmp_path / "adapter"))) - expected).abs().max() <= 1e-5
    if len(set(widths)) == 1:
        assert stock.config.intermediate_size == 32 and stock.config.model_type == "llama"
        assert not (tmp_path / "narrow" / "per_layer_llama.py").exists()
    weights = load_file(tmp_path / "narrow" / "model.safetensors")
    assert [weights[f"model.layers.{i}.mlp.down_proj.weight"].shape[1] for i in range(3)] == widths


def test_width_group_errors():
    with pytest.raises(NlsflowError, match=r"choices \[60, 32\] start at 60, but .*gate_proj has 64 outputs"):
        make_width_elastic(tiny_llama(1), [WidthGroup("w", ("gate_proj", "up_proj"), (60, 32))])
    with pytest.raises(NlsflowError, match=r"\['gate_proj'\] also feed .*down_proj; list them in the group"):
        make_width_elastic(tiny_llama(1), [WidthGroup("w", ("up_proj",), (64, 32))])
    with pytest.raises(NlsflowError, match=r"'q_proj' has no known consumer"):
        make_width_elastic(tiny_llama(1), [WidthGroup("w", ("q_proj",), (32, 16))])
    with pytest.raises(NlsflowError, match=r"matches no module"):
        make_width_elastic(nn.Sequential(nn.Linear(4, 4)), [WidthGroup("w", ("gate_proj", "up_proj"), (64, 32))])


def test_shared_width_group_is_one_variable(tmp_path):
    model = tiny_llama(2)
    space = make_width_elastic(model, [WidthGroup("w", ("gate_proj", "up_proj"), WIDTHS, per_layer=False)])
    assert [(v.name, len(v.modules), len(v.consumers)) for v in space] == [("w", 4, 2)]
    activate(model, space, {"w": 32})
    assert model.model.layers[1].mlp.down_proj.active_in == 32


def test_reordering_keeps_the_function_and_puts_important_channels_first():
    model = tiny_llama(2)
    with torch.no_grad():  # make channel 40 of layer 0 dominant: it must move to the front
        model.model.layers[0].mlp.down_proj.weight[:, 40] *= 50
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    before = out(model)
    gate = model.model.layers[0].mlp.gate_proj.weight[40].clone()
    assert reorder_mlp_channels(model, calib) == 2
    assert torch.allclose(out(model), before, atol=1e-5)
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight[0], gate)


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    from nlsflow.config import load_yaml

    path = tmp_path / "dup.yaml"
    path.write_text("prune:\n  sparsity: 0\nprune:\n  method: wanda\n")
    with pytest.raises(NlsflowError, match="duplicate key 'prune'"):
        load_yaml(path)
