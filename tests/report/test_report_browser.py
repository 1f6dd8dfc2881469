"""`lorakit report`'s page in a real browser: headless Chromium (Debian's `chromium` package) loads the file with
no console message, the widgets set from the URL's hash (#k=..&module=..&d=..&r=..) show Python's numbers in the
dumped DOM, and a screenshot is taken. Skipped, with the reason, where no Chromium is installed."""

from __future__ import annotations

import re

import pytest
from browser_helpers import chromium as _chromium
from browser_helpers import console_lines as _console_lines
from browser_helpers import skip_without_chromium
from report_helpers import build_report_run, inlined_data

from lorakit.cli.main import main
from lorakit.report.page import ba_counts

report_run = pytest.fixture(build_report_run, scope="module", name="report_run")
pytestmark = skip_without_chromium


def _shown(dom: str, element_id: str) -> tuple[str, str]:
    """(data-value, text) of the element with that id in the dumped DOM."""
    found = re.search(rf'<[a-z]+ ([^>]*\bid="{re.escape(element_id)}"[^>]*)>([^<]*)<', dom)
    assert found, f"no element #{element_id} in the dumped DOM"
    value = re.search(r'data-value="([^"]*)"', found.group(1))
    return (value.group(1) if value else ""), found.group(2)


def test_page_in_headless_chromium(report_run, causal_lm_dir, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", str(report_run), "--model", str(causal_lm_dir), "--out", str(page)]) == 0
    data = inlined_data(page.read_text(encoding="utf-8"))
    module = data["adapter"]["modules"][3]
    k, d, r = 3, 1024, 4
    url = f"{page.as_uri()}#k={k}&module={module['module']}&d={d}&r={r}"
    run = _chromium(["--dump-dom", url], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_lines(run.stderr) == [], "console messages while loading the page"
    dom = run.stdout
    assert 'data-ready="1"' in dom, "the page's script did not finish"
    assert _shown(dom, "slider-k")[1] == str(k)
    expected = module["rank_k"][k - 1]
    for element_id, key in (("energy-kept", "energy_kept"), ("rel-error", "rel_error"), ("bound", "bound")):
        value, text = _shown(dom, element_id)
        assert float(value) == expected[key], element_id  # the shortest round-trip text of the same double
    assert _shown(dom, "rel-error")[1] == _shown(dom, "bound")[1]
    assert _shown(dom, "energy-kept")[1] == f"{100 * expected['energy_kept']:.4f}%"
    counts = ba_counts(d, r)
    assert _shown(dom, "ba-lora-params") == (str(counts["lora"]), f"{counts['lora']:,}")
    assert _shown(dom, "ba-full-params") == (str(counts["full"]), f"{counts['full']:,}")
    assert _shown(dom, "ba-ratio") == (f"{counts['ratio']:g}", f"{counts['ratio']:g}x")

    default = _chromium(["--dump-dom", page.as_uri()], tmp_path)  # no hash: k = 1, d = 4096, r = 8
    assert _console_lines(default.stderr) == []
    assert _shown(default.stdout, "slider-k")[1] == "1"
    assert _shown(default.stdout, "ba-lora-params")[1] == "65,536"
    assert _shown(default.stdout, "ba-full-params")[1] == "16,777,216"
    assert _shown(default.stdout, "ba-ratio")[1] == "256x"

    shot = tmp_path / "report.png"
    taken = _chromium(["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2000", url], tmp_path)
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _console_lines(taken.stderr) == []


HARNESS = """<!DOCTYPE html><html><body><iframe id="page" src="%s" width="1200" height="800"></iframe>
<pre id="out">waiting</pre><script>
var frame = document.getElementById('page');
frame.addEventListener('load', function(){
  var doc = frame.contentDocument, win = frame.contentWindow, out = [];
  function shown(id){ var el = doc.getElementById(id); return [el.getAttribute('data-value'), el.textContent]; }
  function move(id, value){  // what a user's drag does: the input's value changes, then an 'input' event fires
    var el = doc.getElementById(id); el.value = String(value); el.dispatchEvent(new win.Event('input'));
  }
  var select = doc.getElementById('slider-module');
  select.value = '%d'; select.dispatchEvent(new win.Event('change'));
  out.push(['start', shown('slider-k'), shown('energy-kept'), shown('rel-error'), shown('bound')]);
  move('rank-k', %d);
  out.push(['moved', shown('slider-k'), shown('energy-kept'), shown('rel-error'), shown('bound')]);
  move('ba-d', 1024); move('ba-r', 4);
  out.push(['ba', shown('ba-lora-params'), shown('ba-full-params'), shown('ba-ratio')]);
  document.getElementById('out').textContent = JSON.stringify(out);
});
</script></body></html>"""


def test_moving_the_sliders_changes_the_numbers(report_run, causal_lm_dir, tmp_path):
    """Input events on the sliders (as a drag fires them), in the page inside a same-directory frame."""
    import json

    page = tmp_path / "report.html"
    assert main(["report", str(report_run), "--model", str(causal_lm_dir), "--out", str(page)]) == 0
    data = inlined_data(page.read_text(encoding="utf-8"))
    index, k = 2, 3
    module = data["adapter"]["modules"][index]
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS % (page.name, index, k), encoding="utf-8")
    run = _chromium(["--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
                     harness.as_uri()], tmp_path)
    assert run.returncode == 0 and _console_lines(run.stderr) == [], run.stderr[-2000:]
    found = re.search(r'<pre id="out">(.*?)</pre>', run.stdout, re.S)
    assert found and found.group(1) != "waiting", "the harness did not run"
    start, moved, ba = json.loads(found.group(1).replace("&quot;", '"'))
    first, row = module["rank_k"][0], module["rank_k"][k - 1]
    assert start[1][1] == "1" and float(start[2][0]) == first["energy_kept"]
    assert moved[1][1] == str(k)
    assert float(moved[2][0]) == row["energy_kept"] and moved[2][1] == f"{100 * row['energy_kept']:.4f}%"
    assert float(moved[3][0]) == row["rel_error"] and float(moved[4][0]) == row["bound"]
    assert moved[2] != start[2], "moving k did not change the energy shown"
    counts = ba_counts(1024, 4)
    assert ba[1:] == [[str(counts["lora"]), f"{counts['lora']:,}"], [str(counts["full"]), f"{counts['full']:,}"],
                  [f"{counts['ratio']:g}", f"{counts['ratio']:g}x"]]
