"""What a scoring worker loads and answers (`nlsflow.cluster` pools): picklable, so Ray ships them to its workers.

A search worker holds the super-network and answers a subnet with its validation accuracy. A test-set worker holds
a model and answers a shard of a test set with its prediction rows. Loading happens where the worker runs, on the
device it was given there (`device: auto` is the worker's GPU under Ray).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nlsflow.adapters.elastic import Subnet, activate
from nlsflow.evaluation.likelihood import rank_options
from nlsflow.evaluation.scoring import Shard, predict
from nlsflow.methods import method_for
from nlsflow.models import load_causal_lm, load_tokenizer, resolve_device
from schemas.config import GenerationConfig, PipelineConfig


@dataclass(frozen=True)
class SupernetLoad:
    """The method's trained super-network, from the prune and train stage folders: (model, tokenizer, space)."""

    cfg: PipelineConfig
    base_dir: Path
    train_dir: Path
    device: str | None = None  # None: the run's `device`

    def __call__(self):
        return method_for(self.cfg).load(
            self.base_dir, self.train_dir, self.cfg.dtype, resolve_device(self.device or self.cfg.device)
        )


@dataclass(frozen=True)
class AtSubnet:
    """A super-network with `subnet` active: (model, tokenizer)."""

    load: SupernetLoad
    subnet: Subnet

    def __call__(self):
        model, tokenizer, space = self.load()
        activate(model, space, self.subnet)
        return model, tokenizer


@dataclass(frozen=True)
class BaseModelLoad:
    """A model folder or hub id as transformers loads it: (model, tokenizer)."""

    name_or_path: str
    dtype: str
    device: str
    revision: str | None = None

    def __call__(self):
        model = load_causal_lm(self.name_or_path, self.dtype, resolve_device(self.device), self.revision)
        return model.eval(), load_tokenizer(self.name_or_path, self.revision)


@dataclass(frozen=True)
class DeployableLoad:
    """An extracted model folder, loaded as a user would (`methods.Artifact.load`): (model, tokenizer)."""

    load: Callable
    dtype: str
    device: str
    tokenizer_dir: Path

    def __call__(self):
        return self.load(self.dtype, resolve_device(self.device)).eval(), load_tokenizer(str(self.tokenizer_dir))


@dataclass(frozen=True)
class SubnetScorer:
    """Loads the super-network once; answers (subnet, validation `Shard`) with the shard's correct answers
    (`scoring.validation_accuracy_pool` sums them into the subnet's accuracy)."""

    load: Callable[[], tuple]  # -> (model, tokenizer, space), e.g. a SupernetLoad
    generation: GenerationConfig
    objective: str = "generated"  # search.objective: which answers count, the generated or lm-eval's cloze

    def __call__(self) -> Callable[[tuple[Subnet, Shard]], int]:
        model, tokenizer, space = self.load()
        cloze = self.objective == "cloze"

        def score(item: tuple[Subnet, Shard]) -> int:
            subnet, shard = item
            activate(model, space, subnet)
            if cloze:
                rows = rank_options(
                    model,
                    tokenizer,
                    shard.records,
                    shard.dataset,
                    batch_size=self.generation.batch_size,
                    progress=False,
                )
                return sum(row["cloze_correct"] for row in rows)
            return sum(row["correct"] for row in predict(model, tokenizer, shard, self.generation, cloze=False))

        return score


@dataclass(frozen=True)
class TestSetScorer:
    """Answers a `Shard` with its prediction rows. `models` maps a shard's model key to its (model, tokenizer)
    load; one model is held at a time, loaded when a shard first asks for it (shards come model by model)."""

    models: dict[str, Callable[[], tuple]]
    generation: GenerationConfig

    def __call__(self) -> Callable[[Shard], list[dict]]:
        held: dict[str, tuple] = {}

        def score(shard: Shard) -> list[dict]:
            if shard.model not in held:
                held.clear()
                gc.collect()
                held[shard.model] = self.models[shard.model]()
            model, tokenizer = held[shard.model]
            return predict(model, tokenizer, shard, self.generation)

        return score
