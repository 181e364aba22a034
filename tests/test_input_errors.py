"""Bad input found on the tiny profile: one `error:` line naming the problem and the fix, nothing of the run lost, and
a re-run after the fix succeeds. A corrupt search cache is set aside (not an error); make's ARGS keep YAML values whole.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA_ROOT, REPO, needs_data, tiny_config
from test_bad_input import _error_line, _leftovers, _stage_cli

from nlsflow.artifacts import list_outputs, read_manifest, read_table, stage_dir, write_manifest
from nlsflow.cli import expand_args, split_args
from nlsflow.errors import NlsflowError
from nlsflow.models import check_model_source, load_causal_lm, load_tokenizer
from nlsflow.search.nsga2 import SubnetEvaluator
from schemas import STAGES

# --- a folder that is not a model ------------------------------------------------------------------------------


def _folder(tmp_path, *files: str):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize(
    "files, expected, absent",
    [
        ((), ["has no config.json, no weights", "no tokenizer files", "check model.name_or_path"], []),
        (("notes.txt", "data.csv"), ["has no config.json, no weights", "no tokenizer files"], []),
        (("config.json",), ["has no weights (model*.safetensors", "no tokenizer files"], ["no config.json"]),
        (("config.json", "model.safetensors"), ["has no tokenizer files (tokenizer.json"], ["no weights"]),
        (("Q4.gguf",), ["holds GGUF files (Q4.gguf), not config.json; set model.gguf_file=Q4.gguf"], []),
        (("adapter_config.json", "adapter_model.safetensors"), ["is a PEFT adapter, not a model", "base_model"], []),
    ],
    ids=["empty", "random files", "config only", "no tokenizer", "gguf", "adapter"],
)
def test_a_local_folder_that_is_not_a_model_is_named_with_what_it_lacks(tmp_path, files, expected, absent):
    folder = _folder(tmp_path, *files)
    with pytest.raises(NlsflowError) as error:
        check_model_source(str(folder))
    message = str(error.value)
    assert message.startswith(f"model.name_or_path={folder}: ") and "\n" not in message
    assert all(part in message for part in expected) and not any(part in message for part in absent), message


def test_model_paths_that_do_not_exist_or_are_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("/nonexistent/model", "./no-such-model", "../no-such-model", "~/no-such-nlsflow-model"):
        with pytest.raises(NlsflowError, match=r"does not exist; check model\.name_or_path"):
            check_model_source(name)
    (tmp_path / "m.gguf").write_text("")
    gguf_fix = f"is a GGUF file; set model.name_or_path={tmp_path} model.gguf_file=m.gguf"
    with pytest.raises(NlsflowError, match=re.escape(gguf_fix)):
        check_model_source(str(tmp_path / "m.gguf"))
    with pytest.raises(NlsflowError, match=r"has no other\.gguf \(GGUF files there: m\.gguf\); set model\.gguf_file"):
        check_model_source(str(tmp_path), "other.gguf")


def test_tiny_hub_ids_and_model_folders_pass(tmp_path):
    check_model_source("tiny")
    check_model_source("HuggingFaceTB/SmolLM2-135M")  # a hub id is left to from_pretrained (no network here)
    check_model_source(str(_folder(tmp_path, "config.json", "model-00001-of-00002.safetensors", "tokenizer.json")))
    (tmp_path / "m.gguf").write_text("")
    check_model_source(str(tmp_path), "m.gguf")


def test_check_model_source_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from nlsflow.models import check_model_source; check_model_source('tiny'); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_loaders_name_the_folder_and_what_it_lacks(tmp_path):
    import torch

    folder = _folder(tmp_path, "notes.txt")
    lacks_tokenizer = f"cannot load model '{folder}': the folder {folder} has no tokenizer files"
    with pytest.raises(NlsflowError, match=re.escape(lacks_tokenizer)):
        load_tokenizer(str(folder))
    with pytest.raises(NlsflowError, match=re.escape(f"the folder {folder} has no config.json, no weights")) as error:
        load_causal_lm(str(folder), "float32", torch.device("cpu"))
    assert "\n" not in str(error.value)


@needs_data
@pytest.mark.slow
def test_prune_on_a_folder_that_is_not_a_model_then_on_the_model(tmp_path):
    from nlsflow.models import build_tiny_llama

    folder, run = _folder(tmp_path, "notes.txt"), tmp_path / "run"
    line = _error_line(_stage_cli("prune", run, f"model.name_or_path={folder}"))
    assert f"model.name_or_path={folder}: the folder {folder} has no config.json" in line
    assert "check model.name_or_path: a folder that save_pretrained wrote" in line
    assert not stage_dir(run, "prune").exists() and (not run.exists() or not _leftovers(run))

    texts = [f"Question: {a} plus {b}? Answer: {a + b}." for a in range(40) for b in range(10)]
    build_tiny_llama(tiny_config(run).model.tiny, texts, 0, folder)  # the fix: a model in the folder
    done = _stage_cli("prune", run, f"model.name_or_path={folder}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest(stage_dir(run, "prune"), "prune").output.base_model == str(folder)


# --- a corrupt search cache -----------------------------------------------------------------------------------


def test_an_unusable_search_cache_is_set_aside_and_the_search_starts_over(tmp_path, caplog):
    cache = tmp_path / ".cache" / "search-0123456789abcdef.parquet"
    cache.parent.mkdir()

    def evaluator() -> SubnetEvaluator:
        return SubnetEvaluator(lambda subnet: 0.5, lambda subnet: sum(subnet.values()), cache_path=cache)

    evaluator()({"qkv": 8})
    truncated = cache.read_bytes()[:100]
    cache.write_bytes(truncated)
    with caplog.at_level(logging.WARNING, logger="nlsflow.search.nsga2"):
        fresh = evaluator()
    assert fresh.evaluations == {} and fresh.resumed == 0 and not cache.exists()
    assert (cache.parent / f"{cache.name}.corrupt").read_bytes() == truncated  # kept, not deleted
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"search cache {cache} is not a readable Parquet file") and "\n" not in warning
    assert f"discarded, kept as {cache}.corrupt; the search starts over" in warning and "re-run" not in warning

    fresh({"qkv": 4})
    assert read_table(cache, "search_cache").num_rows == 1
    pq.write_table(pa.table({"x": [1]}), cache)  # another table in its place: set aside too, the first kept
    assert evaluator().evaluations == {}
    assert (cache.parent / f"{cache.name}.corrupt").read_bytes() == truncated
    assert (cache.parent / f"{cache.name}.corrupt.1").is_file()


@pytest.mark.slow
def test_search_rerun_after_its_cache_was_truncated(math_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    [cache] = (run / ".cache").glob("search-*.parquet")
    truncated = cache.read_bytes()[: cache.stat().st_size // 2]
    cache.write_bytes(truncated)

    done = _stage_cli("search", run, "--force")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line and "search cache" in line]
    assert len(warnings) == 1 and str(cache) in warnings[0], done.stderr[-3000:]
    assert "discarded" in warnings[0] and "the search starts over" in warnings[0]
    assert not [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert (cache.parent / f"{cache.name}.corrupt").read_bytes() == truncated
    assert read_manifest(stage_dir(run, "search"), "search").output.resumed_from_cache == 0
    assert read_table(cache, "search_cache").num_rows > 0 and not _leftovers(run)


# --- an adapter of another model size ---------------------------------------------------------------------------


def _reseal(run) -> None:
    """Every manifest re-written over the files as they are now, lineage included (as if they had been made so)."""
    sealed = {}
    for stage in STAGES:
        folder = stage_dir(run, stage)
        if (folder / "manifest.json").is_file():
            manifest = read_manifest(folder, stage, verify=False)
            inputs = {k: sealed[k].fingerprint() for k in manifest.inputs}
            sealed[stage] = manifest.model_copy(update={"outputs": list_outputs(folder), "inputs": inputs})
            write_manifest(folder, sealed[stage])


@pytest.mark.slow
def test_extract_with_an_adapter_trained_on_another_model_size(math_run, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    adapter_dir, base_dir = stage_dir(run, "train") / "adapter", stage_dir(run, "prune") / "model"
    weights = adapter_dir / "adapter_model.safetensors"
    originals = {p: p.read_bytes() for p in [weights, *run.glob("*/manifest.json")]}
    # as if trained with model.tiny.hidden_size=32: every hidden-size dimension (64 here) halved
    tensors = load_file(weights)
    save_file({name: torch.zeros([32 if d == 64 else d for d in t.shape]) for name, t in tensors.items()}, weights)
    _reseal(run)
    extracted = (stage_dir(run, "extract") / "manifest.json").read_text()

    line = _error_line(_stage_cli("extract", run, "--force"))
    assert f"the adapter in {adapter_dir} does not fit the base model {base_dir} (" in line
    assert "q_proj.lora_A.default.weight is [8, 32] in the adapter, [8, 64] in the model" in line
    assert line.endswith("): it was trained on another model; re-run train for this model")
    assert (stage_dir(run, "extract") / "manifest.json").read_text() == extracted and not _leftovers(run)

    for path, data in originals.items():  # the fix: the adapter trained for this model (re-training writes the same)
        path.write_bytes(data)
    done = _stage_cli("extract", run, "--force")
    assert done.returncode == 0, done.stderr[-3000:]


# --- make's ARGS ------------------------------------------------------------------------------------------------

SUBNET = '{"layers.0.qkv": 8, "layers.0.up": 4}'


@pytest.mark.parametrize(
    "text, words",
    [
        (
            f"extract.subnet={SUBNET} train.max_steps=30 --force",
            [f"extract.subnet={SUBNET}", "train.max_steps=30", "--force"],
        ),
        ("", []),
        (" \t\n ", []),
        ("  a=1\tb=2\n c=3 ", ["a=1", "b=2", "c=3"]),
        (
            'x={"a": [1, 2], "b": {"c": [3, 4]}} y=[q_proj, k_proj]',
            ['x={"a": [1, 2], "b": {"c": [3, 4]}}', "y=[q_proj, k_proj]"],
        ),
        ("""run_dir="my runs/x" model.revision='v 1'""", ['run_dir="my runs/x"', "model.revision='v 1'"]),
        ("""--out "my runs" --only 'training,wanda'""", ["--out", "my runs", "--only", "training,wanda"]),
        ('x="{ not a bracket" y="]"', ['x="{ not a bracket"', 'y="]"']),
        (r'x={"a": "say \"hi there\""} y=2', [r'x={"a": "say \"hi there\""}', "y=2"]),
        ("x='it''s here' y={'a b': 1}", ["x='it''s here'", "y={'a b': 1}"]),
        ('"a"b "" x', ['"a"b', "", "x"]),
    ],
    ids=[
        "brief",
        "empty",
        "blank",
        "whitespace",
        "nested",
        "quoted values",
        "quoted words",
        "brackets in quotes",
        "escaped quote",
        "yaml single quotes",
        "partly quoted",
    ],
)
def test_split_args(text, words):
    assert split_args(text) == words


def test_split_args_is_str_split_without_quotes_or_brackets():
    for text in ("prune.sparsity=0.6 search.num_evals=40", "--repeats 5 --only training,wanda", "--force"):
        assert split_args(text) == text.split()


@pytest.mark.parametrize(
    "text, problem",
    [
        ('extract.subnet={"a": 8, "b": 4', "'{' is never closed"),
        ("x=[1, [2, 3]", "'[' is never closed"),
        ("x=[1, 2} y=1", "'}' closes no open bracket"),
        ("x=] y=1", "']' closes no open bracket"),
        ('x="abc y=1', 'the quote " is never closed'),
        ("x='abc", "the quote ' is never closed"),
    ],
)
def test_split_args_refuses_unbalanced_text(text, problem):
    with pytest.raises(NlsflowError) as error:
        split_args(text)
    message = str(error.value)
    assert message.startswith(f"--args {text!r}: {problem}; close every quote and bracket") and "\n" not in message


def test_expand_args():
    argv = ["--task", "math", "--args", f"extract.subnet={SUBNET} --force", "x=1", "--args=y=2 z=[1, 2]"]
    assert expand_args(argv) == ["--task", "math", f"extract.subnet={SUBNET}", "--force", "x=1", "y=2", "z=[1, 2]"]
    assert expand_args(["--profile", "tiny", "--args", ""]) == ["--profile", "tiny"]  # make's empty ARGS
    assert expand_args(["a b", "--force"]) == ["a b", "--force"]  # other words as they are
    with pytest.raises(NlsflowError, match="--args needs a value"):
        expand_args(["--force", "--args"])


def _make(target: str, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-o", "venv", "-o", ".venv/.installed", target, *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_data
def test_make_bench_passes_args_with_a_yaml_mapping_whole():
    """The mapping reaches the config as one override: the one error is the misspelled key after it."""
    args = f"--only training extract.subnet={SUBNET} prune.sparsty=0.5 data.root={DATA_ROOT}"
    line = _error_line(_make("bench", "PROFILE=tiny", f"ARGS={args}"))
    assert line.startswith("error: bench: ") and "unknown key 'prune.sparsty'" in line and "subnet" not in line, line


def test_make_compare_passes_a_quoted_path_with_a_space(tmp_path):
    runs = tmp_path / "my runs"
    line = _error_line(_make("compare", "METHODS=lora", f'ARGS=--existing --runs "{runs}" extract.subnet={SUBNET}'))
    assert line.startswith("error: compare: ") and f"{runs}/math-tiny-lora" in line, line


def test_make_refuses_unbalanced_args_in_one_line():
    line = _error_line(_make("compare", "METHODS=lora", 'ARGS=--existing extract.subnet={"a": 8'))
    assert line.startswith("error: compare: --args") and "'{' is never closed" in line


@pytest.mark.slow
def test_make_stage_extract_with_the_readme_subnet_mapping(math_run, tmp_path):
    """README: `ARGS='extract.subnet={"layers.0.qkv": 8, ...}'`. Needs stages/_common.py to call expand_args."""
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    space = json.loads((stage_dir(run, "train") / "search_space.json").read_text())
    subnet = {v["name"]: v["choices"][-1] for v in space["variables"]}
    subnet[space["variables"][0]["name"]] = space["variables"][0]["choices"][0]
    args = f"extract.subnet={json.dumps(subnet)} method.sparsity_preserving=false data.root={DATA_ROOT}"
    done = _make("stage-extract", "TASK=math", "PROFILE=tiny", "METHOD=shears", f"RUN_DIR={run}", f"ARGS={args}")
    assert done.returncode == 0, done.stderr[-3000:]
    output = read_manifest(stage_dir(run, "extract"), "extract").output
    assert output.subnet == subnet and output.subnet_name == "given"
