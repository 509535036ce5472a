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

`losses_and_gradients` gives the per-example losses and their gradients (a
`PerExample`, which keeps a Dense kernel's as its factors), `ggn_diagonal_sum` the
diagonal of the generalised Gauss-Newton matrix through the same paths. The compiled
loss is taken to be a mean over examples (Keras's default reduction).
"""

import contextlib
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from optinsight import compat

ZERO = tf.UnconnectedGradients.ZERO


def _example(batch):
    """The nest of one example, with its batch axis of 1."""
    return tf.nest.map_structure(lambda t: t[None], batch)


def layer_variables(layer):
    """The variables of a factored layer: (kernel, bias) of a Dense or Conv2D, (gamma,
    beta) of a BatchNormalization, those it has."""
    if isinstance(layer, keras.layers.BatchNormalization):
        names = ("gamma", "beta")
    else:
        names = ("kernel", "bias")
    return [v for v in (getattr(layer, n, None) for n in names) if v is not None]


def factored_layers(model, variables):
    """The layers of `model` whose per-example gradients follow from their inputs and
    output gradients, every variable of which is among `variables`: Dense and Conv2D
    (channels last, one group, neither quantized nor LoRA), and BatchNormalization on
    one axis (in inference, an affine map per channel): [layer]."""
    ids = {id(v) for v in variables}
    chosen = []
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is keras.layers.Conv2D:
            if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
                continue
        elif type(layer) is keras.layers.BatchNormalization:
            if getattr(layer, "synchronized", False) or not isinstance(layer.axis, int):
                continue
        elif type(layer) is not keras.layers.Dense:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            continue
        own = layer_variables(layer)
        if own and all(id(v) in ids for v in own):
            chosen.append(layer)
    return chosen


def routed_pools(model):
    """The MaxPooling2D layers of `model` whose windows do not overlap (pool size =
    strides, padding "valid", channels last), which `recording` gives a cheaper
    gradient: [layer]."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.MaxPooling2D)
            and tuple(layer.pool_size) == tuple(layer.strides)
            and layer.padding == "valid" and layer.data_format == "channels_last"]


def _routed_max_pool(inputs, size, xla=False):
    """`inputs` [B, H, W, C] max-pooled over non-overlapping windows `size` (padding
    "valid"), with the same values and the same gradient as TensorFlow's on CPU: each
    window's output gradient goes to the element MaxPoolGrad picks (its first, then
    each later one greater than the greatest so far, in row-major order; NaN and -inf
    included). The first backward pass through it is MaxPoolGrad itself; every later
    one scatters the gradient to those elements, found once (MaxPoolGradWithArgmax;
    under XLA, which lacks it, a product with their mask), where MaxPoolGrad would
    search every window again (on CPU most of a backward pass through a small CNN, and
    the TIC takes one per logit)."""
    ph, pw = size

    @tf.custom_gradient
    def pool(x):
        out = tf.nn.max_pool2d(x, size, size, "VALID")
        b, ho, wo, c = (tf.shape(out)[a] for a in range(4))
        passes = []  # the backward passes built through this forward pass so far

        def chosen():  # [B, H', W', C]: i · pw + j of the element each window picks
            windows = tf.reshape(tf.transpose(tf.reshape(  # [ph · pw, B, H', W', C]
                x[:, :ho * ph, :wo * pw, :], [b, ho, ph, wo, pw, c]), [2, 4, 0, 1, 3, 5]),
                [ph * pw, b, ho, wo, c])
            greatest, index = windows[0], tf.zeros(tf.shape(out), tf.int32)
            for k in range(1, ph * pw):
                greater = windows[k] > greatest
                greatest = tf.where(greater, windows[k], greatest)
                index = tf.where(greater, k, index)
            return index

        def argmax():  # [B, H', W', C] int64: those elements' flat indices into x
            height, width = tf.cast(tf.shape(x)[1], tf.int64), tf.cast(tf.shape(x)[2], tf.int64)
            k = tf.cast(chosen(), tf.int64)
            rows = tf.range(tf.cast(ho, tf.int64))[None, :, None, None] * ph + k // pw
            columns = tf.range(tf.cast(wo, tf.int64))[None, None, :, None] * pw + k % pw
            examples = tf.range(tf.cast(b, tf.int64))[:, None, None, None]
            return ((examples * height + rows) * width + columns) * tf.cast(c, tf.int64) \
                + tf.range(tf.cast(c, tf.int64))

        def routing():  # [B · H', ph, W', pw, C], 1 where each window's gradient goes
            index = chosen()
            mask = tf.stack([tf.stack([tf.equal(index, i * pw + j) for j in range(pw)],
                                      axis=3) for i in range(ph)], axis=2)
            return tf.cast(tf.reshape(mask, [b * ho, ph, wo, pw, c]), x.dtype)

        def gradient(g):
            passes.append(g)
            if len(passes) == 1:  # the training step's own pass: TensorFlow's, as cheap
                return tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=out, grad=g,
                                              ksize=[1, ph, pw, 1], strides=[1, ph, pw, 1],
                                              padding="VALID")
            # the later ones (the TIC's): the ops finding the elements are the same in
            # each, and the graph optimiser computes them once
            if not xla:
                return tf.raw_ops.MaxPoolGradWithArgmax(
                    input=x, grad=g, argmax=argmax(), ksize=[1, ph, pw, 1],
                    strides=[1, ph, pw, 1], padding="VALID", include_batch_in_index=True)
            routed = tf.reshape(tf.reshape(g, [b * ho, 1, wo, 1, c]) * routing(),
                                [b, ho * ph, wo * pw, c])
            if x.shape[1] is not None and x.shape[2] is not None \
                    and x.shape[1] % ph == x.shape[2] % pw == 0:
                return routed  # no rows or columns left over
            return tf.pad(routed, [[0, 0], [0, tf.shape(x)[1] - ho * ph],
                                   [0, tf.shape(x)[2] - wo * pw], [0, 0]])
        return out, gradient

    return pool(inputs)


def _input_gradient(g, kernel, size, strides, padding):
    """The gradient of a convolution's inputs [B, H, W, in] (size: (H, W)) from its
    output gradients g [B, H', W', out] (dilation 1): g spread to the strides (zeros
    between), padded, and convolved with the kernel flipped, its in and out axes
    swapped. The same sums as Conv2DBackpropInput as a forward convolution, which
    TensorFlow runs far faster on CPU at small activations (batch 128, 3×3, 512
    channels at 2×2: 19 ms against 553 ms; a 1×1 convolution at 1×1, 2048 to 1024
    channels: 12 ms against 1.65 s)."""
    b, ho, wo, c = (tf.shape(g)[a] for a in range(4))
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    if sh > 1 or sw > 1:
        g = tf.pad(g[:, :, None, :, None, :],
                   [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1], [0, 0]])
        g = tf.reshape(g, [b, ho * sh, wo * sw, c])[:, :(ho - 1) * sh + 1,
                                                    :(wo - 1) * sw + 1]
    pads = []
    for n, o, k, s in ((size[0], ho, kh, sh), (size[1], wo, kw, sw)):
        before = 0 if padding == "VALID" else _same_padding(n, k, s, 1)[0]
        pads.append([k - 1 - before, n + before - (o - 1) * s - 1])
    flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
    return tf.nn.conv2d(tf.pad(g, [[0, 0], *pads, [0, 0]]), flipped, 1, "VALID")


def _convolution(layer, inputs, keep_first_pass):
    """`layer.convolution_op(inputs, layer.kernel)` of a Conv2D, whose backward passes
    take the input gradient by `_input_gradient` (dilation 1; else TensorFlow's
    gradient throughout), except the first with `keep_first_pass` (a training step's
    own: TensorFlow's Conv2DBackpropInput, as in a plain step)."""
    if tuple(layer.dilation_rate) != (1, 1):
        return layer.convolution_op(inputs, layer.kernel)
    strides, padding = [1, *layer.strides, 1], layer.padding.upper()
    passes = []  # the backward passes built through this forward pass so far

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(g):
            passes.append(g)
            kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(kernel), out_backprop=g, strides=strides,
                padding=padding)
            if keep_first_pass and len(passes) == 1:
                return tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=kernel, out_backprop=g,
                    strides=strides, padding=padding), kernel_gradient
            size = (tf.shape(x)[1], tf.shape(x)[2])
            return _input_gradient(g, kernel, size, layer.strides, padding), \
                kernel_gradient
        return layer.convolution_op(x, kernel), gradient

    # the kernel as the call reads it (cast under a mixed policy), a tensor
    return convolve(inputs, tf.convert_to_tensor(layer.kernel))


@contextlib.contextmanager
def recording(layers, keep_first_pass=False, xla=False):
    """Swap each layer's `call` for the same computation that appends (inputs,
    pre-activation outputs) to `records[layer]`, a `routed_pools` layer's for the same
    pooling with a cheaper gradient (`_routed_max_pool`, nothing recorded); yields
    `records`. A Conv2D's backward passes take the input gradient as a forward
    convolution (`_convolution`); with `keep_first_pass` (around a training step's
    pass) the first is TensorFlow's. xla: the pass is compiled with XLA."""
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
            z = _convolution(layer, inputs, keep_first_pass)
            if layer.use_bias:
                z = keras.ops.add(z, keras.ops.reshape(layer.bias, (1, 1, 1, layer.filters)))
            records[layer].append((inputs, z))
            return z if layer.activation is None else layer.activation(z)
        return call

    def normalization_call(layer):
        def call(inputs, training=None, mask=None):
            out = type(layer).call(layer, inputs, training=training, mask=mask)
            records[layer].append((inputs, out))
            return out
        return call

    def pool_call(layer):
        def call(inputs):
            return _routed_max_pool(inputs, tuple(layer.pool_size), xla)
        return call

    for layer in layers:
        if isinstance(layer, keras.layers.Dense):
            make = dense_call
        elif isinstance(layer, keras.layers.MaxPooling2D):
            make = pool_call
        elif isinstance(layer, keras.layers.BatchNormalization):
            make = normalization_call
        else:
            make = conv_call
        layer.call = make(layer)
    try:
        yield records
    finally:
        for layer in layers:
            del layer.call


class Outer(NamedTuple):
    """A Dense kernel's per-example gradients on vectors, g_n = x_n ⊗ δ_n + r (x, δ
    float32; r: the gradient common to every example, of the regularisation losses,
    float64, None: zero)."""

    x: tf.Tensor  # [B, in]
    d: tf.Tensor  # [B, out]
    r: tf.Tensor = None  # [in, out]


class Patches(NamedTuple):
    """A convolution's (or a Dense's on sequences) per-example gradients,
    g_n = s · Σ_t u_nt ⊗ δ_nt + r, u_nt the input patch under output position t: x its
    inputs, padded, δ its output gradients (float32), r as `Outer`'s (float64, [kh·kw,
    in·out]: one row per kernel offset; None: no shift), the kernel's geometry, and s
    a float32 scalar (None: 1; applied to the sums, far smaller than δ). A Dense on
    sequences is a 1×1 convolution over positions."""

    x: tf.Tensor  # [B, H, W, in]
    d: tf.Tensor  # [B, H', W', out]
    r: tf.Tensor = None
    kernel_size: tuple = (1, 1)
    strides: tuple = (1, 1)
    dilation: tuple = (1, 1)
    scale: tf.Tensor = None


def _scaled(t, scale):
    return t if scale is None else t * tf.cast(scale, t.dtype)


def _wide(t):
    return tf.cast(t, tf.float64)


#: Kernel entries (per example) of one piece of a convolution's per-example gradients
#: from the native op: as many kernel offsets as fit, at least one.
PIECE_ENTRIES = 1 << 16


def _offsets(p, ops=None):
    """The per-example gradients of a `Patches` part, a few kernel offsets (i, j) at a
    time: [B, offsets · in · out] float32 each, in the kernel's order. With `ops`
    (`native.choose`), the native op, as many offsets per piece as fit PIECE_ENTRIES
    (memory B · PIECE_ENTRIES, or B · in · out); else one batched matrix product of the
    inputs under each offset with δ (memory B · in · out)."""
    sums = _batched_sums(p) if ops is None else _native_sums(p, ops)
    for first, count, rows in sums:
        rows = _scaled(rows, p.scale)
        if p.r is not None:
            rows += tf.cast(tf.reshape(p.r[first:first + count], [1, -1]), tf.float32)
        yield rows


def _batched_sums(p):
    """(first offset, offsets, Σ_t u_nt ⊗ δ_nt [B, in · out]) of a `Patches` part, one
    kernel offset at a time (`_offsets` without the native op)."""
    b, (kh, kw), (sh, sw), (dh, dw) = tf.shape(p.x)[0], p.kernel_size, p.strides, p.dilation
    h, w = tf.shape(p.d)[1], tf.shape(p.d)[2]
    d = tf.reshape(p.d, [b, -1, tf.shape(p.d)[-1]])
    for i in range(kh):
        for j in range(kw):
            under = p.x[:, i * dh:i * dh + (h - 1) * sh + 1:sh,
                        j * dw:j * dw + (w - 1) * sw + 1:sw, :]
            rows = tf.matmul(tf.reshape(under, [b, -1, tf.shape(p.x)[-1]]), d,
                             transpose_a=True)  # [B, in, out]
            yield i * kw + j, 1, tf.reshape(rows, [b, -1])


def _native_sums(p, ops):
    """(first offset, offsets, Σ_t u_nt ⊗ δ_nt [B, offsets · in · out]) of a `Patches`
    part by the native op `InsightPatchGradients`, as many offsets at once as fit."""
    offsets = int(np.prod(p.kernel_size))
    entries = (p.x.shape[-1] or PIECE_ENTRIES) * (p.d.shape[-1] or 1)
    step = max(1, min(offsets, PIECE_ENTRIES // entries))
    for first in range(0, offsets, step):
        count = min(step, offsets - first)
        yield first, count, ops.insight_patch_gradients(
            p.x, p.d, p.kernel_size, p.strides, p.dilation, first=first, count=count)


def _pieces(p, ops=None):
    """A part's per-example gradients materialised piece by piece: [B, size_i] (float32
    for a convolution, else float64), whose concatenation is [B, size]; a
    convolution's by the native op of `ops` when given (`_offsets`)."""
    if isinstance(p, Patches):
        yield from _offsets(p, ops)
    elif isinstance(p, Outer):
        rows = tf.cast(tf.einsum("bi,bo->bio", p.x, p.d), tf.float64)
        yield tf.reshape(rows if p.r is None else rows + p.r, [tf.shape(p.x)[0], -1])
    else:
        yield p


def _materialise(p, ops=None):
    """A part's per-example gradients [B, size] float64 (`_pieces`)."""
    return tf.cast(tf.concat(list(_pieces(p, ops)), axis=1), tf.float64)


class Moments(NamedTuple):
    """What the instruments need of a batch's per-example gradients g_n, float64: per
    variable the mean (1/B) Σ_n g_n and Σ_n g_n² (elementwise, flattened), and per
    example ‖g_n‖², the projection g_nᵀ ḡ on the mean, and g_nᵀ v for each direction v
    asked for ([B] each)."""

    mean: list
    square_sum: list
    norms: tf.Tensor
    projections: tf.Tensor
    dots: list


def _outer_dots(p, directions):
    """g_nᵀ v [B] float64 of an `Outer` part for each v (float64, any shape of the
    kernel's size): one float32 product of the inputs with every v side by side, then
    the sums with δ in float64."""
    shape = [tf.shape(p.x)[-1], tf.shape(p.d)[-1]]
    vs = [tf.reshape(v, shape) for v in directions]
    along = tf.matmul(p.x, tf.concat([tf.cast(v, tf.float32) for v in vs], axis=1))
    along = tf.reshape(_wide(along), [tf.shape(p.x)[0], len(vs), shape[1]])
    dots = tf.unstack(tf.reduce_sum(along * _wide(p.d)[:, None, :], axis=2), axis=1)
    if p.r is None:
        return dots
    return [a + tf.reduce_sum(p.r * v) for a, v in zip(dots, vs)]


def _outer_moments(p, directions):
    """`Moments` of one `Outer` part (lists of one), from its factors: float32 matrix
    products of the layer's size, combined in float64."""
    b = tf.cast(tf.shape(p.x)[0], tf.float64)
    total = _wide(tf.matmul(p.x, p.d, transpose_a=True))
    mean = total / b
    square = _wide(tf.matmul(tf.square(p.x), tf.square(p.d), transpose_a=True))
    norms = _wide(tf.reduce_sum(tf.square(p.x), 1)) * _wide(tf.reduce_sum(tf.square(p.d), 1))
    shift = [] if p.r is None else [p.r]
    if shift:
        mean += p.r
        square += 2 * p.r * total + b * tf.square(p.r)
    slopes = _outer_dots(p, [mean, *directions, *shift])  # along r too, in one product
    if shift:  # ‖g_n‖² = ‖x_n‖² ‖δ_n‖² + 2 g_nᵀ r − ‖r‖²
        norms += 2 * slopes.pop() - tf.reduce_sum(tf.square(p.r))
    return Moments([tf.reshape(mean, [-1])], [tf.reshape(square, [-1])], norms, slopes[0],
                   slopes[1:])


def _piece_moments(p, directions, ops=None):
    """`Moments` of one part (lists of one), materialised piece by piece (`_pieces`),
    each piece's sums over B examples or its entries in its own dtype (a convolution's:
    float32, half the memory traffic), summed over the pieces in float64."""
    directions = [tf.reshape(v, [-1]) for v in directions]
    start, mean, square, norms, projections = 0, [], [], 0, 0
    dots = [0] * len(directions)
    for rows in _pieces(p, ops):
        size = tf.shape(rows)[1]
        piece_mean = tf.reduce_mean(rows, axis=0)
        squared = tf.square(rows)
        mean.append(_wide(piece_mean))
        square.append(_wide(tf.reduce_sum(squared, axis=0)))
        norms += _wide(tf.reduce_sum(squared, axis=1))
        projections += _wide(tf.linalg.matvec(rows, piece_mean))
        dots = [a + _wide(tf.linalg.matvec(rows, tf.cast(v[start:start + size], rows.dtype)))
                for a, v in zip(dots, directions)]
        start += size
    return Moments([tf.concat(mean, 0)], [tf.concat(square, 0)], norms, projections, dots)


class PerExample:
    """The per-example gradients g_n of some variables, each variable's either
    materialised [B, size] (float64) or kept as its factors (`Outer`, `Patches`). A
    Dense kernel's statistics are matrix products of the layer's size, not B copies of
    it; a convolution's are materialised once by `moments`, one kernel offset at a time
    (float32), their statistics summed in float64."""

    def __init__(self, parts, ops=None):
        self.parts = [p if isinstance(p, (Outer, Patches)) else tf.cast(p, tf.float64)
                      for p in parts]
        self.ops = ops  # the native op module (`native.choose`) for convolutions, or None

    def moments(self, directions=()):
        """`Moments`, with g_nᵀ v for each v in `directions` (a vector given per
        variable, any shapes), each part materialised at most once, piece by piece."""
        parts = []
        for i, p in enumerate(self.parts):
            along = [_wide(d[i]) for d in directions]
            parts.append(_outer_moments(p, along) if isinstance(p, Outer)
                         else _piece_moments(p, along, self.ops))
        return Moments([m.mean[0] for m in parts], [m.square_sum[0] for m in parts],
                       tf.add_n([m.norms for m in parts]),
                       tf.add_n([m.projections for m in parts]),
                       [tf.add_n([m.dots[k] for m in parts]) for k in range(len(directions))])

    def rows(self, i):
        """Variable i's per-example gradients, materialised: [B, size] float64."""
        return _materialise(self.parts[i], self.ops)

    def histogram2d(self, weights, bins, ranges):
        """Counts [bins[0], bins[1]] (int32) of every per-example gradient entry g_nj
        against its parameter's value w_j (`weights`, one per variable), each clipped
        into its range's outermost bin centres (Cockpit's GradHist2d)."""
        (gx_lo, gx_hi), (w_lo, w_hi) = ranges
        width_g, width_w = (gx_hi - gx_lo) / bins[0], (w_hi - w_lo) / bins[1]

        def index(values, lo, hi, width):
            values = tf.clip_by_value(values, lo + width / 2, hi - width / 2)
            return tf.cast(tf.floor((values - lo) / width), tf.int32)

        total = tf.zeros([bins[0] * bins[1]], tf.int32)
        for p, w in zip(self.parts, weights):
            w, start = tf.reshape(_wide(w), [1, -1]), 0
            for rows in _pieces(p, self.ops):
                size = tf.shape(rows)[1]
                g = index(rows, gx_lo, gx_hi, width_g)
                v = index(w[:, start:start + size], w_lo, w_hi, width_w)
                start += size
                cells = tf.reshape(g * bins[1] + v, [-1])
                # a constant size, as XLA needs (tf.math.bincount's depends on cells)
                total += tf.raw_ops.DenseBincount(input=cells, size=bins[0] * bins[1],
                                                  weights=tf.zeros([0], tf.int32))
        return tf.reshape(total, bins)

    def dots(self, direction):
        """g_nᵀ v [B] for one vector v given per variable (any shapes), from the factors:
        nothing is materialised."""
        total = 0
        for p, v in zip(self.parts, direction):
            v = tf.cast(v, tf.float64)
            if isinstance(p, Outer):
                total += _outer_dots(p, [v])[0]
            elif isinstance(p, Patches):  # the convolution with kernel v, against δ
                kernel = tf.reshape(v, [*p.kernel_size, tf.shape(p.x)[-1], tf.shape(p.d)[-1]])
                along = tf.nn.conv2d(p.x, tf.cast(kernel, tf.float32), p.strides, "VALID",
                                     dilations=p.dilation) * p.d
                total += _wide(_scaled(tf.reduce_sum(along, [1, 2, 3]), p.scale))
                if p.r is not None:
                    total += tf.reduce_sum(p.r * tf.reshape(v, tf.shape(p.r)))
            else:
                total += tf.linalg.matvec(p, tf.reshape(v, [-1]))
        return total


def _layer_units(layer, inputs):
    """What a layer's per-example gradients multiply its output gradients with, from
    its inputs (the same for every backward pass through it): the inputs of a Dense
    (on vectors [B, in], else [B, positions, 1, in]), a convolution's inputs padded
    [B, H, W, in], a normalisation's normalised inputs; float32."""
    inputs = tf.cast(inputs, tf.float32)
    if isinstance(layer, keras.layers.Dense) and inputs.shape.rank == 2:
        return inputs
    b = tf.shape(inputs)[0]
    if isinstance(layer, keras.layers.BatchNormalization):
        shape = [1] * inputs.shape.rank
        shape[layer.axis % inputs.shape.rank] = -1
        mean = tf.reshape(tf.cast(layer.moving_mean, tf.float32), shape)
        variance = tf.reshape(tf.cast(layer.moving_variance, tf.float32), shape)
        return (inputs - mean) / tf.sqrt(variance + layer.epsilon)
    if isinstance(layer, keras.layers.Conv2D):
        if layer.padding == "same":
            inputs = tf.pad(inputs, [[0, 0], *(_same_padding(
                tf.shape(inputs)[a + 1], layer.kernel_size[a], layer.strides[a],
                layer.dilation_rate[a]) for a in (0, 1)), [0, 0]])
        return inputs
    return tf.reshape(inputs, [b, -1, 1, tf.shape(inputs)[-1]])  # a Dense on sequences


def _same_padding(size, kernel, stride, dilation):
    """[before, after] of padding "same" on an axis of `size` (as TensorFlow's)."""
    out = (size + stride - 1) // stride
    total = tf.maximum((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return [total // 2, total - total // 2]


def _layer_gradients(layer, units, deltas, scale=None):
    """[(variable, part)] of a factored layer from its `_layer_units` and output
    gradients times `scale` (a float32 scalar, None: 1): per-example gradients
    [B, size], or a kernel's factors (`Outer`, `Patches`, without their shift r)."""
    b = tf.shape(deltas)[0]
    deltas = tf.cast(deltas, units.dtype)
    if isinstance(layer, keras.layers.BatchNormalization):
        # y = γ x̂ + β per channel: sums over all but the batch and channel axes
        rank = units.shape.rank
        others = [a for a in range(1, rank) if a != layer.axis % rank]
        out = []
        if getattr(layer, "gamma", None) is not None:
            out.append((layer.gamma, _scaled(tf.reduce_sum(deltas * units, axis=others),
                                             scale)))
        if getattr(layer, "beta", None) is not None:
            out.append((layer.beta, _scaled(tf.reduce_sum(deltas, axis=others), scale)))
        return out
    if units.shape.rank == 2:  # a Dense on vectors
        deltas = _scaled(deltas, scale)
        out = [(layer.kernel, Outer(units, deltas))]
        if layer.bias is not None:
            out.append((layer.bias, deltas))
        return out
    if isinstance(layer, keras.layers.Conv2D):
        part = Patches(units, deltas, None, layer.kernel_size, layer.strides,
                       layer.dilation_rate, scale)
    else:
        part = Patches(units, tf.reshape(deltas, [b, -1, 1, tf.shape(deltas)[-1]]),
                       scale=scale)
    out = [(layer.kernel, part)]
    if layer.bias is not None:
        out.append((layer.bias, _scaled(tf.reduce_sum(part.d, axis=[1, 2]), scale)))
    return out


def _combine(contributions):
    """One variable's part from the parts of its calls: several calls (a shared layer)
    materialise their sum."""
    if len(contributions) == 1:
        return contributions[0]
    return tf.add_n([_materialise(c) for c in contributions])


def _shifted(part, r):
    """A part with the gradient r (the variable's shape; None: zero) added to every
    example's."""
    if r is None:
        return part
    if isinstance(part, (Outer, Patches)):
        shape = tf.stack([tf.shape(part.x)[-1], tf.shape(part.d)[-1]])
        if isinstance(part, Patches):  # one row per kernel offset
            shape = tf.stack([int(np.prod(part.kernel_size)), shape[0] * shape[1]])
        return part._replace(r=tf.reshape(_wide(r), shape))
    return _wide(part) + tf.reshape(_wide(r), [1, -1])


def _factored_parts(layers, records, deltas_of, units=None, scale=None):
    """{id(variable): part} of the recorded `layers`, deltas_of(captured z's) giving the
    output gradients (to be multiplied by `scale`, a float32 scalar or None); `units`:
    their `_layer_units` in `records` order (computed if None)."""
    captured = [(layer, inputs, z) for layer in layers for inputs, z in records[layer]]
    deltas = deltas_of([z for _, _, z in captured])
    if units is None:
        units = [_layer_units(layer, inputs) for layer, inputs, _ in captured]
    contributions = {}
    for (layer, _, _), unit, delta in zip(captured, units, deltas):
        for v, part in _layer_gradients(layer, unit, delta, scale):
            if not isinstance(part, (Outer, Patches)):
                part = tf.cast(part, tf.float64)
            contributions.setdefault(id(v), (v, []))[1].append(part)
    return {key: _combine(parts) for key, (_, parts) in contributions.items()}


def _regularisation_gradients(model, variables):
    """The gradient of the model's regularisation losses w.r.t. each of `variables`:
    [tensor shaped like it, float64, or None where no regulariser reaches it]."""
    losses = model.losses
    if not losses:
        return [None] * len(variables)
    with tf.GradientTape() as tape:
        total = tf.add_n([tf.cast(loss, tf.float32) for loss in model.losses])
    return [None if g is None else _wide(g) for g in tape.gradient(total, variables)]


def _size(variable):
    return int(np.prod(variable.shape))


def flatten(tensors):
    """Tensors -> one float32 vector, in order."""
    return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(t), tf.float32), [-1])
                      for t in tensors], 0)


def _vectorized(x, y, outputs):
    """tf.vectorized_map over examples of `outputs(xi, yi) -> (loss, [variables' grads])`
    flattened: (losses [B], gradients [B, P])."""
    def one(example):
        xi, yi = _example(example)
        loss, grads = outputs(xi, yi)
        return tf.cast(loss, tf.float32), flatten(grads) if grads else tf.zeros([0])
    return tf.vectorized_map(one, (x, y))


def _split_layers(model, variables):
    layers = factored_layers(model, variables)
    factored = {id(v) for layer in layers for v in layer_variables(layer)}
    return layers, [v for v in variables if id(v) not in factored]


def losses_and_gradients(model, variables, x, y, ops=None):
    """(losses [B] float32, `PerExample` of `variables`): each example's compiled loss and
    gradient, training=False. ops: the native op module (`native.choose`) for the
    convolutions' per-example gradients, or None."""
    layers, others = _split_layers(model, variables)

    def loss_and_gradients(xi, yi):
        with tf.GradientTape() as tape:
            loss = compat.compute_loss(model, xi, yi, model(xi, training=False), False)
        return loss, tape.gradient(loss, others, unconnected_gradients=ZERO)

    parts = {}
    if others:
        losses, other_grads = _vectorized(x, y, loss_and_gradients)
        parts.update(zip(map(id, others), tf.split(other_grads, [_size(v) for v in others],
                                                   axis=1)))
    if layers:
        with recording(layers) as records, tf.GradientTape() as tape:
            outputs = model(x, training=False)
            loss = compat.compute_loss(model, x, y, outputs, False)
        zs = [z for layer in layers for _, z in records[layer]]
        deltas = tape.gradient(loss, zs)
        pass_losses, factored = _from_pass(model, variables, layers, records, deltas, y,
                                           outputs)
        parts.update(factored)
        if not others:
            losses = pass_losses
    return losses, PerExample([parts[id(v)] for v in variables], ops)


def _from_pass(model, variables, layers, records, deltas, y, outputs):
    """(losses [B], {id(variable): part}) of the factored `layers` from one pass over
    the batch: their `recording`, the gradients of the batch-mean loss w.r.t. their
    recorded outputs (`deltas`, in `records` order) and the model's `outputs`."""
    b = tf.shape(tf.nest.flatten(outputs)[0])[0]
    scale = tf.cast(b, tf.float32)  # Σ_n ℓ_n = B · the mean: per-example deltas
    deltas = iter([tf.cast(d, tf.float32) for d in deltas])
    factored = _factored_parts(layers, records, lambda zs: [next(deltas) for _ in zs],
                               scale=scale)
    parts = {}
    shifted = [v for v in variables if id(v) in factored]
    for v, r in zip(shifted, _regularisation_gradients(model, shifted)):
        parts[id(v)] = _shifted(factored[id(v)], r)
    # each example's loss from its outputs, without the model
    losses = tf.vectorized_map(lambda e: tf.cast(compat.compute_loss(
        model, None, *_example(e), False), tf.float32), (y, tf.stop_gradient(outputs)))
    return losses, parts


def training_pass_layers(model, variables):
    """The layers whose records `from_training_pass` needs, or None when the training
    pass cannot give every variable's per-example gradient: a variable outside a Dense
    or Conv2D layer, or a BatchNormalization layer (it mixes the examples of a batch
    in training)."""
    layers, others = _split_layers(model, variables)
    if others or not layers or any(isinstance(layer, keras.layers.BatchNormalization)
                                   for layer in model._flatten_layers(include_self=False)):
        return None
    return layers


def from_training_pass(model, variables, layers, records, deltas, y, outputs, ops=None):
    """(losses [B], `PerExample` of `variables`) from the training step's own forward
    and backward pass: `records` of `recording(layers)` around its forward pass, the
    gradients of its (unscaled) batch-mean loss w.r.t. the recorded outputs, its
    targets `y` and the model's `outputs`; ops as `losses_and_gradients`'s."""
    losses, parts = _from_pass(model, variables, layers, records, deltas, y, outputs)
    return losses, PerExample([parts[id(v)] for v in variables], ops)


def _logit_factors(model, x, y, logits, head):
    """S [B, k, k] with S_n S_nᵀ = H_n, the Hessian of example n's loss w.r.t. its logits,
    from its eigendecomposition: column c is √λ_nc times the eigenvector of the c-th
    smallest eigenvalue λ_nc, taken as 0 where negative or at most 1e-6 of the largest
    (the float32 solver's round-off: a softmax cross-entropy's Hessian is singular,
    its rows sum to 0)."""
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
    values = tf.where(values > 1e-6 * values[:, -1:], values, 0.0)
    return vectors * tf.sqrt(values)[:, None, :]


def ggn_diagonal_sum(model, variables, x, y, training_pass=None, ops=None, xla=False):
    """[Σ_n diag(J_nᵀ H_n J_n), flattened] float64 per variable: J_n the Jacobian of
    example n's logits (the output before a final softmax or sigmoid,
    `compat.split_at_logits`), H_n the Hessian of its loss w.r.t. them. With
    H_n = S_n S_nᵀ it is Σ_c Σ_n (J_nᵀ s_nc)²: for the Dense and Conv2D layers one
    backward pass of the batch per column c of S. From a forward pass of its own
    (training=False), or from the training step's (`training_pass`: the `recording`
    of `training_pass_layers` around it, its persistent tape and the model's
    outputs). ops: the native op module (`native.choose`) for the convolutions' sums,
    or None; xla: compiled with XLA (`recording`'s)."""
    layers, others = _split_layers(model, variables)
    if training_pass is None:
        with recording(layers + routed_pools(model), xla=xla) as records, \
                tf.GradientTape(persistent=True) as tape:
            outputs = model(x, training=False)
    else:
        records, tape, outputs = training_pass
    logits, head = compat.split_at_logits(outputs)
    k = int(np.prod(logits.shape[1:]))  # the logits of one example
    factors = tf.cast(tf.stop_gradient(_logit_factors(model, x, y, logits, head)),
                      logits.dtype)
    units = [_layer_units(layer, inputs) for layer in layers for inputs, _ in records[layer]]
    factored = [v for layer in layers for v in layer_variables(layer)]

    def column_sums(c):  # [Σ_n (J_nᵀ s_nc)² per factored variable]
        column = tf.reshape(factors[:, :, c], tf.shape(logits))
        parts = _factored_parts(layers, records, lambda zs: tape.gradient(
            logits, zs, output_gradients=column), units)
        return [_square_sum(parts[id(v)], ops) for v in factored]

    columns = []
    if layers:  # the smallest eigenvalue's column is skipped where zero for every example
        columns = [column_sums(c) for c in range(1, k)] + [tf.cond(
            tf.reduce_any(tf.not_equal(factors[:, :, 0], 0.0)), lambda: column_sums(0),
            lambda: [tf.zeros([_size(v)], tf.float64) for v in factored])]
    sums = {id(v): tf.add_n(list(s)) for v, *s in zip(factored, *columns)}
    if others:
        sums.update(zip(map(id, others), tf.split(
            tf.cast(_others_ggn(model, others, x, y), tf.float64),
            [_size(v) for v in others])))
    return [sums[id(v)] for v in variables]


def _square_sum(part, ops=None):
    """Σ_n g_n², elementwise and flattened (float64), of a part without its shift; a
    `Patches` part's by the native op of `ops` (`native.choose`) when given."""
    if isinstance(part, Outer):
        return tf.reshape(_wide(tf.matmul(tf.square(part.x), tf.square(part.d),
                                          transpose_a=True)), [-1])
    if isinstance(part, Patches) and ops is not None:
        return _scaled(ops.insight_patch_square_sums(part.x, part.d, part.kernel_size,
                                                     part.strides, part.dilation),
                       None if part.scale is None else tf.square(part.scale))
    if isinstance(part, Patches):  # no shift: r None
        return tf.concat([tf.cast(tf.reduce_sum(tf.square(rows), axis=0), tf.float64)
                          for rows in _offsets(part)], 0)
    return tf.reduce_sum(tf.square(part), axis=0)


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
