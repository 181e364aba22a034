"""The JSON files stages write beside their weights and tables, one model each.

`schema_version` is checked before anything else when a file is read (nlsflow.artifacts.read_json): a file written by
another version of nlsflow is refused with one line naming the stage to re-run. `search/chosen.json` stays a plain
mapping, the same that `extract.subnet` takes, so it carries no version.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, RootModel

from schemas.base import Strict


class GroupEntry(Strict):
    """An elastic group as train resolved it (rank groups, or LoNAS width groups)."""

    name: str = Field(description="group name, e.g. 'qkv'")
    modules: list[str] = Field(description="module-name suffixes that share one choice")
    choices: list[int] = Field(description="choices, descending; the first is the trained rank (or the full width)")
    per_layer: bool = Field(description="one choice per decoder layer, or one shared")


class VariableEntry(Strict):
    """One searchable dimension: a group resolved against the model."""

    name: str = Field(description="'layers.0.qkv' (per layer) or 'qkv' (shared)")
    kind: Literal["rank", "width"] = Field(description="a LoRA rank, or an elastic base width (LoNAS)")
    modules: list[str] = Field(description="full module names it sets")
    consumers: list[str] = Field(description="width: the modules whose input width follows")
    choices: list[int] = Field(description="its choices, descending")


class SearchSpaceFile(Strict):
    """`train/search_space.json`: the super-network's search space and its named subnets."""

    schema_version: Literal[1] = Field(1, description="version of this file's layout")
    groups: list[GroupEntry] = Field(description="the elastic rank groups the super-adapter was trained with")
    width_groups: list[GroupEntry] = Field([], description="LoNAS: the elastic base-width groups")
    variables: list[VariableEntry] = Field(description="the search variables, rank variables first")
    subnets: dict[str, dict[str, int]] = Field(description="named subnet (heuristic, maximal, minimal) -> choices")


class HeteroLoraChoiceFile(Strict):
    """`train/heterolora.json`: which LoRA and shortcut modules HeteroLoRA enabled, with their ranks and scores."""

    schema_version: Literal[1] = Field(1, description="version of this file's layout")
    settings: dict[str, Any] = Field(description="the HeteroLoRA settings the choice was made with (the method config)")
    enabled: list[str] = Field(description="enabled modules, sorted: LoRA module names and 'shortcut.<layer>'")
    ranks: dict[str, int] = Field(description="enabled module -> its maximal rank")
    scores: dict[str, float] = Field(description="every candidate module -> its saliency score at the last choice")


class NolaSpecEntry(Strict):
    num_basis_a: int = Field(description="basis matrices for each A (r x in)")
    num_basis_b: int = Field(description="basis matrices for each B (out x r)")
    seed: int = Field(description="seed the bases are regenerated from")
    bits: int | None = Field(None, description="quantized coefficients: 2**bits levels; None: float")


class NolaConfigFile(Strict):
    """`nola_config.json` of a NOLA adapter folder, beside `nola_coefficients.safetensors`."""

    schema_version: Literal[1] = Field(1, description="version of this file's layout")
    nola: NolaSpecEntry = Field(description="how the bases are drawn and the coefficients stored")
    shapes: dict[str, list[int]] = Field(description="'<module>.lora_A' / '.lora_B' -> shape of the factor")
    lora_config: dict[str, Any] = Field(description="the PEFT LoraConfig the factors belong to (to_dict())")


class ChosenSubnetFile(RootModel[dict[str, int]]):
    """`search/chosen.json`: the chosen subnet, variable -> choice (what `extract.subnet` also takes)."""

    model_config = ConfigDict(frozen=True)
