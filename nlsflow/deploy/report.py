"""The benchmark's table, markdown and plots: speed-ups against each variant's reference, said plainly."""

from __future__ import annotations

from pathlib import Path

NO_SPEEDUP = 1.05  # below this ratio of tokens/s, the table says there is no speed-up


def reference_of(name: str) -> str:
    """What a variant is compared with: the dense base; for a deployment format, the step before it (PyTorch ->
    OpenVINO FP32 -> NNCF INT8/INT4; dense fp16 kernels -> 2:4 sparse kernels)."""
    if "@" not in name:
        return "dense"
    source, form = name.split("@", 1)
    return {
        "2:4": f"{source}@fp16",
        "openvino-int8": f"{source}@openvino-fp32",
        "openvino-int4": f"{source}@openvino-fp32",
    }.get(form, source)


def with_speedups(rows: list[dict], unstructured: bool, same_device: bool = True) -> list[dict]:
    """Add `speedup` (tokens/s over the reference's at the same batch size) and a note where there is none.

    `same_device` False: PyTorch ran on a GPU, so OpenVINO (CPU) FP32 gets no ratio against it.
    """
    by_key = {(r["model"], r["batch_size"]): r for r in rows}
    out = []
    for row in rows:
        reference = by_key.get((reference_of(row["model"]), row["batch_size"]))
        notes = [row.get("note") or ""]
        if row["runtime"] != "pytorch" and reference and reference["runtime"] == "pytorch" and not same_device:
            reference = None
            notes.append("not compared: PyTorch ran on the GPU")
        speedup = row["tokens_per_s"] / reference["tokens_per_s"] if reference else None
        if row["model"] == "dense":
            notes.append("reference")
        elif speedup is not None and speedup < NO_SPEEDUP:
            notes.append(f"no speed-up over {reference['model']}")
        if unstructured and row["model"] != "dense":
            notes.append("unstructured zeros run on dense kernels")
        out.append({**row, "speedup": speedup, "note": "; ".join(n for n in notes if n)})
    return out


def _pm(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_spread']:.{digits}f}"


COLUMNS = {
    "model": lambda r: r["model"],
    "runtime": lambda r: r["runtime"],
    "weights": lambda r: r["weights"],
    "batch": lambda r: str(r["batch_size"]),
    "params": lambda r: f"{r['params']:,}",
    "non-zero params": lambda r: f"{r['nonzero_params']:,}",
    "MACs/token": lambda r: f"{r['macs_per_token']:,}",
    "non-zero MACs/token": lambda r: f"{r['nonzero_macs_per_token']:,}",
    "prefill ms": lambda r: _pm(r, "prefill_ms", 1),
    "decode ms/token": lambda r: _pm(r, "decode_ms_per_token", 2),
    "tokens/s": lambda r: _pm(r, "tokens_per_s", 1),
    "speed-up": lambda r: "–" if r["speedup"] is None else f"{r['speedup']:.2f}×",
    "peak memory MB": lambda r: f"{r['peak_memory_mb']:.0f}",
    "size MB": lambda r: f"{r['size_on_disk_mb']:.1f}",
    "accuracy (strict)": lambda r: (
        "–" if r["accuracy"] is None else f"{r['accuracy']:.4f} ({r['accuracy_strict']:.4f})"
    ),
    "note": lambda r: r["note"],
}


def results_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| " + " | ".join(cell(r) for cell in COLUMNS.values()) + " |"
        for r in sorted(rows, key=lambda r: r["batch_size"])
    ]
    return (
        "\n".join(lines) + "\n\nTimes are medians ± half the range over the repeats; speed-up is tokens/s over the "
        "reference's at the same batch size: the dense base; for a deployment format the step before it (PyTorch → "
        "OpenVINO FP32 → INT8/INT4; fp16 dense kernels → 2:4 sparse kernels).\n"
    )


def plot_results(rows: list[dict], folder: Path) -> None:
    """`throughput_vs_macs.png` (every batch size) and `accuracy_vs_macs.png` (variants with a test-set score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smallest = min(r["batch_size"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 5))
    for batch_size in sorted({r["batch_size"] for r in rows}):
        batch = [r for r in rows if r["batch_size"] == batch_size]
        ax.scatter(
            [r["nonzero_macs_per_token"] for r in batch],
            [r["tokens_per_s"] for r in batch],
            label=f"batch {batch_size}",
        )
    for r in rows:
        if r["batch_size"] == smallest:
            ax.annotate(
                r["model"],
                (r["nonzero_macs_per_token"], r["tokens_per_s"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(xlabel="non-zero MACs per token", ylabel="tokens/s (prefill + decode)", title="throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(folder) / "throughput_vs_macs.png", dpi=110)
    plt.close(fig)

    scored = [r for r in rows if r["batch_size"] == smallest and r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([r["nonzero_macs_per_token"] for r in scored], [r["accuracy"] for r in scored], c="tab:green")
    for r in scored:
        ax.annotate(
            r["model"],
            (r["nonzero_macs_per_token"], r["accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set(xlabel="non-zero MACs per token", ylabel="average test accuracy", title="accuracy")
    fig.tight_layout()
    fig.savefig(Path(folder) / "accuracy_vs_macs.png", dpi=110)
    plt.close(fig)
