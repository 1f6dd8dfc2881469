"""`lorakit report`'s page: ONE self-contained HTML file (no CDN, no network). CSS and JS inline, the data
(report/data.py's dict) inlined as JSON in <script type="application/json" id="report-data">, the static plots
drawn here as inline SVG by small pure functions; the two widgets (the rank slider and "B A forming") are a few
lines of inline JS that only look numbers up in the inlined JSON (the rank slider) or count d and r (B A), so the
page's numbers are Python's. Every piece of text placed in the HTML is escaped.

Test hook: the page reads location.hash, e.g. `#k=3&module=model.layers.0.mlp.up_proj&d=1024&r=4`, and sets
the widgets from it before drawing (so `chromium --headless --dump-dom page.html#k=3` shows the k = 3 numbers).
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from .panels import demo_panel, dora_panel, memory_panel, nf4_panel
from .plan import lora_params, savings_ratio
from .svg import PALETTE, _colour, _scale, bar_chart, heatmap, line_chart, tick_label  # noqa: F401 - also for importers of page

BA_DEFAULT_D, BA_DEFAULT_R = 4096, 8


# -- pure helpers ----------------------------------------------------------------------------------------
def ba_counts(d: int, r: int) -> dict[str, float | int]:
    """B A on a square d x d weight: LoRA's 2 d r parameters, the full d², and the ratio d / (2 r)
    (d = 4096, r = 8: 65,536 vs 16,777,216, 256x).

    Raises:
        ConfigError: d or r below 1.
    """
    return {"lora": lora_params(d, d, r), "full": d * d, "ratio": savings_ratio(d, d, r)}


# -- sections --------------------------------------------------------------------------------------------
def _section(title: str, body: str, section_id: str) -> str:
    return f'<section id="{section_id}"><h2>{escape(title)}</h2>{body}</section>'


def curves_section(curves: dict[str, Any] | None) -> str:
    """Loss, learning rate, grad norm, eval metrics, diagnostics and per-layer ||sBA||/||W0|| over steps."""
    if not curves:
        return ""
    charts = [line_chart({"loss": curves["loss"]}, "training loss"),
              line_chart({"lr": curves["lr"]}, "learning rate"),
              line_chart({"grad_norm": curves["grad_norm"]}, "gradient norm")]
    charts += [line_chart({name: pts}, name) for name, pts in curves["eval"].items()]
    if curves["diagnostics"]:
        charts.append(line_chart(curves["diagnostics"], "diagnostics (update / grad ratios)"))
    ratios = curves["update_ratio"]
    if ratios:
        steps = sorted({s for pts in ratios.values() for s, _ in pts})
        cells = [[dict((s, v) for s, v in pts).get(step) for step in steps] for pts in ratios.values()]
        charts.append(heatmap(list(ratios), [str(s) for s in steps], cells,
                              "||sBA||_F / ||W0||_F per layer at the diagnostics steps (columns: step)"))
    body = "".join(f'<div class="plot">{c}</div>' for c in charts if c)
    return _section("Training", body or "<p>metrics.jsonl has no step records.</p>", "training")


def ratio_section(adapter: dict[str, Any], checkpoints: dict[str, Any] | None) -> str:
    """The ||sBA||_F / ||W0||_F heatmap over layers x module types (with --model), and over checkpoints."""
    grid = adapter.get("heatmap")
    if grid is None:
        note = "<p>Pass <code>--model DIR</code> to see ||sBA||_F / ||W0||_F per module (the size of the update " \
               "against the pre-trained weight).</p>"
        return _section("Update size against the base weight", note, "ratios")
    body = heatmap(grid["rows"], grid["cols"], grid["cells"], "||sBA||_F / ||W0||_F: layers (rows) x module types")
    body = f'<div class="plot">{body}</div>'
    if checkpoints and checkpoints["steps"]:
        body += '<div class="plot">' + heatmap(list(checkpoints["modules"]), [str(s) for s in checkpoints["steps"]],
                        list(checkpoints["modules"].values()), "||sBA||_F / ||W0||_F at each checkpoint (columns: step)") + "</div>"
    return _section("Update size against the base weight", body, "ratios")


def spectrum_section(adapter: dict[str, Any]) -> str:
    """Per module: the singular values of s B A (bars), effective rank and energy in the top directions."""
    rows = []
    for m in adapter["modules"]:
        top1 = "-" if m["energy_top1"] is None else f"{m['energy_top1']:.1%}"
        half = "-" if m["energy_top_half"] is None else f"{m['energy_top_half']:.1%}"
        rows.append(f"<tr><td><code>{escape(m['module'])}</code></td><td>{m['d']}x{m['k']}</td><td>{m['r']}</td>"
                    f"<td>{m['delta_fro_norm']:.4g}</td><td>{m['numerical_rank']}</td><td>{m['effective_rank']:.2f}</td>"
                    f"<td>{top1}</td><td>{half} (top {m['top_half']})</td>"
                    f"<td>{bar_chart(m['singular_values'], 'singular values')}</td></tr>")
    head = ("<tr><th>module</th><th>d x k</th><th>r</th><th>||sBA||_F</th><th>rank</th><th>effective rank</th>"
            "<th>energy top 1</th><th>energy top r/2</th><th>spectrum of s B A</th></tr>")
    note = ("<p>Singular values of ΔW = s B A from the factors (QR of B and A<sup>T</sup>, then the SVD of the small "
            "r x r core; the d x k matrix is never formed). Effective rank = exp(entropy of σ/Σσ).</p>")
    return _section("Spectrum per module", note + f'<table class="spectrum">{head}{"".join(rows)}</table>', "spectrum")


def slider_section(adapter: dict[str, Any]) -> str:
    """The rank slider: a module and k = 1..r; the numbers shown are looked up in the inlined rank_k tables."""
    options = "".join(f'<option value="{i}">{escape(m["module"])} (r={m["r"]})</option>'
                      for i, m in enumerate(adapter["modules"]))
    body = (
        f'<p><label>module <select id="slider-module">{options}</select></label> '
        f'<label>k <input type="range" id="rank-k" min="1" max="1" value="1"></label> '
        f'k = <b id="slider-k">1</b> of <span id="slider-r">1</span></p>'
        '<table class="numbers"><tr><th>energy kept Σ<sub>i≤k</sub>σ<sub>i</sub>²/Σσ<sub>i</sub>²</th>'
        '<td id="energy-kept">-</td></tr>'
        '<tr><th>relative error ||ΔW − ΔW<sub>k</sub>||<sub>F</sub> / ||ΔW||<sub>F</sub></th><td id="rel-error">-</td></tr>'
        '<tr><th>Eckart–Young bound sqrt(Σ<sub>i&gt;k</sub>σ<sub>i</sub>²/Σσ<sub>i</sub>²)</th><td id="bound">-</td></tr>'
        '</table><p class="note">The truncation to the top k singular directions attains the Eckart–Young bound '
        '(min over rank-k M of ||ΔW − M||<sub>F</sub>² = Σ<sub>i&gt;k</sub>σ<sub>i</sub>²), so the error and the '
        'bound are the same number. All numbers were computed in Python and are read from the page\'s data.</p>'
        '<div id="slider-bars"></div>'
    )
    return _section("Rank slider: how much of this update a rank-k adapter keeps", body, "rank-slider")


def ba_section() -> str:
    """"B A forming": sliders for d and r, the skinny B (d x r) and A (r x d) and their d x d product to scale."""
    body = (
        f'<p><label>d <input type="range" id="ba-d" min="64" max="8192" step="64" value="{BA_DEFAULT_D}"></label> '
        f'<span id="ba-d-value">{BA_DEFAULT_D}</span> '
        f'<label>r <input type="range" id="ba-r" min="1" max="256" value="{BA_DEFAULT_R}"></label> '
        f'<span id="ba-r-value">{BA_DEFAULT_R}</span></p>'
        '<svg id="ba-svg" width="720" height="300" viewBox="0 0 720 300" role="img" aria-label="B A forming"></svg>'
        '<table class="numbers"><tr><th>LoRA parameters (B and A: 2 d r)</th><td id="ba-lora-params">-</td></tr>'
        '<tr><th>full d x d weight (d²)</th><td id="ba-full-params">-</td></tr>'
        '<tr><th>savings d² / (2 d r)</th><td id="ba-ratio">-</td></tr></table>'
    )
    return _section("B A forming: two skinny matrices, one d x d update", body, "ba-forming")


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#111;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.plot{display:inline-block;margin:4px 12px 12px 0;vertical-align:top}
.chart .title{font-size:13px;font-weight:600}.tick{font-size:10px;fill:#444}.cell{font-size:9px;fill:#111}
.axis{stroke:#888}table{border-collapse:collapse;font-size:12px}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:middle}.numbers td{font-family:ui-monospace,monospace;font-size:14px}
.note{color:#555;font-size:12px}code{font-size:12px}
"""

SCRIPT = r"""
(function(){
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var hash = {};
  location.hash.replace(/^#/, '').split('&').forEach(function(kv){
    var i = kv.indexOf('='); if (i > 0) hash[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
  });
  function show(id, value, text){
    var el = document.getElementById(id);
    el.setAttribute('data-value', value === null ? '' : String(value)); el.textContent = text;
  }
  var modules = data.adapter ? data.adapter.modules : [];
  var select = document.getElementById('slider-module'), range = document.getElementById('rank-k');
  function rankUpdate(){
    var m = modules[Number(select.value)]; if (!m) return;
    range.max = String(m.r);
    var k = Math.min(Math.max(Number(range.value), 1), m.r), row = m.rank_k[k - 1];
    document.getElementById('slider-k').textContent = String(k);
    document.getElementById('slider-r').textContent = String(m.r);
    var pct = function(v){ return v === null ? '-' : (100 * v).toFixed(4) + '%'; };
    var num = function(v){ return v === null ? '-' : v.toFixed(6); };
    show('energy-kept', row.energy_kept, pct(row.energy_kept));
    show('rel-error', row.rel_error, num(row.rel_error));
    show('bound', row.bound, num(row.bound));
    var sv = m.singular_values, hi = Math.max.apply(null, sv.concat([1e-300])), w = 480 / sv.length, s = '';
    for (var i = 0; i < sv.length; i++) {
      var h = 100 * sv[i] / hi;
      s += '<rect x="' + (i * w) + '" y="' + (110 - h) + '" width="' + Math.max(w - 2, 1) + '" height="' + h +
           '" fill="' + (i < k ? '#2563eb' : '#d1d5db') + '"></rect>';
    }
    document.getElementById('slider-bars').innerHTML = '<svg width="480" height="112">' + s + '</svg>';
  }
  if (select && modules.length) {
    var wanted = hash.module;
    for (var i = 0; i < modules.length; i++) if (modules[i].module === wanted) select.value = String(i);
    range.max = String(modules[Number(select.value)].r);
    if (hash.k) range.value = hash.k;
    select.addEventListener('change', rankUpdate); range.addEventListener('input', rankUpdate);
    rankUpdate();
  }
  var bd = document.getElementById('ba-d'), br = document.getElementById('ba-r');
  function fmt(n){ return n.toLocaleString('en-US'); }
  function baUpdate(){
    var d = Number(bd.value), r = Number(br.value), lora = 2 * d * r, full = d * d, ratio = full / lora;
    document.getElementById('ba-d-value').textContent = String(d);
    document.getElementById('ba-r-value').textContent = String(r);
    show('ba-lora-params', lora, fmt(lora)); show('ba-full-params', full, fmt(full));
    show('ba-ratio', ratio, (Number.isInteger(ratio) ? String(ratio) : ratio.toFixed(1)) + 'x');
    var px = 240 / 8192, D = d * px, R = Math.max(r * px, 1), y0 = 20;
    var rect = function(x, y, w, h, c, t, below){ return '<rect x="' + x + '" y="' + y + '" width="' + w +
      '" height="' + h + '" fill="' + c + '" stroke="#333" stroke-width="0.5"></rect><text x="' + x + '" y="' +
      (below ? y + h + 14 : y - 4) + '" font-size="11">' + t + '</text>'; };
    var sign = function(x, t){ return '<text x="' + x + '" y="' + (y0 + 12 + Math.min(D, 60) / 2) +
      '" font-size="16">' + t + '</text>'; };
    var ax = 40 + R, px0 = ax + D + 40;
    document.getElementById('ba-svg').innerHTML =
      rect(10, y0 + 12, R, D, '#93c5fd', 'B: ' + d + ' x ' + r, true) + sign(18 + R, '×') +
      rect(ax, y0 + 12, D, R, '#fca5a5', 'A: ' + r + ' x ' + d, false) + sign(ax + D + 12, '=') +
      rect(px0, y0 + 12, D, D, '#c4b5fd', 'B A: ' + d + ' x ' + d + ' (rank ≤ ' + r + ')', false);
  }
  if (hash.d) bd.value = hash.d; if (hash.r) br.value = hash.r;
  bd.addEventListener('input', baUpdate); br.addEventListener('input', baUpdate);
  baUpdate();
  document.body.setAttribute('data-ready', '1');
})();
"""


def finite(value: Any) -> Any:
    """`value` with every NaN / infinity (at any depth of dicts and lists) replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _json_for_script(data: dict[str, Any]) -> str:
    """JSON safe inside <script>: '<', '>' and '&' escaped as \\u003c etc. (a module name cannot end the tag)."""
    text = json.dumps(finite(data), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(data: dict[str, Any]) -> str:
    """The whole page for report/data.gather's dict, as one HTML string."""
    adapter = data.get("adapter")
    title = f"lorakit report: {data['source']}"
    summary = f"<p>{escape(data['kind'])} <code>{escape(data['source'])}</code>"
    if data.get("model_dir"):
        summary += f", base model <code>{escape(str(data['model_dir']))}</code>"
        summary += " (the run's own, from train_config.yaml)" if data.get("model_from_run") else ""
    if adapter:
        t = adapter["totals"]
        summary += (f"; {t['modules']} adapted modules, {t['adapter_params']:,} adapter parameters, "
                    f"{t['adapter_bytes_on_disk']:,} bytes on disk")
    summary += "</p>"
    sections = [demo_panel(data.get("demo"), data["source"]), curves_section(data.get("curves")),
                memory_panel(data.get("memory"))]
    if adapter:
        sections += [ratio_section(adapter, data.get("checkpoints")), slider_section(adapter), ba_section(),
                     spectrum_section(adapter), dora_panel(adapter)]
        sections += [f'<p class="note">warning: {escape(w)}</p>' for w in adapter["warnings"]]
    else:
        sections.append("<p>No LoRA adapter in this directory (a full fine-tune, or a run stopped before saving).</p>")
        sections.append(ba_section())
    sections.append(nf4_panel(data.get("nf4")))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{summary}{''.join(sections)}"
        f'<script type="application/json" id="report-data">{_json_for_script(data)}</script>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )
