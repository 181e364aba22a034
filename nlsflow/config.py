"""Loading a run's config: YAML files merged in order, dotted `key=value` overrides, validated into PipelineConfig."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nlsflow.errors import NlsflowError, format_validation_error
from nlsflow.yaml12 import yaml_load
from schemas.config import PipelineConfig
from schemas.methods import MOVED_TRAIN_KEYS

log = logging.getLogger("nlsflow")

RUN_CONFIG_NAME = "config.yaml"
# The first line of the resolved config the pipeline writes into a run folder: stages run alone read that file,
# and the folder it sits in is the run folder (a copied run works in the copy).
RUN_CONFIG_HEADER = "# nlsflow run config: the resolved settings of this run (written by flows.pipeline)\n"


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise NlsflowError(
                f"override {dotted}: '{key}' is not a section; use a key inside a section like prune.sparsity=0.5"
            )
        tree = node
    tree[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise NlsflowError(f"override {item!r} is not key=value; write e.g. prune.sparsity=0.5")
    return key, yaml_load(raw) if raw else ""


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NlsflowError(f"config file {path} not found; pass an existing YAML (see configs/)")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise NlsflowError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NlsflowError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    _refuse_moved_keys(data, str(path))
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("search_space_file"), str):  # relative to the file naming it
        train["search_space_file"] = str((path.parent / train["search_space_file"]).resolve())
    return data


def _refuse_moved_keys(tree: dict, where: str) -> None:
    """A key of the old flat `train` section: one line saying where its setting lives now."""
    train = tree.get("train")
    for key in MOVED_TRAIN_KEYS.keys() & (train.keys() if isinstance(train, dict) else set()):
        raise NlsflowError(f"config error in {where}: train.{key} has moved; write {MOVED_TRAIN_KEYS[key]}")


def load_config(paths: list[Path], overrides: list[str] = ()) -> PipelineConfig:
    """Merge YAML files in order, apply dotted overrides, validate.

    The run folder is `run_dir=` from the overrides if given, else the folder of a run config among the files
    (what the pipeline wrote there, RUN_CONFIG_HEADER), else the files' run_dir.
    """
    tree: dict = {}
    for path in paths:
        tree = _deep_merge(tree, load_yaml(path))
    keys = []
    for item in overrides:
        if isinstance(tree.get("method"), str):  # `method: nola` is short for {name: nola}: overrides may add fields
            tree["method"] = {"name": tree["method"]}
        key, value = parse_override(item)
        _refuse_moved_keys({"train": {key.split(".")[1]: None}} if key.startswith("train.") else {}, f"override {item}")
        _set_dotted(tree, key, value)
        keys.append(key)
    _refuse_moved_keys(tree, "the overrides")  # a whole `train={...}` section given on the command line
    _expand_search_space_file(tree)
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise NlsflowError(
            f"config error in {_blame(e, paths, overrides, keys)}: {format_validation_error(e)}"
        ) from None
    from nlsflow.data.datasets import EVAL_DATASETS

    for field in ("datasets", "outside_average"):
        if unknown := [d for d in getattr(cfg.evaluate, field) if d not in EVAL_DATASETS]:
            raise NlsflowError(
                f"config error in {_blame(None, paths, overrides, keys, f'evaluate.{field}')}: evaluate.{field}: "
                f"unknown datasets {unknown}; choose from {sorted(EVAL_DATASETS)}"
            )
    if "run_dir" not in keys and (run_configs := [p for p in paths if is_run_config(p)]):
        folder = Path(run_configs[-1]).resolve().parent
        if Path(cfg.run_dir) != folder:
            log.warning(
                "run folder: %s, where %s sits (the file names %s: a copied run)", folder, run_configs[-1], cfg.run_dir
            )
            cfg = cfg.model_copy(update={"run_dir": str(folder)})
    return cfg


def _blame(error: ValidationError | None, paths, overrides, keys: list[str], dotted: str = "") -> str:
    """Where a config error comes from: the command-line overrides that set the faulty keys, else the files."""
    locs = [".".join(str(p) for p in err["loc"]) for err in error.errors()] if error else [dotted]
    guilty = [
        item
        for item, key in zip(overrides, keys)
        if any(loc == key or loc.startswith(key + ".") or key.startswith(loc + ".") for loc in locs)
    ]
    if guilty:
        return "the command line (" + " ".join(guilty) + ")"
    return ", ".join(map(str, paths)) or "the overrides"


def is_run_config(path: Path) -> bool:
    """A run's resolved config, written by the pipeline (its first line is RUN_CONFIG_HEADER)."""
    try:
        with open(path) as f:
            return f.readline() == RUN_CONFIG_HEADER
    except OSError:
        return False


def write_run_config(cfg: PipelineConfig) -> Path:
    """Write the resolved config to <run_dir>/config.yaml, unless the same is there; never over a user's own file."""
    from nlsflow.io import atomic_write_text

    path = Path(cfg.run_dir) / RUN_CONFIG_NAME
    text = RUN_CONFIG_HEADER + dump_config(cfg)
    if path.exists():
        if not is_run_config(path):
            raise NlsflowError(
                f"{path} is not a run config nlsflow wrote, and the pipeline writes the run's resolved config there; "
                "move your file out of the run folder (e.g. into configs/) and pass it with --config"
            )
        if path.read_text() == text:
            return path
    atomic_write_text(path, text)
    return path


def _expand_search_space_file(tree: dict) -> None:
    """Resolve `train.search_space_file` into inline groups, so the resolved config (and resume) sees its content.

    Its `search` block (num_evals, population, ref_acc, acc_delta) gives defaults the YAML's own `search` overrides.
    """
    train = tree.get("train") or {}
    if not train.get("search_space_file"):
        return
    # from a YAML file it is already absolute (load_yaml); from the command line, relative to the working directory
    train["search_space_file"] = str(Path(train["search_space_file"]).expanduser().resolve())
    from nlsflow.search.space_file import add_fixed_groups, load_search_space  # heavy imports, only when used

    try:
        space = load_search_space(train["search_space_file"], rank=train.get("rank"))
    except FileNotFoundError:
        raise NlsflowError(f"train.search_space_file {train['search_space_file']} not found") from None
    if train.get("target_modules") and train.get("rank"):
        space = add_fixed_groups(space, train["target_modules"], train["rank"])
    plain = space.to_dict()
    train["groups"] = plain["groups"]
    if plain["width_groups"]:  # elastic base width: LoNAS's, the method's own setting
        method = tree.get("method", "shears")
        method = {"name": method} if isinstance(method, str) else method
        if method.get("name") != "lonas":
            raise NlsflowError(
                f"train.search_space_file {train['search_space_file']} has width groups, which only method lonas "
                f"trains (method is {method.get('name')!r}); use method: lonas or a file without width groups"
            )
        tree["method"] = {**method, "width_groups": plain["width_groups"]}
    tree["train"] = train
    tree["search"] = _deep_merge(space.search, tree.get("search") or {})


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
