"""NOLA: each LoRA factor is a combination of seeded random bases; only the coefficients train.

Trained as an elastic super-adapter (a basis sliced to a smaller rank is still a basis). `train/adapter/` holds
the coefficients, seed and shapes only; `extract` writes the subnet as a stock LoRA adapter (the factors
materialized, NOLA's logits) and keeps the compact form in `extract/nola/` (the coefficients, and the subnet's
ranks in subnet.json), which `nlsflow.adapters.nola` expands with train/search_space.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch import nn

from nlsflow.adapters.elastic import activate
from nlsflow.adapters.nola import NolaSpec, basis_floats, make_nola, save_nola
from nlsflow.adapters.supernet import load_supernet
from nlsflow.errors import NlsflowError
from nlsflow.io import folder_bytes
from nlsflow.methods.base import Artifact, ExtractPlan, Method, ScoringBatches, Supernet
from schemas.outputs import ExtractOutput, TrainOutput

log = logging.getLogger(__name__)


class Nola(Method):
    name = "nola"
    adapter_kind = "nola"

    @property
    def spec(self) -> NolaSpec:
        c = self.config
        return NolaSpec(num_basis_a=c.num_basis_a, num_basis_b=c.num_basis_b, seed=c.seed, bits=c.bits)

    def build(self, model: nn.Module, scoring_batches: ScoringBatches) -> Supernet:
        net = super().build(model, scoring_batches)
        basis_gb = basis_floats(net.model, self.spec) * next(net.model.parameters()).element_size() / 1e9
        if basis_gb > self.config.max_basis_gb:
            raise NlsflowError(
                f"NOLA bases would take {basis_gb:.1f} GB > method.max_basis_gb={self.config.max_basis_gb:g}; "
                "lower method.num_basis_a/num_basis_b, train.rank or train.target_modules"
            )
        log.info("NOLA: %d coefficients replace the LoRA factors", make_nola(net.model, self.spec))
        return net

    def save_adapter(self, net: Supernet, folder: Path) -> None:
        save_nola(net.model, self.spec, folder)

    def extract(self, model, space, subnet, plan: ExtractPlan) -> list[Artifact]:
        artifacts = super().extract(model, space, subnet, plan)
        compact = plan.out_dir / ExtractOutput.files.nola
        shutil.copytree(plan.train_dir / TrainOutput.files.adapter, compact)
        (compact / "subnet.json").write_text(json.dumps(subnet, indent=2))
        plan.metrics["nola_bytes"] = folder_bytes(compact)

        def load(dtype, device):
            model, _, space = load_supernet(
                plan.base_dir, compact, plan.train_dir / TrainOutput.files.search_space, dtype, device
            )
            activate(model, space, json.loads((compact / "subnet.json").read_text()))
            return model

        return [
            *artifacts,
            Artifact(
                ExtractOutput.files.nola,
                "compact",
                load,
                plan.tolerance,
                "nlsflow (nlsflow.adapters.nola)",
                base=plan.base_dir,
            ),
        ]
