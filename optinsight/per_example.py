"""Per-example gradients of a batch, in the graph, by layer type (training=False).

A Dense or Conv2D layer's per-example gradient follows from its inputs and the
gradient of its pre-activation outputs: for Dense, g_n = Σ_t x_nt ⊗ δ_nt (one outer
product per position t of a sequence), for Conv2D, g_n = Σ_p u_np ⊗ δ_np with u_np
the input patch under output position p. One forward pass records the inputs and
pre-activation outputs of those layers (their `call` is swapped for the same
computation that keeps them), and one backward pass of the batch gives every δ; the
per-example gradients are then batched matrix products, O(B · P) work. Every other
variable (normalisation, embedding, attention, depthwise convolution, ...) gets
`tf.vectorized_map` over single-example backward passes. Both include the gradient
of the model's regularisation losses in every example's, as a per-example loss does.

`per_example_gradients` gives the gradients of the per-example losses, `ggn_diagonal_sum`
the diagonal of the generalised Gauss-Newton matrix through the same paths. The
compiled loss is taken to be a mean over examples (Keras's default reduction).
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from optinsight import compat

ZERO = tf.UnconnectedGradients.ZERO


def _example(batch):
    """The nest of one example, with its batch axis of 1."""
    return tf.nest.map_structure(lambda t: t[None], batch)


def factored_layers(model, variables):
    """The Dense and Conv2D layers of `model` (channels last, one group, neither
    quantized nor LoRA) whose kernel is among `variables` and whose bias, if any, is
    too: [layer]."""
    ids = {id(v) for v in variables}
    chosen = []
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is keras.layers.Dense:
            pass
        elif type(layer) is keras.layers.Conv2D:
            if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
                continue
        else:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            continue
        if id(layer.kernel) in ids and (layer.bias is None or id(layer.bias) in ids):
            chosen.append(layer)
    return chosen


@contextlib.contextmanager
def recording(layers):
    """Swap each layer's `call` for the same computation that appends (inputs,
    pre-activation outputs) to `records[layer]`; yields `records`."""
    records = {layer: [] for layer in layers}

    def dense_call(layer):
        def call(inputs, training=None):
            z = keras.ops.matmul(inputs, layer.kernel)
            if layer.bias is not None:
                z = keras.ops.add(z, layer.bias)
            records[layer].append((inputs, z))
            return z if layer.activation is None else layer.activation(z)
        return call

    def conv_call(layer):
        def call(inputs):
            z = layer.convolution_op(inputs, layer.kernel)
            if layer.use_bias:
                z = keras.ops.add(z, keras.ops.reshape(layer.bias, (1, 1, 1, layer.filters)))
            records[layer].append((inputs, z))
            return z if layer.activation is None else layer.activation(z)
        return call

    for layer in layers:
        make = dense_call if isinstance(layer, keras.layers.Dense) else conv_call
        layer.call = make(layer)
    try:
        yield records
    finally:
        for layer in layers:
            del layer.call


def _layer_gradients(layer, inputs, deltas):
    """[(variable, per-example gradients [B, size])] of a Dense or Conv2D layer from
    its inputs and output gradients."""
    b = tf.shape(deltas)[0]
    if isinstance(layer, keras.layers.Dense):
        units = tf.reshape(inputs, [b, -1, tf.shape(inputs)[-1]])
    else:
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        units = tf.image.extract_patches(
            inputs, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
            padding=layer.padding.upper())
        units = tf.reshape(units, [b, -1, tf.shape(units)[-1]])
    deltas = tf.reshape(deltas, [b, -1, tf.shape(deltas)[-1]])
    out = [(layer.kernel, tf.reshape(tf.einsum("bti,bto->bio", units, deltas), [b, -1]))]
    if layer.bias is not None:
        out.append((layer.bias, tf.reduce_sum(deltas, axis=1)))
    return out


def _regularisation_gradients(model, variables):
    """The gradient of the model's regularisation losses w.r.t. `variables` (zeros
    without any), flattened: [P] float32."""
    with tf.GradientTape() as tape:
        losses = model.losses
        if not losses:
            return tf.zeros([sum(_size(v) for v in variables)])
        total = tf.add_n([tf.cast(loss, tf.float32) for loss in losses])
    grads = tape.gradient(total, variables)  # None: no regulariser on it
    return _flat([tf.zeros(v.shape) if g is None else g for g, v in zip(grads, variables)])


def _size(variable):
    return int(np.prod(variable.shape))


def _flat(tensors):
    return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(t), tf.float32), [-1])
                      for t in tensors], 0)


def _assemble(variables, parts):
    """[B, P] from {id(variable): [B, size]} in the order of `variables`."""
    return tf.concat([parts[id(v)] for v in variables], axis=1)


def _vectorized(x, y, outputs):
    """tf.vectorized_map over examples of `outputs(xi, yi) -> (loss, [variables' grads])`
    flattened: (losses [B], gradients [B, P])."""
    def one(example):
        xi, yi = _example(example)
        loss, grads = outputs(xi, yi)
        return tf.cast(loss, tf.float32), _flat(grads) if grads else tf.zeros([0])
    return tf.vectorized_map(one, (x, y))


def per_example_gradients(model, variables, x, y):
    """(losses [B], gradients [B, P]) float32: each example's compiled loss and its
    gradient w.r.t. `variables` (flattened in order), training=False."""
    layers = factored_layers(model, variables)
    factored = {id(v) for layer in layers for v in (layer.kernel, layer.bias) if v is not None}
    others = [v for v in variables if id(v) not in factored]

    def loss_and_gradients(xi, yi):
        with tf.GradientTape() as tape:
            loss = compat.compute_loss(model, xi, yi, model(xi, training=False), False)
        return loss, tape.gradient(loss, others, unconnected_gradients=ZERO)

    def loss_only(xi, yi):
        return compat.compute_loss(model, xi, yi, model(xi, training=False), False), []

    losses, other_grads = _vectorized(x, y, loss_and_gradients if others else loss_only)
    parts = {}
    if others:
        sizes = [_size(v) for v in others]
        for v, g in zip(others, tf.split(other_grads, sizes, axis=1)):
            parts[id(v)] = g
    if layers:
        b = tf.cast(tf.shape(losses)[0], tf.float32)
        with recording(layers) as records, tf.GradientTape() as tape:
            loss = compat.compute_loss(model, x, y, model(x, training=False), False)
            total = b * tf.cast(loss, tf.float32)  # Σ_n ℓ_n: a mean over examples
        captured = [(layer, i, z) for layer in layers for i, (_, z) in enumerate(records[layer])]
        deltas = tape.gradient(total, [z for _, _, z in captured])
        for (layer, i, _), delta in zip(captured, deltas):
            inputs = records[layer][i][0]
            for v, g in _layer_gradients(layer, tf.cast(inputs, tf.float32),
                                         tf.cast(delta, tf.float32)):
                parts[id(v)] = parts.get(id(v), 0) + g
        regularisation = _regularisation_gradients(
            model, [v for v in variables if id(v) in factored])
        offset = 0
        for v in variables:
            if id(v) in factored:
                size = _size(v)
                parts[id(v)] = parts[id(v)] + regularisation[offset:offset + size][None]
                offset += size
    return losses, _assemble(variables, parts)


def _logit_factors(model, x, y, logits, head):
    """S [B, k, k] with S_n S_nᵀ = H_n, the Hessian of example n's loss w.r.t. its logits
    (from their eigendecomposition, negative eigenvalues dropped), and B."""
    b = tf.shape(logits)[0]
    with tf.GradientTape() as outer:
        outer.watch(logits)
        with tf.GradientTape() as inner:
            inner.watch(logits)
            loss = compat.compute_loss(model, x, y, head(logits), False)
            total = tf.cast(b, loss.dtype) * loss
        slopes = tf.reshape(inner.gradient(total, logits), [b, -1])
    hessians = outer.batch_jacobian(slopes, logits)
    k = tf.shape(slopes)[1]
    hessians = tf.cast(tf.reshape(hessians, [b, k, k]), tf.float32)
    values, vectors = tf.linalg.eigh(hessians)
    return vectors * tf.sqrt(tf.maximum(values, 0.0))[:, None, :]


def ggn_diagonal_sum(model, variables, x, y):
    """Σ_n diag(J_nᵀ H_n J_n) [P] float32: J_n the Jacobian of example n's logits (the
    output before a final softmax or sigmoid, `compat.split_at_logits`), H_n the
    Hessian of its loss w.r.t. them; training=False. With H_n = S_n S_nᵀ, it is
    Σ_c Σ_n (∂ s_ncᵀ z_n / ∂θ)²: one per-example gradient per column c of S."""
    layers = factored_layers(model, variables)
    factored = {id(v) for layer in layers for v in (layer.kernel, layer.bias) if v is not None}
    others = [v for v in variables if id(v) not in factored]
    with recording(layers) as records, tf.GradientTape(persistent=True) as tape:
        logits, head = compat.split_at_logits(model(x, training=False))
        b = tf.shape(logits)[0]
        flat = tf.cast(tf.reshape(logits, [b, int(np.prod(logits.shape[1:]))]), tf.float32)
    factors = tf.stop_gradient(_logit_factors(model, x, y, logits, head))
    k = int(np.prod(logits.shape[1:]))  # the logits of one example
    parts = {id(v): tf.zeros([_size(v)]) for v in variables}
    captured = [(layer, i, z) for layer in layers for i, (_, z) in enumerate(records[layer])]
    for c in range(k):
        with tape:
            projected = tf.reduce_sum(flat * factors[:, :, c])  # Σ_n s_ncᵀ z_n
        if captured:
            deltas = tape.gradient(projected, [z for _, _, z in captured])
            sums = {}
            for (layer, i, _), delta in zip(captured, deltas):
                for v, g in _layer_gradients(layer, tf.cast(records[layer][i][0], tf.float32),
                                             tf.cast(delta, tf.float32)):
                    sums[id(v)] = sums.get(id(v), 0) + g
            for key, g in sums.items():
                parts[key] = parts[key] + tf.reduce_sum(tf.square(g), axis=0)
    del tape
    if others:
        parts.update(zip(map(id, others), tf.split(
            _others_ggn(model, others, x, y), [_size(v) for v in others])))
    return tf.concat([tf.reshape(parts[id(v)], [-1]) for v in variables], 0)


def _others_ggn(model, variables, x, y):
    """The Gauss-Newton diagonal of `variables` one example at a time, vectorised."""
    def one(example):
        xi, yi = _example(example)
        with tf.GradientTape(persistent=True) as outer:
            output, head = compat.split_at_logits(model(xi, training=False))
            with tf.GradientTape() as inner:
                inner.watch(output)
                loss = compat.compute_loss(model, xi, yi, head(output), False)
            slope = tf.reshape(inner.gradient(loss, output), [-1])
            flat = tf.reshape(output, [-1])
        k = tf.shape(flat)[0]
        hessian = tf.reshape(outer.jacobian(slope, output), [k, k])
        parts = outer.jacobian(flat, variables, unconnected_gradients=ZERO)
        jacobian = tf.concat([tf.reshape(p, [k, -1]) for p in parts], axis=1)
        return tf.cast(tf.einsum("cp,cd,dp->p", jacobian, hessian, jacobian), tf.float32)

    return tf.reduce_sum(tf.vectorized_map(one, (x, y)), axis=0)
