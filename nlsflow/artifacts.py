"""Reading and writing what stages exchange: manifests (verified by digest) with their typed outputs, JSON files
(by model) and Parquet tables (by schema)."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from nlsflow.errors import NlsflowError, format_validation_error
from nlsflow.io import atomic_write_bytes, atomic_write_text, sha256_file
from schemas.config import STAGE_INPUTS
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


def read_manifest(folder: Path, stage: str, verify: bool = True) -> Manifest:
    """Load and validate `<folder>/manifest.json`; with verify, check every output file's digest."""
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
                raise NlsflowError(f"{file} listed in {path} is missing; re-run the '{stage}' stage")
            stat = file.stat()
            if stat.st_size != out.bytes or _cached_sha256(str(file), stat.st_size, stat.st_mtime_ns) != out.sha256:
                raise NlsflowError(
                    f"{file} does not match its sha256 in {path} (corrupt or modified); re-run the '{stage}' stage"
                )
    return manifest


def read_output(run_dir: Path, stage: str, verify: bool = True) -> StageOutput:
    """The typed outputs of a finished stage of a run, e.g. `read_output(run_dir, "evaluate").subnet`."""
    return read_manifest(stage_dir(run_dir, stage), stage, verify=verify).output


def read_inputs(run_dir: Path, stage: str) -> dict[str, Manifest]:
    """The verified manifests of a stage's upstream stages."""
    return {up: read_manifest(stage_dir(run_dir, up), up) for up in STAGE_INPUTS[stage]}


def is_up_to_date(run_dir: Path, stage: str, config: dict[str, Any]) -> bool:
    """True when the stage's manifest matches this config and the current upstream fingerprints, files intact."""
    try:
        inputs = read_inputs(run_dir, stage)
        done = read_manifest(stage_dir(run_dir, stage), stage)
    except NlsflowError:
        return False
    return done.config == json.loads(json.dumps(config)) and done.inputs == {
        k: m.fingerprint() for k, m in inputs.items()
    }


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
