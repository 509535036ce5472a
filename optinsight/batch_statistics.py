"""Per-example statistics of one batch, computed in the graph: what Cockpit's
instruments need (`optinsight.instruments` gives each instrument's formula).

The per-example gradients g_n (n = 1..B) of the compiled loss are taken vectorised, one
backward pass per example batched by `tf.vectorized_map`, with training=False (as
Cockpit's per-example gradients: a batch-normalised or dropout network's training-mode
gradient is not a sum of per-example ones). Everything is reduced on the device to a
few scalars: nothing of size O(parameters) leaves it.

Cost per layer type, for B examples and P parameters: the vectorised backward pass of
B single examples (Dense, Embedding, normalisation and attention layers vectorise into
batched matrix products, about one more backward pass of the batch; a Conv2D's or
DepthwiseConv2D's filter gradient does not vectorise and becomes a loop over the
examples, about B backward passes of one example); then O(B·P) for the sums. The TIC's
curvature adds, per example, the Jacobian of the k logits (k backward passes).
Memory: the per-example gradients, B × P × 4 bytes, and their float64 sums, 3 × P × 8.
"""

import tensorflow as tf

from optinsight import compat

GSNR_EPSILON = 1e-5  # Cockpit's stabilising constant of mean_gsnr
EB_EPSILON = 1e-5  # Cockpit's stabilising constant of early_stopping
TIC_EPSILON = 1e-7  # Cockpit's stabilising constant of the TIC

#: The scalars `batch_sums` returns; with a curvature also CURVATURE_SUMS.
SUMS = ("batch_size", "parameters", "loss", "loss_variance", "gradient_sq", "norms_sum",
        "projections_sq", "gsnr_sum", "eb_sum")
CURVATURE_SUMS = ("tic_sum", "moment_sum", "curvature_sum")


def _example(batch):
    """The nest of one example, with its batch axis of 1."""
    return tf.nest.map_structure(lambda t: t[None], batch)


def per_example_gradients(model, variables, x, y):
    """(losses [B], gradients [B, P]) float32: each example's compiled loss and its
    gradient w.r.t. `variables` (flattened in order), training=False."""
    zero = tf.UnconnectedGradients.ZERO

    def one(example):
        xi, yi = _example(example)
        with tf.GradientTape() as tape:
            loss = compat.compute_loss(model, xi, yi, model(xi, training=False), False)
        grads = tape.gradient(loss, variables, unconnected_gradients=zero)
        return tf.cast(loss, tf.float32), tf.concat(
            [tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]) for g in grads], 0)

    return tf.vectorized_map(one, (x, y))


def ggn_diagonal_sum(model, variables, x, y):
    """Σ_n diag(J_nᵀ H_n J_n) [P] float32: J_n the Jacobian of example n's logits (the
    output before a final softmax or sigmoid, `compat.split_at_logits`), H_n the
    Hessian of its loss w.r.t. them; training=False."""
    zero = tf.UnconnectedGradients.ZERO

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
        parts = outer.jacobian(flat, variables, unconnected_gradients=zero)
        jacobian = tf.concat([tf.reshape(p, [k, -1]) for p in parts], axis=1)
        return tf.cast(tf.einsum("cp,cd,dp->p", jacobian, hessian, jacobian), tf.float32)

    return tf.reduce_sum(tf.vectorized_map(one, (x, y)), axis=0)


def batch_sums(losses, gradients, curvature_sum=None):
    """{SUMS key: float64 scalar} of per-example `losses` [B] and `gradients` [B, P]:
    with g the mean gradient and p_n = g_nᵀ g, the batch size B, P, the mean loss and
    its sample variance, ‖g‖², Σ_n ‖g_n‖², Σ_n p_n², Σ_j g_j² / (v_j + 1e-5) with v_j
    the variance (1/B) of the g_nj, and Σ_j g_j² / (s_j² + 1e-5) with s_j² their sample
    variance (1/(B − 1)). With `curvature_sum` [P] (`ggn_diagonal_sum`), also the TIC's
    Σ_j m_j / (h_j + 1e-7), Σ_j m_j and Σ_j h_j, m = (1/B) Σ_n g_n² and h its mean
    curvature."""
    g = tf.cast(gradients, tf.float64)
    losses = tf.cast(losses, tf.float64)
    b = tf.cast(tf.shape(g)[0], tf.float64)
    mean = tf.reduce_mean(g, axis=0)
    squares = tf.reduce_sum(tf.square(g), axis=0)
    projections = tf.linalg.matvec(g, mean)
    loss = tf.reduce_mean(losses)
    out = {
        "batch_size": b, "parameters": tf.cast(tf.shape(g)[1], tf.float64), "loss": loss,
        "loss_variance": tf.reduce_sum(tf.square(losses - loss)) / (b - 1),
        "gradient_sq": tf.reduce_sum(tf.square(mean)),
        "norms_sum": tf.reduce_sum(squares),
        "projections_sq": tf.reduce_sum(tf.square(projections)),
        "gsnr_sum": tf.reduce_sum(tf.square(mean) / (squares / b - tf.square(mean)
                                                     + GSNR_EPSILON)),
        "eb_sum": tf.reduce_sum(tf.square(mean) / ((squares - b * tf.square(mean)) / (b - 1)
                                                   + EB_EPSILON)),
    }
    if curvature_sum is not None:
        moment, curvature = squares / b, tf.cast(curvature_sum, tf.float64) / b
        out.update({"tic_sum": tf.reduce_sum(moment / (curvature + TIC_EPSILON)),
                    "moment_sum": tf.reduce_sum(moment),
                    "curvature_sum": tf.reduce_sum(curvature)})
    return out


def projection_moments(gradients, direction):
    """(mean, sample variance (1/(B − 1))) float64 of the per-example slopes along
    `direction` [P], g_nᵀ d / ‖d‖ (Cockpit's Alpha; 0 and 0 for d = 0)."""
    g = tf.cast(gradients, tf.float64)
    d = tf.cast(direction, tf.float64)
    norm = tf.norm(d)
    slopes = tf.math.divide_no_nan(tf.linalg.matvec(g, d), norm)
    mean = tf.reduce_mean(slopes)
    b = tf.cast(tf.shape(slopes)[0], tf.float64)
    return mean, tf.reduce_sum(tf.square(slopes - mean)) / (b - 1)
