"""The sums Cockpit's instruments need, from the per-example losses and gradients of
one batch (`per_example`), computed in the graph in float64 (a convolution's pieces
summed in float32 first): nothing of size O(parameters) leaves the device.
`optinsight.instruments` gives each instrument's formula from them. Memory: the
materialised per-example gradients (at most B × 4 bytes per convolution parameter,
B × 8 per other parameter outside Dense kernels) and a few P-vectors.
"""

import tensorflow as tf

GSNR_EPSILON = 1e-5  # Cockpit's stabilising constant of mean_gsnr
EB_EPSILON = 1e-5  # Cockpit's stabilising constant of early_stopping
TIC_EPSILON = 1e-7  # Cockpit's stabilising constant of the TIC

#: The scalars `batch_sums` returns; with a curvature also CURVATURE_SUMS.
SUMS = ("batch_size", "parameters", "loss", "loss_variance", "gradient_sq", "norms_sum",
        "projections_sq", "gsnr_sum", "eb_sum")
CURVATURE_SUMS = ("tic_sum", "moment_sum", "curvature_sum")


def batch_sums(losses, moments, curvature_sum=None):
    """{SUMS key: float64 scalar} of per-example `losses` [B] and the `moments` of the
    per-example gradients (`per_example.PerExample.moments`): with g the mean gradient
    and p_n = g_nᵀ g, the batch size B, P, the mean loss and its sample variance, ‖g‖²,
    Σ_n ‖g_n‖², Σ_n p_n²,
    Σ_j g_j² / (v_j + 1e-5) with v_j the variance (1/B) of the g_nj, and
    Σ_j g_j² / (s_j² + 1e-5) with s_j² their sample variance (1/(B − 1)). With
    `curvature_sum` ([Σ_n diag(J_nᵀ H_n J_n)] per variable, `ggn_diagonal_sum`), also
    the TIC's Σ_j m_j / (h_j + 1e-7), Σ_j m_j and Σ_j h_j, m = (1/B) Σ_n g_n² and h
    the mean curvature."""
    b = tf.cast(tf.shape(losses)[0], tf.float64)
    mean = tf.concat(moments.mean, 0)
    squares = tf.concat(moments.square_sum, 0)
    out = {
        "batch_size": b, "parameters": tf.cast(tf.size(mean), tf.float64),
        **loss_moments(losses), "gradient_sq": tf.reduce_sum(tf.square(mean)),
        "norms_sum": tf.reduce_sum(moments.norms),
        "projections_sq": tf.reduce_sum(tf.square(moments.projections)),
        "gsnr_sum": tf.reduce_sum(tf.square(mean) / (squares / b - tf.square(mean)
                                                     + GSNR_EPSILON)),
        "eb_sum": tf.reduce_sum(tf.square(mean) / ((squares - b * tf.square(mean)) / (b - 1)
                                                   + EB_EPSILON)),
    }
    if curvature_sum is not None:
        moment = squares / b
        curvature = tf.concat(curvature_sum, 0) / b
        out.update({"tic_sum": tf.reduce_sum(moment / (curvature + TIC_EPSILON)),
                    "moment_sum": tf.reduce_sum(moment),
                    "curvature_sum": tf.reduce_sum(curvature)})
    return out


def loss_moments(losses):
    """{"loss": the mean of per-example `losses` [B], "loss_variance": their sample
    variance (1/(B − 1))}, float64."""
    losses = tf.cast(losses, tf.float64)
    loss = tf.reduce_mean(losses)
    b = tf.cast(tf.shape(losses)[0], tf.float64)
    return {"loss": loss, "loss_variance": tf.reduce_sum(tf.square(losses - loss)) / (b - 1)}


def projection_moments(dots, direction):
    """(mean, sample variance (1/(B − 1))) float64 of the per-example slopes along a
    direction d given per variable, g_nᵀ d / ‖d‖, from dots = g_nᵀ d [B] (Cockpit's
    Alpha; 0 and 0 for d = 0)."""
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(d, tf.float64)))
                             for d in direction]))
    slopes = tf.math.divide_no_nan(dots, norm)
    mean = tf.reduce_mean(slopes)
    b = tf.cast(tf.shape(slopes)[0], tf.float64)
    return mean, tf.reduce_sum(tf.square(slopes - mean)) / (b - 1)
