"""Which config files a (task, profile, method) run merges, in order; the one rule `make`, the flow and the UI share.

    python -m nlsflow.layers math tiny shears    # prints: --config configs/tasks/math.yaml --config ...

Later files win: the task, the profile (model scale), the profile's file for the task, the method, then the
profile's files for the method and for the method on the task, each where it exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nlsflow.errors import NlsflowError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _names(folder: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / folder).glob("*.yaml") if "." not in p.stem)


def config_files(task: str, profile: str, method: str, root: Path = CONFIGS) -> list[Path]:
    for kind, folder, name in (
        ("task", "tasks", task),
        ("profile", "profiles", profile),
        ("method", "methods", method),
    ):
        if not (root / folder / f"{name}.yaml").is_file():
            raise NlsflowError(f"unknown {kind} {name!r}: no {root / folder / name}.yaml; choose from {_names(folder)}")
    profiles = root / "profiles"
    optional = [
        profiles / f"{profile}.{task}.yaml",
        root / "methods" / f"{method}.yaml",
        profiles / f"{profile}.{method}.yaml",
        profiles / f"{profile}.{method}.{task}.yaml",
    ]
    return [root / "tasks" / f"{task}.yaml", profiles / f"{profile}.yaml", *(p for p in optional if p.is_file())]


if __name__ == "__main__":
    try:
        files = config_files(*sys.argv[1:4])
    except (NlsflowError, TypeError) as e:
        sys.exit(
            f"error: {e if isinstance(e, NlsflowError) else 'usage: python -m nlsflow.layers TASK PROFILE METHOD'}"
        )
    print(" ".join(f"--config {p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p}" for p in files))
