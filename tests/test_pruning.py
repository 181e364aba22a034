"""Unit tests for nlsflow.pruning on a tiny random 2-layer Llama (CPU, seconds)."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from nlsflow.pruning import perplexity, prune_mask, prune_model, sparsity_table, wanda_scores

VOCAB = 128


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def _reference_sq_norms(model: LlamaForCausalLM, i: int, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Wanda's WrappedGPT `scaler_row` (running mean over samples) for the linears of layer i."""
    stats = {name: [torch.zeros(lin.in_features), 0] for name, lin in _linears(model.model.layers[i]).items()}

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).t().float()  # [in_features, tokens]
            row, n = stats[name]
            row *= n / (n + 1)
            stats[name][1] = n + 1
            row += torch.norm(x, p=2, dim=1) ** 2 / (n + 1)

        return fn

    handles = [lin.register_forward_hook(hook(name)) for name, lin in _linears(model.model.layers[i]).items()]
    with torch.no_grad():
        for row in calib:  # one sample per forward, as Wanda does
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    return {name: row for name, (row, _) in stats.items()}


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_unstructured_matches_direct_recomputation(tiny_llama, calib, sparsity):
    dense = copy.deepcopy(tiny_llama)
    table = prune_model(tiny_llama, calib, method="wanda", sparsity=sparsity, progress=False)
    assert len(table) == 2 * 7 and table[0].name == "model.layers.0.self_attn.q_proj"
    assert table == sparsity_table(tiny_llama)

    for i in range(2):
        # Layer i was calibrated on inputs from pruned layers < i and its own dense weights.
        hybrid = copy.deepcopy(tiny_llama)
        hybrid.model.layers[i].load_state_dict(dense.model.layers[i].state_dict())
        norms = _reference_sq_norms(hybrid, i, calib)
        if i == 1:  # the dense model would give different norms: the test can tell the two apart
            dense_norms = _reference_sq_norms(dense, 1, calib)
            assert not torch.allclose(norms["self_attn.q_proj"], dense_norms["self_attn.q_proj"])
        for name, lin in _linears(tiny_llama.model.layers[i]).items():
            w_dense = _linears(dense.model.layers[i])[name].weight
            pruned = lin.weight == 0
            assert (pruned.sum(1) == int(sparsity * lin.in_features)).all(), name
            assert torch.equal(pruned, prune_mask(wanda_scores(w_dense, norms[name]), sparsity)), name
            assert torch.equal(lin.weight[~pruned], w_dense[~pruned])


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_structure(tiny_llama, calib, method, n, m):
    prune_model(tiny_llama, calib, method=method, sparsity=n / m, structure=(n, m), progress=False)
    for layer in tiny_llama.model.layers:
        for name, lin in _linears(layer).items():
            groups = (lin.weight == 0).reshape(lin.out_features, -1, m)
            assert (groups.sum(-1) == n).all(), name


def test_magnitude_prunes_lowest_abs_per_row(tiny_llama):
    dense = copy.deepcopy(tiny_llama)
    prune_model(tiny_llama, None, method="magnitude", sparsity=0.5, progress=False)
    for pruned_layer, dense_layer in zip(tiny_llama.model.layers, dense.model.layers):
        for name, lin in _linears(pruned_layer).items():
            w = _linears(dense_layer)[name].weight.abs()
            pruned = lin.weight == 0
            assert (pruned.sum(1) == lin.in_features // 2).all()
            highest_pruned = w.masked_fill(~pruned, -1).amax(1)
            lowest_kept = w.masked_fill(pruned, math.inf).amin(1)
            assert (highest_pruned <= lowest_kept).all(), name


def test_prune_mask_ties_are_stable():
    mask = prune_mask(torch.ones(2, 8), 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()
    mask = prune_mask(torch.ones(1, 8), 0.5, (2, 4))
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_embeddings_head_untouched_and_zero_sparsity_is_noop(tiny_llama, calib):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    prune_model(tiny_llama, calib, method="wanda", sparsity=0.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())

    prune_model(tiny_llama, calib, method="wanda", sparsity=0.5, progress=False)
    after = tiny_llama.state_dict()
    for key in ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        assert torch.equal(before[key], after[key]), key


def test_targets_and_bfloat16(tiny_llama, calib):
    model = tiny_llama.to(torch.bfloat16)
    table = prune_model(model, calib, method="wanda", sparsity=0.5, targets=["q_proj", "mlp.down_proj"], progress=False)
    assert [t.name.split(".", 3)[-1] for t in table] == ["self_attn.q_proj", "mlp.down_proj"] * 2
    assert all(t.zeros == t.out_features * (t.in_features // 2) for t in table)
    untouched = [t for t in sparsity_table(model) if t not in table]
    assert len(untouched) == 10 and all(t.zeros == 0 for t in untouched)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), "sparsity must be in"),
        (dict(sparsity=-0.1), "sparsity must be in"),
        (dict(sparsity=0.5, structure=(4, 2)), "N:M"),
        (dict(sparsity=0.25, structure=(2, 4)), "implies sparsity"),
        (dict(sparsity=0.5, calib=torch.zeros(4, 32, dtype=torch.long)[0]), "calib_input_ids"),
        (dict(sparsity=0.5, calib=torch.zeros(4, 32)), "calib_input_ids"),
        (dict(sparsity=0.5, calib=None), "calib_input_ids"),
        (dict(sparsity=0.5, targets=["no_such_proj"]), "match no nn.Linear"),
        (dict(sparsity=0.5, method="sparsegpt"), "method"),
    ],
)
def test_bad_inputs_raise(tiny_llama, calib, kwargs, message):
    calib = kwargs.pop("calib", calib)
    kwargs.setdefault("method", "wanda")
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_llama, calib, progress=False, **kwargs)


def test_perplexity_random_model_is_vocab_sized_and_pruning_changes_it(tiny_llama, calib):
    text = torch.randint(0, VOCAB, (1, 8 * 32 + 5), generator=torch.Generator().manual_seed(2))
    dense = perplexity(tiny_llama, text, seqlen=32)
    assert math.isfinite(dense) and VOCAB / 2 < dense < VOCAB * 2
    assert perplexity(tiny_llama, text, seqlen=32, batch_size=3) == pytest.approx(dense, rel=1e-5)
    prune_model(tiny_llama, calib, method="wanda", sparsity=0.5, progress=False)
    assert abs(perplexity(tiny_llama, text, seqlen=32) - dense) > 1e-4
    with pytest.raises(ValueError, match="input_ids"):
        perplexity(tiny_llama, text[0], seqlen=32)
