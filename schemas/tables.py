"""Parquet tables exchanged between stages: fixed Arrow schemas, the schema version in the file's metadata."""

from __future__ import annotations

import pyarrow as pa

TABLE_VERSION = "1"

# one row per method (flows.compare): sizes, costs, the extracted model's average accuracy with its 95% interval, and
# against plain LoRA on the same records: the paired difference, its interval and the retention (% of LoRA)
COMPARISON = [
    ("method", pa.string()),
    ("trainable_params", pa.int64()),
    ("train_adapter_bytes", pa.int64()),
    ("adapter_bytes", pa.int64()),
    ("compact_bytes", pa.int64()),
    ("params", pa.int64()),
    ("nonzero_params", pa.int64()),
    ("macs_per_token", pa.int64()),
    ("nonzero_macs_per_token", pa.int64()),
    ("accuracy", pa.float64()),
    ("accuracy_low", pa.float64()),
    ("accuracy_high", pa.float64()),
    ("accuracy_strict", pa.float64()),
    ("delta_vs_lora", pa.float64()),
    ("delta_low", pa.float64()),
    ("delta_high", pa.float64()),
    ("retention", pa.float64()),
    # the same by lm-eval's zero-shot cloze (multiple-choice tasks; null elsewhere)
    ("accuracy_cloze", pa.float64()),
    ("accuracy_cloze_low", pa.float64()),
    ("accuracy_cloze_high", pa.float64()),
    ("delta_cloze_vs_lora", pa.float64()),
    ("delta_cloze_low", pa.float64()),
    ("delta_cloze_high", pa.float64()),
    ("retention_cloze", pa.float64()),
    ("train_seconds", pa.float64()),
]

TABLES: dict[str, pa.Schema] = {
    "sparsity": pa.schema(
        [
            ("layer", pa.string()),
            ("in_features", pa.int64()),
            ("out_features", pa.int64()),
            ("zeros", pa.int64()),
            ("sparsity", pa.float64()),
        ]
    ),
    "training_log": pa.schema(
        [
            ("step", pa.int64()),
            ("epoch", pa.float64()),
            ("loss", pa.float64()),
            ("learning_rate", pa.float64()),
            ("active_config", pa.string()),
        ]
    ),
    "heterolora_log": pa.schema(
        [
            ("step", pa.int64()),
            ("epoch", pa.float64()),
            ("enabled", pa.int64()),
            ("turned_on", pa.string()),
            ("turned_off", pa.string()),
            ("scores", pa.string()),
        ]
    ),
    "records": pa.schema(
        [
            ("source", pa.string()),
            ("instruction", pa.string()),
            ("input", pa.string()),
            ("output", pa.string()),
            ("answer", pa.string()),
        ]
    ),
    "predictions": pa.schema(
        [
            ("model", pa.string()),
            ("task", pa.string()),
            ("index", pa.int64()),
            ("prompt", pa.string()),
            ("generation", pa.string()),
            ("label", pa.string()),
            ("prediction", pa.string()),
            ("correct", pa.bool_()),
            ("strict_prediction", pa.string()),
            ("strict_correct", pa.bool_()),
            ("cloze_prediction", pa.string()),  # multiple choice only: lm-eval's zero-shot cloze (null elsewhere)
            ("cloze_correct", pa.bool_()),
        ]
    ),
    "evaluations": pa.schema(
        [
            ("eval_id", pa.int64()),
            ("config", pa.string()),
            ("accuracy", pa.float64()),
            ("params", pa.int64()),
            ("macs", pa.int64()),
            ("pareto", pa.bool_()),
            ("label", pa.string()),
            ("seconds", pa.float64()),
        ]
    ),
    "search_cache": pa.schema(
        [
            ("eval_id", pa.int64()),
            ("config", pa.string()),
            ("accuracy", pa.float64()),
            ("cost", pa.int64()),
            ("seconds", pa.float64()),
        ]
    ),
    "results": pa.schema(
        [
            ("model", pa.string()),
            ("runtime", pa.string()),
            ("weights", pa.string()),
            ("batch_size", pa.int64()),
            ("params", pa.int64()),
            ("nonzero_params", pa.int64()),
            ("macs_per_token", pa.int64()),
            ("nonzero_macs_per_token", pa.int64()),
            ("prefill_ms", pa.float64()),
            ("prefill_ms_spread", pa.float64()),
            ("decode_ms_per_token", pa.float64()),
            ("decode_ms_per_token_spread", pa.float64()),
            ("tokens_per_s", pa.float64()),
            ("tokens_per_s_spread", pa.float64()),
            ("speedup", pa.float64()),
            ("peak_memory_mb", pa.float64()),
            ("size_on_disk_mb", pa.float64()),
            ("accuracy", pa.float64()),
            ("accuracy_strict", pa.float64()),
            ("note", pa.string()),
        ]
    ),
    "comparison": pa.schema(COMPARISON),
    # the study's table (flows.study): the comparison's columns and each test set's accuracy
    "study": pa.schema(
        [
            *COMPARISON,
            ("accuracy_by_task", pa.map_(pa.string(), pa.float64())),
            ("accuracy_cloze_by_task", pa.map_(pa.string(), pa.float64())),
            # a row against another of the table, paired on the same records: a pruned base against the dense base,
            # a heuristic subnet against the subnet its method deploys
            ("reference", pa.string()),
            *[(f"delta{s}_vs_reference{end}", pa.float64()) for s in ("", "_cloze") for end in ("", "_low", "_high")],
        ]
    ),
    "bench": pa.schema(
        [
            ("comparison", pa.string()),
            ("ours", pa.string()),
            ("peer", pa.string()),
            ("metric", pa.string()),
            ("unit", pa.string()),
            ("ours_median", pa.float64()),
            ("ours_spread", pa.float64()),
            ("peer_median", pa.float64()),
            ("peer_spread", pa.float64()),
            ("ratio", pa.float64()),
            ("target", pa.string()),
            ("target_met", pa.bool_()),
            ("repeats", pa.int64()),
            ("profile", pa.string()),
            ("note", pa.string()),
        ]
    ),
}
