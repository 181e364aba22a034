"""What every comparison needs: the profile's resolved config, base model, tokenizer, data and sizes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from nlsflow.adapters.elastic import Variable
from nlsflow.adapters.supernet import groups_from_config, make_supernet
from nlsflow.config import load_config
from nlsflow.data.datasets import generate_prompt, load_train_records, wikitext2
from nlsflow.layers import config_files
from nlsflow.models import load_causal_lm, load_tokenizer, materialize_base_model, resolve_device
from schemas import PipelineConfig


@dataclass(frozen=True)
class BenchSettings:
    """How much the bench measures; the config's own settings are used where these do not cap them."""

    repeats: int  # measured rounds: every variant once per round, in turn
    warmup: int  # rounds run first and discarded
    train_steps: int  # optimizer steps per training measurement
    loop_steps: int  # optimizer steps per measurement of the accelerate loop vs the plain one
    process_steps: int  # optimizer steps each 1- or 2-process run times, after its warm-up step
    search_records: int  # validation records per subnet evaluation (at most search.val_samples)
    search_new_tokens: int  # generated tokens per record (at most search.generation.max_new_tokens)
    search_evals: int  # distinct subnets of the NSGA-II run (at most search.num_evals)


# tiny: every Wanda run and every 1- or 2-process training run is a fresh process (~6 s of imports), so 3 rounds.
# smollm2 (SmolLM2-135M, 2 CPU cores): a training step is ~10 s and a Wanda run ~45 s, so 3 rounds of one step (two
# for the loop comparison, which looks for 2%), and the search scores 4 records of 16 tokens per subnet. Other
# profiles get smollm2's sizes.
SETTINGS = {
    "tiny": BenchSettings(
        repeats=3,
        warmup=1,
        train_steps=4,
        loop_steps=16,
        process_steps=8,
        search_records=16,
        search_new_tokens=12,
        search_evals=10,
    ),
    "smollm2": BenchSettings(
        repeats=3,
        warmup=1,
        train_steps=1,
        loop_steps=2,
        process_steps=2,
        search_records=4,
        search_new_tokens=16,
        search_evals=6,
    ),
}


@dataclass
class BenchContext:
    cfg: PipelineConfig
    settings: BenchSettings
    base_dir: str  # what from_pretrained loads: the materialized base model (dense, as `prune` starts from)
    revision: str | None  # a hub id's revision
    tokenizer: object
    device: torch.device
    records: list[dict]  # the task's training records, as `train` reads them

    def load_base(self):
        return load_causal_lm(self.base_dir, self.cfg.dtype, self.device, self.revision)

    def lora_config(self, rank_pattern: dict[str, int] | None = None) -> LoraConfig:
        """The LoRA config `train` builds (maximal rank on train.target_modules), optionally with per-module ranks."""
        tc = self.cfg.train
        return LoraConfig(
            r=tc.rank,
            lora_alpha=tc.alpha,
            lora_dropout=tc.dropout,
            target_modules=tc.target_modules,
            rank_pattern=rank_pattern or {},
            task_type="CAUSAL_LM",
        )

    def supernet(self, random_b: bool, seed: int = 0) -> tuple[object, list[Variable]]:
        """The super-adapter as `train` builds it (PEFT LoRA made elastic over train.groups) on a fresh base.

        Seeded: lora_A's init draws from torch's global generator. `random_b` fills lora_B with seeded noise
        (std 0.02), so that subnets differ as after training.
        """
        base = self.load_base()
        torch.manual_seed(seed)
        model = get_peft_model(base, self.lora_config())
        space = make_supernet(model, groups_from_config(self.cfg.train.groups), [])
        if random_b:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".lora_B." in name:
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        return model, space


def profile_config(profile: str, overrides: list[str] = (), task: str = "math", method: str = "shears"):
    """The config the bench measures: `config_files(task, profile, method)` and the overrides."""
    return load_config(config_files(task, profile, method), [f"run_dir={Path('runs') / 'bench'}", *overrides])


def load_context(
    profile: str, overrides: list[str] = (), repeats: int | None = None, task: str = "math", method: str = "shears"
) -> BenchContext:
    """The profile's config (`profile_config`), its base model and data."""
    cfg = profile_config(profile, overrides, task, method)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    settings = SETTINGS.get(profile, SETTINGS["smollm2"])
    if repeats is not None:
        settings = replace(settings, repeats=repeats)
    root, download = Path(cfg.data.root), cfg.data.download
    records = load_train_records(root, cfg.data.train_sets, download=download)
    texts = None
    if cfg.model.name_or_path == "tiny":  # as `prune`: the tiny model's tokenizer learns the task's training text
        texts = [generate_prompt(r["instruction"], r["input"], r["output"]) for r in records]
        texts += wikitext2(root, "valid", download=download).splitlines()
    base_dir = materialize_base_model(cfg.model, texts, cfg.seed)
    revision = cfg.model.revision if base_dir == cfg.model.name_or_path else None  # a hub id, loaded as is
    return BenchContext(
        cfg, settings, base_dir, revision, load_tokenizer(base_dir, revision), resolve_device(cfg.device), records
    )
