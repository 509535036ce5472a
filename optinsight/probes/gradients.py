"""Per-example gradient statistics: the spectrum of the gradient covariance and the
gradient noise scale.

Per-example gradients g_i of the loss are computed vectorised (one backward pass per
example, batched), in chunks of `chunk_size` examples; G is their [n, n_params]
matrix. Everything here needs only their n×n Gram matrix K = G Gᵀ, summed over
groups of variables (`common.jacobian_gram`: at most `max_bytes` of gradients held at
once), so neither G nor the covariance Σ = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ is formed:
the nonzero eigenvalues of Σ are those of (1/n) C K C, C = I − 11ᵀ/n the centring.
"""

import numpy as np

from optinsight.probes.common import (
    MAX_JACOBIAN_BYTES,
    in_chunks,
    jacobian_gram,
    loss_function,
    nearest_outputs,
    num_parameters,
    per_example_jacobian,
    resolve_variables,
)


def _checked(model, x, y, loss, variables):
    variables = resolve_variables(model, variables)
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must match")
    if len(x) < 2:
        raise ValueError(f"gradient statistics need at least 2 examples, got {len(x)}")
    loss_fn = loss_function(model, loss)
    return variables, x, y, (lambda xi, yi: loss_fn(xi, yi, False)), ("loss", id(loss))


def per_example_gradients(model, x, y, loss=None, variables=None, chunk_size=None):
    """Gradient of each example's loss: numpy [n, n_params] (training=False).
    Memory: all of it at once, n × n_params × 8 bytes."""
    variables, x, y, outputs, key = _checked(model, x, y, loss, variables)
    fn = per_example_jacobian(model, variables, outputs, key)
    return in_chunks(fn, [x, y], chunk_size)[:, 0, :].numpy().astype(np.float64)


def gradient_gram(model, x, y, loss=None, variables=None, chunk_size=None,
                  max_bytes=MAX_JACOBIAN_BYTES):
    """K = G Gᵀ, the [n, n] float64 inner products of the per-example gradients."""
    variables, x, y, outputs, key = _checked(model, x, y, loss, variables)
    return jacobian_gram(model, variables, outputs, key, [x, y], None, chunk_size, max_bytes)


def _centred(gram):
    n = len(gram)
    centring = np.eye(n) - 1 / n
    return centring @ gram @ centring


def _covariance_eigenvalues(gram):
    """Eigenvalues of Σ = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ, descending, from K = G Gᵀ."""
    return np.linalg.eigvalsh(_centred(gram) / len(gram))[::-1]


def _noise_scale(gram):
    """tr Σ̂ / (‖ḡ‖² − tr Σ̂ / n) from K = G Gᵀ, Σ̂ the sample covariance (1/(n−1)) of the
    gradients: the denominator is the unbiased estimate of ‖G‖² (E‖ḡ‖² = ‖G‖² +
    tr Σ / n). NaN when that estimate is not positive (the batch's noise hides the
    mean gradient)."""
    n = len(gram)
    trace = np.trace(_centred(gram)) / (n - 1)
    signal = gram.sum() / n ** 2 - trace / n  # ‖ḡ‖² = 1ᵀK1 / n²
    return float(trace / signal) if signal > 0 else float("nan")


def covariance_spectrum(model, x, y, k=10, loss=None, variables=None, chunk_size=None,
                        max_bytes=MAX_JACOBIAN_BYTES):
    """Top-k eigenvalues (descending) of the per-example gradient covariance Σ."""
    gram = gradient_gram(model, x, y, loss, variables, chunk_size, max_bytes)
    return _covariance_eigenvalues(gram)[:k]


def noise_scale(model, x, y, loss=None, variables=None, chunk_size=None,
                max_bytes=MAX_JACOBIAN_BYTES):
    """The simple gradient noise scale B = tr(Σ) / ‖G‖² (McCandlish et al. 2018): the
    batch size beyond which larger batches stop speeding training up. Estimated from
    the per-example gradients of one batch of n: tr Σ̂ with Σ̂ their sample covariance
    (1/(n−1)), and ‖G‖² as ‖ḡ‖² − tr Σ̂ / n, the unbiased form (‖ḡ‖² alone carries
    tr Σ / n of noise and would bias B downwards, towards n). NaN when the estimate of
    ‖G‖² is not positive."""
    return _noise_scale(gradient_gram(model, x, y, loss, variables, chunk_size, max_bytes))


class GradientNoiseProbe:
    """Writes `noise_scale`, `covariance_trace` (tr Σ, 1/n), `cov_eig_1..k`, and
    `parameters`, how many parameters the gradients cover.

    Bounded work: the per-example gradients are those of the variables nearest the
    outputs holding at most `max_parameters` (default 2 M; None for all), so on a
    large model these are the statistics of its last layers' gradients (the
    reference CNN is covered whole; a ResNet50 by its classifier and last
    convolution), and the backward pass stops there.
    """

    kind = "gradient_noise"

    def __init__(self, every="epoch", k=5, chunk_size=64, max_parameters=2_000_000,
                 max_bytes=MAX_JACOBIAN_BYTES, name="gradient_noise"):
        self.every, self.k, self.chunk_size, self.name = every, k, chunk_size, name
        self.max_parameters, self.max_bytes = max_parameters, max_bytes

    def __call__(self, model, x, y):
        variables = nearest_outputs(model.trainable_variables, self.max_parameters)
        gram = gradient_gram(model, x, y, variables=variables, chunk_size=self.chunk_size,
                             max_bytes=self.max_bytes)
        values = _covariance_eigenvalues(gram)
        out = {f"cov_eig_{i + 1}": float(v) for i, v in enumerate(values[: self.k])}
        out["covariance_trace"] = float(values.sum())
        out["noise_scale"] = _noise_scale(gram)
        out["parameters"] = num_parameters(variables)
        return out
