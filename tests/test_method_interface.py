"""The method interface: one registry, typed method configs, stages that never ask which method runs, moved keys
refused in one line, impossible combinations unwritable, and the Shears artifact contract (a masked adapter is not
presented as a stock one; every extracted folder is checked, and a wrong one fails the stage by name).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CONFIGS, needs_data, tiny_overrides

from nlsflow.config import load_config
from nlsflow.errors import NlsflowError
from nlsflow.layers import config_files
from nlsflow.methods import METHODS, Artifact, method_for
from nlsflow.methods.heterolora import HeteroLora
from nlsflow.methods.lonas import Lonas
from nlsflow.methods.lora import Lora
from nlsflow.methods.nola import Nola
from nlsflow.methods.shears import Shears
from schemas.config import PipelineConfig
from schemas.methods import METHOD_NAMES, MOVED_TRAIN_KEYS, MethodConfig

CPU = torch.device("cpu")
EXPECTED_CLASS = {"lora": Lora, "shears": Shears, "lonas": Lonas, "nola": Nola, "heterolora": HeteroLora}
SHIPPED_METHODS = sorted(p.stem for p in (REPO / "configs" / "methods").glob("*.yaml"))


def _method_config_types() -> list[type]:
    """The members of the discriminated union `schemas.methods.MethodConfig`."""
    union = typing.get_args(MethodConfig)[0]  # Annotated[Union[...], Field(discriminator="name")]
    return list(typing.get_args(union))


def _type_name(config_type: type) -> str:
    return typing.get_args(config_type.model_fields["name"].annotation)[0]  # name: Literal["shears"]


# --- the registry -----------------------------------------------------------------------------------------------


def test_registry_names_are_the_schema_names_and_each_config_type_maps_to_its_class(tmp_path):
    assert list(METHODS) == list(METHOD_NAMES) == list(EXPECTED_CLASS)
    types = _method_config_types()
    assert sorted(_type_name(t) for t in types) == sorted(METHOD_NAMES)  # one config type per method
    for config_type in types:
        name = _type_name(config_type)
        assert config_type.model_fields["name"].default == name
        assert METHODS[name] is EXPECTED_CLASS[name] and METHODS[name].name == name
        # method_for picks the class from the config's type, and hands it that typed config
        cfg = load_config(config_files("math", "tiny", name), tiny_overrides(tmp_path))
        assert type(cfg.method) is config_type
        method = method_for(cfg)
        assert type(method) is EXPECTED_CLASS[name] and method.config is cfg.method and method.train is cfg.train


def test_the_shipped_method_files_are_the_registered_methods():
    assert SHIPPED_METHODS == sorted(METHOD_NAMES)


@pytest.mark.parametrize("task", ["math", "commonsense"])
@pytest.mark.parametrize("method", SHIPPED_METHODS)
def test_every_shipped_method_file_loads_for_the_tiny_profile(tmp_path, method, task):
    cfg = load_config(config_files(task, "tiny", method), tiny_overrides(tmp_path))
    assert cfg.method.name == method and type(method_for(cfg)) is EXPECTED_CLASS[method]


def test_method_defaults_to_shears_and_a_bare_name_is_short_for_a_mapping(tmp_path):
    cfg = load_config(TINY_CONFIGS, tiny_overrides(tmp_path))  # no method file: the default
    # as before methods were types: elastic LoRA on the pruned base, unmasked (configs/methods/shears.yaml masks)
    assert cfg.method.name == "shears" and type(method_for(cfg)) is Shears and not cfg.method.sparsity_preserving
    cfg = load_config(TINY_CONFIGS, tiny_overrides(tmp_path, "method=nola", "method.num_basis_a=3"))
    assert type(method_for(cfg)) is Nola and cfg.method.num_basis_a == 3


# --- stages never ask which method runs -------------------------------------------------------------------------

METHOD_WORDS = ("shears", "lonas", "nola", "heterolora")  # "lora" is also PEFT's word (lora_A, "lora_" prefixes)
# The settings only a method has: every field of a method config but its name, less `seed` (also the run's own
# setting). Derived from the schemas, so a new method's settings are covered; the three named ones are pinned.
SHARED_FIELD_NAMES = {"seed", "name"}
METHOD_SETTINGS = {f for t in _method_config_types() for f in t.model_fields if f not in SHARED_FIELD_NAMES} | {
    "selection",
    "sparsity_preserving",
    "width_groups",
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings (of the module, a class or a function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                out.add(id(first.value))
    return out


def method_mentions(source: str) -> list[str]:
    """Where stage code names a method or reads a method's setting, as 'line: what'. Comments and docstrings are
    prose and are not looked at (the AST holds neither: comments are dropped, docstrings are skipped here).

    Flagged, in code only:
      - a method word (shears, lonas, nola, heterolora) in any identifier, attribute, import or string: a branch on
        the method, a method's class or a method's module;
      - a string that is exactly a method name (`== "lora"`);
      - a method setting (METHOD_SETTINGS: sparsity_preserving, width_groups, selection, num_basis_a, ...) as an
        attribute (`x.width_groups`: reading it), a variable, a parameter or a string (`getattr(c, "selection")`);
      - `cfg.method` / `ctx.cfg.method`: the method's config read directly instead of through `method_for(cfg)`.
    Not flagged: a setting's name as the keyword of a call (`Variant(sparsity_preserving=method.masked)`), which
    names a library function's parameter and hands it what the interface answered; it reads no setting.
    """
    tree = ast.parse(source)
    docstrings, found = _docstrings(tree), []

    def words(text: str, exact_settings: bool = True) -> list[str]:
        low = text.lower()
        hits = [w for w in METHOD_WORDS if w in low]
        return hits + ([text] if exact_settings and text in METHOD_SETTINGS else [])

    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
            owner = node.value
            if node.attr == "method" and (
                (isinstance(owner, ast.Name) and owner.id == "cfg")
                or (isinstance(owner, ast.Attribute) and owner.attr == "cfg")
            ):
                found.append(f"{line}: cfg.method (read the method through method_for(cfg))")
        elif isinstance(node, ast.alias):
            names = [node.name, node.asname or ""]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.keyword) and node.arg:
            found += [f"{line}: keyword {node.arg}={w}" for w in words(node.arg, exact_settings=False)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            hits = words(node.value) + [w for w in METHOD_SETTINGS if w in node.value and w != node.value]
            hits += [node.value] if node.value in METHOD_NAMES else []
            found += [f"{line}: string {node.value!r} ({w})" for w in dict.fromkeys(hits)]
        for name in names:
            found += [f"{line}: {type(node).__name__} {name} ({w})" for w in words(name)]
    return found


@pytest.mark.parametrize(
    "code",
    [
        'if cfg.method.name == "lonas":\n    pass\n',
        "x = ctx.cfg.method\n",
        'if method.name == "lora":\n    pass\n',
        "keep = cfg.train.width_groups\n",
        "y = m.config.sparsity_preserving\n",
        "mode = m.config.selection.mode\n",
        'v = getattr(m.config, "num_basis_a")\n',
        "from nlsflow.adapters.nola import save_nola\n",
        "from nlsflow.methods.shears import Shears\n",
        "def f(width_groups):\n    pass\n",
        "is_heterolora = True\n",
    ],
)
def test_the_stage_scan_flags_what_asks_which_method_runs(code):
    assert method_mentions(code), code


def test_the_stage_scan_ignores_prose_and_library_keywords():
    code = (
        '"""Shears writes masked_adapter; LoNAS narrows; NOLA and HeteroLoRA too (width_groups, .selection)."""\n'
        "# LoNAS: the narrowed base (sparsity_preserving)\n"
        "def f():\n"
        '    """HeteroLoRA\'s shortcuts."""\n'
        "    return Variant(sparsity_preserving=method.masked, adapter_dir=method.adapter_folder)  # Shears\n"
        'names = [n for n in params if "lora_" in n]\n'
        "x = cfg.prune.method\n"
    )
    assert method_mentions(code) == []


STAGE_FILES = sorted((REPO / "stages").glob("*.py"))


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.name)
def test_no_stage_names_a_method_or_reads_a_method_setting(path: Path):
    assert method_mentions(path.read_text()) == [], f"stages/{path.name} asks which method runs"


def test_the_stage_scan_covers_every_stage():
    assert {p.stem for p in STAGE_FILES} >= {"prune", "train", "evaluate", "search", "extract", "benchmark"}


# --- moved and impossible keys ----------------------------------------------------------------------------------

MOVED_VALUES = {  # a plausible old value of each moved key, as YAML
    "sparsity_preserving": "true",
    "adapter": "nola",
    "nola": "{num_basis_a: 64, num_basis_b: 64, seed: 0}",
    "heterolora": "{mode: dynamic, proxy: grad_norm}",
    "width_groups": "[{name: w, modules: [up_proj], choices: [172, 86]}]",
}


def test_every_moved_key_has_a_value_here():
    assert MOVED_VALUES.keys() == MOVED_TRAIN_KEYS.keys()


def _one_line_naming(excinfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


@pytest.mark.parametrize("key", sorted(MOVED_TRAIN_KEYS))
def test_a_moved_train_key_in_a_yaml_file_is_refused_naming_its_new_key(tmp_path, key):
    old = tmp_path / "old.yaml"
    old.write_text(f"train:\n  rank: 8\n  {key}: {MOVED_VALUES[key]}\n")
    with pytest.raises(NlsflowError) as e:
        load_config([*TINY_CONFIGS, old], tiny_overrides(tmp_path))
    _one_line_naming(e, str(old), f"train.{key} has moved", MOVED_TRAIN_KEYS[key])


@pytest.mark.parametrize(
    "override",
    [f"train.{k}={v}" for k, v in sorted(MOVED_VALUES.items())] + ["train.nola.seed=1", "train.heterolora.mode=static"],
)
def test_a_moved_train_key_as_an_override_is_refused_naming_its_new_key(tmp_path, override):
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(NlsflowError) as e:
        load_config(TINY_CONFIGS, tiny_overrides(tmp_path, override))
    _one_line_naming(e, f"override {override}", f"train.{key} has moved", MOVED_TRAIN_KEYS[key])


IMPOSSIBLE = [  # (method mapping, the key the error must name)
    ("{name: nola, width_groups: [{name: w, modules: [up_proj], choices: [172, 86]}]}", "method.nola.width_groups"),
    (
        "{name: heterolora, selection: {mode: dynamic, select: rank_budget}}",
        "method.heterolora.selection.dynamic.select",
    ),
    (
        "{name: lonas, sparsity_preserving: true, width_groups: [{name: w, modules: [up_proj], choices: [172, 86]}]}",
        "method.lonas.sparsity_preserving",
    ),
    ("{name: lora, sparsity_preserving: true}", "method.lora.sparsity_preserving"),
    ("{name: shears, num_basis_a: 8}", "method.shears.num_basis_a"),
    (
        "{name: heterolora, selection: {mode: dynamic, rank_budget: 0.5}}",
        "method.heterolora.selection.dynamic.rank_budget",
    ),
    ("{name: lonas}", "method.lonas.width_groups"),  # LoNAS without its width groups
    ("{name: dora}", "method"),  # not a method
]


@pytest.mark.parametrize(("method", "key"), IMPOSSIBLE, ids=[k for _, k in IMPOSSIBLE])
def test_an_impossible_combination_cannot_be_written(tmp_path, method, key):
    with pytest.raises(NlsflowError) as e:  # as an override
        load_config(TINY_CONFIGS, tiny_overrides(tmp_path, f"method={method}"))
    _one_line_naming(e, f"'{key}'" if key != "method" else "method")
    as_file = tmp_path / "method.yaml"
    as_file.write_text(f"method: {method}\n")
    with pytest.raises(NlsflowError) as e:  # in a YAML file
        load_config([*TINY_CONFIGS, as_file], tiny_overrides(tmp_path))
    _one_line_naming(e, str(as_file), f"'{key}'" if key != "method" else "method")


def test_the_valid_neighbours_of_the_impossible_combinations_load(tmp_path):
    """The same keys where they belong: so the failures above are about the combination, not the syntax."""
    width = "[{name: w, modules: [up_proj], choices: [172, 86]}]"
    for method in (
        f"{{name: lonas, width_groups: {width}}}",
        "{name: heterolora, selection: {mode: static, select: rank_budget, rank_budget: 0.5}}",
        "{name: shears, sparsity_preserving: false}",
        "{name: nola, num_basis_a: 8}",
    ):
        cfg = load_config(TINY_CONFIGS, tiny_overrides(tmp_path, f"method={method}"))
        assert isinstance(cfg, PipelineConfig)


# --- the Shears artifact contract -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shears_run(tmp_path_factory):
    """The tiny math pipeline with METHOD=shears (sparsity-preserving), prune → train → search → extract, once."""
    from conftest import DATA_ROOT

    if not DATA_ROOT.is_dir():
        pytest.skip(f"no shared data at {DATA_ROOT}")
    from stages import extract, prune, search, train
    from stages._common import run_stage

    run_dir = tmp_path_factory.mktemp("shears-tiny")
    cfg = load_config(
        config_files("math", "tiny", "shears"),
        tiny_overrides(run_dir, "train.max_steps=20", "search.num_evals=4", "extract.evaluate=false"),
    )
    assert cfg.method.name == "shears" and cfg.method.sparsity_preserving and cfg.prune.sparsity > 0
    for module in (prune, train, search, extract):
        assert run_stage(module.__name__.rsplit(".", 1)[-1], module.run, cfg) is not None
    return cfg


def _run_path(cfg, *parts: str) -> Path:
    from nlsflow.artifacts import stage_dir

    return stage_dir(cfg.run_dir, parts[0]).joinpath(*parts[1:])


@pytest.fixture(scope="module")
def shears_probe(shears_run):
    """The extract stage's own probe batch, and the super-network's logits on it at the extracted subnet."""
    from nlsflow.adapters.elastic import activate
    from stages import extract
    from stages._common import StageContext

    ctx = StageContext(cfg=shears_run, stage="extract", out_dir=_run_path(shears_run, "extract"))
    model, tokenizer, space = method_for(shears_run).load(
        _run_path(shears_run, "prune", "model"), _run_path(shears_run, "train"), "float32", CPU
    )
    activate(model, space, json.loads(_run_path(shears_run, "search", "chosen.json").read_text()))
    batch = extract.probe_batch(ctx, tokenizer, CPU)
    return batch, extract.logits(model, batch)


def _stock_masked_adapter(cfg, masked: bool):
    """extract/masked_adapter/ on prune/model with stock PEFT; with the base's mask applied when `masked`."""
    from peft import PeftModel

    from nlsflow.adapters.masking import make_sparsity_preserving
    from nlsflow.models import load_causal_lm

    base = load_causal_lm(str(_run_path(cfg, "prune", "model")), "float32", CPU)
    model = PeftModel.from_pretrained(base, str(_run_path(cfg, "extract", "masked_adapter"))).eval()
    if masked:
        assert make_sparsity_preserving(model) > 0  # the pruned base has zeros in the adapted layers
    return model


@needs_data
@pytest.mark.slow
def test_shears_writes_a_masked_adapter_and_deploys_the_merged_model(shears_run):
    from nlsflow.artifacts import read_manifest

    folders = {p.name for p in _run_path(shears_run, "extract").iterdir() if p.is_dir()}
    assert "masked_adapter" in folders and "merged" in folders
    assert "adapter" not in folders  # a masked adapter is never presented under the stock name
    metrics = read_manifest(_run_path(shears_run, "extract"), "extract").metrics
    assert metrics["deployable"] == "merged"
    assert metrics["max_abs_logit_diff"] <= shears_run.extract.tolerance  # masked_adapter, loaded with its mask
    assert metrics["merged_max_abs_logit_diff"] <= shears_run.extract.merge_tolerance


@needs_data
@pytest.mark.slow
def test_the_masked_adapter_matches_the_merged_model_only_with_the_mask(shears_run, shears_probe):
    from nlsflow.models import load_causal_lm
    from stages.extract import logits

    batch, supernet = shears_probe
    merged = logits(load_causal_lm(str(_run_path(shears_run, "extract", "merged")), "float32", CPU).eval(), batch)
    assert (merged - supernet).abs().max().item() <= shears_run.extract.merge_tolerance

    stock = logits(_stock_masked_adapter(shears_run, masked=False), batch)
    # stock PEFT alone fills the pruned zeros with the delta: the silent wrong result the folder name warns about
    assert (stock - merged).abs().max().item() > 100 * shears_run.extract.merge_tolerance

    with_mask = logits(_stock_masked_adapter(shears_run, masked=True), batch)
    assert (with_mask - merged).abs().max().item() <= 1e-5
    assert (with_mask - supernet).abs().max().item() <= shears_run.extract.tolerance


@needs_data
@pytest.mark.slow
def test_check_artifacts_fails_naming_the_artifact_whose_logits_differ(shears_run, shears_probe):
    from stages.extract import check_artifacts

    batch, supernet = shears_probe
    method = method_for(shears_run)
    base_dir, adapter_dir = _run_path(shears_run, "prune", "model"), _run_path(shears_run, "extract", "masked_adapter")
    good = Artifact(
        "masked_adapter",
        "adapter",
        lambda dtype, device: method.load_adapter(base_dir, adapter_dir, dtype, device),
        shears_run.extract.tolerance,
        method.adapter_loads_with,
    )
    metrics = check_artifacts([good], batch, supernet, CPU, {})
    assert metrics["max_abs_logit_diff"] <= shears_run.extract.tolerance and metrics["adapter_params"] > 0

    def perturbed(dtype, device):
        model = good.load(dtype, device)
        with torch.no_grad():
            model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight[0, 0] += 1.0
        return model

    broken = dataclasses.replace(good, name="perturbed", load=perturbed)
    with pytest.raises(NlsflowError) as e:  # the first artifact passes, the second fails the stage by name
        check_artifacts([good, broken], batch, supernet, CPU, {})
    msg = _one_line_naming(e, "extract/perturbed differs from the super-network by", "extract.tolerance")
    assert "masked_adapter" not in msg

    # the masked adapter loaded as stock PEFT would (no mask): caught, not shipped
    unmasked = dataclasses.replace(good, load=lambda dtype, device: _stock_masked_adapter(shears_run, masked=False))
    with pytest.raises(NlsflowError) as e:
        check_artifacts([unmasked], batch, supernet, CPU, {})
    _one_line_naming(e, "extract/masked_adapter differs")

    merged_dir = _run_path(shears_run, "extract", "merged")

    def merged_perturbed(dtype, device):
        model = method.load_merged(merged_dir, dtype, device)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
        return model

    bad_merge = Artifact("merged", "merged", merged_perturbed, shears_run.extract.merge_tolerance, "transformers")
    with pytest.raises(NlsflowError) as e:
        check_artifacts([bad_merge], batch, supernet, CPU, {})
    _one_line_naming(e, "extract/merged differs", "extract.merge_tolerance")
