"""One timing protocol for every runtime: greedy decoding split into prefill and per-token decode.

A runtime is a `Decoder`: `prefill(input_ids, attention_mask)` runs the (left-padded) prompt and returns the first
new token of each row, `decode(tokens)` feeds those tokens and returns the next ones, its KV cache kept inside.
PyTorch models (plain, PEFT, merged) use `TorchDecoder`; `nlsflow.deploy.openvino_format` has the OpenVINO one.
`time_decoding` times one pass, `summarize` turns several passes into medians and spreads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Protocol

import torch


class Decoder(Protocol):
    def prefill(self, input_ids, attention_mask): ...

    def decode(self, tokens): ...

    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class Timing:
    prefill_s: float
    decode_s_per_token: float  # after the first token, which prefill gives
    total_s: float
    tokens: int  # generated, all rows together


def position_ids(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Positions as `generate` numbers them (left pads count for nothing, and sit at 1): the last `query_length`."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -query_length:]


class TorchDecoder:
    """Greedy decoding of a transformers (or PEFT) causal LM with its own DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = self.mask = None

    @torch.inference_mode()
    def prefill(self, input_ids, attention_mask):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            position_ids=position_ids(attention_mask, input_ids.shape[1]),
        )
        self.cache, self.mask = out.past_key_values, attention_mask
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def decode(self, tokens):
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
            position_ids=position_ids(self.mask, 1),
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def time_decoding(decoder: Decoder, input_ids, attention_mask, new_tokens: int) -> Timing:
    """Prefill, then `new_tokens - 1` decode steps (greedy, no early stop), timed at the boundaries."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: at least 2 are needed to time decoding apart from prefill")
    decoder.synchronize()
    start = time.perf_counter()
    tokens = decoder.prefill(input_ids, attention_mask)
    decoder.synchronize()
    prefilled = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens = decoder.decode(tokens)
    decoder.synchronize()
    end = time.perf_counter()
    return Timing(prefilled - start, (end - prefilled) / (new_tokens - 1), end - start, len(input_ids) * new_tokens)


def repeat_timing(
    decoder: Decoder, input_ids, attention_mask, new_tokens: int, warmup: int, repeats: int
) -> list[Timing]:
    for _ in range(warmup):
        time_decoding(decoder, input_ids, attention_mask, new_tokens)
    return [time_decoding(decoder, input_ids, attention_mask, new_tokens) for _ in range(repeats)]


def median_spread(values: list[float]) -> tuple[float, float]:
    """The median and half the range: what `12.3 ± 0.4` means in the benchmark tables."""
    return statistics.median(values), (max(values) - min(values)) / 2


def summarize(timings: list[Timing]) -> dict[str, float]:
    """Medians and spreads of prefill ms, decode ms per token and tokens per second (end to end) over repeats."""
    columns = {
        "prefill_ms": [t.prefill_s * 1e3 for t in timings],
        "decode_ms_per_token": [t.decode_s_per_token * 1e3 for t in timings],
        "tokens_per_s": [t.tokens / t.total_s for t in timings],
    }
    out = {}
    for name, values in columns.items():
        out[name], out[f"{name}_spread"] = median_spread(values)
    return out
