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

import sys
import time

import numpy as np
import tensorflow as tf

from optinsight.probes import base
from optinsight.probes.common import (
    layer_name,
    num_examples,
    optimizer_learning_rate,
)
from optinsight.probes.hvp import HessianOperator
from optinsight.probes.krylov import _power, slq_density, top_eigenpairs
from optinsight.probes.stability import preconditioned, stability_summary


def hvp(model, x, y, vector, loss=None, variables=None, method=None, training=False):
    """Hessian–vector product H·v of the batch-mean loss.

    Args:
        vector: a flat vector of all the variables' entries, or a list of arrays
            shaped like `variables`.
        method: "forward" (forward-over-reverse) or "reverse" (double backward);
            None picks `hvp.default_method`. Both are exact.
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


def top_eigenvalues(model, x, y=None, k=1, method="lanczos", max_iter=100, tol=1e-3, seed=0,
                    loss=None, variables=None, return_vectors=False, hvp_method=None,
                    training=False, start=None, basis_size=None):
    """The k largest eigenvalues of H, descending.

    method="lanczos" (default): thick-restart Lanczos (`top_eigenpairs`) with a basis
    of `basis_size` vectors (default k + 8, k + 6 from 4 M parameters) in the variables'
    dtype, at most `max_iter` HVPs, stopping once every top-k Ritz pair has residual
    <= tol·|θ| (an eigenvalue error of at most that, usually far less). `start`: a flat
    vector to start from (e.g. the previous evaluation's top eigenvector), else random.
    method="power": power iteration with deflation, each stopping at a relative
    change below tol; it finds the eigenvalues of largest magnitude, which are the
    largest ones unless H has a more negative eigenvalue.

    Returns eigenvalues [k], or (eigenvalues, eigenvectors [k, n_params] numpy) with
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
        values, vectors, _, _ = top_eigenpairs(op.matvec, _start(op, start, rng), k,
                                               max(max_iter, k), tol, basis_size)
        vectors = np.asarray(vectors)
    else:
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    return (values, vectors) if return_vectors else values


def _start(op, start, rng):
    """`start` as a flat tensor in op's dtype, or a random one when None."""
    if start is None:
        return op.random(rng)
    start = tf.reshape(tf.cast(start, op.dtype), [-1])
    if start.shape[0] != op.size:
        raise ValueError(f"start has {start.shape[0]} entries; the variables have {op.size}")
    return start


def trace(model, x, y=None, samples=100, seed=0, loss=None, variables=None, hvp_method=None,
          training=False):
    """Hutchinson's estimate of tr(H) with Rademacher vectors: (estimate, standard error)."""
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    op = HessianOperator(model, x, y, loss, variables, hvp_method, training)
    return _trace(op, samples, np.random.default_rng(seed))


def _trace(op, samples, rng):
    draws = []
    for _ in range(samples):
        z = op.random(rng, rademacher=True)
        draws.append(float(tf.tensordot(z, op.matvec(z), 1)))
    draws = np.array(draws)
    return float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(samples))


def density(model, x, y=None, steps=30, samples=8, grid=None, sigma=None, seed=0, loss=None,
            variables=None, hvp_method=None, training=False, full_reorthogonalization=False):
    """Spectral density of H by stochastic Lanczos quadrature, Gaussian-smoothed.

    Each of `samples` Lanczos runs of `steps` steps from a random unit vector gives
    nodes θ_i (Ritz values) and weights τ_i (squared first components of the Ritz
    vectors, summing to 1); the density is the mean over runs of Σ τ_i N(t; θ_i, σ²).
    Memory: three vectors of the parameters' size (`lanczos`), `steps` of them with
    full_reorthogonalization. Default sigma: 1 % of the node range; default grid:
    1,000 points spanning the nodes ± 6σ, so the density integrates to 1. Returns
    (grid, density), both numpy.
    """
    op = HessianOperator(model, x, y, loss, variables, hvp_method, training)
    rng = np.random.default_rng(seed)
    return slq_density(op.matvec, lambda: op.random(rng), samples, steps, grid, sigma,
                       full_reorthogonalization)


#: max_examples="auto": the products λ and the sharpness should fit in the time budget
#: (each takes about 13 from a random start at the default tol, 5 warm-started), and
#: the examples the first product is timed on.
_AUTO_PRODUCTS = 25
_AUTO_FROM = 8


def _first(a, n):
    """The first n examples of an array or a nest of arrays."""
    return tf.nest.map_structure(lambda t: t[:n], a)


def learning_rate(model):
    """The model's optimizer's current learning rate as a float."""
    return optimizer_learning_rate(model.optimizer)


class HessianProbe:
    """Curvature for the callback: λ1..λk, trace, per-layer λmax, lr·λmax.

    Writes `lambda_1`..`lambda_k`, `trace` and `trace_stderr` (with trace_samples),
    `lambda_max/<layer>` (with per_layer), `lr_times_lambda_max` (the stability
    limit of plain gradient descent is 2), the optimizer's own `sharpness`,
    `stability_limit` and `stability_ratio` (`probes.stability`), `hvps` (the
    Hessian–vector products this evaluation took), `hessian_examples` (see
    max_examples), and the arrays `density_grid`,
    `density` (with density=True; density_steps Lanczos steps from each of
    density_samples vectors).

    Each Lanczos run starts from the previous evaluation's top eigenvector(s) (their
    sum; random the first time or when the variables change), which converges in a
    few products while the curvature moves slowly. That keeps one vector of the
    parameters' size per run (top k, sharpness, each layer) between evaluations.

    Cost, in HVPs over the probe batch: about 10 per eigenvalue and per layer at the
    default tol from a random start, trace_samples, and density_steps ×
    density_samples. `time_budget` (seconds, None for no limit) bounds it on large
    models: Lanczos for λ1..λk stops at the budget (after k + 1 products at least)
    and `lambda_residual` says how far it got (the largest ‖H y − λ y‖ / |λ| of the
    top k; ≤ tol when converged; λ1 is then a lower bound of the true λmax, within
    that residual of an eigenvalue). The sharpness, the trace, the density and the
    layers (in order) each start only if the products they need at least (3 for a
    Lanczos run: its minimum of 2 and the orthogonalisation; all of a trace or a
    density; a layer not compiled yet also its tracing, as long as λ's took) fit in what
    is left, at the pace of λ's last product; what did not fit is left out of that
    evaluation, with one line on stderr. Lanczos (λ, the sharpness, a
    layer's λmax) does not start a step it expects to end past the budget, and the same
    line names what it left unconverged. With a preconditioned optimizer (Adam, RMSprop,
    Adagrad…) λ1..λk stop at k/(k + 1) of what is left, so that its sharpness, what the
    learning-rate diagnosis reads, gets an eigenvalue's share.
    Memory: k + 10 vectors of the parameters' size at most (k + 8 from 4 M parameters).

    `max_examples` bounds the batch the curvature is measured on to its first that
    many examples (the probe batch should be shuffled), written as
    `hessian_examples`; None uses them all, and so does a dataset of batches. "auto"
    (the default) uses them all unless `_AUTO_PRODUCTS` products over them would not
    fit the time budget: on its first evaluation the probe times a product over
    `_AUTO_FROM` examples and keeps the largest count expected to fit (at least
    `_AUTO_FROM`), for every evaluation after, saying so on stderr when that is fewer
    than all (λ on a ResNet50 with 128 probe examples: 18 examples, where one product
    over all 128 takes 14 s).
    """

    kind = base.HESSIAN

    def __init__(self, every="epoch", k=1, trace_samples=0, density=False, per_layer=True,
                 max_iter=100, tol=1e-3, seed=0, density_steps=30, density_samples=8,
                 time_budget=60.0, max_examples="auto", name="hessian"):
        if not (max_examples in (None, "auto") or (
                isinstance(max_examples, int) and not isinstance(max_examples, bool)
                and max_examples > 0)):
            raise ValueError(f"max_examples must be a positive integer, 'auto' or None, "
                             f"got {max_examples!r}")
        self.max_examples = max_examples
        self._examples = None  # the count "auto" chose
        self._trace_seconds = 0.0  # the longest an HVP took to trace here
        self._pace = 0.0  # wall seconds per product of the last Lanczos run
        self.every, self.k, self.trace_samples = every, k, trace_samples
        self.density, self.per_layer = density, per_layer
        self.density_steps, self.density_samples = density_steps, density_samples
        self.max_iter, self.tol, self.seed, self.name = max_iter, tol, seed, name
        self.time_budget = time_budget
        self._starts = {}  # run -> sum of its last top eigenvectors, flat tensor

    def _top(self, run, matvec, op, k, rng, deadline=None):
        """(top-k eigenvalues of `matvec` on op's flat vectors, warm-started; their
        largest relative residual)."""
        start = self._starts.get(run)
        if start is None or start.shape[0] != op.size or start.dtype != op.dtype:
            start = op.random(rng)
        began, tracing = time.monotonic(), op.traced
        values, vectors, products, relative = top_eigenpairs(
            matvec, start, k, max(self.max_iter, k), self.tol, deadline=deadline)
        seconds = time.monotonic() - began - (0.0 if tracing else op.trace_seconds)
        # A Lanczos step's wall time per product: the product, orthogonalising, the
        # projected eigenproblem and host syncs (its first tracing left out).
        self._pace = max(seconds, 0.0) / max(products, 1)
        self._starts[run] = tf.reduce_sum(vectors, axis=0)
        return values, float(relative.max())

    def _curvature_batch(self, model, x, y, deadline):
        """(x, y) cut to the examples the curvature is measured on, and the products
        spent choosing them."""
        if y is None or self.max_examples is None:
            return x, y, 0
        total = num_examples(x)
        timing_products = 0
        if self.max_examples != "auto":
            n = self.max_examples
        elif self._examples is not None:
            n = self._examples
        elif deadline is None or total <= _AUTO_FROM:
            n = self._examples = total
        else:
            timed = HessianOperator(model, _first(x, _AUTO_FROM), _first(y, _AUTO_FROM))
            vector = tf.ones([timed.size], timed.dtype)
            timed.matvec(vector)  # traces, for every batch size
            timed.matvec(vector)
            seconds = max(timed.last_seconds, 1e-9)  # over-estimates per example
            timing_products = timed.products
            self._trace_seconds = max(self._trace_seconds, timed.trace_seconds)
            n = self._examples = int(min(total, max(
                _AUTO_FROM, _AUTO_FROM * self.time_budget / (_AUTO_PRODUCTS * seconds))))
            if n < total:
                print(f"optinsight: {self.name}: the curvature is measured on {n} of the "
                      f"{total} probe examples, so that {_AUTO_PRODUCTS} Hessian-vector "
                      f"products fit the {self.time_budget:g} s budget (one takes "
                      f"{seconds:.2g} s over {_AUTO_FROM}); max_examples=None uses all",
                      file=sys.stderr)
        if n < total:
            x, y = _first(x, n), _first(y, n)
        return x, y, timing_products

    def __call__(self, model, x, y):
        began = time.monotonic()
        deadline = None if self.time_budget is None else began + self.time_budget
        skipped = []
        x, y, spent = self._curvature_batch(model, x, y, deadline)  # HVPs besides op's
        op = HessianOperator(model, x, y)
        rng = np.random.default_rng(self.seed)
        sharpness_matvec, limit = (None, None) if model.optimizer is None else \
            preconditioned(op, model.optimizer)
        top_deadline = deadline
        if sharpness_matvec is not None and deadline is not None:  # an eigenvalue's share
            now = time.monotonic()
            top_deadline = now + (deadline - now) * self.k / (self.k + 1)
        values, residual = self._top("top", op.matvec, op, self.k, rng, top_deadline)
        self._trace_seconds = max(self._trace_seconds, op.trace_seconds)

        def time_left(part, products, tracing=0.0):
            """Whether `products` more products (and `tracing` seconds) fit in the budget,
            at the pace of the last product or Lanczos step; else `part` is skipped."""
            pace = max(op.last_seconds, self._pace)
            if deadline is None or time.monotonic() + products * pace + tracing <= deadline:
                return True
            skipped.append(part)
            return False

        out = {f"lambda_{i + 1}": float(v) for i, v in enumerate(values)}
        out["hessian_examples"] = op.total
        out["lambda_residual"] = residual
        unconverged = [f"λ at {residual:.1e}"] if residual > self.tol else []
        if model.optimizer is not None:
            out[base.LR_TIMES_LAMBDA_MAX] = learning_rate(model) * float(values[0])
            if sharpness_matvec is None:
                out.update(stability_summary(float(values[0]), limit))
            elif time_left("the sharpness", 3):
                sharp, sharp_residual = self._top("sharpness", sharpness_matvec, op, 1, rng,
                                                  deadline)
                out.update(stability_summary(float(sharp[0]), limit))
                if sharp_residual > self.tol:
                    unconverged.append(f"the sharpness at {sharp_residual:.1e}")
        if self.trace_samples and time_left("the trace", self.trace_samples):
            out["trace"], out["trace_stderr"] = _trace(op, self.trace_samples, rng)
        if self.density and time_left("the density",
                                      self.density_steps * self.density_samples):
            out[base.DENSITY_GRID], out[base.DENSITY] = slq_density(
                op.matvec, lambda: op.random(rng), self.density_samples, self.density_steps)
        if self.per_layer:
            layers = {}
            for v in model.trainable_variables:
                layers.setdefault(layer_name(v), []).append(v)
            for i, (layer, variables) in enumerate(layers.items()):
                block = HessianOperator(model, x, y, variables=variables)
                tracing = 0.0 if block.traced else self._trace_seconds  # as long as λ's
                if not time_left(f"{len(layers) - i} of {len(layers)} layers' λmax", 3,
                                 tracing):
                    break
                value, layer_residual = self._top(("layer", layer), block.matvec, block, 1,
                                                  rng, deadline)
                out[base.LAYER_LAMBDA_MAX + layer] = float(value[0])
                spent += block.products
                if layer_residual > self.tol:
                    unconverged.append(f"λmax of {layer} at {layer_residual:.1e}")
        out["hvps"] = spent + op.products
        notes = []
        if unconverged:  # the budget, or max_iter, stopped Lanczos first
            notes.append(f"stopped at a relative residual above tol {self.tol:g}: "
                         f"{', '.join(unconverged)}")
        if skipped:
            notes.append(f"its time budget of {self.time_budget:g} s was spent; left out "
                         f"this time: {', '.join(skipped)}")
        elapsed = time.monotonic() - began
        if deadline is not None and elapsed > 1.1 * self.time_budget:
            notes.append(f"took {elapsed:.1f} s, over its budget of {self.time_budget:g} s: "
                         + (f"tracing its products took {self._trace_seconds:.1f} s"
                            if self._trace_seconds > 0.1 * self.time_budget else
                            "a product or Lanczos step took longer than the one before"))
        if notes:
            print(f"optinsight: {self.name}: {'; '.join(notes)}", file=sys.stderr)
        return out
