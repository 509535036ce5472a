"""Hessian probes against the dense Hessian of a small float64 model (nested tapes)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import float64

import optinsight as oi
from optinsight.probes import common, hessian, hvp, krylov


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
    with float64():  # the compiled loss computes in floatx
        model = small_model()
        x, y = small_data()
        yield model, x, y, dense_hessian(model, x, y)


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
    hessian.top_eigenvalues(model, x, y)
    fns = hvp._hvp_function(model, model.trainable_variables, None,
                                hvp.default_method(model), False)
    counts = [fn.experimental_get_tracing_count() for fn in fns]
    for n in (40, 10, 25):  # any batch size reuses the flat HVP's one trace
        hessian.hvp(model, x, y, v * 2)
        hessian.top_eigenvalues(model, x[:n], y[:n], seed=1)
    assert [fn.experimental_get_tracing_count() for fn in fns] == counts


def test_the_default_hvp_is_reverse_below_large_models_and_forward_from_them(setup,
                                                                           monkeypatch):
    model, x, y, H = setup

    def compiled(method):
        return hvp._hvp_function(model, [model.layers[-1].bias], None, method, False)[1]

    block = hessian.HessianOperator(model, x, y, variables=[model.layers[-1].bias])
    assert block._flat_fn is compiled("reverse")
    monkeypatch.setattr(common, "LARGE", H.shape[0])  # the whole model's size decides
    block = hessian.HessianOperator(model, x, y, variables=[model.layers[-1].bias])
    assert block._flat_fn is compiled("forward")


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
            krylov.top_eigenpairs(op.matvec, op.random(rng), 1, 100, 1e-3)
        else:
            krylov._power(op, op.size, 1, 1000, 1e-6, rng)
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
    with float64():
        model = small_model()
        model.compile(optimizer=OPTIMIZERS[kind](), loss="categorical_crossentropy")
        x, y = small_data()
        model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
        h = dense_hessian(model, x, y)
        out = hessian.HessianProbe(per_layer=False, tol=1e-7, max_iter=200)(model, x, y)
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
    with float64():
        model = small_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
        model.optimizer.build(model.trainable_variables)
        x, y = small_data()
        out = hessian.HessianProbe(per_layer=False)(model, x, y)
    assert out["sharpness"] == out["lambda_1"] and out["stability_limit"] is None


def test_thick_restart_with_a_small_basis_matches_the_dense_spectrum(setup):
    model, x, y, H = setup
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    op = hessian.HessianOperator(model, x, y)
    values, vectors, products, residuals = krylov.top_eigenpairs(
        op.matvec, op.random(np.random.default_rng(0)), 3, 500, 1e-9, basis_size=5)
    assert products > 5  # the basis of 5 was restarted
    assert residuals.max() <= 1e-9
    np.testing.assert_allclose(values, dense[:3], rtol=1e-7)
    for lam, vec in zip(values, np.asarray(vectors)):
        np.testing.assert_allclose(H @ vec, lam * vec, atol=1e-6 * abs(dense[0]))
        assert np.linalg.norm(vec) == pytest.approx(1.0, rel=1e-9)


def test_warm_start_from_the_top_eigenvector_converges_at_once(setup):
    model, x, y, H = setup
    _, vectors = hessian.top_eigenvalues(model, x, y, k=2, tol=1e-9, return_vectors=True)
    op = hessian.HessianOperator(model, x, y)
    values, _, products, _ = krylov.top_eigenpairs(op.matvec, tf.constant(vectors.sum(0)), 2,
                                                 100, 1e-6)
    np.testing.assert_allclose(values, np.sort(np.linalg.eigvalsh(H))[::-1][:2], rtol=1e-6)
    assert products <= 3
    with pytest.raises(ValueError, match="start has 3 entries"):
        hessian.top_eigenvalues(model, x, y, start=np.ones(3))


def test_quadrature_moments_survive_local_reorthogonalisation(setup):
    """Gauss quadrature over the Lanczos tridiagonal reproduces vᵀ H^j v for j < 2·steps;
    with only local reorthogonalisation (ghost Ritz values appear after 30 steps on 51
    parameters) the low moments are still those of the dense H."""
    model, x, y, H = setup
    v = np.random.default_rng(5).standard_normal(H.shape[0])
    v /= np.linalg.norm(v)
    dense = tf.constant(H)

    def matvec(u):
        return tf.linalg.matvec(dense, u)

    scale = np.abs(np.linalg.eigvalsh(H)).max()
    for full in (False, True):
        alphas, betas = krylov.lanczos(matvec, tf.constant(v), 40, full)
        theta, s = np.linalg.eigh(krylov._tridiagonal(alphas, betas))
        for j in range(1, 7):
            exact = v @ np.linalg.matrix_power(H, j) @ v
            assert (s[0] ** 2) @ theta ** j == pytest.approx(exact, abs=1e-9 * scale ** j)


def test_hessian_probe_starts_from_its_previous_eigenvectors(setup):
    model, x, y, H = setup
    probe = oi.probes.HessianProbe(k=2, per_layer=True, tol=1e-6)
    first = probe(model, x, y)
    again = probe(model, x, y)
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    for out in (first, again):
        assert out["lambda_1"] == pytest.approx(dense[0], rel=1e-5)
        assert out["lambda_2"] == pytest.approx(dense[1], rel=1e-5)
    assert again["hvps"] < first["hvps"] / 2
    fresh = oi.probes.HessianProbe(k=2, per_layer=True, tol=1e-6)(model, x, y)
    assert fresh["hvps"] == first["hvps"]


MEMORY_CHILD = """
import json, resource, sys
import numpy as np, tensorflow as tf
from optinsight.probes import krylov
size = 2_000_000  # 8 MB a float32 vector
diagonal = tf.constant(np.linspace(0.0, 1.0, size) ** 0.1, tf.float32)  # a slow top cluster
start = tf.constant(np.random.default_rng(0).standard_normal(size), tf.float32)
krylov.top_eigenpairs(lambda v: diagonal * v, start, 1, 3, 1e-12, basis_size=4)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
_, vectors, products, _ = krylov.top_eigenpairs(lambda v: diagonal * v, start, 1, 60, 1e-12,
                                                 basis_size=8)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"products": products, "vectors": (after - before) / (4 * size),
                  "dtype": vectors.dtype.name}))
"""


def test_lanczos_memory_is_its_basis_not_its_iterations():
    """60 products with a basis of 8 float32 vectors: the peak grows by at most the basis,
    the restart's kept Ritz vectors and two more (a full basis would be 60 vectors)."""
    import json
    import os
    import subprocess
    import sys

    # glibc's adaptive threshold would serve freed 8 MB buffers from the heap, which
    # the peak then counts twice; a fixed threshold returns every buffer to the system
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True,
                         text=True, env=env, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["products"] == 60 and result["dtype"] == "float32"
    assert result["vectors"] <= 8 + 3 + 2


def test_time_budget_keeps_the_eigenvalues_and_leaves_out_the_rest(setup, capsys):
    model, x, y, H = setup
    out = oi.probes.HessianProbe(k=2, trace_samples=10, density=True, tol=1e-8,
                                 time_budget=0, max_examples=None)(model, x, y)
    assert out["hvps"] == 3  # λ1, λ2 from k + 1 products, nothing more
    assert out["sharpness"] == out["lambda_1"]  # SGD: no extra Lanczos run to skip
    assert not {"trace", "density", "lambda_max/h", "lambda_max/out"} & set(out)
    assert "left out this time: the trace, the density, 2 of 2 layers' λmax" in \
        capsys.readouterr().err
    unlimited = oi.probes.HessianProbe(k=2, trace_samples=10, density=True,
                                       time_budget=None)(model, x, y)
    assert {"trace", "density", "lambda_max/h", "lambda_max/out"} <= set(unlimited)
    assert capsys.readouterr().err == ""


def test_time_budget_stops_lanczos_with_the_residual_it_reached(setup, capsys):
    model, x, y, H = setup
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    op = hessian.HessianOperator(model, x, y)
    values, vectors, products, residuals = krylov.top_eigenpairs(
        op.matvec, op.random(np.random.default_rng(0)), 2, 100, 1e-12, deadline=0)
    assert products == 3  # k + 1, then the deadline
    vectors = np.asarray(vectors)
    for lam, vec, relative in zip(values, vectors, residuals):  # the residual is the true one
        assert np.linalg.norm(H @ vec - lam * vec) / abs(lam) == pytest.approx(relative, rel=1e-6)
    assert values[0] <= dense[0] * (1 + 1e-12)  # a Ritz value bounds λmax from below
    out = oi.probes.HessianProbe(k=2, time_budget=0, per_layer=False,
                                 max_examples=None)(model, x, y)
    assert out["hvps"] == 3 and out["lambda_residual"] > 1e-3
    assert "stopped at a relative residual above tol 0.001: λ at" in capsys.readouterr().err


def test_unconverged_lambda_without_a_time_budget_is_reported_not_raised(setup, capsys):
    model, x, y, H = setup
    out = oi.probes.HessianProbe(k=2, max_iter=2, tol=1e-12, per_layer=False,
                                 time_budget=None)(model, x, y)
    assert out["hvps"] == 2 and out["lambda_residual"] > 1e-12
    err = capsys.readouterr().err
    assert "stopped at a relative residual above tol 1e-12: λ at" in err
    assert "time budget" not in err


def test_max_examples_measures_the_curvature_of_the_first_examples(setup):
    model, x, y, _ = setup
    dense = np.sort(np.linalg.eigvalsh(dense_hessian(model, x[:12], y[:12])))[::-1]
    probe = oi.probes.HessianProbe(k=2, tol=1e-8, max_examples=12, per_layer=False)
    out = probe(model, x, y)
    assert out["hessian_examples"] == 12
    np.testing.assert_allclose([out["lambda_1"], out["lambda_2"]], dense[:2], rtol=1e-6)
    assert oi.probes.HessianProbe(max_examples=100)(model, x, y)["hessian_examples"] == 40
    with pytest.raises(ValueError, match="max_examples must be"):
        oi.probes.HessianProbe(max_examples=0)


def test_auto_examples_fit_the_products_in_the_time_budget(setup, monkeypatch, capsys):
    """"auto" keeps every example when _AUTO_PRODUCTS products fit the budget, else as
    many as the timed product over _AUTO_FROM examples says fit (at least _AUTO_FROM),
    and keeps that count; the two timing products count in hvps."""
    from types import SimpleNamespace

    model, x, y, H = setup
    ample = oi.probes.HessianProbe(per_layer=False, time_budget=1e6)
    out = ample(model, x, y)
    assert out["hessian_examples"] == 40
    assert out["lambda_1"] == pytest.approx(np.linalg.eigvalsh(H).max(), rel=1e-3)
    fixed = oi.probes.HessianProbe(per_layer=False, time_budget=1e6, max_examples=40)
    assert out["hvps"] == fixed(model, x, y)["hvps"] + 2
    assert ample(model, x, y)["hvps"] == fixed(model, x, y)["hvps"]  # warm, no timing
    for seconds, expected in ((1.0, 8), (0.0625, 30)):  # 8 · 6 s / (25 · seconds)
        clock = iter([0.0, 0.0, 0.0, 0.0, seconds] + [0.0] * 10_000)  # the budget's start,
        # the first product's start and end (tracing), then the timed one's
        clock_module = SimpleNamespace(monotonic=clock.__next__)
        for module in (hessian, hvp, krylov):  # one clock for the probe, operator, solver
            monkeypatch.setattr(module, "time", clock_module)
        probe = oi.probes.HessianProbe(per_layer=False, time_budget=6.0)
        assert probe(model, x, y)["hessian_examples"] == expected
        assert f"measured on {expected} of the 40 probe examples" in capsys.readouterr().err
        monkeypatch.undo()
        assert probe(model, x, y)["hessian_examples"] == expected
        assert "measured on" not in capsys.readouterr().err  # said once
    unlimited = oi.probes.HessianProbe(per_layer=False, time_budget=None)
    assert unlimited(model, x, y)["hessian_examples"] == 40


def test_a_part_starts_only_if_its_products_fit_in_what_is_left(setup, capsys):
    model, x, y, _ = setup
    out = oi.probes.HessianProbe(trace_samples=10 ** 6, density=True, time_budget=30,
                                 max_examples=None)(model, x, y)
    assert "trace" not in out  # a million products at the λ run's pace: hours
    assert {"density", "lambda_max/h", "lambda_max/out"} <= set(out)
    assert "left out this time: the trace" in capsys.readouterr().err


def ticking_clock(monkeypatch):
    """hessian's clock replaced: each reading a second after the last, or the first of
    `steps` seconds while there are any."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=0.0, steps=[])

    def monotonic():
        clock.now += clock.steps.pop(0) if clock.steps else 1.0
        return clock.now

    clock_module = SimpleNamespace(monotonic=monotonic)
    for module in (hessian, hvp, krylov):  # one clock for the probe, operator, solver
        monkeypatch.setattr(module, "time", clock_module)
    return clock


def test_with_a_preconditioner_lambda_leaves_a_share_of_the_budget_to_the_sharpness(
        monkeypatch, capsys):
    """λ never converges at tol=1e-300: alone it would spend the whole budget, and the
    learning-rate diagnosis would never get Adam's sharpness (k = 1: half each)."""
    with float64():
        model = small_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
        x, y = small_data()
        model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
        ticking_clock(monkeypatch)
        out = hessian.HessianProbe(per_layer=False, tol=1e-300, time_budget=100,
                                   max_examples=None)(model, x, y)
    assert out["stability_ratio"] == out["sharpness"] / out["stability_limit"]
    assert abs(out["sharpness"] / out["lambda_1"] - 1) > 0.5  # Adam's, not λmax
    err = capsys.readouterr().err
    assert "λ at" in err and "the sharpness at" in err  # both stopped by the budget
    assert "left out" not in err
    assert 8 <= out["hvps"] <= 30  # about 5 readings a product: 100 s hold about 20


def test_a_layer_not_compiled_yet_starts_only_if_its_tracing_fits(monkeypatch, capsys):
    """Each tracing takes 1000 s of a 2500 s budget: λ's and layer h's fit, layer out's
    would end past the budget, and is left for the next evaluation, when nothing traces."""
    relax = hessian.HessianOperator._relax

    def slow_relax(self):
        if not self.traced:  # it reads the clock before tracing and after
            clock.steps = [1.0, 1000.0]
        relax(self)

    with float64():
        model = small_model(seed=5)  # its products not traced yet
        x, y = small_data()
        clock = ticking_clock(monkeypatch)
        monkeypatch.setattr(hessian.HessianOperator, "_relax", slow_relax)
        probe = hessian.HessianProbe(time_budget=2500, max_examples=None)
        began = clock.now
        out = probe(model, x, y)
        assert clock.now <= began + 2500 + 1  # the budget's own first reading
        assert "lambda_max/h" in out and "lambda_max/out" not in out
        assert "left out this time: 1 of 2 layers' λmax" in capsys.readouterr().err
        out = probe(model, x, y)
        assert {"lambda_max/h", "lambda_max/out"} <= set(out)
        assert capsys.readouterr().err == ""


def test_from_large_entries_the_default_basis_is_two_vectors_smaller(monkeypatch):
    """The first restart recombines a full basis: k + 8 vectors, k + 6 for large ones."""
    lengths = []

    def recording(functions):
        orthogonalise, combine = functions

        def recorded(vectors, weights):
            lengths.append(len(vectors))
            return combine(vectors, weights)
        return orthogonalise, recorded

    monkeypatch.setattr(krylov, "_XLA", recording(krylov._XLA))
    monkeypatch.setattr(krylov, "_GRAPH", recording(krylov._GRAPH))
    diagonal = tf.constant(np.linspace(0.0, 1.0, 400) ** 0.1)  # a slow top cluster
    start = tf.constant(np.random.default_rng(0).standard_normal(400))
    for large, basis in ((1 << 22, 2 + 8), (400, 2 + 6)):
        monkeypatch.setattr(common, "LARGE", large)
        lengths.clear()
        krylov.top_eigenpairs(lambda v: diagonal * v, start, 2, 30, 1e-12)
        assert lengths[0] == basis


def test_the_budget_counts_lanczos_own_work(monkeypatch, capsys):
    """A product takes 1 s and orthogonalising a Lanczos step 10 s (a clock that moves
    only there): the probe paces what it starts by the whole step and ends within
    1.1x its budget, whatever the budget (counting products only, a layer's λmax
    started with seconds left ran 22 s past)."""
    from types import SimpleNamespace

    with float64():
        model, (x, y) = small_model(), small_data()
        clock = SimpleNamespace(now=0.0)
        clock_module = SimpleNamespace(monotonic=lambda: clock.now)
        for module in (hessian, hvp, krylov):  # one clock for the probe, operator, solver
            monkeypatch.setattr(module, "time", clock_module)
        mean = hessian.HessianOperator._mean

        def slow_mean(self, fn, vector):
            def product(*args):
                clock.now += 1.0
                return fn(*args)
            return mean(self, product, vector)

        orthogonalise, combine = krylov._GRAPH

        def slow_orthogonalise(w, basis):
            clock.now += 10.0
            return orthogonalise(w, basis)

        monkeypatch.setattr(hessian.HessianOperator, "_mean", slow_mean)
        monkeypatch.setattr(krylov, "_GRAPH", (slow_orthogonalise, combine))
        for budget in range(60, 300, 12):
            probe = hessian.HessianProbe(k=1, trace_samples=10, density=True,
                                         density_steps=8, density_samples=2,
                                         time_budget=budget, max_examples=None)
            for _ in range(2):
                began = clock.now
                assert "lambda_1" in probe(model, x, y)
                assert clock.now - began <= 1.1 * budget, budget
        assert "over its budget" not in capsys.readouterr().err


def test_lanczos_traces_its_helpers_once_per_shape():
    """Bases of every length and vectors of two sizes reuse one trace each (before, a
    trace per basis length: TensorFlow's retracing warning at every evaluation)."""
    rng = np.random.default_rng(0)
    before = (krylov._orthogonalise_graph.experimental_get_tracing_count(),
              krylov._combine_graph.experimental_get_tracing_count())
    for size in (300, 200, 250):
        diagonal = tf.constant(np.linspace(0.0, 1.0, size) ** 0.1)
        start = tf.constant(rng.standard_normal(size))
        krylov.top_eigenpairs(lambda v, d=diagonal: d * v, start, 2, 40, 1e-12)
    after = (krylov._orthogonalise_graph.experimental_get_tracing_count(),
             krylov._combine_graph.experimental_get_tracing_count())
    assert after[0] - before[0] <= 2 and after[1] - before[1] <= 2
