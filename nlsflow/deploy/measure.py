"""Measure one model variant as deployed: parameters, non-zeros, MACs, size, prefill/decode latency, throughput, memory.

A `Variant` names what to load: a transformers folder (optionally with a PEFT adapter, optionally a super-adapter
activated at a subnet, optionally with PyTorch's 2:4 sparse kernels), or an OpenVINO export. `measure_in_subprocess`
measures it at one batch size in a fresh spawned process, so that the peak memory is that variant's at that batch
size, with the timing protocol of `nlsflow.deploy.timing` (same seeded prompts for every variant).
"""

from __future__ import annotations

import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Variant:
    name: str
    model_dir: str  # a transformers folder, or an OpenVINO export when runtime == "openvino"
    runtime: str = "pytorch"  # or "openvino"
    weights: str = ""  # what the weights are, for the table: the dtype, "int8"/"int4" (NNCF), "2:4 sparse"
    adapter_dir: str | None = None  # a PEFT adapter on model_dir
    search_space: str | None = None  # with adapter_dir: a super-adapter, made elastic and activated at `subnet`
    subnet: tuple[tuple[str, int], ...] | None = None
    masked: bool = False  # Shears: the adapter's delta masked by the base's zeros, as it was trained
    revision: str | None = None
    semi_structured: bool = False  # swap 2:4-sparse weights for torch's semi-structured sparse tensors (CUDA)
    dtype: str | None = None  # overrides the run's dtype (the 2:4 kernels need float16 or bfloat16)


def model_linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates of every nn.Linear (LoRA factors included) for one token; attention scores excluded."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def base_linear_zeros(model: nn.Module) -> int:
    """Zero weights of the base model's nn.Linear layers: MACs a sparse kernel could skip."""
    return int(
        sum(
            (m.weight == 0).sum().item()
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and "lora_" not in name and m.weight.layout == torch.strided
        )
    )


def size_on_disk_mb(folders: list[Path]) -> float:
    patterns = ("*.safetensors", "*.bin")
    return sum(f.stat().st_size for d in folders for p in patterns for f in Path(d).glob(p)) / 2**20


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most n non-zeros in every group of m consecutive inputs (the layout semi-structured kernels need)."""
    out_features, in_features = weight.shape
    return in_features % m == 0 and bool(((weight != 0).reshape(out_features, -1, m).sum(-1) <= n).all())


def use_semi_structured_kernels(model: nn.Module) -> tuple[int, int]:
    """Swap every 2:4-sparse decoder nn.Linear weight for a semi-structured sparse tensor: (swapped, linears).

    A layer stays dense when it is not 2:4 or its sides are not multiples of 64 (the kernels' tile constraints).
    """
    from torch.sparse import to_sparse_semi_structured

    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name]
    swapped = 0
    for module in linears:
        fits = module.in_features % 64 == 0 and module.out_features % 64 == 0
        if fits and is_n_m_sparse(module.weight):
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight), requires_grad=False)
            swapped += 1
    return swapped, len(linears)


@torch.no_grad()
def model_stats(model: nn.Module, macs: int | None = None) -> dict[str, int]:
    """A loaded model's parameters, non-zero parameters, MACs per token and those with a non-zero weight, with its
    attached shortcuts (HeteroLoRA's) and masked deltas (Shears'). `macs`: its linears' MACs when not all of every
    nn.Linear is active (a super-adapter at a subnet: `linear_macs_per_token`); default `model_linear_macs`."""
    from nlsflow.adapters.masking import masked_macs_correction
    from nlsflow.adapters.shortcuts import attached_shortcuts

    shortcuts = attached_shortcuts(model)
    params = [*model.parameters(), *(p for group in shortcuts for p in group.parameters())]
    macs = model_linear_macs(model) if macs is None else macs
    macs += masked_macs_correction(model) + sum(model_linear_macs(group) for group in shortcuts)
    return {
        "params": sum(p.numel() for p in params),
        "nonzero_params": int(sum((p != 0).sum().item() for p in params)),
        "macs_per_token": macs,
        "nonzero_macs_per_token": macs - base_linear_zeros(model),
    }


def _load_pytorch(variant: Variant, dtype: str, device: torch.device):
    """The model, and its stats that need the module tree: params, non-zeros, MACs, zero MACs."""
    from nlsflow.adapters.elastic import activate, linear_macs_per_token
    from nlsflow.adapters.loading import load_peft_adapter
    from nlsflow.adapters.masking import make_sparsity_preserving
    from nlsflow.adapters.shortcuts import load_shortcuts
    from nlsflow.adapters.supernet import load_supernet
    from nlsflow.models import load_causal_lm

    if variant.search_space:  # the super-adapter at a subnet: MACs at the active ranks
        model, _, space = load_supernet(
            Path(variant.model_dir),
            Path(variant.adapter_dir),
            Path(variant.search_space),
            dtype,
            device,
            variant.masked,
        )
        activate(model, space, dict(variant.subnet))
        macs = linear_macs_per_token(model, space, dict(variant.subnet))
    else:
        model = load_causal_lm(variant.model_dir, dtype, device, variant.revision)
        if variant.adapter_dir:
            model = load_peft_adapter(model, variant.adapter_dir, variant.model_dir).eval()
            if variant.masked:
                make_sparsity_preserving(model)
        load_shortcuts(model, Path(variant.adapter_dir or variant.model_dir))  # HeteroLoRA's, when the folder has any
        macs = model_linear_macs(model)
    stats = {**model_stats(model, macs), "note": ""}
    if variant.semi_structured:
        swapped, linears = use_semi_structured_kernels(model)
        stats["note"] = f"{swapped} of {linears} decoder linears on 2:4 sparse kernels"
    return model, stats


@torch.inference_mode()
def measure_variant(
    variant: Variant,
    *,
    batch_size: int,
    dtype: str,
    device: str,
    vocab_size: int,
    prompt_len: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    num_threads: int | None = None,
) -> dict:
    """The variant's stats (pytorch only), timings (median, spread), peak memory and size, at one batch size."""
    from nlsflow.deploy.timing import TorchDecoder, repeat_timing, summarize
    from nlsflow.models import resolve_device

    if num_threads:
        torch.set_num_threads(num_threads)
    if variant.runtime == "openvino":
        from nlsflow.deploy.openvino_format import OpenVINODecoder

        decoder, stats, dev = OpenVINODecoder(variant.model_dir, num_threads), {}, torch.device("cpu")
    else:
        dev = resolve_device(device)
        model, stats = _load_pytorch(variant, variant.dtype or dtype, dev)
        decoder = TorchDecoder(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # the weights as they run, not the loading transients
    ids = torch.randint(4, vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    timings = summarize(repeat_timing(decoder, ids, torch.ones_like(ids), new_tokens, warmup, repeats))
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
    folders = [Path(f) for f in (variant.model_dir, variant.adapter_dir) if f]
    size = size_on_disk_mb(folders) if all(f.is_dir() for f in folders) else float("nan")  # nan: a hub id
    return {**stats, "batch_size": batch_size, **timings, "peak_memory_mb": peak, "size_on_disk_mb": size}


def peak_rss_mb() -> float:
    """This process's peak resident set in MB: VmHWM, the high-water mark of its own address space.

    Not `ru_maxrss`: in a spawned process (fork, then exec) that includes the parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: may count the parent's RSS


def in_subprocess(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a freshly spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def measure_in_subprocess(variant: Variant, **kwargs) -> dict:
    """`measure_variant` in a spawned process: its peak memory is this variant's alone, at this batch size."""
    return in_subprocess(measure_variant, variant, **kwargs)
