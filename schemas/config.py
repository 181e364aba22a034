"""One validated config per stage, composed into the pipeline config that YAML files and `key=value` overrides build."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from schemas.base import Strict
from schemas.methods import METHOD_NAMES, GroupConfig, MethodConfig, ShearsMethod

STAGES = ("prune", "train", "evaluate", "search", "extract", "benchmark")
# Which stages' manifests each stage reads: the DAG's edges.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prune": (),
    "train": ("prune",),
    "evaluate": ("prune", "train"),
    "search": ("prune", "train"),
    "extract": ("prune", "train", "search"),
    "benchmark": ("prune", "train", "evaluate", "extract"),
}

# The config sections each stage's result depends on (beyond the shared fields).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prune": ("prune",),
    "train": ("method", "train"),
    "evaluate": ("evaluate",),
    "search": ("search",),
    "extract": ("extract", "evaluate"),
    "benchmark": ("benchmark", "evaluate"),
}


class TinyModelConfig(Strict):
    vocab_size: int = Field(2048, description="BPE vocabulary trained on the task's training text")
    hidden_size: int = Field(64, description="model width")
    intermediate_size: int = Field(172, description="MLP width")
    num_hidden_layers: int = Field(2, description="decoder layers")
    num_attention_heads: int = Field(4, description="query heads")
    num_key_value_heads: int = Field(2, description="key/value heads (GQA)")
    tokenizer_texts: int = Field(4000, description="training records the tokenizer is trained on")


class ModelConfig(Strict):
    name_or_path: str = Field("tiny", description="'tiny' (random Llama built locally), a local HF folder, or a hub id")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path, converted once to safetensors")
    revision: str | None = Field(None, description="hub revision")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="shape of the 'tiny' model")
    cache_dir: str | None = Field(
        None, description="where built or converted models are cached (default $NLSFLOW_CACHE or ~/.cache/nlsflow)"
    )


class DataConfig(Strict):
    root: str = Field(
        default_factory=lambda: os.environ.get("NLSFLOW_DATA_ROOT", "../shared/data"),
        validate_default=True,
        description="root of the LLM-Adapters / GSM8K / WikiText-2 files (default $NLSFLOW_DATA_ROOT "
        "or ../shared/data)",
    )
    train_sets: list[str] = Field(description="registered training sets, e.g. [gsm8k_train, mawps_train] or [math_10k]")
    contamination: Literal["refuse", "drop"] = Field(
        "refuse", description="training questions found in a test set: refuse to train, or drop them and report"
    )
    download: bool = Field(True, description="fetch missing registered files from their source (with checksums)")

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return str(Path(v).expanduser().resolve())


class CalibrationConfig(Strict):
    source: Literal["wikitext2", "task", "c4"] = Field(
        "wikitext2",
        description="WikiText-2 validation, the task's training prompts, or C4 (Wanda's choice; downloaded)",
    )
    num_samples: int = Field(128, gt=0, description="calibration sequences")
    seqlen: int = Field(2048, gt=0, description="tokens per calibration sequence")
    seed: int = Field(0, description="which windows are drawn")


class PruneConfig(Strict):
    method: Literal["wanda", "magnitude"] = Field("wanda", description="importance score")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights zeroed in every output row")
    structure: str = Field("unstructured", description="'unstructured' or 'N:M' (e.g. '2:4')")
    targets: list[str] | None = Field(
        None, description="linear-module suffixes to prune (default: all in decoder layers)"
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="calibration data")
    reorder_mlp_channels: bool = Field(
        False,
        description="sort MLP channels by calibration importance (function-"
        "preserving), so that elastic width (LoNAS) keeps the most important channels",
    )
    perplexity_seqlen: int = Field(2048, gt=0, description="window for WikiText-2 test perplexity")
    perplexity_max_windows: int | None = Field(
        None, gt=0, description="cap on perplexity windows (None: whole test set)"
    )

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        if v != "unstructured":
            n, sep, m = v.partition(":")
            if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"structure must be 'unstructured' or 'N:M' with 0 < N < M, got {v!r}")
        return v

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) for N:M sparsity, None for unstructured."""
        return None if self.structure == "unstructured" else tuple(map(int, self.structure.split(":")))

    @model_validator(mode="after")
    def _nm_sparsity(self) -> PruneConfig:
        if self.n_m:
            n, m = self.n_m
            if abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(
                    f"structure {self.structure} zeroes {n}/{m} of the weights; set prune.sparsity={n / m:g}"
                )
        return self


class TrainConfig(Strict):
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], description="LoRA targets"
    )
    rank: int = Field(32, gt=0, description="super-adapter (maximum) rank")
    alpha: float = Field(64, gt=0, description="LoRA alpha; scaling alpha/rank is kept for every sub-rank")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout")
    groups: list[GroupConfig] = Field([], description="elastic search space: groups of modules and their rank choices")
    search_space_file: str | None = Field(
        None,
        description="a seed NNCF JSON (bootstrapNAS overwrite_groups) or plain YAML search space; fills `groups` "
        "(LoNAS: and method.width_groups; and `search` defaults) when the config loads",
    )
    learning_rate: float = Field(3e-4, gt=0, description="peak AdamW learning rate (linear warmup, then linear decay)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (LLM-Adapters: 0)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (HF Trainer default 1.0; None: off)")
    batch_size: int = Field(16, gt=0, description="sequences per optimizer step")
    micro_batch_size: int = Field(4, gt=0, description="sequences per forward pass (gradient accumulation)")
    epochs: float = Field(3.0, gt=0, description="passes over the training records when max_steps is not set")
    max_steps: int | None = Field(None, gt=0, description="cap on optimizer steps")
    warmup_steps: int = Field(100, ge=0, description="optimizer steps of linear learning-rate warmup")
    cutoff_len: int = Field(256, gt=0, description="tokens per training example (LLM-Adapters cutoff_len)")
    train_on_inputs: bool = Field(True, description="also train on the prompt tokens (LLM-Adapters default)")
    tokenize: Literal["split", "joint"] = Field(
        "split",
        description="how a record becomes training tokens: 'split' tokenizes the prompt alone, as evaluation does, "
        "then the response, so the model is trained on exactly the prompt tokens it is later given; 'joint' "
        "tokenizes prompt + response as one text, as LLM-Adapters does, where a token can merge across the boundary "
        "(a byte-level BPE tokenizer, e.g. SmolLM2's, then never trains on the evaluation prompt's last token)",
    )
    max_train_samples: int | None = Field(None, gt=0, description="cap on training records")
    val_size: int = Field(1000, ge=1, description="records held out of training for the search stage")
    log_every: int = Field(10, gt=0, description="steps between loss-log rows")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast precision of the forward pass; the adapter and optimizer state stay float32"
    )
    # How training runs, not what it computes (TrainConfig.RUNTIME): out of the stage's digest, so changing one
    # resumes from the last checkpoint instead of re-training.
    processes: int = Field(1, gt=0, description="training processes on this machine (one per GPU; on CPU, gloo)")
    accelerate_config: str | None = Field(
        None,
        description="an `accelerate config` file: FSDP, DeepSpeed ZeRO, several machines; its process count "
        "per machine is `processes`",
    )
    gradient_checkpointing: bool = Field(False, description="recompute the base's activations (non-reentrant)")
    checkpoint_every: int | None = Field(
        None, gt=0, description="steps between resumable checkpoints (None: only when stopped by SIGTERM/Ctrl-C)"
    )
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept (the newest)")

    RUNTIME: ClassVar[frozenset[str]] = frozenset(
        {"processes", "accelerate_config", "gradient_checkpointing", "checkpoint_every", "keep_checkpoints"}
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if not self.groups:
            raise ValueError("train.groups is empty: list the elastic groups or set train.search_space_file")
        for g in self.groups:
            if g.choices[0] != self.rank:
                raise ValueError(f"group '{g.name}': the first choice {g.choices[0]} must equal train.rank={self.rank}")
            stray = [m for m in g.modules if m not in self.target_modules]
            if stray:
                raise ValueError(
                    f"group '{g.name}': modules {stray} are not in train.target_modules {self.target_modules}"
                )
        return self


class GenerationConfig(Strict):
    max_new_tokens: int = Field(256, gt=0, description="tokens generated per answer at most")
    num_beams: int = Field(1, gt=0, description="1: greedy; 4: the LLM-Adapters reference")
    batch_size: int = Field(8, gt=0, description="prompts generated together (longest first, left-padded)")


class ClusterConfig(Strict):
    """Where the scoring workers (`search.workers`, `evaluate.workers`) run: Ray, joined or started locally."""

    address: str | None = Field(
        None,
        description="a Ray cluster to join: 'host:6379' as `ray start --head` prints it, or 'auto'; None: a local "
        "one is started for the stage and stopped after it (only when workers > 1)",
    )
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker holds; also its torch threads")
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs each worker holds (None: 1 when `device` is CUDA, or 'auto' on a GPU cluster)"
    )
    retries: int = Field(2, ge=0, description="times an item is handed to a new worker after its worker died")


WORKERS_DESCRIPTION = (
    "resident scoring workers (each loads the model once): 1 scores in the stage's own process, more (or a "
    "cluster.address) on Ray; the results are the same for any number"
)


class EvaluateConfig(Strict):
    subnet: Literal["heuristic", "maximal", "minimal"] = Field(
        "heuristic", description="subnet of the super-adapter to evaluate"
    )
    baselines: list[Literal["dense", "pruned"]] = Field([], description="also score these base models without adapter")
    datasets: list[str] = Field(
        min_length=1,
        description="evaluation sets (names from nlsflow.data.datasets.EVAL_DATASETS, checked when the config loads)",
    )
    outside_average: list[str] = Field(
        [],
        description="test sets scored and reported but left out of the average, its interval and the paired "
        "differences (commonsense: HellaSwag, whose offline file is a 36-record subset with no training split)",
    )
    max_samples: int | None = Field(None, gt=0, description="records per dataset (None: all)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    workers: int = Field(1, gt=0, description=WORKERS_DESCRIPTION)

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"workers"})

    @model_validator(mode="after")
    def _averaged_sets(self) -> EvaluateConfig:
        if not self.averaged:
            raise ValueError("outside_average lists every test set; leave at least one of evaluate.datasets out of it")
        return self

    @property
    def averaged(self) -> list[str]:
        """The test sets the average (and every paired difference) is taken over."""
        return [d for d in self.datasets if d not in self.outside_average]


class SearchConfig(Strict):
    algorithm: Literal["nsga2"] = Field("nsga2", description="pymoo's NSGA-II (the only one)")
    population: int = Field(5, gt=1, description="subnets per NSGA-II generation")
    num_evals: int = Field(200, gt=1, description="distinct subnets to evaluate (at most the size of the space)")
    cost: Literal["params", "macs"] = Field(
        "params", description="second objective: adapter parameters or MACs per token"
    )
    val_samples: int | None = Field(None, gt=0, description="validation records per evaluation (None: all held out)")
    objective: Literal["generated", "cloze"] = Field(
        "generated",
        description="what a subnet's validation accuracy counts: its generated answers (reference rules), or "
        "lm-eval's zero-shot cloze, which generates nothing (multiple-choice tasks only)",
    )
    ref_acc: float | None = Field(None, description="reference accuracy (None: the heuristic subnet's)")
    acc_delta: float = Field(0.01, ge=0, description="chosen: lowest cost with accuracy >= ref_acc - acc_delta")
    rule: Literal["min_cost_within_delta", "max_accuracy", "max_accuracy_within_budget"] = Field(
        "min_cost_within_delta",
        description="how the chosen subnet is picked: the seeds' rule (lowest cost within "
        "acc_delta of ref_acc), the most accurate, or the most accurate within cost_budget",
    )
    cost_budget: float | None = Field(
        None,
        gt=0,
        le=1,
        description="max_accuracy_within_budget: the largest cost, as a fraction of the maximal subnet's",
    )

    @model_validator(mode="after")
    def _budget(self) -> SearchConfig:
        if (self.rule == "max_accuracy_within_budget") != (self.cost_budget is not None):
            raise ValueError("search.cost_budget goes with search.rule=max_accuracy_within_budget (and only with it)")
        return self

    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    workers: int = Field(1, gt=0, description=WORKERS_DESCRIPTION)

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"workers"})


class ExtractConfig(Strict):
    subnet: Literal["searched", "heuristic", "maximal", "minimal"] | dict[str, int] = Field(
        "searched",
        description="which subnet to extract: a named one, or a mapping variable -> choice (as search/chosen.json)",
    )
    merge: bool = Field(True, description="also write the adapter merged into the base at extract/merged/")
    evaluate: bool = Field(True, description="score the extracted model on the test sets (evaluate's settings)")
    # float32 kernels round differently with data alignment and shapes (a sliced factor vs a stored one); a large
    # adapter effect (NOLA's: ~0.9 on the tiny Llama's logits) carries that noise up to ~1.4e-4, while a wrong rank,
    # scaling or mask moves the logits by the adapter's effect (0.3 for one variable there)
    tolerance: float = Field(
        1e-3, gt=0, description="max |logit| difference, extracted vs super-network (checked in float32)"
    )
    merge_tolerance: float = Field(1e-3, gt=0, description="max |logit| difference, merged vs super-network (float32)")


class BenchmarkConfig(Strict):
    prompt_len: int = Field(128, gt=0, description="prompt tokens (seeded random ids, the same for every variant)")
    new_tokens: int = Field(32, ge=2, description="greedy tokens per pass; the first comes from prefill")
    batch_sizes: list[int] = Field([1, 8], min_length=1, description="each variant is timed at every batch size")
    warmup: int = Field(1, ge=0, description="untimed passes first")
    repeats: int = Field(3, gt=0, description="timed passes; tables give the median and ± half the range")
    super_adapter: bool = Field(True, description="also measure the super-adapter, unmerged, at evaluate.subnet")
    openvino: list[Literal["fp32", "int8", "int4"]] = Field(
        ["fp32", "int8", "int4"],
        description="OpenVINO exports of the deployable model (NNCF weight compression), on CPU",
    )
    int4_group_size: int = Field(64, gt=0, description="NNCF INT4 group size")
    int4_ratio: float = Field(1.0, gt=0, le=1, description="share of weights in INT4 (the rest INT8)")
    openvino_accuracy: bool = Field(True, description="score the OpenVINO exports on evaluate's test sets (greedy)")
    semi_structured: bool = Field(True, description="on CUDA, time N:M-pruned models with PyTorch's 2:4 sparse kernels")

    @field_validator("batch_sizes")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 1:
            raise ValueError(f"batch_sizes {v}: give distinct positive sizes, e.g. [1, 8]")
        return v


class PipelineConfig(Strict):
    task: Literal["math", "commonsense"] = Field(description="task family: training data and evaluation sets")
    profile: str = Field(description="profile name, for humans and the default run folder")
    method: MethodConfig = Field(
        default_factory=ShearsMethod,
        description="the method and its own settings: `shears`, or a mapping such as {name: nola, num_basis_a: 64} "
        f"(names: {', '.join(METHOD_NAMES)}); configs/methods/<name>.yaml sets it with the prune settings it needs",
    )
    run_dir: str = Field(description="where every stage writes <run_dir>/<stage>/")
    data: DataConfig
    seed: int = Field(0, description="seed of the validation split, the training order and sampling, and the search")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the models are loaded and run in"
    )
    num_threads: int | None = Field(None, description="torch CPU threads (None: torch's default)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    train: TrainConfig
    evaluate: EvaluateConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _named(cls, v: Any) -> Any:
        """`method: nola` is short for `method: {name: nola}`."""
        return {"name": v} if isinstance(v, str) else v

    @field_validator("run_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        """Relative paths mean relative to where the command runs; stages may run elsewhere, so resolve once."""
        return str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _unique_group_names(self) -> PipelineConfig:
        names = [g.name for g in (*self.train.groups, *getattr(self.method, "width_groups", []))]
        if len(set(names)) != len(names):
            raise ValueError(f"group names {names} must be unique across train.groups and method.width_groups")
        return self

    def stage_config(self, stage: str) -> dict[str, Any]:
        """What a stage's result depends on: its config sections plus the shared fields (not paths or threads)."""
        shared = self.model_dump(include={"task", "seed", "device", "dtype", "model"})
        shared["data"] = self.data.model_dump(include={"train_sets", "contamination"})
        return {"shared": shared, **{section: self._digested(section) for section in STAGE_SECTIONS[stage]}}

    def _digested(self, section: str) -> dict[str, Any]:
        """A section's settings that a result depends on (not TrainConfig.RUNTIME's: how it was computed)."""
        value = getattr(self, section)
        return value.model_dump(exclude=set(getattr(value, "RUNTIME", ())))
