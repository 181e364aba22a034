"""One process of the bench's process-count row (bench/accelerate_loop.py), started by `accelerate launch` or as a
plain interpreter: trains the config's steps with `train_supernet` and, on the main process, writes the ms per step
after the first (warm-up) step, its threads and the process count to --result (JSON). An error is printed as
`rank N failed: <one line>`, as stages.train_worker prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from bench.accelerate_loop import build, ms_per_step
from nlsflow.config import load_config
from nlsflow.io import atomic_write_text
from nlsflow.methods import method_for
from nlsflow.models import resolve_device
from nlsflow.training import leave_process_group, make_accelerator, train_supernet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the resolved config (train.max_steps: 1 + timed)")
    parser.add_argument("--base-dir", required=True, help="the base model's folder or hub id")
    parser.add_argument("--revision", help="the hub id's revision")
    parser.add_argument("--records", type=Path, required=True, help="the training records (JSON list)")
    parser.add_argument("--result", type=Path, required=True, help="where the main process writes its timing")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config([args.config])
        method = method_for(cfg)
        accelerator = make_accelerator(cfg.train, resolve_device(cfg.device).type, method)
        records = json.loads(args.records.read_text())
        net, data = build(cfg, method, args.base_dir, args.revision, records, accelerator.device)
        ms = ms_per_step(train_supernet, method, net, data, cfg.train, cfg.seed, skip=1, accelerator=accelerator)
        leave_process_group()
        if accelerator.is_main_process:
            timing = {"ms_per_step": ms, "threads": torch.get_num_threads(), "processes": accelerator.num_processes}
            atomic_write_text(args.result, json.dumps(timing))
    except Exception as e:  # noqa: BLE001 - one line for the bench, the trace beside it
        traceback.print_exc()
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
