"""One matplotlib figure per view of a run. Each function takes a `Run` and returns a
Figure, or raises `MissingData` saying what the run lacks (the report then shows
that note instead). `FIGURES` lists them with the concern they belong to.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from optinsight.signs import SIGN_COLOURS  # noqa: E402
from optinsight.tags import run_families  # noqa: E402


class MissingData(Exception):
    """The run has no data for this figure (the message says which)."""


def _steps(run, *columns):
    if run.steps.empty:
        raise MissingData("no steps recorded (steps.jsonl is empty)")
    missing = [c for c in columns if c not in run.steps]
    if missing:
        raise MissingData(f"the run has no {', '.join(missing)}")
    return run.steps


def _probe(run, name, *columns):
    if run.probes.empty or name not in set(run.probes["probe"]):
        raise MissingData(f"no {name!r} probe in this run (add it to probes=)")
    rows = run.probes[run.probes["probe"] == name]
    missing = [c for c in columns if c not in rows or rows[c].isna().all()]
    if missing:
        raise MissingData(f"the {name!r} probe recorded no {', '.join(missing)}")
    return rows


def _arrays(run, probe, missing):
    """[(step, {name: array})] of `probe`'s evaluations; MissingData(missing) if none."""
    evaluations = run.probe_arrays(probe)
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
                b.plot(epochs["epoch"] + 1, epochs[key], style, label=key.replace("_", " "))
    a.set(xlabel="step", ylabel="loss", title="Loss")
    a.legend(fontsize=8)
    b.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch")
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
        b.plot(per_epoch.index + 1, per_epoch.to_numpy(), "o-", color=colour, label=key)
    _epoch_ticks(a, steps)
    a.set(xlabel="step", ylabel="gradients in the zero band", title="Zero gradients per batch")
    thresholds = run.summary.get("meta", {}).get("thresholds") or (1e-7, 1e-5)
    b.set(xlabel="epoch", ylabel="mean per batch",
          title=f"Zero gradients per epoch ({', '.join(f'{t:g}' for t in thresholds)})")
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
    ax.set(xlabel="step", ylabel="‖w_t − w_{t−1}‖₂", yscale="log",
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
    fig.suptitle(f"{kind.capitalize()} histograms of the kernels, steps {steps[0]}…{steps[-1]} "
                 "(dark early, yellow late)", fontsize=9)
    fig.tight_layout()
    return fig


def activations_over_time(run):
    evaluations = _arrays(run, "activations",
                          "no 'activations' probe in this run (ActivationProbe)")
    layers = [k[len("hist/"):] for k in evaluations[-1][1] if k.startswith("hist/")]
    cols = min(3, len(layers))  # panels of about 3.6 in (≥ 250 px at the page's width)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.0 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    steps = [step for step, _ in evaluations]
    for ax, layer in zip(axes.flat, layers):
        counts = np.array([a[f"hist/{layer}"] for _, a in evaluations], dtype=float).T
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
    rows = _probe(run, "hessian", "lambda_1")
    fig, ax = plt.subplots(figsize=(11, 3.4))
    ax.plot(rows["step"], rows["lambda_1"], "o-", label="λmax (top Hessian eigenvalue)")
    if "stability_limit" in rows and rows["stability_limit"].notna().any():
        # the optimizer's own sharpness (preconditioned for Adam, RMSprop) and limit
        if not np.allclose(rows["sharpness"], rows["lambda_1"], equal_nan=True):
            ax.plot(rows["step"], rows["sharpness"], "s-", label="the optimizer's sharpness")
        ax.plot(rows["step"], rows["stability_limit"], "k--",
                label="the optimizer's stability limit")
    elif "lr_times_lambda_max" in rows:
        lr = rows["lr_times_lambda_max"] / rows["lambda_1"]
        ax.plot(rows["step"], 2 / lr, "k--", label="2 / learning rate (stability limit)")
    layers = [c for c in rows.columns if c.startswith("lambda_max/")]
    for c in layers:
        ax.plot(rows["step"], rows[c], lw=0.8, alpha=0.7, label=c)
    ax.set(xlabel="step", ylabel="eigenvalue", yscale="symlog", title="Sharpness")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def hessian_density(run):
    missing = "the 'hessian' probe recorded no density (density=True)"
    evaluations = [(s, a) for s, a in _arrays(run, "hessian", missing) if "density" in a]
    if not evaluations:
        raise MissingData(missing)
    fig, ax = plt.subplots(figsize=(11, 3.4))
    floor = np.inf
    for i, (step, arrays) in enumerate(evaluations):
        colour = _ramp(i, len(evaluations))
        density = np.asarray(arrays["density"], dtype=float)
        floor = min(floor, 1e-6 * density.max())  # as PyHessian draws it
        ax.plot(arrays["density_grid"], np.maximum(density, floor), color=colour, lw=0.9,
                label=f"step {step}" if i in (0, len(evaluations) - 1) else None)
    ax.set(xlabel="eigenvalue", ylabel="density", yscale="log", ylim=(floor, None),
           title="Hessian spectral density (stochastic Lanczos quadrature), from 1e-6 of "
                 "its peak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ntk(run):
    rows = _probe(run, "ntk", "kernel_change")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    for key in ("same", "different"):
        if key in rows:
            a.plot(rows["step"], rows[key], "o-", label=f"{key}-class mean")
    a.set(xlabel="step", ylabel="kernel entry", title="NTK class similarity")
    a.legend(fontsize=8)
    b.plot(rows["step"], rows["kernel_change"], "o-", color="tab:red")
    b.set(xlabel="step", ylabel="‖K_t − K_0‖ / ‖K_0‖",
          title="Kernel change (small: lazy regime; large: features move)")
    fig.tight_layout()
    return fig


def weight_spectra(run):
    evaluations = _arrays(run, "weight_spectrum",
                          "no 'weight_spectrum' probe in this run (WeightSpectrumProbe)")
    step, arrays = evaluations[-1]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for key, values in arrays.items():
        if key.endswith("/eigenvalues") and len(values):
            ranks = np.arange(1, len(values) + 1)
            ax.loglog(ranks, values, ".-", ms=3, lw=0.8, label=key[: -len("/eigenvalues")])
    ax.set(xlabel="rank", ylabel="eigenvalue of W Wᵀ",
           title=f"Weight spectra at step {step} (a steep head over a flat tail is healthy)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


#: (figure name, concern, function), in the report's order.
FIGURES = (
    ("loss_and_accuracy", "Training", loss_and_accuracy),
    ("zero_gradients", "Gradient dynamics", zero_gradients),
    ("released_fraction", "Gradient dynamics", released_fraction),
    ("sign_flips", "Gradient dynamics", sign_flips),
    ("sign_map", "Gradient dynamics", sign_map),
    ("gradient_histograms", "Gradient dynamics", gradient_histograms),
    ("weight_difference", "Weight updates", weight_difference),
    ("update_ratio", "Weight updates", update_ratio),
    ("weight_spectra", "Weight updates", weight_spectra),
    ("sharpness", "Loss landscape", sharpness),
    ("hessian_density", "Loss landscape", hessian_density),
    ("ntk", "Tangent kernel", ntk),
    ("activations_over_time", "Representations", activations_over_time),
)
