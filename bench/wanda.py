"""Wanda: `nlsflow.pruning.prune_model` vs the published algorithm written out plainly, on the same model and data.

Each run is a freshly spawned process (load, one warm-up forward, then the timed pruning), so its peak memory
(max RSS, or the CUDA allocator's peak) is its own. Both must give identical masks: every run's per-linear mask
digests are compared and any difference is an error naming the linears.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from bench.context import BenchContext
from bench.runner import alternate, no_worse, row
from nlsflow.data.datasets import calibration_batch, calibration_documents
from nlsflow.deploy.measure import in_subprocess
from nlsflow.deploy.timing import median_spread
from nlsflow.errors import NlsflowError


@torch.no_grad()
def reference_wanda(model, calib_ids: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> None:
    """Wanda (Sun et al. 2023) as the paper describes it, in place: every nn.Linear of every decoder layer."""
    layers = model.get_decoder().layers
    device = next(model.parameters()).device

    # The inputs of the first decoder layer: a stand-in layer records them and stops the forward pass.
    inps, layer_kwargs = [], {}

    class Catcher(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.attention_type = layer, getattr(layer, "attention_type", None)  # some decoders read it

        def forward(self, hidden_states, **kwargs):
            inps.append(hidden_states)
            layer_kwargs.update(kwargs)
            raise ValueError

    layers[0] = Catcher(layers[0])
    for sample in calib_ids:
        try:
            model(sample[None].to(device), use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].layer

    for layer in layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        # ||X_j||^2: per input channel, the sum of squares over every calibration token
        sq_norms = {name: 0 for name in linears}

        def record(name):
            def hook(module, args, output):
                x = args[0].float()
                sq_norms[name] = sq_norms[name] + x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # noqa: B023 (used in this iteration)

            return hook

        handles = [m.register_forward_hook(record(name)) for name, m in linears.items()]
        for x in inps:
            layer(x, **layer_kwargs)
        for h in handles:
            h.remove()

        # score |W_ij| * ||X_j||_2 and zero the lowest scores of every output row (or n of every m inputs)
        for name, m in linears.items():
            score = m.weight.abs() * (sq_norms[name] / len(inps)).sqrt()
            if n_m is None:
                lowest = torch.sort(score, dim=1, stable=True).indices[:, : int(score.shape[1] * sparsity)]
                m.weight.scatter_(1, lowest, 0)
            else:
                n, group = n_m
                for start in range(0, score.shape[1], group):
                    # ties (e.g. zero weights) go to the first, as the paper's code sorts
                    lowest = torch.sort(score[:, start : start + group], dim=1, stable=True).indices[:, :n]
                    m.weight.scatter_(1, start + lowest, 0)

        # the pruned layer's outputs are the next layer's inputs
        outs = [layer(x, **layer_kwargs) for x in inps]
        inps = [out[0] if isinstance(out, tuple) else out for out in outs]


def mask_digests(model) -> dict[str, str]:
    """sha256 of every decoder-layer linear's zero mask, by name."""
    return {
        name: hashlib.sha256((m.weight == 0).cpu().numpy().tobytes()).hexdigest()
        for name, m in model.get_decoder().layers.named_modules()
        if isinstance(m, nn.Linear)
    }


def check_same_masks(ours: dict[str, str], peer: dict[str, str]) -> None:
    differ = sorted(name for name in ours.keys() | peer.keys() if ours.get(name) != peer.get(name))
    if differ:
        raise NlsflowError(
            f"Wanda masks differ between nlsflow.pruning and the reference in {len(differ)} of "
            f"{len(ours)} linears: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}"
        )


def prune_once(
    impl: str,
    model_dir: str,
    dtype: str,
    device: str,
    calib_ids: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None,
    num_threads: int | None,
) -> dict:
    """Load, warm up, prune with `impl` ("ours" or "reference"): seconds, the peak memory (MB) pruning added over
    the loaded model, and the mask digests."""
    import time

    from bench.runner import PeakMemoryAbove
    from nlsflow.models import load_causal_lm, resolve_device
    from nlsflow.pruning import prune_model

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    model = load_causal_lm(model_dir, dtype, dev)
    with torch.no_grad():
        model(calib_ids[:1].to(dev), use_cache=False)  # warm-up
    with PeakMemoryAbove(dev) as memory:
        start = time.perf_counter()
        if impl == "ours":
            prune_model(
                model,
                calib_ids.to(dev),
                method="wanda",
                sparsity=sparsity,
                structure=n_m or "unstructured",
                progress=False,
            )
        else:
            reference_wanda(model, calib_ids, sparsity, n_m)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": memory.mb, "masks": mask_digests(model)}


def calibration_ids(ctx: BenchContext) -> torch.Tensor:
    """The calibration batch `prune` draws (prune.calibration)."""
    cfg, cc = ctx.cfg, ctx.cfg.prune.calibration
    documents = calibration_documents(
        Path(cfg.data.root),
        cc.source,
        train_names=cfg.data.train_sets,
        contamination=cfg.data.contamination,
        download=cfg.data.download,
    )
    return calibration_batch(ctx.tokenizer, documents, cc.num_samples, cc.seqlen, cc.seed)


def run(ctx: BenchContext) -> list[dict]:
    cfg, pc, cc, s = ctx.cfg, ctx.cfg.prune, ctx.cfg.prune.calibration, ctx.settings
    if pc.targets is not None:
        raise NlsflowError(
            f"prune.targets={pc.targets}: the Wanda bench prunes every decoder linear; drop the override"
        )
    if ctx.revision:
        raise NlsflowError(
            "the Wanda bench loads the base in subprocesses from a folder; materialize the hub model first"
        )
    calib = calibration_ids(ctx)

    def variant(impl):
        return lambda: in_subprocess(
            prune_once,
            impl=impl,
            model_dir=ctx.base_dir,
            dtype=cfg.dtype,
            device=cfg.device,
            calib_ids=calib,
            sparsity=pc.sparsity,
            n_m=pc.n_m,
            num_threads=cfg.num_threads,
        )

    # no warm-up rounds: every run is a fresh process that warms itself up before the timed pruning
    results = alternate(
        {"ours": variant("ours"), "reference": variant("reference")},
        s.repeats,
        0,
        desc="bench: Wanda (a process per run)",
    )
    for ours, ref in zip(results["ours"], results["reference"]):
        check_same_masks(ours["masks"], ref["masks"])
    linears = len(results["ours"][0]["masks"])
    note = (
        f"identical masks in all {linears} linears in every run; {cc.num_samples} x {cc.seqlen} calibration tokens, "
        f"sparsity {pc.sparsity:g} {pc.structure}"
    )
    memory = ("peak CUDA memory" if ctx.device.type == "cuda" else "peak RSS") + " above the loaded model"
    rows = []
    for metric, key, unit in (("wall time", "seconds", "s"), (memory, "peak_mb", "MB")):
        rows.append(
            row(
                "Wanda pruning",
                "nlsflow.pruning.prune_model",
                "reference Wanda (paper's algorithm)",
                metric,
                unit,
                median_spread([r[key] for r in results["ours"]]),
                median_spread([r[key] for r in results["reference"]]),
                s.repeats,
                no_worse(lower_is_better=True),
                note,
            )
        )
    return rows
