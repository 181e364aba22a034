"""Load a trained super-adapter as an elastic super-network, and save/load its search space."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from nlsflow.elastic import ElasticGroup, Variable, heuristic_subnet, make_elastic, maximal_subnet, minimal_subnet, resolve_space
from nlsflow.models import load_causal_lm, load_tokenizer
from nlsflow.sparse_merge import make_sparsity_preserving
from schemas.io import atomic_write_text

NAMED_SUBNETS = {"heuristic": heuristic_subnet, "maximal": maximal_subnet, "minimal": minimal_subnet}


def groups_from_config(groups) -> list[ElasticGroup]:
    return [ElasticGroup(name=g.name, modules=tuple(g.modules), choices=tuple(g.choices), per_layer=g.per_layer) for g in groups]


def save_search_space(path: Path, groups: list[ElasticGroup], space: list[Variable]) -> None:
    doc = {"groups": [{"name": g.name, "modules": list(g.modules), "choices": list(g.choices), "per_layer": g.per_layer}
                      for g in groups],
           "variables": [{"name": v.name, "modules": list(v.modules), "choices": list(v.choices)} for v in space],
           "subnets": {name: fn(space) for name, fn in NAMED_SUBNETS.items()}}
    atomic_write_text(path, json.dumps(doc, indent=2))


def load_search_space_groups(path: Path) -> list[ElasticGroup]:
    doc = json.loads(Path(path).read_text())
    return [ElasticGroup(name=g["name"], modules=tuple(g["modules"]), choices=tuple(g["choices"]), per_layer=g["per_layer"])
            for g in doc["groups"]]


def load_supernet(base_dir: Path, adapter_dir: Path, search_space_file: Path, dtype: str, device: torch.device,
                  sparsity_preserving: bool = False):
    """The pruned base with the super-adapter attached and made elastic: (peft_model, tokenizer, space)."""
    tokenizer = load_tokenizer(str(base_dir))
    base = load_causal_lm(str(base_dir), dtype, device)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
    make_elastic(model)
    if sparsity_preserving:  # the adapter's delta only where the base weight is non-zero, as it was trained
        make_sparsity_preserving(model)
    space = resolve_space(model, load_search_space_groups(search_space_file))
    return model, tokenizer, space
