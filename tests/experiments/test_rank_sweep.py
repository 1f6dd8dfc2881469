"""rank-sweep and its fit: a ln r + b recovered exactly, a noisy fit against numpy.polyfit, degenerate inputs with a
reason, and the quick sweep on a tiny model (results, R^2 reported, files written, the table printed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from experiment_helpers import tiny_task, write_classification_jsonl

from lorakit.errors import ConfigError
from lorakit.experiments import rank_sweep
from lorakit.experiments.cells import CellStore
from lorakit.experiments.fits import fit_log, gain, largest_pair, mean_std, relative


def test_fit_recovers_a_and_b_exactly():
    rs = [1, 2, 4, 8, 16, 32, 64]
    fit = fit_log(rs, [0.03 * math.log(r) + 0.61 for r in rs])
    assert fit.a == pytest.approx(0.03, abs=1e-12) and fit.b == pytest.approx(0.61, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.reason is None
    assert fit.gain_per_doubling == pytest.approx(0.03 * math.log(2))
    assert fit.predict(128) == pytest.approx(0.03 * math.log(128) + 0.61)


def test_noisy_fit_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    rs = [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 64, 64]
    values = [0.02 * math.log(r) + 0.5 + float(rng.normal(0, 0.01)) for r in rs]
    fit = fit_log(rs, values)
    a, b = np.polyfit(np.log(rs), values, 1)
    predicted = a * np.log(rs) + b
    r2 = 1 - np.sum((np.array(values) - predicted) ** 2) / np.sum((np.array(values) - np.mean(values)) ** 2)
    assert (fit.a, fit.b, fit.r2) == pytest.approx((a, b, r2), rel=1e-9)
    assert 0 < fit.r2 < 1 and (fit.n, fit.distinct_r) == (12, 6)


def test_degenerate_fits_say_why():
    one = fit_log([4, 4, 4], [0.5, 0.6, 0.7])
    assert (one.a, one.b, one.r2) == (None, None, None) and "one distinct r" in one.reason
    flat = fit_log([1, 2, 4], [0.5, 0.5, 0.5])
    assert (flat.a, flat.b, flat.r2) == (0.0, 0.5, None) and "undefined" in flat.reason
    assert fit_log([], []).reason.startswith("no point")
    with pytest.raises(ConfigError, match="r must be a finite number > 0"):
        fit_log([0, 1], [0.1, 0.2])
    with pytest.raises(ConfigError, match="finite"):
        fit_log([1, 2], [0.1, float("nan")])
    with pytest.raises(ConfigError, match="2 ranks but 1 values"):
        fit_log([1, 2], [0.1])


def test_summaries():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([1.0]) == (1.0, None) and mean_std([]) == (None, None)
    assert gain({1: 0.5, 2: 0.6}, 1, 2) == pytest.approx(0.1) and gain({1: 0.5}, 1, 2) is None
    assert largest_pair([1, 4, 16, 4]) == (4, 16) and largest_pair([8]) is None
    assert relative(0.8, 1.0, True) == pytest.approx(0.8) and relative(2.0, 1.0, False) == pytest.approx(0.5)
    assert relative(None, 1.0, True) is None and relative(1.0, 0.0, True) is None


def test_summarize_uses_every_run():
    runs = [{"r": r, "seed": s, "metric": 0.1 * math.log(r) + 0.2 + 0.01 * s, "trainable": 10 * r}
            for r in (1, 2, 4) for s in (0, 1)]
    full = [{"metric": 0.5, "trainable": 1000}, {"metric": 0.6, "trainable": 1000}]
    summary = rank_sweep.summarize(runs, full, higher_is_better=True)
    assert summary["fit"]["n"] == 6 and summary["fit"]["a"] == pytest.approx(0.1)
    assert summary["full"]["mean"] == pytest.approx(0.55)
    row = summary["per_rank"][0]
    assert row["r"] == 1 and row["mean"] == pytest.approx(0.205) and row["vs_full"] == pytest.approx(0.205 / 0.55)
    assert summary["gain_first_pair"] == {"from": 1, "to": 2, "gain": pytest.approx(0.1 * math.log(2))}
    assert summary["gain_last_pair"]["from"] == 2 and summary["gain_last_pair"]["to"] == 4


def test_quick_sweep_on_a_tiny_model(classifier_dir, tmp_path, capsys):
    data = write_classification_jsonl(tmp_path / "cls.jsonl", n=40)
    task = tiny_task(classifier_dir, data, steps=3)
    out = tmp_path / "out"
    store = CellStore(out, rank_sweep.NAME, {"task": task.describe(), "seeds": None})
    results = rank_sweep.run(task, out, quick=True, seeds=None, store=store)
    assert results["ranks"] == list(rank_sweep.QUICK_RANKS) and results["seeds"] == [0]
    assert [run["r"] for run in results["runs"]] == list(rank_sweep.QUICK_RANKS) and len(results["full_runs"]) == 1
    trainable = [row["trainable"] for row in results["per_rank"]]
    assert trainable == sorted(trainable) and len(set(trainable)) == 3  # more parameters at a larger r
    fit = results["fit"]
    expected = fit_log([r["r"] for r in results["runs"]], [r["metric"] for r in results["runs"]])
    assert fit["n"] == 3 and fit["a"] == pytest.approx(expected.a)
    assert fit["r2"] == pytest.approx(expected.r2) if expected.r2 is not None else fit["reason"]  # reported, not assumed
    assert results["gain_first_pair"]["from"] == 1 and results["gain_last_pair"]["to"] == 16

    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "rank-sweep" and saved["task"]["metric"] == "eval_accuracy"
    assert saved["results"]["fit"]["n"] == 3 and "torch" in saved["versions"]
    page = (out / "page.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and 'id="experiment-data"' in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # self-contained
    table = (out / "table.md").read_text()
    assert "| r | trainable params |" in table and "full FT" in table
    printed = capsys.readouterr()
    assert "| r | trainable params |" in printed.out and "[4/4" in printed.err

    again = rank_sweep.run(task, out, quick=True, seeds=None,
                           store=CellStore(out, rank_sweep.NAME, {"task": task.describe(), "seeds": None}))
    assert again["fit"] == results["fit"]  # resumed from the cells: nothing trained again
    assert "resumed (finished before)" in capsys.readouterr().err
