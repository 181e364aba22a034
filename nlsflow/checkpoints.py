"""Resumable training state: accelerate's save_state/load_state, holding only what training changes.

    checkpoints = Checkpoints(run_dir / ".cache" / f"train-{key}", key, every=200, keep=2)
    train_supernet(..., accelerator=accelerator, checkpoints=checkpoints)

A checkpoint `step-00000200/` holds the trained parameters (not the frozen base), the optimizer, scheduler and
fp16 scaler, every process's RNG states, the methods' hook states and the loop's own (step, loss log). It is
written into a hidden folder and renamed into place with its `meta.json` last, so a kill mid-save leaves the
previous one; the newest `keep` are kept. The folder is keyed by the run's train config and inputs, and a
checkpoint whose key differs from the run's is refused, never silently reused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_write_text, folder_bytes, share_tree

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("nlsflow")

META = "meta.json"
WEIGHTS = "trainable.safetensors"


class Checkpoints:
    def __init__(self, folder: Path, key: str, every: int | None, keep: int):
        self.folder, self.key, self.every, self.keep = Path(folder), key, every, keep
        self.resumed = 0  # the step the run resumed from

    def attach(self, accelerator: Accelerator, params: list[torch.nn.Parameter], *stateful: Any) -> None:
        """What to save: `params` (the trained parameters, in optimizer order) and objects with state_dict()."""
        from accelerate.utils import DistributedType

        self.accelerator, self.params = accelerator, params
        accelerator.register_for_checkpointing(*stateful)
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return  # sharded parameters: accelerate saves the whole sharded state its own way
        accelerator.register_save_state_pre_hook(self._save_trained)
        accelerator.register_load_state_pre_hook(self._load_trained)

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        return sorted(p for p in self.folder.glob("step-*") if (p / META).is_file())

    def save(self, step: int) -> None:
        acc, start = self.accelerator, time.perf_counter()
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".{final.name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_text(tmp / META, json.dumps({"key": self.key, "step": step}))
            share_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info(
                "checkpoint: step %d in %s (%.1f s, %.1f MB)",
                step,
                final,
                time.perf_counter() - start,
                folder_bytes(final) / 1e6,
            )
        acc.wait_for_everyone()

    def resume(self) -> None:
        """Load the newest checkpoint, if any; `resumed` says its step."""
        done = self.complete()
        if not done:
            return
        newest = done[-1]
        try:
            meta = json.loads((newest / META).read_text())
        except ValueError:
            raise NlsflowError(
                f"{newest / META} is not valid JSON; delete {newest} to resume from the one before"
            ) from None
        if meta.get("key") != self.key:
            raise NlsflowError(
                f"checkpoint {newest} was saved by a run of other settings or inputs (key {meta.get('key')}, this "
                f"run's {self.key}); delete {self.folder} to train from the start"
            )
        self.accelerator.load_state(str(newest))
        self.resumed = int(meta["step"])
        log.info("resuming training from step %d (%s)", self.resumed, newest)

    def clear(self) -> None:
        """Once the stage's result is in place: the checkpoints are of no further use."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _save_trained(self, models, weights: list, output_dir: str) -> None:
        weights.clear()  # not the whole model: the frozen base is the prune stage's
        if self.accelerator.is_main_process:
            tensors = {str(i): p.detach().to("cpu").contiguous() for i, p in enumerate(self.params)}
            save_file(tensors, os.path.join(output_dir, WEIGHTS))

    def _load_trained(self, models: list, input_dir: str) -> None:
        models.clear()
        path = Path(input_dir) / WEIGHTS
        tensors = load_file(path)
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(tensors[str(i)].shape) for i in range(len(tensors))] != shapes:
            raise NlsflowError(
                f"{path} holds other parameters than this run trains; delete {self.folder} to start over"
            )
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[str(i)])
