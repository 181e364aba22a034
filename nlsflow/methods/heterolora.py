"""HeteroLoRA: a zero-cost saliency proxy chooses which LoRA modules, and which low-rank shortcuts across decoder
layers, train; once before training (static) or every `realloc_every` of an epoch (dynamic).

The candidates are every LoRA module and, with `shortcuts`, a shortcut across every decoder layer. The adapter
and the search space keep the enabled modules only; `train/heterolora.json` is the final choice with its scores
and `train/heterolora_log.parquet` the history. Shortcuts are not LoRA: they travel as files beside the adapter
and the merged model, attached by `nlsflow.adapters.shortcuts.load_shortcuts`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from nlsflow.adapters import selection
from nlsflow.adapters.elastic import activate, maximal_subnet, pattern_key
from nlsflow.adapters.shortcuts import attach_shortcuts, copy_shortcuts, decoder_layers, has_shortcuts
from nlsflow.adapters.supernet import make_supernet, save_search_space
from nlsflow.artifacts import write_json, write_table
from nlsflow.methods.base import Method, ScoringBatches, Supernet, TrainHook
from schemas.files import HeteroLoraChoiceFile
from schemas.outputs import TrainOutput

log = logging.getLogger(__name__)


class _Reselect(TrainHook):
    """Dynamic mode: at every re-selection step, score the candidates at the maximal subnet and switch modules."""

    def __init__(self, reselection: selection.Reselection):
        self.reselection = reselection

    def before_step(self, step: int, net: Supernet) -> bool:
        if not self.reselection.due(step):
            return False
        activate(net.model, net.space, maximal_subnet(net.space))
        self.reselection(step)
        return True

    def state_dict(self) -> dict[str, Any]:
        choice = self.reselection.choice
        kept = (
            None
            if choice is None
            else {"enabled": sorted(choice.enabled), "ranks": choice.ranks, "scores": choice.scores}
        )
        return {"choice": kept, "rows": list(self.reselection.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reselection.rows = list(state["rows"])
        if (kept := state["choice"]) is not None:
            self.reselection.choice = selection.Choice(set(kept["enabled"]), dict(kept["ranks"]), dict(kept["scores"]))
            selection.set_enabled(self.reselection.cands, self.reselection.choice.enabled)


class HeteroLora(Method):
    name = "heterolora"

    def __init__(self, config, train, seed):
        super().__init__(config, train, seed)
        self.selection = config.selection
        self.may_leave_parameters_unused = config.selection.mode == "dynamic"  # switched-off modules get no gradient
        self.choice: selection.Choice | None = None  # static: chosen in build
        self.reselect: _Reselect | None = None  # dynamic: its hook keeps the choice and the history
        self.candidates: list[selection.Candidate] = []

    def build(self, model: nn.Module, scoring_batches: ScoringBatches) -> Supernet:
        sel, tc = self.selection, self.train
        peft_model = self._peft(model)
        groups = self.rank_groups()
        shortcuts = None
        if sel.shortcuts:  # a candidate shortcut across every decoder layer
            layers = list(range(len(decoder_layers(peft_model))))
            shortcuts = attach_shortcuts(peft_model, layers, sel.shortcut_rank, tc.alpha)
        if sel.mode == "static":  # choose once on the full candidate set, then build only what was chosen
            cands = selection.candidates(peft_model, shortcuts)
            choices = selection.candidate_rank_choices(cands, groups)
            self.choice = selection.choose(peft_model, cands, scoring_batches(0, sel.batches), sel, choices, self.seed)
            log.info("HeteroLoRA (static, %s): %d of %d modules on", sel.proxy, len(self.choice.enabled), len(cands))
            lora_modules, shortcut_layers = self.choice.lora_modules(cands), self.choice.shortcut_layers(cands)
            if shortcuts is not None:
                shortcuts.detach()
            ranks = {pattern_key(n): self.choice.ranks[n] for n in lora_modules if self.choice.ranks[n] != tc.rank}
            peft_model = self._peft(peft_model.unload(), lora_modules, ranks)
            groups = selection.groups_with_modules(groups, lora_modules)
            shortcuts = (
                attach_shortcuts(peft_model, shortcut_layers, sel.shortcut_rank, tc.alpha) if shortcut_layers else None
            )
        space = make_supernet(peft_model, groups, [])
        self.candidates = selection.candidates(peft_model, shortcuts)
        return Supernet(peft_model, space, groups, [], shortcuts)

    def _peft(self, model: nn.Module, target_modules: list[str] | None = None, rank_pattern: dict | None = None):
        from peft import get_peft_model

        return get_peft_model(model, self.lora_config(target_modules, rank_pattern))

    def hooks(self, net: Supernet, steps_per_epoch: int, scoring_batches: ScoringBatches) -> list[TrainHook]:
        if self.selection.mode != "dynamic":
            return []
        choices = selection.candidate_rank_choices(self.candidates, net.groups)
        self.reselect = _Reselect(
            selection.Reselection(
                net.model,
                self.candidates,
                self.selection,
                choices,
                steps_per_epoch,
                lambda step: scoring_batches(step, self.selection.batches),
                self.seed,
            )
        )
        return [self.reselect]

    def final_choice(self) -> tuple[selection.Choice, list[dict]]:
        if self.reselect is not None:
            return self.reselect.reselection.choice, self.reselect.reselection.rows
        return self.choice, []

    def trainable_count(self, net: Supernet) -> int:
        choice, _ = self.final_choice()
        return sum(c.A.numel() + c.B.numel() for c in self.candidates if c.name in choice.enabled)

    def save(self, net: Supernet, out_dir: Path) -> dict[str, Any]:
        """The adapter and search space hold the enabled modules only (`net` is narrowed to them, as the train stage
        then reports it); the choice and its history beside them."""
        choice, rows = self.final_choice()
        lora_modules, shortcut_layers = choice.lora_modules(self.candidates), choice.shortcut_layers(self.candidates)
        net.groups = selection.groups_with_modules(net.groups, lora_modules)
        net.space = selection.space_with_modules(net.space, lora_modules)
        selection.save_adapter(
            net.model, lora_modules, net.shortcuts, shortcut_layers, out_dir / TrainOutput.files.adapter
        )
        save_search_space(out_dir / TrainOutput.files.search_space, net.groups, [], net.space)
        chosen = HeteroLoraChoiceFile(
            settings=self.selection.model_dump(),
            enabled=sorted(choice.enabled),
            ranks=choice.ranks,
            scores=choice.scores,
        )
        write_json(out_dir / TrainOutput.files.heterolora, chosen)
        if rows:
            write_table(out_dir / TrainOutput.files.heterolora_log, "heterolora_log", rows)
        return {
            "heterolora_enabled": len(choice.enabled),
            "heterolora_candidates": len(choice.scores),
            "heterolora_reallocations": len(rows),
            "enabled_lora_modules": len(lora_modules),
            "enabled_shortcuts": len(shortcut_layers),
        }

    def copy_extras(self, adapter_dir: Path, dst: Path) -> None:
        if has_shortcuts(adapter_dir):  # not mergeable: they travel as files
            copy_shortcuts(adapter_dir, dst)
