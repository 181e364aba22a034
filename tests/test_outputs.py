"""Typed stage outputs and JSON files: every stage's manifest validates as its output model, files are where the
models say, and an old or malformed manifest or JSON file is refused with one line naming the stage to re-run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel
from transformers import LlamaConfig, LlamaForCausalLM

from nlsflow.adapters.elastic import ElasticGroup, Variable
from nlsflow.adapters.nola import CONFIG_FILE, NolaSpec, make_nola, read_nola, save_nola
from nlsflow.adapters.supernet import load_search_space_groups, save_search_space
from nlsflow.adapters.width import WidthGroup
from nlsflow.artifacts import (
    list_outputs,
    read_json,
    read_manifest,
    read_output,
    rerun_reason,
    stage_dir,
    write_json,
    write_manifest,
)
from nlsflow.errors import NlsflowError
from schemas import STAGES, Manifest
from schemas.files import ChosenSubnetFile, HeteroLoraChoiceFile, NolaConfigFile, SearchSpaceFile
from schemas.outputs import STAGE_OUTPUTS, ExtractOutput, PruneOutput, Scores, TrainOutput
from stages._common import run_stage

PRUNE = {
    "base_model": "tiny",
    "base_revision": None,
    "params": 353088,
    "nonzero_params": 180000,
    "pruned_layers": 14,
    "sparsity": 0.5,
    "ppl_dense": 2115.5,
    "ppl_pruned": 2120.1,
}
CONTAMINATION = {"checked": ["gsm8k_test"], "skipped": [], "overlaps": {"gsm8k_test": 2}, "dropped": 2}
SCORES = {
    "accuracy": {"gsm8k": 0.25, "SVAMP": 0.5},
    "accuracy_strict": {"gsm8k": 0.25, "SVAMP": 0.0},
    "average_accuracy": 0.375,
    "average_accuracy_strict": 0.125,
}
# The dicts stages/train.py and stages/extract.py return today (plain, HeteroLoRA, LoNAS, NOLA, no merge/evaluate).
TRAIN = {
    "steps": 200,
    "final_loss": 7.37,
    "trainable_params": 4544,
    "adapter": "lora",
    "adapter_bytes": 20157,
    "train_records": 1600,
    "val_records": 32,
    "search_variables": 6,
    "width_variables": 0,
    "train_sets": ["gsm8k_train", "mawps_train"],
    "contamination": CONTAMINATION,
}
HETEROLORA = {
    "heterolora_enabled": 3,
    "heterolora_candidates": 12,
    "heterolora_reallocations": 5,
    "enabled_lora_modules": 3,
    "enabled_shortcuts": 0,
}
EXTRACT = {
    "subnet_name": "searched",
    "subnet": {"layers.0.qkv": 4, "layers.1.qkv": 6},
    "deployable": "merged",
    "max_abs_logit_diff": 0.0,
    "check_dtype": "float32",
    "adapter_params": 2272,
    "base_params": 353088,
    "shortcuts": False,
    "adapter_bytes": 11369,
    "loads_with": {"masked_adapter": "peft + the base's mask", "merged": "transformers"},
}
MERGED = {"merged_max_abs_logit_diff": 8.8e-07, "merged_sparsity": 0.5, "merged_params": 353088}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


OWN_MODULES = ("schemas.outputs", "schemas.files")  # the config models a field may reuse are checked with the configs


def _descriptions_missing(model: type[BaseModel], seen=None) -> list[str]:
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    missing = [f"{model.__name__}.{name}" for name, f in model.model_fields.items() if not f.description]
    for f in model.model_fields.values():
        for arg in (f.annotation, *getattr(f.annotation, "__args__", ())):
            for inner in (arg, *getattr(arg, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner.__module__ in OWN_MODULES:
                    missing += _descriptions_missing(inner, seen)
    return missing


def test_every_stage_has_an_output_model_with_described_fields_and_files():
    assert tuple(STAGE_OUTPUTS) == STAGES
    for model in STAGE_OUTPUTS.values():
        assert model.model_config["extra"] == "forbid" and model.model_config["frozen"]
        assert not _descriptions_missing(model) and not _descriptions_missing(type(model.files))
    for model in (SearchSpaceFile, HeteroLoraChoiceFile, NolaConfigFile):
        assert not _descriptions_missing(model)


@pytest.mark.parametrize(
    "metrics",
    [TRAIN, {**TRAIN, **HETEROLORA}, {**TRAIN, "adapter": "nola"}, {**TRAIN, "width_variables": 2}],
    ids=["shears", "heterolora", "nola", "lonas"],
)
def test_train_output_validates_the_train_stage_dicts(metrics):
    out = TrainOutput.model_validate(metrics)
    assert out.contamination.overlaps == {"gsm8k_test": 2}
    assert {k: v for k, v in out.model_dump().items() if k in metrics} == metrics
    assert (out.heterolora_enabled is None) == ("heterolora_enabled" not in metrics)


@pytest.mark.parametrize(
    "metrics",
    [
        {**EXTRACT, **MERGED, **SCORES},
        {**EXTRACT, "mlp_widths": [150, 108], **MERGED, **SCORES},
        {**EXTRACT, "nola_bytes": 4096, **MERGED, **SCORES},
        {**EXTRACT, "deployable": "adapter", "shortcuts": True},
    ],
    ids=["shears", "lonas", "nola", "no-merge-no-evaluate"],
)
def test_extract_output_validates_the_extract_stage_dicts(metrics):
    out = ExtractOutput.model_validate(metrics)
    assert {k: v for k, v in out.model_dump().items() if k in metrics} == metrics
    if "accuracy" in metrics:
        assert out.scores == Scores.model_validate(SCORES)
    else:
        assert out.scores is None and out.merged_sparsity is None


def test_output_models_refuse_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="surprise"):
        TrainOutput.model_validate({**TRAIN, "surprise": 1})
    with pytest.raises(ValueError, match="steps"):
        TrainOutput.model_validate({k: v for k, v in TRAIN.items() if k != "steps"})


def _write_prune_manifest(folder, metrics=PRUNE, **kw) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.bin").write_bytes(b"abc")
    write_manifest(folder, Manifest(stage="prune", config={}, inputs={}, outputs=list_outputs(folder), metrics=metrics))
    if kw:
        doc = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**doc, **kw}))


def test_manifest_output_is_typed(tmp_path):
    _write_prune_manifest(stage_dir(tmp_path, "prune"))
    out = read_output(tmp_path, "prune")
    assert isinstance(out, PruneOutput) and out.sparsity == 0.5 and out.base_revision is None
    assert read_manifest(stage_dir(tmp_path, "prune"), "prune").output == out


def test_version_1_manifest_is_refused_with_one_line_and_is_not_up_to_date(tmp_path):
    _write_prune_manifest(stage_dir(tmp_path, "prune"), schema_version=1)
    with pytest.raises(NlsflowError) as err:
        read_manifest(stage_dir(tmp_path, "prune"), "prune")
    line = _one_line(err)
    assert (
        "v1, expected nlsflow.manifest v2" in line and "re-run the 'prune' stage with this version of nlsflow" in line
    )
    assert "v1, expected nlsflow.manifest v2" in rerun_reason(tmp_path, "prune", tiny_config(tmp_path))


@pytest.mark.parametrize(
    "metrics, message",
    [
        ({**PRUNE, "sparsity": "half"}, "sparsity: Input should be a valid number"),
        ({k: v for k, v in PRUNE.items() if k != "ppl_pruned"}, "missing key 'ppl_pruned'"),
        ({**PRUNE, "surprise": 1}, "unknown key 'surprise'"),
    ],
)
def test_malformed_metrics_are_refused_with_one_line(tmp_path, metrics, message):
    folder = stage_dir(tmp_path, "prune")
    _write_prune_manifest(folder, metrics=metrics)
    with pytest.raises(NlsflowError) as err:
        read_manifest(folder, "prune")
    line = _one_line(err)
    assert message in line and "do not fit the 'prune' stage's outputs" in line and "re-run the 'prune' stage" in line


def test_run_stage_takes_the_output_model_or_a_fitting_dict(tmp_path):
    cfg = tiny_config(tmp_path)

    def returns_model(ctx):
        (ctx.out_dir / PruneOutput.files.sparsity).write_bytes(b"x")
        return PruneOutput.model_validate(PRUNE)

    manifest = run_stage("prune", returns_model, cfg)
    assert manifest.metrics == PruneOutput.model_validate(PRUNE).model_dump(mode="json")
    assert read_output(tmp_path, "prune") == PruneOutput.model_validate(PRUNE)
    assert run_stage("prune", lambda ctx: dict(PRUNE), cfg, force=True).output == manifest.output
    with pytest.raises(NlsflowError) as err:
        run_stage("prune", lambda ctx: {**PRUNE, "ppl": 1.0}, cfg, force=True)
    assert "do not fit PruneOutput" in _one_line(err) and "unknown key 'ppl'" in str(err.value)
    with pytest.raises(TypeError, match="expected PruneOutput"):
        run_stage("prune", lambda ctx: TrainOutput.model_validate(TRAIN), cfg, force=True)
    assert read_output(tmp_path, "prune") == manifest.output  # the failed re-runs left the stage as it was


def _space() -> tuple[list, list, list]:
    groups = [
        ElasticGroup("qkv", ("q_proj", "k_proj", "v_proj"), (8, 6, 4)),
        ElasticGroup("down", ("down_proj",), (8,), False),
    ]
    width = [WidthGroup("gate_up_width", ("gate_proj", "up_proj"), (172, 129, 86))]
    space = [
        Variable("layers.0.qkv", ("model.layers.0.self_attn.q_proj",), (8, 6, 4)),
        Variable("down", ("model.layers.0.mlp.down_proj",), (8,)),
        Variable(
            "layers.0.gate_up_width",
            ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
            (172, 129, 86),
            kind="width",
            consumers=("model.layers.0.mlp.down_proj",),
        ),
    ]
    return groups, width, space


def test_search_space_file_round_trips(tmp_path):
    groups, width, space = _space()
    path = tmp_path / TrainOutput.files.search_space
    save_search_space(path, groups, width, space)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and [v["name"] for v in doc["variables"]] == [v.name for v in space]
    assert doc["subnets"]["maximal"] == {"layers.0.qkv": 8, "down": 8, "layers.0.gate_up_width": 172}
    assert path.read_text() == json.dumps(doc, indent=2)  # the layout written before the model: indented JSON
    assert load_search_space_groups(path) == (groups, width)
    assert read_json(path, SearchSpaceFile, "train") == SearchSpaceFile.model_validate(doc)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("schema_version"), "has schema_version None, expected 1"),
        (lambda d: d["groups"][0].update(choices="many"), "groups.0.choices: Input should be a valid list"),
        (lambda d: d["variables"][0].update(kind="depth"), "variables.0.kind"),
        (lambda d: d.pop("variables"), "missing key 'variables'"),
    ],
)
def test_malformed_or_old_search_space_is_refused_with_one_line(tmp_path, edit, message):
    path = tmp_path / "search_space.json"
    save_search_space(path, *_space())
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(NlsflowError) as err:
        load_search_space_groups(path)
    line = _one_line(err)
    assert message in line and "re-run the 'train' stage" in line
    path.write_text("{not json")
    with pytest.raises(NlsflowError, match="not valid JSON.*re-run the 'train' stage"):
        load_search_space_groups(path)


def test_chosen_subnet_file_round_trips_and_refuses_garbage(tmp_path):
    path = tmp_path / "chosen.json"
    write_json(path, ChosenSubnetFile({"layers.0.qkv": 4, "down": 8}))
    assert path.read_text() == json.dumps({"layers.0.qkv": 4, "down": 8}, indent=2)  # a plain mapping, as before
    assert read_json(path, ChosenSubnetFile, "search").root == {"layers.0.qkv": 4, "down": 8}
    for bad in ('{"layers.0.qkv": "four"}', "[4, 8]"):
        path.write_text(bad)
        with pytest.raises(NlsflowError) as err:
            read_json(path, ChosenSubnetFile, "search")
        assert "is malformed" in _one_line(err) and "re-run the 'search' stage" in str(err.value)
    with pytest.raises(NlsflowError, match="not found; re-run the 'search' stage"):
        read_json(tmp_path / "missing.json", ChosenSubnetFile, "search")


def test_heterolora_choice_file_round_trips(tmp_path):
    doc = HeteroLoraChoiceFile(
        settings={"mode": "dynamic", "proxy": "grad_norm"},
        enabled=["model.layers.0.mlp.up_proj", "shortcut.1"],
        ranks={"model.layers.0.mlp.up_proj": 8, "shortcut.1": 8},
        scores={"model.layers.0.mlp.up_proj": 0.18, "model.layers.1.mlp.up_proj": 0.01, "shortcut.1": 0.09},
    )
    path = tmp_path / TrainOutput.files.heterolora
    write_json(path, doc)
    assert read_json(path, HeteroLoraChoiceFile, "train") == doc
    path.write_text(json.dumps({**doc.model_dump(), "ranks": {"shortcut.1": "high"}}))
    with pytest.raises(NlsflowError, match="ranks.shortcut.1"):
        read_json(path, HeteroLoraChoiceFile, "train")


def test_nola_config_file_round_trips_and_an_old_one_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    spec = NolaSpec(num_basis_a=3, num_basis_b=2, seed=5)
    make_nola(model, spec)
    save_nola(model, spec, tmp_path / "adapter")
    loaded_spec, doc, coefficients = read_nola(tmp_path / "adapter")
    assert loaded_spec == spec and isinstance(doc, NolaConfigFile) and doc.lora_config["r"] == 4
    assert set(doc.shapes) == set(coefficients) and len(doc.shapes) == 2
    path = tmp_path / "adapter" / CONFIG_FILE
    assert json.loads(path.read_text()) == doc.model_dump(mode="json")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "schema_version"}
    path.write_text(json.dumps(old))
    with pytest.raises(NlsflowError) as err:
        read_nola(tmp_path / "adapter")
    assert "schema_version None, expected 1" in _one_line(err) and "re-run the 'train' stage" in str(err.value)


# ---- on the tiny math run (all six stages, once per session)


@pytest.mark.slow
def test_every_stage_manifest_of_a_tiny_run_is_its_output_model(math_run):
    for stage, model in STAGE_OUTPUTS.items():
        manifest = read_manifest(stage_dir(math_run.run_dir, stage), stage)
        out = manifest.output
        assert type(out) is model
        assert manifest.metrics == out.model_dump(mode="json")  # stored exactly as the model dumps it
    evaluate, extract = read_output(math_run.run_dir, "evaluate"), read_output(math_run.run_dir, "extract")
    assert set(evaluate.accuracy) == set(math_run.evaluate.datasets) and extract.scores is not None
    bench = read_output(math_run.run_dir, "benchmark")
    assert bench.results == bench.results_by_batch[str(math_run.benchmark.batch_sizes[0])]


@pytest.mark.slow
def test_the_files_the_output_models_name_are_there(math_run):
    by_method = {("train", "heterolora"), ("train", "heterolora_log"), ("extract", "base"), ("extract", "nola")}
    by_method |= {("extract", "adapter"), ("extract", "masked_adapter")}  # one of them, by method
    for stage, model in STAGE_OUTPUTS.items():
        for name, path in model.files.model_dump().items():
            if (stage, name) not in by_method:
                assert (stage_dir(math_run.run_dir, stage) / path).exists(), (stage, name, path)
    extract_dir, files = stage_dir(math_run.run_dir, "extract"), ExtractOutput.files
    assert (extract_dir / files.adapter).is_dir() != (extract_dir / files.masked_adapter).is_dir()
    train_dir = stage_dir(math_run.run_dir, "train")
    read_json(train_dir / TrainOutput.files.search_space, SearchSpaceFile, "train")
    chosen = read_json(stage_dir(math_run.run_dir, "search") / "chosen.json", ChosenSubnetFile, "search")
    assert chosen.root == read_output(math_run.run_dir, "search").chosen
