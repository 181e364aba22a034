"""The model card extract writes into every folder: a README.md the hub's ModelCard parses, saying what was made."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel

from nlsflow.artifacts import read_manifest, stage_dir
from nlsflow.deploy.card import CardFacts, Folder, build_card, write_card
from schemas.outputs import ContaminationReport, ExtractOutput, PruneOutput, TrainOutput
from tests.conftest import tiny_config

LIBRARIES = {"adapter": "peft", "merged": "transformers", "base": "transformers"}


def _python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S)[1]


@pytest.mark.slow
def test_every_extracted_folder_has_a_card_that_parses_and_says_what_it_is(math_run):
    folder = stage_dir(math_run.run_dir, "extract")
    manifest = read_manifest(folder, "extract")  # verifies the digests: the cards are listed and unchanged
    x = manifest.output
    assert {f"{name}/README.md" for name in x.loads_with} <= {o.path for o in manifest.outputs}
    for name in x.loads_with:
        card = ModelCard.load(folder / name / "README.md")
        data = card.data.to_dict()
        assert data["base_model"] == read_manifest(stage_dir(math_run.run_dir, "prune"), "prune").metrics["base_model"]
        assert {"nlsflow", math_run.method.name, "lora", "pruning"} <= set(data["tags"])
        assert data["library_name"] == LIBRARIES[name] and data["pipeline_tag"] == "text-generation"
        assert data["datasets"] == math_run.data.train_sets
        assert f"Subnet: `{x.subnet_name}`" in card.text
        assert all(f"| {variable} | {choice} |" in card.text for variable, choice in x.subnet.items())
        for test_set, accuracy in x.accuracy.items():  # scored: each set's accuracy with its 95% interval
            low, high = x.accuracy_interval[test_set]
            assert f"| {100 * accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}] |" in card.text
        low, high = x.average_accuracy_interval
        assert f"| {100 * x.average_accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}] |" in card.text
        assert f"make pipeline TASK=math PROFILE=tiny METHOD={math_run.method.name}" in card.text
        diff = x.max_abs_logit_diff if name == "adapter" else x.merged_max_abs_logit_diff
        assert f"measured max |Δlogit| {diff:.3g}" in card.text
        assert "```python" in card.text and "Not scored" not in card.text
    adapter = ModelCard.load(folder / "adapter" / "README.md")
    assert adapter.data.base_model_relation == "adapter"
    assert {r.dataset_type for r in adapter.data.eval_results} == set(x.accuracy)  # model-index: the scored one only
    assert ModelCard.load(folder / "merged" / "README.md").data.eval_results is None
    assert f'PeftModel.from_pretrained(base, "{folder / "adapter"}")' in adapter.text


@pytest.mark.slow
def test_the_cards_load_snippets_load_the_checked_models(math_run):
    """The adapter card's snippet, run as written: the same logits as stock PEFT on the pruned base."""
    folder = stage_dir(math_run.run_dir, "extract")
    scope: dict = {}
    exec(_python_block(ModelCard.load(folder / "adapter" / "README.md").text), scope)
    assert isinstance(scope["model"], PeftModel)
    ids = scope["tokenizer"](["What is 2 plus 3?"], return_tensors="pt")
    merged: dict = {}
    exec(_python_block(ModelCard.load(folder / "merged" / "README.md").text), merged)
    with torch.no_grad():
        diff = (scope["model"](**ids).logits - merged["model"](**ids).logits).abs().max().item()
    assert diff <= math_run.extract.merge_tolerance


CLOZE = {  # as a multiple-choice task's extract scores them (the set names kept: the card does not look at them)
    "accuracy_cloze": {"gsm8k": 0.6, "mawps": 0.7},
    "average_accuracy_cloze": 0.65,
    "accuracy_cloze_interval": {"gsm8k": (0.4, 0.8), "mawps": (0.5, 0.9)},
    "average_accuracy_cloze_interval": (0.5, 0.8),
}


def _facts(tmp_path, evaluate: bool, cloze: bool = False) -> CardFacts:
    cfg = tiny_config(tmp_path, f"extract.evaluate={str(evaluate).lower()}")
    scores = {
        "accuracy": {"gsm8k": 0.25, "mawps": 0.5},
        "accuracy_strict": {"gsm8k": 0.2, "mawps": 0.5},
        "average_accuracy": 0.375,
        "average_accuracy_strict": 0.35,
        "accuracy_interval": {"gsm8k": (0.05, 0.5), "mawps": (0.2, 0.8)},
        "average_accuracy_interval": (0.2, 0.55),
        **(CLOZE if cloze else {}),
    }
    extract = ExtractOutput(
        subnet_name="searched",
        subnet={"layers.0.qkv": 6, "layers.1.mlp": 4},
        deployable="adapter",
        max_abs_logit_diff=2.5e-6,
        loads_with={"adapter": "peft"},
        check_dtype="float32",
        adapter_params=1234,
        base_params=100_000,
        shortcuts=False,
        adapter_bytes=5000,
        **(scores if evaluate else {}),
    )
    return CardFacts(
        cfg=cfg,
        prune=PruneOutput(
            base_model="org/base",
            base_revision="abc123",
            params=100_000,
            nonzero_params=60_000,
            pruned_layers=14,
            sparsity=0.5,
            ppl_dense=10.0,
            ppl_pruned=12.0,
        ),
        train=TrainOutput(
            steps=40,
            final_loss=1.5,
            trainable_params=4000,
            adapter="lora",
            adapter_bytes=16000,
            train_records=300,
            val_records=16,
            search_variables=2,
            width_variables=0,
            train_sets=["gsm8k_train"],
            contamination=ContaminationReport(checked=[], skipped=[], overlaps={}, dropped=0),
        ),
        extract=extract,
        search=None,
        extract_dir="/runs/r/extract",
        train_dir="/runs/r/train",
        folders={
            "adapter": Folder(
                "adapter",
                "adapter",
                "peft",
                base="/runs/r/prune/model",
                tolerance=1e-3,
                max_abs_logit_diff=2.5e-6,
                stats={
                    "params": 101_234,
                    "nonzero_params": 61_234,
                    "macs_per_token": 99_000,
                    "nonzero_macs_per_token": 59_000,
                },
            )
        },
        records={"gsm8k": 20, "mawps": 20} if evaluate else {},
        probe_records=8,
        commands=["make pipeline TASK=math PROFILE=tiny METHOD=shears RUN_DIR=/runs/r"],
    )


@pytest.mark.parametrize("evaluate", [False, True])
def test_card_builder_says_what_was_scored(tmp_path, evaluate):
    path = write_card(build_card(_facts(tmp_path, evaluate), "adapter"), tmp_path / "adapter")
    card = ModelCard.load(path)
    assert card.data.base_model == "org/base" and card.data.base_model_revision == "abc123"
    assert card.data.library_name == "peft" and {"shears", "sparsity", "wanda"} <= set(card.data.tags)
    assert "revision `abc123`" in card.text and "50.0% of the weights of 14 linear layers" in card.text
    assert "| 101,234 | 61,234 | 99,000 | 59,000 |" in card.text
    assert "| layers.0.qkv | 6 |" in card.text and "within 0.001 (measured max |Δlogit| 2.5e-06" in card.text
    assert 'PeftModel.from_pretrained(base, "/runs/r/extract/adapter")' in card.text
    if evaluate:
        assert "| gsm8k | 20 | 25.0 [5.0, 50.0] | 20.0 |" in card.text and "| 40 | 37.5 [20.0, 55.0] |" in card.text
        assert [(r.dataset_type, r.metric_value) for r in card.data.eval_results][:2] == [
            ("gsm8k", 0.25),
            ("gsm8k", 0.2),
        ]
    else:
        assert "Not scored on the test sets: `extract.evaluate` was off." in card.text
        assert card.data.eval_results is None and "[95% interval]" not in card.text


def test_a_multiple_choice_card_gives_the_cloze_beside_the_generated_accuracy(tmp_path):
    card = ModelCard.load(write_card(build_card(_facts(tmp_path, True, cloze=True), "adapter"), tmp_path / "adapter"))
    assert "accuracy % (strict) | accuracy % [95% interval] (lm-eval's cloze) |" in card.text
    assert "| gsm8k | 20 | 25.0 [5.0, 50.0] | 20.0 | 60.0 [40.0, 80.0] |" in card.text
    assert "| 40 | 37.5 [20.0, 55.0] | 35.0 | 65.0 [50.0, 80.0] |" in card.text
    assert "lm-eval's zero-shot cloze generates nothing" in card.text
    assert ("gsm8k", "accuracy (lm-eval's zero-shot cloze)", 0.6) in {
        (r.dataset_type, r.metric_name, r.metric_value) for r in card.data.eval_results
    }
    plain = ModelCard.load(write_card(build_card(_facts(tmp_path, True), "adapter"), tmp_path / "plain"))
    assert "cloze" not in plain.text
