"""OpenVINO export and decoding on a tiny random Llama: same greedy tokens as PyTorch, smaller compressed weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import micro_llama

from nlsflow.adapters.shortcuts import attach_shortcuts, load_shortcuts, save_shortcuts
from nlsflow.deploy.openvino_format import MODEL_BIN, OpenVINODecoder, export_openvino, openvino_available
from nlsflow.deploy.timing import TorchDecoder, position_ids, repeat_timing
from nlsflow.errors import NlsflowError
from nlsflow.models import load_causal_lm

pytestmark = pytest.mark.skipif(not openvino_available(), reason="openvino/nncf not installed")

CPU = torch.device("cpu")


def _tiny_llama(folder, shortcut_layers=()):
    model = micro_llama(tie_word_embeddings=False)
    model.save_pretrained(folder)
    if shortcut_layers:
        shortcuts = attach_shortcuts(model, list(shortcut_layers), rank=4, alpha=8.0)
        for shortcut in shortcuts.values():
            torch.nn.init.normal_(shortcut.B.weight, std=0.5)  # B starts at zero; make the shortcuts matter
        save_shortcuts(shortcuts, folder)
    return folder


def _prompt(padded=False):
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as the tokenizer pads
        ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def _greedy(decoder, ids, mask, new_tokens=8):
    tokens = [decoder.prefill(ids, mask)]
    for _ in range(new_tokens - 1):
        tokens.append(decoder.decode(tokens[-1]))
    return torch.cat(tokens, dim=1)


def _torch_model(folder):
    model = load_causal_lm(str(folder), "float32", CPU)
    load_shortcuts(model, folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def fp32_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "fp32"
    return out, export_openvino(tiny, out)


@pytest.mark.parametrize("padded", [False, True])
def test_fp32_matches_torch(tiny, fp32_export, padded):
    out, report = fp32_export
    assert report["weights"] == "fp32" and report["weight_formats"] == {"f32": 16}
    ids, mask = _prompt(padded)
    model = _torch_model(tiny)
    decoder = OpenVINODecoder(out, num_threads=1)
    tokens = _greedy(decoder, ids, mask)
    assert tokens.dtype == torch.long and tokens.shape == (2, 8)
    assert torch.equal(tokens, _greedy(TorchDecoder(model), ids, mask))
    generated = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )[:, ids.shape[1] :]
    assert torch.equal(tokens, generated)  # positions numbered as generate numbers them, left pads included
    # the last decode step's logits, read through seven cache hand-overs between the two infer requests
    seen = torch.cat([ids, tokens[:, :-1]], dim=1)
    seen_mask = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
    with torch.no_grad():
        expected = (
            model(input_ids=seen, attention_mask=seen_mask, position_ids=position_ids(seen_mask, seen.shape[1]))
            .logits[:, -1]
            .numpy()
        )
    np.testing.assert_allclose(decoder.logits, expected, atol=1e-4)
    decoder.prefill(ids, mask)
    with torch.no_grad():
        positions = position_ids(mask, ids.shape[1])
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].numpy()
    np.testing.assert_allclose(decoder.logits, expected, atol=1e-4)


@pytest.mark.slow
def test_compressed_exports_are_smaller(tiny, fp32_export, tmp_path):
    fp32_bytes = (fp32_export[0] / MODEL_BIN).stat().st_size
    ids, mask = _prompt()
    # group_size 128 does not divide hidden_size 64: those weights fall back to groups of 64
    for weights, group_size, max_ratio, formats in [
        ("int8", 64, 0.30, {"u8": 16}),
        ("int4", 128, 0.20, {"u4/g128": 2, "u4/g64": 12, "u8": 2}),
    ]:
        out = tmp_path / weights
        report = export_openvino(tiny, out, weights, group_size=group_size)
        ratio = (out / MODEL_BIN).stat().st_size / fp32_bytes  # measured: int8 0.26, int4 0.16
        assert ratio < max_ratio, (weights, ratio)
        assert report["size_on_disk_mb"] > 0 and report["compress_seconds"] > 0
        record = json.loads((out / "openvino_export.json").read_text())
        assert record["weights"] == weights and record["weight_formats"] == formats
        tokens = _greedy(OpenVINODecoder(out, num_threads=1), ids, mask)
        assert tokens.shape == (2, 8) and ((tokens >= 0) & (tokens < 128)).all()


def test_shortcuts_are_exported(tmp_path):
    folder = _tiny_llama(tmp_path / "merged", shortcut_layers=[1])
    report = export_openvino(folder, tmp_path / "ov")
    assert report["shortcut_layers"] == [1] and report["weight_formats"] == {"f32": 18}
    ids, mask = _prompt()
    model = _torch_model(folder)
    decoder = OpenVINODecoder(tmp_path / "ov", num_threads=1)
    assert torch.equal(_greedy(decoder, ids, mask), _greedy(TorchDecoder(model), ids, mask))
    decoder.prefill(ids, mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1].numpy()
        plain = load_causal_lm(str(folder), "float32", CPU)(input_ids=ids, attention_mask=mask).logits[:, -1].numpy()
    np.testing.assert_allclose(decoder.logits, expected, atol=1e-4)
    assert np.abs(expected - plain).max() > 1e-2  # the shortcuts change the output, so the match above means something


def test_bad_input(tiny, tmp_path):
    with pytest.raises(NlsflowError, match="is not an OpenVINO export.*re-run the benchmark stage"):
        OpenVINODecoder(tmp_path)
    with pytest.raises(NlsflowError, match="weights='int3'.*fp32, int8, int4"):
        export_openvino(tiny, tmp_path / "ov", "int3")
    assert not (tmp_path / "ov").exists()


def test_repeat_timing(fp32_export):
    ids, mask = _prompt()
    decoder = OpenVINODecoder(fp32_export[0], num_threads=1)
    timings = repeat_timing(decoder, ids, mask, new_tokens=4, warmup=1, repeats=2)
    assert len(timings) == 2
    assert all(t.prefill_s > 0 and t.decode_s_per_token > 0 and t.tokens == 8 for t in timings)
