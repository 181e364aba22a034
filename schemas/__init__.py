"""The contract between stages: configs, manifests and tables. Stages import this, never each other."""
from schemas.config import STAGE_INPUTS, STAGES, PipelineConfig, load_config
from schemas.io import NlsflowError
from schemas.manifest import Manifest, is_up_to_date, read_inputs, read_manifest, stage_dir, write_manifest
from schemas.tables import read_table, write_table

__all__ = ["STAGES", "STAGE_INPUTS", "PipelineConfig", "load_config", "NlsflowError", "Manifest", "is_up_to_date",
           "read_inputs", "read_manifest", "stage_dir", "write_manifest", "read_table", "write_table"]
