"""LoNAS elastic base width on stock PEFT: MLP channels that shrink at run time, then are cut out for good.

A `WidthGroup` names MLP projections whose output channels shrink together (gate_proj and up_proj of a Llama
MLP); the module that reads those channels (down_proj) shrinks its input with them, and so do the LoRA factors
on both sides (lora_B rows of gate/up, lora_A columns of down). Width w keeps the first w channels, as NNCF's
elastic width does without filter reordering (the LoNAS configs reorder nothing).

`make_width_elastic` swaps the base nn.Linear of every producer and consumer for an `ElasticLinear` sharing
its Parameters, and returns one "width" `Variable` per group (and decoder layer); `nlsflow.adapters.elastic.activate`
sets them with the rank variables. `narrow_model` removes the inactive channels from a plain model for good,
and `save_narrowed` writes it as a stock HF folder (one width for every layer) or as `per_layer_llama` (not).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from nlsflow import per_layer_llama
from nlsflow.adapters.elastic import ElasticGroup, ElasticLinear, Subnet, Variable
from nlsflow.errors import NlsflowError

# Output module -> the module that reads its channels: the Llama-family MLP (Llama, Mistral, Qwen2, SmolLM), whose
# width is `config.intermediate_size`.
CONSUMERS = {"gate_proj": "down_proj", "up_proj": "down_proj"}
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class WidthGroup(ElasticGroup):
    """Base-model modules whose output width shrinks together (LoNAS' elastic MLP), e.g. gate_proj + up_proj;
    choices[0] is the modules' full output size."""


def _base(module: nn.Module) -> nn.Linear:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def resolve_width_space(model: nn.Module, groups: Sequence[WidthGroup]) -> list[Variable]:
    """One "width" Variable per group and decoder layer (or one per shared group), with its consumers."""
    modules = dict(model.named_modules())
    found: dict[str, tuple[WidthGroup, list[str], list[str]]] = {}
    for group in groups:
        for suffix in group.modules:
            if suffix not in CONSUMERS:
                raise NlsflowError(
                    f"width group {group.name!r}: {suffix!r} has no known consumer; elastic width "
                    f"supports MLP projections {sorted(CONSUMERS)}"
                )
        for name, module in modules.items():
            parent, _, suffix = name.rpartition(".")
            if suffix not in group.modules or not isinstance(_base(module), nn.Linear):
                continue
            layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if layer is None:
                raise NlsflowError(f"width group {group.name!r}: {name} is outside the decoder layers")
            size = _base(module).out_features
            if size != group.choices[0]:
                raise NlsflowError(
                    f"width group {group.name!r}: choices {list(group.choices)} start at {group.choices[0]}, "
                    f"but {name} has {size} outputs; the first choice must be the full size"
                )
            consumer = f"{parent}.{CONSUMERS[suffix]}"
            siblings = [s for s, c in CONSUMERS.items() if c == CONSUMERS[suffix] and f"{parent}.{s}" in modules]
            if missing := [s for s in siblings if s not in group.modules]:
                raise NlsflowError(
                    f"width group {group.name!r}: {missing} also feed {consumer}; list them in the group"
                )
            if consumer not in modules:
                raise NlsflowError(f"width group {group.name!r}: {name} has no {CONSUMERS[suffix]} beside it")
            key = f"layers.{layer[1]}.{group.name}" if group.per_layer else group.name
            _, producers, consumers = found.setdefault(key, (group, [], []))
            producers.append(name)
            consumers.extend([consumer] if consumer not in consumers else [])
        if not any(g is group for g, _, _ in found.values()):
            raise NlsflowError(
                f"width group {group.name!r} matches no module of the model; fix its modules {list(group.modules)}"
            )
    return [Variable(k, tuple(p), g.choices, kind="width", consumers=tuple(c)) for k, (g, p, c) in found.items()]


def make_width_elastic(model: nn.Module, groups: Sequence[WidthGroup]) -> list[Variable]:
    """Make the base linears of every width group (and their consumers) width-elastic in place; return the variables."""
    space = resolve_width_space(model, groups)
    modules = dict(model.named_modules())
    for name in {n for v in space for n in (*v.modules, *v.consumers)}:
        module = modules[name]
        if isinstance(module, LoraLayer):
            if not isinstance(module.base_layer, ElasticLinear):
                module.base_layer = ElasticLinear.sharing(module.base_layer)
        elif not isinstance(module, ElasticLinear):
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else model, attr, ElasticLinear.sharing(module))
    return space


def _narrowed(linear: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    new = nn.Linear(n_in, n_out, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:n_out, :n_in])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[:n_out])
    return new


@torch.no_grad()
def narrow_model(model: nn.Module, space: Sequence[Variable], subnet: Subnet) -> list[int]:
    """Cut the inactive channels out of a plain (not PEFT-wrapped) model; return the MLP width of every layer."""
    modules = dict(model.named_modules())
    for v in (v for v in space if v.kind == "width"):
        w = subnet[v.name]
        for name, side in [*((n, "out") for n in v.modules), *((n, "in") for n in v.consumers)]:
            name = name.removeprefix(PEFT_PREFIX)
            linear = modules[name]
            n_in, n_out = (linear.in_features, w) if side == "out" else (w, linear.out_features)
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent], attr, _narrowed(linear, n_in, n_out))
    sizes = {}  # layer index -> input width of its MLP's consumer
    for name, module in model.named_modules():
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if layer and name.rpartition(".")[2] in CONSUMERS.values() and isinstance(module, nn.Linear):
            sizes[int(layer[1])] = module.in_features
    sizes = [sizes[i] for i in sorted(sizes)]
    if len(set(sizes)) == 1:
        model.config.intermediate_size = sizes[0]
    return sizes


def save_narrowed(model: nn.Module, sizes: list[int], out_dir: Path, **save_kwargs) -> None:
    """Save a narrowed model: a stock HF folder when every layer has one width, else `per_layer_llama` with auto_map."""
    out_dir = Path(out_dir)
    if len(set(sizes)) <= 1:
        model.save_pretrained(out_dir, **save_kwargs)
        return
    if model.config.model_type not in ("llama", per_layer_llama.PerLayerLlamaConfig.model_type):
        raise NlsflowError(
            f"per-layer MLP widths {sorted(set(sizes))} need a Llama model, not {model.config.model_type!r}; "
            f"make the width group shared (per_layer: false) for one width in every layer"
        )
    config = per_layer_llama.PerLayerLlamaConfig(
        **{**model.config.to_dict(), "layer_intermediate_sizes": sizes, "intermediate_size": max(sizes)}
    )
    config.architectures = ["PerLayerLlamaForCausalLM"]
    config.auto_map = {
        "AutoConfig": "per_layer_llama.PerLayerLlamaConfig",
        "AutoModelForCausalLM": "per_layer_llama.PerLayerLlamaForCausalLM",
    }
    model.config = config
    model.save_pretrained(out_dir, **save_kwargs)
    shutil.copyfile(per_layer_llama.__file__, out_dir / "per_layer_llama.py")


def _mlps(model: nn.Module) -> list[tuple[nn.Linear, list[nn.Linear]]]:
    """(consumer, its producers) of every decoder-layer MLP, e.g. (down_proj, [gate_proj, up_proj])."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        parent, _, suffix = name.rpartition(".")
        if suffix in CONSUMERS.values() and isinstance(module, nn.Linear) and re.search(r"(?:^|\.)layers\.\d+\.", name):
            producers = [
                modules[f"{parent}.{s}"] for s, c in CONSUMERS.items() if c == suffix and f"{parent}.{s}" in modules
            ]
            if producers:
                found.append((module, producers))
    return found


@torch.no_grad()
def reorder_mlp_channels(model: nn.Module, calib_input_ids: torch.Tensor) -> int:
    """Sort every MLP's channels by importance, most important first, so that a width-w subnet keeps the best w.

    Importance of channel j = mean |h_j| over the calibration tokens × ‖W_consumer[:, j]‖₂, with h the consumer's
    input (act(gate x) ⊙ up x in a Llama), as Wanda scores weights. The permutation (producer rows, consumer
    columns) leaves the model's function unchanged; it is stored in the weights. Returns the number of MLPs.
    """
    mlps = _mlps(model)
    sums = [torch.zeros(c.in_features, dtype=torch.float64, device=c.weight.device) for c, _ in mlps]

    def accumulate(i):
        def hook(module, args):  # returns None: the input passes unchanged
            sums[i].add_(args[0].flatten(0, -2).double().abs().sum(0))

        return hook

    hooks = [c.register_forward_pre_hook(accumulate(i)) for i, (c, _) in enumerate(mlps)]
    try:
        for row in calib_input_ids:
            model(row[None].to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    for (consumer, producers), total in zip(mlps, sums):
        order = torch.argsort(total * consumer.weight.float().norm(dim=0).double(), descending=True, stable=True)
        consumer.weight.copy_(consumer.weight[:, order])
        for producer in producers:
            producer.weight.copy_(producer.weight[order])
            if producer.bias is not None:
                producer.bias.copy_(producer.bias[order])
    return len(mlps)
