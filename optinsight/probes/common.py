"""What the probes share: choosing variables, evaluating the loss, walking the data,
and moving between per-variable tensors and one flat vector.

Conventions: a probe takes `model, x, y`, where x may also be a
tf.data.Dataset or an iterable of (x, y) batches (then y is None); `loss=None` means
the model's compiled loss (batch mean, regularisation included); `variables=None`
means all trainable variables. Flat vectors concatenate the variables in that order,
each flattened row-major.
"""

import logging
import weakref

import keras
import numpy as np
import tensorflow as tf

from optinsight import compat

#: Models from this many parameters are large: their Lanczos basis is most of a probe's
#: memory, so it is two vectors smaller, and their HVP is forward-over-reverse, which
#: keeps no second tape (and on ResNet50 took 13.9 s against 15.4). Below, the HVP is
#: reverse-over-reverse: on CPU 2.1 gradients against 2.8 on the reference CNN, and
#: 7.5 ms against 10.8 on the MLP of benchmarks/hessian.py.
LARGE = 1 << 22

_PER_EXAMPLE = weakref.WeakKeyDictionary()  # model -> {key: tf.function}
_EXTRACTORS = weakref.WeakKeyDictionary()  # model -> {(kind, layer names): keras.Model}


def resolve_variables(model, variables=None):
    """The variables a probe works on; ValueError if there are none."""
    chosen = list(model.trainable_variables if variables is None else variables)
    if not chosen:
        raise ValueError(f"model {model.name!r} has no trainable variables to probe"
                         if variables is None else "variables is empty; pass None for all")
    return chosen


def nearest_outputs(variables, max_parameters):
    """The last of `variables` (those nearest the outputs, in a functional model's
    order) that hold at most `max_parameters` together, at least the last one; all
    of them when max_parameters is None."""
    if max_parameters is None:
        return list(variables)
    if isinstance(max_parameters, bool) or not isinstance(max_parameters, int) \
            or max_parameters < 1:
        raise ValueError(f"max_parameters must be a positive integer or None, got "
                         f"{max_parameters!r}")
    chosen, total = [], 0
    for v in reversed(list(variables)):
        total += int(np.prod(v.shape))
        if chosen and total > max_parameters:
            break
        chosen.insert(0, v)
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
            return compat.compute_loss(model, x, y, y_pred, training)
        return compiled

    def given(x, y, training):
        return tf.reduce_mean(loss(y, model(x, training=training)))
    return given


def num_examples(a):
    """The examples in an array or a nest of arrays (its first dimension)."""
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
        n, ny = num_examples(bx), num_examples(by)
        if n != ny:
            raise ValueError(f"x has {n} examples but y has {ny}; they must match")
        if n:
            out.append((bx, by, n))
    if not out:
        raise ValueError("no data: the probe needs at least one example")
    return out


def class_labels(y):
    """Integer class labels [n] from integer labels or one-hot rows."""
    y = np.asarray(y)
    return y.argmax(axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1).astype(int)


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


def per_example_jacobian(model, variables, outputs, key):
    """Compiled `f(*batch) -> [c, k, n_params]`: per example, the Jacobian of
    `outputs(*example_batch_of_one)` (k values, or one) w.r.t. `variables`.

    Examples are mapped one at a time through `tf.vectorized_map`, so the cost is c
    single-example backward passes, batched; a Jacobian of a whole batch's outputs
    would push every output row back through the whole batch (c times the work).
    Cached per model under `key`.
    """
    cache = _PER_EXAMPLE.setdefault(model, {})
    key = (tuple(id(v) for v in variables), key)
    if key in cache:
        return cache[key]
    zero = tf.UnconnectedGradients.ZERO

    def one_example(example):
        with tf.GradientTape() as tape:
            out = tf.reshape(outputs(*[t[None] for t in example]), [-1])
        if out.shape[0] == 1:
            grads = tape.gradient(out, variables, unconnected_gradients=zero)
            return tf.concat([tf.reshape(g, [1, -1]) for g in grads], axis=1)
        parts = tape.jacobian(out, variables, unconnected_gradients=zero)
        k = tf.shape(out)[0]
        return tf.concat([tf.reshape(p, [k, -1]) for p in parts], axis=1)

    def per_example(*batch):
        # pfor warns when it loops over an op it cannot vectorise (conv filter
        # gradients); the result is the same, so keep that out of the user's console.
        logger = logging.getLogger("tensorflow")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return tf.vectorized_map(one_example, batch)
        finally:
            logger.setLevel(level)

    cache[key] = tf.function(per_example, reduce_retracing=True)
    return cache[key]


def in_chunks(fn, arrays, chunk_size=None):
    """fn(*chunk) over chunks of `chunk_size` examples, concatenated (a tensor)."""
    n = len(arrays[0])
    step = n if chunk_size is None else chunk_size
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return tf.concat([fn(*[a[i:i + step] for a in arrays]) for i in range(0, n, step)], 0)


#: Default bound on the per-example Jacobian a kernel probe holds at once (bytes).
MAX_JACOBIAN_BYTES = 1 << 30


def parameter_groups(variables, bytes_per_parameter, max_bytes=MAX_JACOBIAN_BYTES):
    """`variables` split, in order, into groups whose parameters take at most
    `max_bytes` at `bytes_per_parameter` each (a larger variable is a group alone)."""
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    groups, size = [[]], 0
    for v in variables:
        cost = int(np.prod(v.shape)) * bytes_per_parameter
        if groups[-1] and size + cost > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(v)
        size += cost
    return groups


def jacobian_gram(model, variables, outputs, key, arrays, others=None, chunk_size=None,
                  max_bytes=MAX_JACOBIAN_BYTES, full=False):
    """Σ over parameter groups of J_g(arrays) J_g(others)ᵀ, float64 numpy.

    J(arrays) is the per-example Jacobian of `outputs` (per_example_jacobian), [n, k,
    P]; `others` None means arrays itself (arrays[0] and others[0] are the model's
    input). Returns [n1, n2] (the k outputs of each example flattened into the
    contraction), or with `full` [n1, n2, k, k]. The Jacobians of one group at a time
    are held (at most max_bytes, or one variable's worth), in chunks of `chunk_size`
    examples through the backward pass; each group costs a backward pass down to its
    first variable. Dense layers' kernels are not differentiated at all
    (`_factored_dense`).
    """
    n = len(arrays[0]) + (0 if others is None else len(others[0]))
    k = int(np.prod(outputs(*[tf.constant(a[:1]) for a in arrays]).shape))
    itemsize = max(tf.as_dtype(v.dtype).size for v in variables)
    layers = _factored_dense(model, variables)
    total = _factored_gram(model, layers, outputs, key, arrays, others, chunk_size, full) \
        if layers else None
    factored = {id(v) for layer in layers for v in (layer.kernel, layer.bias)}
    rest = [v for v in variables if id(v) not in factored]
    for group in parameter_groups(rest, n * k * itemsize, max_bytes) if rest else ():
        fn = per_example_jacobian(model, group, outputs, key)
        j1 = in_chunks(fn, arrays, chunk_size)
        j2 = j1 if others is None else in_chunks(fn, others, chunk_size)
        part = _contract(j1, j2, full).numpy().astype(np.float64)
        del j1, j2
        total = part if total is None else total + part
    if others is None:  # exactly symmetric, as J Jᵀ is (a float32 product is not bitwise)
        total = (total + (total.transpose(1, 0, 3, 2) if full else total.T)) / 2
    return total


def _factored_dense(model, variables):
    """The Dense layers whose kernel and bias are both among `variables` and whose
    per-example gradient is an outer product: on example i the kernel's gradient is
    a_i δ_iᵀ, a_i the layer's input (a vector) and δ_i the gradient at its
    pre-activation, which is the bias's gradient. Their share of J Jᵀ is then
    (1 + A₁A₂ᵀ) ⊙ J_b₁J_b₂ᵀ (bias and kernel), with no Jacobian of the kernel.

    Only layers of a single-input functional or Sequential model itself (not nested),
    called once, on vector inputs, without regularisers or LoRA; and only when their
    kernels hold most of the parameters of `variables`: their inputs take a forward
    pass of their own, which costs more than a few small kernels' Jacobians (a
    ResNet50's classifier beside its last convolution).
    """
    inputs = _symbolic_inputs(model)
    if not inputs or len(inputs) != 1:
        return []
    chosen = {id(v) for v in variables}
    layers = [layer for layer in model.layers
              if type(layer) is keras.layers.Dense and layer.use_bias
              and id(layer.kernel) in chosen and id(layer.bias) in chosen
              and layer.kernel_regularizer is None and layer.bias_regularizer is None
              and not getattr(layer, "lora_enabled", False)
              and len(getattr(layer, "_inbound_nodes", ())) == 1
              and len(layer.input.shape) == 2]
    factored = num_parameters([layer.kernel for layer in layers])
    return layers if 2 * factored > num_parameters(variables) else []


def _factored_gram(model, layers, outputs, key, arrays, others, chunk_size, full):
    """The share of `layers` (`_factored_dense`) in jacobian_gram, float64 numpy."""
    fn = per_example_jacobian(model, [layer.bias for layer in layers], outputs, key)
    sides = [arrays] if others is None else [arrays, others]
    jacobians = [in_chunks(fn, side, chunk_size) for side in sides]  # [n, k, Σ widths]
    layer_in = [_layer_inputs(model, layers, side[0], chunk_size) for side in sides]
    if others is None:
        jacobians, layer_in = jacobians * 2, layer_in * 2
    total, offset = 0, 0
    for i, layer in enumerate(layers):
        width = int(layer.bias.shape[0])
        j1, j2 = (j[:, :, offset:offset + width] for j in jacobians)
        offset += width
        scale = 1 + tf.matmul(layer_in[0][i], layer_in[1][i], transpose_b=True)
        gram = _contract(j1, j2, full)
        total += (gram * (scale[:, :, None, None] if full else scale)).numpy().astype(np.float64)
    return total


def _layer_inputs(model, layers, x, chunk_size=None):
    """The inputs of `layers` on x (training=False), each [n, width] in its bias's dtype
    (the variables', under mixed precision too)."""
    extractor = layer_extractor(model, "input", layers)
    step = len(x) if chunk_size is None else chunk_size
    chunks = [tf.nest.flatten(extractor(tf.constant(x[i:i + step]), training=False))
              for i in range(0, len(x), step)]
    return [tf.concat([tf.cast(c[j], layer.bias.dtype) for c in chunks], 0)
            for j, layer in enumerate(layers)]


def _contract(j1, j2, full):
    """[n1, k, p] and [n2, k, p] -> Σ_p over flattened (k, p): [n1, n2], or [n1, n2, k, k]."""
    n1, n2, k = j1.shape[0], j2.shape[0], j1.shape[1]
    if not full:
        return tf.matmul(tf.reshape(j1, [n1, -1]), tf.reshape(j2, [n2, -1]), transpose_b=True)
    product = tf.matmul(tf.reshape(j1, [n1 * k, -1]), tf.reshape(j2, [n2 * k, -1]),
                        transpose_b=True)
    return tf.transpose(tf.reshape(product, [n1, k, n2, k]), [0, 2, 1, 3])


def kernels(model):
    """The trainable variables of two or more dimensions (dense and conv kernels)."""
    return [v for v in model.trainable_variables if len(v.shape) >= 2]


def feature_layers(model, layers=None):
    """The layers whose outputs representation probes read: `layers` (names), else
    every layer but the input layers. ValueError for a name the model lacks."""
    candidates = [layer for layer in model.layers
                  if not isinstance(layer, keras.layers.InputLayer)]
    if layers is None:
        return candidates
    by_name = {layer.name: layer for layer in model.layers}
    missing = [name for name in layers if name not in by_name]
    if missing:
        raise ValueError(f"no layer named {missing} in model {model.name!r}; it has "
                         f"{[layer.name for layer in candidates]}")
    return [by_name[name] for name in layers]


def sampled_layers(model, layers=None, max_layers=None):
    """`layers` if given; else every feature layer's name, or `max_layers` of them
    evenly spaced by depth (the first and the last included) when there are more."""
    if layers is not None:
        return list(layers)
    names = [layer.name for layer in feature_layers(model)]
    if max_layers is None or len(names) <= max_layers:
        return names
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 2:
        raise ValueError(f"max_layers must be an integer >= 2 or None, got {max_layers!r}")
    return [names[i] for i in np.unique(np.linspace(0, len(names) - 1, max_layers).round()
                                        .astype(int))]


def _symbolic_inputs(model):
    """A functional or Sequential model's symbolic inputs; None for other models."""
    try:
        return model.inputs or None
    except (AttributeError, ValueError):
        return None


def check_input_shape(model, x, name="x"):
    """ValueError, one line, when the examples of `x` (an array) do not fit the input of
    a single-input functional or Sequential model (None dimensions fit any size);
    nothing is checked for other models."""
    inputs = _symbolic_inputs(model)
    if not inputs or len(inputs) != 1:
        return
    wanted = tuple(inputs[0].shape[1:])
    if len(x.shape) - 1 != len(wanted) or any(
            w is not None and w != g for w, g in zip(wanted, x.shape[1:])):
        raise ValueError(f"{name} has examples of shape {tuple(x.shape[1:])}, but model "
                         f"{model.name!r} takes inputs of shape {wanted}")


def layer_extractor(model, kind, layers):
    """A keras.Model from `model`'s inputs to the `kind` ("input" or "output") of each
    of `layers`, cached per model."""
    cache = _EXTRACTORS.setdefault(model, {})
    key = (kind,) + tuple(layer.name for layer in layers)
    if key not in cache:
        cache[key] = keras.Model(model.inputs, [getattr(layer, kind) for layer in layers])
    return cache[key]


def layer_features(model, x, layers=None, batch_size=256):
    """{layer name: outputs on x flattened per example, float64 [n, d]}.

    Needs a functional or Sequential model (one with symbolic inputs).
    """
    chosen = feature_layers(model, layers)
    inputs = _symbolic_inputs(model)
    if not inputs:
        raise ValueError(f"model {model.name!r} has no symbolic inputs; representation "
                         "probes need a functional or Sequential model built on keras.Input")
    extractor = layer_extractor(model, "output", chosen)
    x = np.asarray(x)
    check_input_shape(model, x)
    outputs = extractor.predict(x, batch_size=batch_size, verbose=0)
    if len(chosen) == 1:
        outputs = [outputs]
    return {layer.name: np.asarray(out, np.float64).reshape(len(x), -1)
            for layer, out in zip(chosen, outputs)}


def optimizer_learning_rate(optimizer):
    """An optimizer's current learning rate as a float (schedules evaluated; a
    LossScaleOptimizer's inner one)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    lr = optimizer.learning_rate
    if callable(lr):
        lr = lr(optimizer.iterations)
    return float(np.asarray(lr))
