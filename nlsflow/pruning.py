"""Wanda (Sun et al. 2023) and magnitude pruning of decoder-layer linears, plus perplexity.

Wanda scores each weight by |W_ij| * ||X_j||, where ||X_j|| is the L2 norm of input channel j
over the calibration tokens, and zeros the lowest scores within each output row (or the lowest
N of every M consecutive inputs). Layers are pruned in order, each calibrated on the outputs
of the already-pruned layers before it. Works for any HF causal LM whose decoder exposes
`.layers` (Llama, Mistral, Qwen, ...), in any dtype, on the device the model is on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Structure = Literal["unstructured"] | tuple[int, int]


@dataclass(frozen=True)
class LayerSparsity:
    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    zeros: int
    sparsity: float


class _StopForward(Exception):
    """Raised by the capture hook once decoder layer 0 has seen its inputs."""


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(per-input-channel squared norm), in float32, shape of `weight`."""
    return weight.abs().float() * input_sq_norm.float().sqrt().reshape(1, -1)


def prune_mask(scores: torch.Tensor, sparsity: float, structure: Structure = "unstructured") -> torch.Tensor:
    """True where a weight is pruned: the lowest scores per output row, or per group of M inputs."""
    n_m = _check(sparsity, structure)
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_m is None:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, : math.floor(cols * sparsity + 1e-9)]  # 0.29*100 -> 29
        return mask.scatter_(1, idx, True)
    n, m = n_m
    if cols % m:
        raise ValueError(f"in_features={cols} is not a multiple of M={m} for {n}:{m} sparsity")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    return mask.reshape(rows, cols // m, m).scatter_(2, idx, True).reshape(rows, cols)


def sparsity_table(model: nn.Module, targets: Sequence[str] | None = None) -> list[LayerSparsity]:
    """Measured zeros of every target linear in the decoder layers."""
    return [_measure(name, lin) for layer in _target_linears(model, targets) for name, lin in layer]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib_input_ids: torch.Tensor | None,
    *,
    method: Literal["wanda", "magnitude"],
    sparsity: float,
    structure: Structure = "unstructured",
    targets: Sequence[str] | None = None,
    progress: bool = True,
) -> list[LayerSparsity]:
    """Prune the decoder-layer linears of `model` in place; returns the measured sparsity of each.

    `calib_input_ids` is a [n_samples, seqlen] long tensor (Wanda only; may be None for magnitude).
    """
    _check(sparsity, structure)
    if method not in ("wanda", "magnitude"):
        raise ValueError(f"method must be 'wanda' or 'magnitude', got {method!r}")
    if method == "wanda" or calib_input_ids is not None:
        _check_calib(calib_input_ids)
    linears = _target_linears(model, targets)
    if method == "magnitude":
        for subset in linears:
            for _, lin in subset:
                lin.weight.masked_fill_(prune_mask(lin.weight.abs(), sparsity, structure), 0)
    else:
        was_training = model.training
        model.eval()
        try:
            _prune_wanda(model, linears, calib_input_ids, sparsity, structure, progress)
        finally:
            model.train(was_training)
    table = [_measure(name, lin) for subset in linears for name, lin in subset]
    zeros, total = sum(t.zeros for t in table), sum(t.in_features * t.out_features for t in table)
    logger.info("%s pruned %d linears (%s): %.2f%% zeros", method, len(table), structure, 100 * zeros / max(total, 1))
    return table


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, seqlen: int, batch_size: int = 1) -> float:
    """exp(mean token NLL) over non-overlapping `seqlen` windows of `input_ids` [1, N] (Wanda's eval_ppl)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < seqlen or seqlen < 2:
        raise ValueError(
            f"input_ids must be [1, N] with N >= seqlen >= 2, got {tuple(input_ids.shape)} and seqlen={seqlen}"
        )
    n_windows = input_ids.shape[1] // seqlen
    windows = input_ids[0, : n_windows * seqlen].reshape(n_windows, seqlen)
    dev = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    nll = 0.0
    try:
        for i in range(0, n_windows, batch_size):
            batch = windows[i : i + batch_size].to(dev)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            labels = batch[:, 1:].reshape(-1)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum").item()
    finally:
        model.train(was_training)
    return math.exp(nll / (n_windows * (seqlen - 1)))


def _check(sparsity: float, structure: Structure) -> tuple[int, int] | None:
    """Validate arguments; returns (N, M) for N:M structure, None for unstructured."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if structure == "unstructured":
        return None
    if isinstance(structure, str) or len(structure) != 2:
        raise ValueError(f"structure must be 'unstructured' or (N, M), got {structure!r}")
    n, m = (int(v) for v in structure)
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"N:M structure needs 0 <= N <= M and M >= 1, got {n}:{m}")
    if abs(sparsity - n / m) > 1e-9:
        raise ValueError(f"{n}:{m} structure implies sparsity {n / m:g}, got sparsity={sparsity}")
    return n, m


def _check_calib(ids) -> None:
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel() > 0 and not ids.is_floating_point()):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"calib_input_ids must be a non-empty [n_samples, seqlen] integer tensor, got {got}")


def _target_linears(model: nn.Module, targets: Sequence[str] | None) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder layer, (full name, module) of each nn.Linear whose name ends with a target suffix."""
    if isinstance(targets, str):
        raise ValueError(f"targets must be a sequence of module-name suffixes, got the string {targets!r}")
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: decoder has no `.layers`; cannot find decoder layers")
    full = {mod: name for name, mod in model.named_modules()}
    out = [
        [
            (full[mod], mod)
            for mod in layer.modules()
            if isinstance(mod, nn.Linear) and (targets is None or _matches(full[mod], targets))
        ]
        for layer in layers
    ]
    missing = [t for t in targets or () if not any(_matches(n, [t]) for sub in out for n, _ in sub)]
    if missing:
        raise ValueError(f"targets {missing} match no nn.Linear in the decoder layers")
    return out


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _prune_wanda(
    model: nn.Module,
    linears: list[list[tuple[str, nn.Linear]]],
    calib_input_ids: torch.Tensor,
    sparsity: float,
    structure: Structure,
    progress: bool,
) -> None:
    """Prune layer by layer, each calibrated on the outputs of the already-pruned layers before it."""
    layers = model.get_decoder().layers
    inps, kwargs = _capture_layer0_inputs(model, layers[0], calib_input_ids)
    for layer, subset in zip(tqdm(layers, desc="wanda pruning", disable=not progress), linears):
        dev = next(layer.parameters()).device  # layers may sit on different devices (device_map)
        inps, kwargs = inps.to(dev), _to(kwargs, dev)
        sq_norms = _input_sq_norms(layer, subset, inps, kwargs)
        for name, lin in subset:
            lin.weight.masked_fill_(prune_mask(wanda_scores(lin.weight, sq_norms[name]), sparsity, structure), 0)
        # Re-run the pruned layer so the next layer is calibrated on pruned activations.
        outs = torch.empty_like(inps)
        for j in range(len(inps)):
            outs[j] = _hidden(layer(inps[j : j + 1], **kwargs))[0]
        inps = outs


def _capture_layer0_inputs(model: nn.Module, layer0: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0 for every sample, plus the layer's other kwargs.

    Memory: `inps` holds n_samples * seqlen * hidden values in the model dtype on the embedding
    device (128 x 2048 x 4096 bf16 = 2 GiB for a 7B model); the loop keeps a second buffer of
    the same size, and one sample's layer activations at a time.
    """
    captured: dict = {}

    def hook(_module, args, kwargs):
        kw = dict(kwargs)
        captured["h"] = args[0] if args else kw.pop("hidden_states")
        captured.setdefault("kwargs", kw)  # same for every sample: equal lengths, no padding
        raise _StopForward

    dev = model.get_input_embeddings().weight.device
    inps = None
    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for j in range(len(ids)):  # one sample at a time, as the layers are run below
            try:
                model(ids[j : j + 1].to(dev), use_cache=False)
            except _StopForward:
                pass
            if inps is None:
                inps = captured["h"].new_empty((len(ids), *captured["h"].shape[1:]))
            inps[j] = captured["h"][0]
    finally:
        handle.remove()
    return inps, captured["kwargs"]


def _input_sq_norms(
    layer: nn.Module, subset: Sequence[tuple[str, nn.Linear]], inps: torch.Tensor, kwargs: dict
) -> dict[str, torch.Tensor]:
    """Wanda's `scaler_row`: per input channel, sum over all tokens of x^2, divided by n_samples."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, args, _out):
            x = args[0].float()
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

        return fn

    handles = [lin.register_forward_hook(hook(name)) for name, lin in subset]
    try:
        for j in range(len(inps)):
            layer(inps[j : j + 1], **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: s / len(inps) for name, s in sums.items()}


def _hidden(out):
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is it."""
    return out[0] if isinstance(out, tuple) else out


def _to(obj, device):
    """Move tensors, possibly nested in tuples/lists/dicts, to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _measure(name: str, lin: nn.Linear) -> LayerSparsity:
    zeros = int((lin.weight == 0).sum())
    return LayerSparsity(name, lin.in_features, lin.out_features, zeros, zeros / lin.weight.numel())
