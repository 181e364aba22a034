"""Elastic-rank LoRA on stock PEFT: a super-adapter whose per-module rank can shrink at run time.

`make_elastic` swaps each LoRA `lora_A`/`lora_B` for an `ElasticLinear` that shares its Parameters,
so optimizers, `save_pretrained` and state dicts are unchanged. A search space (`resolve_space`) maps
named variables to modules and rank choices; `activate` sets a subnet; `extract_sub_adapter` writes
a plain PEFT adapter for it. As in LoNAS/Shears (NNCF elastic width), shrinking the rank only masks
channels: the scaling stays `lora_alpha / r_max`.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from nlsflow.io import atomic_dir


@dataclass(frozen=True)
class ElasticGroup:
    """One entry of the search-space config."""

    name: str  # e.g. "qkv"
    modules: tuple[str, ...]  # module-name suffixes, e.g. ("q_proj", "k_proj", "v_proj")
    choices: tuple[int, ...]  # strictly descending; choices[0] is the LoRA rank r
    per_layer: bool = True  # one choice per decoder layer, or one shared choice


@dataclass(frozen=True)
class Variable:
    """One searchable dimension: a group resolved against a model.

    A "rank" variable sets the LoRA rank of `modules`; a "width" variable (LoNAS, `adapters.width`) sets how many
    output channels `modules` keep (their base weight and lora_B rows) and so how many inputs `consumers` read.
    """

    name: str  # "layers.0.qkv" (per layer) or "qkv" (shared)
    modules: tuple[str, ...]  # full names as in peft_model.named_modules(): LoRA layers, or width-elastic producers
    choices: tuple[int, ...]
    kind: str = "rank"  # or "width"
    consumers: tuple[str, ...] = ()  # width: the modules whose input width follows (down_proj for gate/up)


Subnet = dict[str, int]  # variable name -> active rank


class ElasticLinear(nn.Linear):
    """nn.Linear whose forward uses only weight[:active_out, :active_in] (None = full)."""

    active_out: int | None = None
    active_in: int | None = None

    @classmethod
    def sharing(cls, linear: nn.Linear) -> ElasticLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # same Parameter objects
        return new.train(linear.training)

    def forward(self, x):
        w = self.weight[: self.active_out, : self.active_in]
        b = None if self.bias is None else self.bias[: self.active_out]
        return F.linear(x[..., : w.shape[1]], w, b)


def _lora_layers(model, adapter_name: str) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def make_elastic(peft_model, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Make every LoRA layer of `adapter_name` rank-elastic in place (idempotent)."""
    layers = _lora_layers(peft_model, adapter_name)
    for name, layer in layers.items():
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if adapter_name in getattr(layer, "lora_variant", {}) or not isinstance(a, nn.Linear):
            raise ValueError(f"{name}: only plain LoRA on nn.Linear can be elastic (no DoRA, conv, embedding)")
        if not isinstance(a, ElasticLinear):
            layer.lora_A[adapter_name] = ElasticLinear.sharing(a)
            layer.lora_B[adapter_name] = ElasticLinear.sharing(b)
    return layers


def _check_choices(group: ElasticGroup, rank: int, module: str) -> None:
    ch = group.choices
    if not ch or min(ch) <= 0 or any(x <= y for x, y in zip(ch, ch[1:])):
        raise ValueError(f"group {group.name!r}: choices {ch} must be positive and strictly descending")
    if rank not in ch:  # an r below choices[0] (HeteroLoRA's reallocated ranks) caps the module at min(choice, r)
        raise ValueError(f"group {group.name!r}: {module} has r={rank}, not one of the choices {ch}; start at {rank}")


def resolve_space(peft_model, groups: Sequence[ElasticGroup], adapter_name="default") -> list[Variable]:
    """Match every LoRA layer to one group by its last name component; variables in model order."""
    if len({g.name for g in groups}) != len(groups):
        raise ValueError(f"group names {[g.name for g in groups]} must be unique")
    found: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    used: set[str] = set()
    for name, layer in _lora_layers(peft_model, adapter_name).items():
        suffix = name.rsplit(".", 1)[-1]
        hits = [g for g in groups if suffix in g.modules]
        if not hits:
            raise ValueError(f"LoRA module {name} is in no group; add {suffix!r} to one or drop it from target_modules")
        if len(hits) > 1:
            raise ValueError(f"LoRA module {name} is in groups {[g.name for g in hits]}; list {suffix!r} in one")
        group = hits[0]
        _check_choices(group, layer.r[adapter_name], name)
        key = group.name
        if group.per_layer:
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if m is None:
                raise ValueError(f"group {group.name!r} is per_layer but {name} has no 'layers.<i>.'")
            key = f"layers.{m[1]}.{group.name}"
        found.setdefault(key, (group.choices, []))[1].append(name)
        used.add(group.name)
    for g in groups:
        if g.name not in used:
            raise ValueError(f"group {g.name!r} matches no LoRA module; fix {g.modules} or add to target_modules")
    return [Variable(k, tuple(mods), ch) for k, (ch, mods) in found.items()]


def heuristic_subnet(space: Sequence[Variable]) -> Subnet:
    """The middle choice, choices[(len-1)//2], as in Shears' supernet.py."""
    return {v.name: v.choices[(len(v.choices) - 1) // 2] for v in space}


def maximal_subnet(space: Sequence[Variable]) -> Subnet:
    return {v.name: v.choices[0] for v in space}


def minimal_subnet(space: Sequence[Variable]) -> Subnet:
    return {v.name: v.choices[-1] for v in space}


def random_subnet(space: Sequence[Variable], rng: random.Random) -> Subnet:
    return {v.name: rng.choice(v.choices) for v in space}


def validate_subnet(space: Sequence[Variable], subnet: Subnet) -> None:
    unknown = sorted(subnet.keys() - {v.name for v in space})
    if unknown:
        raise ValueError(f"subnet variables {unknown} are not in the search space")
    for v in space:
        if v.name not in subnet:
            raise ValueError(f"subnet is missing variable {v.name!r}")
        if subnet[v.name] not in v.choices:
            raise ValueError(f"subnet variable {v.name!r}={subnet[v.name]} is not one of {v.choices}")


def _elastic(layer: LoraLayer, name: str) -> tuple[ElasticLinear, ElasticLinear]:
    pairs = [(a, layer.lora_B[k]) for k, a in layer.lora_A.items() if isinstance(a, ElasticLinear)]
    if len(pairs) != 1:
        raise ValueError(f"{name} has {len(pairs)} elastic adapters; call make_elastic for exactly one adapter")
    return pairs[0]


def _pairs(peft_model, space: Sequence[Variable]):
    """Yield (variable, ElasticLinear A, ElasticLinear B) for every LoRA module of the rank variables."""
    modules = dict(peft_model.named_modules())
    for v in space:
        if v.kind == "rank":
            for name in v.modules:
                yield (v, *_elastic(modules[name], name))


def _width_linears(modules: dict[str, nn.Module], v: Variable):
    """Yield (ElasticLinear, "out" | "in") for every base weight and LoRA factor a width variable narrows."""
    for names, side, lora in ((v.modules, "out", "lora_B"), (v.consumers, "in", "lora_A")):
        for name in names:
            module = modules[name]
            linears = (
                [module.get_base_layer(), *getattr(module, lora).values()]
                if isinstance(module, LoraLayer)
                else [module]
            )
            for linear in linears:
                if not isinstance(linear, ElasticLinear):
                    raise ValueError(
                        f"{name} is not width-elastic; call nlsflow.adapters.width.make_width_elastic first"
                    )
                yield linear, side


def activate(peft_model, space: Sequence[Variable], subnet: Subnet) -> None:
    validate_subnet(space, subnet)
    for v, a, b in _pairs(peft_model, space):
        a.active_out = b.active_in = subnet[v.name]
    modules = dict(peft_model.named_modules())
    for v in space:
        if v.kind == "width":
            for linear, side in _width_linears(modules, v):
                setattr(linear, f"active_{side}", subnet[v.name])


def active_subnet(peft_model, space: Sequence[Variable]) -> Subnet:
    subnet = {v.name: a.active_out or a.out_features for v, a, _ in _pairs(peft_model, space)}
    modules = dict(peft_model.named_modules())
    for v in space:
        if v.kind == "width":
            linear, _ = next(_width_linears(modules, v))
            subnet[v.name] = linear.active_out or linear.out_features
    return {v.name: subnet[v.name] for v in space}


def subnet_shapes(peft_model, space: Sequence[Variable], subnet: Subnet) -> dict[str, tuple[int, int]]:
    """(in, out) of every nn.Linear of the model with `subnet` active, by module name; the model is not changed."""
    validate_subnet(space, subnet)
    rank, width_out, width_in = {}, {}, {}
    for v in space:
        for name in v.modules:
            (rank if v.kind == "rank" else width_out)[name] = subnet[v.name]
        for name in v.consumers:
            width_in[name] = subnet[v.name]
    shapes = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            n_in, n_out = width_in.get(name, base.in_features), width_out.get(name, base.out_features)
            shapes[f"{name}.base_layer"] = (n_in, n_out)
            for key, a in module.lora_A.items():
                r = min(rank.get(name, a.out_features), a.out_features)
                shapes[f"{name}.lora_A.{key}"], shapes[f"{name}.lora_B.{key}"] = (n_in, r), (r, n_out)
        elif isinstance(module, nn.Linear) and name not in shapes:
            shapes[name] = (width_in.get(name, module.in_features), width_out.get(name, module.out_features))
    return shapes


def adapter_parameters(peft_model, space: Sequence[Variable], subnet: Subnet) -> int:
    """Parameters of the sub-adapter: r*(in+out) per LoRA layer at the subnet's widths, plus lora_B biases if any."""
    biases = {
        f"{n}.lora_B.{k}"
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
        for k, b in m.lora_B.items()
        if b.bias is not None
    }
    return sum(
        i * o + (o if name in biases else 0)
        for name, (i, o) in subnet_shapes(peft_model, space, subnet).items()
        if ".lora_" in name
    )


def linear_macs_per_token(peft_model, space: Sequence[Variable], subnet: Subnet) -> int:
    """Exact MACs per token of every nn.Linear (decoder + lm_head, base widths and adapter ranks as the subnet sets)."""
    return sum(i * o for i, o in subnet_shapes(peft_model, space, subnet).values())


def pattern_key(module_name: str) -> str:
    r"""A PEFT rank_pattern/alpha_pattern key for exactly this module. PEFT matches keys with
    re.match(rf"(.*\.)?({key})$", name): "^" + the escaped name relative to the base model matches no other."""
    return "^" + re.escape(module_name.removeprefix("base_model.model."))


def extract_sub_adapter(
    peft_model,
    space: Sequence[Variable],
    subnet: Subnet,
    out_dir: Path,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> None:
    """Write a stock PEFT adapter folder holding `subnet`'s slices of the super-adapter.

    With width variables the adapter fits the narrowed base (`nlsflow.adapters.width.narrow_model`); name it in
    `base_model_name_or_path`.
    """
    validate_subnet(space, subnet)
    modules = dict(peft_model.named_modules())
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode, config.rank_pattern, config.alpha_pattern = True, {}, {}
    if base_model_name_or_path:
        config.base_model_name_or_path = base_model_name_or_path
    for v in (v for v in space if v.kind == "rank"):
        for name in v.modules:
            r = min(subnet[v.name], modules[name].r[adapter_name])
            key = pattern_key(name)
            config.rank_pattern[key] = r
            # PEFT's scaling alpha/r (alpha/sqrt(r) with rsLoRA) must equal the super-network's
            scaling = modules[name].scaling[adapter_name]
            config.alpha_pattern[key] = scaling * (math.sqrt(r) if config.use_rslora else r)
            state[f"{name}.lora_A.weight"] = state[f"{name}.lora_A.weight"][:r].contiguous()
            state[f"{name}.lora_B.weight"] = state[f"{name}.lora_B.weight"][:, :r].contiguous()
    for v in (
        v for v in space if v.kind == "width"
    ):  # LoRA factors on the narrowed channels (base: nlsflow.adapters.width)
        w = subnet[v.name]
        for name in v.modules:
            for key in (f"{name}.lora_B.weight", f"{name}.lora_B.bias"):
                if key in state:
                    state[key] = state[key][:w].contiguous()
        for name in v.consumers:
            if f"{name}.lora_A.weight" in state:
                state[f"{name}.lora_A.weight"] = state[f"{name}.lora_A.weight"][:, :w].contiguous()

    with atomic_dir(Path(out_dir)) as tmp:  # out_dir is never half-written: it is the old or the new folder
        config.save_pretrained(tmp)
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
