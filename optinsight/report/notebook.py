"""Notebook views: a `Run` and the diagnosis' findings as HTML, for Jupyter.

A run shows its size, sparklines of a few whole-model keys, its epochs table and its
findings; findings show as a table (`Findings._repr_html_`). Importing `optinsight`
inside IPython registers the run's view with IPython's HTML formatter, so `logs/`
knows nothing of it. Figures are drawn on a bare matplotlib `Figure`: the notebook's
own plotting backend is left alone.
"""

import base64
import html
import io

import numpy as np

#: (whole-model key, label) of a run's sparklines, drawn when the run has the key.
SPARKLINES = (("train_loss", "loss"), ("grad_norm", "gradient norm"),
              ("update_ratio", "update ratio"), ("wdiff", "weight change"))

_STYLE = ("<style>.oi-run td,.oi-run th{text-align:left;padding:2px 8px}"
          ".oi-spark{display:inline-block;margin:0 14px 6px 0;font-size:12px;color:#555}"
          ".oi-error{color:#b91c1c}.oi-warning{color:#b45309}.oi-info{color:#1d4ed8}</style>")


def sparkline(values, width_px=170, height_px=38):
    """A small line of `values` (NaN gaps kept) as an <img> with a PNG data URI."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.plot(values, lw=1, color="#2563eb")
    ax.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", transparent=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' width={width_px} height={height_px}>"


def findings_html(findings):
    """A table of findings (severity, code, layer, steps, evidence, advice)."""
    if not findings:
        return "<p>No problems found: no rule of the diagnosis fired.</p>"
    esc = html.escape
    rows = []
    for f in findings:
        steps = "" if f.step is None else (
            f"{f.since}–{f.step}" if f.since is not None and f.since != f.step else str(f.step))
        rows.append(f"<tr><td class='oi-{esc(f.severity)}'>{esc(f.severity)}</td>"
                    f"<td><b>{esc(f.code)}</b></td><td>{esc(f.layer or '')}</td>"
                    f"<td>{esc(steps)}</td><td>{esc(f.evidence)}</td>"
                    f"<td>{esc(f.advice)}</td></tr>")
    return (f"{_STYLE}<table class='oi-run'><tr><th>severity</th><th>code</th><th>layer"
            "</th><th>steps</th><th>evidence</th><th>advice</th></tr>" + "".join(rows)
            + "</table>")


def run_html(run, findings):
    """The run's notebook view: `findings` are its diagnosis (`diagnose_run(run)`)."""
    esc = html.escape
    parts = [_STYLE, f"<div class='oi-run'><b>optinsight</b> {esc(repr(run))}</div>"]
    if not run.steps.empty:
        for key, label in SPARKLINES:
            if key in run.steps and run.steps[key].notna().any():
                values = run.steps[key].to_numpy(dtype=float)
                last = values[np.isfinite(values)][-1] if np.isfinite(values).any() \
                    else values[-1]
                parts.append(f"<span class='oi-spark'>{sparkline(values)}<br>{esc(label)}"
                             f" (last {last:.4g})</span>")
    if not run.epochs.empty:
        parts.append(run.epochs.to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                        classes="oi-run", border=0))
    parts.append("<div><b>Diagnosis</b></div>" + findings_html(findings))
    return "\n".join(parts)


def register(shell, diagnose_run):
    """Show `Run`s as `run_html` with `diagnose_run(run)`'s findings in the IPython
    `shell` (importing optinsight inside IPython does it)."""
    shell.display_formatter.formatters["text/html"].for_type_by_name(
        "optinsight.logs.reader", "Run", lambda run: run_html(run, diagnose_run(run)))
