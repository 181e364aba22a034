"""The benchmark's pieces: the timing protocol, greedy generation through a decoder, speed-up notes, 2:4 kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import micro_llama
from transformers import LlamaForCausalLM

from nlsflow.deploy.measure import (
    Variant,
    in_subprocess,
    is_n_m_sparse,
    measure_variant,
    peak_rss_mb,
    use_semi_structured_kernels,
)
from nlsflow.deploy.report import reference_of, with_speedups
from nlsflow.deploy.timing import TorchDecoder, median_spread, repeat_timing, summarize


def tiny_llama(hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    return micro_llama(hidden, layers, tie_word_embeddings=False, pad_token_id=0).eval()


def test_torch_decoder_gives_generate_tokens():
    model = tiny_llama()
    ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )[:, 10:]
    decoder = TorchDecoder(model)
    tokens = [decoder.prefill(ids, mask)]
    for _ in range(5):
        tokens.append(decoder.decode(tokens[-1]))
    assert torch.equal(torch.cat(tokens, dim=1), expected)
    summary = summarize(repeat_timing(decoder, ids, mask, new_tokens=4, warmup=0, repeats=3))
    assert summary["tokens_per_s"] > 0 and summary["prefill_ms_spread"] >= 0 and summary["decode_ms_per_token"] > 0
    assert median_spread([1.0, 3.0, 2.0]) == (2.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        repeat_timing(decoder, ids, mask, new_tokens=1, warmup=0, repeats=1)


def test_generation_through_a_decoder_matches_generate(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nlsflow.evaluation.generation import generate, generate_with_decoder

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    model = tiny_llama()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts = ["the cat sat on a mat", "a dog", "birds fly south", "xyz"]
    expected = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert len(set(expected)) > 1
    texts = generate_with_decoder(
        TorchDecoder(model), tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False
    )
    assert texts == expected  # left-padded batches and positions as generate has them


def test_speedups_name_their_reference_and_say_when_there_is_none():
    assert reference_of("pruned") == "dense" and reference_of("extracted_merged@openvino-fp32") == "extracted_merged"
    assert reference_of("pruned@2:4") == "pruned@fp16" and reference_of("pruned@fp16") == "pruned"
    assert reference_of("extracted_merged@openvino-int4") == "extracted_merged@openvino-fp32"
    rows = [
        {"model": m, "batch_size": 1, "tokens_per_s": t, "runtime": r, "note": ""}
        for m, t, r in [
            ("dense", 10.0, "pytorch"),
            ("pruned", 10.1, "pytorch"),
            ("extracted_merged", 10.0, "pytorch"),
            ("extracted_merged@openvino-fp32", 15.0, "openvino"),
            ("extracted_merged@openvino-int8", 30.0, "openvino"),
        ]
    ]
    out = {r["model"]: r for r in with_speedups(rows, unstructured=True)}
    assert out["dense"]["speedup"] == 1.0 and out["dense"]["note"] == "reference"
    assert out["pruned"]["note"] == "no speed-up over dense; unstructured zeros run on dense kernels"
    assert out["extracted_merged@openvino-fp32"]["speedup"] == 1.5
    assert out["extracted_merged@openvino-int8"]["speedup"] == 2.0
    assert out["extracted_merged@openvino-int8"]["note"] == "unstructured zeros run on dense kernels"
    on_gpu = {r["model"]: r for r in with_speedups(rows, unstructured=False, same_device=False)}
    assert on_gpu["extracted_merged@openvino-fp32"]["speedup"] is None
    assert on_gpu["extracted_merged@openvino-fp32"]["note"] == "not compared: PyTorch ran on the GPU"
    assert on_gpu["extracted_merged@openvino-int8"]["speedup"] == 2.0


def test_n_m_sparsity_is_checked_per_group_of_inputs():
    weight = torch.randn(8, 16)
    assert not is_n_m_sparse(weight)
    weight.view(8, 4, 4)[..., :2] = 0
    assert is_n_m_sparse(weight)
    weight[0, 0] = 1.0  # three non-zeros in one group
    assert not is_n_m_sparse(weight)


def test_measure_variant_counts_and_times_a_saved_model(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    rows = [
        measure_variant(
            Variant("m", str(tmp_path)),
            batch_size=b,
            dtype="float32",
            device="cpu",
            vocab_size=128,
            prompt_len=8,
            new_tokens=3,
            warmup=0,
            repeats=2,
        )
        for b in (1, 2)
    ]
    assert [r["batch_size"] for r in rows] == [1, 2]
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert rows[0]["params"] == sum(p.numel() for p in model.parameters())
    assert rows[0]["macs_per_token"] == rows[0]["nonzero_macs_per_token"] == linear
    assert all(r["tokens_per_s"] > 0 and r["size_on_disk_mb"] > 0 for r in rows)


def test_a_spawned_measurement_reports_its_own_peak_memory_not_the_parent_s():
    held = np.ones(3 * 2**29 // 8)  # 1.5 GiB, touched, held by this process while the child runs
    parent, child = peak_rss_mb(), in_subprocess(peak_rss_mb)
    assert child < parent - 1024, (parent, child)  # ru_maxrss would count the parent's peak in the child's
    del held


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's semi-structured sparse kernels need CUDA")
def test_semi_structured_kernels_keep_the_logits(tmp_path):
    from nlsflow.pruning import prune_mask

    model = tiny_llama(hidden=256).half().cuda()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.mul_(prune_mask(module.weight.abs(), 0.5, "2:4") == 0)  # keep the 2 largest of 4
    ids = torch.randint(4, 128, (1, 64), device="cuda")
    dense_logits = model(ids).logits
    assert use_semi_structured_kernels(model) == (2 * 7, 2 * 7)
    assert torch.allclose(model(ids).logits, dense_logits, atol=2e-2, rtol=2e-2)
