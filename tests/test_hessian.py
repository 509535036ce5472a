"""Hessian probes against the dense Hessian of a small float64 model (nested tapes)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import optinsight as oi
from optinsight.probes import hessian


def small_model(seed=3):
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((5,), dtype="float64")
    h = keras.layers.Dense(6, activation="tanh", name="h", dtype="float64")(x_in)
    out = keras.layers.Dense(3, activation="softmax", name="out", dtype="float64")(h)
    model = keras.Model(x_in, out)
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss="categorical_crossentropy")
    return model


def small_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    y = keras.utils.to_categorical(rng.integers(0, 3, n), 3).astype("float64")
    return x, y


def dense_hessian(model, x, y, variables=None):
    variables = variables or model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, model(x)))
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    jac = outer.jacobian(flat, variables)
    return np.concatenate([np.reshape(j, (flat.shape[0], -1)) for j in jac], axis=1)


@pytest.fixture(scope="module")
def setup():
    keras.config.set_floatx("float64")  # the compiled loss computes in floatx
    try:
        model = small_model()
        x, y = small_data()
        yield model, x, y, dense_hessian(model, x, y)
    finally:
        keras.config.set_floatx("float32")


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_hvp_matches_dense(setup, method):
    model, x, y, H = setup
    v = np.random.default_rng(1).normal(size=H.shape[0])
    np.testing.assert_allclose(hessian.hvp(model, x, y, v, method=method), H @ v,
                               rtol=1e-9, atol=1e-12)
    parts = hessian.hvp(model, x, y, [np.reshape(p, w.shape) for p, w in zip(
        np.split(v, np.cumsum([np.prod(w.shape) for w in model.trainable_variables])[:-1]),
        model.trainable_variables)], method=method)
    np.testing.assert_allclose(np.concatenate([p.ravel() for p in parts]), H @ v, rtol=1e-9)


def test_hvp_is_compiled_once(setup):
    model, x, y, H = setup
    v = np.ones(H.shape[0])
    hessian.hvp(model, x, y, v)
    fn = hessian._hvp_function(model, model.trainable_variables, None,
                               hessian.DEFAULT_METHOD, False)
    count = fn.experimental_get_tracing_count()
    for _ in range(3):
        hessian.hvp(model, x, y, v * 2)
    assert fn.experimental_get_tracing_count() == count


def test_lanczos_top_eigenvalues(setup):
    model, x, y, H = setup
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    values, vectors = hessian.top_eigenvalues(model, x, y, k=3, tol=1e-8,
                                              return_vectors=True)
    np.testing.assert_allclose(values, dense[:3], rtol=1e-4)
    for lam, vec in zip(values, vectors):
        np.testing.assert_allclose(H @ vec, lam * vec, atol=1e-5 * abs(dense[0]))
    quick = hessian.top_eigenvalues(model, x, y, k=1)  # default tol 1e-3
    assert quick[0] == pytest.approx(dense[0], rel=1e-3)


def test_power_iteration_top_eigenvalues(setup):
    model, x, y, H = setup
    dense = np.linalg.eigvalsh(H)
    by_magnitude = dense[np.argsort(-np.abs(dense))]
    values = hessian.top_eigenvalues(model, x, y, k=2, method="power", tol=1e-10,
                                     max_iter=2000)
    np.testing.assert_allclose(np.sort(values)[::-1], np.sort(by_magnitude[:2])[::-1],
                               rtol=1e-4)


def test_lanczos_needs_fewer_products_than_power(setup):
    model, x, y, H = setup
    ops = {}
    for method in ("lanczos", "power"):
        op = hessian.HessianOperator(model, x, y)
        rng = np.random.default_rng(0)
        if method == "lanczos":
            hessian.lanczos(op, op.size, 100, rng.standard_normal(op.size), 1e-3, 1)
        else:
            hessian._power(op, op.size, 1, 1000, 1e-6, rng)
        ops[method] = op.products
    assert ops["lanczos"] < ops["power"]


def test_trace_within_three_standard_errors(setup):
    model, x, y, H = setup
    estimate, stderr = hessian.trace(model, x, y, samples=200, seed=4)
    assert stderr > 0
    assert abs(estimate - np.trace(H)) <= 3 * stderr
    assert hessian.trace(model, x, y, samples=20, seed=4) == \
        hessian.trace(model, x, y, samples=20, seed=4)


def test_density_puts_its_mass_where_the_eigenvalues_are(setup):
    model, x, y, H = setup
    eig = np.linalg.eigvalsh(H)
    grid, dens = hessian.density(model, x, y, steps=30, samples=16, seed=0)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-4)
    assert np.trapezoid(grid * dens, grid) == pytest.approx(eig.mean(), abs=0.3 * eig.std())
    cdf = np.cumsum(dens) * (grid[1] - grid[0])
    for q in (0.25, 0.5, 0.9):
        t = np.quantile(eig, q)
        assert np.interp(t, grid, cdf) == pytest.approx(q, abs=0.2)
    assert grid.min() < eig.min() and grid.max() > eig.max()


def test_per_layer_block(setup):
    model, x, y, H = setup
    kernel = model.get_layer("out").kernel
    block = dense_hessian(model, x, y, [kernel])
    np.testing.assert_allclose(
        hessian.top_eigenvalues(model, x, y, k=2, tol=1e-8, variables=[kernel]),
        np.sort(np.linalg.eigvalsh(block))[::-1][:2], rtol=1e-4)


def test_dataset_hessian_is_the_example_weighted_mean(setup):
    model, x, y, H = setup
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 16, 16, 8
    v = np.random.default_rng(2).normal(size=H.shape[0])
    np.testing.assert_allclose(hessian.hvp(model, ds, None, v), H @ v, rtol=1e-9)
    pairs = [(x[:10], y[:10]), (x[10:], y[10:])]
    np.testing.assert_allclose(hessian.hvp(model, pairs, None, v), H @ v, rtol=1e-9)


def test_errors(setup):
    model, x, y, H = setup
    with pytest.raises(ValueError, match="no data"):
        hessian.trace(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="x has 40 examples but y has 39"):
        hessian.top_eigenvalues(model, x, y[:39])
    with pytest.raises(ValueError, match="k=100 exceeds"):
        hessian.top_eigenvalues(model, x, y, k=100)
    with pytest.raises(ValueError, match="method must be"):
        hessian.top_eigenvalues(model, x, y, method="qr")
    with pytest.raises(ValueError, match="vector has 3 entries"):
        hessian.hvp(model, x, y, np.ones(3))
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not compiled with a loss"):
        hessian.trace(plain, x, y)


def test_hessian_probe(setup):
    model, x, y, H = setup
    probe = oi.probes.HessianProbe(k=2, trace_samples=50, tol=1e-8, density=True)
    out = probe(model, x, y)
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    assert out["lambda_1"] == pytest.approx(dense[0], rel=1e-4)
    assert out["lambda_2"] == pytest.approx(dense[1], rel=1e-4)
    assert out["lr_times_lambda_max"] == pytest.approx(0.3 * dense[0], rel=1e-4)
    assert abs(out["trace"] - np.trace(H)) <= 3 * out["trace_stderr"]
    block = dense_hessian(model, x, y, model.get_layer("h").trainable_variables)
    assert out["lambda_max/h"] == pytest.approx(np.linalg.eigvalsh(block).max(), rel=1e-4)
    assert out["density"].shape == out["density_grid"].shape


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.3),
    "momentum": lambda: keras.optimizers.SGD(0.3, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.3, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "amsgrad": lambda: keras.optimizers.Adam(1e-2, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(1e-2),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-2),
    "adagrad": lambda: keras.optimizers.Adagrad(1e-2),
}


def _slot(optimizer, variable, suffix):
    """The optimizer variable named after `variable` and `suffix` (Keras names slots
    <variable path with _>_<suffix>)."""
    name = variable.path.replace("/", "_") + "_" + suffix
    return next(np.asarray(v, np.float64) for v in optimizer.variables if v.name == name)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_each_optimizers_sharpness_and_limit_against_the_dense_hessian(kind):
    """After a few steps: the sharpness and limit of the module docstring of
    probes.stability, from the optimizer's slots and the dense Hessian."""
    keras.config.set_floatx("float64")
    try:
        model = small_model()
        model.compile(optimizer=OPTIMIZERS[kind](), loss="categorical_crossentropy")
        x, y = small_data()
        model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
        h = dense_hessian(model, x, y)
        out = hessian.HessianProbe(per_layer=False, tol=1e-7, max_iter=200)(model, x, y)
    finally:
        keras.config.set_floatx("float32")
    opt, variables = model.optimizer, model.trainable_variables
    lr = float(np.asarray(opt.learning_rate))
    p, limit = np.ones(len(h)), None
    if kind == "sgd":
        limit = 2 / lr
    elif kind == "momentum":
        limit = (2 + 2 * 0.9) / lr
    elif kind == "nesterov":
        limit = (2 + 2 * 0.9) / ((1 + 2 * 0.9) * lr)
    elif kind in ("adam", "amsgrad", "adamw"):
        suffix = "velocity_hat" if kind == "amsgrad" else "velocity"
        v = np.concatenate([_slot(opt, var, suffix).ravel() for var in variables])
        s = int(opt.iterations) + 1
        p = (1 - 0.9 ** s) / np.sqrt(1 - 0.999 ** s) * (np.sqrt(v) + opt.epsilon)
        limit = (2 + 2 * 0.9) / ((1 - 0.9) * lr)
    elif kind == "rmsprop":
        v = np.concatenate([_slot(opt, var, "velocity").ravel() for var in variables])
        p = np.sqrt(v + opt.epsilon)
        limit = 2 / lr
    scaled = h / np.sqrt(np.outer(p, p))
    expected = np.linalg.eigvalsh((scaled + scaled.T) / 2).max()
    assert out["sharpness"] == pytest.approx(expected, rel=1e-5)
    if limit is None:
        assert out["stability_limit"] is None and out["stability_ratio"] is None
    else:
        assert out["stability_limit"] == pytest.approx(limit, rel=1e-12)
        assert out["stability_ratio"] == pytest.approx(expected / limit, rel=1e-5)
    if kind in ("adam", "amsgrad", "adamw", "rmsprop"):  # not the plain λmax
        assert abs(out["sharpness"] / out["lambda_1"] - 1) > 0.5


def test_adam_before_its_first_step_has_no_limit():
    keras.config.set_floatx("float64")
    try:
        model = small_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
        model.optimizer.build(model.trainable_variables)
        x, y = small_data()
        out = hessian.HessianProbe(per_layer=False)(model, x, y)
    finally:
        keras.config.set_floatx("float32")
    assert out["sharpness"] == out["lambda_1"] and out["stability_limit"] is None
