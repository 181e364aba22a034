"""`make compare`: the methods run through the flow on one task and profile, and one table compares them."""

from __future__ import annotations

import shutil

import pytest
from conftest import DATA_ROOT, needs_data

from flows.compare import COLUMNS, compare, markdown
from flows.study import pilot, run_study
from nlsflow.artifacts import read_manifest, read_table, stage_dir
from nlsflow.config import load_config
from nlsflow.errors import NlsflowError

pytestmark = [pytest.mark.slow, needs_data]


def test_a_study_compares_each_method_with_lora_and_generates_the_table_and_plot(tmp_path, monkeypatch, capsys):
    """`make study` on the tiny profile (configs/studies/math-tiny.yaml): every row runs through the flow and is
    published without its weights, and `make compare`'s table and the study's come from the manifests. The
    accuracies mean nothing on a random model."""
    names = ("lora", "nola", "shears-30")  # Shears: at 30% sparsity, a variant row
    results = tmp_path / "results"
    out = run_study("math", "tiny", names, tmp_path, [f"data.root={DATA_ROOT}"], results=results)
    assert out == results / "math-tiny"
    assert all((out / name / "extract" / "manifest.json").is_file() for name in names)
    assert not list(out.rglob("*.safetensors"))
    # each row is published as it finishes, before the next one starts
    assert (out / "lora").stat().st_mtime <= (
        tmp_path / "math-tiny-nola-study" / "prune" / "manifest.json"
    ).stat().st_mtime
    rows = read_table(tmp_path / "compare-math-tiny-study.parquet", "comparison").to_pylist()
    assert [r["method"] for r in rows] == list(names)
    shown_only = {"accuracy_95", "delta_95", "accuracy_cloze_95", "delta_cloze_95"}  # cells made of intervals
    intervals = {
        f"{column}{suffix}_{end}"
        for column in ("accuracy", "delta")
        for suffix in ("", "_cloze")
        for end in ("low", "high")
    }
    assert set(rows[0]) == set(COLUMNS) - shown_only | intervals
    assert all(value is None for r in rows for c, value in r.items() if "cloze" in c)  # math: no cloze
    for row in rows:
        train = read_manifest(stage_dir(tmp_path / f"math-tiny-{row['method']}-study", "train"), "train")
        assert row["trainable_params"] == train.metrics["trainable_params"] and row["train_seconds"] == train.duration_s
        assert train.output.steps == 20  # the study's budget, the same for every row
    lora, nola, shears = rows
    assert lora["trainable_params"] == shears["trainable_params"]  # the same targets at the maximal rank
    assert lora["nonzero_params"] > shears["nonzero_params"]  # plain LoRA keeps the dense base
    assert (
        nola["trainable_params"] < shears["trainable_params"]
        and nola["train_adapter_bytes"] < shears["train_adapter_bytes"]
    )
    assert nola["nonzero_params"] > shears["nonzero_params"]  # NOLA keeps the dense base, Shears prunes 30%
    assert shears["nonzero_macs_per_token"] < shears["macs_per_token"] == nola["macs_per_token"]  # same shapes
    assert nola["nonzero_macs_per_token"] > shears["nonzero_macs_per_token"]
    assert (lora["delta_vs_lora"], lora["delta_low"], lora["delta_high"]) == (0, 0, 0)
    assert lora["retention"] == (100 if lora["accuracy"] else None)  # % of 0 is undefined (a random model)
    for row in rows[1:]:  # on the same records the paired difference is the difference of the averages
        assert row["delta_vs_lora"] == pytest.approx(row["accuracy"] - lora["accuracy"])
        assert row["delta_low"] <= row["delta_vs_lora"] <= row["delta_high"]
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
    # `make compare ARGS=--existing`: tabulated, nothing run
    assert compare("math", "tiny", names[:2], tmp_path, existing=True, suffix="-study") == rows[:2]
    with pytest.raises(NlsflowError, match="math-tiny-lonas-study/train/manifest.json: run the 'train' stage first"):
        compare("math", "tiny", ("lonas",), tmp_path, existing=True, suffix="-study")
    text = (tmp_path / "compare-math-tiny-study.md").read_text()
    assert text == markdown(rows[:2]) and text.count("\n") == 4 and "| nola |" in text

    table = read_table(out / "results.parquet", "study").to_pylist()
    searched_other = {  # a method whose search chose another subnet than the heuristic has that one after its row
        name: read_manifest(stage_dir(tmp_path / f"math-tiny-{name}-study", "evaluate"), "evaluate").output.subnet
        != read_manifest(stage_dir(tmp_path / f"math-tiny-{name}-study", "extract"), "extract").output.subnet
        for name in names[1:]
    }
    expected = [m for name in names for m in (name, f"{name} heuristic")[: 1 + searched_other.get(name, False)]]
    assert [r["method"] for r in table] == [*expected, "dense base", "wanda 30% base"]
    by_name = {r["method"]: r for r in table}
    for name in [n for n, other in searched_other.items() if other]:
        heuristic, searched = by_name[f"{name} heuristic"], by_name[name]
        assert heuristic["reference"] == name and heuristic["nonzero_params"] is None  # not deployed: not counted
        assert heuristic["delta_vs_reference"] == pytest.approx(heuristic["accuracy"] - searched["accuracy"])
    dense, pruned = table[-2:]
    for row in table:
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
        assert row["delta_low"] <= row["delta_vs_lora"] <= row["delta_high"]
    assert dense["trainable_params"] == 0
    benchmark = read_manifest(stage_dir(tmp_path / "math-tiny-lora-study", "benchmark"), "benchmark").output
    counted = benchmark.results["dense"]  # the dense base as LoRA's run measured it
    assert (dense["nonzero_params"], dense["nonzero_macs_per_token"]) == (
        counted.nonzero_params,
        counted.nonzero_macs_per_token,
    )
    assert dense["delta_vs_lora"] == pytest.approx(dense["accuracy"] - lora["accuracy"])
    # shears-30's pruned base, scored by its evaluate without adapter (evaluate.baselines [pruned]), against the dense
    # base on the same records; no other row has such a pairing
    counted = read_manifest(stage_dir(tmp_path / "math-tiny-shears-30-study", "benchmark"), "benchmark").output
    assert pruned["nonzero_params"] == counted.results["pruned"].nonzero_params < dense["nonzero_params"]
    assert pruned["trainable_params"] == 0 and pruned["params"] == dense["params"]
    assert pruned["reference"] == "dense base"
    assert pruned["delta_vs_reference"] == pytest.approx(pruned["accuracy"] - dense["accuracy"])
    assert pruned["delta_vs_reference_low"] <= pruned["delta_vs_reference"] <= pruned["delta_vs_reference_high"]
    assert pruned["delta_vs_lora"] == pytest.approx(pruned["accuracy"] - lora["accuracy"])
    assert all(r["reference"] is None for r in table if r["method"] in names or r["method"] == "dense base")
    # the variant: Shears (sparsity-preserving) on a base pruned 30% (configs/studies/math-tiny.variants.yaml)
    shears_30 = load_config([tmp_path / "math-tiny-shears-30-study" / "config.yaml"])
    assert shears_30.method.name == "shears" and shears_30.prune.sparsity == 0.3
    assert read_manifest(stage_dir(tmp_path / "math-tiny-shears-30-study", "prune"), "prune").output.sparsity == (
        pytest.approx(0.3, abs=0.01)
    )
    text = (out / "results.md").read_text()
    assert "| lora |" in text and "| dense base |" in text and "| wanda 30% base |" in text and "Δ vs LoRA" in text
    assert "**wanda 30% base against dense base**, what pruning costs before any adapter: " in text
    assert "Test records: gsm8k 8, AQuA 8, mawps 8, SVAMP 8." in text and "outside_average" not in text
    # the budget check: LoRA against its own base with the adapter off, on the validation slice only
    pilot_text = pilot("math", "tiny", tmp_path, results).read_text()
    validation = read_table(stage_dir(tmp_path / "math-tiny-lora-study", "train") / "validation.parquet", "records")
    assert f"{validation.num_rows} held-out validation records" in pilot_text and "LoRA − dense base" in pilot_text
    assert pilot_text.count("\n| ") == 1 + len(set(validation.column("source").to_pylist()))  # header + a source each
    assert (out / "accuracy_vs_macs.png").stat().st_size > 10_000
    # published rows are not run again, on any machine: the same table from the evidence alone, the runs gone
    import flows.study

    monkeypatch.setattr(flows.study, "compare", lambda *a, **k: pytest.fail("a published row ran again"))
    for name in names:
        shutil.rmtree(tmp_path / f"math-tiny-{name}-study")
    assert run_study("math", "tiny", names, tmp_path, [f"data.root={DATA_ROOT}"], plan=True, results=results) is None
    assert capsys.readouterr().out.count("published, up to date") == len(names)
    run_study("math", "tiny", names, tmp_path, [f"data.root={DATA_ROOT}"], results=results)
    assert read_table(out / "results.parquet", "study").to_pylist() == table
    # --existing: the published rows only, and the others named
    run_study("math", "tiny", ("lora", "lonas"), tmp_path, [f"data.root={DATA_ROOT}"], results=results, existing=True)
    assert [r["method"] for r in read_table(out / "results.parquet", "study").to_pylist()] == ["lora", "dense base"]
    assert "Rows not run yet: lonas (not run yet)." in (out / "results.md").read_text()
    with pytest.raises(NlsflowError, match="LoRA's row is not in .*; run the study without --existing first"):
        run_study("math", "tiny", ("lora",), tmp_path, ["train.max_steps=3"], results=results, existing=True)
    with pytest.raises(NlsflowError, match=r"unknown study rows \['shears-3'\]: choose from .* \['shears-30'\]"):
        run_study("math", "tiny", ("lora", "shears-3"), tmp_path)
    with pytest.raises(NlsflowError, match="a study needs plain LoRA"):
        run_study("math", "tiny", ("shears",), tmp_path)
    with pytest.raises(NlsflowError, match="no study config .*commonsense-tiny.yaml"):
        run_study("commonsense", "tiny", ("lora",), tmp_path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("shears: {method: shears}", r"variant names \['shears'\] are methods' names"),
        ("x: {method: qlora}", "x.method: Input should be"),
        ("x: {method: shears, sparsity: 0.3}", "unknown key 'x.sparsity'"),
    ],
)
def test_a_bad_variants_file_is_one_line(tmp_path, monkeypatch, text, message):
    import flows.study

    monkeypatch.setattr(flows.study, "STUDIES", tmp_path)
    (tmp_path / "math-tiny.variants.yaml").write_text(text)
    with pytest.raises(NlsflowError, match=message) as err:
        flows.study.study_variants("math", "tiny")
    assert "\n" not in str(err.value)
