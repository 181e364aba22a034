"""Shears: elastic LoRA ranks on a Wanda-sparse base; by default sparsity-preserving (the delta masked by the base).

A masked adapter reproduces the trained model only with the base's mask applied, which stock PEFT does not do: its
deployable form is the merged model (`extract/merged/`, exactly as sparse as the pruned base, checked), and the
sub-adapter is written as `extract/masked_adapter/`, documented as needing `make_sparsity_preserving` after
`PeftModel.from_pretrained`. Without masking (`sparsity_preserving: false`, the original Shears) the sub-adapter
is a stock one and a merge fills the pruned zeros.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from nlsflow.adapters.masking import make_sparsity_preserving, masked_merge, require_sparsity
from nlsflow.artifacts import read_table
from nlsflow.methods.base import Artifact, ExtractPlan, Method, ScoringBatches, Supernet
from schemas.outputs import ExtractOutput, PruneOutput

log = logging.getLogger(__name__)


class Shears(Method):
    name = "shears"

    @property
    def masked(self) -> bool:
        return self.config.sparsity_preserving

    @property
    def adapter_folder(self) -> str:
        files = ExtractOutput.files
        return files.masked_adapter if self.masked else files.adapter

    @property
    def adapter_loads_with(self) -> str:
        return "peft + the base's mask (nlsflow.adapters.masking.make_sparsity_preserving)" if self.masked else "peft"

    def build(self, model: nn.Module, scoring_batches: ScoringBatches) -> Supernet:
        net = super().build(model, scoring_batches)
        if self.masked:  # the adapter's delta is masked by the base's zeros: merging keeps the sparsity
            log.info("sparsity-preserving LoRA: %d LoRA layers have a sparse base", make_sparsity_preserving(net.model))
        return net

    def load_adapter(self, base_dir: Path, adapter_dir: Path, dtype: str, device: torch.device) -> nn.Module:
        model = super().load_adapter(base_dir, adapter_dir, dtype, device)
        if self.masked:
            make_sparsity_preserving(model)
        return model

    def extract(self, model, space, subnet, plan: ExtractPlan) -> list[Artifact]:
        artifacts = super().extract(model, space, subnet, plan)
        # masked: the merged model is what deploys; the adapter alone is scored only when nothing is merged
        return [dataclasses.replace(a, deployable=not (self.masked and plan.merge)) for a in artifacts]

    def merge_into_base(self, adapter_model, plan: ExtractPlan) -> nn.Module:
        if not self.masked:
            return super().merge_into_base(adapter_model, plan)
        merged = masked_merge(adapter_model)
        pruned = read_table(plan.prune_dir / PruneOutput.files.sparsity, "sparsity").to_pylist()
        require_sparsity(merged, {r["layer"]: r["zeros"] for r in pruned})  # one line naming the first layer
        return merged

    def merge(self, plan: ExtractPlan) -> Artifact:
        return dataclasses.replace(super().merge(plan), deployable=self.masked)
