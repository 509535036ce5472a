"""Matrix-free solvers for symmetric maps given only `matvec(vector) -> vector` (flat
tensors): Lanczos, the top eigenpairs by thick-restart Lanczos, power iteration, the
orthogonalisation and combination of bases, and the spectral density by stochastic
Lanczos quadrature. They know nothing of models: `hvp.HessianOperator` is one such
map, and `stability` builds preconditioned ones.
"""

import functools
import time

import numpy as np
import tensorflow as tf

from optinsight.probes import common


def _unit(vector):
    return vector / tf.norm(vector)


def lanczos(matvec, start, steps, full_reorthogonalization=False):
    """`steps` Lanczos steps from `start` (a flat tensor): the tridiagonal (alphas,
    betas) as float64 numpy, fewer when the Krylov space is exhausted.

    Each new vector is orthogonalised twice against the previous two (memory: three
    vectors), so after an eigenvalue converges copies of it can appear among the Ritz
    values; Gauss quadrature over the tridiagonal (stochastic Lanczos quadrature)
    stays accurate regardless (Golub & Meurant, "Matrices, Moments and Quadrature
    with Applications", 2010, ch. 4). With `full_reorthogonalization`, against every
    earlier vector instead (memory: `steps` vectors).
    """
    q, alphas, betas = _unit(start), [], []
    kept = [q]  # the vectors each new one is orthogonalised against
    for _ in range(steps):
        w = matvec(q)
        alpha = float(tf.tensordot(w, q, 1))
        alphas.append(alpha)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            for u in kept:
                w = w - tf.tensordot(w, u, 1) * u
        beta = float(tf.norm(w))
        if beta <= 1e-10 * max(abs(alpha), 1.0) or len(alphas) == steps:
            break
        betas.append(beta)
        q = w / beta
        kept = kept + [q] if full_reorthogonalization else [kept[-1], q]
    return np.array(alphas), np.array(betas)


def _tridiagonal(alphas, betas):
    t = np.diag(alphas)
    off = np.asarray(betas[:len(alphas) - 1])
    return t + np.diag(off, 1) + np.diag(off, -1)


def top_eigenpairs(matvec, start, k, max_products, tol, basis_size=None, deadline=None):
    """The k largest eigenpairs of a symmetric map by thick-restart Lanczos
    (Wu & Simon, SIAM J. Matrix Anal. Appl. 22, 2000).

    Keeps at most `basis_size` (default k + 8; k + 6 from `common.LARGE` entries, where the
    basis is most of the memory) orthonormal vectors in `start`'s dtype,
    each new one orthogonalised twice against all of them. When the basis is full it
    restarts from its best Ritz vectors (the top k and about half the rest) and the
    residual. Stops once every top-k Ritz pair has residual ‖A y − θ y‖ <= tol·|θ|
    (tol > 0; an eigenvalue error of at most that, usually far less), after
    `max_products` products, when another step would end past `deadline` (in
    `time.monotonic()` seconds, judged by the last one; after k + 1 products at least),
    or when the Krylov space is exhausted.

    Returns (values [k] descending float64 numpy, vectors [k, size] tensor, products,
    relative residuals [k]: ‖A y − θ y‖ / |θ|, the accuracy reached). Ritz values
    never exceed the largest eigenvalue, and each is within its residual of one.
    Memory: basis_size + 2 vectors the size of `start` (below 4 M entries, a stacked
    copy of the basis besides); while restarting, also the kept Ritz vectors
    (max(k, (basis_size + k) // 2 - 1)).
    """
    size = int(start.shape[0])
    m = max(min(basis_size or k + (6 if size >= common.LARGE else 8), size), k + 1)
    orthogonalise, combine = _XLA if size >= _COMPILE_FROM else _GRAPH
    basis = [_unit(start)]
    projected = np.zeros((m, m))  # basisᵀ A basis
    products = 0
    while True:
        j = len(basis) - 1
        began = time.monotonic()
        w = matvec(basis[j])
        products += 1
        w, coefficients, beta = orthogonalise(w, basis)
        projected[: j + 1, j] = projected[j, : j + 1] = np.asarray(coefficients, np.float64)
        beta = float(beta)
        n = j + 1
        theta, s = np.linalg.eigh(projected[:n, :n])
        order = np.argsort(theta)[::-1]
        top = order[:k]
        residuals = beta * np.abs(s[n - 1, top])
        relative = residuals / np.maximum(np.abs(theta[top]), 1e-30)
        last = time.monotonic() - began  # the next step is expected to take as long
        if (n >= k and tol > 0 and np.all(relative <= tol)) or products >= max_products \
                or beta <= 1e-10 * max(np.abs(theta).max(), 1.0) \
                or (deadline is not None and products > k
                    and time.monotonic() + last > deadline):
            break
        if n == m:  # thick restart: keep the best Ritz vectors, continue from the residual
            keep = order[: max(k, (m + k) // 2 - 1)]
            basis = combine(basis, s[:, keep])
            projected[:] = 0  # the next product fills row and column j, couplings included
            projected[np.arange(len(keep)), np.arange(len(keep))] = theta[keep]
        w /= beta  # no copy of it held through the next product
        basis.append(w)
    return theta[top], tf.stack(combine(basis, s[:, top])), products, relative


def _orthogonalise(w, basis):
    """(w without its components along the orthonormal vectors of `basis`, those
    components [len(basis)], the norm of what is left): classical Gram–Schmidt twice
    (Kahan–Parlett), one vector at a time (for XLA, which fuses each sweep into one
    pass over memory)."""
    total = 0
    for _ in range(2):
        coefficients = [tf.tensordot(w, u, 1) for u in basis]
        for c, u in zip(coefficients, basis):
            w -= c * u
        total += tf.stack(coefficients)
    return w, total, tf.norm(w)


def _orthogonalise_stacked(w, stacked):
    """`_orthogonalise` against the rows of `stacked` [n, size], by two matrix products
    per sweep (2x faster without XLA; the stacked copy costs n vectors)."""
    total = 0
    for _ in range(2):
        coefficients = tf.reshape(tf.matmul(stacked, tf.reshape(w, [-1, 1])), [-1])
        w -= tf.reshape(tf.matmul(tf.reshape(coefficients, [1, -1]), stacked), [-1])
        total += coefficients
    return w, total, tf.norm(w)


def _combine(vectors, weights):
    """Σ_i weights[i]·vectors[i], one vector at a time."""
    out = tf.zeros_like(vectors[0])
    for i, vector in enumerate(vectors):
        out += tf.cast(weights[i], out.dtype) * vector
    return out


def _combine_stacked(stacked, weights):
    """weightsᵀ · stacked: [c, size] combinations of a stacked [n, size] basis by the
    columns of weights [n, c]."""
    return tf.matmul(tf.cast(weights, stacked.dtype), stacked, transpose_a=True)


#: Vectors from this size on are orthogonalised and combined by XLA one at a time, in
#: one pass over memory per sweep (3x faster than op by op at 23.6 M entries, and no
#: stacked copy of the basis); smaller ones by matrix products over a stacked copy
#: (XLA's compiling once per basis length costs ~0.1-0.3 s, more than it saves there).
_COMPILE_FROM = 1 << 22


@functools.lru_cache(maxsize=None)
def _compiled(fn, length):
    """`fn` compiled by XLA for bases of `length` vectors: one function per length, so
    each is traced once (XLA needs a basis length's shapes anyway) and TensorFlow does
    not warn of retracing."""
    return tf.function(fn, jit_compile=True)


def _xla_orthogonalise(w, basis):
    return _compiled(_orthogonalise, len(basis))(w, basis)


def _xla_combine(vectors, weights):
    """One vector per column of weights [n, c]: Σ_i weights[i, j]·vectors[i]."""
    fn = _compiled(_combine, len(vectors))
    return [fn(vectors, weights[:, j]) for j in range(weights.shape[1])]


# Below _COMPILE_FROM the basis enters as one stacked tensor whose length is a dynamic
# dimension: traced once or twice in all, whatever the basis length or vector size.
_orthogonalise_graph = tf.function(_orthogonalise_stacked, reduce_retracing=True)
_combine_graph = tf.function(_combine_stacked, reduce_retracing=True)
_XLA = (_xla_orthogonalise, _xla_combine)
_GRAPH = (lambda w, basis: _orthogonalise_graph(w, tf.stack(basis)),
          lambda vectors, weights: tf.unstack(_combine_graph(tf.stack(vectors), weights)))


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


def slq_density(matvec, start, samples, steps, grid=None, sigma=None,
                full_reorthogonalization=False):
    """Spectral density of a symmetric map by stochastic Lanczos quadrature: the mean
    over `samples` Lanczos runs of `steps` steps, each from a vector `start()` returns,
    of Σ τ_i N(t; θ_i, σ²) (see `hessian.density`). Returns (grid, density), numpy."""
    nodes, weights = [], []
    for _ in range(samples):
        alphas, betas = lanczos(matvec, start(), steps, full_reorthogonalization)
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
