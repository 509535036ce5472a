"""The Hessian of a model's loss as an operator: `HessianOperator` applies it to vectors
by a Hessian–vector product (forward-over-reverse or reverse-over-reverse
GradientTape), compiled once per model and batch shape (`hessian.hvp`: one product).

H is the Hessian of the batch-mean loss with respect to the chosen variables (with
a dataset of batches, the example-weighted mean of the batch Hessians), in units of
loss per parameter squared. Flat vectors concatenate the variables in order, each
flattened row-major.
"""

import time
import weakref

import numpy as np
import tensorflow as tf

from optinsight.probes import common
from optinsight.probes.common import (
    batches,
    flatten,
    loss_function,
    num_parameters,
    resolve_variables,
    unflatten,
)

METHODS = ("forward", "reverse")


def default_method(model):
    """The HVP method used when none is given: by the size of the whole model (a block
    of a large model's variables still differentiates through all of it)."""
    return "forward" if num_parameters(model.trainable_variables) >= common.LARGE else "reverse"

_ZERO = tf.UnconnectedGradients.ZERO
_COMPILED = weakref.WeakKeyDictionary()  # model -> {key: tf.function}


def _hvp_function(model, variables, loss, method, training):
    """Compiled `(f(x, y, tensors) -> H·tensors, g(x, y, flat) -> H·flat)` for one
    batch, cached per model: per-variable tensors, or one flat vector in the widest
    variable dtype (split, cast and concatenated inside the graph)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cache = _COMPILED.setdefault(model, {})
    key = (tuple(id(v) for v in variables), id(loss), method, bool(training))
    if key in cache:
        return cache[key]
    loss_fn = loss_function(model, loss)
    sizes = [int(np.prod(v.shape)) for v in variables]
    dtype = _widest(variables)

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

    def flat(x, y, vector):
        tensors = [tf.cast(tf.reshape(p, v.shape), v.dtype)
                   for p, v in zip(tf.split(vector, sizes), variables)]
        return tf.concat([tf.cast(tf.reshape(o, [-1]), dtype) for o in fn(x, y, tensors)], 0)

    cache[key] = (tf.function(fn, reduce_retracing=True),
                  tf.function(flat, reduce_retracing=True))
    return cache[key]


def _widest(variables):
    return max((tf.as_dtype(v.dtype) for v in variables), key=lambda d: d.size)


class HessianOperator:
    """H as a linear map, over one batch or a whole dataset: on per-variable tensors
    (`matvec_tensors`), on flat tensors in `dtype` (`matvec`), on flat float64 numpy
    vectors (calling it)."""

    def __init__(self, model, x, y=None, loss=None, variables=None, method=None,
                 training=False):
        self.variables = resolve_variables(model, variables)
        self.size = num_parameters(self.variables)
        self.dtype = _widest(self.variables)
        self.data = [(tf.nest.map_structure(tf.convert_to_tensor, bx),
                      tf.nest.map_structure(tf.convert_to_tensor, by), n)
                     for bx, by, n in batches(x, y)]
        self.total = sum(n for _, _, n in self.data)
        self._fn, self._flat_fn = _hvp_function(model, self.variables, loss,
                                                method or default_method(model), training)
        self.products = 0  # HVPs computed, each over all the data
        self.last_seconds = None  # wall time of the last product
        self.trace_seconds = 0.0  # wall time this operator spent tracing the flat product
        self._relaxed = False

    @property
    def traced(self):
        """Whether the flat product is compiled already (by any operator on the same
        model and variables)."""
        return self._flat_fn.experimental_get_tracing_count() > 0

    def _relax(self):
        """Trace the flat HVP once for any batch size (a sub-batch or a dataset's last
        batch then reuses it; tracing a large model takes seconds)."""
        def spec(t):
            return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

        began = None if self.traced else time.monotonic()
        bx, by, _ = self.data[0]
        self._flat_fn.get_concrete_function(tf.nest.map_structure(spec, bx),
                                            tf.nest.map_structure(spec, by),
                                            tf.TensorSpec([self.size], self.dtype))
        if began is not None:
            self.trace_seconds = time.monotonic() - began
        self._relaxed = True

    def _mean(self, fn, vector):
        """The example-weighted mean over the batches of fn(x, y, vector)."""
        began = time.monotonic()
        out = None
        for bx, by, n in self.data:
            part = fn(bx, by, vector)
            if len(self.data) > 1:
                part = tf.nest.map_structure(lambda p, n=n: p * (n / self.total), part)
            out = part if out is None else tf.nest.map_structure(tf.add, out, part)
        self.products += 1
        self.last_seconds = time.monotonic() - began
        return out

    def matvec_tensors(self, vector):
        """H·vector for a list of tensors shaped like `variables`."""
        return self._mean(self._fn, vector)

    def matvec(self, vector):
        """H·vector for a flat tensor [size] in `dtype`; a flat tensor in `dtype`."""
        if not self._relaxed:
            self._relax()
        return self._mean(self._flat_fn, vector)

    def random(self, rng, rademacher=False):
        """A random flat tensor in `dtype`: standard normal, or ±1 with `rademacher`."""
        values = rng.choice([-1.0, 1.0], self.size) if rademacher else \
            rng.standard_normal(self.size)
        return tf.constant(values, self.dtype)

    def __call__(self, vector):
        return flatten(self.matvec_tensors(unflatten(vector, self.variables)))
