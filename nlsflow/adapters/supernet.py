"""Load a trained super-adapter as an elastic super-network, and save/load its search space."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from peft import get_peft_model

from nlsflow.adapters.elastic import (
    ElasticGroup,
    Variable,
    heuristic_subnet,
    make_elastic,
    maximal_subnet,
    minimal_subnet,
    resolve_space,
)
from nlsflow.adapters.loading import load_peft_adapter
from nlsflow.adapters.masking import make_sparsity_preserving
from nlsflow.adapters.nola import is_nola, load_nola, materialize, nola_lora_config
from nlsflow.adapters.shortcuts import load_shortcuts
from nlsflow.adapters.width import WidthGroup, make_width_elastic
from nlsflow.artifacts import read_json, write_json
from nlsflow.models import load_causal_lm, load_tokenizer
from schemas.files import GroupEntry, SearchSpaceFile, VariableEntry

NAMED_SUBNETS = {"heuristic": heuristic_subnet, "maximal": maximal_subnet, "minimal": minimal_subnet}


def groups_from_config(groups, cls=ElasticGroup) -> list:
    """`train.groups` as ElasticGroups (or `method.width_groups` as WidthGroups, with cls=WidthGroup)."""
    return [cls(name=g.name, modules=tuple(g.modules), choices=tuple(g.choices), per_layer=g.per_layer) for g in groups]


def make_supernet(peft_model, groups: list[ElasticGroup], width_groups: list[WidthGroup]) -> list[Variable]:
    """Make a PEFT model's LoRA ranks (and base widths) elastic in place; the space lists rank variables first."""
    make_elastic(peft_model)
    return resolve_space(peft_model, groups) + make_width_elastic(peft_model, width_groups)


def save_search_space(
    path: Path, groups: list[ElasticGroup], width_groups: list[WidthGroup], space: list[Variable]
) -> None:
    """Write `train/search_space.json` (schemas.files.SearchSpaceFile): groups, variables and the named subnets."""
    doc = SearchSpaceFile(
        groups=[GroupEntry(**asdict(g)) for g in groups],
        width_groups=[GroupEntry(**asdict(g)) for g in width_groups],
        variables=[
            VariableEntry(name=v.name, kind=v.kind, modules=v.modules, consumers=v.consumers, choices=v.choices)
            for v in space
        ],
        subnets={name: fn(space) for name, fn in NAMED_SUBNETS.items()},
    )
    write_json(path, doc)


def load_search_space_groups(path: Path) -> tuple[list[ElasticGroup], list[WidthGroup]]:
    """The rank groups and width groups of a `search_space.json`; one line naming the train stage if it does not fit."""
    doc = read_json(path, SearchSpaceFile, "train")

    def read(rows: list[GroupEntry], cls):
        return [
            cls(name=g.name, modules=tuple(g.modules), choices=tuple(g.choices), per_layer=g.per_layer) for g in rows
        ]

    return read(doc.groups, ElasticGroup), read(doc.width_groups, WidthGroup)


def load_supernet(
    base_dir: Path,
    adapter_dir: Path,
    search_space_file: Path,
    dtype: str,
    device: torch.device,
    sparsity_preserving: bool = False,
):
    """The pruned base with the super-adapter attached and made elastic: (peft_model, tokenizer, space)."""
    tokenizer = load_tokenizer(str(base_dir))
    base = load_causal_lm(str(base_dir), dtype, device)
    if is_nola(adapter_dir):  # rebuilt from the seed, then materialized: from here on it is a plain LoRA super-adapter
        model = get_peft_model(base, nola_lora_config(adapter_dir)).to(device).eval()
        space = make_supernet(model, *load_search_space_groups(search_space_file))
        load_nola(model, adapter_dir)
        materialize(model)
    else:
        model = load_peft_adapter(base, adapter_dir, base_dir).to(device).eval()
        space = make_supernet(model, *load_search_space_groups(search_space_file))
    if sparsity_preserving:  # the adapter's delta only where the base weight is non-zero, as it was trained
        make_sparsity_preserving(model)
    load_shortcuts(model, adapter_dir)  # HeteroLoRA's shortcut modules, when the adapter has any
    return model, tokenizer, space
