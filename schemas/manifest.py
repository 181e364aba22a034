"""The manifest every stage writes: what it was given, what it wrote (with digests), what it measured."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.outputs import STAGE_OUTPUTS, StageOutput

MANIFEST_SCHEMA = "nlsflow.manifest"
MANIFEST_VERSION = 2  # 2: metrics are the stage's output model (schemas.outputs); 1 is refused
MANIFEST_NAME = "manifest.json"


class OutputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="relative to the stage folder")
    sha256: str = Field(description="hex digest of the file's bytes")
    bytes: int = Field(description="file size")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_name: str = Field(MANIFEST_SCHEMA, description="what this file is (checked on reading)")
    schema_version: int = Field(MANIFEST_VERSION, description="bumped when the layout changes (checked on reading)")
    stage: str = Field(description="the stage that wrote it")
    config: dict[str, Any] = Field(description="the resolved config this stage depends on")
    inputs: dict[str, str] = Field(description="upstream stage -> fingerprint of its manifest")
    outputs: list[OutputFile] = Field(description="every file the stage wrote, with its digest and size")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="the stage's output model as JSON (schemas.outputs.STAGE_OUTPUTS[stage])"
    )
    created_at: str = Field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(), description="when the stage finished (UTC)"
    )
    duration_s: float = Field(0.0, description="the stage's wall time")
    versions: dict[str, str] = Field(default_factory=dict, description="versions of the libraries it ran with")

    @property
    def output(self) -> StageOutput:
        """The metrics as the stage's typed output model; raises pydantic's ValidationError when they do not fit."""
        return STAGE_OUTPUTS[self.stage].model_validate(self.metrics)

    def fingerprint(self) -> str:
        """Content identity: config, inputs and output digests (not timings), so downstream stages can key on it."""
        identity = {
            "stage": self.stage,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": [o.model_dump() for o in self.outputs],
        }
        return hashlib.sha256(
            json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str).encode()
        ).hexdigest()
