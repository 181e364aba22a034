"""Export a causal LM folder to OpenVINO IR (optionally NNCF weight-compressed) and decode greedily with it.

Design. The exported graph is stateless: it takes `input_ids`, `attention_mask`, `position_ids` (numbered as
`generate` numbers them, so left-padded batches decode as in PyTorch) and every layer's past keys and
values as plain inputs, and returns the last position's logits and every layer's present keys and values. The
decoder binds each step's present tensors as the next step's past inputs, without copying. optimum-intel instead
exports a stateful model (the KV cache lives inside the infer request); we cannot use it here (it pins
transformers<5.6), and explicit KV in/out keeps the export a small traced wrapper over the transformers model,
with the cache visible and one graph for prefill (past length 0) and decode. The wrapper runs the real model
(PerLayerLlama widths and HeteroLoRA shortcut hooks included), the decoder passes positions as `TorchDecoder` does;
only the causal mask is built in the wrapper, as floats (see `_additive_causal_mask`).

NNCF's `compress_weights` rewrites the IR's weight constants into INT8 (asymmetric, per output channel) or INT4
(asymmetric, in groups of `group_size` input channels, each with its own scale and zero point) plus a dequantize
subgraph that the CPU plugin fuses into the MatMuls; activations stay float32. It is data-free: no calibration set.
In INT4 mode the embeddings and the LM head stay INT8 (NNCF's backup precision), as does any weight whose input size
no power-of-two group >= 32 divides; `ratio` < 1 keeps that share of the other layers in INT8 too.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nlsflow.adapters.shortcuts import load_shortcuts
from nlsflow.deploy.timing import position_ids
from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_dir, atomic_write_text
from nlsflow.models import load_causal_lm

log = logging.getLogger(__name__)

WEIGHT_MODES = ("fp32", "int8", "int4")
MODEL_XML, MODEL_BIN, EXPORT_FILE = "openvino_model.xml", "openvino_model.bin", "openvino_export.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


def openvino_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _additive_causal_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """The 4D float mask (0 to attend, float32 min not to) that transformers would build as booleans.

    A left-padded row's pad queries see no key at all. PyTorch's SDPA returns zeros for such rows, but a boolean mask
    becomes -inf in OpenVINO and the row turns to NaN, which then reaches the real tokens through the cached keys and
    values. With a finite minimum the pad rows stay finite, and real rows are unchanged (their masked weights are 0).
    """
    kv_length = attention_mask.shape[1]
    queries = torch.arange(query_length) + (kv_length - query_length)
    causal = torch.arange(kv_length)[None, :] <= queries[:, None]
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


class _ExplicitKV(nn.Module):
    """The model as a function of tensors: (input_ids, attention_mask, position_ids, k0, v0, k1, ...) ->
    (logits, k0', v0', ...)."""

    def __init__(self, model, shortcuts=None):
        super().__init__()
        self.model = model
        self.shortcuts = shortcuts  # registered here so the tracer sees their weights as parameters, not closures
        self.requires_grad_(False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # Fill the layers directly: `DynamicCache(pairs)` would concatenate each past onto a 1-D empty tensor,
        # which traces into a Concat that OpenVINO rejects.
        cache = DynamicCache(config=self.model.config)
        for layer, keys, values in zip(cache.layers, past[0::2], past[1::2], strict=True):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        mask = _additive_causal_mask(attention_mask, input_ids.shape[1])
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1], *present)


def _kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _convert(model, shortcuts, num_layers: int, kv_heads: int, head_dim: int):
    """Trace the wrapper on a small example (past length 2) and convert it with batch, sequence and past dynamic."""
    import openvino as ov

    batch, seq, past_len = 2, 3, 2  # a non-zero past, so tracing sees the concatenation; shapes are dynamic anyway
    ids = torch.ones(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * num_layers)]
    dynamic_2d, dynamic_kv = ov.PartialShape([-1, -1]), ov.PartialShape([-1, kv_heads, -1, head_dim])
    shapes = [(dynamic_2d, ov.Type.i64)] * 3 + [(dynamic_kv, ov.Type.f32)] * (2 * num_layers)
    # The tracer warns about Python branches on shapes in transformers' cache, mask and SDPA code. Each is taken the
    # same way for every shape (the SDPA path traced for 3 queries is the general one); the tests decode with past
    # lengths 0.. and 1-token queries against PyTorch.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit.trace", DeprecationWarning)  # OpenVINO's frontend traces with it
        ov_model = ov.convert_model(
            _ExplicitKV(model, shortcuts), example_input=(ids, mask, positions, *past), input=shapes
        )
    inputs = ["input_ids", "attention_mask", "position_ids", *_kv_names(num_layers, "past")]
    for port, name in zip(ov_model.inputs, inputs):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, ["logits", *_kv_names(num_layers, "present")]):
        port.get_tensor().set_names({name})
    return ov_model


def _compress(ov_model, weights: str, group_size: int, ratio: float):
    import nncf

    if weights == "int8":
        return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    # a weight whose input size group_size does not divide gets the largest power-of-two group (>= 32) that does,
    # else INT8; `_weight_formats` records what each weight got
    adjust = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
    return nncf.compress_weights(
        ov_model,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=group_size,
        ratio=ratio,
        advanced_parameters=adjust,
    )


def _weight_formats(ov_model) -> dict[str, int]:
    """How many weight matrices the IR holds in each format: 'f32', 'u8' (per channel), 'u4/g<group size>'.

    Weight constants keep their PyTorch parameter names; a grouped INT4 weight has shape (out, groups, group size).
    """
    counts = Counter()
    for op in ov_model.get_ops():
        if op.get_type_name() != "Constant" or not op.get_friendly_name().endswith(".weight"):
            continue
        shape, kind = list(op.get_output_shape(0)), op.get_element_type().get_type_name()
        if len(shape) >= 2:  # not the RMSNorm scales
            counts[f"{kind}/g{shape[-1]}" if len(shape) == 3 else kind] += 1
    return dict(sorted(counts.items()))


def export_openvino(
    model_dir: str | Path,
    out_dir: Path,
    weights: str = "fp32",
    *,
    group_size: int = 64,
    int4_ratio: float = 1.0,
    revision: str | None = None,
) -> dict:
    """Export the causal LM in `model_dir` (with its HeteroLoRA shortcuts, if any) to OpenVINO IR in `out_dir`.

    Returns the `openvino_export.json` record plus `size_on_disk_mb` (xml + bin), `export_seconds` (load, trace,
    convert) and `compress_seconds` (NNCF; 0 for fp32).
    """
    return export_openvino_formats(
        model_dir, {weights: out_dir}, group_size=group_size, int4_ratio=int4_ratio, revision=revision
    )[weights]


def export_openvino_formats(
    model_dir: str | Path,
    out_dirs: dict[str, Path],
    *,
    group_size: int = 64,
    int4_ratio: float = 1.0,
    revision: str | None = None,
) -> dict[str, dict]:
    """`export_openvino` for several weight modes ({mode: folder}), tracing the model once."""
    unknown = [w for w in out_dirs if w not in WEIGHT_MODES]
    if unknown:
        raise NlsflowError(
            f"weights={unknown[0]!r} is not an OpenVINO export mode; use one of {', '.join(WEIGHT_MODES)}"
        )
    if not openvino_available():
        raise NlsflowError("OpenVINO export needs the openvino and nncf packages; pip install openvino nncf")
    import openvino as ov

    model_dir = Path(model_dir)
    start = time.perf_counter()
    model = load_causal_lm(str(model_dir), "float32", torch.device("cpu"), revision)
    shortcuts = load_shortcuts(model, model_dir)
    config = model.config
    num_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    converted = _convert(model, shortcuts, num_layers, kv_heads, head_dim)
    export_seconds = time.perf_counter() - start

    records = {}
    for weights, out_dir in out_dirs.items():
        start = time.perf_counter()
        ov_model = converted if weights == "fp32" else _compress(converted.clone(), weights, group_size, int4_ratio)
        compress_seconds = time.perf_counter() - start
        with atomic_dir(Path(out_dir)) as tmp:
            ov.save_model(ov_model, tmp / MODEL_XML, compress_to_fp16=False)
            copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
            for name in copied:
                shutil.copy2(model_dir / name, tmp / name)
            int4 = weights == "int4"
            record = {
                "weights": weights,
                "group_size": group_size if int4 else None,
                "int4_ratio": int4_ratio if int4 else None,
                "weight_formats": _weight_formats(ov_model),
                "num_layers": num_layers,
                "kv_heads": kv_heads,
                "head_dim": head_dim,
                "vocab_size": config.vocab_size,
                "shortcut_layers": sorted(map(int, shortcuts.keys())) if shortcuts else [],
                "source": str(model_dir.resolve()),
                "revision": revision,
                "tokenizer_files": copied,
            }
            atomic_write_text(tmp / EXPORT_FILE, json.dumps(record, indent=2))
            size = sum((tmp / name).stat().st_size for name in (MODEL_XML, MODEL_BIN))
        log.info("exported %s to OpenVINO %s in %s (%.1f MB)", model_dir, weights, out_dir, size / 1e6)
        records[weights] = {
            **record,
            "size_on_disk_mb": size / 1e6,
            "export_seconds": export_seconds,
            "compress_seconds": compress_seconds,
        }
    return records


class OpenVINODecoder:
    """Greedy decoding of an `export_openvino` folder on OpenVINO's CPU runtime.

    Two infer requests take turns: each step's present keys and values, left in the request's output tensors
    (`share_outputs`), are bound as the other request's past inputs (`set_tensor`, no copy); a request's outputs
    are only rewritten by its own next step, after the other request has read them. Copying the cache in and out
    instead costs time that grows with the context and the batch.
    """

    def __init__(self, ov_dir: str | Path, num_threads: int | None = None, inference_precision: str = "f32"):
        import openvino as ov

        ov_dir = Path(ov_dir)
        if not ((ov_dir / MODEL_XML).is_file() and (ov_dir / EXPORT_FILE).is_file()):
            raise NlsflowError(
                f"{ov_dir} is not an OpenVINO export (no {MODEL_XML} or {EXPORT_FILE}); re-run the benchmark stage"
            )
        self.info = json.loads((ov_dir / EXPORT_FILE).read_text())
        # f32 activations by default: on CPUs with bf16 units the plugin would otherwise compute in bf16
        properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision}
        if num_threads is not None:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        compiled = ov.Core().compile_model(ov_dir / MODEL_XML, "CPU", properties)
        self.requests = [compiled.create_infer_request() for _ in range(2)]
        self.steps = 0
        self.past_names = _kv_names(self.info["num_layers"], "past")
        self.present_names = _kv_names(self.info["num_layers"], "present")
        self.cache: list = []  # ov.Tensors: the previous step's outputs
        self.mask = None
        self.logits = None  # the last call's last-position logits, (batch, vocab) float32

    def _step(self, input_ids: np.ndarray) -> torch.Tensor:
        import openvino as ov

        request = self.requests[self.steps % 2]
        self.steps += 1
        positions = position_ids(torch.from_numpy(self.mask), input_ids.shape[1]).numpy()
        for name, array in (("input_ids", input_ids), ("attention_mask", self.mask), ("position_ids", positions)):
            request.set_tensor(name, ov.Tensor(array))  # a copy
        for name, past in zip(self.past_names, self.cache, strict=True):
            request.set_tensor(name, past)
        request.infer(share_outputs=True)  # by default every output would be copied into a numpy array
        self.cache = [request.get_tensor(name) for name in self.present_names]
        self.logits = request.get_tensor("logits").data.copy()
        return torch.from_numpy(self.logits.argmax(-1)).long().unsqueeze(1)

    def prefill(self, input_ids, attention_mask) -> torch.Tensor:
        import openvino as ov

        input_ids = np.asarray(input_ids.cpu(), dtype=np.int64)
        self.mask = np.asarray(attention_mask.cpu(), dtype=np.int64)
        empty = np.zeros((len(input_ids), self.info["kv_heads"], 0, self.info["head_dim"]), dtype=np.float32)
        self.cache = [ov.Tensor(empty)] * len(self.past_names)
        return self._step(input_ids)

    def decode(self, tokens) -> torch.Tensor:
        tokens = np.asarray(tokens.cpu(), dtype=np.int64)
        self.mask = np.concatenate([self.mask, np.ones_like(tokens)], axis=1)
        return self._step(tokens)

    def synchronize(self) -> None:  # infer() is synchronous
        pass
