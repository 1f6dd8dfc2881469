"""intrinsic-dim: d_threshold (exact on constructed cases, monotone in the threshold, None when unreached or
undefined) and the quick experiment on a tiny model (results structure, d90 consistent with the recorded metrics,
resume, files written)."""

from __future__ import annotations

import json
import random

import pytest
from experiment_helpers import tiny_task, write_classification_jsonl, write_text_jsonl

from lorakit.errors import ConfigError
from lorakit.experiments import intrinsic_dim as ID
from lorakit.experiments.cells import CellStore


# -- d_threshold -----------------------------------------------------------------------------------------
def test_d_threshold_exact_on_a_constructed_case():
    ds, acc = [10, 100, 1000, 10000], [0.40, 0.70, 0.72, 0.79]
    assert ID.d_threshold(ds, acc, reference=0.8) == 1000  # 0.9 x 0.8 = 0.72 (reached exactly, up to rounding)
    assert ID.d_threshold(ds, acc, reference=0.8, threshold=0.5) == 10  # 0.40
    assert ID.d_threshold(ds, acc, reference=0.8, threshold=0.95) == 10000  # 0.76
    assert ID.d_threshold(ds, acc, reference=0.8, threshold=1.0) is None  # 0.8: never reached
    assert ID.d_threshold([1000, 10, 100], [0.9, 0.2, 0.95], reference=1.0) == 100  # unsorted: the smallest d
    assert ID.d_threshold([0, 10], [0.9, 0.1], reference=1.0) == 0  # the head alone


def test_d_threshold_for_a_loss_uses_the_improvement_over_the_baseline():
    # untrained loss 5.0, full fine-tuning 1.0: 90% of the improvement is a loss of 1.4
    ds, loss = [10, 100, 1000], [3.0, 1.5, 1.4]
    assert ID.threshold_target(1.0, 0.9, higher_is_better=False, baseline=5.0) == pytest.approx(1.4)
    assert ID.d_threshold(ds, loss, 1.0, higher_is_better=False, baseline=5.0) == 1000
    assert ID.d_threshold(ds, loss, 1.0, 0.5, higher_is_better=False, baseline=5.0) == 10
    with pytest.raises(ConfigError, match="baseline"):
        ID.d_threshold(ds, loss, 1.0, higher_is_better=False)
    # full fine-tuning no better than the untrained model: no share of its gain to reach
    assert ID.d_threshold(ds, loss, 5.0, higher_is_better=False, baseline=5.0) is None
    assert ID.d_threshold(ds, [0.5, 0.6, 0.7], 0.4, higher_is_better=True, baseline=0.5) is None


def test_d_threshold_is_monotone_in_the_threshold():
    rng = random.Random(0)
    thresholds = [i / 20 for i in range(21)]
    for _ in range(200):
        ds = rng.sample([0, 3, 10, 30, 100, 300, 1000, 3000, 10000], rng.randint(1, 9))
        metrics = [rng.random() for _ in ds]  # not monotone in d: noise, as with real runs
        higher = rng.random() < 0.5
        reference = rng.uniform(0.2, 1.0) if higher else rng.uniform(0.0, 0.5)
        baseline = None if higher and rng.random() < 0.5 else rng.uniform(0.0, 0.2) if higher else rng.uniform(0.6, 1.0)
        found = [ID.d_threshold(ds, metrics, reference, t, higher_is_better=higher, baseline=baseline)
                 for t in thresholds]
        reached = [d for d in found if d is not None]
        assert reached == sorted(reached)  # a higher threshold never gives a smaller d
        first_none = next((i for i, d in enumerate(found) if d is None), len(found))
        assert all(d is None for d in found[first_none:])  # once unreached, unreached for every higher threshold


def test_d_threshold_refuses_bad_input():
    with pytest.raises(ConfigError, match="2 dimensions but 1 metrics"):
        ID.d_threshold([1, 2], [0.5], 1.0)
    with pytest.raises(ConfigError, match="share in \\[0, 1\\]"):
        ID.d_threshold([1], [0.5], 1.0, threshold=1.5)


def test_summarize_counts_the_head_for_both_families():
    cells = ([{"kind": "full", "seed": s, "metric": 0.8, "trainable": 1000} for s in (0, 1)]
             + [{"kind": "untrained", "d": 0, "seed": s, "metric": 0.3, "trainable": 0} for s in (0, 1)]
             + [{"kind": "head", "d": 0, "seed": s, "metric": m, "trainable": 10} for s, m in ((0, 0.5), (1, 0.6))]
             + [{"kind": "lowrank", "d": 64, "r": 1, "seed": s, "metric": m, "trainable": 74}
                for s, m in ((0, 0.7), (1, 0.76))]
             + [{"kind": "projection", "d": d, "seed": s, "metric": m, "trainable": d + 10}
                for d, s, m in ((4, 0, 0.5), (4, 1, 0.5), (40, 0, 0.75), (40, 1, 0.7))])
    summary = ID.summarize(cells, higher_is_better=True)
    assert summary["reference"]["mean"] == pytest.approx(0.8) and summary["target_90"] == pytest.approx(0.72)
    low, proj = summary["families"]["lowrank"], summary["families"]["projection"]
    assert low["points"][0]["mean"] == pytest.approx(0.73) and low["d90"] == 64
    assert proj["d90"] == 40 and proj["d_at"]["0.5"] == 0  # the head alone (0.55) reaches 50%
    assert proj["d_at"]["0.95"] is None
    # over the head (0.55): 0.55 + 0.9 x 0.25 = 0.775, reached by neither family
    assert low["d90_over_head"] is None and proj["d90_over_head"] is None
    cells.append({"kind": "projection", "d": 400, "seed": 0, "metric": 0.78, "trainable": 410})
    assert ID.summarize(cells, higher_is_better=True)["families"]["projection"]["d90_over_head"] == 400


# -- the experiment on a tiny model ----------------------------------------------------------------------
def _check_files(out, metric: str) -> dict:
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "intrinsic-dim" and saved["task"]["metric"] == metric
    page = (out / "page.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and 'id="experiment-data"' in page
    assert "https://" not in page
    assert "| set-up | d |" in (out / "table.md").read_text()
    return saved["results"]


def test_quick_experiment_on_a_tiny_classifier(classifier_dir, tmp_path, capsys):
    task = tiny_task(classifier_dir, write_classification_jsonl(tmp_path / "cls.jsonl", n=40), steps=3)
    out = tmp_path / "out"
    settings = {"task": task.describe(), "seeds": None}
    results = ID.run(task, out, quick=True, seeds=None, store=CellStore(out, ID.NAME, settings))
    kinds = [c["kind"] for c in results["cells"]]
    assert kinds == ["untrained", "head", "full", "lowrank", *["projection"] * len(ID.QUICK_DIMS)]
    assert results["seeds"] == [0] and results["dims"] == list(ID.QUICK_DIMS)
    head = next(c for c in results["cells"] if c["kind"] == "head")
    full = next(c for c in results["cells"] if c["kind"] == "full")
    for cell in results["cells"]:
        if cell["kind"] == "projection":
            # z and the head train: d + the head's parameters
            assert cell["trainable"] == cell["d"] + head["trainable"] and cell["D"] > cell["d"]
        if cell["kind"] == "lowrank":
            assert cell["trainable"] == cell["d"] + head["trainable"] and cell["gain"] > 0
    # d90 as the recorded means say
    for family in results["families"].values():
        ds = [0] + [p["d"] for p in family["points"]]
        means = [results["head_only"]["mean"]] + [p["mean"] for p in family["points"]]
        assert family["d90"] == ID.d_threshold(ds, means, full["metric"], 0.9)
        assert family["d90_over_head"] == ID.d_threshold(ds, means, full["metric"], 0.9, baseline=means[0])
        assert family["d90"] is None or ID.reaches(means[ds.index(family["d90"])], results["target_90"])
        below = [m for d, m in zip(ds, means) if family["d90"] is None or d < family["d90"]]
        assert not any(ID.reaches(m, results["target_90"]) for m in below)
    saved = _check_files(out, "eval_accuracy")
    assert saved["families"]["projection"]["d90"] == results["families"]["projection"]["d90"]
    printed = capsys.readouterr()
    assert "| set-up | d |" in printed.out and "d90" in printed.out and f"[{len(kinds)}/{len(kinds)}" in printed.err

    again = ID.run(task, out, quick=True, seeds=None, store=CellStore(out, ID.NAME, settings))
    assert again["cells"] == results["cells"]  # every cell read back, nothing trained again
    assert capsys.readouterr().err.count("resumed (finished before)") == len(kinds)


def test_quick_experiment_on_a_tiny_causal_lm_uses_the_untrained_loss(causal_lm_dir, tmp_path):
    task = tiny_task(causal_lm_dir, write_text_jsonl(tmp_path / "text.jsonl", n=30), steps=2)
    out = tmp_path / "out"
    results = ID.run(task, out, quick=True, seeds=None, store=CellStore(out, ID.NAME, {"seeds": None}))
    assert "head" not in [c["kind"] for c in results["cells"]] and results["head_only"] is None
    untrained, full = results["untrained"]["mean"], results["reference"]["mean"]
    assert results["target_90"] == pytest.approx(untrained - 0.9 * (untrained - full))
    for family in results["families"].values():
        ds, means = [p["d"] for p in family["points"]], [p["mean"] for p in family["points"]]
        assert family["d90"] == ID.d_threshold(ds, means, full, 0.9, higher_is_better=False, baseline=untrained)
    _check_files(out, "eval_loss")
