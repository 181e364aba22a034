"""Configs, manifests and tables: every shipped config loads, overrides apply, bad files fail with one line."""

from __future__ import annotations

import json
from itertools import product

import pytest
from conftest import REPO

from nlsflow.artifacts import list_outputs, read_manifest, read_table, write_manifest, write_table
from nlsflow.config import dump_config, load_config
from nlsflow.errors import NlsflowError
from nlsflow.layers import config_files
from schemas import Manifest
from schemas.config import STAGE_INPUTS, STAGE_SECTIONS, STAGES

TASKS = sorted(p for p in (REPO / "configs" / "tasks").glob("*.yaml"))
PROFILES = sorted(p for p in (REPO / "configs" / "profiles").glob("*.yaml") if "." not in p.stem)


METHODS = sorted((REPO / "configs" / "methods").glob("*.yaml"))


def layered(task, profile, method) -> list:
    return config_files(task.stem, profile.stem, method.stem)


def test_layers_name_the_files_in_order():
    names = [f"{p.parent.name}/{p.name}" for p in config_files("commonsense", "llama7b", "lonas")]
    assert names == [
        "tasks/commonsense.yaml",
        "profiles/llama7b.yaml",
        "profiles/llama7b.commonsense.yaml",
        "methods/lonas.yaml",
        "profiles/llama7b.lonas.yaml",
        "profiles/llama7b.lonas.commonsense.yaml",
    ]
    with pytest.raises(
        NlsflowError, match=r"unknown method 'qlora'.*choose from \['heterolora', 'lonas', 'lora', 'nola', 'shears'\]"
    ):
        config_files("math", "tiny", "qlora")


def test_every_profile_file_is_shipped_for_a_known_profile_task_and_method():
    for path in (REPO / "configs" / "profiles").glob("*.*.yaml"):
        profile, *rest = path.stem.split(".")
        known = (
            [{t.stem for t in TASKS}]
            if len(rest) == 1 and rest[0] not in {m.stem for m in METHODS}
            else [{m.stem for m in METHODS}, {t.stem for t in TASKS}][: len(rest)]
        )
        assert (path.parent / f"{profile}.yaml").is_file() and all(r in k for r, k in zip(rest, known)), path


@pytest.mark.parametrize("task,profile,method", list(product(TASKS, PROFILES, METHODS)), ids=lambda p: p.stem)
def test_every_shipped_config_loads(task, profile, method):
    cfg = load_config(layered(task, profile, method), ["run_dir=runs/x"])
    assert cfg.task == task.stem and cfg.profile == profile.stem and cfg.method.name == method.stem
    for stage in STAGES:
        assert set(cfg.stage_config(stage)) == {"shared", *STAGE_SECTIONS[stage]} and stage in STAGE_SECTIONS[stage]


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(
        [TASKS[0], PROFILES[0]],
        [
            "run_dir=x",
            "prune.sparsity=0.6",
            "train.target_modules=[q_proj, k_proj, v_proj, up_proj, down_proj, o_proj]",
            "search.cost=macs",
        ],
    )
    assert cfg.prune.sparsity == 0.6 and cfg.train.target_modules[-1] == "o_proj" and cfg.search.cost == "macs"
    # The dumped config reloads to the same thing (the flow hands stages this file).
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config([tmp_path / "c.yaml"]) == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("prune.sparsty=0.5", "unknown key 'prune.sparsty'"),
        ("prune.sparsity=1.5", "prune.sparsity: Input should be less than 1"),
        ("prune.structure=2:3:4", "structure must be 'unstructured' or 'N:M'"),
        ("prune.structure=2:4", "structure 2:4 zeroes 2/4 of the weights; set prune.sparsity=0.5"),
        ("train.micro_batch_size=3", "must be a multiple of micro_batch_size"),
        ("sparsity", "is not key=value"),
        (  # TASKS[0] is commonsense
            "evaluate.outside_average=[boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, "
            "openbookqa]",
            "leave at least one of evaluate.datasets out of it",
        ),
        ("evaluate.outside_average=[hellaswg]", "evaluate.outside_average: unknown datasets ['hellaswg']"),
    ],
)
def test_bad_config_is_one_clear_line(override, message):
    extra = ["prune.sparsity=0.3"] if override == "prune.structure=2:4" else []
    with pytest.raises(NlsflowError) as err:
        load_config([TASKS[0], PROFILES[0]], ["run_dir=x", *extra, override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(NlsflowError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    (tmp_path / "bad.yaml").write_text("task: [unclosed")
    with pytest.raises(NlsflowError, match="not valid YAML"):
        load_config([tmp_path / "bad.yaml"])


def test_stage_inputs_form_a_dag_in_stage_order():
    for i, stage in enumerate(STAGES):
        assert all(STAGES.index(up) < i for up in STAGE_INPUTS[stage])


PRUNE_METRICS = {
    "base_model": "tiny",
    "base_revision": None,
    "params": 10,
    "nonzero_params": 5,
    "pruned_layers": 2,
    "sparsity": 0.5,
    "ppl_dense": 10.0,
    "ppl_pruned": 12.5,
}


def _manifest(folder, **kw):
    (folder / "data.bin").write_bytes(b"abc")
    return Manifest(
        stage="prune", config={"a": 1}, inputs={}, outputs=list_outputs(folder), metrics=PRUNE_METRICS, **kw
    )


def test_manifest_round_trip_and_fingerprint(tmp_path):
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    loaded = read_manifest(tmp_path, "prune")
    assert loaded == manifest and loaded.fingerprint() == manifest.fingerprint()
    # Timings do not change the identity; outputs do.
    assert manifest.model_copy(update={"duration_s": 9.0}).fingerprint() == manifest.fingerprint()
    assert manifest.model_copy(update={"config": {"a": 2}}).fingerprint() != manifest.fingerprint()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(schema_version=99), "expected nlsflow.manifest v2"),
        (lambda d: d.update(stage="train"), "belongs to stage 'train'"),
        (lambda d: d.update(surprise=1), "unknown key 'surprise'"),
    ],
)
def test_manifest_rejects_wrong_version_stage_and_fields(tmp_path, edit, message):
    write_manifest(tmp_path, _manifest(tmp_path))
    doc = json.loads((tmp_path / "manifest.json").read_text())
    edit(doc)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(NlsflowError, match=message):
        read_manifest(tmp_path, "prune")


def test_manifest_detects_modified_output(tmp_path):
    write_manifest(tmp_path, _manifest(tmp_path))
    (tmp_path / "data.bin").write_bytes(b"abd")
    with pytest.raises(NlsflowError, match="does not match its sha256"):
        read_manifest(tmp_path, "prune")
    (tmp_path / "data.bin").unlink()
    with pytest.raises(NlsflowError, match="is missing"):
        read_manifest(tmp_path, "prune")


def test_table_round_trip_and_checks(tmp_path):
    rows = [{"layer": "model.layers.0.mlp.up_proj", "in_features": 4, "out_features": 2, "zeros": 4, "sparsity": 0.5}]
    write_table(tmp_path / "s.parquet", "sparsity", rows)
    assert read_table(tmp_path / "s.parquet", "sparsity").to_pylist() == rows
    with pytest.raises(NlsflowError, match="expected 'predictions'"):
        read_table(tmp_path / "s.parquet", "predictions")
    with pytest.raises(ValueError, match="do not fit its schema"):
        write_table(tmp_path / "t.parquet", "sparsity", [{"layer": "x", "zeros": "many"}])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(NlsflowError, match="not a readable Parquet"):
        read_table(tmp_path / "junk.parquet", "sparsity")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.parquet", "s.parquet"]  # no temp files left behind


@pytest.mark.parametrize(
    "target, expected",
    [
        (
            "pipeline",
            "-m flows.pipeline --runner local --task commonsense --profile tiny --method lonas "
            "run_dir=runs/commonsense-tiny-lonas",
        ),
        (
            "stage-search",
            "-m stages.search --config configs/tasks/commonsense.yaml --config configs/profiles/tiny.yaml "
            "--config configs/methods/lonas.yaml --config configs/profiles/tiny.lonas.yaml "
            "run_dir=runs/commonsense-tiny-lonas",
        ),
    ],
)
def test_make_targets_pass_the_layered_configs(target, expected):
    import subprocess

    out = subprocess.run(
        ["make", "-n", "-o", "venv", "-o", ".venv/.installed", target, "TASK=commonsense", "METHOD=lonas"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert expected in out
