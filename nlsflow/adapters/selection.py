"""HeteroLoRA (Zhang et al., 2024): which LoRA and shortcut modules train, chosen by zero-cost saliency proxies.

The candidates are the PEFT model's LoRA modules and the shortcut modules (`nlsflow.adapters.shortcuts`). A proxy scores
each on a few training batches with every candidate switched on:
- constant: 1 for all (the order of the ties is random for the seed: a seeded random choice);
- snip: sum |w * dL/dw| over the module's factors;
- synflow: sum |w * dR/dw| with the factors replaced by |w| and R the sum of the logits (data-driven SynFlow);
- grad_norm: the norm of dL/dw over the module's factors;
- alpha_test: the loss increase when the module alone is switched off (its alpha set to 0).
A module whose B is still all zeros (untrained LoRA starts that way) is scored with a seeded random B of std
`probe_std`, put back afterwards: so every proxy scores it by what it would do once trained (with B = 0, snip,
synflow and alpha_test give 0, and grad_norm sees B's gradient only).
Switching a module off sets its scaling to 0 and freezes its factors; nothing else changes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from nlsflow.adapters.shortcuts import Shortcut, Shortcuts, save_shortcuts
from nlsflow.io import atomic_dir

log = logging.getLogger(__name__)
PROXIES = ("constant", "snip", "synflow", "grad_norm", "alpha_test")
ADAPTER = "default"


@dataclass
class Candidate:
    name: str  # a LoRA module's name in the base model, or "shortcut.<layer>"
    kind: str  # "lora" or "shortcut"
    module: nn.Module  # the LoraLayer or the Shortcut
    A: nn.Parameter
    B: nn.Parameter
    scaling: float  # the module's scaling when switched on

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def params_per_rank(self) -> int:
        return self.A.shape[1] + self.B.shape[0]


def candidates(peft_model, shortcuts: Shortcuts | None) -> list[Candidate]:
    """Every LoRA module (in model order), then every shortcut (by layer)."""
    out = []
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            out.append(
                Candidate(
                    name.removeprefix("base_model.model."),
                    "lora",
                    m,
                    m.lora_A[ADAPTER].weight,
                    m.lora_B[ADAPTER].weight,
                    m.scaling[ADAPTER],
                )
            )
    for layer, s in (shortcuts or {}).items():
        out.append(Candidate(f"shortcut.{layer}", "shortcut", s, s.A.weight, s.B.weight, s.scaling))
    return out


def set_enabled(cands: list[Candidate], enabled: set[str]) -> None:
    for c in cands:
        on = c.name in enabled
        if isinstance(c.module, Shortcut):
            c.module.enabled = on
        else:
            c.module.scaling[ADAPTER] = c.scaling if on else 0.0
        c.A.requires_grad_(on)
        c.B.requires_grad_(on)


def enabled_names(cands: list[Candidate]) -> set[str]:
    return {c.name for c in cands if c.A.requires_grad}


@contextmanager
def _probe_zero_b(cands: list[Candidate], std: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    zero = [c for c in cands if not c.B.detach().any()]
    with torch.no_grad():
        for c in zero:
            c.B.copy_(torch.randn(c.B.shape, generator=generator) * std)
    try:
        yield
    finally:
        with torch.no_grad():
            for c in zero:
                c.B.zero_()


@contextmanager
def _absolute_factors(cands: list[Candidate]):
    saved = [(p, p.detach().clone()) for c in cands for p in (c.A, c.B)]
    with torch.no_grad():
        for p, _ in saved:
            p.abs_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _grads(model, cands: list[Candidate], batches: list[dict], objective) -> list[tuple[torch.Tensor, torch.Tensor]]:
    params = [p for c in cands for p in (c.A, c.B)]
    total = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for t, g in zip(total, torch.autograd.grad(objective(model, batch), params, allow_unused=True)):
            if g is not None:
                t += g
    return list(zip(total[0::2], total[1::2]))


def _weight_times_grad(cands: list[Candidate], grads) -> list[float]:
    return [
        float((c.A.detach() * ga).abs().sum() + (c.B.detach() * gb).abs().sum()) for c, (ga, gb) in zip(cands, grads)
    ]


def _loss(model, batch) -> torch.Tensor:
    return model(**batch).loss.float()


def _logit_sum(model, batch) -> torch.Tensor:
    return model(**batch).logits.float().sum()


def score(
    model, cands: list[Candidate], batches: list[dict], proxy: str, probe_std: float, seed: int
) -> dict[str, float]:
    """One score per candidate (higher: more important). The model's mode and switches are restored."""
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose from {PROXIES}")
    before, was_training = enabled_names(cands), model.training
    set_enabled(cands, {c.name for c in cands})
    model.eval()  # no dropout: the same batches give the same scores
    try:
        with _probe_zero_b(cands, probe_std, seed):
            if proxy == "constant":
                scores = [1.0] * len(cands)
            elif proxy == "alpha_test":
                scores = _alpha_test(model, cands, batches)
            elif proxy == "synflow":
                with _absolute_factors(cands):
                    grads = _grads(model, cands, batches, _logit_sum)
                    scores = _weight_times_grad(cands, grads)
            else:
                grads = _grads(model, cands, batches, _loss)
                if proxy == "snip":
                    scores = _weight_times_grad(cands, grads)
                else:
                    scores = [math.sqrt(float(ga.square().sum() + gb.square().sum())) for ga, gb in grads]
    finally:
        set_enabled(cands, before)
        model.train(was_training)
    return {c.name: s for c, s in zip(cands, scores)}


@torch.no_grad()
def _alpha_test(model, cands: list[Candidate], batches: list[dict]) -> list[float]:
    def mean_loss():
        return sum(_loss(model, b).item() for b in batches) / len(batches)

    everything = {c.name for c in cands}
    reference, scores = mean_loss(), []
    for c in cands:
        set_enabled(cands, everything - {c.name})
        scores.append(mean_loss() - reference)
    set_enabled(cands, everything)
    return scores


def ranking(scores: dict[str, float], seed: int) -> list[str]:
    """Names by descending score; ties in an order fixed by the seed."""
    names = sorted(scores)
    random.Random(seed).shuffle(names)
    position = {n: i for i, n in enumerate(names)}
    return sorted(scores, key=lambda n: (-scores[n], position[n]))


def select_top(scores: dict[str, float], kinds: dict[str, str], fraction: float, combined: bool, seed: int) -> set[str]:
    """The top `fraction` of the candidates (at least one), of all together or of LoRA and shortcuts separately."""
    order = ranking(scores, seed)
    pools = [order] if combined else [[n for n in order if kinds[n] == k] for k in ("lora", "shortcut")]
    return {n for pool in pools if pool for n in pool[: max(1, round(fraction * len(pool)))]}


def allocate_ranks(
    scores: dict[str, float], choices: dict[str, tuple[int, ...]], params_per_rank: dict[str, int], budget: int
) -> dict[str, int]:
    """Ranks proportional to the scores under a parameter budget: rank_n = the largest choice <= k * score_n / max
    score, with the largest k whose adapter fits in `budget` parameters; what is left then raises the best-scored
    modules. 0 means the module is switched off (so is any module scoring <= 0)."""
    top = max(max(scores.values()), 1e-30)
    weight = {n: max(s, 0.0) / top for n, s in scores.items()}

    def ranks_at(k: float) -> dict[str, int]:
        return {n: max((c for c in choices[n] if c <= k * weight[n] + 1e-9), default=0) for n in scores}

    def cost(ranks):
        return sum(r * params_per_rank[n] for n, r in ranks.items())

    low, high = (
        0.0,
        max(max(c) for c in choices.values()) / max(min((w for w in weight.values() if w > 0), default=1), 1e-30),
    )
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(ranks_at(middle)) <= budget else (low, middle)
    ranks = ranks_at(high) if cost(ranks_at(high)) <= budget else ranks_at(low)
    for n in sorted(scores, key=lambda n: -scores[n]):  # what rounding down left over: raise the best-scored first
        if weight[n] > 0:
            ranks[n] = max(
                (c for c in choices[n] if c >= ranks[n] and cost({**ranks, n: c}) <= budget), default=ranks[n]
            )
    return ranks


@dataclass
class Choice:
    """A selection: the enabled candidates, their ranks (rank_budget; else their full rank), and the scores."""

    enabled: set[str]
    ranks: dict[str, int]
    scores: dict[str, float]

    def lora_modules(self, cands: list[Candidate]) -> list[str]:
        return [c.name for c in cands if c.kind == "lora" and c.name in self.enabled]

    def shortcut_layers(self, cands: list[Candidate]) -> list[int]:
        return [int(c.name.split(".")[1]) for c in cands if c.kind == "shortcut" and c.name in self.enabled]


def choose(
    model, cands: list[Candidate], batches: list[dict], settings, rank_choices: dict[str, tuple[int, ...]], seed: int
) -> Choice:
    """Score the candidates and select (`settings`: method.selection; `rank_choices`: per candidate, descending)."""
    scores = score(model, cands, batches, settings.proxy, settings.probe_std, seed)
    if settings.select == "rank_budget":
        per_rank = {c.name: c.params_per_rank for c in cands}
        budget = int(settings.rank_budget * sum(rank_choices[c.name][0] * c.params_per_rank for c in cands))
        ranks = {n: r for n, r in allocate_ranks(scores, rank_choices, per_rank, budget).items() if r > 0}
        return _with_a_lora_module(Choice(set(ranks), ranks, scores), cands, rank_choices, seed, lowest=True)
    enabled = select_top(
        scores, {c.name: c.kind for c in cands}, settings.turn_on_percentile, settings.ranking == "combined", seed
    )
    choice = Choice(enabled, {c.name: c.rank for c in cands if c.name in enabled}, scores)
    return _with_a_lora_module(choice, cands, rank_choices, seed)


def _with_a_lora_module(
    choice: Choice, cands: list[Candidate], choices: dict[str, tuple[int, ...]], seed: int, lowest: bool = False
) -> Choice:
    """A PEFT adapter needs one LoRA module at least: the best-scored one when only shortcuts were selected (at its
    lowest rank choice under a budget)."""
    if choice.lora_modules(cands):
        return choice
    best = next(n for n in ranking(choice.scores, seed) if n.split(".")[0] != "shortcut")
    rank = choices[best][-1] if lowest else choices[best][0]
    return Choice(choice.enabled | {best}, {**choice.ranks, best: rank}, choice.scores)


def candidate_rank_choices(cands: list[Candidate], groups) -> dict[str, tuple[int, ...]]:
    """Each candidate's allowed ranks: its elastic group's choices (LoRA) or its own rank (shortcut)."""
    out = {}
    for c in cands:
        suffix = c.name.rsplit(".", 1)[-1]
        out[c.name] = (
            next((tuple(g.choices) for g in groups if suffix in g.modules), (c.rank,))
            if c.kind == "lora"
            else (c.rank,)
        )
    return out


def groups_with_modules(groups: list, lora_modules: list[str]) -> list:
    """The elastic groups that still match an enabled LoRA module."""
    suffixes = {n.rsplit(".", 1)[-1] for n in lora_modules}
    return [g for g in groups if suffixes & set(g.modules)]


def space_with_modules(space: list, lora_modules: list[str]) -> list:
    """The search space restricted to the enabled LoRA modules (variables left empty are dropped)."""
    names = {f"base_model.model.{n}" for n in lora_modules}
    kept = [replace(v, modules=tuple(m for m in v.modules if m in names)) if v.kind == "rank" else v for v in space]
    return [v for v in kept if v.modules]


def save_adapter(
    peft_model, lora_modules: list[str], shortcuts: Shortcuts | None, shortcut_layers: list[int], out_dir: Path
) -> None:
    """A stock PEFT adapter folder with only the enabled LoRA modules (plus the enabled shortcuts' files)."""
    prefixes = tuple(f"base_model.model.{n}." for n in lora_modules)
    state = {k: v for k, v in get_peft_model_state_dict(peft_model).items() if k.startswith(prefixes)}
    config = copy.deepcopy(peft_model.peft_config[ADAPTER])
    config.target_modules, config.inference_mode = sorted(lora_modules), True
    with atomic_dir(Path(out_dir)) as tmp:
        config.save_pretrained(tmp)
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if shortcuts is not None and shortcut_layers:
            save_shortcuts(shortcuts, tmp, shortcut_layers)


class Reselection:
    """Dynamic mode: every `interval` steps re-score all candidates at the maximal subnet and switch on the chosen
    ones; the log line and `rows` (the heterolora_log table) say what changed."""

    def __init__(
        self,
        model,
        cands: list[Candidate],
        settings,
        choices: dict[str, tuple[int, ...]],
        steps_per_epoch: int,
        batches,
        seed: int,
    ):
        self.model, self.cands, self.settings, self.choices, self.batches, self.seed = (
            model,
            cands,
            settings,
            choices,
            batches,
            seed,
        )
        self.steps_per_epoch = steps_per_epoch
        self.interval = max(1, round(settings.realloc_every * steps_per_epoch))
        self.rows: list[dict] = []
        self.choice: Choice | None = None

    def due(self, step: int) -> bool:
        return (step - 1) % self.interval == 0

    def __call__(self, step: int) -> None:
        before = enabled_names(self.cands) if self.choice else set()
        self.choice = choose(self.model, self.cands, self.batches(step), self.settings, self.choices, self.seed + step)
        set_enabled(self.cands, self.choice.enabled)
        on, off, epoch = (
            sorted(self.choice.enabled - before),
            sorted(before - self.choice.enabled),
            (step - 1) / self.steps_per_epoch,
        )
        log.info(
            "HeteroLoRA step %d (epoch %.2f): %d of %d modules on; turned on %s; turned off %s",
            step,
            epoch,
            len(self.choice.enabled),
            len(self.cands),
            on,
            off,
        )
        self.rows.append(
            {
                "step": step,
                "epoch": epoch,
                "enabled": len(self.choice.enabled),
                "turned_on": json.dumps(on),
                "turned_off": json.dumps(off),
                "scores": json.dumps(self.choice.scores),
            }
        )
