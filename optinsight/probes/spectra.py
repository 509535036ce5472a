"""Weight spectra: the eigenvalues of W Wᵀ per kernel and what they say.

A kernel is read as a matrix W of shape (fan-in, fan-out): dense kernels as they
are, conv kernels (kh, kw, in, out) reshaped to (kh·kw·in, out). The eigenvalues of
W Wᵀ are the squared singular values σ_i² of W: there are min(fan-in, fan-out) of
them (the other eigenvalues of the larger Gram matrix are zero by construction and
left out), computed by SVD for accuracy.
"""

import numpy as np

from optinsight.probes import base
from optinsight.probes.common import kernels, variable_name


def as_matrix(kernel):
    """A kernel as (fan-in, fan-out): the last axis is the output."""
    w = np.asarray(kernel, dtype=np.float64)
    return w.reshape(-1, w.shape[-1])


def power_law_alpha(eigenvalues, min_tail=5):
    """Exponent α of a power-law tail p(λ) ∝ λ^-α of the eigenvalues.

    Maximum likelihood for each candidate lower bound xmin (every eigenvalue leaving
    at least `min_tail` in the tail), α = 1 + n / Σ ln(λ_i / xmin), keeping the xmin
    whose fit has the smallest Kolmogorov–Smirnov distance to the tail (Clauset,
    Shalizi & Newman 2009; the heavy-tailed self-regularisation method). The distance
    is WeightWatcher's (through the powerlaw package, after Clauset's plfit): the
    model CDF against the empirical CDF i/n at the sorted values, one side of each
    step, so that the README's bands (2–4 well trained, > 6 under-trained) apply.
    NaN when fewer than `min_tail` positive eigenvalues.
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    values = values[values > 0]
    best_alpha, best_distance = np.nan, np.inf
    for i in range(len(values) - min_tail + 1):
        tail = values[i:]
        xmin = tail[0]
        logs = np.log(tail / xmin).sum()
        if logs <= 0:
            continue
        alpha = 1 + len(tail) / logs
        model_cdf = 1 - (tail / xmin) ** (1 - alpha)
        empirical = np.arange(len(tail)) / len(tail)  # as Clauset's plfit and powerlaw
        distance = np.abs(model_cdf - empirical).max()
        if distance < best_distance:
            best_alpha, best_distance = alpha, distance
    return float(best_alpha)


def matrix_spectrum(w, near_zero_tol=1e-3):
    """Spectral summary of one (fan-in, fan-out) matrix; see weight_spectrum."""
    sigma = np.linalg.svd(w, compute_uv=False)
    eigenvalues = np.sort(sigma ** 2)[::-1]
    largest = eigenvalues[0]
    return {
        base.EIGENVALUES: eigenvalues,
        "spectral_norm": float(sigma.max()),
        "condition_number": float(sigma.max() / sigma.min()) if sigma.min() > 0 else np.inf,
        "near_zero": int(np.sum(eigenvalues <= near_zero_tol * largest)),
        base.NEAR_ZERO_FRACTION: float(np.mean(eigenvalues <= near_zero_tol * largest)),
        base.STABLE_RANK: float(eigenvalues.sum() / largest) if largest > 0 else 0.0,
        "alpha": power_law_alpha(eigenvalues),
    }


def weight_spectrum(model, near_zero_tol=1e-3):
    """Per kernel: {eigenvalues (of W Wᵀ, descending), spectral_norm (σ_max),
    condition_number (σ_max / σ_min), near_zero (eigenvalues <= near_zero_tol × the
    largest: directions the layer has all but lost, a sign of rank collapse),
    near_zero_fraction (near_zero over the number of eigenvalues),
    stable_rank (Σλ / λ_max = ‖W‖_F² / ‖W‖_2²), alpha (power-law tail exponent of
    the eigenvalues; heavy-tailed theory reads 2-4 as well trained, > 6 as
    under-trained)}."""
    return {variable_name(v): matrix_spectrum(as_matrix(v), near_zero_tol)
            for v in kernels(model)}


class WeightSpectrumProbe:
    """Writes `<kernel>/spectral_norm`, `condition_number`, `near_zero`,
    `near_zero_fraction`, `stable_rank`, `alpha`, and the array `<kernel>/eigenvalues`."""

    kind = base.WEIGHT_SPECTRUM

    def __init__(self, every="epoch", near_zero_tol=1e-3, name="weight_spectrum"):
        self.every, self.near_zero_tol, self.name = every, near_zero_tol, name

    def __call__(self, model, x, y):
        out = {}
        for path, summary in weight_spectrum(model, self.near_zero_tol).items():
            out.update({f"{path}/{k}": v for k, v in summary.items()})
        return out
