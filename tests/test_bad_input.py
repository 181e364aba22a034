"""Bad input fails with one clear line naming the problem and the fix, and leaves no partial artifact behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_CONFIGS, tiny_config, tiny_overrides

from nlsflow.artifacts import read_manifest, stage_dir
from nlsflow.errors import NlsflowError
from stages._common import run_stage


def _stage_cli(stage: str, run_dir, *extra: str) -> subprocess.CompletedProcess:
    configs = [arg for path in TINY_CONFIGS for arg in ("--config", str(path))]
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *configs, *tiny_overrides(run_dir, *extra)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def _leftovers(run_dir) -> list[str]:
    """Temp files or folders of an atomic write (`.name.xxxx.tmp`); the search cache `.cache/` is meant to stay."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_missing_input_manifest(tmp_path):
    line = _error_line(_stage_cli("train", tmp_path))
    assert "missing input manifest" in line and "prune" in line and "run the 'prune' stage first" in line
    assert not (tmp_path / "train").exists() and not _leftovers(tmp_path)


def test_unknown_config_key(tmp_path):
    line = _error_line(_stage_cli("prune", tmp_path, "prune.sparsty=0.5"))
    assert "unknown key 'prune.sparsty'" in line
    assert not (tmp_path / "prune").exists()


@pytest.mark.slow
def test_corrupt_safetensors_is_caught_before_use(math_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    weights = stage_dir(run, "prune") / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\x00" * 100
    weights.write_bytes(bytes(data))
    before = (stage_dir(run, "train") / "manifest.json").read_text()
    line = _error_line(_stage_cli("train", run, "train.learning_rate=0.02"))
    assert "model.safetensors does not match its sha256" in line and "re-run the 'prune' stage" in line
    assert (stage_dir(run, "train") / "manifest.json").read_text() == before and not _leftovers(run)


@pytest.mark.slow
def test_wrong_schema_version(math_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    manifest = stage_dir(run, "prune") / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["schema_version"] = 0
    manifest.write_text(json.dumps(doc))
    line = _error_line(_stage_cli("train", run, "train.learning_rate=0.02"))
    assert "schema nlsflow.manifest v0, expected nlsflow.manifest v2" in line


def test_failing_stage_leaves_no_partial_folder(tmp_path):
    def crashes(ctx):
        (ctx.out_dir / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run_stage("prune", crashes, tiny_config(tmp_path))
    assert not (tmp_path / "prune").exists() and not _leftovers(tmp_path)


@pytest.mark.slow
def test_failed_rerun_keeps_the_previous_complete_stage(math_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)

    def crashes(ctx):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage("benchmark", crashes, tiny_config(run), force=True)
    read_manifest(stage_dir(run, "benchmark"), "benchmark")  # still complete and verified
    assert not _leftovers(run)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "method=lonas",
                "method.sparsity_preserving=true",
                "method.width_groups=[{name: w, modules: [gate_proj, up_proj], choices: [172, 86]}]",
            ],
            "unknown key 'method.lonas.sparsity_preserving'",
        ),
        (
            ["method=lonas", "method.width_groups=[{name: w, modules: [gate_proj, up_proj], choices: [86, 172]}]"],
            "group 'w': choices [86, 172] must be positive and strictly descending",
        ),
        (
            ["search.rule=max_accuracy_within_budget"],
            "search.cost_budget goes with search.rule=max_accuracy_within_budget",
        ),
        (["search.cost_budget=0.5"], "search.cost_budget goes with"),
    ],
    ids=["lonas+shears", "ascending widths", "rule without budget", "budget without rule"],
)
def test_impossible_method_settings(tmp_path, overrides, message):
    with pytest.raises(NlsflowError) as error:
        tiny_config(tmp_path, *overrides)
    assert message in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) < 400


def test_width_choices_must_start_at_the_module_size(tmp_path):
    from stages import prune, train
    from stages._common import run_stage

    cfg = tiny_config(
        tmp_path,
        "train.target_modules=[q_proj, k_proj, v_proj, up_proj, gate_proj, down_proj]",
        "train.groups=[{name: all, modules: [q_proj, k_proj, v_proj, up_proj, gate_proj, down_proj], choices: [8, 4]}]",
        "method=lonas",
        "method.width_groups=[{name: w, modules: [gate_proj, up_proj], choices: [128, 64]}]",
        "train.max_steps=1",
    )
    run_stage("prune", prune.run, cfg)
    with pytest.raises(
        NlsflowError,
        match=r"width group 'w': choices \[128, 64\] start at 128, but .*gate_proj has 172 "
        r"outputs; the first choice must be the full size",
    ):
        run_stage("train", train.run, cfg)


def test_yaml_merge_keys_still_load_and_overlapping_width_groups_are_refused(tmp_path):
    from nlsflow.yaml12 import yaml_load

    assert yaml_load("a: &x {b: 1}\nc: {<<: *x, d: 2}\n") == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}
    with pytest.raises(NlsflowError, match="module 'up_proj' is in width groups 'a' and 'b'; list it in one"):
        tiny_config(
            tmp_path,
            "method=lonas",
            "method.width_groups=[{name: a, modules: [gate_proj, up_proj], choices: [172, 86]}, "
            "{name: b, modules: [up_proj], choices: [172, 86]}]",
        )


def test_relative_search_space_file_on_the_command_line_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "space.yaml").write_text(
        "groups:\n  - {name: all, modules: [q_proj, k_proj, v_proj, up_proj, down_proj], choices: [8, 4]}\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "run", "train.search_space_file=space.yaml")
    assert cfg.train.search_space_file == str(tmp_path / "space.yaml")


def test_a_search_by_the_cloze_on_open_answers_is_refused_in_one_line(math_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    from stages.search import run as search

    with pytest.raises(
        NlsflowError, match=r"search.objective=cloze scores multiple choice only, .*set search.objective="
    ):
        run_stage("search", search, tiny_config(run, "search.objective=cloze"), force=True)
    read_manifest(stage_dir(run, "search"), "search")  # the finished search is kept
