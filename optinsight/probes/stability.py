"""Each optimizer's own edge of stability: the sharpness its update sees, and the limit
past which that update diverges along the sharpest direction (Cohen et al., "Gradient
Descent on Neural Networks Typically Occurs at the Edge of Stability", 2021, and
"Adaptive Gradient Methods at the Edge of Stability", 2022).

On a quadratic of curvature λ, with learning rate lr and Keras's update rules:

* SGD, w ← w − lr·g: stable while λ < 2/lr.
* SGD with momentum β, m ← βm − lr·g, w ← w + m: while λ < (2 + 2β)/lr.
* Nesterov, m ← βm − lr·g, w ← w + βm − lr·g: while λ < (2 + 2β)/((1 + 2β)·lr)
  (the iteration's characteristic root reaches −1 there).
* Adam, AdamW: w ← w − α·m/(√v + ε), m the β1 average of g, α = lr·√(1−β2^s)/(1−β1^s)
  at the next step s = iterations + 1. With v frozen this is heavy-ball momentum β1
  on the preconditioned loss, so the sharpness is λmax(P^{-1/2} H P^{-1/2}) with
  P = (1 − β1^s)/√(1 − β2^s) · diag(√v + ε) (Cohen et al.'s (1 − β1^s)·diag(√v̂ + ε),
  with ε where Keras puts it), and the limit (2 + 2β1)/((1 − β1)·lr). AMSGrad uses its
  running maximum of v. AdamW's decoupled weight decay is left out.
* RMSprop without momentum and not centered, w ← w − lr·g/√(v + ε): P = diag(√(v + ε))
  (ε inside the root, as Keras has it), limit 2/lr.

Any other optimizer, and Adam, AdamW and RMSprop before their first step (v is not
estimated yet): the plain sharpness λmax(H) and no limit (None).
"""

from functools import cache

import keras
import numpy as np
import tensorflow as tf

from optinsight import compat
from optinsight.probes import base
from optinsight.probes.common import optimizer_learning_rate
from optinsight.probes.hvp import HessianOperator
from optinsight.probes.krylov import top_eigenpairs


def _slot_vector(optimizer, slot, variables, dtype):
    """An optimizer slot (e.g. "velocities") over `variables`, a flat tensor in dtype."""
    return tf.concat([tf.reshape(tf.cast(compat.optimizer_slot(optimizer, slot, var), dtype),
                                 [-1]) for var in variables], 0)


def preconditioner(optimizer, variables, dtype=tf.float64):
    """(a function of no arguments building P as a flat tensor in `dtype` over
    `variables`, or None for the identity; the stability limit, or None). See the module
    docstring."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    lr = optimizer_learning_rate(optimizer)
    if type(optimizer) is keras.optimizers.SGD:
        beta = float(optimizer.momentum)
        if optimizer.nesterov and beta > 0:
            return None, (2 + 2 * beta) / ((1 + 2 * beta) * lr)
        return None, (2 + 2 * beta) / lr
    if int(optimizer.iterations.numpy()) == 0 and type(optimizer) in (
            keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.RMSprop):
        return None, None  # no estimate of v yet: the frozen-v analysis does not apply
    if type(optimizer) in (keras.optimizers.Adam, keras.optimizers.AdamW):
        beta_1, beta_2 = float(optimizer.beta_1), float(optimizer.beta_2)
        s = int(optimizer.iterations.numpy()) + 1
        slot = "velocity_hats" if optimizer.amsgrad else "velocities"
        scale = (1 - beta_1 ** s) / np.sqrt(1 - beta_2 ** s)
        return (lambda: scale * (tf.sqrt(_slot_vector(optimizer, slot, variables, dtype))
                                 + optimizer.epsilon)), (2 + 2 * beta_1) / ((1 - beta_1) * lr)
    if type(optimizer) is keras.optimizers.RMSprop and not optimizer.momentum \
            and not optimizer.centered:
        return (lambda: tf.sqrt(_slot_vector(optimizer, "velocities", variables, dtype)
                                + optimizer.epsilon)), 2 / lr
    return None, None


def preconditioned(op, optimizer):
    """(v -> P^{-1/2} H P^{-1/2} v on op's flat tensors, or None when P is the identity;
    the stability limit, or None) for a HessianOperator `op`. P^{-1/2} is built at the
    first product, so that it takes no memory before."""
    build, limit = preconditioner(optimizer, op.variables, op.dtype)
    if build is None:
        return None, limit
    scale = cache(lambda: tf.math.rsqrt(build()))
    return (lambda vector: scale() * op.matvec(scale() * vector)), limit


def sharpness(model, x, y, optimizer=None, max_iter=100, tol=1e-3, seed=0, plain=None):
    """{"sharpness", "stability_limit", "stability_ratio"} of `optimizer` (default the
    model's) on (x, y): see the module docstring. `plain`: λmax(H) if already known
    (it is the sharpness of the optimizers without a preconditioner). The limit and
    ratio are None for other optimizers."""
    op = HessianOperator(model, x, y)
    matvec, limit = preconditioned(op, optimizer or model.optimizer)
    if matvec is None and plain is not None:
        value = float(plain)
    else:
        start = op.random(np.random.default_rng(seed))
        value = float(top_eigenpairs(matvec or op.matvec, start, 1, max_iter, tol)[0][0])
    return stability_summary(value, limit)


def stability_summary(sharpness_value, limit):
    """{"sharpness", "stability_limit", "stability_ratio"}: the ratio is None with the
    limit."""
    return {base.SHARPNESS: sharpness_value, base.STABILITY_LIMIT: limit,
            base.STABILITY_RATIO: None if limit is None else sharpness_value / limit}
