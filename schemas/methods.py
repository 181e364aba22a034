"""The method of a run, as one typed choice: `method: {name: shears, ...}` (or just `method: shears`).

Each method carries its own settings, so a combination that cannot work cannot be written: NOLA has no width
groups, LoNAS no sparsity mask, dynamic HeteroLoRA no rank budget. The shape they share (target modules, maximal
rank, alpha, the elastic rank groups) stays in `train`; `nlsflow.methods` implements each one behind one interface.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from schemas.base import Strict


class GroupConfig(Strict):
    name: str = Field(description="group name, e.g. 'qkv'")
    modules: list[str] = Field(description="module-name suffixes that share one choice, e.g. [q_proj, k_proj, v_proj]")
    choices: list[int] = Field(description="choices, descending; the first is the trained rank (or the module's width)")
    per_layer: bool = Field(True, description="one choice per decoder layer (NNCF '{*}') or one shared")

    @model_validator(mode="after")
    def _descending(self) -> GroupConfig:
        if not self.choices or any(a <= b for a, b in zip(self.choices, self.choices[1:])) or self.choices[-1] <= 0:
            raise ValueError(f"group '{self.name}': choices {self.choices} must be positive and strictly descending")
        return self


class LoraMethod(Strict):
    """Plain LoRA on the dense base at the profile's maximal rank: no elasticity, the baseline of every table."""

    name: Literal["lora"] = "lora"


class ShearsMethod(Strict):
    """Shears (Muñoz et al., 2024): elastic LoRA ranks on a Wanda-sparse base (the sparsity is set in `prune`)."""

    name: Literal["shears"] = "shears"
    sparsity_preserving: bool = Field(
        False,
        description="mask the adapter's delta by the base's zeros (SQFT-style), so the merged model keeps the pruned "
        "base's sparsity exactly (configs/methods/shears.yaml sets it); false: the paper's Shears, whose merge fills "
        "the zeros",
    )


class LonasMethod(Strict):
    """LoNAS (Muñoz et al., 2024): elastic LoRA ranks and elastic MLP width of the base, cut out at extraction."""

    name: Literal["lonas"] = "lonas"
    width_groups: list[GroupConfig] = Field(
        min_length=1,
        description="MLP projections whose output channels shrink together (e.g. [gate_proj, up_proj]; down_proj "
        "follows), choices from the full width down; the profile's <profile>.lonas.yaml gives them",
    )

    @model_validator(mode="after")
    def _one_owner(self) -> LonasMethod:
        owners: dict[str, str] = {}
        for g in self.width_groups:
            for m in g.modules:
                if owners.setdefault(m, g.name) != g.name:
                    raise ValueError(f"module {m!r} is in width groups '{owners[m]}' and '{g.name}'; list it in one")
        return self


class NolaMethod(Strict):
    """NOLA (Koohpayegani et al., ICLR 2024): LoRA factors as combinations of seeded random bases; only the
    coefficients train."""

    name: Literal["nola"] = "nola"
    num_basis_a: int = Field(1024, gt=0, description="random basis matrices each LoRA A is a combination of")
    num_basis_b: int = Field(1024, gt=0, description="random basis matrices each LoRA B is a combination of")
    seed: int = Field(0, description="seed of the bases (regenerated, never stored)")
    bits: int | None = Field(
        None,
        ge=1,
        le=8,
        description="quantize the coefficients to 2**bits levels (NOLA's quantized variant, trained with a "
        "straight-through estimator); null: float",
    )
    max_basis_gb: float = Field(
        16.0,
        gt=0,
        description="refuse to start when the bases would take more memory than this (they are regenerated and held "
        "for the whole run)",
    )


class _Saliency(Strict):
    proxy: Literal["constant", "snip", "synflow", "grad_norm", "alpha_test"] = Field(
        "grad_norm", description="saliency proxy"
    )
    batches: int = Field(
        8, gt=0, description="training micro-batches each scoring uses (the seed's imp-limit-test-batches)"
    )
    turn_on_percentile: float = Field(0.25, gt=0, le=1, description="fraction of the modules enabled (top_fraction)")
    ranking: Literal["combined", "separate"] = Field(
        "combined", description="rank LoRA and shortcut modules together, or enable the top fraction of each"
    )
    shortcuts: bool = Field(True, description="add a low-rank shortcut across every decoder layer as a candidate")
    shortcut_rank: int = Field(8, gt=0, description="rank of the shortcut modules (fixed, not elastic)")
    probe_std: float = Field(0.01, gt=0, description="std of the random B a still-zero module is scored with")


class StaticSelection(_Saliency):
    """Choose the modules once, before training."""

    mode: Literal["static"] = "static"
    select: Literal["top_fraction", "rank_budget"] = Field(
        "top_fraction",
        description="top_fraction: enable the top turn_on_percentile; rank_budget: ranks from the groups' choices, "
        "proportional to the scores, under rank_budget",
    )
    rank_budget: float = Field(
        0.5, gt=0, le=1, description="rank_budget: parameters allowed, as a fraction of every candidate at full rank"
    )


class DynamicSelection(_Saliency):
    """Re-choose the modules every `realloc_every` of an epoch, during training (the top fraction each time)."""

    mode: Literal["dynamic"] = "dynamic"
    realloc_every: float = Field(0.2, gt=0, description="epochs between re-selections (the seed's realloc-N)")

    @property
    def select(self) -> str:
        return "top_fraction"


class HeteroLoraMethod(Strict):
    """HeteroLoRA (Zhang et al., 2024): a zero-cost saliency proxy chooses which LoRA and shortcut modules train."""

    name: Literal["heterolora"] = "heterolora"
    selection: Annotated[StaticSelection | DynamicSelection, Field(discriminator="mode")] = Field(
        default_factory=DynamicSelection, description="static (once, before training) or dynamic (during it)"
    )


MethodConfig = Annotated[
    LoraMethod | ShearsMethod | LonasMethod | NolaMethod | HeteroLoraMethod, Field(discriminator="name")
]
METHOD_NAMES = tuple(get_args(m.model_fields["name"].annotation)[0] for m in get_args(get_args(MethodConfig)[0]))

# Keys of the old flat `train` section, and where their settings live now.
MOVED_TRAIN_KEYS = {
    "sparsity_preserving": "method.sparsity_preserving (method: {name: shears, sparsity_preserving: ...})",
    "adapter": "method.name (lora, shears, lonas, nola or heterolora)",
    "nola": "method's own fields (method: {name: nola, num_basis_a: ..., num_basis_b: ..., seed: ...})",
    "heterolora": "method.selection (method: {name: heterolora, selection: {mode: dynamic, proxy: ...}})",
    "width_groups": "method.width_groups (method: {name: lonas, width_groups: [...]})",
}
