"""One process of a distributed train stage, as `accelerate launch` starts it (stages/train.py `launch`).

    accelerate launch --config_file multi-node.yaml --machine_rank 1 -m stages.train_worker --config R/config.yaml

On a second machine of a multi-machine run (see README, *Training on several GPUs and machines*) it is started by
hand like that; there, as on every process but the main one, it writes nothing. An error is printed as
`rank N failed: <one line>`, which the train stage turns into its own one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from nlsflow.config import load_config
from nlsflow.errors import NlsflowError
from nlsflow.interrupts import StageStopped, stop_handlers
from nlsflow.io import atomic_write_text
from nlsflow.training import leave_process_group
from stages.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the run's resolved config")
    parser.add_argument("--out", type=Path, help="the stage's output folder (main process)")
    parser.add_argument("--result", type=Path, help="where the main process writes the stage's output (JSON)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        with stop_handlers():
            output = train(load_config([args.config]), args.out)
        leave_process_group()
        if output is not None and args.result is not None:
            atomic_write_text(args.result, output.model_dump_json())
    except StageStopped as e:  # the training loop stops every process at the same step
        leave_process_group()
        return e.exit_code
    except NlsflowError as e:
        print(f"rank {rank} failed: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, the trace beside it
        traceback.print_exc()
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
