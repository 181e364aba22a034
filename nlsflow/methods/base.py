"""The one interface every method implements, and what it works on: a super-network and its extracted artifacts.

A stage asks a `Method` to build its super-network on a PEFT model (`build`), for the parameters that train and the
hooks the training loop calls (`trainable_parameters`, `hooks`), to save it (`save`) and load it for scoring
(`load`), and to write the chosen subnet as deployable artifacts (`extract`), each of which says how it loads and
is checked against the super-network by the extract stage. The base class is elastic LoRA (the common case); a
method overrides the steps it changes, and nothing outside `nlsflow.methods` asks which method runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from nlsflow.adapters.elastic import (
    ElasticGroup,
    Subnet,
    Variable,
    adapter_parameters,
    extract_sub_adapter,
    linear_macs_per_token,
)
from nlsflow.adapters.loading import load_peft_adapter
from nlsflow.adapters.shortcuts import Shortcuts, has_shortcuts, load_shortcuts
from nlsflow.adapters.supernet import groups_from_config, load_supernet, make_supernet, save_search_space
from nlsflow.adapters.width import WidthGroup, save_narrowed
from nlsflow.errors import NlsflowError
from nlsflow.io import folder_bytes
from nlsflow.models import load_causal_lm, torch_dtype
from nlsflow.pruning import sparsity_table
from schemas.config import TrainConfig
from schemas.outputs import ExtractOutput, PruneOutput, TrainOutput

TRAIN, EXTRACT = TrainOutput.files, ExtractOutput.files
ScoringBatches = Callable[[int, int], list[dict]]  # (step, count) -> seeded training micro-batches


@dataclass
class Supernet:
    """A PEFT model with elastic choices: what trains, is scored and is searched."""

    model: PeftModel
    space: list[Variable]
    groups: list[ElasticGroup]
    width_groups: list[WidthGroup] = field(default_factory=list)
    shortcuts: Shortcuts | None = None  # HeteroLoRA's, outside the model's module tree


class TrainHook:
    """Called by the training loop before each step's subnet is drawn (HeteroLoRA re-selects modules here)."""

    def before_step(self, step: int, net: Supernet) -> bool:  # pragma: no cover - an interface
        """Act before `step`; True when it changed what trains (the loop then gives every process the main
        process's state, so that float noise between GPUs cannot make them choose differently)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if never stopped (checkpointed with the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Artifact:
    """One folder `extract` writes, how a user loads it, and how closely it must reproduce the super-network."""

    name: str  # folder under extract/
    kind: str  # "adapter", "merged" or "compact"
    load: Callable[[str, torch.device], nn.Module]  # (dtype, device) -> the model, loaded as a user would
    tolerance: float  # max |logit| difference from the super-network at the subnet, in float32
    loads_with: str  # what loading it takes, e.g. "peft" or "peft + nlsflow (the base's mask)"
    deployable: bool = False  # the one the extract stage scores on the test sets
    base: Path | None = None  # the base model folder it goes on (an adapter's; None: a whole model)


@dataclass(kw_only=True)
class ExtractPlan:
    """What `Method.extract` is given: where to write, the base and settings, and the check tolerances."""

    out_dir: Path  # the stage's temp folder
    final_dir: Path  # where it lands: paths written into configs name it
    prune_dir: Path  # the prune stage's folder: the base and its sparsity table
    train_dir: Path
    tokenizer: Any
    dtype: str  # the run's dtype: merged weights are saved in it
    device: torch.device
    merge: bool
    tolerance: float
    merge_tolerance: float
    metrics: dict[str, Any] = field(default_factory=dict)  # what the method measured, for the stage's output

    @property
    def base_dir(self) -> Path:
        """The pruned base the super-network was trained on."""
        return self.prune_dir / PruneOutput.files.model


class Method:
    """Elastic LoRA: a LoRA super-adapter whose ranks (per group) are searched. Subclasses change single steps."""

    name: ClassVar[str] = "elastic_lora"
    masked: bool = False  # the adapter's delta is masked by the base's zeros (Shears' sparsity-preserving)
    adapter_folder: str = EXTRACT.adapter  # the extracted sub-adapter's folder under extract/
    adapter_kind: str = "lora"  # what train/adapter/ holds: LoRA factors ("nola": coefficients of random bases)
    may_leave_parameters_unused: bool = False  # a step may not use every trainable parameter (DDP must look)

    def __init__(self, config: Any, train: TrainConfig, seed: int):
        self.config, self.train, self.seed = config, train, seed

    # --- training -----------------------------------------------------------------------------------------------
    def lora_config(self, target_modules: list[str] | None = None, rank_pattern: dict | None = None) -> LoraConfig:
        tc = self.train
        return LoraConfig(
            r=tc.rank,
            lora_alpha=tc.alpha,
            lora_dropout=tc.dropout,
            target_modules=target_modules or tc.target_modules,
            rank_pattern=rank_pattern or {},
            task_type="CAUSAL_LM",
        )

    def rank_groups(self) -> list[ElasticGroup]:
        return groups_from_config(self.train.groups)

    def width_groups(self) -> list[WidthGroup]:
        return []

    def build(self, model: nn.Module, scoring_batches: ScoringBatches) -> Supernet:
        """The super-network on a plain causal LM: LoRA attached, its ranks (and widths) made elastic."""
        peft_model = get_peft_model(model, self.lora_config())
        groups, width_groups = self.rank_groups(), self.width_groups()
        return Supernet(peft_model, make_supernet(peft_model, groups, width_groups), groups, width_groups)

    def trainable_parameters(self, net: Supernet) -> list[nn.Parameter]:
        """In optimizer order: the model's trainable parameters, then those outside its module tree (shortcuts)."""
        extra = list(net.shortcuts.parameters()) if net.shortcuts is not None else []
        return [p for p in net.model.parameters() if p.requires_grad] + extra

    def trainable_count(self, net: Supernet) -> int:
        return sum(p.numel() for p in self.trainable_parameters(net))

    def hooks(self, net: Supernet, steps_per_epoch: int, scoring_batches: ScoringBatches) -> list[TrainHook]:
        return []

    def save(self, net: Supernet, out_dir: Path) -> dict[str, Any]:
        """Write `adapter/` and `search_space.json`; return the method's own metrics for the train stage's output."""
        self.save_adapter(net, out_dir / TRAIN.adapter)
        save_search_space(out_dir / TRAIN.search_space, net.groups, net.width_groups, net.space)
        return {}

    def save_adapter(self, net: Supernet, folder: Path) -> None:
        net.model.save_pretrained(folder)

    # --- scoring ------------------------------------------------------------------------------------------------
    def load(self, base_dir: Path, train_dir: Path, dtype: str, device: torch.device):
        """The trained super-network on its base, as it trained: (peft_model, tokenizer, space)."""
        return load_supernet(
            base_dir, train_dir / TRAIN.adapter, train_dir / TRAIN.search_space, dtype, device, self.masked
        )

    def cost(self, model: PeftModel, space: list[Variable], subnet: Subnet, kind: str) -> int:
        """The search's second objective for a subnet: its adapter parameters ("params") or its linear layers'
        MACs per token ("macs", base and adapter, as the elastic widths and ranks leave them)."""
        return (adapter_parameters if kind == "params" else linear_macs_per_token)(model, space, subnet)

    # --- extraction ---------------------------------------------------------------------------------------------
    adapter_loads_with: str = "peft"

    def extract(self, model: PeftModel, space: list[Variable], subnet: Subnet, plan: ExtractPlan) -> list[Artifact]:
        """Write the subnet's adapter folders into `plan.out_dir` (the super-network is freed after this call)."""
        adapter_dir = plan.out_dir / self.adapter_folder
        extract_sub_adapter(model, space, subnet, adapter_dir)
        self.copy_extras(plan.train_dir / TRAIN.adapter, adapter_dir)
        return [self.adapter_artifact(plan.base_dir, adapter_dir, plan)]

    def adapter_base(self, plan: ExtractPlan) -> Path:
        """The base the extracted adapter belongs to (LoNAS: the narrowed one it wrote)."""
        return plan.base_dir

    def adapter_artifact(self, base_dir: Path, adapter_dir: Path, plan: ExtractPlan) -> Artifact:
        plan.metrics["adapter_bytes"] = folder_bytes(adapter_dir)
        return Artifact(
            adapter_dir.name,
            "adapter",
            lambda dtype, device: self.load_adapter(base_dir, adapter_dir, dtype, device),
            plan.tolerance,
            _with_shortcuts(self.adapter_loads_with, adapter_dir),
            deployable=True,
            base=base_dir,
        )

    def load_adapter(self, base_dir: Path, adapter_dir: Path, dtype: str, device: torch.device) -> nn.Module:
        """The extracted adapter on its base, loaded as a user would (stock PEFT, plus what the method documents)."""
        model = load_peft_adapter(load_causal_lm(str(base_dir), dtype, device), adapter_dir, base_dir).eval()
        load_shortcuts(model, adapter_dir)
        return model

    def merge_into_base(self, adapter_model: PeftModel, plan: ExtractPlan) -> nn.Module:
        return adapter_model.merge_and_unload()

    def merge(self, plan: ExtractPlan) -> Artifact:
        """The adapter, loaded as a user would, merged into its base and saved as a plain HF model folder.

        In float32 runs the saved folder itself is checked. In lower-precision runs its weights are rounded, so the
        float32 merge (kept on the CPU) is checked, and the folder must hold exactly its weights cast to the run's
        dtype, every one of them.
        """
        merged_dir, adapter_dir = plan.out_dir / EXTRACT.merged, plan.out_dir / self.adapter_folder
        adapter_model = self.load_adapter(self.adapter_base(plan), adapter_dir, "float32", plan.device)
        shortcut_params = _shortcut_params(adapter_model)
        merged = self.merge_into_base(adapter_model, plan)
        layers = sparsity_table(merged)
        plan.metrics["merged_sparsity"] = sum(t.zeros for t in layers) / sum(
            t.in_features * t.out_features for t in layers
        )
        plan.metrics["merged_params"] = sum(p.numel() for p in merged.parameters()) + shortcut_params
        widths = plan.metrics.get("mlp_widths") or []
        if plan.dtype == "float32":
            save_narrowed(merged, widths, merged_dir)
            del merged, adapter_model  # checked from the folder: nothing of it stays in memory
            load = partial(self.load_merged, merged_dir)
        else:
            reference = merged.cpu()
            save_narrowed(copy.deepcopy(reference).to(torch_dtype(plan.dtype)), widths, merged_dir)
            require_saved_weights(merged_dir, reference, plan.dtype)
            load = _MergedLoad(self, merged_dir, reference)

        plan.tokenizer.save_pretrained(merged_dir)
        self.copy_extras(adapter_dir, merged_dir)
        loads_with = _with_shortcuts(self.merged_loads_with, merged_dir)
        return Artifact(EXTRACT.merged, "merged", load, plan.merge_tolerance, loads_with)

    merged_loads_with: str = "transformers"

    def load_merged(self, merged_dir: Path, dtype: str, device: torch.device) -> nn.Module:
        model = load_causal_lm(str(merged_dir), dtype, device).eval()
        load_shortcuts(model, merged_dir)
        return model

    def copy_extras(self, adapter_dir: Path, dst: Path) -> None:
        """Files that travel with the adapter into other folders (HeteroLoRA's shortcuts); none by default."""


def require_saved_weights(folder: Path, model: nn.Module, dtype: str) -> None:
    """The folder's safetensors hold every weight of `model` (tied ones once) cast to `dtype`, exactly; else one
    line names the first that differs or is missing."""
    from safetensors.torch import load_file

    saved = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        saved.update(load_file(str(file)))
    storages = {}
    for name, tensor in model.state_dict().items():
        if name not in saved and storages.get(tensor.data_ptr()) in saved:  # tied to a weight saved under its name
            continue
        storages.setdefault(tensor.data_ptr(), name)
        if name not in saved or not torch.equal(saved[name], tensor.to(torch_dtype(dtype)).cpu()):
            problem = "is missing" if name not in saved else f"differs from the merged model cast to {dtype}"
            raise NlsflowError(f"{folder}: {name} {problem}; this is a bug, please report it")


def _with_shortcuts(loads_with: str, folder: Path) -> str:
    """Shortcut modules (HeteroLoRA's) are not LoRA: a folder that holds them needs nlsflow to attach them."""
    return (
        f"{loads_with} + its shortcuts (nlsflow.adapters.shortcuts.load_shortcuts)"
        if has_shortcuts(folder)
        else loads_with
    )


def _shortcut_params(model: nn.Module) -> int:
    from nlsflow.adapters.shortcuts import attached_shortcuts

    return sum(p.numel() for group in attached_shortcuts(model) for p in group.parameters())


def collapsed(groups: list[ElasticGroup]) -> list[ElasticGroup]:
    """Each group at its first (maximal) choice only: a space that holds one subnet."""
    return [replace(g, choices=(g.choices[0],)) for g in groups]


class _MergedLoad:
    """A lower-precision run's merged folder, or in float32 (the check) the float32 merge it was rounded from.

    The merge stays in this process: a scoring worker it is shipped to (`nlsflow.cluster`) loads the folder."""

    def __init__(self, method: Method, merged_dir: Path, reference: nn.Module):
        self.method, self.merged_dir, self.reference = method, merged_dir, reference

    def __call__(self, dtype: str, device: torch.device) -> nn.Module:
        if dtype == "float32" and self.reference is not None:
            return self.reference.to(device)
        return self.method.load_merged(self.merged_dir, dtype, device)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reference": None}
