"""The generated reference pages: configuration, artifacts and troubleshooting, written from the code at build time.

MkDocs loads this file as a hook (mkdocs.yml `hooks:`); `on_files` adds the three pages to the build as generated
files, so they exist only in site/ and never drift from the pydantic models and `raise NlsflowError(...)` sites they
describe. The page builders are plain functions of the source tree (tests/test_docs.py calls them directly).
"""

from __future__ import annotations

import ast
import functools
import json
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nlsflow", "stages", "flows", "schemas", "bench")  # where user-facing errors are raised
GENERATED = "This page is generated from the code when the docs are built (docs/gen/reference.py); do not edit it."

if str(ROOT) not in sys.path:  # document this checkout's schemas, whichever checkout the environment installed
    sys.path.insert(0, str(ROOT))


# ---- markdown helpers


def _escape(text: str) -> str:
    """Text shown as written: markdown and HTML characters escaped outside `code spans`, which stay code."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: nothing is code
        parts = [text.replace("`", "\\`")]
    for i in range(0, len(parts), 2):
        p = parts[i].replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        for c in "*_[]|#":
            p = p.replace(c, "\\" + c)
        # `{...}` at the end of a block would be read as an attribute list (attr_list): entities keep it text
        parts[i] = p.replace("{", "&#123;").replace("}", "&#125;")
    return "`".join(parts)


def _code(text: str) -> str:
    """An inline code span, whatever backticks or pipes the text holds."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


# ---- pydantic models as tables


def _strip(annotation):
    """The annotation without `Annotated[...]` metadata."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_args(annotation) -> tuple | None:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(_strip(a) for a in typing.get_args(annotation))
    return None


def _is_model(annotation) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _models_in(annotation) -> list:
    """The models a field holds: one for a nested section, several for a (discriminated) union, [] for a value."""
    annotation = _strip(annotation)
    if _is_model(annotation):
        return [annotation]
    args = [a for a in (_union_args(annotation) or ()) if a is not type(None)]
    return args if args and all(_is_model(a) for a in args) else []


def _type(annotation) -> str:
    """An annotation as the YAML a user writes: `int`, `list[str]`, `"a" | "b"`, with `null` for None."""
    annotation = _strip(annotation)
    if annotation is type(None):
        return "null"
    if (args := _union_args(annotation)) is not None:
        return " | ".join(_type(a) for a in args)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if not isinstance(a, str) else a for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field) -> str:
    """gt/ge/lt/le, lengths and patterns, as `> 0`, `≥ 1, ≤ 8`, `min length 1`."""
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    out = []
    for m in field.metadata:
        for attr, sign in signs.items():
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"min length {m.min_length}")
        if getattr(m, "pattern", None) is not None:
            out.append(f"pattern {m.pattern}")
    return ", ".join(out)


def _default(field, required: str) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        factory = field.default_factory
        if _is_model(factory):
            dumped = json.dumps(factory().model_dump(mode="json"))
            if len(dumped) <= 60:
                return _code(dumped)
            chosen = {
                n: f.default for n, f in factory.model_fields.items() if typing.get_origin(f.annotation) is Literal
            }
            return _code(json.dumps(chosen)[:-1] + ", ...}") if chosen else "its fields' defaults"
        if factory in (list, dict, set, tuple):
            return _code(json.dumps(factory()))
        return "computed (see the description)"
    if field.default is PydanticUndefined:
        return required
    value = field.default
    if _is_model(type(value)):
        value = value.model_dump(mode="json")
    return _code(json.dumps(value, default=str))


class _Row(typing.NamedTuple):
    key: str
    type: str
    default: str
    description: str


class _Notes(typing.NamedTuple):
    required: str = "**required**"  # what the default column says of a key without a default
    runtime: bool = True  # mark the keys a model lists in RUNTIME (left out of the stage's digest)
    discriminator: str | None = None  # the key that selects this variant of a union


CONFIG = _Notes()
OUTPUT = _Notes(required="always", runtime=False)  # stage outputs: a key without a default is always written


def _variant_name(model, discriminator: str | None) -> str:
    if discriminator and discriminator in model.model_fields:
        return typing.get_args(_strip(model.model_fields[discriminator].annotation))[0]
    return model.__name__


def _walk(model, prefix: str, note: _Notes) -> tuple[list[_Row], list[tuple[str, str | None, list]]]:
    """A model's rows, nested models flattened into dotted keys; unions of models come back to be shown apart."""
    rows: list[_Row] = []
    unions: list[tuple[str, str | None, list]] = []
    runtime = getattr(model, "RUNTIME", frozenset())
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = _strip(field.annotation)
        described = _escape(field.description or "")
        if note.runtime and name in runtime:
            described += (" " if described else "") + "*(how it runs, not what it computes: not in the stage's digest)*"
        if name == note.discriminator and not described:
            described = f"`{name}: {_variant_name(model, name)}` selects this"
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        models = _models_in(annotation)
        if len(models) == 1 and origin is None:  # a nested section: its fields follow, dotted
            rows.append(_Row(key, "section", "", described))
            sub_rows, sub_unions = _walk(models[0], key + ".", note._replace(discriminator=None))
            rows += sub_rows
            unions += sub_unions
        elif len(models) > 1:  # a discriminated union: one sub-section per variant
            disc = field.discriminator if isinstance(field.discriminator, str) else None
            choices = ", ".join(_code(_variant_name(m, disc)) for m in models)
            how = f"one of {choices}" + (f" (by `{disc}`)" if disc else "")
            rows.append(_Row(key, how, _default(field, note.required), described))
            unions.append((key, disc, models))
        elif origin in (list, dict) and args and _is_model(_strip(args[-1])):  # items that are models
            item = _strip(args[-1])
            rows.append(_Row(key, _escape(_type(annotation)), _default(field, note.required), described))
            sub_rows, sub_unions = _walk(
                item, key + ("[]." if origin is list else ".<key>."), note._replace(discriminator=None)
            )
            rows += sub_rows
            unions += sub_unions
        else:
            shown = _escape(_type(annotation))
            if limits := _constraints(field):
                shown += ", " + _escape(limits)
            rows.append(_Row(key, shown, _default(field, note.required), described))
    return rows, unions


def _model_section(model, prefix: str, level: int, note: _Notes = CONFIG) -> list[str]:
    """A table of a model's keys, then a sub-section per variant of each union field it holds."""
    rows, unions = _walk(model, prefix, note)
    lines = _table(
        ("key", "type", "default", "description"), [(_code(r.key), r.type, r.default, r.description) for r in rows]
    )
    for key, disc, models in unions:
        for variant in models:
            name = _variant_name(variant, disc)
            lines += ["", f"{'#' * level} `{key}.{disc}: {name}`" if disc else f"{'#' * level} `{key}`: {name}", ""]
            if doc := _first_paragraph(variant.__doc__):
                lines += [_escape(doc), ""]
            lines += _model_section(variant, key + ".", level + 1, note._replace(discriminator=disc))
    return lines


# ---- configuration


def configuration_page() -> str:
    from schemas.config import PipelineConfig

    fields = PipelineConfig.model_fields
    sections = [n for n, f in fields.items() if _models_in(f.annotation)]
    lines = [
        "# Configuration",
        "",
        f"!!! note\n    {GENERATED}",
        "",
        "A run's settings are one `PipelineConfig` (schemas/config.py): YAML files merged in order, then dotted "
        "`key=value` overrides on the command line (`prune.sparsity=0.5`, `train={rank: 16, ...}`), validated as a "
        "whole; an unknown key is refused. Each key below is written as its dotted path; `[]` marks the items of a "
        "list, `<key>` the entries of a mapping.",
        "",
        "Sections: [top level](#top-level), " + ", ".join(f"[`{s}`](#{s})" for s in sections) + ".",
        "",
        "## Top level",
        "",
    ]
    top = [(n, f) for n, f in fields.items() if n not in sections]
    from pydantic import create_model

    top_model = create_model("Top", **{n: (f.annotation, f) for n, f in top})
    lines += _model_section(top_model, "", 3)
    for name in sections:
        field = fields[name]
        models = _models_in(field.annotation)
        lines += ["", f"## {name}", ""]
        intro = field.description or _first_paragraph(models[0].__doc__)
        if intro and len(models) == 1:  # a union's description is its row's
            lines += [_escape(intro), ""]
        section = create_model(name.capitalize(), **{name: (field.annotation, field)}) if len(models) > 1 else None
        if section is not None:  # the method: a union, one sub-section per method
            lines += _model_section(section, "", 3)
        else:
            lines += _model_section(models[0], name + ".", 3)
    return "\n".join(lines) + "\n"


# ---- artifacts


def artifacts_page() -> str:
    from schemas import files as file_models
    from schemas.manifest import MANIFEST_NAME, Manifest
    from schemas.outputs import STAGE_OUTPUTS
    from schemas.tables import COMPARISON, TABLES

    lines = [
        "# Artifacts",
        "",
        f"!!! note\n    {GENERATED}",
        "",
        "Every stage writes `<run_dir>/<stage>/`: its data files and a `manifest.json` that records the resolved "
        "config, the digests of its inputs and outputs, and what it measured (`metrics`, the stage's output model "
        "from schemas/outputs.py). Readers get the metrics back typed: `Manifest.output`, "
        "`nlsflow.artifacts.read_output`.",
        "",
        f"## The manifest (`{MANIFEST_NAME}`)",
        "",
        *_model_section(Manifest, "", 3, OUTPUT),
    ]
    for stage, output in STAGE_OUTPUTS.items():
        lines += ["", f"## {stage}", ""]
        if doc := _first_paragraph(output.__doc__):
            lines += [_escape(doc), ""]
        files = getattr(output, "files", None)
        if files is not None:
            rows = [
                (_code(f"{stage}/{f.default}"), _code(f"files.{name}"), _escape(f.description or ""))
                for name, f in type(files).model_fields.items()
            ]
            lines += [f"Files, under `{stage}/`:", "", *_table(("path", "name", "what"), rows), ""]
        lines += [f"Metrics (`{stage}/{MANIFEST_NAME}`, `metrics`):", ""]
        lines += _model_section(output, "", 3, OUTPUT)
    lines += [
        "",
        "## JSON files",
        "",
        "Written beside the weights and tables; `schema_version` is checked first when one is read.",
    ]
    for name in dir(file_models):
        model = getattr(file_models, name)
        if _is_model(model) and model.__module__ == file_models.__name__ and name.endswith("File"):
            lines += ["", f"### {name}", "", _escape(_first_paragraph(model.__doc__)), ""]
            if "root" in model.model_fields:  # a RootModel: the value itself
                lines.append(f"A mapping: {_escape(_type(model.model_fields['root'].annotation))}.")
            else:
                lines += _model_section(model, "", 4, OUTPUT)
    lines += [
        "",
        "## Parquet tables",
        "",
        "Fixed Arrow schemas (schemas/tables.py); the version is in each file's metadata.",
    ]
    for name, schema in {**TABLES, "comparison": COMPARISON}.items():
        columns = [(f.name, str(f.type)) for f in schema] if hasattr(schema, "names") else schema
        rows = [(_code(c), _code(str(t))) for c, t in columns]
        lines += ["", f"### {name}", "", *_table(("column", "type"), rows)]
    return "\n".join(lines) + "\n"


# ---- troubleshooting


class ErrorSite(typing.NamedTuple):
    path: str  # relative to the repository root
    line: int
    function: str  # the enclosing function ('' at module level)
    message: str  # the literal text, f-string fields as {expression}


def _message(node: ast.expr) -> str:
    """A message expression's literal parts, with `{expression}` where a value goes in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}" for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left) + _message(node.right)
    if isinstance(node, ast.IfExp):  # either branch; a branch that is only a value (passed on) is left out
        branches = [_message(b) for b in (node.body, node.orelse)]
        literal = [b for b in branches if not (b.startswith("{") and b.endswith("}") and b.count("{") == 1)]
        return " — or — ".join(literal or branches)
    return "{" + ast.unparse(node) + "}"


class _Sites(ast.NodeVisitor):
    def __init__(self, path: str, name: str):
        self.path, self.name, self.scope, self.found = path, name, [], []

    def _scoped(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node: ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name == self.name:
            message = _message(node.args[0]) if node.args else ""
            self.found.append(ErrorSite(self.path, node.lineno, ".".join(self.scope), message))
        self.generic_visit(node)


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def source_files(packages: tuple[str, ...] = PACKAGES) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def error_sites(name: str = "NlsflowError", packages: tuple[str, ...] = PACKAGES) -> list[ErrorSite]:
    """Every `name(...)` call (raised, or built and returned) in the packages' source, in file order."""
    sites = []
    for path in source_files(packages):
        visitor = _Sites(str(path.relative_to(ROOT)), name)
        visitor.visit(_parse(path))
        sites += visitor.found
    return sites


def _validation_sites() -> list[ErrorSite]:
    """`raise ValueError(...)` in the schemas' validators: shown to users as `config error in ...: <key>: ...`."""
    return error_sites("ValueError", ("schemas",))


def _module_summary(path: Path) -> str:
    return _first_paragraph(ast.get_docstring(_parse(path)) or "").split(". ")[0].rstrip(".")


GROUPS = {
    "stages": "Stages",
    "flows": "Flows and runners",
    "nlsflow": "Library",
    "schemas": "Schemas",
    "bench": "Benchmark against alternatives (`make bench`)",
}


def _site_lines(sites: list[ErrorSite]) -> list[str]:
    lines = []
    for site in sites:
        where = f"`{site.function}`, line {site.line}" if site.function else f"line {site.line}"
        lines.append(f"- {_escape(site.message)} <small>({where})</small>")
    return lines


def troubleshooting_page() -> str:
    sites = error_sites()
    lines = [
        "# Troubleshooting",
        "",
        f"!!! note\n    {GENERATED}",
        "",
        "Every problem nlsflow reports is one line, `error: <what is wrong>; <what to do>`, and the run stops with "
        f"nothing half-written. Below are all {len(sites)} of them, as the code raises them, grouped by where they "
        "come from; `{...}` stands for a value filled in at run time (a path, a key, a number). Look for the words "
        "of your message with the browser's find, or the site search (++slash++).",
        "",
        "Configuration errors found by the schemas' own checks read `config error in <file or override>: <key>: "
        "Value error, <message>`; their messages are listed [at the end](#config-validation).",
    ]
    by_group: dict[str, dict[str, list[ErrorSite]]] = {}
    for site in sites:
        by_group.setdefault(site.path.split("/")[0], {}).setdefault(site.path, []).append(site)
    for package, title in GROUPS.items():
        if package not in by_group:
            continue
        lines += ["", f"## {title}"]
        for path, group in by_group[package].items():
            summary = _module_summary(ROOT / path)
            lines += ["", f"### {path.removesuffix('.py').replace('/', '.')}", ""]
            if summary:
                lines += [f"*{_escape(summary)}* (`{path}`)", ""]
            lines += _site_lines(group)
    validation = _validation_sites()
    lines += ["", "## Config validation"]
    by_path: dict[str, list[ErrorSite]] = {}
    for site in validation:
        by_path.setdefault(site.path, []).append(site)
    for path, group in by_path.items():
        lines += ["", f"### {path}", "", *_site_lines(group)]
    return "\n".join(lines) + "\n"


PAGES: dict[str, Callable[[], str]] = {
    "reference/configuration.md": configuration_page,
    "reference/artifacts.md": artifacts_page,
    "reference/troubleshooting.md": troubleshooting_page,
}


def on_files(files, config):
    """MkDocs hook: add the generated pages (a file of the same name under docs/ is replaced)."""
    from mkdocs.structure.files import File

    _parse.cache_clear()  # `mkdocs serve` rebuilds after an edit: read the source again
    for uri, render in PAGES.items():
        if (existing := files.get_file_from_path(uri)) is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=render()))
    return files
