"""Sparsity-preserving LoRA on stock PEFT: the adapter's delta is masked by the base's zeros (SQFT's SparsePEFT).

Merging a LoRA adapter into a Wanda-sparse base with `merge_and_unload` fills the pruned weights (50% -> ~17%
zeros). Here the LoRA output is `x @ ((B[:, :r] @ A[:r]) * M).T` with `M = (W != 0)`, so the effective weight
`W + s * (B @ A) * M` has exactly the base's zeros, and `masked_merge` adds that same masked delta into W: the
merged model gives the unmerged model's logits and keeps the base's sparsity.

`make_sparsity_preserving` swaps each LoRA layer's `lora_A`/`lora_B` for `MaskedLoraA`/`MaskedLoraB` (subclasses
of `ElasticLinear` sharing the same Parameters), so state dicts, `save_pretrained`, optimizers and the elastic
functions (`activate`, `active_subnet`, `adapter_parameters`, `extract_sub_adapter`) work unchanged. Cost: each
masked layer builds a dense out x in delta per forward (kept for backward when training) and a bool mask buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nlsflow.adapters.elastic import ElasticLinear, _lora_layers
from nlsflow.errors import NlsflowError
from nlsflow.pruning import sparsity_table


class MaskedLoraA(ElasticLinear):
    """lora_A in sparsity-preserving mode: keeps A (same Parameter and state-dict key) and passes x through."""

    def forward(self, x):
        return x


class MaskedLoraB(ElasticLinear):
    """lora_B in sparsity-preserving mode: x -> x @ ((B[:, :r] @ A[:r]) * mask).T, r = active_in (None = full)."""

    mask: torch.Tensor | None  # (W != 0), or None when the base has no zeros (then the usual factored product)

    @classmethod
    def masking(cls, b: nn.Linear, a: MaskedLoraA, mask: torch.Tensor | None) -> MaskedLoraB:
        new = cls.sharing(b)
        new._a = (a,)  # a plain reference, not a submodule: A's weight stays under lora_A only
        new.register_buffer("mask", mask, persistent=False)
        return new

    def forward(self, x):
        a, b = self._a[0].weight[: self.active_in], self.weight[:, : self.active_in]
        if self.mask is None:
            return F.linear(F.linear(x, a), b)
        return F.linear(x, (b @ a) * self.mask)


def masked_macs_correction(model: nn.Module) -> int:
    """MACs per token that a factored r x (in + out) count misses: a masked layer multiplies by a dense in x out delta
    (building that delta costs r x in x out per forward, not per token, and is left out)."""
    extra = 0
    for module in model.modules():
        if isinstance(module, MaskedLoraB) and module.mask is not None:
            rank = module.active_in or module.in_features
            extra += module.mask.numel() - rank * (module.mask.shape[0] + module.mask.shape[1])
    return extra


def _check_plain(layer, name: str, adapter_name: str) -> None:
    b = layer.lora_B[adapter_name]
    if adapter_name in layer.lora_variant or not isinstance(b, nn.Linear) or b.bias is not None or layer.fan_in_fan_out:
        raise ValueError(
            f"{name}: sparsity-preserving LoRA needs plain LoRA on nn.Linear (no DoRA, lora_bias, "
            "conv, embedding or fan_in_fan_out)"
        )


def make_sparsity_preserving(peft_model, adapter_name: str = "default") -> int:
    """Mask every LoRA layer of `adapter_name` by its base's zeros, in place (idempotent); returns #layers with zeros.

    Active ranks set by `nlsflow.adapters.elastic.activate` are kept; the scaling is unchanged.
    """
    n = 0
    for name, layer in _lora_layers(peft_model, adapter_name).items():
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if not isinstance(b, MaskedLoraB):
            _check_plain(layer, name, adapter_name)
            mask = layer.get_base_layer().weight != 0
            new_a = MaskedLoraA.sharing(a)
            new_b = MaskedLoraB.masking(b, new_a, None if mask.all() else mask)
            new_a.active_out = new_b.active_in = getattr(a, "active_out", None)
            layer.lora_A[adapter_name], layer.lora_B[adapter_name] = new_a, new_b
            b = new_b
        n += b.mask is not None
    return n


@torch.no_grad()
def masked_merge(peft_model, adapter_name: str = "default") -> nn.Module:
    """Add `scaling * (B[:, :r] @ A[:r]) * (W != 0)` to each base W (r: the active rank, else all) and unload.

    Works on a sparsity-preserving super-network (at its active subnet) and on a stock PEFT adapter alike.
    Returns the base model with the adapter merged and every LoRA module removed (as `merge_and_unload`).
    """
    for name, layer in _lora_layers(peft_model, adapter_name).items():
        _check_plain(layer, name, adapter_name)
        if layer.merged:
            raise ValueError(f"{name} is already merged; masked_merge needs an unmerged adapter")
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        r = getattr(b, "active_in", None)
        w = layer.get_base_layer().weight
        delta = (b.weight[:, :r].float() @ a.weight[:r].float()) * layer.scaling[adapter_name]
        w.copy_(torch.where(w != 0, w.float() + delta.to(w.device), 0.0).to(w.dtype))
    return peft_model.unload()


def zero_counts(model: nn.Module) -> dict[str, int]:
    """Zeros of every decoder-layer nn.Linear of a plain (not PEFT-wrapped) model, by full module name."""
    return {t.name: t.zeros for t in sparsity_table(model)}


def _dropped(merged: nn.Module, reference: nn.Module | Mapping[str, int]) -> list[tuple[str, int, int]]:
    ref = dict(reference) if isinstance(reference, Mapping) else zero_counts(reference)
    got = zero_counts(merged)
    return [(name, zeros, got.get(name, -1)) for name, zeros in ref.items() if got.get(name, -1) < zeros]


def check_sparsity(merged: nn.Module, reference: nn.Module | Mapping[str, int]) -> list[str]:
    """Names of the layers of `reference` (a model, or name -> zero count) with fewer zeros (or absent) in `merged`."""
    return [name for name, _, _ in _dropped(merged, reference)]


def require_sparsity(merged: nn.Module, reference: nn.Module | Mapping[str, int]) -> None:
    """Raise a one-line NlsflowError naming the first layer whose zero count dropped."""
    bad = _dropped(merged, reference)
    if bad:
        name, before, after = bad[0]
        now = f"{after} zeros" if after >= 0 else "layer missing"
        raise NlsflowError(
            f"merging lost sparsity in {len(bad)} layer(s), first {name}: {before} zeros -> {now}; "
            "train and merge in sparsity-preserving mode (make_sparsity_preserving, masked_merge)"
        )
