"""The docs' generated reference pages (docs/gen/reference.py): every error site, config key and output field."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlsflow.errors import NlsflowError

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "gen" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = reference
_spec.loader.exec_module(reference)


def _template_regex(template: str) -> re.Pattern:
    """A documented message as a pattern: each `{...}` stands for any value."""
    return re.compile("".join(".*?" if p.startswith("{") else re.escape(p) for p in re.split(r"(\{[^}]*\})", template)))


def test_troubleshooting_lists_a_known_error_as_raised(tmp_path):
    from nlsflow.config import load_yaml

    template = "config file {path} not found; pass an existing YAML (see configs/)"
    sites = [s for s in reference.error_sites() if s.message == template]
    assert [(s.path, s.function) for s in sites] == [("nlsflow/config.py", "load_yaml")]
    assert reference._escape(template) in reference.troubleshooting_page()
    with pytest.raises(NlsflowError) as e:  # the page shows what a user actually reads
        load_yaml(tmp_path / "missing.yaml")
    assert _template_regex(template).fullmatch(str(e.value))


def test_troubleshooting_finds_every_error_site():
    """An independent count: `NlsflowError(` in the source text, less the class statement, file by file."""
    counted = {}
    for package in reference.PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if n := len(re.findall(r"(?<!class )\bNlsflowError\(", path.read_text())):
                counted[str(path.relative_to(REPO))] = n
    found = {}
    for site in reference.error_sites():
        found[site.path] = found.get(site.path, 0) + 1
        assert site.message.strip(), f"{site.path}:{site.line} raises an empty message"
    assert found == counted
    assert sum(counted.values()) > 100  # the scan did look at the source
    page = reference.troubleshooting_page()
    assert f"all {sum(counted.values())} of them" in page
    for site in reference.error_sites():
        assert reference._escape(site.message) in page, site


def test_configuration_lists_every_key():
    from schemas.config import PipelineConfig

    page = reference.configuration_page()
    assert (
        "| `train.micro_batch_size` | int, &gt; 0 | `4` | sequences per forward pass (gradient accumulation) |" in page
    )
    for name, field in PipelineConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            for key in model.model_fields:
                assert f"| `{name}.{key}` |" in page
        elif name != "method":
            assert f"| `{name}` |" in page
    for method in ("lora", "shears", "lonas", "nola", "heterolora"):
        assert f"### `method.name: {method}`" in page
    assert "| `method.num_basis_a` |" in page and "| `method.selection.realloc_every` |" in page


def test_artifacts_lists_every_output_field_and_file():
    from schemas.outputs import STAGE_OUTPUTS

    page = reference.artifacts_page()
    for stage, output in STAGE_OUTPUTS.items():
        assert f"## {stage}" in page
        for name in output.model_fields:
            assert f"| `{name}` |" in page
        for f in type(output.files).model_fields.values():
            assert f"`{stage}/{f.default}`" in page


@pytest.mark.slow
def test_docs_build_strictly(tmp_path):
    """`make docs`: the whole site, strict (a broken link or a page missing from nav fails), in about 10 s."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")]
    proc = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "reference" / "troubleshooting" / "index.html").is_file()
