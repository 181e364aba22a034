"""The alternating runner and the bench table: medians ± half ranges, ratio ours/peer, whether the target is met."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from nlsflow.artifacts import write_table
from nlsflow.io import atomic_write_text

Stat = tuple[float, float]  # (median, spread)


def alternate(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int, desc: str) -> dict[str, list]:
    """Call every variant once per round, in turn, so drift hits all alike; odd rounds run in reverse order
    (ours, peer, peer, ours, ...) so that no variant always runs first.

    The first `warmup` rounds are discarded; returns each variant's results of the `repeats` rounds after them.
    """
    results: dict[str, list] = {name: [] for name in variants}
    with tqdm(total=(warmup + repeats) * len(variants), desc=desc, unit="run") as bar:
        for round_ in range(warmup + repeats):
            for name, fn in list(variants.items())[:: -1 if round_ % 2 else 1]:
                value = fn()
                if round_ >= warmup:
                    results[name].append(value)
                bar.update(1)
    return results


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn` takes, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemoryAbove:
    """The peak memory (MB) above what was in use on entry, in `.mb`: the CUDA allocator's, or on CPU the RSS
    sampled every millisecond by a thread (the process's max RSS would be the model load's, whatever ran after)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self._done = device, 0.0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._base = self._peak = _rss_mb()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self._peak = max(self._peak, _rss_mb())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        else:
            self._done.set()
            self._sampler.join()
            self.mb = max(self._peak, _rss_mb()) - self._base


def _overlap(ours: Stat, peer: Stat) -> bool:
    return abs(ours[0] - peer[0]) <= ours[1] + peer[1]


@dataclass(frozen=True)
class Target:
    text: str
    met: Callable[[Stat, Stat], bool]  # (ours, peer) -> met


def ratio_at_most(limit: float) -> Target:
    return Target(f"ratio ≤ {limit:g}", lambda o, p: o[0] / p[0] <= limit)


def no_worse(lower_is_better: bool) -> Target:
    """Ours at least as good as the peer, or the two within each other's spread."""
    if lower_is_better:
        return Target("ratio ≤ 1 within noise", lambda o, p: o[0] <= p[0] or _overlap(o, p))
    return Target("ratio ≥ 1 within noise", lambda o, p: o[0] >= p[0] or _overlap(o, p))


def equal_within(tolerance: float) -> Target:
    return Target(
        f"ratio within ±{tolerance:.0%} or within spread",
        lambda o, p: abs(o[0] / p[0] - 1) <= tolerance or _overlap(o, p),
    )


def row(
    comparison: str,
    ours: str,
    peer: str,
    metric: str,
    unit: str,
    ours_stat: Stat,
    peer_stat: Stat,
    repeats: int,
    target: Target | None = None,
    note: str = "",
) -> dict:
    """One table row (without `profile`, which `write_bench` adds)."""
    return {
        "comparison": comparison,
        "ours": ours,
        "peer": peer,
        "metric": metric,
        "unit": unit,
        "ours_median": ours_stat[0],
        "ours_spread": ours_stat[1],
        "peer_median": peer_stat[0],
        "peer_spread": peer_stat[1],
        "ratio": ours_stat[0] / peer_stat[0],
        "target": target.text if target else "",
        "target_met": target.met(ours_stat, peer_stat) if target else None,
        "repeats": repeats,
        "note": note,
    }


HEADERS = [
    "comparison",
    "ours",
    "peer",
    "metric",
    "ours: median ± half range",
    "peer: median ± half range",
    "ratio ours/peer",
    "target",
    "met",
    "note",
]


def _cells(r: dict) -> list[str]:
    def value(prefix):
        return f"{r[prefix + '_median']:.4g} ± {r[prefix + '_spread']:.2g} {r['unit']}"

    met = {True: "yes", False: "NO", None: "–"}[r["target_met"]]
    return [
        r["comparison"],
        r["ours"],
        r["peer"],
        r["metric"],
        value("ours"),
        value("peer"),
        f"{r['ratio']:.3f}",
        r["target"] or "–",
        met,
        r["note"],
    ]


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_bench(rows: list[dict], out_dir: Path, profile: str, title: str) -> tuple[Path, Path]:
    """`<out_dir>/bench-<profile>.parquet` (table "bench") and `.md`."""
    rows = [{**r, "profile": profile} for r in rows]
    parquet, md = Path(out_dir) / f"bench-{profile}.parquet", Path(out_dir) / f"bench-{profile}.md"
    write_table(parquet, "bench", rows)
    atomic_write_text(md, markdown(rows, title))
    return parquet, md


def render(rows: list[dict], title: str) -> None:
    """The table on the terminal; the notes, long, below it."""
    table = Table(title=title)
    for header in ("comparison", "ours vs peer", "metric", "ours", "peer", "ratio ours/peer", "target", "met"):
        table.add_column(header, justify="right" if header.startswith("ratio") else "left")
    notes: list[str] = []
    for r in rows:
        if r["note"] not in notes:
            notes.append(r["note"])
        cells = _cells(r)
        table.add_row(f"{cells[0]} [{notes.index(r['note']) + 1}]", f"{cells[1]}\nvs {cells[2]}", *cells[3:9])
    console = Console()
    console.width = max(console.width, 150)
    console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"[{i}] {note}", markup=False)
