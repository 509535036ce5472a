"""Curvature of the loss: Hessian–vector products, top eigenvalues, trace, spectral density.

All of it is matrix-free: the Hessian H of the batch-mean loss with respect to the
chosen variables is only ever applied to vectors, by `hvp`. With a dataset of
batches, H is the example-weighted mean of the batch Hessians (the Hessian of the
mean loss over the data). The loss is evaluated with `training=False` by default:
dropout and BatchNorm in training mode would make H random and change it between
products, which breaks Lanczos; pass training=True to probe the training-mode loss.

Eigenvalues and traces are in units of loss per parameter squared. Flat vectors
(eigenvectors) concatenate the variables in order, each flattened row-major.
"""

import weakref

import numpy as np
import tensorflow as tf

from optinsight.probes.common import (
    batches,
    flatten,
    layer_name,
    loss_function,
    num_parameters,
    optimizer_learning_rate,
    resolve_variables,
    unflatten,
)

#: The HVP implementation used when `method=None`. On the reference CNN on CPU both
#: cost 2.1 gradients (benchmarks/hessian.py); forward-over-reverse keeps no second
#: tape and so holds less memory.
DEFAULT_METHOD = "forward"
METHODS = ("forward", "reverse")
_ZERO = tf.UnconnectedGradients.ZERO
_COMPILED = weakref.WeakKeyDictionary()  # model -> {key: tf.function}


def _hvp_function(model, variables, loss, method, training):
    """A compiled `f(x, y, vector) -> H·vector` for one batch, cached per model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cache = _COMPILED.setdefault(model, {})
    key = (tuple(id(v) for v in variables), id(loss), method, bool(training))
    if key in cache:
        return cache[key]
    loss_fn = loss_function(model, loss)

    def gradient(x, y, tape):
        with tape:
            value = loss_fn(x, y, training)
        return tape.gradient(value, variables, unconnected_gradients=_ZERO)

    def reverse_over_reverse(x, y, vector):
        with tf.GradientTape() as outer:
            grads = gradient(x, y, tf.GradientTape())
            dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
        return outer.gradient(dot, variables, unconnected_gradients=_ZERO)

    def forward_over_reverse(x, y, vector):
        with tf.autodiff.ForwardAccumulator(
                primals=[getattr(v, "value", v) for v in variables], tangents=list(vector)) as acc:
            grads = gradient(x, y, tf.GradientTape())
        return [acc.jvp(g, unconnected_gradients=_ZERO) for g in grads]

    fn = forward_over_reverse if method == "forward" else reverse_over_reverse
    cache[key] = tf.function(fn, reduce_retracing=True)
    return cache[key]


class HessianOperator:
    """H as a linear map on flat float64 vectors, over one batch or a whole dataset."""

    def __init__(self, model, x, y=None, loss=None, variables=None, method=None,
                 training=False):
        self.variables = resolve_variables(model, variables)
        self.size = num_parameters(self.variables)
        self.data = batches(x, y)
        self.total = sum(n for _, _, n in self.data)
        self._fn = _hvp_function(model, self.variables, loss, method or DEFAULT_METHOD,
                                 training)
        self.products = 0  # HVPs computed, each over all the data

    def matvec_tensors(self, vector):
        out = None
        for bx, by, n in self.data:
            part = self._fn(bx, by, vector)
            weighted = [p * (n / self.total) for p in part]
            out = weighted if out is None else [a + b for a, b in zip(out, weighted)]
        self.products += 1
        return out

    def __call__(self, vector):
        return flatten(self.matvec_tensors(unflatten(vector, self.variables)))


def hvp(model, x, y, vector, loss=None, variables=None, method=None, training=False):
    """Hessian–vector product H·v of the batch-mean loss.

    Args:
        vector: a flat vector of all the variables' entries, or a list of arrays
            shaped like `variables`.
        method: "forward" (forward-over-reverse) or "reverse" (double backward);
            None picks DEFAULT_METHOD. Both are exact.
    Returns:
        numpy: flat if `vector` was flat, else a list shaped like `variables`.
    """
    op = HessianOperator(model, x, y, loss, variables, method, training)
    if isinstance(vector, (list, tuple)):
        if len(vector) != len(op.variables):
            raise ValueError(f"vector has {len(vector)} parts; there are "
                             f"{len(op.variables)} variables")
        tensors = [tf.cast(tf.reshape(v, w.shape), w.dtype)
                   for v, w in zip(vector, op.variables)]
        return [np.asarray(t) for t in op.matvec_tensors(tensors)]
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.size != op.size:
        raise ValueError(f"vector has {vector.size} entries; the variables have {op.size}")
    return op(vector)


def lanczos(matvec, size, steps, start, tol=0.0, k=1):
    """Lanczos tridiagonalisation with full reorthogonalisation (float64).

    Stops after `steps` steps, when the Krylov space is exhausted, or once the top-k
    Ritz pairs have residuals ‖H y − θ y‖ = β|s_last| <= tol·|θ| (tol > 0).
    Returns (alphas, betas, Q) with Q the [m, size] orthonormal Lanczos basis.
    """
    q = start / np.linalg.norm(start)
    basis, alphas, betas = [q], [], []
    for j in range(min(steps, size)):
        w = matvec(basis[j])
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        Q = np.array(basis)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - Q.T @ (Q @ w)
        beta = float(np.linalg.norm(w))
        if tol > 0 and j + 1 >= k:
            theta, s = np.linalg.eigh(_tridiagonal(alphas, betas))
            top = np.argsort(theta)[::-1][:k]
            if np.all(beta * np.abs(s[-1, top]) <= tol * np.maximum(np.abs(theta[top]), 1e-30)):
                break
        if beta <= 1e-10 * max(abs(alpha), 1.0):  # invariant subspace found
            break
        betas.append(beta)
        basis.append(w / beta)
    return np.array(alphas), np.array(betas[:len(alphas) - 1]), np.array(basis[:len(alphas)])


def _tridiagonal(alphas, betas):
    t = np.diag(alphas)
    off = np.asarray(betas[:len(alphas) - 1])
    return t + np.diag(off, 1) + np.diag(off, -1)


def _power(matvec, size, k, max_iter, tol, rng):
    """Largest-magnitude eigenpairs by power iteration with deflation."""
    values, vectors = [], []
    for _ in range(k):
        v = rng.standard_normal(size)
        v /= np.linalg.norm(v)
        value = None
        for _ in range(max_iter):
            w = matvec(v) - sum(lam * (u @ v) * u for lam, u in zip(values, vectors))
            new = float(v @ w)
            norm = np.linalg.norm(w)
            if norm == 0:
                break
            v = w / norm
            if value is not None and abs(new - value) <= tol * abs(new):
                value = new
                break
            value = new
        values.append(value if value is not None else 0.0)
        vectors.append(v)
    order = np.argsort(values)[::-1]
    return np.array(values)[order], np.array(vectors)[order]


def top_eigenvalues(model, x, y=None, k=1, method="lanczos", max_iter=100, tol=1e-3, seed=0,
                    loss=None, variables=None, return_vectors=False, hvp_method=None,
                    training=False):
    """The k largest eigenvalues of H, descending.

    method="lanczos" (default): Lanczos with full reorthogonalisation, stopping once
    every top-k Ritz pair has residual <= tol·|θ| (an eigenvalue error of at most that,
    usually far less). method="power": power iteration with deflation, each stopping at
    a relative change below tol; it finds the eigenvalues of largest magnitude, which
    are the largest ones unless H has a more negative eigenvalue.

    Returns eigenvalues [k], or (eigenvalues, eigenvectors [k, n_params]) with
    return_vectors.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    op = HessianOperator(model, x, y, loss, variables, hvp_method, training)
    if k > op.size:
        raise ValueError(f"k={k} exceeds the {op.size} parameters")
    rng = np.random.default_rng(seed)
    if method == "power":
        values, vectors = _power(op, op.size, k, max_iter, tol, rng)
    elif method == "lanczos":
        alphas, betas, basis = lanczos(op, op.size, max(max_iter, k),
                                       rng.standard_normal(op.size), tol, k)
        theta, s = np.linalg.eigh(_tridiagonal(alphas, betas))
        top = np.argsort(theta)[::-1][:k]
        values, vectors = theta[top], (basis.T @ s[:, top]).T
    else:
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    return (values, vectors) if return_vectors else values


def trace(model, x, y=None, samples=100, seed=0, loss=None, variables=None, hvp_method=None,
          training=False):
    """Hutchinson's estimate of tr(H) with Rademacher vectors: (estimate, standard error)."""
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    op = HessianOperator(model, x, y, loss, variables, hvp_method, training)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        z = rng.choice([-1.0, 1.0], size=op.size)
        draws.append(float(z @ op(z)))
    draws = np.array(draws)
    return float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(samples))


def density(model, x, y=None, steps=30, samples=8, grid=None, sigma=None, seed=0, loss=None,
            variables=None, hvp_method=None, training=False):
    """Spectral density of H by stochastic Lanczos quadrature, Gaussian-smoothed.

    Each of `samples` Lanczos runs of `steps` steps from a random unit vector gives
    nodes θ_i (Ritz values) and weights τ_i (squared first components of the Ritz
    vectors, summing to 1); the density is the mean over runs of Σ τ_i N(t; θ_i, σ²).
    Default sigma: 1 % of the node range; default grid: 1,000 points spanning the nodes
    ± 6σ, so the density integrates to 1. Returns (grid, density), both numpy.
    """
    op = HessianOperator(model, x, y, loss, variables, hvp_method, training)
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for _ in range(samples):
        alphas, betas, _ = lanczos(op, op.size, steps, rng.standard_normal(op.size))
        theta, s = np.linalg.eigh(_tridiagonal(alphas, betas))
        nodes.append(theta)
        weights.append(s[0] ** 2 / samples)
    nodes, weights = np.concatenate(nodes), np.concatenate(weights)
    if sigma is None:
        spread = float(nodes.max() - nodes.min())
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(abs(float(nodes.max())), 1.0)
    if grid is None:
        grid = np.linspace(nodes.min() - 6 * sigma, nodes.max() + 6 * sigma, 1000)
    grid = np.asarray(grid, dtype=np.float64)
    gauss = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)
    return grid, (gauss / (sigma * np.sqrt(2 * np.pi))) @ weights


def learning_rate(model):
    """The model's optimizer's current learning rate as a float."""
    return optimizer_learning_rate(model.optimizer)


class HessianProbe:
    """Curvature for the callback: λ1..λk, trace, per-layer λmax, lr·λmax.

    Writes `lambda_1`..`lambda_k`, `trace` and `trace_stderr` (with trace_samples),
    `lambda_max/<layer>` (with per_layer), `lr_times_lambda_max` (the stability
    limit of plain gradient descent is 2), the optimizer's own `sharpness`,
    `stability_limit` and `stability_ratio` (`probes.stability`), and the arrays
    `density_grid`, `density` (with density=True; density_steps Lanczos steps from
    each of density_samples vectors).
    Cost, in HVPs over the probe batch: about 10 per eigenvalue and per layer at the
    default tol, trace_samples, and density_steps × density_samples.
    """

    def __init__(self, every="epoch", k=1, trace_samples=0, density=False, per_layer=True,
                 max_iter=100, tol=1e-3, seed=0, density_steps=30, density_samples=8,
                 name="hessian"):
        self.every, self.k, self.trace_samples = every, k, trace_samples
        self.density, self.per_layer = density, per_layer
        self.density_steps, self.density_samples = density_steps, density_samples
        self.max_iter, self.tol, self.seed, self.name = max_iter, tol, seed, name

    def __call__(self, model, x, y):
        values = top_eigenvalues(model, x, y, k=self.k, max_iter=self.max_iter,
                                 tol=self.tol, seed=self.seed)
        out = {f"lambda_{i + 1}": float(v) for i, v in enumerate(values)}
        if model.optimizer is not None:
            from optinsight.probes.stability import sharpness

            out["lr_times_lambda_max"] = learning_rate(model) * float(values[0])
            out.update(sharpness(model, x, y, max_iter=self.max_iter, tol=self.tol,
                                 seed=self.seed, plain=values[0]))
        if self.trace_samples:
            out["trace"], out["trace_stderr"] = trace(model, x, y, self.trace_samples,
                                                      seed=self.seed)
        if self.per_layer:
            layers = {}
            for v in model.trainable_variables:
                layers.setdefault(layer_name(v), []).append(v)
            for layer, variables in layers.items():
                out[f"lambda_max/{layer}"] = float(top_eigenvalues(
                    model, x, y, k=1, max_iter=self.max_iter, tol=self.tol, seed=self.seed,
                    variables=variables)[0])
        if self.density:
            out["density_grid"], out["density"] = density(
                model, x, y, steps=self.density_steps, samples=self.density_samples,
                seed=self.seed)
        return out
