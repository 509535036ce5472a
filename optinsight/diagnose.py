"""Rules over a run's logs that name what is wrong, in plain words (README, "Diagnosis").

`diagnose(log_dir)` (or `diagnose_run(run)`) returns a list of `Finding`s. Each rule
reads the recorded metrics only; its thresholds are the module constants below,
each with the reason for its value. "Late" means the last LATE_FRACTION of the
steps, where a problem that training has not outgrown shows; "early" the first.
"""

import dataclasses
import math

import numpy as np
import pandas as pd

from optinsight.activations import EXACT_ZERO, SATURATING
from optinsight.logs.reader import read_log
from optinsight.tags import threshold_tag

LATE_FRACTION = 0.25
#: The late median loss above this multiple of the early median: the run diverged
#: (a healthy run's loss falls; noise alone does not raise a median by half).
DIVERGENCE_FACTOR = 1.5
#: lr·λmax above this: plain gradient descent is unstable along the sharpest
#: direction (a step overshoots when lr > 2/λmax). Used for logs written before the
#: Hessian probe wrote each optimizer's own stability_ratio (warning when above 1).
EDGE_OF_STABILITY = 2.0
#: Late over early median gradient norm at or above this: exploding gradients
#: (a hundredfold growth is far beyond the drift of a converging run).
EXPLOSION_FACTOR = 100.0
#: First-kernel over last-kernel RMS gradient below this: vanishing gradients (the
#: input layers learn a thousand times slower than the output layer).
VANISHING_RATIO = 1e-3
#: Late fraction of a kernel's gradients in the smallest zero band (1e-7 by default)
#: at or above this: a dead layer (essentially no entry gets a gradient; ReLU units
#: that never fire give exact zeros).
DEAD_FRACTION = 0.99
#: Units of a kernel (its last axis) whose gradients were all zero at every step of
#: the late quarter: a warning from this fraction of the kernel's units (and at least
#: DEAD_UNITS_MIN units: one dead unit of a small layer is not a pattern), an error
#: from DEAD_UNITS_ERROR (half the layer's capacity gone).
DEAD_UNITS_WARNING = 0.10
DEAD_UNITS_ERROR = 0.5
DEAD_UNITS_MIN = 2
#: A layer whose late median update ratio is below this multiple of the median of
#: the other layers' stalls (three orders of magnitude: well past any sensible
#: per-layer learning-rate schedule).
STALL_RATIO = 1e-3
#: Kernels with at least this fraction of near-zero eigenvalues of W Wᵀ: rank
#: collapse (more than half of the layer's directions lost).
RANK_COLLAPSE_FRACTION = 0.5
#: Layers with at least this fraction of saturated outputs (tanh/sigmoid in their
#: flat tails, where the derivative is below ~0.02): saturation.
SATURATION_FRACTION = 0.5

SEVERITIES = ("info", "warning", "error")


def zero_key(thresholds):
    """The key dead_layer reads: zero-band counts at the smallest threshold."""
    return f"no_zero_{threshold_tag(min(thresholds))}_grad2"


def variable_keys(thresholds):
    """The per-variable keys the rules read (the recorder keeps these in memory)."""
    return ("grad_norm", "update_ratio", "nonfinite_grads", zero_key(thresholds))


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found: what (code), how bad (severity), where (layer, may be None),
    when (step, may be None), the numbers behind it (evidence) and what to try (advice)."""

    code: str
    severity: str
    layer: str | None
    step: int | None
    evidence: str
    advice: str

    def __str__(self):
        where = f" [{self.layer}]" if self.layer else ""
        when = f" at step {self.step}" if self.step is not None else ""
        return f"{self.severity.upper()} {self.code}{where}{when}: {self.evidence}. {self.advice}"


def _late(series):
    series = series.dropna()
    return series.iloc[int(len(series) * (1 - LATE_FRACTION)):] if len(series) else series


def _early(series):
    series = series.dropna()
    return series.iloc[: max(1, int(len(series) * LATE_FRACTION))] if len(series) else series


def _kernels(run):
    meta = run.summary.get("meta", {})
    names, sizes = meta.get("variables", []), meta.get("variable_sizes", [])
    shapes = dict(zip(names, sizes))
    recorded = set(run.variables)
    return [n for n in names if n.endswith("kernel") and n in recorded], shapes


def _nonfinite(run):
    """NaN/Inf gradients or loss. A step the loss scale skipped (its scaled gradient
    overflowed: `skipped`) is by design, not an error, unless the scale never
    recovered (the last LATE_FRACTION of the steps all skipped). A loss that is null at
    every step was not recorded (a custom loop may leave it out)."""
    steps = run.steps
    skipped = steps["skipped"] > 0 if "skipped" in steps else pd.Series(False, steps.index)
    loss_recorded = steps["train_loss"].notna().any()
    bad = steps[((steps["nonfinite_grads"] > 0) & ~skipped)
                | (loss_recorded & steps["train_loss"].isna())]
    late = _late(skipped.astype(float))
    if bad.empty and len(late) and late.min() > 0:
        return [Finding(
            "nonfinite", "error", None, int(steps["step"].iloc[-1]),
            f"the loss scale skipped every one of the last {len(late)} steps (their "
            "scaled gradients overflowed): nothing was applied",
            "The gradients overflow even in float32: lower the learning rate, clip "
            "gradients, or train in float32 to find the layer that overflows")]
    if bad.empty:
        return []
    first = bad.iloc[0]
    per_variable = run.key("nonfinite_grads").drop(columns="step").sum() if run.variables \
        else pd.Series(dtype=float)
    per_variable = per_variable[per_variable > 0]
    worst = per_variable.idxmax() if len(per_variable) else None
    return [Finding(
        "nonfinite", "error", worst, int(first["step"]),
        f"{len(bad)} of {len(steps)} steps had NaN/Inf gradients or loss "
        f"({int(first['nonfinite_grads'])} gradient entries at the first)",
        "Lower the learning rate, clip gradients (clipnorm=1.0), check the inputs for "
        "NaN/Inf, and guard log/sqrt/division in custom losses")]


def _learning_rate(run):
    findings = []
    loss = run.steps["train_loss"].replace([np.inf, -np.inf], np.nan)
    early, late = _early(loss), _late(loss)
    if len(loss.dropna()) >= 8 and late.median() > DIVERGENCE_FACTOR * early.median():
        findings.append(Finding(
            "lr_too_high", "error", None, int(run.steps["step"].iloc[-1]),
            f"the loss diverged: median {early.median():.4g} over the first steps, "
            f"{late.median():.4g} over the last",
            "Lower the learning rate (try 10x smaller) or add warm-up"))
    if not run.probes.empty and "stability_ratio" in run.probes:
        over = run.probes[run.probes["stability_ratio"] > 1]
        if not over.empty:
            row = over.iloc[-1]
            findings.append(Finding(
                "lr_too_high", "warning", None, int(row["step"]),
                f"the optimizer's sharpness {row['sharpness']:.4g} is "
                f"{row['stability_ratio']:.3g}x its stability limit "
                f"{row['stability_limit']:.4g}: its steps overshoot along the sharpest "
                "direction", f"Lower the learning rate {row['stability_ratio']:.3g}x or "
                "more, or add warm-up; if the loss still falls, training is at the edge "
                "of stability, which can be benign"))
    elif not run.probes.empty and "lr_times_lambda_max" in run.probes:  # older logs
        over = run.probes[run.probes["lr_times_lambda_max"] > EDGE_OF_STABILITY]
        if not over.empty:
            row = over.iloc[-1]
            findings.append(Finding(
                "lr_too_high", "warning", None, int(row["step"]),
                f"lr·λmax = {row['lr_times_lambda_max']:.3g} > 2: past the stability "
                f"limit of gradient descent (λmax = {row['lambda_1']:.4g})",
                "Lower the learning rate below 2/λmax; with an adaptive optimiser this "
                "is a hint, check that the loss still falls"))
    return findings


def _exploding(run):
    norms = run.steps["grad_norm"].replace([np.inf, -np.inf], np.nan)
    early, late = _early(norms), _late(norms)
    if len(norms.dropna()) < 8 or early.median() <= 0:
        return []
    growth = late.median() / early.median()
    if growth < EXPLOSION_FACTOR:
        return []
    return [Finding(
        "exploding_gradients", "error", None, int(run.steps.loc[norms.idxmax(), "step"]),
        f"the gradient norm grew {growth:.3g}x: median {early.median():.3g} early, "
        f"{late.median():.3g} late (max {norms.max():.3g})",
        "Clip gradients (clipnorm=1.0), lower the learning rate, or normalise "
        "(BatchNormalization/LayerNormalization) and initialise with variance scaling")]


def _rms(norms, name, size):
    return _late(norms[name]).median() / math.sqrt(size)


def _activations(run):
    """{variable: activation name} of the run's meta ({} for older logs)."""
    return run.summary.get("meta", {}).get("activations") or {}


def _through_saturating(run, kernels, name):
    """The saturating activations at or after kernel `name` (what its gradients pass
    through on their way back from the loss), in order."""
    activations = _activations(run)
    after = kernels[kernels.index(name):]
    return [activations[k] for k in after if activations.get(k) in SATURATING]


_VANISHING_ADVICE = ("Use ReLU-family activations (ReLU, GELU) in the hidden layers "
                     "instead of sigmoid/tanh, normalisation layers, residual "
                     "connections, and a variance-scaling initialiser (He for ReLU, "
                     "Glorot for tanh)")


def _vanishing(run):
    kernels, sizes = _kernels(run)
    if len(kernels) < 2:
        return []
    norms = run.key("grad_norm")
    first = _rms(norms, kernels[0], sizes[kernels[0]])
    last = _rms(norms, kernels[-1], sizes[kernels[-1]])
    if not (last > 0) or first / last >= VANISHING_RATIO:
        return []
    return [Finding(
        "vanishing_gradients", "warning", kernels[0], None,
        f"the first kernel's RMS gradient is {first / last:.2g} of the last kernel's "
        f"({first:.3g} vs {last:.3g})", _VANISHING_ADVICE)]


_DEAD_ADVICE = ("Its units never activate: check the bias initialisation, lower the "
                "learning rate, or use LeakyReLU/GELU")


def _latest(run, suffix):
    """(name, latest value, its step) of each probe quantity `<name><suffix>`."""
    if run.probes.empty:
        return
    for column in [c for c in run.probes.columns if c.endswith(suffix)]:
        values = run.probes[column].dropna()
        if len(values):
            yield (column[: -len(suffix)], values.iloc[-1],
                   int(run.probes.loc[values.index[-1], "step"]))


def _dead(run):
    findings = []
    kernels, sizes = _kernels(run)
    previous_dead = False
    threshold = min(run.summary.get("meta", {}).get("thresholds") or [1e-7])
    zeros = run.key(zero_key([threshold])) if kernels else None
    activations = _activations(run)
    for name in kernels if zeros is not None else ():
        fraction = _late(zeros[name]).median() / sizes[name]
        dead, follows_dead = fraction >= DEAD_FRACTION, previous_dead
        previous_dead = dead
        if not dead or follows_dead:  # a kernel after a dead one only gets no input
            continue
        step = int(run.steps["step"].iloc[-1])
        zero = (f"{100 * fraction:.1f} % of its gradients are zero (|g| <= {threshold:g}) "
                "over the last steps")
        activation = activations.get(name)
        saturating = _through_saturating(run, kernels, name)
        if activation is None or activation in EXACT_ZERO:
            findings.append(Finding(
                "dead_layer", "error", name, step, f"{zero}: the layer no longer learns, "
                "and the layers after it get no signal through it", _DEAD_ADVICE))
        elif saturating:
            findings.append(Finding(
                "vanishing_gradients", "error", name, step,
                f"{zero}: they vanish on their way back through {len(saturating)} "
                f"saturating activation(s) ({', '.join(sorted(set(saturating)))}) from "
                "this layer to the output, so the layer no longer learns",
                _VANISHING_ADVICE))
        else:
            findings.append(Finding(
                "zero_gradients", "error", name, step,
                f"{zero}, though its activation ({activation}) cannot silence it: the "
                "layer no longer learns",
                "Check what follows it (a frozen or zero-initialised layer, a stop_gradient, "
                "a loss that ignores the output), the input scale and the learning rate"))
    for layer, fraction, step in _latest(run, "/zero_fraction"):
        if fraction >= DEAD_FRACTION and not any(
                f.layer and f.layer.startswith(layer) for f in findings):
            findings.append(Finding(
                "dead_layer", "error", layer, step,
                f"{100 * fraction:.1f} % of its outputs are exactly zero", _DEAD_ADVICE))
    return findings


def _dead_units(run):
    """Kernels with some, not all, output units whose gradients have been all zero at
    every step of the last quarter (units.npz; a whole dead kernel is dead_layer's)."""
    zero_since = run.zero_since()
    kernels, _ = _kernels(run)
    steps = run.steps["step"]
    if not zero_since or len(steps) < 4:
        return []
    window_start = int(steps.iloc[int(len(steps) * (1 - LATE_FRACTION))])
    threshold = min(run.summary.get("meta", {}).get("thresholds") or [1e-7])
    findings = []
    activations = _activations(run)
    for name in kernels:
        since = zero_since.get(name)
        if since is None or activations.get(name, "relu") not in EXACT_ZERO:
            continue  # only units whose activation outputs exact zeros can die
        dead = (since > 0) & (since <= window_start)
        count, units = int(dead.sum()), len(since)
        if count < max(DEAD_UNITS_MIN, DEAD_UNITS_WARNING * units) or count == units:
            continue
        findings.append(Finding(
            "dead_units", "error" if count >= DEAD_UNITS_ERROR * units else "warning",
            name, int(steps.iloc[-1]),
            f"{count} of {units} units have had zero gradients (|g| <= {threshold:g}) at "
            f"every step since step {int(since[dead].max())} at the latest (the first "
            f"since step {int(since[dead].min())}): they no longer learn",
            "Their ReLUs never fire: lower the learning rate, start biases slightly "
            "positive, add normalisation before the activation, or use LeakyReLU/GELU"))
    return findings


def _stalled(run):
    kernels, _ = _kernels(run)
    if not kernels:
        return []
    update_ratios = run.key("update_ratio")
    ratios = {n: _late(update_ratios[n]).median() for n in kernels}
    ratios = {n: r for n, r in ratios.items() if np.isfinite(r)}
    findings = []
    for name, ratio in ratios.items():
        others = [r for n, r in ratios.items() if n != name]
        if len(others) >= 1 and ratio < STALL_RATIO * np.median(others):
            findings.append(Finding(
                "stalled_layer", "warning", name, None,
                f"its update ratio ‖Δw‖/‖w‖ is {ratio:.2g}, against a median of "
                f"{np.median(others):.2g} for the other layers",
                "Check per-layer learning rates, freezing, and the scale of its weights"))
    return findings


def _rank_collapse(run):
    return [Finding(
        "rank_collapse", "warning", name, step,
        f"{100 * fraction:.0f} % of its singular directions are near zero (stable rank "
        f"{run.probes[f'{name}/stable_rank'].dropna().iloc[-1]:.3g})",
        "The layer uses few dimensions: lower weight decay or the learning rate, "
        "or check for a bottleneck")
        for name, fraction, step in _latest(run, "/near_zero_fraction")
        if fraction >= RANK_COLLAPSE_FRACTION]


def _saturation(run):
    return [Finding(
        "activation_saturation", "warning", layer, step,
        f"{100 * fraction:.0f} % of its outputs sit in the flat tails of its activation, "
        "where gradients vanish",
        "Normalise its inputs (BatchNormalization), lower the initial weight scale, "
        "or use a non-saturating activation")
        for layer, fraction, step in _latest(run, "/saturated_fraction")
        if fraction >= SATURATION_FRACTION]


RULES = (_nonfinite, _learning_rate, _exploding, _vanishing, _dead, _dead_units, _stalled,
         _rank_collapse, _saturation)


def diagnose_run(run):
    """Findings for a loaded `Run`, errors first."""
    if run.steps.empty:
        return []
    findings = [f for rule in RULES for f in rule(run)]
    # A layer's cause is named once: a warning is dropped when an error of its code
    # names its layer already.
    errors = {(f.code, f.layer) for f in findings if f.severity == "error" and f.layer}
    findings = [f for f in findings if f.severity == "error" or (f.code, f.layer) not in errors]
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


def diagnose(log_dir):
    """Findings for the run in `log_dir` (see `read_log` for the errors it raises)."""
    return diagnose_run(read_log(log_dir))
