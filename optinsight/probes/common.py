"""What the probes share: choosing variables, evaluating the loss, walking the data,
and moving between per-variable tensors and one flat vector.

Conventions (DESIGN.md section 5): a probe takes `model, x, y`, where x may also be a
tf.data.Dataset or an iterable of (x, y) batches (then y is None); `loss=None` means
the model's compiled loss (batch mean, regularisation included); `variables=None`
means all trainable variables. Flat vectors concatenate the variables in that order,
each flattened row-major.
"""

import numpy as np
import tensorflow as tf


def resolve_variables(model, variables=None):
    """The variables a probe works on; ValueError if there are none."""
    chosen = list(model.trainable_variables if variables is None else variables)
    if not chosen:
        raise ValueError(f"model {model.name!r} has no trainable variables to probe"
                         if variables is None else "variables is empty; pass None for all")
    return chosen


def variable_name(variable):
    return getattr(variable, "path", None) or variable.name


def layer_name(variable):
    """The layer a variable belongs to: its path without the last part."""
    name = variable_name(variable)
    return name.rsplit("/", 1)[0] if "/" in name else name


def loss_function(model, loss=None):
    """`f(x, y, training) -> scalar` batch-mean loss of `model`."""
    if loss is None:
        if getattr(model, "loss", None) is None:
            raise ValueError(f"model {model.name!r} is not compiled with a loss; "
                             "compile it or pass loss=")

        def compiled(x, y, training):
            y_pred = model(x, training=training)
            return model.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
        return compiled

    def given(x, y, training):
        return tf.reduce_mean(loss(y, model(x, training=training)))
    return given


def _length(a):
    return int(tf.shape(tf.nest.flatten(a)[0])[0])


def batches(x, y=None):
    """List of (x, y, n_examples) from arrays, a tf.data.Dataset or an iterable of pairs.

    Raises ValueError for no data or x and y of different lengths.
    """
    if y is None and not isinstance(x, (np.ndarray, tf.Tensor)):
        items = []
        for item in x:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise ValueError("a dataset for a probe must yield (x, y) batches, got "
                                 f"{type(item).__name__}")
            items.append((item[0], item[1]))
    else:
        if y is None:
            raise ValueError("y is missing: pass (x, y) arrays or a dataset of (x, y) batches")
        items = [(x, y)]
    out = []
    for bx, by in items:
        n, ny = _length(bx), _length(by)
        if n != ny:
            raise ValueError(f"x has {n} examples but y has {ny}; they must match")
        if n:
            out.append((bx, by, n))
    if not out:
        raise ValueError("no data: the probe needs at least one example")
    return out


def flatten(tensors):
    """Per-variable tensors -> one float64 numpy vector."""
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors])


def unflatten(vector, variables):
    """One flat vector -> tensors shaped and typed like `variables`."""
    out, offset = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        out.append(tf.constant(np.reshape(vector[offset:offset + size], v.shape), v.dtype))
        offset += size
    if offset != len(vector):
        raise ValueError(f"vector has {len(vector)} entries; the variables have {offset}")
    return out


def num_parameters(variables):
    return int(sum(np.prod(v.shape) for v in variables))
