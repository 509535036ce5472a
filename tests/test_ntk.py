"""Empirical NTK against per-example Jacobians built one gradient at a time."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import optinsight as oi
from optinsight.probes import ntk


def small_model():
    keras.utils.set_random_seed(5)
    x_in = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh", name="h")(x_in)
    return keras.Model(x_in, keras.layers.Dense(3, name="out")(h))


def loop_jacobian(model, x):
    """[n, k, P] by one gradient per example and output, in a plain loop."""
    rows = []
    for i in range(len(x)):
        per_output = []
        for a in range(3):
            with tf.GradientTape() as tape:
                out = model(x[i:i + 1], training=False)[0, a]
            grads = tape.gradient(out, model.trainable_variables)
            per_output.append(np.concatenate([g.numpy().ravel() for g in grads]))
        rows.append(per_output)
    return np.array(rows, dtype=np.float64)


@pytest.fixture(scope="module")
def setup():
    model = small_model()
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(7, 4)).astype("float32")
    x2 = rng.normal(size=(5, 4)).astype("float32")
    return model, x1, x2, loop_jacobian(model, x1), loop_jacobian(model, x2)


def test_every_mode_matches_the_loop(setup):
    model, x1, x2, j1, j2 = setup
    np.testing.assert_allclose(ntk.kernel(model, x1, x2),
                               j1.sum(1) @ j2.sum(1).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ntk.kernel(model, x1, x2, mode="trace"),
                               np.einsum("iap,jap->ij", j1, j2), rtol=1e-5, atol=1e-6)
    full = ntk.kernel(model, x1, x2, mode="full", chunk_size=3)
    assert full.shape == (7, 5, 3, 3)
    for a in range(3):
        for b in range(3):
            np.testing.assert_allclose(full[:, :, a, b], j1[:, a] @ j2[:, b].T,
                                       rtol=1e-5, atol=1e-6)


def test_symmetric_psd_and_x2_none(setup):
    model, x1, _, j1, _ = setup
    for mode in ("sum_logits", "trace"):
        K = ntk.kernel(model, x1, mode=mode, chunk_size=2)
        np.testing.assert_allclose(K, K.T, rtol=1e-12)
        assert np.linalg.eigvalsh(K).min() > -1e-6 * np.abs(K).max()
        # float32 Jacobians: entries that cancel are exact to the kernel's scale, not their own
        np.testing.assert_allclose(K, ntk.kernel(model, x1, x1.copy(), mode=mode), rtol=1e-6,
                                   atol=1e-7 * np.abs(K).max())


def test_one_variable_at_a_time_equals_the_whole_jacobian(setup):
    """max_bytes=1 puts each variable in its own group (its own backward pass): the
    kernel is the same, with x2 and without, in every mode."""
    from optinsight.probes.common import parameter_groups

    model, x1, x2, _, _ = setup
    variables = model.trainable_variables
    assert parameter_groups(variables, 4, 1) == [[v] for v in variables]
    assert parameter_groups(variables, 4, 4 * 25) == [variables[:2], variables[2:]]
    for mode in ntk.MODES:
        for other in (None, x2):
            whole = ntk.kernel(model, x1, other, mode=mode)
            np.testing.assert_allclose(
                ntk.kernel(model, x1, other, mode=mode, chunk_size=2, max_bytes=1), whole,
                rtol=1e-6, atol=1e-7 * np.abs(whole).max())


def test_probe_bounded_to_the_variables_nearest_the_outputs(setup):
    from optinsight.probes.common import nearest_outputs

    model, x1, _, _, _ = setup
    variables = model.trainable_variables  # h: 20 + 5, out: 15 + 3
    assert nearest_outputs(variables, 18) == variables[2:]
    assert nearest_outputs(variables, 1) == variables[3:]
    assert nearest_outputs(variables, None) == variables
    with pytest.raises(ValueError, match="max_parameters"):
        nearest_outputs(variables, 0)
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    out = oi.probes.NTKProbe(n=7, max_parameters=18)(model, x1, y)
    assert out["parameters"] == 18
    K = ntk.kernel(model, x1, variables=variables[2:])
    assert out["trace"] == pytest.approx(np.trace(K), rel=1e-6)
    assert oi.probes.NTKProbe(n=7)(model, x1, y)["parameters"] == 43


def test_per_layer_parts_sum_to_the_whole(setup):
    model, x1, x2, _, _ = setup
    whole = ntk.kernel(model, x1, x2, mode="trace")
    parts = [ntk.kernel(model, x1, x2, mode="trace", variables=layer.trainable_variables)
             for layer in (model.get_layer("h"), model.get_layer("out"))]
    np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)


def test_class_similarity_by_hand():
    """f(x) = w·x: the kernel is x_i·x_j."""
    x_in = keras.Input((2,))
    model = keras.Model(x_in, keras.layers.Dense(1, use_bias=False)(x_in))
    x = np.array([[1, 0], [2, 0], [1, 1]], dtype="float32")
    out = ntk.class_similarity(model, x, np.array([0, 0, 1]))
    # K = [[1,2,1],[2,4,2],[1,2,2]]: same pairs (0,1),(1,0): 2; different: 1,2,1,2
    assert out == pytest.approx({"same": 2.0, "different": 1.5, "ratio": 4 / 3})
    onehot = keras.utils.to_categorical([0, 0, 1], 2)
    assert ntk.class_similarity(model, x, onehot) == pytest.approx(out)


def test_alignment_and_eigen():
    y = np.array([0, 0, 1])
    target = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    assert ntk.alignment(target, y) == pytest.approx(1.0)
    K = np.array([[2.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]])
    expected = (K * target).sum() / (np.linalg.norm(K) * np.linalg.norm(target))
    assert ntk.alignment(K, y) == pytest.approx(expected)
    values, vectors = ntk.eigen(K, 2)
    dense = np.linalg.eigvalsh(K)[::-1]
    np.testing.assert_allclose(values, dense[:2])
    np.testing.assert_allclose(K @ vectors, vectors * values, atol=1e-12)


def test_errors(setup):
    model, x1, _, _, _ = setup
    with pytest.raises(ValueError, match="mode must be one of"):
        ntk.kernel(model, x1, mode="diag")
    with pytest.raises(ValueError, match=r"x2 examples have \(3,\)"):
        ntk.kernel(model, x1, np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="x has 7 examples but y has 2"):
        ntk.class_similarity(model, x1, np.array([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        ntk.kernel(model, x1, chunk_size=0)
    with pytest.raises(ValueError, match="K has shape"):
        ntk.alignment(np.eye(2), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="x is empty"):
        ntk.kernel(model, x1[:0])


def test_ntk_probe_tracks_kernel_change(setup):
    model, x1, _, j1, _ = setup
    y = np.array([0, 0, 1, 1, 2, 2, 0])
    probe = oi.probes.NTKProbe(n=6, k=3)
    first = probe(model, x1, y)
    K = j1[:6].sum(1) @ j1[:6].sum(1).T
    assert first["kernel_change"] == 0.0
    assert first["trace"] == pytest.approx(np.trace(K), rel=1e-5)
    assert first["eig_1"] == pytest.approx(np.linalg.eigvalsh(K).max(), rel=1e-5)
    assert first["alignment"] == pytest.approx(ntk.alignment(K, y[:6]), rel=1e-5)
    model.get_layer("out").kernel.assign(model.get_layer("out").kernel * 2.0)
    second = probe(model, x1, y)
    assert second["kernel_change"] > 0.1
    model.get_layer("out").kernel.assign(model.get_layer("out").kernel / 2.0)


def test_softmax_outputs_use_the_logits():
    """A softmax head: the kernel is that of the pre-activations, not of the
    (constant) summed probabilities."""
    keras.utils.set_random_seed(2)
    x_in = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh")(x_in)
    soft = keras.Model(x_in, keras.layers.Dense(3, activation="softmax", name="head")(h))
    linear = keras.Model(x_in, soft.get_layer("head").output)
    x = np.random.default_rng(1).normal(size=(6, 4)).astype("float32")
    assert soft.get_layer("head").activation is keras.activations.softmax
    linear.get_layer("head").activation = keras.activations.linear
    expected = loop_jacobian(linear, x)
    linear.get_layer("head").activation = keras.activations.softmax
    K = ntk.kernel(soft, x)
    np.testing.assert_allclose(K, expected.sum(1) @ expected.sum(1).T, rtol=1e-5, atol=1e-6)
    assert np.abs(K).max() > 1e-2
    assert soft.get_layer("head").activation is keras.activations.softmax  # restored


def test_dense_layers_are_factored_only_where_the_gradient_is_an_outer_product():
    """A Dense kernel's per-example gradient is a_i δ_iᵀ on vector inputs, once per
    example; the kernel uses (1 + AAᵀ) ⊙ J_b J_bᵀ there, the Jacobian elsewhere: a
    Dense applied per time step, one called twice, one with a regulariser, one without
    bias, and all of them when the factored kernels hold a minority of the
    parameters. Every mode matches the loop either way."""
    from optinsight.probes.common import _factored_dense

    keras.utils.set_random_seed(2)
    x_in = keras.Input((3, 4))
    per_step = keras.layers.Dense(4, activation="tanh", name="per_step")(x_in)  # rank 3
    flat = keras.layers.Flatten()(per_step)
    wide = keras.layers.Dense(64, activation="relu", name="wide")(flat)
    plain = keras.layers.Dense(6, activation="relu", name="plain")(wide)
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    twice = shared(shared(plain))
    regular = keras.layers.Dense(5, activation="tanh", name="regular",
                                 kernel_regularizer="l2")(twice)
    no_bias = keras.layers.Dense(5, use_bias=False, name="no_bias")(regular)
    out = keras.layers.Dense(3, name="out")(no_bias)
    model = keras.Model(x_in, out)
    assert [layer.name for layer in _factored_dense(model, model.trainable_variables)] == \
        ["wide", "plain", "out"]
    assert _factored_dense(model, model.get_layer("out").trainable_variables[:1]) == []
    assert _factored_dense(model, model.trainable_variables[6:]) == []  # out: 15 of 120
    rng = np.random.default_rng(1)
    x1 = rng.normal(size=(6, 3, 4)).astype("float32")
    x2 = rng.normal(size=(4, 3, 4)).astype("float32")
    j1, j2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    scale = np.abs(j1).max() ** 2
    np.testing.assert_allclose(ntk.kernel(model, x1, x2), j1.sum(1) @ j2.sum(1).T,
                               rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(ntk.kernel(model, x1, mode="trace", chunk_size=4),
                               np.einsum("iap,jap->ij", j1, j1), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(ntk.kernel(model, x1, x2, mode="full"),
                               np.einsum("iap,jbp->ijab", j1, j2), rtol=1e-5,
                               atol=1e-6 * scale)


def test_factored_dense_under_mixed_precision():
    """float16 activations, float32 variables: the factored kernel still matches the
    loop, to float16's precision."""
    from optinsight.probes.common import _factored_dense

    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        x_in = keras.Input((6,))
        h = keras.layers.Dense(16, activation="tanh")(x_in)
        model = keras.Model(x_in, keras.layers.Dense(3, dtype="float32")(h))
    finally:
        keras.config.set_dtype_policy("float32")
    assert len(_factored_dense(model, model.trainable_variables)) == 2
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    j = loop_jacobian(model, x)
    expected = np.einsum("iap,jap->ij", j, j)
    np.testing.assert_allclose(ntk.kernel(model, x, mode="trace"), expected, rtol=0,
                               atol=1e-3 * np.abs(expected).max())
