"""One matplotlib figure per view of a run. Each function takes a `Run` and returns a
Figure, or raises `MissingData` saying what the run lacks (the report then shows
that note instead). `FIGURES` lists them with the concern they belong to.
"""

from typing import Callable, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from optinsight.metrics import run_families, run_thresholds  # noqa: E402
from optinsight.probes import base  # noqa: E402
from optinsight.signs import SIGN_COLOURS  # noqa: E402


class MissingData(Exception):
    """The run has no data for this figure (the message says which)."""


class ProbeAbsent(MissingData):
    """The figure's probe is not in this run (`probe` names it)."""

    def __init__(self, probe):
        super().__init__(f"no {probe!r} probe in this run")
        self.probe = probe


class InstrumentsAbsent(MissingData):
    """The run recorded none of the figure's instruments (`instruments=` was off)."""

    def __init__(self):
        super().__init__("no instruments recorded in this run")


def _instruments(run, *names):
    """The run's instrument rows with any of `names`; InstrumentsAbsent without
    instruments, MissingData if none of `names` was recorded."""
    frame = run.instruments
    if frame.empty:
        raise InstrumentsAbsent()
    present = [n for n in names if n in frame and frame[n].notna().any()]
    if not present:
        raise MissingData(f"the run recorded no {' or '.join(names)} (instruments=)")
    return frame, present


def _steps(run, *columns):
    if run.steps.empty:
        raise MissingData("no steps recorded (steps.jsonl is empty)")
    missing = [c for c in columns if c not in run.steps]
    if missing:
        raise MissingData(f"the run has no {', '.join(missing)}")
    return run.steps


def _probe(run, kind, *columns):
    """The evaluations of the run's first probe of `kind` (`probes.base`); ProbeAbsent
    if it has none, MissingData if they recorded none of `columns`."""
    if run.probes.empty or kind not in set(run.probes["kind"]):
        raise ProbeAbsent(kind)
    name = run.probes.loc[run.probes["kind"] == kind, "probe"].iloc[0]
    rows = run.probes[run.probes["probe"] == name]
    missing = [c for c in columns if c not in rows or rows[c].isna().all()]
    if missing:
        raise MissingData(f"the {name!r} probe recorded no {', '.join(missing)}")
    return rows


def _arrays(run, kind, missing):
    """[(step, {name: array})] of the evaluations of the run's first probe of `kind`;
    ProbeAbsent if it has none, MissingData(missing) if they recorded no arrays."""
    evaluations = run.probe_arrays(_probe(run, kind)["probe"].iloc[0])
    if not evaluations:
        raise MissingData(missing)
    return evaluations


def _ramp(i, n):
    """Colour i of n, dark (early) to yellow (late)."""
    return plt.cm.viridis(i / max(1, n - 1))


def _epoch_ticks(ax, steps):
    """Thin vertical lines where epochs start."""
    starts = steps.loc[steps["batch"] == 0, "step"].iloc[1:]
    for s in starts:
        ax.axvline(s, color="0.85", lw=0.8, zorder=0)


def _kernels(run):
    return run.variables or run.summary.get("meta", {}).get("variables", [])


def loss_and_accuracy(run):
    steps = _steps(run, "train_loss")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.plot(steps["step"], steps["train_loss"], lw=0.8, color="tab:blue", label="batch loss")
    epochs = run.epochs
    if not epochs.empty:
        ends = steps.groupby("epoch")["step"].max().reindex(epochs["epoch"]).to_numpy()
        for key, style in (("train_mean_loss", "o-"), ("val_mean_loss", "s--")):
            if key in epochs and epochs[key].notna().any():
                a.plot(ends, epochs[key], style, label=key.replace("_", " "))
        for key, style in (("train_mean_acc", "o-"), ("val_mean_acc", "s--")):
            if key in epochs and epochs[key].notna().any():
                b.plot(epochs["epoch"], epochs[key], style, label=key.replace("_", " "))
    a.set(xlabel="step", ylabel="loss", title="Loss")
    a.legend(fontsize=8)
    b.set(xlabel="epoch (from 0)", ylabel="accuracy", title="Accuracy per epoch")
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    if b.lines:
        b.legend(fontsize=8)
    else:
        b.text(0.5, 0.5, "no accuracy metric compiled", ha="center", transform=b.transAxes)
    fig.tight_layout()
    return fig


def _families(run):
    return run_families(run.summary.get("meta", {}))


def zero_gradients(run):
    tags, _ = _families(run)
    keys = [f"no_zero_{tag}_grad2" for tag in tags]
    steps = _steps(run, *keys)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    colours = ("tab:purple", "tab:orange", "tab:green", "tab:red", "tab:brown")
    for key, colour in zip(keys, colours * len(keys)):
        a.plot(steps["step"], steps[key], lw=0.8, color=colour, label=key)
        per_epoch = steps.groupby("epoch")[key].mean()
        b.plot(per_epoch.index, per_epoch.to_numpy(), "o-", color=colour, label=key)
    _epoch_ticks(a, steps)
    a.set(xlabel="step", ylabel="gradients in the zero band", title="Zero gradients per batch")
    thresholds = run_thresholds(run.summary.get("meta", {}))
    b.set(xlabel="epoch (from 0)", ylabel="mean per batch",
          title=f"Zero gradients per epoch ({', '.join(f'{t:g}' for t in thresholds)})")
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fraction_figure(run, key_pattern, title, ylabel):
    tags, suffixes = _families(run)
    keys = [key_pattern.format(tag=t) + s for t in tags for s in suffixes]
    steps = _steps(run, *[key_pattern.format(tag=t) for t in tags])
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for key in keys:
        if key in steps:
            ax.plot(steps["step"], steps[key], lw=0.8, ls="--" if "avg" in key else "-",
                    label=key)
    _epoch_ticks(ax, steps)
    ax.set(xlabel="step", ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def released_fraction(run):
    return _fraction_figure(run, "fraction_zeros_{tag}_released",
                            "Zero gradients released (left the band) since the last batch",
                            "released / previously zero")


def sign_flips(run):
    return _fraction_figure(run, "fraction_grad_flipped_{tag}",
                            "Sign flips among gradients retained in the zero band",
                            "flipped / retained")


def weight_difference(run):
    steps = _steps(run, "wdiff")
    fig, ax = plt.subplots(figsize=(11, 3.4))
    ax.plot(steps["step"], steps["wdiff"], lw=0.8, color="tab:green")
    _epoch_ticks(ax, steps)
    ax.set(xlabel="step", ylabel=r"$\|w_t - w_{t-1}\|_2$", yscale="log",
           title="How far the weights move each batch")
    fig.tight_layout()
    return fig


def update_ratio(run):
    steps = _steps(run, "update_ratio")
    kernels = [k for k in run.variables if k.endswith("kernel")] or run.variables
    if not kernels:
        raise MissingData("the run has no per-variable update ratios")
    ratios = run.key("update_ratio")
    fig, ax = plt.subplots(figsize=(11, 3.8))
    for name in kernels:
        ax.plot(ratios["step"], ratios[name], lw=0.8, label=name)
    _epoch_ticks(ax, steps)
    ax.set(xlabel="step", ylabel="‖Δw‖ / ‖w‖", yscale="log",
           title="Update ratio per variable (1e-3 is a common healthy level)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


_SIGN_CMAP = ListedColormap([np.array(SIGN_COLOURS[c]) / 255 for c in (-1, 0, 1, 2)])


def sign_map(run, zoom=200):
    maps = run.sign_maps()
    if not maps:
        raise MissingData("no gradient sign maps (signs/*.npz; sign_map_freq=0?)")
    names = list(maps[-1][1])
    labels = [label.split("_")[0] + "_" + str(int(label.split("_")[1])) for label, _, _ in maps]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 1.1 + 1.0 * len(names)),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
    for row, name in zip(axes, names):
        codes = np.array([m[1][name] for m in maps if name in m[1]])
        image = codes + 1  # -1, 0, 1, 2 -> 0..3 for the colour map
        ticks = sorted({0, len(codes) - 1})
        for ax, part in ((row[0], image), (row[1], image[:, :zoom])):
            ax.imshow(part, aspect="auto", cmap=_SIGN_CMAP, vmin=0, vmax=3,
                      interpolation="nearest")
            ax.set_yticks(ticks, [labels[t].replace("_", " ") for t in ticks])
            ax.tick_params(labelsize=7)
        row[0].set_title(f"{name} ({codes.shape[1]} entries)", fontsize=9, loc="left")
        row[1].set_title(f"its first {min(zoom, codes.shape[1])} entries", fontsize=9,
                         loc="left")
    axes[-1][0].set_xlabel("entry (in the variable's order; strided when large)", fontsize=8)
    axes[-1][1].set_xlabel("entry", fontsize=8)
    legend = [Patch(facecolor=np.array(SIGN_COLOURS[code]) / 255, edgecolor="0.5",
                    label=label) for code, label in (
                        (0, "|g| > 1e-5"), (-1, "−1e-5 ≤ g < 0"), (1, "0 < g ≤ 1e-5"),
                        (2, "g = 0 (dead)"))]
    fig.legend(handles=legend, loc="upper right", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Gradient sign maps over time (rows: sign-map epochs or steps)",
                 fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def gradient_histograms(run, kind="gradients"):
    histograms = run.histograms()
    if not histograms:
        raise MissingData("no gradient histograms (histograms/; histogram_freq=0?)")
    names = [n for n in _kernels(run) if n in histograms[-1][kind]]
    names = [n for n in names if n.endswith("kernel")] or names
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        steps = [h["step"] for h in histograms]
        for i, h in enumerate(histograms):
            lo, hi = h[kind][name]["range"]
            counts = np.asarray(h[kind][name]["counts"], dtype=float)
            edges = np.linspace(lo, hi, len(counts) + 1)
            colour = _ramp(i, len(histograms))
            ax.plot((edges[:-1] + edges[1:]) / 2, counts / counts.sum(), color=colour, lw=0.7)
        ax.set(title=name, xlabel=kind[:-1] + " value", yscale="log")
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=7)
    for row in axes:
        row[0].set_ylabel("fraction of entries", fontsize=8)
    when = f"step {steps[0]}" if len(steps) == 1 else \
        f"steps {steps[0]}…{steps[-1]} (dark early, yellow late)"
    fig.suptitle(f"{kind.capitalize()} histograms of the kernels, {when}", fontsize=9)
    fig.tight_layout()
    return fig


def activations_over_time(run):
    evaluations = _arrays(run, base.ACTIVATIONS, "the activation probe recorded no histograms")
    prefix = base.ACTIVATION_HISTOGRAM
    layers = [k[len(prefix):] for k in evaluations[-1][1] if k.startswith(prefix)]
    cols = min(3, len(layers))  # panels of about 3.6 in (≥ 250 px at the page's width)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.0 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    steps = [step for step, _ in evaluations]
    for ax, layer in zip(axes.flat, layers):
        counts = np.array([a[prefix + layer] for _, a in evaluations], dtype=float).T
        fractions = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
        image = ax.imshow(np.log10(fractions + 1e-6), aspect="auto", origin="lower",
                          cmap="magma", extent=(steps[0] - 0.5, steps[-1] + 0.5, 0,
                                                counts.shape[0]))
        ax.set(title=layer, xlabel="step", ylabel="activation bin (low → high)")
        ax.title.set_fontsize(10)
        ax.tick_params(labelsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="log10 fraction of activations",
                 shrink=0.8)
    fig.suptitle("Activations over time: mass piling into the lowest bin is collapse",
                 fontsize=11)
    return fig


def sharpness(run):
    rows = _probe(run, base.HESSIAN, base.LAMBDA_1)
    fig, ax = plt.subplots(figsize=(11, 3.4))
    top = rows[base.LAMBDA_1]
    ax.plot(rows["step"], top, "o-", label="λmax (top Hessian eigenvalue)")
    own = top
    if base.STABILITY_LIMIT in rows and rows[base.STABILITY_LIMIT].notna().any():
        # the optimizer's own sharpness (preconditioned for Adam, RMSprop) and limit
        if not np.allclose(rows[base.SHARPNESS], top, equal_nan=True):
            own = rows[base.SHARPNESS]
            ax.plot(rows["step"], own, "s-", label="the optimizer's sharpness")
        limit, limit_label = rows[base.STABILITY_LIMIT], "the optimizer's stability limit"
    elif base.LR_TIMES_LAMBDA_MAX in rows:
        limit = 2 * top / rows[base.LR_TIMES_LAMBDA_MAX]
        limit_label = "2 / learning rate (stability limit)"
    else:
        limit = None
    for c in [c for c in rows.columns if c.startswith(base.LAYER_LAMBDA_MAX)]:
        ax.plot(rows["step"], rows[c], lw=0.8, alpha=0.7, label=c)
    title = "Sharpness"
    if limit is not None:
        share = np.abs(own.to_numpy()) / limit.to_numpy()
        share = share[np.isfinite(share)]  # Adam has no limit before its first step
        if len(share):
            title += f" (at the last evaluation {share[-1]:.2g}× the stability limit)"
        far = len(share) and share.max() < 0.1  # the limit would flatten the sharpness
        limit_ax = ax.twinx() if far else ax
        limit_ax.plot(rows["step"], limit, "k--", label=limit_label + (
            " (right axis)" if far else ""))
        if far:
            limit_ax.set_ylabel("stability limit")
            limit_ax.set_yscale("symlog")
    ax.set(xlabel="step", ylabel="eigenvalue", yscale="symlog", title=title)
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]  # ax first
    ax.legend(handles=handles, fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def hessian_density(run):
    missing = "the Hessian probe recorded no density (density=True)"
    evaluations = [(s, a) for s, a in _arrays(run, base.HESSIAN, missing)
                   if base.DENSITY in a]
    if not evaluations:
        raise MissingData(missing)
    fig, ax = plt.subplots(figsize=(11, 3.4))
    floor = np.inf
    for i, (step, arrays) in enumerate(evaluations):
        colour = _ramp(i, len(evaluations))
        density = np.asarray(arrays[base.DENSITY], dtype=float)
        floor = min(floor, 1e-6 * density.max())  # as PyHessian draws it
        ax.plot(arrays[base.DENSITY_GRID], np.maximum(density, floor), color=colour, lw=0.9,
                label=f"step {step}" if i in (0, len(evaluations) - 1) else None)
    ax.set(xlabel="eigenvalue", ylabel="density", yscale="log", ylim=(floor, None),
           title="Hessian spectral density (stochastic Lanczos quadrature), from 1e-6 of "
                 "its peak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ntk(run):
    rows = _probe(run, base.NTK, base.KERNEL_CHANGE)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    for key in (base.NTK_SAME, base.NTK_DIFFERENT):
        if key in rows:
            a.plot(rows["step"], rows[key], "o-", label=f"{key}-class mean")
    a.set(xlabel="step", ylabel="kernel entry", title="NTK class similarity")
    a.legend(fontsize=8)
    b.plot(rows["step"], rows[base.KERNEL_CHANGE], "o-", color="tab:red")
    b.set(xlabel="step", ylabel="‖K_t − K_0‖ / ‖K_0‖",
          title="Kernel change (small: lazy regime; large: features move)")
    fig.tight_layout()
    return fig


def weight_spectra(run):
    evaluations = _arrays(run, base.WEIGHT_SPECTRUM, "the weight-spectrum probe recorded "
                                                     "no spectra")
    step, arrays = evaluations[-1]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for key, values in arrays.items():
        if key.endswith("/" + base.EIGENVALUES) and len(values):
            ranks = np.arange(1, len(values) + 1)
            ax.loglog(ranks, values, ".-", ms=3, lw=0.8, label=key.rsplit("/", 1)[0])
    ax.set(xlabel="rank", ylabel="eigenvalue of W Wᵀ",
           title=f"Weight spectra at step {step} (a steep head over a flat tail is healthy)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def step_size(run):
    frame, _ = _instruments(run, "alpha")
    alpha = frame[["step", "alpha"]].dropna()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 3.2), width_ratios=(3, 1))
    shown = alpha["alpha"].clip(-1.5, 3)  # far overshoots on the edge, not off the plot
    ax.plot(alpha["step"], shown, "o", ms=3, alpha=0.6)
    for level, label in ((0, "the fit's minimum"), (1, "as high as the start")):
        ax.axhline(level, color="0.5", lw=0.8, ls="--")
        ax.annotate(label, (1.0, level), xycoords=("axes fraction", "data"),
                    xytext=(-4, 2), textcoords="offset points", ha="right", fontsize=7)
    above = (alpha["alpha"] > 0).mean()
    ax.set(xlabel="step", ylabel="α (clipped to [−1.5, 3])",
           title=f"Step size α: {above:.0%} of the steps overshoot the fit's minimum")
    hist.hist(shown, bins=30, orientation="horizontal", color="C0")
    hist.set(xlabel="steps", ylim=ax.get_ylim())
    fig.tight_layout()
    return fig


def batch_size_tests(run):
    frame, present = _instruments(run, "norm_test", "inner_test", "ortho_test")
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for name in present:
        ax.plot(frame["step"], frame[name], "o-", ms=2, lw=0.8, label=name.replace("_", " "))
    ax.axhline(1, color="k", lw=0.8, ls="--", label="1: the noise as large as the signal")
    ax.set(xlabel="step", ylabel="θ (ν), the smallest value the batch passes at",
           yscale="log", title="Batch-size tests")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def gradient_noise(run):
    frame, present = _instruments(run, "mean_gsnr", "early_stopping", "tic_diag",
                                  "tic_trace")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    left, right = axes
    if "mean_gsnr" in present:
        left.plot(frame["step"], frame["mean_gsnr"], "o-", ms=2, lw=0.8, label="mean GSNR")
    for name in [n for n in ("tic_diag", "tic_trace") if n in present]:
        left.plot(frame["step"], frame[name], "o-", ms=2, lw=0.8, label=name)
    left.set(xlabel="step", yscale="log", title="Signal to noise (GSNR) and TIC")
    left.legend(fontsize=7)
    if "early_stopping" in present:
        right.plot(frame["step"], frame["early_stopping"], "o-", ms=2, lw=0.8, color="C3")
        right.axhline(0, color="k", lw=0.8, ls="--")
        right.set(title="EB criterion (above 0: stop)")
    else:
        right.text(0.5, 0.5, "EB criterion: plain SGD only", ha="center", va="center",
                   transform=right.transAxes)
    right.set(xlabel="step")
    fig.tight_layout()
    return fig


def gradient_parameter_histogram(run):
    _instruments(run, "distance", "norm_test", "alpha", "mean_gsnr", "tic_diag")
    histograms = run.gradient_parameter_histograms()
    if not histograms:
        raise MissingData("the run recorded no grad_hist_2d (instruments=\"full\")")
    step, counts, ((g_lo, g_hi), (w_lo, w_hi)) = histograms[-1]
    fig, (ax, by_gradient) = plt.subplots(1, 2, figsize=(11, 3.4), width_ratios=(2, 1))
    image = ax.imshow(np.log10(1 + counts.T), origin="lower", aspect="auto",
                      extent=(g_lo, g_hi, w_lo, w_hi), cmap="viridis")
    fig.colorbar(image, ax=ax, label="log10(1 + count)")
    ax.set(xlabel="per-example gradient entry (clipped to the range)",
           ylabel="parameter value", title=f"Per-example gradients against parameters, "
           f"step {step}")
    edges = np.linspace(g_lo, g_hi, counts.shape[0] + 1)
    by_gradient.stairs(counts.sum(axis=1), edges, fill=True)
    by_gradient.set(xlabel="per-example gradient entry", ylabel="count", yscale="log",
                    title="all parameters")
    fig.tight_layout()
    return fig


def distance(run):
    frame, _ = _instruments(run, "distance")
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.plot(frame["step"], frame["distance"], "k-", lw=1.5, label="all weights")
    per_variable = [c for c in frame.columns if c.startswith("distance/")]
    last = frame[per_variable].iloc[-1].sort_values(ascending=False)
    for column in last.index[:6]:  # the variables that moved most
        ax.plot(frame["step"], frame[column], lw=0.8, label=column[len("distance/"):])
    ax.set(xlabel="step", ylabel="‖w_t − w_0‖₂", title="Distance from the initial weights")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


class Figure(NamedTuple):
    """One figure of the report: its file name, the concern it belongs to, the
    function that draws it from a `Run`, and its one-sentence caption (what it shows,
    what healthy looks like)."""

    name: str
    concern: str
    draw: Callable
    caption: str


#: The report's figures, in its order.
FIGURES = (
    Figure("loss_and_accuracy", "Training", loss_and_accuracy,
           "The loss of each batch with the epoch means on training and validation data "
           "(left) and the accuracy per epoch (right): healthy losses fall together, and "
           "a validation loss that rises while the training loss falls is overfitting."),
    Figure("zero_gradients", "Gradient dynamics", zero_gradients,
           "How many gradient entries lie in each zero band (|g| at most the threshold) "
           "per batch and per epoch: a small, steady count is healthy, while a count that "
           "climbs towards a layer's size means the layer stops learning."),
    Figure("released_fraction", "Gradient dynamics", released_fraction,
           "Of the gradients in the zero band at the previous batch, the fraction that "
           "left it at this one: near 1 zeros are passing, near 0 for many steps the same "
           "entries are stuck at zero."),
    Figure("sign_flips", "Gradient dynamics", sign_flips,
           "Of the gradients that stayed in the zero band, the fraction whose sign "
           "flipped: near 0.5 they jitter around zero (a flat or noisy direction), near 0 "
           "they stay on one side."),
    Figure("sign_map", "Gradient dynamics", sign_map,
           "Each row is a map of one variable's gradient at one time (white: outside the "
           "band, red/green: small negative/positive, black: exactly zero): a speckled "
           "map is healthy, and black columns that persist down the rows are entries that "
           "never get a gradient."),
    Figure("gradient_histograms", "Gradient dynamics", gradient_histograms,
           "How each kernel's gradient entries are distributed, dark early to yellow "
           "late: healthy curves keep their spread around zero, curves that narrow onto "
           "zero are vanishing gradients, and wide flat tails are exploding ones."),
    Figure("weight_difference", "Weight updates", weight_difference,
           "The length of each batch's update of all weights together: it usually settles "
           "or falls as training converges, and spikes mark unstable steps."),
    Figure("update_ratio", "Weight updates", update_ratio,
           "Per variable, the update's norm over the weights' norm: about 1e-3 is a "
           "common healthy level, near 1e-1 the step is too large for that variable, "
           "below 1e-5 it barely learns."),
    Figure("weight_spectra", "Weight updates", weight_spectra,
           "The eigenvalues of each kernel's W Wᵀ by rank, on log axes: trained layers "
           "show a steep head of a few large eigenvalues over a flat tail, untrained "
           "ones a flat spectrum."),
    Figure("sharpness", "Loss landscape", sharpness,
           "The Hessian's top eigenvalue (sharpness) at each evaluation against the "
           "largest sharpness at which the optimizer is stable: healthy training stays "
           "below the limit, and sharpness that rises to it and hovers there is training "
           "at the edge of stability."),
    Figure("hessian_density", "Loss landscape", hessian_density,
           "The density of the Hessian's eigenvalues (stochastic Lanczos quadrature), one "
           "curve per evaluation: most mass near zero with a few outliers is typical, "
           "and large negative eigenvalues mean a saddle."),
    Figure("ntk", "Tangent kernel", ntk,
           "The empirical neural tangent kernel on the probe batch: mean entries within "
           "and across classes (left) and the kernel's change since its first evaluation "
           "(right); a within-class mean that grows above the across-class mean is the "
           "network learning the classes."),
    Figure("activations_over_time", "Representations", activations_over_time,
           "Per layer, how the activations spread over value bins at each evaluation "
           "(brighter: more of them): mass that piles into the lowest bin is units that "
           "stopped firing."),
    Figure("step_size", "Cockpit's instruments", step_size,
           "Where each step lands on a quadratic fitted along it to the losses and slopes "
           "at both ends (α, Cockpit's Alpha): 0 is the fit's minimum and 1 the far side "
           "as high as the start, so steps mostly above 0 overshoot and mostly below 0 "
           "are cautious, and a spread around 0 to 1 is typical."),
    Figure("batch_size_tests", "Cockpit's instruments", batch_size_tests,
           "The norm, inner-product and orthogonality tests: the noise of the batch "
           "gradient in the gradient's length and direction, relative to the gradient, "
           "where values well below 1 say the batch is large enough and values about 1 "
           "or above say it is too small to trust the gradient."),
    Figure("gradient_noise", "Cockpit's instruments", gradient_noise,
           "The gradient's mean signal-to-noise ratio per parameter and the Takeuchi "
           "information criterion (left), and the EB criterion (right): SNR falls and "
           "the EB criterion rises towards 0 as the gradients turn to noise, and above "
           "0 there is no more information in them."),
    Figure("gradient_parameter_histogram", "Cockpit's instruments",
           gradient_parameter_histogram,
           "Every per-example gradient entry of the last recorded step against its "
           "parameter's value (Cockpit's GradHist2d), with the gradients' distribution "
           "on the right: healthy gradients spread around 0 for every parameter value, "
           "and a band piled at the range's edges means gradients larger than it."),
    Figure("distance", "Cockpit's instruments", distance,
           "How far the weights are from where recording started, for all of them and "
           "for the variables that moved most: it grows fast early and levels off, and "
           "one variable far ahead of the rest dominates the training."),
)
