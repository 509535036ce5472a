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

from optinsight.architecture import EXACT_ZERO, PROBABILISTIC_LOSSES, SATURATING
from optinsight.findings import SEVERITIES, Finding, Findings
from optinsight.instrument_rules import INSTRUMENT_RULES
from optinsight.logs.reader import read_log
from optinsight.metrics import run_thresholds, zero_key
from optinsight.probes import base as probe_keys

LATE_FRACTION = 0.25
#: The late median loss above this multiple of the early median: the run diverged
#: (a healthy run's loss falls; noise alone does not raise a median by half).
DIVERGENCE_FACTOR = 1.5
#: A step whose whole-model update ratio ‖Δw‖/‖w‖ exceeds this moved the weights
#: farther than their own size: the learning rate overshoots (healthy runs move by
#: 1e-4 to 1e-2 of it a step).
UPDATE_RATIO_LIMIT = 1.0
#: At such a step, a gradient norm this many times the weights' norm says the gradient
#: itself exploded (a bad initialisation, unnormalised targets under SGD), not the
#: learning rate: healthy gradients are a fraction of the weights' norm.
GRADIENT_RATIO_LIMIT = 10.0
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

#: A batch loss above this multiple of the median of the SPIKE_WINDOW batches before
#: it, and above the run's starting loss, is a spike: the step made the model worse
#: than untrained on that batch (noise in a healthy run, even at batch size 1, stays
#: below the starting loss once training has begun).
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 50
#: Spikes that make the loss unstable (one can be a bad batch).
SPIKES_MIN = 3
#: Epoch-to-epoch swings of the validation accuracy at least this large (absolute),
#: changing direction at least twice: an oscillating validation metric.
SWING = 0.05
#: The late median loss at or above this fraction of the trivial predictor's loss
#: (ln C for C classes under cross-entropy, ln 2 for binary) or of the starting loss:
#: the run did not learn. Judged from MIN_STEPS_TO_JUDGE steps on.
NOT_LEARNING = 0.95
MIN_STEPS_TO_JUDGE = 50
#: Findings of one code in at least this many layers are grouped into one.
GROUP_FROM = 3
#: Which problem, begun earlier, explains which later ones (`Finding.caused_by`).
CAUSES = {
    "improper_output": ("nonfinite", "not_converging", "unstable_loss", "dead_layer",
                        "zero_gradients", "dead_units", "lr_too_high"),
    "unstable_loss": ("dead_layer", "dead_units", "zero_gradients", "nonfinite",
                      "exploding_gradients", "not_converging"),
    "lr_too_high": ("dead_layer", "dead_units", "nonfinite", "exploding_gradients",
                    "unstable_loss", "not_converging"),
    "exploding_gradients": ("nonfinite", "dead_layer", "dead_units", "unstable_loss",
                            "not_converging"),
    "vanishing_gradients": ("not_converging", "stalled_layer"),
    "dead_layer": ("not_converging", "stalled_layer"),
    "zero_gradients": ("not_converging", "stalled_layer"),
}

def _late(series):
    series = series.dropna()
    return series.iloc[int(len(series) * (1 - LATE_FRACTION)):] if len(series) else series


def _early(series):
    series = series.dropna()
    return series.iloc[: max(1, int(len(series) * LATE_FRACTION))] if len(series) else series


def _zero_threshold(run):
    """The run's smallest zero-band threshold (1e-7 for logs without its meta)."""
    return min(run_thresholds(run.summary.get("meta", {})))


def _kernels(run):
    """(the recorded kernels in the model's order, {variable: size}). The model's order
    is meta.positions (places in model.weights); logs before it keep the order in which
    variables were first trained, which fine-tuning changes."""
    meta = run.summary.get("meta", {})
    names, sizes = meta.get("variables", []), meta.get("variable_sizes", [])
    shapes = dict(zip(names, sizes))
    recorded = set(run.variables)
    kernels = [n for n in names if n.endswith("kernel") and n in recorded]
    positions = meta.get("positions") or {}
    if all(k in positions for k in kernels):
        kernels.sort(key=positions.get)
    return kernels, shapes


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
    since = int(first["step"])
    counts = f"{len(bad)} of {len(steps)} steps had NaN/Inf gradients or loss"
    origin = run.summary.get("meta", {}).get("nonfinite_origin") or {}
    advice = ("Lower the learning rate, clip gradients (clipnorm=1.0), check the inputs "
              "for NaN/Inf, and guard log/sqrt/division in custom losses")
    if origin.get("step") == since and origin.get("layer"):
        layer = origin["layer"]
        evidence = (f"NaN/Inf first appeared in the output of layer {layer} at step "
                    f"{since}, in the forward pass; {counts}")
        advice = (f"Look at {layer} and what feeds it: an activation that overflows "
                  "(exponential, large logits), a division or log of zero, inputs with "
                  "NaN/Inf or far too large. " + advice)
    else:
        layer = _first_nonfinite_variable(run, since)
        evidence = (f"{counts} ({int(first['nonfinite_grads'])} gradient entries at the "
                    "first" + (", whose forward pass was finite: the loss or the backward "
                               "pass made them)" if origin.get("step") == since else ")"))
    return [Finding("nonfinite", "error", layer, since, evidence, advice, since=since,
                    numbers={"steps": len(bad), "of": len(steps)})]


def _first_nonfinite_variable(run, step):
    """The first variable in the model's order with a NaN/Inf gradient at `step`."""
    if not run.variables:
        return None
    counts = run.key("nonfinite_grads")
    row = counts.loc[counts["step"] == step].drop(columns="step")
    if row.empty:
        return None
    positions = run.summary.get("meta", {}).get("positions") or {}
    bad = [name for name in row.columns if row[name].iloc[0] > 0]
    return min(bad, key=lambda n: positions.get(n, len(positions))) if bad else None


def _largest_gradient(run, step):
    """([the kernel with the largest squared gradient at `step`], its share of the
    kernels' squared gradient norm), or None."""
    kernels, _ = _kernels(run)
    norms = run.key("grad_norm") if kernels else None
    if norms is None or not (norms["step"] == step).any():
        return None
    row = norms.loc[norms["step"] == step, kernels].iloc[0] ** 2
    if not row.sum() > 0:
        return None
    return [row.idxmax()], float(row.max() / row.sum())


def _settled_from(run):
    """The first step at which an adaptive optimizer's second moment has settled
    (1/(1 − β2) steps: Adam's default 0.999 needs 1,000): before it, its preconditioned
    sharpness swings with v and says little about the learning rate. 0 for others."""
    beta_2 = (run.summary.get("meta", {}).get("optimizer") or {}).get("beta_2")
    return 0 if not beta_2 or beta_2 >= 1 else int(round(1 / (1 - beta_2)))


def _learning_rate(run):
    findings = []
    loss = run.steps["train_loss"].replace([np.inf, -np.inf], np.nan)
    early, late = _early(loss), _late(loss)
    if len(loss.dropna()) >= 8 and late.median() > DIVERGENCE_FACTOR * early.median():
        rising = loss.rolling(8, min_periods=1).median() > DIVERGENCE_FACTOR * early.median()
        findings.append(Finding(
            "lr_too_high", "error", None, int(run.steps["step"].iloc[-1]),
            f"the loss diverged: median {early.median():.4g} over the first steps, "
            f"{late.median():.4g} over the last",
            "Lower the learning rate (try 10x smaller) or add warm-up",
            since=int(run.steps.loc[rising.idxmax(), "step"]),
            numbers={"early_loss": early.median(), "late_loss": late.median()}))
    steps = run.steps
    ratio = steps["update_ratio"].replace([np.inf, -np.inf], np.nan)
    jumps = steps.loc[ratio > UPDATE_RATIO_LIMIT, "step"]
    weights = steps["weight_norm"].shift(1).fillna(steps["weight_norm"])
    gradient_ratio = (steps["grad_norm"] / weights).replace([np.inf, -np.inf], np.nan)
    first = jumps.index[0] if len(jumps) else None
    if first is not None and gradient_ratio[first] >= GRADIENT_RATIO_LIMIT:
        step = int(steps.loc[first, "step"])
        where, advice = _largest_gradient(run, step), _EXPLODING_ADVICE
        if where is not None and where[0] == _kernels(run)[0][:1]:
            where, advice = (f"; {100 * where[1]:.0f} % of it in the first layer "
                             f"{where[0][0]}, which multiplies the inputs: they are "
                             "probably not normalised", "Normalise the inputs (scale "
                             "features to unit variance, pixels to [0, 1]); "
                             + _EXPLODING_ADVICE[0].lower() + _EXPLODING_ADVICE[1:])
        else:
            where = ""
        findings.append(Finding(
            "exploding_gradients", "error", None, step,
            f"at step {step} the gradient norm was {steps.loc[first, 'grad_norm']:.3g}, "
            f"{gradient_ratio[first]:.3g}x the weights' norm, and the step moved the "
            f"weights {ratio[first]:.3g}x their norm{where}", advice, since=step,
            numbers={"gradient_ratio": float(gradient_ratio[first])}))
    elif not findings and len(jumps):
        findings.append(Finding(
            "lr_too_high", "error", None, int(jumps.iloc[-1]),
            f"{len(jumps)} steps moved the weights farther than their own norm "
            f"(‖Δw‖/‖w‖ up to {ratio.max():.3g}, the first at step {int(jumps.iloc[0])}): "
            "the steps overshoot", "Lower the learning rate (try 10x smaller), add "
            "warm-up, or clip gradients (clipnorm=1.0)", since=int(jumps.iloc[0]),
            numbers={"steps": len(jumps), "max_update_ratio": float(ratio.max())}))
    if not run.probes.empty and probe_keys.STABILITY_RATIO in run.probes:
        over = run.probes[(run.probes[probe_keys.STABILITY_RATIO] > 1)
                          & (run.probes["step"] >= _settled_from(run))]
        if not over.empty:
            row = over.iloc[-1]
            ratio = row[probe_keys.STABILITY_RATIO]
            findings.append(Finding(
                "lr_too_high", "warning", None, int(row["step"]),
                f"the optimizer's sharpness {row[probe_keys.SHARPNESS]:.4g} is "
                f"{ratio:.3g}x its stability limit "
                f"{row[probe_keys.STABILITY_LIMIT]:.4g}: its steps overshoot along the sharpest "
                "direction", f"Lower the learning rate {ratio:.3g}x or "
                "more, or add warm-up; if the loss still falls, training is at the edge "
                "of stability, which can be benign"))
    elif not run.probes.empty and probe_keys.LR_TIMES_LAMBDA_MAX in run.probes:  # older logs
        over = run.probes[run.probes[probe_keys.LR_TIMES_LAMBDA_MAX] > EDGE_OF_STABILITY]
        if not over.empty:
            row = over.iloc[-1]
            findings.append(Finding(
                "lr_too_high", "warning", None, int(row["step"]),
                f"lr·λmax = {row[probe_keys.LR_TIMES_LAMBDA_MAX]:.3g} > 2: past the "
                f"stability limit of gradient descent (λmax = "
                f"{row[probe_keys.LAMBDA_1]:.4g})",
                "Lower the learning rate below 2/λmax; with an adaptive optimiser this "
                "is a hint, check that the loss still falls"))
    return findings


_EXPLODING_ADVICE = ("Clip gradients (clipnorm=1.0), lower the learning rate, normalise "
                     "(BatchNormalization/LayerNormalization), scale the targets, and "
                     "initialise with variance scaling (Glorot, He)")


def _exploding(run):
    norms = run.steps["grad_norm"].replace([np.inf, -np.inf], np.nan)
    early, late = _early(norms), _late(norms)
    if len(norms.dropna()) < 8 or early.median() <= 0:
        return []
    growth = late.median() / early.median()
    if growth < EXPLOSION_FACTOR:
        return []
    grown = norms > EXPLOSION_FACTOR * early.median()
    return [Finding(
        "exploding_gradients", "error", None, int(run.steps.loc[norms.idxmax(), "step"]),
        f"the gradient norm grew {growth:.3g}x: median {early.median():.3g} early, "
        f"{late.median():.3g} late (max {norms.max():.3g})",
        _EXPLODING_ADVICE, since=int(run.steps.loc[grown.idxmax(), "step"]),
        numbers={"growth": growth})]


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
    """The first kernel's RMS gradient far below the last's (a first kernel in the zero
    band is `_dead`'s: a dead layer, or vanishing through saturating activations)."""
    kernels, sizes = _kernels(run)
    if len(kernels) < 2:
        return []
    zeros = run.layer(kernels[0])[zero_key([_zero_threshold(run)])]  # one variable read
    if _late(zeros).median() / sizes[kernels[0]] >= DEAD_FRACTION:
        return []
    norms = run.key("grad_norm")
    first = _rms(norms, kernels[0], sizes[kernels[0]])
    last = _rms(norms, kernels[-1], sizes[kernels[-1]])
    if not (last > 0) or first / last >= VANISHING_RATIO:
        return []
    return [Finding(
        "vanishing_gradients", "warning", kernels[0], None,
        f"the first kernel's RMS gradient is {first / last:.2g} of the last kernel's "
        f"({first:.3g} vs {last:.3g})",
        _VANISHING_ADVICE if _through_saturating(run, kernels, kernels[0])
        or not _activations(run) else
        "Add normalisation layers or residual connections, and initialise with variance "
        "scaling (He for ReLU)")]


_DEAD_ADVICE = ("Its units never activate: lower the learning rate, normalise the inputs, "
                "check the bias initialisation, or use LeakyReLU/GELU")


def _latest(run, kind, key):
    """(layer, latest value, its step) of each per-layer key `<layer>/<key>` that the
    run's probes of `kind` (`probes.base`) wrote."""
    if run.probes.empty:
        return
    rows = run.probes[run.probes["kind"] == kind]
    for column in [c for c in rows.columns if c.endswith("/" + key)]:
        values = rows[column].dropna()
        if len(values):
            yield (column[: -len(key) - 1], values.iloc[-1],
                   int(rows.loc[values.index[-1], "step"]))


def _since(steps, condition):
    """The first step of the run of True at the end of `condition` (a boolean series
    over `steps`), or None when its last value is False."""
    values = np.asarray(condition, bool)
    if not len(values) or not values[-1]:
        return None
    start = len(values) - np.argmin(values[::-1]) if not values.all() else 0
    return int(np.asarray(steps)[start])


def _zero_initialised_after(run, kernels, name):
    """The first kernel after `name` whose weights were all zero after the run's first
    step (weight_norm 0: initialised with zeros), or None."""
    for later in kernels[kernels.index(name) + 1:]:
        norms = run.layer(later)["weight_norm"].dropna()
        if len(norms) and norms.iloc[0] == 0:
            return later
    return None


def _dead(run):
    findings = []
    kernels, sizes = _kernels(run)
    previous_dead = False
    threshold = _zero_threshold(run)
    zeros = run.key(zero_key([threshold])) if kernels else None
    activations = _activations(run)
    for name in kernels if zeros is not None else ():
        fraction = _late(zeros[name]).median() / sizes[name]
        dead, follows_dead = fraction >= DEAD_FRACTION, previous_dead
        previous_dead = dead
        if not dead or follows_dead:  # a kernel after a dead one only gets no input
            continue
        step = int(run.steps["step"].iloc[-1])
        since = _since(zeros["step"], zeros[name] / sizes[name] >= DEAD_FRACTION)
        zero = (f"{100 * fraction:.1f} % of its gradients are zero (|g| <= {threshold:g}) "
                "over the last steps")
        extra = {"since": since, "numbers": {"fraction": fraction}}
        activation = activations.get(name)
        saturating = _through_saturating(run, kernels, name)
        zero_after = _zero_initialised_after(run, kernels, name)
        if zero_after:
            findings.append(Finding(
                "zero_gradients", "error", name, step,
                f"{zero}: the kernel after it, {zero_after}, started with all-zero "
                "weights, so no gradient reaches this layer (its weights stay unchanged)",
                "Initialise every kernel randomly (Glorot or He), never with zeros or one "
                "constant: units that start equal stay equal", **extra))
        elif activation is None or activation in EXACT_ZERO:
            findings.append(Finding(
                "dead_layer", "error", name, step, f"{zero}: the layer no longer learns, "
                "and the layers after it get no signal through it", _DEAD_ADVICE, **extra))
        elif saturating:
            findings.append(Finding(
                "vanishing_gradients", "error", name, step,
                f"{zero}: they vanish on their way back through {len(saturating)} "
                f"saturating activation(s) ({', '.join(sorted(set(saturating)))}) from "
                "this layer to the output, so the layer no longer learns",
                _VANISHING_ADVICE, **extra))
        else:
            findings.append(Finding(
                "zero_gradients", "error", name, step,
                f"{zero}, though its activation ({activation}) cannot silence it: the "
                "layer no longer learns",
                "Check what follows it (a frozen or zero-initialised layer, a stop_gradient, "
                "a loss that ignores the output), the input scale and the learning rate",
                **extra))
    for layer, fraction, step in _latest(run, probe_keys.ACTIVATIONS, probe_keys.ZERO_FRACTION):
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
    threshold = _zero_threshold(run)
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
            f"{count} of {units} units have not learned since step "
            f"{int(since[dead].max())} (the first stopped at step {int(since[dead].min())}): "
            f"their gradients are zero (|g| <= {threshold:g}) at every step",
            "Their ReLUs never fire: lower the learning rate, start biases slightly "
            "positive, add normalisation before the activation, or use LeakyReLU/GELU",
            since=int(since[dead].min()),
            numbers={"units": count, "of": units, "fraction": count / units}))
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
        f"{run.probes[f'{name}/{probe_keys.STABLE_RANK}'].dropna().iloc[-1]:.3g})",
        "The layer uses few dimensions: lower weight decay or the learning rate, "
        "or check for a bottleneck")
        for name, fraction, step in _latest(run, probe_keys.WEIGHT_SPECTRUM,
                                            probe_keys.NEAR_ZERO_FRACTION)
        if fraction >= RANK_COLLAPSE_FRACTION]


def _saturation(run):
    return [Finding(
        "activation_saturation", "warning", layer, step,
        f"{100 * fraction:.0f} % of its outputs sit in the flat tails of its activation, "
        "where gradients vanish",
        "Normalise its inputs (BatchNormalization), lower the initial weight scale, "
        "or use a non-saturating activation")
        for layer, fraction, step in _latest(run, probe_keys.ACTIVATIONS,
                                             probe_keys.SATURATED_FRACTION)
        if fraction >= SATURATION_FRACTION]


def _unstable_loss(run):
    """Loss spikes (SPIKE_FACTOR over the running median and above the starting loss),
    or a validation accuracy that swings up and down from epoch to epoch."""
    steps = run.steps
    loss = steps["train_loss"].replace([np.inf, -np.inf], np.nan)
    if loss.notna().sum() < 2 * SPIKE_WINDOW // 5:
        return []
    before = loss.shift(1).rolling(SPIKE_WINDOW, min_periods=SPIKE_WINDOW // 5).median()
    start = loss.dropna().iloc[: max(5, len(loss) // 50)].median()
    spikes = steps.loc[(loss > SPIKE_FACTOR * before) & (loss > start), "step"]
    findings = []
    if len(spikes) >= SPIKES_MIN:
        ratio = float((loss / before).max())
        findings.append(Finding(
            "unstable_loss", "warning", None, int(spikes.iloc[-1]),
            f"the batch loss spiked {len(spikes)} times to over {SPIKE_FACTOR:g}x the "
            f"median of the {SPIKE_WINDOW} batches before it and above the starting loss "
            f"(up to {ratio:.3g}x, the first at step {int(spikes.iloc[0])})",
            "The steps are too large for this data: lower the learning rate or the "
            "momentum, raise the batch size, normalise the inputs (scale features to "
            "unit variance, pixels to [0, 1]), or clip gradients",
            since=int(spikes.iloc[0]), numbers={"spikes": len(spikes), "max_ratio": ratio}))
    accuracy = run.epochs["val_mean_acc"].dropna() if "val_mean_acc" in run.epochs else []
    if not findings and len(accuracy) >= 4:
        change = np.diff(accuracy.to_numpy())
        big = change[np.abs(change) >= SWING]
        turns = int(np.sum(np.sign(big[1:]) != np.sign(big[:-1])))
        if turns >= 2:
            findings.append(Finding(
                "unstable_loss", "warning", None, int(steps["step"].iloc[-1]),
                f"the validation accuracy swings between {accuracy.min():.3g} and "
                f"{accuracy.max():.3g}, changing direction {turns} times by "
                f"{SWING:g} or more", "Lower the learning rate, raise the batch size, or "
                "normalise the inputs", numbers={"turns": turns}))
    return findings


def _trivial_loss(run):
    """The loss of predicting the uniform class distribution under a probabilistic
    cross-entropy (ln C, ln 2 for binary), or None."""
    output = run.summary.get("meta", {}).get("output") or {}
    loss, units = output.get("loss"), output.get("units") or 0
    if loss in ("categorical_crossentropy", "sparse_categorical_crossentropy") and units > 1:
        return math.log(units)
    if loss == "binary_crossentropy":
        return math.log(2)
    return None


def _not_converging(run):
    """After MIN_STEPS_TO_JUDGE steps, a late loss no better than guessing, or than the
    loss at the start."""
    loss = run.steps["train_loss"].replace([np.inf, -np.inf], np.nan).dropna()
    if len(loss) < MIN_STEPS_TO_JUDGE:
        return []
    late, start = _late(loss).median(), loss.iloc[: max(5, len(loss) // 20)].median()
    trivial = _trivial_loss(run)
    if trivial is not None and late >= NOT_LEARNING * trivial:
        evidence = (f"the late median loss {late:.4g} is no better than guessing the "
                    f"classes uniformly ({trivial:.4g})")
    elif NOT_LEARNING * start <= late <= DIVERGENCE_FACTOR * start:
        evidence = f"the late median loss {late:.4g} is no lower than at the start ({start:.4g})"
    else:
        return []
    return [Finding(
        "not_converging", "warning", None, int(run.steps["step"].iloc[-1]), evidence,
        "Check that the labels match the inputs and the loss (one-hot or integer), the "
        "output activation, and the learning rate (too low learns nothing, too high "
        "bounces)", numbers={"late_loss": late, "start_loss": start, "trivial": trivial})]


def _improper_output(run):
    """An output activation that does not fit the loss (meta.output, read from the
    compiled model when recording started)."""
    output = run.summary.get("meta", {}).get("output") or {}
    activation, loss = output.get("activation"), output.get("loss")
    if activation is None or loss not in PROBABILISTIC_LOSSES:
        return []
    units, from_logits = output.get("units") or 0, output.get("from_logits")
    multi = loss in ("categorical_crossentropy", "sparse_categorical_crossentropy",
                     "categorical_focal_crossentropy")
    if from_logits and activation in ("softmax", "sigmoid"):
        severity, evidence, advice = "warning", (
            f"the output applies {activation}, and {loss}(from_logits=True) applies it "
            "again"), "Remove the output activation, or set from_logits=False"
    elif from_logits:
        return []
    elif activation == "softmax" and units == 1:
        severity, evidence, advice = "error", (
            "the output is a softmax over one unit, which is 1 whatever the input"), (
            "Use sigmoid for one binary output, or one softmax unit per class")
    elif activation not in ("softmax", "sigmoid"):
        severity, evidence, advice = "error", (
            f"the output activation {activation} does not give probabilities, but {loss} "
            "reads the outputs as probabilities (from_logits=False): log(0) and "
            "negative values make it NaN or meaningless"), (
            f"Use softmax{' ' if multi else ' or sigmoid '}on the output, or a linear "
            "output with from_logits=True")
    elif activation == "sigmoid" and multi and units > 1:
        severity, evidence, advice = "warning", (
            f"a sigmoid output under {loss}: the class probabilities do not sum to 1"), (
            "Use softmax for mutually exclusive classes (sigmoid with binary_crossentropy "
            "for multi-label outputs)")
    else:
        return []
    return [Finding("improper_output", severity, None, 0, evidence, advice, since=0,
                    numbers={"units": units})]


def _failed_probes(run):
    """Probes that failed: what they would have measured is missing, and why."""
    if run.probes.empty or "error" not in run.probes:
        return []
    failed = run.probes[run.probes["error"].notna()]
    return [Finding(
        "probe_failed", "warning", None, int(rows["step"].iloc[-1]),
        f"probe {name!r} failed at {len(rows)} of "
        f"{int((run.probes['probe'] == name).sum())} evaluations, the first at step "
        f"{int(rows['step'].iloc[0])}: {rows['error'].iloc[0]}",
        "Its quantities are missing from the logs and the report: check probe_data "
        "(x as the model's inputs, y as the loss expects) and the probe's arguments",
        numbers={"failures": len(rows)})
        for name, rows in failed.groupby("probe", sort=False)]


RULES = (_failed_probes, _improper_output, _nonfinite, _learning_rate, _unstable_loss,
         _not_converging, _exploding, _vanishing, _dead, _dead_units, _stalled,
         _rank_collapse, _saturation) + INSTRUMENT_RULES


def _grouped(findings, run):
    """Findings of one code in GROUP_FROM or more layers as one: how many layers of how
    many, the worst ones (by `numbers["fraction"]`, else the first) named."""
    kernels, _ = _kernels(run)
    by_code = {}
    for f in findings:
        by_code.setdefault(f.code if f.layer else None, []).append(f)
    out = list(by_code.pop(None, []))
    for code, group in by_code.items():
        if len(group) < GROUP_FROM:
            out += group
            continue
        worst = sorted(group, key=lambda f: -f.numbers.get("fraction", 0))
        severity = max((f.severity for f in group), key=SEVERITIES.index)
        since = min((f.since for f in group if f.since is not None), default=None)
        named = ", ".join(f"{f.layer} ({100 * f.numbers['fraction']:.0f} %)"
                          if "fraction" in f.numbers else f.layer for f in worst[:3])
        out.append(Finding(
            code, severity, worst[0].layer,
            max((f.step for f in group if f.step is not None), default=None),
            f"in {len(group)} of {len(kernels)} layers; the worst: {named}. "
            f"{worst[0].evidence[0].upper()}{worst[0].evidence[1:]} in {worst[0].layer}",
            worst[0].advice, since=since,
            numbers={"layers": len(group), "of": len(kernels),
                     "worst": [f.layer for f in worst[:3]]}))
    return out


def _root_cause_first(findings, run):
    """Findings ordered by the step each began (then by depth: the whole model, then
    layers from the input on), each with `caused_by` set to the code of an earlier
    finding that explains it (CAUSES)."""
    kernels, _ = _kernels(run)
    last = int(run.steps["step"].iloc[-1])

    def began(f):
        return f.since if f.since is not None else (f.step if f.step is not None else last)

    def depth(f):
        return -1 if f.layer is None else (kernels.index(f.layer) if f.layer in kernels
                                           else len(kernels))

    ordered = sorted(findings, key=lambda f: (began(f), depth(f),
                                              -SEVERITIES.index(f.severity)))
    out = []
    for f in ordered:
        cause = next((g.code for g in out if f.code in CAUSES.get(g.code, ())
                      and began(g) <= began(f)), None)
        out.append(dataclasses.replace(f, caused_by=cause))
    return out


def diagnose_run(run):
    """Findings for a loaded `Run`: the problem that began first comes first, and each
    later one names the earlier problem that explains it (`caused_by`); one code found
    in many layers is one finding."""
    if run.steps.empty:
        return Findings()
    findings = [f for rule in RULES for f in rule(run)]
    # A layer's cause is named once: a warning is dropped when an error of its code
    # names its layer already.
    errors = {(f.code, f.layer) for f in findings if f.severity == "error" and f.layer}
    findings = [f for f in findings if f.severity == "error" or (f.code, f.layer) not in errors]
    # Two rules may see one whole-model problem (a jump and a growth of the gradient):
    # of whole-model findings with one code and severity, the one that began first.
    first = {}
    for f in sorted(findings, key=lambda f: f.since if f.since is not None else math.inf):
        first.setdefault((f.code, f.severity, f.layer), f) if f.layer is None else None
    findings = [f for f in findings if f.layer is not None
                or first[(f.code, f.severity, None)] is f]
    return Findings(_root_cause_first(_grouped(findings, run), run))


def diagnose(log_dir):
    """Findings for the run in `log_dir` (see `read_log` for the errors it raises)."""
    return diagnose_run(read_log(log_dir))
