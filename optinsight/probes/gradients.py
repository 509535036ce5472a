"""Per-example gradient statistics: the spectrum of the gradient covariance and the
gradient noise scale.

Per-example gradients g_i of the loss are computed vectorised (one backward pass per
example, batched), in chunks of `chunk_size` examples; G is their [n, n_params]
matrix. The covariance Σ = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ is never formed: its
nonzero eigenvalues are those of the n×n matrix (1/n) G_c G_cᵀ of centred gradients.
"""

import numpy as np

from optinsight.probes.common import (
    in_chunks,
    loss_function,
    per_example_jacobian,
    resolve_variables,
)


def per_example_gradients(model, x, y, loss=None, variables=None, chunk_size=None):
    """Gradient of each example's loss: numpy [n, n_params] (training=False)."""
    variables = resolve_variables(model, variables)
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must match")
    if len(x) < 2:
        raise ValueError(f"gradient statistics need at least 2 examples, got {len(x)}")
    loss_fn = loss_function(model, loss)
    fn = per_example_jacobian(model, variables, lambda xi, yi: loss_fn(xi, yi, False),
                              ("loss", id(loss)))
    return in_chunks(fn, [x, y], chunk_size)[:, 0, :].astype(np.float64)


def _covariance_eigenvalues(g):
    """Eigenvalues of Σ = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ, descending, via the n×n Gram."""
    centred = g - g.mean(axis=0)
    return np.linalg.eigvalsh(centred @ centred.T / len(g))[::-1]


def _noise_scale(g):
    """tr Σ̂ / (‖ḡ‖² − tr Σ̂ / n), Σ̂ the sample covariance (1/(n−1)) of the rows of g:
    the denominator is the unbiased estimate of ‖G‖² (E‖ḡ‖² = ‖G‖² + tr Σ / n). NaN
    when that estimate is not positive (the batch's noise hides the mean gradient)."""
    n, mean = len(g), g.mean(axis=0)
    trace = ((g - mean) ** 2).sum() / (n - 1)
    signal = mean @ mean - trace / n
    return float(trace / signal) if signal > 0 else float("nan")


def covariance_spectrum(model, x, y, k=10, loss=None, variables=None, chunk_size=None):
    """Top-k eigenvalues (descending) of the per-example gradient covariance Σ."""
    g = per_example_gradients(model, x, y, loss, variables, chunk_size)
    return _covariance_eigenvalues(g)[:k]


def noise_scale(model, x, y, loss=None, variables=None, chunk_size=None):
    """The simple gradient noise scale B = tr(Σ) / ‖G‖² (McCandlish et al. 2018): the
    batch size beyond which larger batches stop speeding training up. Estimated from
    the per-example gradients of one batch of n: tr Σ̂ with Σ̂ their sample covariance
    (1/(n−1)), and ‖G‖² as ‖ḡ‖² − tr Σ̂ / n, the unbiased form (‖ḡ‖² alone carries
    tr Σ / n of noise and would bias B downwards, towards n). NaN when the estimate of
    ‖G‖² is not positive."""
    return _noise_scale(per_example_gradients(model, x, y, loss, variables, chunk_size))


class GradientNoiseProbe:
    """Writes `noise_scale`, `covariance_trace` (tr Σ, 1/n) and `cov_eig_1..k`."""

    def __init__(self, every="epoch", k=5, chunk_size=64, name="gradient_noise"):
        self.every, self.k, self.chunk_size, self.name = every, k, chunk_size, name

    def __call__(self, model, x, y):
        g = per_example_gradients(model, x, y, chunk_size=self.chunk_size)
        values = _covariance_eigenvalues(g)
        out = {f"cov_eig_{i + 1}": float(v) for i, v in enumerate(values[: self.k])}
        out["covariance_trace"] = float(values.sum())
        out["noise_scale"] = _noise_scale(g)
        return out
