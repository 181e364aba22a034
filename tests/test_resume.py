"""Resume: a stage whose manifest matches its config and inputs is skipped; a change re-runs it and what follows."""

from __future__ import annotations

import shutil

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
