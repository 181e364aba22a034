"""The contract between stages: config models, the manifest, stage outputs, file and table schemas. Pure data:
imports nothing of nlsflow."""

from schemas.config import STAGE_INPUTS, STAGES, PipelineConfig
from schemas.manifest import Manifest
from schemas.outputs import STAGE_OUTPUTS, StageOutput

__all__ = ["STAGES", "STAGE_INPUTS", "STAGE_OUTPUTS", "PipelineConfig", "Manifest", "StageOutput"]
