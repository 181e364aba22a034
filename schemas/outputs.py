"""What each stage hands on: one model per stage for its measured outputs (the manifest's `metrics`) and its files.

A stage's `run` returns its output model; the manifest stores it as JSON, and readers get it back typed
(`Manifest.output`, `StageContext.output(stage)`, `nlsflow.artifacts.read_output`). Each model's `files` names the
files and folders the stage writes, relative to its stage folder, so no reader spells a file name itself.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from schemas.base import Strict
from schemas.config import BenchmarkConfig, GenerationConfig

Subnet = dict[str, int]  # search variable -> active choice (rank or width)


class Scores(Strict):
    """A model scored on the task's test sets, under both protocols (nlsflow.evaluation.scoring.evaluate_test_sets)."""

    accuracy: dict[str, float] = Field(description="test set -> accuracy under the LLM-Adapters reference rules")
    accuracy_strict: dict[str, float] = Field(description="test set -> accuracy under the strict rules")
    average_accuracy: float = Field(description="mean of `accuracy` over the test sets in `averaged`")
    average_accuracy_strict: float = Field(description="mean of `accuracy_strict` over the test sets in `averaged`")
    averaged: list[str] | None = Field(
        None, description="the test sets the averages and paired differences span (None: all; evaluate.outside_average)"
    )
    accuracy_interval: dict[str, tuple[float, float]] | None = Field(
        None, description="test set -> 95% bootstrap interval of `accuracy` (nlsflow.evaluation.intervals)"
    )
    average_accuracy_interval: tuple[float, float] | None = Field(
        None, description="95% bootstrap interval of `average_accuracy` (records resampled within each set)"
    )
    accuracy_cloze: dict[str, float] | None = Field(
        None,
        description="multiple choice only: test set -> accuracy by lm-eval's zero-shot cloze (each option's text "
        "after the question, the likeliest taken; acc_norm where lm-eval reports it)",
    )
    average_accuracy_cloze: float | None = Field(None, description="mean of `accuracy_cloze` over `averaged`")
    accuracy_cloze_interval: dict[str, tuple[float, float]] | None = Field(
        None, description="test set -> 95% bootstrap interval of `accuracy_cloze`"
    )
    average_accuracy_cloze_interval: tuple[float, float] | None = Field(
        None, description="95% bootstrap interval of `average_accuracy_cloze`"
    )


# ---- prune


class PruneFiles(Strict):
    model: str = Field("model", description="the pruned base: HF folder (safetensors) with its tokenizer")
    sparsity: str = Field("sparsity.parquet", description="table 'sparsity': zeros per pruned layer")


class PruneOutput(Strict):
    files: ClassVar[PruneFiles] = PruneFiles()

    base_model: str = Field(description="the dense base: a hub id or a local folder (tiny: the built model's cache)")
    base_revision: str | None = Field(description="hub revision of base_model (None: a local folder)")
    params: int = Field(description="parameters of the base model")
    nonzero_params: int = Field(description="non-zero parameters after pruning")
    pruned_layers: int = Field(description="linear layers pruned (or, with sparsity 0, listed)")
    sparsity: float = Field(description="zeros / weights over the pruned layers")
    ppl_dense: float = Field(description="WikiText-2 test perplexity of the dense base")
    ppl_pruned: float = Field(description="WikiText-2 test perplexity after pruning (= ppl_dense with sparsity 0)")


# ---- train


class ContaminationReport(Strict):
    """Training records whose question a registered test set asks (nlsflow.data.datasets.check_contamination)."""

    checked: list[str] = Field(description="registered test sets compared against")
    skipped: list[str] = Field(description="registered test sets not present under data.root, not compared")
    overlaps: dict[str, int] = Field(description="test set -> training records asking one of its questions")
    dropped: int = Field(description="training records dropped (data.contamination=drop)")


class TrainFiles(Strict):
    adapter: str = Field("adapter", description="the super-adapter: PEFT folder (NOLA: coefficients, seed, shapes)")
    search_space: str = Field("search_space.json", description="schemas.files.SearchSpaceFile")
    training_log: str = Field("training_log.parquet", description="table 'training_log'")
    validation: str = Field("validation.parquet", description="table 'records': the held-out slice search scores on")
    heterolora: str = Field("heterolora.json", description="HeteroLoRA: schemas.files.HeteroLoraChoiceFile")
    heterolora_log: str = Field("heterolora_log.parquet", description="HeteroLoRA dynamic: table 'heterolora_log'")


class TrainOutput(Strict):
    files: ClassVar[TrainFiles] = TrainFiles()

    steps: int = Field(description="optimizer steps")
    final_loss: float = Field(description="mean training loss over the last logging interval")
    trainable_params: int = Field(description="parameters trained (HeteroLoRA: of the enabled modules)")
    adapter: str = Field(description="adapter kind saved in files.adapter: 'lora' or 'nola'")
    adapter_bytes: int = Field(description="bytes on disk of files.adapter")
    train_records: int = Field(description="training records used")
    val_records: int = Field(description="records held out for the search stage")
    search_variables: int = Field(description="variables of the search space")
    width_variables: int = Field(description="of which elastic base widths (LoNAS)")
    train_sets: list[str] = Field(description="registered training sets")
    contamination: ContaminationReport = Field(description="the test-question overlap check")
    resumed_from_step: int = Field(0, description="the checkpoint's step this run resumed from (0: from the start)")
    processes: int = Field(1, description="training processes (all machines)")
    heterolora_enabled: int | None = Field(None, description="HeteroLoRA: modules enabled at the end")
    heterolora_candidates: int | None = Field(None, description="HeteroLoRA: candidate modules scored")
    heterolora_reallocations: int | None = Field(None, description="HeteroLoRA dynamic: re-selections made")
    enabled_lora_modules: int | None = Field(None, description="HeteroLoRA: enabled LoRA modules")
    enabled_shortcuts: int | None = Field(None, description="HeteroLoRA: enabled shortcut modules")


# ---- evaluate


class EvaluateFiles(Strict):
    predictions: str = Field("predictions.parquet", description="table 'predictions': every generation, both scores")


class PairedDifference(Strict):
    """One model's accuracy minus another's on the same test records (nlsflow.evaluation.intervals)."""

    difference: float = Field(description="average accuracy of the first minus the second")
    interval: tuple[float, float] = Field(description="its 95% bootstrap interval (records resampled in pairs)")
    per_set: dict[str, float] = Field(description="test set -> the difference on that set")


class EvaluateOutput(Scores):
    """The heuristic (or evaluate.subnet) subnet's scores, plus those of the baselines asked for."""

    files: ClassVar[EvaluateFiles] = EvaluateFiles()

    protocols: list[str] = Field(description="scoring protocols, in the order of accuracy and accuracy_strict")
    subnet_name: str = Field(description="evaluate.subnet: which named subnet was scored")
    subnet: Subnet = Field(description="that subnet: variable -> choice")
    baselines: dict[str, Scores] = Field(description="'dense' / 'pruned' base without adapter -> its scores")
    differences: dict[str, PairedDifference] = Field(
        {},
        description="'<a> - <b>' -> paired difference, for the subnet and the baselines scored ('heuristic - pruned')",
    )
    differences_cloze: dict[str, PairedDifference] = Field(
        {}, description="multiple choice only: `differences` by lm-eval's cloze (Scores.accuracy_cloze)"
    )
    samples: int = Field(description="rows in files.predictions")
    generation: GenerationConfig = Field(description="the generation settings used")
    workers: int = Field(1, description="scoring workers (evaluate.workers); the predictions do not depend on it")

    @property
    def scores(self) -> Scores:
        return Scores.model_validate(self.model_dump(include=set(Scores.model_fields)))


# ---- search


class SearchFiles(Strict):
    evaluations: str = Field("evaluations.parquet", description="table 'evaluations': every subnet scored")
    chosen: str = Field("chosen.json", description="schemas.files.ChosenSubnetFile: the chosen subnet")
    progression: str = Field("search_progression.csv", description="every evaluation in order, as the seeds write")
    progression_plot: str = Field("search_progression.png", description="accuracy by evaluation")
    pareto_plot: str = Field("pareto_front.png", description="accuracy vs cost, named and chosen subnets marked")


class SearchOutput(Strict):
    files: ClassVar[SearchFiles] = SearchFiles()

    evaluations: int = Field(description="distinct subnets evaluated")
    resumed_from_cache: int = Field(description="evaluations read back from a killed or earlier search")
    pareto_size: int = Field(description="subnets on the Pareto front")
    val_samples: int = Field(description="validation records each subnet was scored on")
    ref_acc: float = Field(description="reference accuracy of the choice rule (search.ref_acc or the heuristic's)")
    rule: str = Field(description="search.rule: how the chosen subnet was picked")
    max_cost: float | None = Field(description="cost budget (search.cost_budget x the maximal subnet's cost), if any")
    chosen: Subnet = Field(description="the chosen subnet (also in files.chosen)")
    chosen_accuracy: float = Field(description="validation accuracy of the chosen subnet")
    chosen_cost: int = Field(description="cost of the chosen subnet, in `cost`")
    cost: Literal["params", "macs"] = Field(description="the second objective: adapter parameters or MACs per token")
    heuristic_accuracy: float = Field(description="validation accuracy of the heuristic subnet")
    heuristic_cost: int = Field(description="cost of the heuristic subnet")
    workers: int = Field(1, description="scoring workers (search.workers); the evaluations do not depend on it")


# ---- extract


class ExtractFiles(Strict):
    adapter: str = Field("adapter", description="the sub-adapter in PEFT format (HeteroLoRA: plus its shortcut files)")
    masked_adapter: str = Field(
        "masked_adapter",
        description="Shears, sparsity-preserving: the sub-adapter in PEFT format, which is the trained model only "
        "with the base's mask applied (nlsflow.adapters.masking.make_sparsity_preserving); merged/ deploys",
    )
    base: str = Field("base", description="LoNAS: the narrowed base the adapter belongs to")
    merged: str = Field("merged", description="extract.merge: the adapter merged into the base (HF folder)")
    nola: str = Field("nola", description="NOLA: the compact form (coefficients, seed, shapes, subnet.json)")
    predictions: str = Field("predictions.parquet", description="extract.evaluate: table 'predictions'")


class ExtractOutput(Strict):
    files: ClassVar[ExtractFiles] = ExtractFiles()

    subnet_name: str = Field(description="extract.subnet: 'searched', a named subnet, or 'given'")
    subnet: Subnet = Field(description="the extracted subnet: variable -> choice")
    deployable: str = Field(
        description="the folder under extract/ that deploys and is scored: 'adapter', or 'merged' where the adapter "
        "alone is not the trained model (Shears' masked adapter)"
    )
    max_abs_logit_diff: float = Field(description="max |logit difference|, sub-adapter vs super-network subnet")
    loads_with: dict[str, str] = Field(
        description="every folder written under extract/ -> what loading it as the checked model takes: 'peft' / "
        "'transformers' alone, or what else (Shears' mask, HeteroLoRA's shortcuts, NOLA's expansion)"
    )
    nola_max_abs_logit_diff: float | None = Field(
        None, description="NOLA: its compact form (files.nola) expanded vs super-network subnet"
    )
    check_dtype: str = Field(description="dtype the equivalence checks ran in")
    adapter_params: int = Field(description="parameters of the sub-adapter (with HeteroLoRA shortcuts)")
    base_params: int = Field(description="parameters of the base the sub-adapter goes on (LoNAS: narrowed)")
    shortcuts: bool = Field(description="HeteroLoRA shortcut modules travel with the adapter")
    mlp_widths: list[int] | None = Field(None, description="LoNAS: MLP width of every layer of the narrowed base")
    adapter_bytes: int = Field(description="bytes on disk of the sub-adapter (files.adapter, or files.masked_adapter)")
    nola_bytes: int | None = Field(None, description="NOLA: bytes on disk of the compact form, files.nola")
    merged_max_abs_logit_diff: float | None = Field(None, description="extract.merge: merged model vs super-network")
    merged_sparsity: float | None = Field(None, description="extract.merge: zeros / weights of the merged linears")
    merged_params: int | None = Field(None, description="extract.merge: parameters of the merged model")
    accuracy: dict[str, float] | None = Field(None, description="extract.evaluate: Scores.accuracy")
    accuracy_strict: dict[str, float] | None = Field(None, description="extract.evaluate: Scores.accuracy_strict")
    average_accuracy: float | None = Field(None, description="extract.evaluate: Scores.average_accuracy")
    average_accuracy_strict: float | None = Field(None, description="extract.evaluate: Scores.average_accuracy_strict")
    averaged: list[str] | None = Field(None, description="extract.evaluate: Scores.averaged")
    accuracy_interval: dict[str, tuple[float, float]] | None = Field(
        None, description="extract.evaluate: Scores.accuracy_interval"
    )
    average_accuracy_interval: tuple[float, float] | None = Field(
        None, description="extract.evaluate: Scores.average_accuracy_interval"
    )
    accuracy_cloze: dict[str, float] | None = Field(None, description="extract.evaluate: Scores.accuracy_cloze")
    average_accuracy_cloze: float | None = Field(None, description="extract.evaluate: Scores.average_accuracy_cloze")
    accuracy_cloze_interval: dict[str, tuple[float, float]] | None = Field(
        None, description="extract.evaluate: Scores.accuracy_cloze_interval"
    )
    average_accuracy_cloze_interval: tuple[float, float] | None = Field(
        None, description="extract.evaluate: Scores.average_accuracy_cloze_interval"
    )

    @property
    def scores(self) -> Scores | None:
        """The extracted model's test-set scores, or None when extract.evaluate was off."""
        if self.accuracy is None:
            return None
        return Scores.model_validate(self.model_dump(include=set(Scores.model_fields)))


# ---- benchmark


class BenchmarkRow(Strict):
    """One variant at one batch size: a row of files.results (table 'results')."""

    model: str = Field(description="variant: dense, pruned, super_adapter, extracted_merged, ... (@runtime/kernels)")
    runtime: str = Field(description="'pytorch' or 'openvino'")
    weights: str = Field(description="weight format, e.g. float32, int8")
    batch_size: int = Field(description="sequences per pass")
    params: int = Field(description="parameters")
    nonzero_params: int = Field(description="non-zero parameters")
    macs_per_token: int = Field(description="multiply-accumulates per token of the linear layers")
    nonzero_macs_per_token: int = Field(description="of which with a non-zero weight")
    prefill_ms: float = Field(description="prompt pass, median over repeats")
    prefill_ms_spread: float = Field(description="half the range of prefill_ms")
    decode_ms_per_token: float = Field(description="per generated token, median")
    decode_ms_per_token_spread: float = Field(description="half the range of decode_ms_per_token")
    tokens_per_s: float = Field(description="generated tokens per second end to end, median")
    tokens_per_s_spread: float = Field(description="half the range of tokens_per_s")
    speedup: float | None = Field(description="tokens_per_s over the reference's at this batch size (None: none)")
    peak_memory_mb: float = Field(description="peak memory of the measuring process (CUDA: allocated)")
    size_on_disk_mb: float | None = Field(description="model (+ adapter) folder size (None: a hub id)")
    accuracy: float | None = Field(description="average test-set accuracy, where an earlier stage scored it")
    accuracy_strict: float | None = Field(description="average strict accuracy, likewise")
    note: str = Field(description="what to know when reading the row")


class BenchmarkFiles(Strict):
    results: str = Field("results.parquet", description="table 'results': every variant at every batch size")
    results_markdown: str = Field("results.md", description="the results as a markdown table")
    throughput_plot: str = Field("throughput_vs_macs.png", description="tokens/s vs MACs per token")
    accuracy_plot: str = Field("accuracy_vs_macs.png", description="accuracy vs MACs per token")
    openvino: str = Field("openvino", description="the OpenVINO exports, one folder per weight format")
    predictions: str = Field("predictions.parquet", description="the OpenVINO exports' test-set predictions")


class BenchmarkOutput(Strict):
    files: ClassVar[BenchmarkFiles] = BenchmarkFiles()

    results: dict[str, BenchmarkRow] = Field(description="variant -> its row at the first batch size")
    results_by_batch: dict[str, dict[str, BenchmarkRow]] = Field(description="batch size -> variant -> row")
    openvino: str = Field(description="what became of the OpenVINO exports: measured, skipped (why) or off")
    semi_structured: str = Field(description="what became of the 2:4 sparse kernels: measured, skipped (why) or off")
    differences: dict[str, PairedDifference] = Field(
        {},
        description="extract.evaluate: '<a> - <b>' -> paired difference on the same test records: the extracted "
        "model against each model the evaluate stage scored (the super-network at its subnet, the bases), and each "
        "scored OpenVINO export against the extracted model",
    )
    differences_cloze: dict[str, PairedDifference] = Field(
        {}, description="multiple choice only: `differences` by lm-eval's cloze, for the pairs both were scored by"
    )
    settings: BenchmarkConfig = Field(description="the benchmark settings used")


StageOutput = PruneOutput | TrainOutput | EvaluateOutput | SearchOutput | ExtractOutput | BenchmarkOutput

STAGE_OUTPUTS: dict[str, type[BaseModel]] = {
    "prune": PruneOutput,
    "train": TrainOutput,
    "evaluate": EvaluateOutput,
    "search": SearchOutput,
    "extract": ExtractOutput,
    "benchmark": BenchmarkOutput,
}
