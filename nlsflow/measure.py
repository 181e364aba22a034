"""Measure a model as deployed: size, non-zeros, MACs, prefill/decode latency, throughput and peak memory.

Each model is measured in a fresh process so that peak memory is that model's own.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def model_linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates of every nn.Linear (LoRA factors included) for one token; attention scores excluded."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def size_on_disk_mb(folders: list[Path]) -> float:
    return sum(f.stat().st_size for d in folders for f in Path(d).glob("*.safetensors")) / 2**20


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def measure_model(model_dir: str, adapter_dir: str | None, dtype: str, device: str, *, prompt_len: int, new_tokens: int,
                  batch_size: int, warmup: int, repeats: int, num_threads: int | None = None,
                  revision: str | None = None) -> dict:
    from peft import PeftModel

    from nlsflow.models import load_causal_lm, resolve_device
    from nlsflow.shortcuts import load_shortcuts

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    model = load_causal_lm(model_dir, dtype, dev, revision)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    shortcuts = load_shortcuts(model, adapter_dir or model_dir)  # HeteroLoRA's: with the adapter or merged folder
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    for _ in range(warmup):
        model.generate(input_ids=ids, attention_mask=mask, **gen)
    prefill = [_timed(lambda: model(input_ids=ids, attention_mask=mask), dev) for _ in range(repeats)]
    total = [_timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **gen), dev) for _ in range(repeats)]
    prefill_s, total_s = statistics.median(prefill), statistics.median(total)
    params = [*model.parameters(), *(shortcuts.parameters() if shortcuts else [])]
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    folders = [Path(model_dir)] + ([Path(adapter_dir)] if adapter_dir else [])
    return {"params": sum(p.numel() for p in params), "nonzero_params": int(sum((p != 0).sum().item() for p in params)),
            "macs_per_token": model_linear_macs(model) + (model_linear_macs(shortcuts) if shortcuts else 0), "prefill_ms": prefill_s * 1e3,
            "decode_ms_per_token": max(total_s - prefill_s, 0.0) / new_tokens * 1e3,
            "tokens_per_s": batch_size * new_tokens / total_s,  # end to end: prefill + decode
            "peak_memory_mb": peak,
            "size_on_disk_mb": size_on_disk_mb(folders) if all(Path(f).is_dir() for f in folders) else float("nan")}


def measure_in_subprocess(**kwargs) -> dict:
    """`measure_model` in a spawned process: its peak RSS is this model's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_model, **kwargs).result()
