"""Methods as units behind one interface (`base.Method`): LoRA, Shears, LoNAS, NOLA and HeteroLoRA.

    method = method_for(cfg)      # from the config's typed `method` section
    net = method.build(model, scoring_batches)

Stages call the interface and never ask which method runs; adding one is a module here, its config type in
`schemas.methods`, a file in configs/methods/ and its tests.
"""

from __future__ import annotations

from nlsflow.methods.base import Artifact, ExtractPlan, Method, Supernet, TrainHook
from nlsflow.methods.heterolora import HeteroLora
from nlsflow.methods.lonas import Lonas
from nlsflow.methods.lora import Lora
from nlsflow.methods.nola import Nola
from nlsflow.methods.shears import Shears
from schemas.config import PipelineConfig

METHODS: dict[str, type[Method]] = {m.name: m for m in (Lora, Shears, Lonas, Nola, HeteroLora)}


def method_for(cfg: PipelineConfig) -> Method:
    return METHODS[cfg.method.name](cfg.method, cfg.train, cfg.seed)


__all__ = ["METHODS", "Artifact", "ExtractPlan", "Method", "Supernet", "TrainHook", "method_for"]
