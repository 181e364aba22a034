"""LoNAS: elastic LoRA ranks and elastic MLP width of the base; extract cuts the inactive channels out.

The extracted adapter belongs to the narrowed base it writes (`extract/base/`, named in its adapter_config.json);
`extract/merged/` is narrowed too: a stock HF folder when every layer keeps one width, else `per_layer_llama`
with its code in the folder (`trust_remote_code=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nlsflow.adapters.elastic import extract_sub_adapter
from nlsflow.adapters.supernet import groups_from_config
from nlsflow.adapters.width import WidthGroup, narrow_model, save_narrowed
from nlsflow.methods.base import Artifact, ExtractPlan, Method
from nlsflow.models import load_causal_lm
from schemas.outputs import ExtractOutput, TrainOutput


class Lonas(Method):
    name = "lonas"
    merged_loads_with = "transformers (trust_remote_code=True when the layers keep different widths)"

    def width_groups(self) -> list[WidthGroup]:
        return groups_from_config(self.config.width_groups, WidthGroup)

    def extract(self, model, space, subnet, plan: ExtractPlan) -> list[Artifact]:
        narrow = load_causal_lm(str(plan.base_dir), plan.dtype, torch.device("cpu"))  # slicing only: keep the GPU free
        plan.metrics["mlp_widths"] = narrow_model(narrow, space, subnet)
        save_narrowed(narrow, plan.metrics["mlp_widths"], self.adapter_base(plan))
        plan.tokenizer.save_pretrained(self.adapter_base(plan))
        del narrow
        adapter_dir = plan.out_dir / self.adapter_folder
        extract_sub_adapter(
            model, space, subnet, adapter_dir, base_model_name_or_path=str(plan.final_dir / ExtractOutput.files.base)
        )
        self.copy_extras(plan.train_dir / TrainOutput.files.adapter, adapter_dir)
        return [self.adapter_artifact(self.adapter_base(plan), adapter_dir, plan)]

    def adapter_base(self, plan: ExtractPlan) -> Path:
        return plan.out_dir / ExtractOutput.files.base
