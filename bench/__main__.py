"""`python -m bench --profile tiny|smollm2 [--out runs/bench] [--repeats N] [key=value ...]`

Runs every comparison on the profile's real config (task math, method shears) and writes
`<out>/bench-<profile>.parquet` (table "bench") and `.md`, then prints the table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from bench import accelerate_loop, generation, search, training, wanda, workers
from bench.context import load_context, profile_config
from bench.runner import render, write_bench
from nlsflow.cli import expand_args
from nlsflow.errors import NlsflowError

COMPARISONS = {
    "training": training,
    "accelerate": accelerate_loop,
    "wanda": wanda,
    "search": search,
    "generation": generation,
    "workers": workers,
}


def bench(
    profile: str,
    out: Path = Path("runs/bench"),
    repeats: int | None = None,
    overrides: list[str] = (),
    only: list[str] = tuple(COMPARISONS),
    plan: bool = False,
) -> tuple[list[dict], Path] | None:
    """Run the comparisons in `only`; returns the rows and the Parquet file written. `plan`: check the settings and
    say what would run, run nothing (returns None)."""
    unknown = sorted(set(only) - COMPARISONS.keys())
    if unknown:
        raise NlsflowError(f"unknown comparisons {unknown}; choose from {list(COMPARISONS)}")
    if repeats is not None and repeats < 1:
        raise NlsflowError(f"--repeats {repeats}: at least 1 is needed")
    if plan:
        cfg = profile_config(profile, list(overrides))
        print(f"bench: {', '.join(only)} on {cfg.model.name_or_path} ({profile}), written to {out}/bench-{profile}.*")
        return None
    ctx = load_context(profile, list(overrides), repeats)
    start, rows = time.perf_counter(), []
    for name in only:
        rows += COMPARISONS[name].run(ctx)
    title = (
        f"nlsflow vs peers, profile {profile} ({time.perf_counter() - start:.0f} s, device {ctx.device}, "
        f"{torch.get_num_threads()} threads)"
    )
    parquet, md = write_bench(rows, out, profile, title)
    render([{**r, "profile": profile} for r in rows], title)
    print(f"wrote {parquet} and {md}")
    return rows, parquet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[2])
    parser.add_argument("--profile", required=True, help="configs/profiles/<profile>.yaml: tiny or smollm2")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder of bench-<profile>.parquet/.md")
    parser.add_argument("--repeats", type=int, help="measured rounds per comparison (default: the profile's)")
    parser.add_argument("--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {list(COMPARISONS)}")
    parser.add_argument("--plan", action="store_true", help="check the settings; say what would run, run nothing")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. data.root=/data")
    try:
        argv = expand_args(sys.argv[1:] if argv is None else argv)  # make's ARGS, as one `--args TEXT`
    except NlsflowError as e:
        print(f"error: bench: {e}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*"
    )  # raised inside PEFT, not actionable here
    try:
        bench(args.profile, args.out, args.repeats, args.overrides, args.only.split(","), args.plan)
    except NlsflowError as e:
        print(f"error: bench: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
