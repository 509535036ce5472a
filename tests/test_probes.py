"""Weight, gradient and representation probes against direct numpy computations."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import loop_gradients

import optinsight as oi
from optinsight import probes


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(7)
    x_in = keras.Input((6,))
    h1 = keras.layers.Dense(8, activation="relu", name="h1")(x_in)
    h2 = keras.layers.Dense(5, activation="tanh", name="h2")(h1)
    out = keras.layers.Dense(3, activation="softmax", name="out")(h2)
    model = keras.Model(x_in, out)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 30), 3)
    return model, x, y


def numpy_forward(model, x):
    """Every layer's output by plain numpy matrix products."""
    w = {name: [np.asarray(v, np.float64) for v in model.get_layer(name).weights]
         for name in ("h1", "h2", "out")}
    h1 = np.maximum(x @ w["h1"][0] + w["h1"][1], 0)
    h2 = np.tanh(h1 @ w["h2"][0] + w["h2"][1])
    z = h2 @ w["out"][0] + w["out"][1]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return {"h1": h1, "h2": h2, "out": p / p.sum(axis=1, keepdims=True)}


def test_weight_norms(mlp):
    model, _, _ = mlp
    norms = probes.weight_norms(model)
    assert set(norms) == {"h1/kernel", "h2/kernel", "out/kernel"}
    w = np.asarray(model.get_layer("h2").kernel, np.float64)
    assert norms["h2/kernel"] == pytest.approx(np.linalg.norm(w) / np.sqrt(w.size))


def test_weight_spectrum_dense_and_conv():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="dense")])
    spectra = probes.weight_spectrum(model)
    conv = np.asarray(model.get_layer("conv").kernel, np.float64)  # (3, 3, 2, 4)
    w = conv.reshape(18, 4)
    eig = np.sort(np.linalg.eigvalsh(w @ w.T))[::-1][:4]  # the other 14 are zero
    s = spectra[model.get_layer("conv").kernel.path]
    np.testing.assert_allclose(s["eigenvalues"], eig, rtol=1e-8)
    assert s["spectral_norm"] == pytest.approx(np.sqrt(eig[0]))
    assert s["condition_number"] == pytest.approx(np.sqrt(eig[0] / eig[-1]))
    assert s["stable_rank"] == pytest.approx(eig.sum() / eig[0])
    assert s["near_zero"] == int(np.sum(eig <= 1e-3 * eig[0]))
    dense = np.asarray(model.get_layer("dense").kernel, np.float64)
    np.testing.assert_allclose(spectra[model.get_layer("dense").kernel.path]["eigenvalues"],
                               np.sort(np.linalg.eigvalsh(dense.T @ dense))[::-1], rtol=1e-8)


def test_near_zero_counts_a_collapsed_rank():
    w = np.zeros((10, 6))
    w[:, :2] = np.random.default_rng(0).normal(size=(10, 2))
    s = probes.matrix_spectrum(w)
    assert s["near_zero"] == 4 and s["condition_number"] == np.inf


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_power_law_alpha_recovers_the_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    tail = 0.5 * (1 - rng.random(3000)) ** (-1 / (alpha - 1))  # Pareto, xmin 0.5
    bulk = rng.uniform(0.01, 0.5, 1000)  # not power-law: below xmin
    assert probes.power_law_alpha(np.concatenate([tail, bulk])) == pytest.approx(alpha, abs=0.2)
    assert np.isnan(probes.power_law_alpha([1.0, 2.0]))


def test_power_law_alpha_chooses_xmin_by_weightwatchers_distance():
    """Against a plain loop: for each xmin the MLE α and D = max_i |F(x_i) − i/n| over
    the sorted tail (the powerlaw package's D, which WeightWatcher reports)."""
    rng = np.random.default_rng(5)
    values = np.sort(np.linalg.svd(rng.standard_t(3, size=(400, 200)), compute_uv=False) ** 2)
    fits = []
    for i in range(len(values) - 4):
        tail = values[i:]
        alpha = 1 + len(tail) / np.sum(np.log(tail / tail[0]))
        cdf = 1 - (tail / tail[0]) ** (1 - alpha)
        fits.append((max(abs(cdf[j] - j / len(tail)) for j in range(len(tail))), alpha))
    assert probes.power_law_alpha(values) == pytest.approx(min(fits)[1], rel=1e-12)


def test_activation_histograms(mlp):
    model, x, _ = mlp
    reference = numpy_forward(model, x)
    hists = probes.activation_histograms(model, x, bins=10, range=(0, 1))
    for name in ("h1", "h2", "out"):
        expected = np.histogram(reference[name], bins=10, range=(0, 1))[0]
        np.testing.assert_array_equal(hists[name], expected)
    probe = probes.ActivationProbe(bins=10, range=(0, 1))
    out = probe(model, x, None)
    np.testing.assert_array_equal(out["hist/h1"], hists["h1"])
    assert out["h1/zero_fraction"] == pytest.approx(np.mean(reference["h1"] == 0))


def test_layer_correlations_and_intra_layer(mlp):
    model, x, _ = mlp
    reference = numpy_forward(model, x)
    names, matrix, pairs = probes.layer_correlations(model, x, full=True)
    assert names == ["h1", "h2", "out"]
    live = reference["h1"][:, reference["h1"].std(axis=0) > 0]
    c = np.corrcoef(live.T, reference["h2"].T)[: live.shape[1], live.shape[1]:]
    assert matrix[0, 1] == pytest.approx(np.abs(c).mean())
    assert matrix[1, 0] == matrix[0, 1]
    assert pairs[("h1", "h2")].shape == (8, 5)
    intra = probes.intra_layer_correlation(model, x, "h2")
    np.testing.assert_allclose(intra["features"], np.corrcoef(reference["h2"].T), atol=1e-6)
    np.testing.assert_allclose(intra["samples"], np.corrcoef(reference["h2"]), atol=1e-6)


def test_cka_properties(mlp):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 7))
    b = a @ np.linalg.qr(rng.normal(size=(7, 7)))[0] * 3.5 + 2.0  # rotate, scale, shift
    assert probes.linear_cka(a, a) == pytest.approx(1.0)
    assert probes.linear_cka(a, b) == pytest.approx(1.0)
    c = rng.normal(size=(40, 4))
    ac, cc = a - a.mean(0), c - c.mean(0)
    expected = np.linalg.norm(cc.T @ ac) ** 2 / (np.linalg.norm(ac.T @ ac)
                                                 * np.linalg.norm(cc.T @ cc))
    assert probes.linear_cka(a, c) == pytest.approx(expected)
    model, x, _ = mlp
    names, matrix = probes.cka(model, x)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    ref = numpy_forward(model, x)
    assert matrix[1, 2] == pytest.approx(probes.linear_cka(ref["h2"], ref["out"]), rel=1e-5)


def test_augmentation_variance_by_hand():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((3,))
    model = keras.Model(x_in, keras.layers.Dense(2, use_bias=False, name="lin")(x_in))
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    scales = iter(np.tile([0.5, 1.0, 2.0], 2))

    def augment(batch, training=True):
        return batch * next(scales)

    out = probes.augmentation_variance(model, x, augment=augment, n=3)
    f = x.astype(np.float64) @ np.asarray(model.get_layer("lin").kernel, np.float64)
    expected = (np.var([0.5, 1.0, 2.0], ddof=1) * f ** 2).mean()
    assert out["lin"]["variance"] == pytest.approx(expected, rel=1e-5)
    assert out["lin"]["relative"] == pytest.approx(expected / f.var(axis=0, ddof=1).mean(),
                                                   rel=1e-5)
    still = probes.augmentation_variance(model, x, augment=lambda b, training: b, n=3)
    assert still["lin"]["variance"] == pytest.approx(0.0, abs=1e-12)


def test_default_augmentation_runs_on_images():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="c"),
                              keras.layers.GlobalAveragePooling2D(name="g")])
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    out = probes.augmentation_variance(model, x, n=3)
    assert out["c"]["variance"] > 0 and np.isfinite(out["g"]["relative"])


def test_feature_spectrum(mlp):
    model, x, _ = mlp
    ref = numpy_forward(model, x)["h2"]
    out = probes.feature_spectrum(model, x)["h2"]
    s = np.linalg.svd(ref - ref.mean(0), compute_uv=False)
    np.testing.assert_allclose(out["singular_values"], s, rtol=1e-5)
    p = s / s.sum()
    assert out["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_gradient_covariance_and_noise_scale(mlp):
    model, x, y = mlp
    g = loop_gradients(model, x, y)
    np.testing.assert_allclose(probes.per_example_gradients(model, x, y, chunk_size=7), g,
                               rtol=1e-4, atol=1e-7)
    cov = np.cov(g.T, bias=True)
    dense = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(probes.covariance_spectrum(model, x, y, k=4), dense[:4],
                               rtol=1e-4, atol=1e-9)
    mean = g.mean(0)
    expected = np.trace(np.cov(g.T)) / (mean @ mean - np.trace(np.cov(g.T)) / len(g))
    assert probes.noise_scale(model, x, y) == pytest.approx(expected, rel=1e-4)
    out = probes.GradientNoiseProbe(k=2)(model, x, y)
    assert out["noise_scale"] == pytest.approx(expected, rel=1e-4)
    # one group of variables at a time, 3 examples at a time: the same Gram matrix
    from optinsight.probes.gradients import gradient_gram
    np.testing.assert_allclose(gradient_gram(model, x, y, chunk_size=3, max_bytes=1), g @ g.T,
                               rtol=1e-4, atol=1e-7 * np.abs(g @ g.T).max())
    # bounded to the last variable (the output bias): the statistics of its columns
    last = int(np.prod(model.trainable_variables[-1].shape))
    bounded = probes.GradientNoiseProbe(k=2, max_parameters=last)(model, x, y)
    assert bounded["parameters"] == last
    assert bounded["covariance_trace"] == pytest.approx(
        np.trace(np.cov(g[:, -last:].T, bias=True)), rel=1e-4)
    assert out["covariance_trace"] == pytest.approx(np.trace(cov), rel=1e-4)


def test_noise_scale_is_unbiased_where_the_plug_in_form_is_not():
    """Per-example gradients G + noise with tr Σ / ‖G‖² = 200, batches of 256: the
    estimate averages to 200 (the plug-in ‖ḡ‖² would give about 200 / (1 + 200/256))."""
    from optinsight.probes.gradients import _noise_scale

    rng = np.random.default_rng(0)
    d, n = 2000, 256
    mean = rng.normal(size=d)
    mean /= np.linalg.norm(mean)  # ‖G‖² = 1
    def gram(g):
        return g @ g.T

    estimates = [_noise_scale(gram(mean + rng.normal(scale=np.sqrt(200 / d), size=(n, d))))
                 for _ in range(20)]
    assert np.mean(estimates) == pytest.approx(200, rel=0.05)
    v = rng.normal(size=d)
    assert np.isnan(_noise_scale(gram(np.stack([v, -v]))))  # a zero mean gradient: no B


def test_correlations_leave_out_self_correlation_and_constant_float64_features():
    from optinsight.probes.representations import _correlation

    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 4))
    a[:, 2] = 0.1  # constant: its mean-subtracted float64 values are rounding residue
    assert np.ptp(a[:, 2] - a[:, 2].mean()) == 0 and np.any(a[:, 2] - a[:, 2].mean())
    c = _correlation(a, a)
    assert np.isnan(c[2]).all() and np.isnan(c[:, 2]).all()
    np.testing.assert_allclose(np.delete(np.delete(c, 2, 0), 2, 1),
                               np.corrcoef(np.delete(a, 2, 1).T), atol=1e-12)


def test_a_layer_correlation_with_itself_leaves_out_the_diagonal(mlp):
    model, x, _ = mlp
    reference = numpy_forward(model, x)
    names, matrix = probes.layer_correlations(model, x)
    h2 = np.corrcoef(reference["h2"].T)
    off_diagonal = np.abs(h2[~np.eye(len(h2), dtype=bool)])
    assert matrix[names.index("h2"), names.index("h2")] == pytest.approx(off_diagonal.mean(),
                                                                          rel=1e-5)


def test_neural_collapse_is_zero_for_collapsed_features():
    """Inputs are the one-hot class, so the penultimate features are exactly the class
    means; a classifier aligned with the centred means gives NC3 = 0 too."""
    classes, d = 4, 6
    x_in = keras.Input((classes,))
    feats = keras.layers.Dense(d, use_bias=False, name="feats")(x_in)
    out = keras.layers.Dense(classes, activation="softmax", use_bias=False, name="head")(feats)
    model = keras.Model(x_in, out)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(classes, d))
    means -= means.mean(axis=0)  # centred: the global mean is 0
    model.get_layer("feats").kernel.assign(means)
    model.get_layer("head").kernel.assign(means.T * 5)
    labels = np.repeat(np.arange(classes), 5)
    x = np.eye(classes, dtype="float32")[labels]
    nc = probes.neural_collapse(model, x, labels)
    assert nc["nc1"] == pytest.approx(0.0, abs=1e-10)
    assert nc["nc3"] == pytest.approx(0.0, abs=1e-10)
    assert nc["nc4"] == 0.0
    norms = np.linalg.norm(means, axis=1)
    assert nc["nc2_equinorm"] == pytest.approx(norms.std() / norms.mean(), rel=1e-5)


def test_neural_collapse_against_numpy(mlp):
    model, x, y = mlp
    h = numpy_forward(model, x)["h2"]
    labels = y.argmax(1)
    mu_g = h.mean(0)
    mu = np.array([h[labels == c].mean(0) for c in range(3)])
    sw = sum(np.outer(h[i] - mu[labels[i]], h[i] - mu[labels[i]]) for i in range(len(h))) / len(h)
    sb = sum(np.outer(m - mu_g, m - mu_g) for m in mu) / 3
    nc = probes.neural_collapse(model, x, y)
    assert nc["nc1"] == pytest.approx(np.trace(sw @ np.linalg.pinv(sb)) / 3, rel=1e-3)
    cos = [(mu[a] - mu_g) @ (mu[b] - mu_g) / np.linalg.norm(mu[a] - mu_g)
           / np.linalg.norm(mu[b] - mu_g) for a in range(3) for b in range(3) if a != b]
    assert nc["nc2_equiangular"] == pytest.approx(np.mean(np.abs(np.array(cos) + 0.5)), rel=1e-4)
    w = np.asarray(model.get_layer("out").kernel, np.float64).T
    m = mu - mu_g
    assert nc["nc3"] == pytest.approx(
        np.linalg.norm(w / np.linalg.norm(w) - m / np.linalg.norm(m)) ** 2, rel=1e-4)
    nearest = np.argmin(((h[:, None] - mu[None]) ** 2).sum(-1), axis=1)
    predicted = numpy_forward(model, x)["out"].argmax(1)
    assert nc["nc4"] == pytest.approx(np.mean(nearest != predicted))
    assert probes.neural_collapse(model, x, y, layer="h2")["nc1"] == pytest.approx(nc["nc1"])
    assert probes.neural_collapse(model, x, y, layer="h2")["nc3"] == pytest.approx(nc["nc3"])
    # another layer, of another width: nc1 of its features, no nc3 (not the classifier's)
    h1 = numpy_forward(model, x)["h1"]
    mu1 = np.array([h1[labels == c].mean(0) for c in range(3)])
    sw1 = sum(np.outer(h1[i] - mu1[labels[i]], h1[i] - mu1[labels[i]])
              for i in range(len(h1))) / len(h1)
    sb1 = sum(np.outer(m - h1.mean(0), m - h1.mean(0)) for m in mu1) / 3
    other = probes.neural_collapse(model, x, y, layer="h1")
    assert other["nc1"] == pytest.approx(np.trace(sw1 @ np.linalg.pinv(sb1)) / 3, rel=1e-3)
    assert np.isnan(other["nc3"])


def test_errors(mlp):
    model, x, y = mlp
    with pytest.raises(ValueError, match=r"no layer named \['nope'\]"):
        probes.cka(model, x, layers=["nope"])
    with pytest.raises(ValueError, match=r"x has examples of shape \(4,\)"):
        probes.activation_histograms(model, x[:, :4])
    with pytest.raises(ValueError, match="x has 30 examples but y has 3"):
        probes.neural_collapse(model, x, y[:3])
    with pytest.raises(ValueError, match="at least 2 examples"):
        probes.noise_scale(model, x[:1], y[:1])


def test_export_projector(mlp, tmp_path):
    model, x, y = mlp
    names = probes.export_projector(model, x, y, str(tmp_path), layers=["h1", "h2"])
    assert names == ["h1", "h2"]
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings") == 2 and "metadata.tsv" in config
    assert (tmp_path / "metadata.tsv").read_text().split() == [str(v) for v in y.argmax(1)]
    reader = tf.train.load_checkpoint(str(tmp_path))
    h2 = reader.get_tensor("layer_1/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_allclose(h2, numpy_forward(model, x)["h2"], rtol=1e-5, atol=1e-6)


def test_probes_in_the_callback(mlp, tmp_path):
    model, x, y = mlp
    chosen = [probes.WeightNormProbe(every=3), probes.WeightSpectrumProbe(),
              probes.RepresentationProbe(), probes.NeuralCollapseProbe(),
              probes.GradientNoiseProbe(), oi.probes.NTKProbe(n=10)]
    cb = oi.OptimizationInsightCallback(tmp_path, probes=chosen, probe_data=(x, y))
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[cb])
    run = oi.read_log(tmp_path)
    assert sorted(set(run.probes["probe"])) == sorted(p.name for p in chosen)
    norms = run.probes[run.probes.probe == "weight_norms"]
    assert norms["step"].tolist() == [0, 3]  # the start, and the last of 3 steps
    assert norms["h1/kernel"].iloc[-1] == pytest.approx(probes.weight_norms(model)["h1/kernel"])
    rep = run.probes[run.probes.probe == "representations"]
    with np.load(os.path.join(tmp_path, rep["arrays"].iloc[-1])) as arrays:
        np.testing.assert_allclose(arrays["cka"], probes.cka(model, x)[1], rtol=1e-6)
    summary = run.summary["probes"]
    assert summary["neural_collapse"]["step"] == [0, 3]
    ntk = run.probes[run.probes.probe == "ntk"]
    assert ntk["kernel_change"].iloc[0] == 0.0 and ntk["kernel_change"].iloc[-1] > 0


def test_collapse_metrics_with_more_features_than_examples():
    """d > n (a Flatten of conv maps): the SVD route equals the dense pinv formula."""
    from optinsight.probes.collapse import collapse_metrics

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 6)
    features = rng.normal(size=(24, 300)) + rng.normal(size=(4, 300))[labels] * 3
    w = rng.normal(size=(4, 300))
    nc = collapse_metrics(features, labels, w, labels)
    mu = np.array([features[labels == c].mean(0) for c in range(4)])
    within = features - mu[labels]
    sw = within.T @ within / len(features)
    sb = (mu - features.mean(0)).T @ (mu - features.mean(0)) / 4
    assert nc["nc1"] == pytest.approx(np.trace(sw @ np.linalg.pinv(sb)) / 4, rel=1e-6)
    assert nc["nc4"] == pytest.approx(0.0)


def test_deep_models_are_read_at_evenly_spaced_layers():
    from optinsight.probes.common import sampled_layers

    keras.utils.set_random_seed(0)
    x_in = keras.Input((4,))
    h = x_in
    for i in range(20):
        h = keras.layers.Dense(3, activation="relu", name=f"d{i}")(h)
    model = keras.Model(x_in, h)
    names = sampled_layers(model, max_layers=5)
    assert names == ["d0", "d5", "d10", "d14", "d19"]  # round(linspace(0, 19, 5))
    assert sampled_layers(model, ["d3"], 5) == ["d3"]
    assert len(sampled_layers(model, max_layers=None)) == 20
    x = np.random.default_rng(0).normal(size=(12, 4)).astype("float32")
    out = probes.RepresentationProbe(max_layers=5)(model, x, None)
    assert out["cka"].shape == (5, 5)
    _, whole = probes.cka(model, x)
    picked = [int(n[1:]) for n in names]
    np.testing.assert_allclose(out["cka"], whole[np.ix_(picked, picked)], rtol=1e-9)
    np.testing.assert_allclose(out["correlations"], probes.layer_correlations(model, x, names)[1],
                               rtol=1e-12)
    spectra = probes.feature_spectrum(model, x, names)
    assert {n: out[f"{n}/effective_rank"] for n in names} == \
        {n: spectra[n]["effective_rank"] for n in names}
    assert {k.split("/")[1] for k in probes.ActivationProbe(max_layers=5)(model, x, None)
            if k.startswith("hist/")} == set(names)
