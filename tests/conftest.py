"""Shared fixtures: a private Prefect home and model cache, the data root, and one tiny pipeline run per session."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("NLSFLOW_DATA_ROOT", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"no shared data at {DATA_ROOT} (set NLSFLOW_DATA_ROOT)")
TINY_CONFIGS = [REPO / "configs" / "tasks" / "math.yaml", REPO / "configs" / "profiles" / "tiny.yaml"]

_SCRATCH = Path(tempfile.mkdtemp(prefix="nlsflow-tests-"))
# Before anything imports Prefect: a throwaway home, no analytics, patience for the embedded server on 2 cores.
os.environ["PREFECT_HOME"] = str(_SCRATCH / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["NLSFLOW_CACHE"] = str(_SCRATCH / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: a hub id must fail at once, not wait on the network


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


# The benchmark stage times each variant in a fresh process: OpenVINO exports and every extra variant or batch size
# cost seconds a run. The tests of the benchmark (math_run) measure it all; the others time the fewest variants once.
LIGHT_BENCHMARK = (
    "benchmark={prompt_len: 16, new_tokens: 4, batch_sizes: [1], warmup: 0, repeats: 1, super_adapter: false, "
    "openvino: []}"
)
# math_run: the tiny profile's own benchmark section, every variant and OpenVINO format (the schema's defaults).
MATH_RUN = (f"benchmark={json.dumps(yaml.safe_load(TINY_CONFIGS[1].read_text())['benchmark'])}",)


def micro_llama(hidden: int = 64, layers: int = 2, **config):
    """A seeded random Llama for unit tests: 128 tokens, 4 attention heads over 2 key-value heads, an MLP twice as wide
    as the hidden size; `config` adds LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **config,
        )
    )


@pytest.fixture(scope="session")
def char_tokenizer():
    """One token per character, BOS prepended, so prompt lengths are exact; 76 ids, within micro_llama's 128."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .+=?#:,\n"
    chars = sorted(set(alphabet))
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.root={DATA_ROOT}", LIGHT_BENCHMARK, *extra]


def tiny_config(run_dir: Path, *extra: str):
    from nlsflow.config import load_config

    return load_config(TINY_CONFIGS, tiny_overrides(run_dir, *extra))


@pytest.fixture(scope="session")
def math_run(tmp_path_factory):
    """All six stages of the tiny math pipeline, run in-process once; tests must not modify it (copy it first)."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"no shared data at {DATA_ROOT}")
    from stages import benchmark, evaluate, extract, prune, search, train
    from stages._common import run_stage

    run_dir = tmp_path_factory.mktemp("math-tiny")
    cfg = tiny_config(run_dir, *MATH_RUN)
    for module in (prune, train, evaluate, search, extract, benchmark):
        stage = module.__name__.rsplit(".", 1)[-1]
        assert run_stage(stage, module.run, cfg) is not None
    return cfg
