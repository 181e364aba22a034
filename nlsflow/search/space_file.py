"""Read a search space from a LoNAS/Shears NNCF config, or from its plain YAML form, into one validated object.

The seed repositories describe the elastic space in NNCF BootstrapNAS terms:
`bootstrapNAS.training.elasticity.width.overwrite_groups` is a list of groups of graph nodes whose output
width changes together, and `overwrite_groups_widths` holds one descending width list per group. A node is

    [{re}]PeftModelForCausalLM/.../ModuleList[layers]/LlamaDecoderLayer[<i> or {*}]/.../Linear[q_proj]/<tail>

with <tail> one of `ModuleDict[lora_A]/NNCFLinear[default]/linear_0` (the LoRA rank of q_proj),
`ModuleDict[lora_B]/NNCFLinear[default]/linear_0` (q_proj's output, seen through lora_B),
`NNCFUserSelfLinear[self_linear]/linear_0` (q_proj's own output) or, for a module without LoRA,
`.../NNCFLinear[key]/linear_0`. Shears' `utils.load_nncf_config` copies a `{re}` group once per decoder
layer, putting the layer index for `{*}`; older configs list every layer's group explicitly.

Here a group of `lora_A` nodes becomes an `ElasticGroup` (rank choices) and a group of module outputs a
`WidthGroup` (LoNAS' elastic MLP width). Explicit per-layer copies of one group fold back into a single
per-layer group; a layer-free group, or one naming the same modules in every layer, is one shared choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from nlsflow.adapters.elastic import ElasticGroup
from nlsflow.adapters.width import WidthGroup
from nlsflow.errors import NlsflowError, format_validation_error
from nlsflow.yaml12 import yaml_load
from schemas.methods import GroupConfig

SEARCH_KEYS = ("algorithm", "num_evals", "population", "ref_acc", "acc_delta")
_IGNORED_SEARCH_KEYS = ("batchnorm_adaptation",)  # LLMs have no batch norm; the seed configs set it to 0 samples
_WIDTH_KEYS = {"overwrite_groups", "overwrite_groups_widths"}

_LAYER = re.compile(r"ModuleList\[\w+\]/\w+\[(\d+|\{\*\})\]/")
_LORA = re.compile(r"/\w+\[(\w+)\]/ModuleDict\[(lora_[AB])\]/NNCFLinear\[\w+\]/linear_\d+$")
_SELF = re.compile(r"/\w+\[(\w+)\]/NNCFUserSelfLinear\[self_linear\]/linear_\d+$")
_PLAIN = re.compile(r"/NNCFLinear\[(\w+)\]/linear_\d+$")  # a module without LoRA; tried after _LORA
# Strings (kept), // and /* */ comments, and trailing commas: what NNCF's jstyleson reader accepts beyond JSON.
_JSON_EXTRAS = re.compile(r'("(?:[^"\\]|\\.)*")|//[^\n]*|/\*.*?\*/|,(?=(?:\s|//[^\n]*|/\*.*?\*/)*[\]}])', re.DOTALL)


@dataclass(frozen=True)
class NncfSearchSpace:
    groups: list[ElasticGroup]  # LoRA rank groups
    base_width_groups: list[WidthGroup] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)  # subset of SEARCH_KEYS; algorithm 'nsga2'

    def to_dict(self) -> dict[str, Any]:
        """The plain YAML form, which `load_search_space` reads back to an equal object."""

        def rows(groups):
            return [
                {"name": g.name, "modules": list(g.modules), "choices": list(g.choices), "per_layer": g.per_layer}
                for g in groups
            ]

        return {"groups": rows(self.groups), "width_groups": rows(self.base_width_groups), "search": dict(self.search)}


class _PlainSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[GroupConfig]
    width_groups: list[GroupConfig] = []
    search: dict[str, Any] = {}


@dataclass
class _Raw:
    """One overwrite_groups entry, parsed."""

    index: int
    name: str
    kind: str  # "rank" or "width"
    modules: tuple[str, ...]
    layers: frozenset  # of int, "*" or None
    widths: tuple[int, ...]

    @property
    def where(self) -> str:
        return f"group {self.name!r} (overwrite_groups[{self.index}])"


def group_name(modules: Sequence[str]) -> str:
    """'qkv' for q/k/v (or query/key/value), otherwise the suffixes without '_proj' joined: 'up', 'gate_up'."""
    stems = [m.removesuffix("_proj") for m in modules]
    return "qkv" if sorted(stems) in (["k", "q", "v"], ["key", "query", "value"]) else "_".join(stems)


def load_search_space(
    path: Path | str,
    *,
    rank: int | None = None,
    module_sizes: Mapping[str, int] | None = None,
    num_hidden_layers: int | None = None,
) -> NncfSearchSpace:
    """A seed NNCF JSON (has `bootstrapNAS`) or the plain form ({groups, width_groups, search}), JSON or YAML."""
    doc = _read(Path(path))
    if "bootstrapNAS" in doc:
        return parse_nncf_config(doc, rank=rank, module_sizes=module_sizes, num_hidden_layers=num_hidden_layers)
    if "groups" in doc:
        return parse_plain(doc, rank=rank, module_sizes=module_sizes)
    raise NlsflowError(f"{path}: neither an NNCF config (no 'bootstrapNAS') nor a plain search space (no 'groups')")


def parse_plain(
    doc: Mapping[str, Any], *, rank: int | None = None, module_sizes: Mapping[str, int] | None = None
) -> NncfSearchSpace:
    try:
        plain = _PlainSpace.model_validate(doc)
    except ValidationError as e:
        raise NlsflowError(f"search space: {format_validation_error(e)}") from None
    space = NncfSearchSpace(
        groups=[ElasticGroup(g.name, tuple(g.modules), tuple(g.choices), g.per_layer) for g in plain.groups],
        base_width_groups=[
            WidthGroup(g.name, tuple(g.modules), tuple(g.choices), g.per_layer) for g in plain.width_groups
        ],
        search=_check_search(plain.search, ignored=()),
    )
    for kind, groups in (("groups", space.groups), ("width_groups", space.base_width_groups)):
        for i, g in enumerate(groups):
            _check_widths(g.choices, f"group {g.name!r} ({kind}[{i}])")
        _check_disjoint([(f"group {g.name!r}", g.modules) for g in groups])
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise NlsflowError(f"{kind}: group names {names} must be unique")
    _check_maxima(space, rank, module_sizes)
    return space


def parse_nncf_config(
    doc_or_path: Mapping[str, Any] | Path | str,
    *,
    num_hidden_layers: int | None = None,
    rank: int | None = None,
    module_sizes: Mapping[str, int] | None = None,
) -> NncfSearchSpace:
    """The elastic groups and search settings of a LoNAS/Shears NNCF config (a dict or a file path)."""
    doc = doc_or_path if isinstance(doc_or_path, Mapping) else _read(Path(doc_or_path))
    training = _get(doc, "bootstrapNAS", "training")
    elasticity = _get(training, "elasticity")
    dims = elasticity.get("available_elasticity_dims", ["width"])
    if list(dims) != ["width"]:
        raise NlsflowError(
            f"elasticity.available_elasticity_dims is {dims}; only ['width'] (LoRA rank / module width) is supported"
        )
    width = _get(elasticity, "width")
    if set(width) - _WIDTH_KEYS:
        raise NlsflowError(
            f"elasticity.width keys {sorted(set(width) - _WIDTH_KEYS)} are not supported; "
            f"give the space as overwrite_groups + overwrite_groups_widths"
        )
    groups, widths = _get(width, "overwrite_groups"), _get(width, "overwrite_groups_widths")
    if not isinstance(groups, list) or not isinstance(widths, list):
        raise NlsflowError(
            "overwrite_groups and overwrite_groups_widths must be lists (of node-name lists, of width lists)"
        )
    raws = [_parse_group(i, nodes, widths[i] if i < len(widths) else None) for i, nodes in enumerate(groups)]
    if len(widths) > len(groups):
        raise NlsflowError(
            f"overwrite_groups_widths has {len(widths)} lists but overwrite_groups only {len(groups)} groups; "
            f"give one width list per group"
        )
    rank_groups = [ElasticGroup(*g) for g in _fold([r for r in raws if r.kind == "rank"], num_hidden_layers)]
    width_groups = [WidthGroup(*g) for g in _fold([r for r in raws if r.kind == "width"], num_hidden_layers, "_width")]
    space = NncfSearchSpace(rank_groups, width_groups, _check_search(doc["bootstrapNAS"].get("search", {})))
    _check_maxima(space, rank, module_sizes)
    return space


def add_fixed_groups(space: NncfSearchSpace, target_modules: Sequence[str], rank: int) -> NncfSearchSpace:
    """Give LoRA targets the config leaves out (LoNAS lists no down_proj) a fixed rank: every LoRA layer has a group."""
    covered = {m for g in space.groups for m in g.modules}
    fixed = [ElasticGroup(group_name([m]), (m,), (rank,), per_layer=False) for m in target_modules if m not in covered]
    return NncfSearchSpace([*space.groups, *fixed], space.base_width_groups, space.search)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise NlsflowError(f"search space file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                doc = json.loads(_JSON_EXTRAS.sub(lambda m: m.group(1) or "", text))
        else:
            doc = yaml_load(text)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise NlsflowError(f"{path} is not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        raise NlsflowError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise NlsflowError(f"{path} must hold a mapping, not {type(doc).__name__}")
    return doc


def _get(doc: Mapping, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, Mapping) or key not in doc:
            raise NlsflowError(
                f"NNCF config has no '{key}' (expected bootstrapNAS.training.elasticity.width."
                f"overwrite_groups and overwrite_groups_widths)"
            )
        doc = doc[key]
    return doc


def _parse_node(node: str, where: str) -> tuple[str, str, int | str | None]:
    """(module suffix, 'lora_A' | 'lora_B' | 'base', layer index | '*' | None) of one NNCF node name."""
    templated = node.startswith("{re}")
    body = node.removeprefix("{re}")
    if ("{*}" in body) != templated:
        raise NlsflowError(
            f"{where}: node {node!r} must use '{{re}}' and '{{*}}' together (Shears' per-layer template)"
        )
    layers = _LAYER.findall(body)
    if len(layers) > 1 or body.count("{*}") > len([x for x in layers if x == "{*}"]):
        raise NlsflowError(
            f"{where}: node {node!r} has "
            f"{'several layer indices' if len(layers) > 1 else '{*} outside the layer index'}"
        )
    layer = None if not layers else "*" if layers[0] == "{*}" else int(layers[0])
    if m := _LORA.search(body):
        return m[1], m[2], layer
    if m := _SELF.search(body) or _PLAIN.search(body):
        return m[1], "base", layer
    raise NlsflowError(
        f"{where}: unknown node pattern {node!r}; expected .../Linear[<module>]/ModuleDict[lora_A]/"
        f"NNCFLinear[default]/linear_0 (a LoRA rank) or .../Linear[<module>]/NNCFUserSelfLinear[self_linear]/linear_0"
    )


def _parse_group(index: int, nodes: Any, widths: Any) -> _Raw:
    where = f"overwrite_groups[{index}]"
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
        raise NlsflowError(f"{where} must be a non-empty list of node names")
    parsed = [_parse_node(n, where) for n in nodes]
    per_layer: dict[Any, dict[str, set[str]]] = {}
    for module, factor, layer in parsed:
        per_layer.setdefault(layer, {}).setdefault(factor, set()).add(module)
    factors = {f for _, f, _ in parsed}
    kind = "rank" if factors == {"lora_A"} else "width"
    order = "lora_A" if kind == "rank" else "base"
    modules = tuple(dict.fromkeys(m for m, f, _ in parsed if f == order))
    where = f"group {group_name(modules) if modules else '?'!r} ({where})"
    if "lora_A" in factors and kind == "width":
        raise NlsflowError(
            f"{where} mixes LoRA ranks (lora_A) with module outputs ({sorted(factors - {'lora_A'})}); split it"
        )
    if kind == "width" and "base" not in factors:
        raise NlsflowError(
            f"{where} has only lora_B nodes; lora_B's output is its module's width: list the module's "
            f"NNCFUserSelfLinear[self_linear] node with it"
        )
    for layer, by_factor in per_layer.items():  # the same modules in every layer; lora_B only beside its module
        if by_factor.get(order) != set(modules) or not by_factor.get("lora_B", set()) <= set(modules):
            found = {f: sorted(m) for f, m in sorted(by_factor.items())}
            raise NlsflowError(
                f"{where}: layer {layer} has {found}, expected {order} nodes of {list(modules)} in every layer"
            )
    if widths is None:
        raise NlsflowError(
            f"{where} has no width list: overwrite_groups_widths has fewer lists than overwrite_groups has groups"
        )
    layers = frozenset(per_layer)
    if ("*" in layers or None in layers) and len(layers) > 1:
        raise NlsflowError(
            f"{where} mixes '{{*}}' / layer-free nodes with fixed layer indices "
            f"{sorted(l for l in layers if isinstance(l, int))}"
        )
    _check_widths(widths, where)
    return _Raw(index, group_name(modules), kind, modules, layers, tuple(widths))


def _fold(raws: list[_Raw], num_hidden_layers: int | None, suffix: str = "") -> list[tuple]:
    """Merge explicit per-layer copies of a group into one (name, modules, choices, per_layer) row, in file order."""

    def key(r: _Raw) -> tuple:  # explicit single-layer copies of one group share a key
        return tuple(sorted(r.modules)) if _single_layer(r) else (r.index,)

    firsts: dict[tuple, _Raw] = {}
    for r in raws:
        firsts.setdefault(key(r), r)
    _check_disjoint([(r.where, r.modules) for r in firsts.values()])
    explicit = [l for r in raws for l in r.layers if isinstance(l, int)]
    n = num_hidden_layers if num_hidden_layers is not None else (max(explicit) + 1 if explicit else 0)
    every = set(range(n))
    layers_of: dict[tuple, list[int]] = {}
    for r in raws:
        first = firsts[key(r)]
        if _single_layer(r):
            (layer,) = r.layers
            if r.widths != first.widths:
                raise NlsflowError(
                    f"{r.where}: widths {list(r.widths)} differ from {list(first.widths)} in overwrite_groups"
                    f"[{first.index}]; one choice list must serve every layer"
                )
            if layer in layers_of.setdefault(key(r), []):
                raise NlsflowError(f"{r.where}: layer {layer} is listed twice")
            layers_of[key(r)].append(layer)
        else:  # a '{*}' template, a layer-free group, or one group over several layers (one shared choice)
            ints = {l for l in r.layers if isinstance(l, int)}
            if ints and ints != every:
                raise NlsflowError(
                    f"{r.where} spans layers {sorted(ints)} but not all {n}; a shared choice must cover every layer"
                )
    for k, layers in layers_of.items():
        if max(layers) >= n:
            raise NlsflowError(f"{firsts[k].where} lists layer {max(layers)} but the model has {n} layers")
        if set(layers) != every:
            raise NlsflowError(
                f"{firsts[k].where} is given for layers {sorted(layers)}, not for {sorted(every - set(layers))} "
                f"of {n}; an elastic group must cover every decoder layer"
            )
    names: set[str] = set()
    rows = []
    for r in firsts.values():
        name = r.name + suffix if r.name + suffix not in names else f"{r.name}{suffix}_{r.index}"
        names.add(name)
        rows.append((name, r.modules, r.widths, _single_layer(r) or "*" in r.layers))
    return rows


def _single_layer(r: _Raw) -> bool:
    return len(r.layers) == 1 and isinstance(next(iter(r.layers)), int)


def _check_widths(widths: Any, where: str) -> None:
    if (
        not isinstance(widths, (list, tuple))
        or not widths
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
        or any(a <= b for a, b in pairwise(widths))
    ):
        shown = list(widths) if isinstance(widths, (list, tuple)) else widths
        raise NlsflowError(f"{where}: choices {shown} must be positive integers, strictly descending")


def _check_disjoint(groups: list[tuple[str, Sequence[str]]]) -> None:
    owner: dict[str, str] = {}
    for where, modules in groups:
        for m in modules:
            if m in owner and owner[m] != where:
                raise NlsflowError(f"module {m!r} is in {owner[m]} and in {where}; list it in one group")
            owner[m] = where


def _check_maxima(space: NncfSearchSpace, rank: int | None, module_sizes: Mapping[str, int] | None) -> None:
    """The largest choice must be what was trained: the LoRA rank, or the module's full output size."""
    if rank is not None:
        for g in space.groups:
            if g.choices[0] != rank:
                raise NlsflowError(
                    f"group {g.name!r}: choices {list(g.choices)} start at {g.choices[0]}, "
                    f"but the trained rank is {rank}; the first choice must be the trained rank"
                )
    if module_sizes is not None:
        for g in space.base_width_groups:
            for m in g.modules:
                if m not in module_sizes:
                    raise NlsflowError(f"width group {g.name!r}: module_sizes has no entry for {m!r}")
                if g.choices[0] != module_sizes[m]:
                    raise NlsflowError(
                        f"width group {g.name!r}: choices {list(g.choices)} start at {g.choices[0]}, "
                        f"but {m} has {module_sizes[m]} outputs; the first choice must be the full size"
                    )


def _check_search(block: Any, ignored: Sequence[str] = _IGNORED_SEARCH_KEYS) -> dict[str, Any]:
    """algorithm NSGA2 only (returned as 'nsga2'); num_evals/population positive ints; ref_acc/acc_delta in [0, 1]."""
    if not isinstance(block, Mapping):
        raise NlsflowError(f"search must be a mapping, not {type(block).__name__}")
    unknown = sorted(set(block) - set(SEARCH_KEYS) - set(ignored))
    if unknown:
        raise NlsflowError(f"search keys {unknown} are not supported; use {list(SEARCH_KEYS)}")
    out: dict[str, Any] = {}
    for key in SEARCH_KEYS:
        if key not in block:
            continue
        value = block[key]
        if key == "algorithm":
            if not isinstance(value, str) or value.lower() != "nsga2":
                raise NlsflowError(f"search.algorithm is {value!r}; only NSGA2 is supported")
            value = "nsga2"
        elif key in ("num_evals", "population"):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise NlsflowError(f"search.{key} is {value!r}; it must be a positive integer")
        elif key == "ref_acc" and value == -1:  # SQFT's search script writes -1 for "no reference"
            value = None
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise NlsflowError(f"search.{key} is {value!r}; it must be a number in [0, 1]")
        out[key] = value if value is None or key in ("algorithm", "num_evals", "population") else float(value)
    return out
