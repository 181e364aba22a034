"""Reading and writing what stages exchange: manifests (verified by digest) with their typed outputs, JSON files
(by model) and Parquet tables (by schema)."""

from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from nlsflow.config import RUN_CONFIG_NAME
from nlsflow.errors import NlsflowError, format_validation_error
from nlsflow.io import atomic_dir, atomic_write_bytes, atomic_write_text, sha256_file
from schemas.config import STAGE_INPUTS, STAGES, PipelineConfig
from schemas.manifest import MANIFEST_NAME, MANIFEST_SCHEMA, MANIFEST_VERSION, Manifest, OutputFile
from schemas.outputs import STAGE_OUTPUTS, StageOutput
from schemas.tables import TABLE_VERSION, TABLES

M = TypeVar("M", bound=BaseModel)


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


@functools.lru_cache(maxsize=4096)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash a file once per process for a given size and mtime: resume checks re-read the same weights often."""
    return sha256_file(Path(path))


def list_outputs(folder: Path) -> list[OutputFile]:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return [
        OutputFile(path=p.relative_to(folder).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size) for p in files
    ]


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(Path(folder) / MANIFEST_NAME, manifest.model_dump_json(indent=2))


def read_manifest(folder: Path, stage: str, verify: bool = True, missing_ok: bool = False) -> Manifest:
    """Load and validate `<folder>/manifest.json`; with verify, check every output file's digest (`missing_ok`: of
    the files present, as in a run's published evidence, which leaves out its weights)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise NlsflowError(
            f"missing input manifest {path}: run the '{stage}' stage first (make pipeline runs all stages in order)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NlsflowError(
            f"{path} is not valid JSON ({e.msg}); delete {folder} and re-run the '{stage}' stage"
        ) from None
    if not isinstance(raw, dict):
        raise NlsflowError(f"{path} holds a JSON {type(raw).__name__}, not a manifest; re-run the '{stage}' stage")
    if raw.get("schema_name") != MANIFEST_SCHEMA or raw.get("schema_version") != MANIFEST_VERSION:
        raise NlsflowError(
            f"{path} has schema {raw.get('schema_name')} v{raw.get('schema_version')}, expected "
            f"{MANIFEST_SCHEMA} v{MANIFEST_VERSION}; re-run the '{stage}' stage with this version of nlsflow"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise NlsflowError(f"{path} is malformed: {format_validation_error(e)}; re-run the '{stage}' stage") from None
    if manifest.stage != stage:
        raise NlsflowError(f"{path} belongs to stage '{manifest.stage}', expected '{stage}'; check run_dir")
    try:
        STAGE_OUTPUTS[stage].model_validate(manifest.metrics)
    except ValidationError as e:
        raise NlsflowError(
            f"{path} has metrics that do not fit the '{stage}' stage's outputs: {format_validation_error(e)}; "
            f"re-run the '{stage}' stage"
        ) from None
    if verify:
        for out in manifest.outputs:
            file = Path(folder) / out.path
            if not file.is_file():
                if missing_ok:
                    continue
                raise NlsflowError(f"{file} listed in {path} is missing; re-run the '{stage}' stage")
            stat = file.stat()
            if stat.st_size != out.bytes or _cached_sha256(str(file), stat.st_size, stat.st_mtime_ns) != out.sha256:
                raise NlsflowError(
                    f"{file} does not match its sha256 in {path} (corrupt or modified); re-run the '{stage}' stage"
                )
    return manifest


def read_output(run_dir: Path, stage: str, verify: bool = True, missing_ok: bool = False) -> StageOutput:
    """The typed outputs of a finished stage of a run, e.g. `read_output(run_dir, "evaluate").subnet`."""
    return read_manifest(stage_dir(run_dir, stage), stage, verify, missing_ok).output


def upstream_stages(stage: str) -> list[str]:
    """Every stage `stage` depends on, directly or not, in pipeline order."""
    seen: set[str] = set()
    todo = list(STAGE_INPUTS[stage])
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo.extend(STAGE_INPUTS[up])
    return [s for s in STAGES if s in seen]


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config))


def config_change(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> str:
    """The first setting that differs between two stage configs, as `key: old -> new`."""
    for key in sorted(before.keys() | now.keys()):
        old, new = before.get(key, "<unset>"), now.get(key, "<unset>")
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                return config_change(old, new, f"{prefix}{key}.")
            return f"{prefix.removeprefix('shared.')}{key}: {old!r} -> {new!r}"
    return ""


def read_inputs(
    run_dir: Path, stage: str, cfg: PipelineConfig | None = None, missing_ok: bool = False
) -> dict[str, Manifest]:
    """The verified manifests of a stage's upstream stages, checked to belong together.

    Every upstream stage (direct or not) must have been made from the others' current results (lineage), and, with
    `cfg`, with this config's settings; otherwise one line names the stage to re-run. `missing_ok`: see
    read_manifest.
    """
    chain = {up: read_manifest(stage_dir(run_dir, up), up, missing_ok=missing_ok) for up in upstream_stages(stage)}
    for up, manifest in chain.items():
        if cfg is not None and manifest.config != (now := _plain(cfg.stage_config(up))):
            raise NlsflowError(
                f"{stage_dir(run_dir, up)} was made with other settings than this config "
                f"({config_change(manifest.config, now)}); re-run the '{up}' stage with this config first "
                "(make pipeline re-runs whatever changed)"
            )
        for parent, fingerprint in manifest.inputs.items():
            if parent in chain and chain[parent].fingerprint() != fingerprint:
                raise NlsflowError(
                    f"{stage_dir(run_dir, up)} was made from an earlier '{parent}' result ('{parent}' re-ran since); "
                    f"re-run '{up}' and the stages after it (make pipeline re-runs whatever changed)"
                )
    return {up: chain[up] for up in STAGE_INPUTS[stage]}


def rerun_reason(run_dir: Path, stage: str, cfg: PipelineConfig, missing_ok: bool = False) -> str | None:
    """Why the stage must run (not run yet, settings or inputs changed, files corrupt); None when it is up to date.
    `missing_ok`: of a run's published evidence (see read_manifest)."""
    try:
        inputs = read_inputs(run_dir, stage, cfg, missing_ok)
    except NlsflowError as e:
        return f"its inputs are not ready: {e}"
    folder = stage_dir(run_dir, stage)
    if not (folder / MANIFEST_NAME).exists():
        return "not run yet"
    try:
        done = read_manifest(folder, stage, missing_ok=missing_ok)
    except NlsflowError as e:
        return str(e).split("; re-run")[0]
    if done.config != (now := _plain(cfg.stage_config(stage))):
        return f"settings changed ({config_change(done.config, now)})"
    if changed := [k for k, m in inputs.items() if done.inputs.get(k) != m.fingerprint()]:
        return f"its input {', '.join(repr(k) for k in changed)} changed"
    return None


def stage_plan(cfg: PipelineConfig, stages=STAGES, force: bool = False) -> list[tuple[str, str | None]]:
    """Each stage with why it would run, None when it would be skipped; once one runs, every later one does too."""
    plan, first = [], None
    for stage in stages:
        if force:
            reason = "--force"
        elif first:
            reason = f"after {first}"
        else:
            reason = rerun_reason(Path(cfg.run_dir), stage, cfg)
        plan.append((stage, reason))
        first = first or (stage if reason else None)
    return plan


def describe_plan(cfg: PipelineConfig, plan: list[tuple[str, str | None]]) -> str:
    """`--plan`'s answer: the run folder, then each stage: 'up to date' or 'runs: <why>'."""
    width = max(len(stage) for stage, _ in plan)
    lines = [f"run folder: {cfg.run_dir}"]
    lines += [f"  {stage:<{width}}  {'up to date' if why is None else f'runs: {why}'}" for stage, why in plan]
    return "\n".join(lines)


EVIDENCE_SUFFIXES = (".json", ".parquet")


def publish_evidence(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's evidence to `dest`: its config (when the flow wrote one) and, per stage, the manifest
    with the JSON files and tables at the stage folder's top level, not the weights, so that the run can be
    committed, tabulated and audited where its weights are not (read it with missing_ok). `dest` is replaced
    whole, atomically."""
    run_dir = Path(run_dir)
    with atomic_dir(dest) as tmp:
        if (run_dir / RUN_CONFIG_NAME).is_file():
            shutil.copy2(run_dir / RUN_CONFIG_NAME, tmp / RUN_CONFIG_NAME)
        for stage in STAGES:
            manifest = read_manifest(stage_dir(run_dir, stage), stage)
            (tmp / stage).mkdir()
            shutil.copy2(stage_dir(run_dir, stage) / MANIFEST_NAME, tmp / stage / MANIFEST_NAME)
            for out in manifest.outputs:
                if "/" not in out.path and out.path.endswith(EVIDENCE_SUFFIXES):
                    shutil.copy2(stage_dir(run_dir, stage) / out.path, tmp / stage / out.path)


def written_files(folder: Path) -> set[str] | None:
    """The files a stage folder's manifest lists as the stage's own (read leniently: any schema version);
    None when no readable manifest says."""
    try:
        raw = json.loads((Path(folder) / MANIFEST_NAME).read_text())
        return {MANIFEST_NAME, *(str(out["path"]) for out in raw["outputs"])}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_replaceable(folder: Path, stage: str) -> None:
    """Refuse to replace a stage folder that holds files the stage did not write: they would be lost."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    if not present:
        return
    ours = written_files(folder)
    if ours is None:
        raise NlsflowError(
            f"{folder} has no readable {MANIFEST_NAME}, so nlsflow cannot tell its own files from yours; "
            f"move or delete {folder} and re-run the '{stage}' stage"
        )
    if foreign := sorted(present - ours):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise NlsflowError(
            f"{folder} holds files the '{stage}' stage did not write ({shown}), and re-running it replaces that "
            f"folder; move them out of {folder} and re-run"
        )


def write_json(path: Path, doc: BaseModel, sort_keys: bool = False) -> None:
    """Write a file model (schemas.files) atomically as indented JSON."""
    atomic_write_text(path, json.dumps(doc.model_dump(mode="json"), indent=2, sort_keys=sort_keys))


def read_json(path: Path, model: type[M], stage: str) -> M:
    """Read a JSON file a stage wrote, checked against its model (schema_version first); one line on any misfit."""
    path = Path(path)
    if not path.is_file():
        raise NlsflowError(f"{path} not found; re-run the '{stage}' stage")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NlsflowError(f"{path} is not valid JSON ({e.msg}); re-run the '{stage}' stage") from None
    version = model.model_fields.get("schema_version")
    if version is not None and (not isinstance(raw, dict) or raw.get("schema_version") != version.default):
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        raise NlsflowError(
            f"{path} has schema_version {found}, expected {version.default} (written by another version of "
            f"nlsflow); re-run the '{stage}' stage"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise NlsflowError(f"{path} is malformed: {format_validation_error(e)}; re-run the '{stage}' stage") from None


def write_table(path: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """Validate rows against the named schema and write them atomically as Parquet."""
    schema = TABLES[name].with_metadata({"nlsflow.table": name, "nlsflow.table_version": TABLE_VERSION})
    if stray := sorted(set().union(*rows) - set(schema.names)):  # pyarrow would drop them silently
        raise ValueError(f"rows for table '{name}' have columns its schema lacks: {stray}")
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise ValueError(f"rows for table '{name}' do not fit its schema: {e}") from None
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_table(path: Path, name: str) -> pa.Table:
    """Read a Parquet table, checking it is the named table at this schema version."""
    path = Path(path)
    if not path.is_file():
        raise NlsflowError(f"table {path} not found; re-run the stage that writes it")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise NlsflowError(f"{path} is not a readable Parquet file ({e}); re-run the stage that writes it") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("nlsflow.table") != name or meta.get("nlsflow.table_version") != TABLE_VERSION:
        raise NlsflowError(
            f"{path} holds table {meta.get('nlsflow.table')!r} v{meta.get('nlsflow.table_version')}, "
            f"expected {name!r} v{TABLE_VERSION}; re-run the stage that writes it"
        )
    expected = TABLES[name]
    if not table.schema.remove_metadata().equals(expected):
        raise NlsflowError(
            f"{path} columns {table.schema.names} differ from table {name!r} {expected.names}; re-run the stage"
        )
    return table
