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

Everything is whole-model, in float64. Memory: the per-example gradients of the
batch, B × n_params × 8 bytes; the TIC adds the per-example output Jacobians of a
chunk of examples, chunk × k × n_params × 4 bytes for k outputs.
"""

import numpy as np
import tensorflow as tf

from optinsight import compat
from optinsight.probes.common import (
    in_chunks,
    loss_function,
    optimizer_learning_rate,
    resolve_variables,
)
from optinsight.probes.gradients import per_example_gradients

NAMES = ("mean_gsnr", "norm_test", "inner_test", "ortho_test", "cabs", "early_stopping",
         "tic_diag", "tic_trace")
GSNR_EPSILON = 1e-5  # Cockpit's stabilising constant of mean_gsnr
EB_EPSILON = 1e-5  # Cockpit's stabilising constant of early_stopping
TIC_EPSILON = 1e-7  # Cockpit's stabilising constant of the TIC


def plain_sgd(optimizer):
    """Whether `optimizer` is SGD without momentum (what CABS and EB assume)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return type(optimizer).__name__ == "SGD" and not getattr(optimizer, "momentum", 0) \
        and not getattr(optimizer, "nesterov", False)


def ggn_diagonal(model, x, y, chunk_size=None):
    """The diagonal of the generalised Gauss-Newton matrix of the batch-mean compiled
    loss, (1/B) Σ_n diag(J_nᵀ H_n J_n) (module docstring), float64 [n_params] in the
    order of `model.trainable_variables` (training=False)."""
    variables = resolve_variables(model)

    def one_example(example):
        xi, yi = [t[None] for t in example]
        with tf.GradientTape(persistent=True) as outer:
            output, head = compat.split_at_logits(model(xi, training=False))
            with tf.GradientTape() as inner:
                inner.watch(output)
                loss = compat.compute_loss(model, xi, yi, head(output), False)
            slope = tf.reshape(inner.gradient(loss, output), [-1])
            flat = tf.reshape(output, [-1])
        k = tf.shape(flat)[0]
        hessian = tf.reshape(outer.jacobian(slope, output), [k, k])
        parts = outer.jacobian(flat, variables,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        jacobian = tf.concat([tf.reshape(p, [k, -1]) for p in parts], axis=1)
        return tf.einsum("cp,cd,dp->p", jacobian, hessian, jacobian)

    @tf.function(reduce_retracing=True)
    def chunk_sum(xs, ys):
        return tf.reduce_sum(tf.vectorized_map(one_example, (xs, ys)), axis=0)[None]

    x, y = np.asarray(x), np.asarray(y)
    sums = in_chunks(chunk_sum, [x, y], chunk_size).numpy().astype(np.float64)
    return sums.sum(axis=0) / len(x)


def statistics(gradients, curvature=None):
    """What every instrument needs of per-example gradients G [B, n_params] (float64):
    B, the batch gradient g, the elementwise sum of squares Σ_n g_n², the projections
    p_n = g_nᵀ g, and the diagonal `curvature` [n_params] if given (for the TIC)."""
    gradients = np.asarray(gradients, dtype=np.float64)
    mean = gradients.mean(axis=0)
    return {"batch_size": len(gradients), "gradient": mean,
            "sum_of_squares": np.square(gradients).sum(axis=0),
            "projections": gradients @ mean, "curvature": curvature}


def from_statistics(stats, loss=None, sgd_learning_rate=None, names=NAMES):
    """{name: value} of the instruments `names` from `statistics(...)`. cabs and
    early_stopping are defined for SGD without momentum only (as in Cockpit): None
    unless its `sgd_learning_rate` is given; cabs needs the batch `loss` too, the TIC
    the statistics' curvature."""
    b, g = stats["batch_size"], stats["gradient"]
    squares, projections = stats["sum_of_squares"], stats["projections"]
    g2 = float(g @ g)
    spread = float(squares.sum()) - b * g2  # Σ_n ‖g_n − g‖²
    values = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if "mean_gsnr" in names:
            values["mean_gsnr"] = float(np.mean(
                g**2 / (squares / b - g**2 + GSNR_EPSILON)))
        if "norm_test" in names:
            values["norm_test"] = float(np.sqrt(spread / (b - 1) / b / g2))
        if "inner_test" in names:
            variance = (float(projections @ projections) - b * g2**2) / (b - 1)
            values["inner_test"] = float(np.sqrt(variance / b / g2**2))
        if "ortho_test" in names:
            variance = (float(squares.sum()) - float(projections @ projections) / g2) / (b - 1)
            values["ortho_test"] = float(np.sqrt(variance / b / g2))
        if "cabs" in names:
            values["cabs"] = None if sgd_learning_rate is None else \
                float(sgd_learning_rate * spread / (b * loss))
        if "early_stopping" in names:
            variance = (squares - b * g**2) / (b - 1)
            values["early_stopping"] = None if sgd_learning_rate is None else \
                float(1 - b * np.mean(g**2 / (variance + EB_EPSILON)))
        curvature = stats.get("curvature")
        if "tic_diag" in names:
            values["tic_diag"] = float(np.sum(squares / b / (curvature + TIC_EPSILON)))
        if "tic_trace" in names:
            values["tic_trace"] = float(squares.sum() / b / (curvature.sum() + TIC_EPSILON))
    return values


def compute(model, x, y, names=None, chunk_size=None):
    """The instruments `names` (default: all of NAMES) at the model's current weights on
    the batch (x, y), with its compiled loss and optimizer: {name: float or None}."""
    names = NAMES if names is None else tuple(names)
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown instrument {unknown[0]!r}; the instruments are "
                         f"{', '.join(NAMES)}")
    gradients = per_example_gradients(model, x, y, chunk_size=chunk_size)
    optimizer = getattr(model, "optimizer", None)
    sgd = optimizer is not None and plain_sgd(optimizer)
    loss = float(loss_function(model)(x, y, False)) if "cabs" in names else None
    curvature = ggn_diagonal(model, x, y, chunk_size) \
        if {"tic_diag", "tic_trace"} & set(names) else None
    return from_statistics(statistics(gradients, curvature), loss,
                           optimizer_learning_rate(optimizer) if sgd else None, names)
