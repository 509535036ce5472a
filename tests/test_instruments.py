"""Cockpit's single-batch instruments (issue 30), each against a brute-force
computation: per-example gradients one example at a time with tf.GradientTape, and the
statistics of each definition written out with numpy (sample variances, projections)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import loop_gradients

from optinsight import instruments, native, per_example


def loop_ggn_diagonal(model, x, y):
    """(1/B) Σ_n diag(J_nᵀ H_n J_n), J_n of the logits, one example at a time, with
    dense Jacobians taken row by row (no vectorisation). A softmax or sigmoid output's
    logits are its input (Keras keeps them on the output), and the Hessian of the
    cross-entropy w.r.t. them is diag(p) − ppᵀ, or diag(p(1 − p)) / k for k sigmoids
    (the mean over them); another output's by a tape."""
    total = 0
    for i in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            output = model(x[i:i + 1], training=False)
            logits = getattr(output, "_keras_logits", output)
            with tf.GradientTape() as inner:
                inner.watch(output)
                loss = model.compute_loss(x=x[i:i + 1], y=y[i:i + 1], y_pred=output)
            slope = inner.gradient(loss, output)
            flat = tf.reshape(logits, [-1])
        k = int(flat.shape[0])
        if logits is output:
            hessian = tf.reshape(tape.jacobian(slope, output, experimental_use_pfor=False),
                                 [k, k]).numpy()
        else:
            p = output.numpy().reshape(-1).astype(np.float64)
            if model.layers[-1].activation.__name__ == "sigmoid":
                hessian = np.diag(p * (1 - p)) / k
            else:
                hessian = np.diag(p) - np.outer(p, p)
        parts = tape.jacobian(flat, model.trainable_variables, experimental_use_pfor=False,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        jacobian = np.concatenate([np.reshape(p, (k, -1)) for p in parts], axis=1)
        total = total + np.sum(jacobian * (hessian @ jacobian), axis=0)
    return np.asarray(total, np.float64) / len(x)


def dense_hessian_diagonal(model, x, y):
    """The diagonal of the batch loss's Hessian, from the dense Hessian."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False))
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    rows = outer.jacobian(gradient, variables, experimental_use_pfor=False)
    hessian = np.concatenate([np.reshape(r, (len(gradient), -1)) for r in rows], axis=1)
    return np.diag(hessian).astype(np.float64)


def by_definition(gradients, loss, lr, curvature):
    """Each instrument as its paper states it."""
    b = len(gradients)
    g = gradients.mean(axis=0)
    moment = np.mean(gradients**2, axis=0)
    projections = gradients @ g
    orthogonal = gradients - np.outer(projections / (g @ g), g)
    return {
        "mean_gsnr": np.mean(g**2 / (gradients.var(axis=0) + 1e-5)),
        "norm_test": np.sqrt(np.sum(np.square(gradients - g)) / (b - 1) / b) / np.linalg.norm(g),
        "inner_test": np.sqrt(projections.var(ddof=1) / b) / (g @ g),
        "ortho_test": np.sqrt(np.sum(np.square(orthogonal)) / (b - 1) / b)
        / np.linalg.norm(g),
        "cabs": lr * np.trace(np.cov(gradients.T)) * (b - 1) / (b * loss),
        "early_stopping": 1 - b * np.mean(g**2 / (gradients.var(axis=0, ddof=1) + 1e-5)),
        "tic_diag": np.sum(moment / (curvature + 1e-7)),
        "tic_trace": np.sum(moment) / (np.sum(curvature) + 1e-7),
    }


def model_of(kind):
    """A small model of each layer type the architectures test uses."""
    keras.utils.set_random_seed(0)
    if kind == "mlp":
        layers = [keras.Input((6,)), keras.layers.Dense(8, activation="tanh")]
    elif kind == "cnn":
        layers = [keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="relu"),
                  keras.layers.DepthwiseConv2D(3), keras.layers.BatchNormalization(),
                  keras.layers.Flatten()]
    else:  # a small transformer block on token ids
        tokens = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(11, 8)(tokens)
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        h = keras.layers.LayerNormalization()(h + attention(h, h))
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(h))
    return keras.Sequential(layers + [keras.layers.Dense(3, activation="softmax")])


def batch_of(model, rng, n):
    if model.input_shape[1:] == (5,):
        return rng.integers(0, 11, size=(n, 5)).astype("int32")
    return rng.normal(size=(n, *model.input_shape[1:])).astype("float32")


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_every_instrument_equals_its_definition(kind):
    """Dense, Conv2D, DepthwiseConv2D, BatchNormalization, Embedding,
    MultiHeadAttention and LayerNormalization, to 1e-5 relative."""
    rng = np.random.default_rng(1)
    model = model_of(kind)
    x = batch_of(model, rng, 16)
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    factored = {type(layer).__name__ for layer in
                per_example.factored_layers(model, model.trainable_variables)}
    assert factored == {"mlp": {"Dense"}, "cnn": {"Conv2D", "BatchNormalization", "Dense"},
                        "transformer": {"Dense"}}[kind]
    gradients = loop_gradients(model, x, y)
    loss = float(model.compute_loss(x=x, y=y, y_pred=model(x, training=False)))
    expected = by_definition(gradients, loss, 0.05, loop_ggn_diagonal(model, x, y))
    got = instruments.compute(model, x, y)
    assert set(got) == set(instruments.NAMES) == set(expected)
    for name in instruments.NAMES:
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name
    assert instruments.compute(model, x, y, names=["norm_test"]) == {
        "norm_test": pytest.approx(got["norm_test"], rel=1e-12)}


def test_cabs_and_early_stopping_are_for_plain_sgd_only():
    rng = np.random.default_rng(2)
    model = model_of("mlp")
    x = batch_of(model, rng, 8)
    y = keras.utils.to_categorical(rng.integers(0, 3, 8), 3)
    for optimizer in (keras.optimizers.Adam(1e-3), keras.optimizers.SGD(0.1, momentum=0.9)):
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        got = instruments.compute(model, x, y)
        assert got["cabs"] is None and got["early_stopping"] is None
        assert np.isfinite(got["norm_test"])
    with pytest.raises(ValueError, match="unknown instrument 'alpha'"):
        instruments.compute(model, x, y, names=["alpha"])


def test_the_tic_curvature_is_the_hessian_diagonal_of_a_piecewise_linear_network():
    """ReLU and max-pooling, ending in logits: the Gauss-Newton diagonal is the Hessian's
    (Cockpit's default curvature), here against the dense Hessian."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
        keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, 12)
    diagonal = dense_hessian_diagonal(model, x, y)
    ggn = np.concatenate(tf.function(lambda: per_example.ggn_diagonal_sum(
        model, model.trainable_variables, x, y))()) / len(x)
    np.testing.assert_allclose(ggn, diagonal,
                               rtol=1e-4, atol=1e-7 * np.abs(diagonal).max())
    moment = np.mean(loop_gradients(model, x, y) ** 2, axis=0)
    got = instruments.compute(model, x, y, names=["tic_diag", "tic_trace"])
    assert got["tic_trace"] == pytest.approx(moment.sum() / (diagonal.sum() + 1e-7), rel=1e-5)
    assert got["tic_diag"] == pytest.approx(np.sum(moment / (diagonal + 1e-7)), rel=1e-4)


@pytest.mark.parametrize("loss", ["mse", "binary_crossentropy"])
def test_the_gauss_newton_diagonal_of_losses_without_a_null_direction(loss):
    """A mean squared error's Hessian w.r.t. the outputs is 2/k · I, a sigmoid
    cross-entropy's diagonal: no column of their factors is zero (a softmax
    cross-entropy's smallest is, and is skipped), against one example at a time."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((5, 5, 1)), keras.layers.Conv2D(2, 2, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
        keras.layers.Dense(3, activation=None if loss == "mse" else "sigmoid")])
    model.compile(optimizer="sgd", loss=loss)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(9, 5, 5, 1)).astype("float32")
    y = (rng.normal(size=(9, 3)) if loss == "mse" else rng.integers(0, 2, (9, 3))
         ).astype("float32")
    ggn = np.concatenate(tf.function(lambda: per_example.ggn_diagonal_sum(
        model, model.trainable_variables, x, y))())
    expected = loop_ggn_diagonal(model, x, y) * len(x)
    np.testing.assert_allclose(ggn, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("shape,size,dtype", [
    ((3, 7, 9, 2), (2, 2), "float32"), ((2, 8, 9, 3), (2, 3), "float32"),
    ((2, 9, 9, 1), (3, 3), "float16"), ((2, 6, 6, 2), (1, 2), "float32")])
def test_routed_max_pooling_has_tensorflows_values_and_gradient(shape, size, dtype):
    """The TIC's cheaper max pooling against TensorFlow's, bit for bit: windows with
    ties (small integers), NaN, −inf, and rows and columns left over; under XLA (by
    the mask) on finite inputs, where XLA's own pooling has other NaN semantics."""
    rng = np.random.default_rng(0)
    finite = rng.integers(0, 3, shape).astype(dtype)
    x = finite.copy()
    x[0, 0, 0, 0], x[0, 1, 1, 0], x[-1, :size[0], :size[1], -1] = np.nan, np.nan, -np.inf
    g = tf.constant(rng.normal(size=(shape[0], shape[1] // size[0], shape[2] // size[1],
                                     shape[3])).astype(dtype))

    def pooled(pool, x):  # the values, and the first and a later backward pass
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            out = pool(x)
        return out, *[tape.gradient(out, x, output_gradients=g) for _ in range(2)]

    def theirs(t):
        return tf.nn.max_pool2d(t, size, size, "VALID")

    def ours(t, xla=False):
        return per_example._routed_max_pool(t, size, xla)

    for inputs, run, pool in [(x, pooled, ours), (x, tf.function(pooled), ours),
                              (finite, tf.function(pooled, jit_compile=True),
                               lambda t: ours(t, xla=True))]:
        inputs = tf.constant(inputs)
        for a, b in zip(pooled(theirs, inputs), run(pool, inputs)):
            np.testing.assert_array_equal(a, b)
    model = keras.Sequential([keras.Input(shape[1:]), keras.layers.MaxPooling2D(size),
                              keras.layers.MaxPooling2D(2, strides=1)])
    assert per_example.routed_pools(model) == model.layers[:1]


@pytest.mark.parametrize("kernel,strides,padding,size", [
    (3, 1, "valid", (9, 8)), (3, 1, "same", (9, 8)), (1, 2, "same", (8, 7)),
    (1, 2, "valid", (7, 7)), ((3, 2), (2, 3), "same", (9, 10)), (4, 3, "valid", (11, 9)),
    (2, 2, "same", (5, 6))])
@pytest.mark.parametrize("keep_first_pass", [True, False])
def test_recorded_convolutions_have_tensorflows_gradients(kernel, strides, padding, size,
                                                          keep_first_pass):
    """A recorded Conv2D's first and later backward passes (its input gradient as a
    forward convolution, `per_example._input_gradient`, in all but a training step's
    first) against TensorFlow's gradient of the layer's own call, with either padding,
    strides that leave rows and columns over, and kernels wider than tall."""
    rng = np.random.default_rng(1)
    layer = keras.layers.Conv2D(4, kernel, strides=strides, padding=padding)
    x = tf.constant(rng.normal(size=(3, *size, 2)).astype("float32"))
    out = layer(x)
    g = [tf.constant(rng.normal(size=out.shape).astype("float32")) for _ in range(2)]

    def gradients(layers):  # (input gradient, kernel gradient) of two passes
        with per_example.recording(layers, keep_first_pass) as records, \
                tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            z = layer(x)
        assert len(records.get(layer, [None])) == 1
        return [tape.gradient(z, [x, layer.kernel], output_gradients=d) for d in g]

    theirs = gradients([])
    for ours in (gradients([layer]), tf.function(gradients)([layer])):
        for a, b in zip(tf.nest.flatten(theirs), tf.nest.flatten(ours)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def materialised(losses, per_example_gradients):
    """(losses, [B, P]) of a PerExample, its factored parts multiplied out."""
    parts = range(len(per_example_gradients.parts))
    return losses, tf.concat([per_example_gradients.rows(i) for i in parts], axis=1)


def check_statistics(model, x, y, expected, ops=None):
    """PerExample's moments, dots along a direction and 2-D histogram against those of
    the loop gradients `expected` [B, P] (ops: `losses_and_gradients`')."""
    variables = model.trainable_variables
    rng = np.random.default_rng(7)
    direction = [rng.normal(size=v.shape).astype("float32") for v in variables]
    ranges = ((-0.5, 0.5), (-1, 1))

    @tf.function
    def statistics():
        _, gradients = per_example.losses_and_gradients(model, variables, x, y, ops)
        moments = gradients.moments([direction])
        return (tf.concat(moments.mean, 0), tf.concat(moments.square_sum, 0), moments.norms,
                moments.projections, moments.dots[0], gradients.dots(direction),
                gradients.histogram2d(variables, (6, 5), ranges))

    mean, square_sum, norms, projections, dots, factored_dots, counts = statistics()
    v = np.concatenate([d.ravel() for d in direction])
    for got, want in [(mean, expected.mean(0)), (square_sum, np.sum(expected**2, 0)),
                      (norms, np.sum(expected**2, 1)),
                      (projections, expected @ expected.mean(0)), (dots, expected @ v),
                      (factored_dots, expected @ v)]:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    w = np.concatenate([np.ravel(v.numpy()) for v in variables])
    (g_lo, g_hi), (w_lo, w_hi) = ranges
    g = np.clip(expected, g_lo + 1 / 12, g_hi - 1 / 12).ravel()
    w = np.tile(np.clip(w, w_lo + 1 / 5, w_hi - 1 / 5), len(expected))
    want, _, _ = np.histogram2d(g, w, bins=(6, 5), range=ranges)
    assert counts.numpy().sum() == expected.size
    assert np.abs(counts.numpy() - want).sum() <= 4  # entries at a bin edge, either side


def test_factored_per_example_gradients_of_every_dense_and_conv2d_form():
    """Strided and dilated convolutions with either padding, batch normalisation in
    inference (with moving statistics away from 0 and 1), a Dense on a sequence,
    Dense layers used twice on sequences and on vectors, and kernel regularisers (in
    every example's loss) on a convolution and on a Dense kept as its factors, to
    1e-5."""
    keras.utils.set_random_seed(5)
    images = keras.Input((9, 9, 2))
    h = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu",
                            kernel_regularizer=keras.regularizers.L2(0.01))(images)
    normalisation = keras.layers.BatchNormalization()
    h = normalisation(h)
    h = keras.layers.Conv2D(4, 2, dilation_rate=2, activation="tanh")(h)
    h = keras.layers.Reshape((-1, 4))(h)  # a sequence of positions
    shared = keras.layers.Dense(4, activation="tanh")
    h = shared(shared(h))
    h = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Dense(2)(h)))
    shared_on_vectors = keras.layers.Dense(2, activation="tanh")
    h = shared_on_vectors(shared_on_vectors(h))
    model = keras.Model(images, keras.layers.Dense(
        3, activation="softmax", kernel_regularizer=keras.regularizers.L2(0.02))(h))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    rng = np.random.default_rng(6)
    normalisation.moving_mean.assign(rng.normal(size=3))  # as after some training
    normalisation.moving_variance.assign(rng.uniform(0.5, 2, size=3))
    x = rng.normal(size=(7, 9, 9, 2)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 7), 3)
    variables = model.trainable_variables
    assert len(per_example.factored_layers(model, variables)) == 8
    expected = loop_gradients(model, x, y)
    for ops in (None, native.load()):  # convolutions' per-example gradients by TF, natively
        losses, gradients = tf.function(lambda ops=ops: materialised(
            *per_example.losses_and_gradients(model, variables, x, y, ops)))()
        np.testing.assert_allclose(gradients.numpy(), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())
        check_statistics(model, x, y, expected, ops)
    np.testing.assert_allclose(losses.numpy(), [
        float(model.compute_loss(x=x[i:i + 1], y=y[i:i + 1], y_pred=model(x[i:i + 1])))
        for i in range(len(x))], rtol=1e-6)
    expected = loop_ggn_diagonal(model, x, y) * len(x)
    for ops in (None, native.load()):  # the convolutions' sums by TensorFlow, natively
        ggn = np.concatenate(tf.function(lambda ops=ops: per_example.ggn_diagonal_sum(
            model, variables, x, y, ops=ops))())
        np.testing.assert_allclose(ggn, expected, rtol=1e-4,
                                   atol=1e-6 * np.abs(expected).max())
