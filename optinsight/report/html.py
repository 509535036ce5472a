"""The report: every figure of `plots` as a PNG, and one self-contained index.html
(images embedded as data URIs, no network) with the diagnosis on top, a run
summary, and the figures grouped by concern."""

import base64
import html
import io
import os

import matplotlib.pyplot as plt

from optinsight.report.plots import FIGURES, InstrumentsAbsent, MissingData, ProbeAbsent

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;
background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#cbd5e1;font-size:13px}
main{max-width:1180px;margin:0 auto;padding:16px 32px 48px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d1d5db;padding-bottom:4px}
.finding{border-left:5px solid;padding:8px 12px;margin:8px 0;background:#fff;border-radius:4px}
.finding.error{border-color:#dc2626} .finding.warning{border-color:#d97706}
.finding.info{border-color:#2563eb} .finding .code{font-weight:600}
.finding .advice{color:#555;font-size:13px;margin-top:3px}
.ok{background:#ecfdf5;border-left:5px solid #059669;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #e5e7eb;padding:4px 10px;text-align:left}
figure{background:#fff;margin:10px 0;padding:10px;border-radius:4px;
box-shadow:0 1px 2px rgba(0,0,0,.06)}
figure img{max-width:100%} figcaption{font-size:13px;color:#444;margin-top:4px;
line-height:1.4}
.missing{color:#888;font-size:13px;font-style:italic;margin:4px 0}
"""

_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('figure img');
  var ok = Array.prototype.filter.call(imgs, function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-figures-rendered', ok + '/' + imgs.length);
});
</script>"""


def render_figures(run, out_dir):
    """Save every figure the run has data for as out_dir/<name>.png.

    Returns [(figure, png bytes or None, why none: a MissingData)].
    """
    results = []
    for figure_spec in FIGURES:
        try:
            figure = figure_spec.draw(run)
        except MissingData as e:
            results.append((figure_spec, None, e))
            continue
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        png = buffer.getvalue()
        with open(os.path.join(out_dir, f"{figure_spec.name}.png"), "wb") as f:
            f.write(png)
        results.append((figure_spec, png, None))
    return results


def _summary_rows(run):
    meta = run.summary.get("meta", {})
    rows = [("log dir", run.log_dir), ("steps", len(run.steps)), ("epochs", len(run.epochs)),
            ("variables", len(meta.get("variables", []))),
            ("parameters", sum(meta.get("variable_sizes", [])))]
    for key in ("train_mean_loss", "val_mean_loss", "train_mean_acc", "val_mean_acc"):
        if key in run.epochs and run.epochs[key].notna().any():
            rows.append((f"final {key.replace('_', ' ')}", f"{run.epochs[key].iloc[-1]:.4g}"))
    if not run.probes.empty:
        rows.append(("probes", ", ".join(sorted(set(run.probes["probe"])))))
    return rows


def write_report(run, findings, out_dir):
    """Write the PNGs and index.html into out_dir; returns the page's path."""
    os.makedirs(out_dir, exist_ok=True)
    figures = render_figures(run, out_dir)
    esc = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>optinsight report: {esc(run.log_dir)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<header><h1>optinsight report</h1><p>{esc(os.path.abspath(run.log_dir))}</p>"
             "</header><main>", "<h2>Diagnosis</h2>"]
    if findings:
        for f in findings:
            where = f" · {esc(f.layer)}" if f.layer else ""
            when = f" · step {f.step}" if f.step is not None else ""
            parts.append(f"<div class='finding {f.severity}'><span class='code'>"
                         f"{esc(f.severity.upper())} {esc(f.code)}</span>{where}{when}<div>"
                         f"{esc(f.evidence)}</div><div class='advice'>{esc(f.advice)}</div></div>")
    else:
        parts.append("<div class='ok'>No problems found: no rule of the diagnosis fired.</div>")
    parts.append("<h2>Run</h2><table>")
    parts += [f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
              for k, v in _summary_rows(run)]
    parts.append("</table>")
    absent = {}  # probe -> its figures, mentioned once at the end
    no_instruments = []  # figures of the instruments, when none were recorded
    concern = None
    for figure, png, missing in figures:
        if isinstance(missing, ProbeAbsent):
            absent.setdefault(missing.probe, []).append(figure.name.replace("_", " "))
            continue
        if isinstance(missing, InstrumentsAbsent):
            no_instruments.append(figure.name.replace("_", " "))
            continue
        if figure.concern != concern:
            parts.append(f"<h2>{esc(figure.concern)}</h2>")
            concern = figure.concern
        title = figure.name.replace("_", " ")
        if png is None:
            parts.append(f"<p class='missing'>{esc(title)}: {esc(str(missing))}</p>")
            continue
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption><b>{esc(title)}</b>: {esc(figure.caption)}</figcaption>"
                     "</figure>")
    if absent or no_instruments:
        parts.append("<h2>Not in this run</h2>")
    if absent:
        listed = "; ".join(f"{probe} ({', '.join(names)})" for probe, names in absent.items())
        parts.append(f"<p class='missing'>These probes did not run, so their figures are "
                     f"left out: {esc(listed)}. Add them to probes= to see them.</p>")
    if no_instruments:
        parts.append(f"<p class='missing'>Cockpit's instruments were not recorded, so their "
                     f"figures are left out ({esc(', '.join(no_instruments))}). Pass "
                     "instruments=\"economy\" (or \"full\") to the callback to see "
                     "them.</p>")
    parts.append(f"</main>{_CHECK}</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
