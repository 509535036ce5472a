"""Cockpit's single-batch instruments (Schneider, Dangel & Hennig, "Cockpit: A Practical
Debugging Tool for the Training of Deep Neural Networks", NeurIPS 2021), from the
per-example gradients of one batch, under the names of Cockpit's quantities in snake
case.

With g_n the gradient of example n's loss (n = 1..B), g = (1/B) Σ_n g_n the batch
gradient and p_n = g_nᵀ g:

* mean_gsnr: the mean over parameters j of g_j² / ((1/B) Σ_n g_nj² − g_j² + 1e-5), the
  gradient signal-to-noise ratio (Liu et al. 2020).
* norm_test: √(Σ_n ‖g_n − g‖² / (B − 1) / B) / ‖g‖, the largest θ for which the norm
  test passes (Byrd et al. 2012, eq. 3.9); above 1 the batch is too small to trust
  the gradient's direction.
* inner_test: √(Σ_n (p_n − ‖g‖²)² / (B − 1) / B) / ‖g‖², the largest θ of the inner
  product test (Bollapragada et al. 2018, eq. 2.6).
* ortho_test: √(Σ_n ‖g_n − (p_n / ‖g‖²) g‖² / (B − 1) / B) / ‖g‖, the largest ν of the
  orthogonality test (Bollapragada et al. 2018, eq. 3.3).
* cabs: lr · Σ_n ‖g_n − g‖² / (B · loss), the batch size that the CABS rule suggests
  for SGD at learning rate lr (Balles et al. 2017, eq. 22); None for another
  optimizer (Cockpit refuses those).
* early_stopping: 1 − B · mean_j g_j² / (s_j² + 1e-5), s_j² the sample variance
  (B − 1) of the g_nj: above 0 the gradients hold no more information than noise,
  stop (the EB criterion, Mahsereci et al. 2017, eq. 7, with Cockpit's stabilising
  constant); None for another optimizer than SGD.
* tic_diag: Σ_j m_j / (h_j + 1e-7) and tic_trace: Σ_j m_j / (Σ_j h_j + 1e-7), with
  m_j = (1/B) Σ_n g_nj² the gradient's second moment and h the diagonal of the
  curvature of the batch loss (the Takeuchi information criterion, Thomas et al.
  2020). The curvature is the generalised Gauss-Newton matrix (1/B) Σ_n J_nᵀ H_n J_n,
  J_n the Jacobian of the model's logits for example n (its output before a final
  softmax or sigmoid, else its output) and H_n the Hessian of its loss w.r.t. them
  (Cockpit's curvature="diag_ggn_exact"): it equals the Hessian's diagonal (Cockpit's
  default) when the network up to the logits is piecewise linear (ReLU, max-pooling).

* alpha: where the step from w_t to w_{t+1} lands on a quadratic fitted along it to
  the losses and slopes at both ends (the batch of step t at w_t, the batch of step
  t + 1 at w_{t+1}), each weighted by its variance over the examples: 0 is the
  minimum of the fit, 1 the far side as high as the start, −1 a concave fit (still
  going down), below 0 too short a step, above 1 an overshoot (Cockpit's Alpha).
  Needs two steps: recorded in `fit`, not by `compute`.

Everything is whole-model, in float64, from the sums of `batch_statistics` (the same
in `compute` and in the recorded steps; `per_example` states the cost per layer
type).
"""

import warnings
import weakref

import numpy as np
import tensorflow as tf

from optinsight import native
from optinsight.batch_statistics import TIC_EPSILON, batch_sums
from optinsight.metrics import BATCH_INSTRUMENTS as NAMES  # what `compute` gives
from optinsight.metrics import GRAD_HIST_2D_BINS, GRAD_HIST_2D_RANGE
from optinsight.per_example import ggn_diagonal_sum, losses_and_gradients
from optinsight.probes.common import optimizer_learning_rate, resolve_variables

CURVATURE = ("tic_diag", "tic_trace")  # the instruments that need the curvature
ALPHA_EPSILON = 1e-10  # Cockpit's stand-in for a variance of 0 in Alpha's fit


def plain_sgd(optimizer):
    """Whether `optimizer` is SGD without momentum (what CABS and EB assume)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return type(optimizer).__name__ == "SGD" and not getattr(optimizer, "momentum", 0) \
        and not getattr(optimizer, "nesterov", False)


def from_sums(sums, sgd_learning_rate=None, names=NAMES):
    """{name: value} of the instruments `names` from `batch_statistics.batch_sums`
    (floats). cabs and early_stopping are defined for SGD without momentum only (as in
    Cockpit): None unless its `sgd_learning_rate` is given; the TIC needs the sums of
    the curvature."""
    b, g2 = sums["batch_size"], sums["gradient_sq"]
    norms, projections = sums["norms_sum"], sums["projections_sq"]
    spread = norms - b * g2  # Σ_n ‖g_n − g‖²
    formulas = {
        "mean_gsnr": lambda: sums["gsnr_sum"] / sums["parameters"],
        "norm_test": lambda: np.sqrt(spread / (b - 1) / b / g2),
        "inner_test": lambda: np.sqrt((projections - b * g2**2) / (b - 1) / b) / g2,
        "ortho_test": lambda: np.sqrt((norms - projections / g2) / (b - 1) / b / g2),
        "cabs": lambda: None if sgd_learning_rate is None
        else sgd_learning_rate * spread / (b * sums["loss"]),
        "early_stopping": lambda: None if sgd_learning_rate is None
        else 1 - b * sums["eb_sum"] / sums["parameters"],
        "tic_diag": lambda: sums["tic_sum"],
        "tic_trace": lambda: sums["moment_sum"] / (sums["curvature_sum"] + TIC_EPSILON),
    }
    values = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in names:
            value = formulas[name]()
            values[name] = None if value is None else float(value)
    return values


def alpha(step_length, losses, slopes, loss_variances, slope_variances):
    """Cockpit's Alpha of one step: the quadratic q(s) = c + b·s + a·s² fitted by
    weighted least squares to the losses q(0), q(t) and slopes q'(0), q'(t) observed at
    both ends of a step of length t = `step_length` (each pair start, end), weighted by
    the inverse of their variances (a variance of 0 counts as 1e-10); then 2t / s̄ − 1,
    s̄ = −b / a the far point as high as the start. −1 for a concave fit, for a step of
    length 0, or when no fit exists; None for a non-finite input."""
    values = [step_length, *losses, *slopes, *loss_variances, *slope_variances]
    if not np.all(np.isfinite(values)):
        return None
    t = float(step_length)
    phi = np.array([[1, 0, 0], [1, t, t**2], [0, 1, 0], [0, 1, 2 * t]]).T
    variances = [v if v != 0 else ALPHA_EPSILON for v in [*loss_variances, *slope_variances]]
    weights = np.diag(1 / np.array(variances))
    try:
        mu = np.linalg.solve(phi @ weights @ phi.T, phi @ weights @ np.array([*losses, *slopes]))
    except np.linalg.LinAlgError:
        return -1.0
    if mu[2] < 0 or t == 0:
        return -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(2 * t / (-mu[1] / mu[2]) - 1)


_COMPILED = weakref.WeakKeyDictionary()  # model -> {curvature: tf.function}


def _batch_sums(model, curvature):
    """The compiled `batch_sums` of `model` on a batch (cached per model)."""
    functions = _COMPILED.setdefault(model, {})
    if curvature not in functions:
        variables = resolve_variables(model)
        ops = native.choose("auto")  # as the callback's

        def sums(x, y):
            losses, gradients = losses_and_gradients(model, variables, x, y, ops)
            curvature_sum = ggn_diagonal_sum(model, variables, x, y, ops=ops) \
                if curvature else None
            return batch_sums(losses, gradients.moments(), curvature_sum)
        functions[curvature] = tf.function(sums, reduce_retracing=True)
    return functions[curvature]


def compute(model, x, y, names=None):
    """The instruments `names` (default: all of NAMES) at the model's current weights on
    the batch (x, y), with its compiled loss and optimizer: {name: float or None}.
    Memory: `batch_statistics`'s, for the whole batch at once."""
    names = NAMES if names is None else tuple(names)
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown instrument {unknown[0]!r}; the instruments of one "
                         f"batch are {', '.join(NAMES)}")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"the instruments need a batch of at least 2 examples with as "
                         f"many labels, got {len(x)} and {len(y)}")
    sums = _batch_sums(model, bool(set(CURVATURE) & set(names)))(x, y)
    optimizer = getattr(model, "optimizer", None)
    sgd = optimizer is not None and plain_sgd(optimizer)
    return from_sums({k: float(v) for k, v in sums.items()},
                     optimizer_learning_rate(optimizer) if sgd else None, names)


def histogram_record(counts):
    """instruments.jsonl's "grad_hist_2d" of counts [gradient bins, parameter bins]:
    its bins, ranges and non-zero cells [[i, j, count], ...]."""
    cells = np.argwhere(counts)
    return {"bins": list(GRAD_HIST_2D_BINS), "range": [list(r) for r in GRAD_HIST_2D_RANGE],
            "cells": [[int(i), int(j), int(counts[i, j])] for i, j in cells]}


class StepInstruments:
    """Turns the `InstrumentTracker`'s rows into instruments.jsonl records (docs/logs.md):
    {"step", "epoch", "batch", "instruments": {name: value}, "distance": {variable:
    ‖w_t − w_0‖}}. A due step's record waits for the next step's row when it needs its
    Alpha (whose end is there); `flush` gives a waiting one with Alpha null.

    names: the recorded instruments; variables: the run's variable names in the
    tracker's order; sgd_learning_rate: as `from_sums`."""

    def __init__(self, names, variables, sgd_learning_rate=None):
        self.names, self.variables = tuple(names), list(variables)
        self.batch_names = tuple(n for n in self.names if n in NAMES)
        self.sgd_learning_rate = sgd_learning_rate
        self.waiting = None  # (record, the row of its step)

    def records(self, rows, epoch, epoch_start):
        """The records finished by `rows` (`InstrumentTracker.read_rows`, in order) of
        `epoch`, whose first step is epoch_start + 1."""
        out = []
        for step, columns, distances, counts in rows:
            if self.waiting is not None:
                record, start = self.waiting
                if step == record["step"] + 1 and columns.get("has_end"):
                    record["instruments"]["alpha"] = alpha(
                        np.sqrt(start["step_length_sq"]),
                        (start["loss"], columns["loss"]),
                        (start["start_slope"], columns["end_slope"]),
                        (start["loss_variance"], columns["loss_variance"]),
                        (start["start_slope_variance"], columns["end_slope_variance"]))
                out.append(record)
                self.waiting = None
            if not columns["due"]:
                continue
            record = {"step": step, "epoch": epoch, "batch": step - epoch_start - 1,
                      "instruments": self._values(columns, distances)}
            if distances is not None:
                record["distance"] = dict(zip(self.variables, map(float, distances)))
            if counts is not None:
                record["grad_hist_2d"] = histogram_record(counts)
            if "alpha" in self.names:
                self.waiting = (record, columns)
            else:
                out.append(record)
        return out

    def _values(self, columns, distances):
        values = {}
        if "alpha" in self.names:
            values["alpha"] = None
        if "distance" in self.names:
            values["distance"] = float(np.sqrt(np.sum(np.square(distances))))
        if self.batch_names:
            values.update(from_sums(columns, self.sgd_learning_rate, self.batch_names))
        return values

    def flush(self):
        """The waiting record, if any, with Alpha null: [] or [record]."""
        waiting, self.waiting = self.waiting, None
        return [] if waiting is None else [waiting[0]]
