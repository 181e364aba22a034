"""The contract between stages: config models, the manifest, table schemas. Pure data: imports nothing of nlsflow."""

from schemas.config import STAGE_INPUTS, STAGES, PipelineConfig
from schemas.manifest import Manifest

__all__ = ["STAGES", "STAGE_INPUTS", "PipelineConfig", "Manifest"]
