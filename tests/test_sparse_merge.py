"""Sparsity-preserving LoRA on a tiny 50%-pruned 2-layer Llama: masked training, masked merge, sparsity checks."""

import copy
import random

import pytest
import torch
from conftest import micro_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import LlamaForCausalLM

from nlsflow.adapters.elastic import (
    ElasticGroup,
    activate,
    adapter_parameters,
    extract_sub_adapter,
    make_elastic,
    random_subnet,
    resolve_space,
)
from nlsflow.adapters.masking import (
    MaskedLoraA,
    MaskedLoraB,
    check_sparsity,
    make_sparsity_preserving,
    masked_merge,
    require_sparsity,
    zero_counts,
)
from nlsflow.errors import NlsflowError
from nlsflow.pruning import prune_model

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
GROUPS = [
    ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (8, 6, 4)),
    ElasticGroup("up", ("up_proj",), (8, 6, 4)),
    ElasticGroup("down", ("down_proj",), (8, 6, 4)),
]
LORA_LAYERS = [
    f"model.layers.{i}.{m}"
    for i in (0, 1)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
]
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])


def _pruned_base() -> LlamaForCausalLM:
    model = micro_llama().eval()
    prune_model(model, None, method="magnitude", sparsity=0.5, progress=False)
    return model


def _super(preserving: bool = True) -> PeftModel:
    model = get_peft_model(_pruned_base(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero; make the adapter visible
            torch.nn.init.normal_(p, std=0.1)
    make_elastic(model)
    if preserving:
        assert make_sparsity_preserving(model) == 10
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _lora(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def _effective_weight(layer) -> torch.Tensor:
    """W + s * delta, read off PEFT's own forward: layer(I) = I @ W_eff.T."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features)).T


def test_swap_keeps_parameters_keys_and_is_idempotent():
    model = _super(preserving=False)
    params, keys, before = dict(model.named_parameters()), set(get_peft_model_state_dict(model)), _logits(model)
    assert make_sparsity_preserving(model) == 10 and make_sparsity_preserving(model) == 10
    layer = _lora(model)[LORA_LAYERS[0]]
    assert isinstance(layer.lora_A["default"], MaskedLoraA) and isinstance(layer.lora_B["default"], MaskedLoraB)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert set(get_peft_model_state_dict(model)) == keys and not any("mask" in k for k in model.state_dict())
    assert not torch.allclose(_logits(model), before, atol=1e-4)  # the mask is visible
    twin = copy.deepcopy(model)
    twin_layer = _lora(twin)[LORA_LAYERS[0]]
    assert twin_layer.lora_B["default"]._a[0] is twin_layer.lora_A["default"]
    assert torch.equal(_logits(twin), _logits(model))


def test_training_changes_adapter_but_keeps_base_zero_pattern():
    model = _super()
    base_zero = {n: layer.get_base_layer().weight == 0 for n, layer in _lora(model).items()}
    lora_before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(not torch.equal(v, lora_before[k]) for k, v in get_peft_model_state_dict(model).items())
    for name, layer in _lora(model).items():
        assert base_zero[name].float().mean() == 0.5
        assert torch.equal(_effective_weight(layer) == 0, base_zero[name]), name


def test_masked_merge_equals_unmerged_and_keeps_exact_zeros():
    model = _super()
    expected, reference = _logits(model), zero_counts(_pruned_base())
    base_zero = {n: layer.get_base_layer().weight == 0 for n, layer in _lora(model).items()}
    merged = masked_merge(model)
    assert isinstance(merged, LlamaForCausalLM)
    assert (_logits(merged) - expected).abs().max() < 1e-5
    modules = dict(merged.named_modules())
    for name in LORA_LAYERS:
        assert torch.equal(modules[name].weight == 0, base_zero[name]), name
    assert zero_counts(merged) == reference and check_sparsity(merged, _pruned_base()) == []
    require_sparsity(merged, reference)


def test_plain_merge_loses_sparsity_and_check_names_layers():
    merged = _super(preserving=False).merge_and_unload()
    reference = zero_counts(_pruned_base())
    assert check_sparsity(merged, reference) == LORA_LAYERS  # o_proj and gate_proj carry no LoRA: untouched
    assert check_sparsity(merged, _pruned_base()) == LORA_LAYERS
    with pytest.raises(NlsflowError, match=r"in 10 layer\(s\), first model\.layers\.0\.self_attn\.q_proj: 2048 zeros"):
        require_sparsity(merged, reference)


def test_elastic_rank_unmerged_equals_masked_merge_of_sliced_adapter(tmp_path):
    model, plain = _super(), _super(preserving=False)
    space = resolve_space(model, GROUPS)
    subnet = random_subnet(space, random.Random(3))
    assert set(subnet.values()) != {8}
    activate(model, space, subnet)
    assert adapter_parameters(model, space, subnet) == adapter_parameters(plain, space, subnet)
    expected = _logits(model)
    extract_sub_adapter(model, space, subnet, tmp_path / "adapter")
    stock = PeftModel.from_pretrained(_pruned_base(), str(tmp_path / "adapter")).eval()
    assert make_sparsity_preserving(stock) == 10  # the stock adapter + mask reproduces the super-network
    assert (_logits(stock) - expected).abs().max() < 1e-5
    for merged in (masked_merge(stock), masked_merge(model)):  # the sliced adapter, and the super-net at its subnet
        assert (_logits(merged) - expected).abs().max() < 1e-5
        assert check_sparsity(merged, _pruned_base()) == []


def test_gradient_only_in_active_slices():
    model = _super()
    space = resolve_space(model, GROUPS)
    activate(model, space, {v.name: 4 for v in space})
    model(TOKENS).logits.square().mean().backward()
    for name, layer in _lora(model).items():
        a, b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert a[4:].abs().max() == 0 and b[:, 4:].abs().max() == 0, name
        assert a[:4].abs().max() > 0 and b[:, :4].abs().max() > 0, name
        assert layer.get_base_layer().weight.grad is None
