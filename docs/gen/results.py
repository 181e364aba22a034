"""The studies' results pages, written at build time from what `make study` published under results/.

MkDocs loads this file as a hook (mkdocs.yml `hooks:`). Each page in STUDY_PAGES is generated from
`results/<study>/`: the pilot (`pilot.md`), the table (`results.md`) and the plot (`accuracy_vs_macs.png`), all
written by flows/study.py from the published rows' manifests; no figure on the page is typed in by hand. A study
with nothing published yet gets a page that says so.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
STUDY_PAGES = {"results/commonsense-smollm2.md": ("commonsense-smollm2", "The commonsense study on SmolLM2-135M")}
PLOT = "accuracy_vs_macs.png"


def _shifted(markdown: str) -> str:
    """A generated section's headings one level under the page's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def study_page(study: str, title: str, results: Path = RESULTS) -> str:
    folder = results / study
    lines = [
        f"# {title}",
        "",
        f"This page is generated when the docs are built (docs/gen/results.py) from `results/{study}/`, which "
        f"`make study` writes from the manifests of the rows it has published; do not edit it. The settings are "
        f"`configs/studies/{study}.yaml`, and [Results](../results.md) explains the columns.",
        "",
        "## The budget check",
        "",
        _shifted((folder / "pilot.md").read_text()) if (folder / "pilot.md").is_file() else "Not run yet.",
        "",
        "## Every method against plain LoRA",
        "",
    ]
    if (folder / "results.md").is_file():
        lines += [_shifted((folder / "results.md").read_text())]
        if (folder / PLOT).is_file():
            alt = "Test accuracy against non-zero MACs per token, and the searched Pareto fronts"
            lines += ["", f"![{alt}]({study}.png)"]
    else:
        lines += ["No row is published yet."]
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """MkDocs hook: add each study's page, and its plot beside it."""
    from mkdocs.structure.files import File

    for uri, (study, title) in STUDY_PAGES.items():
        files.append(File.generated(config, uri, content=study_page(study, title)))
        if (plot := RESULTS / study / PLOT).is_file():
            files.append(File.generated(config, str(Path(uri).with_name(f"{study}.png")), content=plot.read_bytes()))
    return files
