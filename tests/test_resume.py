"""Resume: a stage whose manifest matches its config and inputs is skipped; a change re-runs it and what follows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import MATH_RUN, tiny_config

from nlsflow.artifacts import stage_dir
from schemas import STAGES
from stages import benchmark, evaluate, extract, prune, search, train
from stages._common import run_stage

pytestmark = pytest.mark.slow
RUNS = dict(zip(STAGES, (prune.run, train.run, evaluate.run, search.run, extract.run, benchmark.run)))


@pytest.fixture
def copied_run(math_run, tmp_path):
    shutil.copytree(math_run.run_dir, tmp_path / "run")
    return tmp_path / "run"


def _statuses(cfg) -> dict[str, str]:
    return {stage: "skipped" if run_stage(stage, fn, cfg) is None else "ran" for stage, fn in RUNS.items()}


def test_unchanged_config_skips_everything(copied_run):
    assert set(_statuses(tiny_config(copied_run, *MATH_RUN)).values()) == {"skipped"}


def test_corrupt_output_reruns_only_that_stage(copied_run):
    table = stage_dir(copied_run, "evaluate") / "predictions.parquet"
    table.write_bytes(table.read_bytes()[:-10])
    statuses = _statuses(tiny_config(copied_run, *MATH_RUN))
    assert statuses == {
        "prune": "skipped",
        "train": "skipped",
        "evaluate": "ran",
        "search": "skipped",
        "extract": "skipped",
        "benchmark": "skipped",
    }


def test_force_reruns_an_up_to_date_stage(copied_run):
    assert run_stage("evaluate", RUNS["evaluate"], tiny_config(copied_run, *MATH_RUN), force=True) is not None


def test_upstream_change_reruns_everything_downstream(copied_run):
    # the light benchmark (no MATH_RUN): every stage re-runs anyway, and the benchmark's OpenVINO export is slow
    statuses = _statuses(tiny_config(copied_run, "prune.calibration.num_samples=4"))
    assert statuses == dict.fromkeys(STAGES, "ran")


def test_runner_passes_force_to_the_stage():
    from flows.stage_process import stage_command

    assert stage_command("search", "c.yaml", force=True)[-1] == "--force"
    assert "--force" not in stage_command("search", "c.yaml", force=False)


def test_stage_cli_takes_overrides_before_and_after_flags(tmp_path):
    """`make stage-train ARGS="--force train.learning_rate=1e-3"` puts an override after --force."""
    from conftest import DATA_ROOT, TINY_CONFIGS

    from nlsflow.errors import NlsflowError
    from stages._common import main

    seen = {}

    def stop(ctx):
        seen["cfg"] = ctx.cfg
        raise NlsflowError("stopped here")

    argv = [
        "--config",
        str(TINY_CONFIGS[0]),
        "--config",
        str(TINY_CONFIGS[1]),
        f"run_dir={tmp_path}",
        "--force",
        "prune.sparsity=0.25",
        f"data.root={DATA_ROOT}",
    ]
    assert main("prune", stop, argv) == 2
    assert seen["cfg"].prune.sparsity == 0.25 and seen["cfg"].run_dir == str(tmp_path)


def test_plan_says_which_stages_would_run_and_writes_nothing(math_run, capsys):
    """`--plan` (`make pipeline ... ARGS=--plan`): the resume decision, made without running or writing anything."""
    from conftest import TINY_CONFIGS, tiny_overrides

    from flows.pipeline import main
    from nlsflow.artifacts import stage_plan

    run_dir = math_run.run_dir
    assert stage_plan(tiny_config(run_dir, *MATH_RUN)) == [(stage, None) for stage in STAGES]
    changed = stage_plan(tiny_config(run_dir, *MATH_RUN, "search.population=5"))
    assert changed[:3] == [(stage, None) for stage in STAGES[:3]]
    assert changed[3][0] == "search" and changed[3][1].startswith("settings changed (search.population")
    assert changed[4:] == [("extract", "after search"), ("benchmark", "after search")]
    before = sorted((p, p.stat().st_mtime_ns) for p in Path(run_dir).rglob("*"))
    configs = [arg for path in TINY_CONFIGS for arg in ("--config", str(path))]
    assert main([*configs, *tiny_overrides(run_dir, *MATH_RUN, "search.population=5"), "--plan"]) == 0
    assert "  search     runs: settings changed" in capsys.readouterr().out
    assert sorted((p, p.stat().st_mtime_ns) for p in Path(run_dir).rglob("*")) == before  # nothing written


def test_published_evidence_leaves_the_weights_out_and_stands_for_its_run(math_run, tmp_path):
    """A study's published row (results/<task>-<profile>/<row>): manifests, JSON files and tables, no weights; it
    stands for its run while its settings are the config's and its files are unaltered."""
    from nlsflow.artifacts import publish_evidence, read_manifest, rerun_reason

    evidence = tmp_path / "lora"
    publish_evidence(math_run.run_dir, evidence)
    files = {p.relative_to(evidence).as_posix() for p in evidence.rglob("*") if p.is_file()}
    assert {f"{stage}/manifest.json" for stage in STAGES} <= files  # (and config.yaml, which only the flow writes)
    assert {"evaluate/predictions.parquet", "search/evaluations.parquet", "extract/predictions.parquet"} <= files
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".xml"))]
    assert sum(p.stat().st_size for p in evidence.rglob("*")) < 1_000_000
    cfg = tiny_config(evidence, *MATH_RUN)
    assert [rerun_reason(evidence, stage, cfg, missing_ok=True) for stage in STAGES] == [None] * len(STAGES)
    assert "is missing" in rerun_reason(evidence, "train", cfg)  # its weights are not there
    assert read_manifest(stage_dir(evidence, "extract"), "extract", missing_ok=True).output.average_accuracy == (
        read_manifest(stage_dir(math_run.run_dir, "extract"), "extract").output.average_accuracy
    )
    changed = tiny_config(evidence, *MATH_RUN, "search.population=5")
    assert rerun_reason(evidence, "search", changed, missing_ok=True).startswith("settings changed (search.population")
    table = stage_dir(evidence, "extract") / "predictions.parquet"
    table.write_bytes(table.read_bytes()[:-10])
    assert "does not match its sha256" in rerun_reason(evidence, "extract", cfg, missing_ok=True)
