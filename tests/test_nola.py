"""NOLA on a tiny random Llama: seeded basis never saved, coefficient-only training, quantized levels, round
trips through the saved coefficients and through a materialized stock PEFT LoRA adapter."""

import pytest
import torch
from conftest import micro_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from nlsflow.adapters.elastic import ElasticGroup, activate, make_elastic, resolve_space
from nlsflow.adapters.nola import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    NolaSpec,
    basis_floats,
    coefficient_state,
    load_nola,
    make_nola,
    materialize,
    save_nola,
)
from nlsflow.errors import NlsflowError

TARGETS = ["q_proj", "v_proj", "up_proj"]
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])
SPEC = NolaSpec(num_basis_a=16, num_basis_b=12, seed=7)


def _lora(rank: int = 8) -> PeftModel:
    base = micro_llama().eval()
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))


def _train(model, steps: int = 5) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _bases(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith(".basis")}


def test_basis_comes_from_the_seed_and_only_coefficients_train():
    a, b, other = _lora(), _lora(), _lora()
    count = make_nola(a, SPEC)
    make_nola(b, SPEC)
    make_nola(other, NolaSpec(16, 12, seed=8))
    assert _bases(a).keys() == _bases(b).keys() and len(_bases(a)) == 2 * 2 * len(TARGETS)
    assert all(torch.equal(_bases(a)[k], _bases(b)[k]) for k in _bases(a))
    assert not any(torch.equal(_bases(a)[k], _bases(other)[k]) for k in _bases(a))
    trainable = [(n, p.numel()) for n, p in a.named_parameters() if p.requires_grad]
    assert all(n.endswith(".coefficients") for n, _ in trainable)
    assert sum(n for _, n in trainable) == count == 2 * len(TARGETS) * (16 + 12)
    with a.disable_adapter():
        base_logits = _logits(a)
    assert torch.equal(_logits(a), base_logits)  # B's coefficients start at 0: the delta starts at 0
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    _train(a)
    changed = {n for n, p in a.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".coefficients") for n in changed)


def test_basis_size_is_known_before_it_is_made():
    model = _lora()
    per_layer = 16 * (8 * 64) * 3 + 12 * 8 * (
        64 + 32 + 128
    )  # A: r × hidden for q, v, up; B: out × r (v has 2 kv heads)
    assert basis_floats(model, SPEC) == 2 * per_layer
    make_nola(model, SPEC)
    assert sum(b.numel() for b in _bases(model).values()) == 2 * per_layer


def test_saved_adapter_is_coefficients_seed_and_shapes(tmp_path):
    model = _lora()
    count = make_nola(model, SPEC)
    _train(model)
    size = save_nola(model, SPEC, tmp_path / "nola")
    assert sorted(p.name for p in (tmp_path / "nola").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    with safe_open(str(tmp_path / "nola" / WEIGHTS_FILE), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == count  # no basis, no LoRA weights
    assert size < 4 * count + 8192
    assert not any("basis" in k for k in model.state_dict())

    fresh = _lora()
    load_nola(fresh, tmp_path / "nola")
    assert torch.equal(_logits(fresh), _logits(model))
    with pytest.raises(NlsflowError, match="does not fit this model"):
        load_nola(_lora(rank=4), tmp_path / "nola")


@pytest.mark.parametrize("bits", [3, 4])
def test_quantized_coefficients_take_only_the_allowed_levels(tmp_path, bits):
    spec = NolaSpec(16, 12, seed=7, bits=bits)
    model = _lora()
    make_nola(model, spec)
    before = coefficient_state(model)
    _train(model)
    after = coefficient_state(model)
    # rounding has no gradient: only the straight-through estimator lets every factor train, B from all zeros
    assert all(not torch.equal(after[k], before[k]) for k in after)
    assert all(len(c.unique()) > 1 for k, c in after.items() if k.endswith("lora_B"))
    for key, c in coefficient_state(model).items():
        lo, hi = c.min(), c.max()
        if hi == lo:
            continue
        steps = (c - lo) / ((hi - lo) / (2**bits - 1))
        assert torch.allclose(steps, steps.round(), atol=1e-4), key
        assert len(c.unique()) <= 2**bits
    save_nola(model, spec, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".codes")} == {torch.uint8}
    fresh = _lora()
    load_nola(fresh, tmp_path / "q")
    assert torch.allclose(_logits(fresh), _logits(model), atol=1e-5)


def test_materialized_lora_is_a_stock_adapter_with_the_same_logits(tmp_path):
    model = _lora()
    make_nola(model, SPEC)
    _train(model)
    expected = _logits(model)
    materialize(model)
    assert torch.equal(_logits(model), expected)
    model.save_pretrained(tmp_path / "lora")
    base = _lora().unload()  # the same seeded base, without LoRA layers
    stock = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    assert torch.allclose(_logits(stock), expected, atol=1e-6)


def test_elastic_ranks_work_on_nola_factors():
    model = _lora()
    make_elastic(model)
    make_nola(model, SPEC)
    _train(model)
    space = resolve_space(
        model, [ElasticGroup("qv", ("q_proj", "v_proj"), (8, 4)), ElasticGroup("up", ("up_proj",), (8, 4))]
    )
    full = _logits(model)
    activate(model, space, {v.name: 4 for v in space})
    assert not torch.allclose(_logits(model), full)
    activate(model, space, {v.name: 8 for v in space})
    assert torch.equal(_logits(model), full)
