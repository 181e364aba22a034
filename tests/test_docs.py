"""The docs' generated reference pages (docs/gen/reference.py): every error site, config key and output field."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
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
_spec = importlib.util.spec_from_file_location("docs_results", REPO / "docs" / "gen" / "results.py")
results_pages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_pages)


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
def test_a_study_page_shows_what_is_published_and_says_what_is_not(tmp_path):
    """docs/gen/results.py: a study's page is its results folder's pilot, table and plot, under the page's own
    headings; nothing published is said so, not left blank."""
    assert "No row is published yet." in results_pages.study_page("math-tiny", "t", tmp_path)
    assert "## The budget check\n\nNot run yet." in results_pages.study_page("math-tiny", "t", tmp_path)
    folder = tmp_path / "math-tiny"
    folder.mkdir()
    (folder / "pilot.md").write_text("### Pilot\n\nLoRA beats it.\n")
    (folder / "results.md").write_text("### math on tiny\n\n| method |\n|---|\n| lora |\n")
    (folder / "accuracy_vs_macs.png").write_bytes(b"png")
    page = results_pages.study_page("math-tiny", "The tiny study", tmp_path)
    assert page.startswith("# The tiny study\n") and "#### Pilot\n\nLoRA beats it." in page
    assert "#### math on tiny\n\n| method |\n|---|\n| lora |" in page and "](math-tiny.png)" in page


def test_docs_build_strictly(tmp_path):
    """`make docs`: the whole site, strict (a broken link or a page missing from nav fails), in about 10 s."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")]
    proc = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "reference" / "troubleshooting" / "index.html").is_file()


# ---- the commands the docs show: each one the Makefile runs is checked with --plan (config, overrides, flags)

PLANNED_TARGETS = re.compile(r"^(pipeline|compare|study|bench|stage-\w+)$")
PLANNED_MODULES = ("flows.", "stages.", "bench")
NEEDS_A_FINISHED_RUN = ("--pilot", "flows.report", "--config runs/")  # what they read exists only after a run


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every `make` or `python -m` line in a fenced block of the README and the docs pages."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        fenced = False
        for line in page.read_text().replace("\\\n", " ").splitlines():  # a command continued with \ is one line
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced and re.match(r"\s*(make |(\.venv/bin/)?python -m )", line):
                found.append((str(page.relative_to(REPO)), line.strip()))
    return found


def _planned(command: str) -> list[str] | None:
    """The command as it runs with --plan (a make line through the Makefile's own recipe); None for one that does
    not run a stage or flow (make test, make ui, ...) or has placeholders."""
    if "<" in command or "[" in command or any(part in command for part in NEEDS_A_FINISHED_RUN):
        return None
    words = shlex.split(command, comments=True)
    if words[0] != "make":
        argv = words[words.index("-m") + 1 :]
        return [*argv, "--plan"] if argv[0].startswith(PLANNED_MODULES) else argv  # nlsflow.layers: runs as is
    variables = [w for w in words[1:] if "=" in w]
    targets = [w for w in words[1:] if "=" not in w]
    if len(targets) != 1 or not PLANNED_TARGETS.match(targets[0]):
        return None
    args = next((w.split("=", 1)[1] for w in variables if w.startswith("ARGS=")), "")
    venv = Path(sys.prefix)
    recipe = subprocess.run(  # the line make would run, not run: -n
        ["make", "-n", "-s", "-o", f"{venv}/.installed", f"VENV={venv}", *targets, *variables],
        cwd=REPO,
        env={**os.environ, "ARGS": args},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    line = [line for line in recipe.splitlines() if " -m " in line][-1]  # after stage-*'s check of its configs
    tokens = [args if t == "$ARGS" else t for t in shlex.split(line)]
    return [*tokens[tokens.index("-m") + 1 :], "--plan"]


def _run_planned(argv: list[str]) -> int:
    module, *rest = argv
    if module.startswith("stages."):
        from stages._common import main

        stage = module.split(".", 1)[1]
        return main(stage, importlib.import_module(module).run, rest)
    if not module.startswith(PLANNED_MODULES):
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True)
        print(proc.stdout, end="")
        return proc.returncode
    entry = "bench.__main__" if module == "bench" else module
    return importlib.import_module(entry).main(rest)


def test_every_documented_command_passes_its_plan(monkeypatch, capsys):
    """What the docs tell users to type resolves to a valid config with existing targets, flags and keys. The runs
    themselves are what tests/test_flow.py, test_compare.py and test_bench.py execute on the tiny profile."""
    monkeypatch.chdir(REPO)  # the Makefile's relative paths (configs/, runs/): read, never written, by --plan
    planned = [(page, command, argv) for page, command in documented_commands() if (argv := _planned(command))]
    assert len(planned) >= 30, planned  # the docs show that many: a parser that found none must not pass
    failed = []
    for page, command, argv in planned:
        code = _run_planned(argv)
        out = capsys.readouterr()
        # a plan names each run folder and what it would run, or (a study's row) that the row is published
        expected = r"^(\w[\w-]*: )?(run folder:|bench:|published, )" if argv[-1] == "--plan" else r"\S"
        if code != 0 or not re.search(expected, out.out, re.M):
            failed.append(f"{page}: {command}\n  -> {' '.join(argv)}: exit {code}\n{out.err.strip()[-600:]}")
    assert not failed, "\n".join(failed)
