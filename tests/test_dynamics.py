"""Every per-batch metric (README, "What each metric means") against numpy.

The test records the weights before and after every batch itself, recomputes each
batch's gradient eagerly with its own GradientTape, and derives every key in plain
numpy (float64), per variable and for the whole model, raw and moving-average.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import step_records, tiny_data, tiny_relu_model

import optinsight as oi
from optinsight.dynamics import DynamicsTracker
from optinsight.metrics import summarize, threshold_tag
from optinsight.signs import sign_codes

THRESHOLDS = (1e-7, 1e-5)
DECAY = 0.9
BATCH = 12
STEPS = 8
VARIABLE_EVERY = 3  # steps between per-variable TensorBoard scalars
KERNELS = ["native", "xla"]  # the fused CPU kernel and the XLA version


class WeightRecorder(keras.callbacks.Callback):
    """Weights of every trainable variable before the first and after every batch."""

    def on_train_begin(self, logs=None):
        self.weights = [[v.numpy().copy() for v in self.model.trainable_variables]]

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([v.numpy().copy() for v in self.model.trainable_variables])


def eager_gradients(model, weights, x, y):
    clone = keras.models.clone_model(model)
    for v, w in zip(clone.trainable_variables, weights):
        v.assign(w)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, clone(x, training=True)))
    return [g.numpy() for g in tape.gradient(loss, clone.trainable_variables)]


def reference_band(g_prev, g, w_prev, w, th):
    """Raw band metrics of one variable (or of all concatenated), numpy float64."""
    g_prev, g, w_prev, w = (np.asarray(a, np.float64).ravel() for a in (g_prev, g, w_prev, w))
    zp, zn = np.abs(g_prev) <= th, np.abs(g) <= th
    retained = zp & zn
    flipped = retained & (g_prev * g < 0)
    turn = np.sign((w - w_prev) * (g - g_prev))
    dw = np.abs(w - w_prev)[retained]
    grad1, ret = int(zp.sum()), int(retained.sum())
    released = int((zp & ~zn).sum())
    return {
        "grad1": grad1, "grad2": int(zn.sum()), "retained": ret, "released": released,
        "fraction_released": released / grad1 if grad1 else 0.0,
        "flipped": int(flipped.sum()),
        "fraction_flipped": flipped.sum() / ret if ret else 0.0,
        "min": int((flipped & (turn > 0)).sum()), "max": int((flipped & (turn < 0)).sum()),
        "wdiff_mean": dw.mean() if dw.size else 0.0, "wdiff_max": dw.max() if dw.size else 0.0,
    }


def key_names(tag, suffix):
    return {
        "grad1": f"no_zero_{tag}_grad1{suffix}", "grad2": f"no_zero_{tag}_grad2{suffix}",
        "retained": f"no_zero_{tag}_grad_retained{suffix}",
        "released": f"no_zero_{tag}_grad_released{suffix}",
        "fraction_released": f"fraction_zeros_{tag}_released{suffix}",
        "flipped": f"no_grad_flipped_{tag}{suffix}",
        "fraction_flipped": f"fraction_grad_flipped_{tag}{suffix}",
        "min": f"no_min_{tag}{suffix}", "max": f"no_max_{tag}{suffix}",
        "wdiff_mean": f"w_diff_0_0_{tag}_mean{suffix}",
        "wdiff_max": f"w_diff_0_0_{tag}_max{suffix}",
    }


@pytest.fixture(scope="module", params=KERNELS)
def run(tmp_path_factory, request):
    """A short run with the callback, on the kernel the fit's tracker chooses ("auto")
    with the native one available or switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPTINSIGHT_NATIVE", "1" if request.param == "native" else "0")
        recorded = record_run(tmp_path_factory.mktemp("run"))
    assert recorded["kernel"] == request.param
    return recorded


def record_run(log_dir):
    x, y = tiny_data(n=BATCH * STEPS)
    model = tiny_relu_model(oi.InsightModel)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
    recorder = WeightRecorder()
    cb = oi.OptimizationInsightCallback(log_dir, thresholds=THRESHOLDS, ema_decay=DECAY,
                                        histogram_freq=4, histogram_bins=16,
                                        variable_update_freq=VARIABLE_EVERY)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[recorder, cb])
    weights = recorder.weights
    grads = [eager_gradients(model, weights[t], x[t * BATCH:(t + 1) * BATCH],
                             y[t * BATCH:(t + 1) * BATCH]) for t in range(STEPS)]
    records = step_records(log_dir)
    names = [v.path for v in model.trainable_variables]
    return {"log_dir": log_dir, "weights": weights, "grads": grads, "records": records,
            "names": names, "model": model,
            "kernel": "xla" if cb.recorder.tracker._native is None else "native"}


def moving_averages(run):
    """ĝ_t (ĝ_1 = g_1) and ŵ_t (ŵ_0 = initial weights), per step and variable."""
    ema_g, ema_w = [], [[w.astype(np.float64) for w in run["weights"][0]]]
    for t, g in enumerate(run["grads"]):
        g = [a.astype(np.float64) for a in g]
        ema_g.append(g if t == 0 else [DECAY * a + (1 - DECAY) * b
                                       for a, b in zip(ema_g[-1], g)])
        ema_w.append([DECAY * a + (1 - DECAY) * b.astype(np.float64)
                      for a, b in zip(ema_w[-1], run["weights"][t + 1])])
    return ema_g, ema_w


def expected_metrics(run, t, select):
    """Expected metrics at step t+1 for the variables picked by `select` (list of indices)."""
    cat = lambda arrays: np.concatenate([np.ravel(arrays[i]) for i in select])  # noqa: E731
    g, w_prev, w = cat(run["grads"][t]), cat(run["weights"][t]), cat(run["weights"][t + 1])
    out = {
        "grad_norm": np.linalg.norm(g), "raw_grad_norm": np.linalg.norm(g),  # no clipping
        # units (last axis; each entry of a vector) whose every gradient is <= 1e-7
        "zero_units": sum(int(np.all(np.abs(run["grads"][t][i].reshape(
            -1, run["grads"][t][i].shape[-1])) <= THRESHOLDS[0], axis=0).sum())
            for i in select),
        "weight_norm": np.linalg.norm(w),
        "wdiff": np.linalg.norm(w - w_prev),
        "update_ratio": (np.linalg.norm(w - w_prev) / np.linalg.norm(w_prev)
                         if np.any(w_prev) else None),
        "nonfinite_grads": 0,
    }
    ema_g, ema_w = moving_averages(run)
    for th in THRESHOLDS:
        tag = threshold_tag(th)
        if t == 0:
            for k in key_names(tag, "").values():
                out[k] = None
            out[key_names(tag, "")["grad2"]] = int((np.abs(g) <= th).sum())
            for k in key_names(tag, "_09avg").values():
                out[k] = None
            out[key_names(tag, "_09avg")["grad2"]] = int((np.abs(cat(ema_g[0])) <= th).sum())
            continue
        raw = reference_band(cat(run["grads"][t - 1]), g, w_prev, w, th)
        avg = reference_band(cat(ema_g[t - 1]), cat(ema_g[t]), cat(ema_w[t]),
                             cat(ema_w[t + 1]), th)
        for suffix, values in (("", raw), ("_09avg", avg)):
            for short, key in key_names(tag, suffix).items():
                out[key] = values[short]
    return out


def assert_metrics_equal(actual, expected, where):
    for key, want in expected.items():
        got = actual[key]
        if want is None:
            assert got is None, f"{where} {key}: expected null at step 1, got {got}"
        elif isinstance(want, (int, np.integer)):
            assert isinstance(got, int) and got == want, f"{where} {key}: {got} != {want}"
        else:
            assert got == pytest.approx(float(want), rel=2e-5, abs=1e-12), \
                f"{where} {key}: {got} != {want}"


def test_every_key_per_variable_and_whole_model(run):
    records = run["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for t, record in enumerate(records):
        for i, name in enumerate(run["names"]):
            assert_metrics_equal(record["layers"][name], expected_metrics(run, t, [i]),
                                 f"step {t + 1} {name}")
        assert_metrics_equal(record["model"], expected_metrics(run, t,
                                                              range(len(run["names"]))),
                             f"step {t + 1} model")


def test_the_model_really_has_zeros_flips_and_turns(run):
    """Guards against a trivially-zero comparison: every count family is exercised."""
    records = run["records"][1:]
    for suffix in ("", "_09avg"):
        for tag in ("e7", "e5"):
            keys = key_names(tag, suffix)
            for short in ("grad1", "retained", "flipped"):
                assert sum(r["model"][keys[short]] for r in records) > 0, (short, tag, suffix)
    assert sum(r["model"]["no_zero_e5_grad_released"] for r in records) > 0
    assert sum(r["model"]["no_min_e5"] for r in records) > 0
    assert sum(r["model"]["no_max_e5"] for r in records) > 0
    assert sum(r["model"]["w_diff_0_0_e5_max"] for r in records) > 0
    assert min(r["model"]["zero_units"] for r in records) >= 4  # 2 dead units: kernel, bias


def test_train_loss_is_the_batch_loss(run):
    model = keras.models.clone_model(run["model"])
    x, y = tiny_data(n=BATCH * STEPS)
    for t, record in enumerate(run["records"]):
        for v, w in zip(model.trainable_variables, run["weights"][t]):
            v.assign(w)
        p = model(x[t * BATCH:(t + 1) * BATCH], training=True)
        want = float(np.mean(keras.losses.categorical_crossentropy(
            y[t * BATCH:(t + 1) * BATCH], p)))
        assert record["model"]["train_loss"] == pytest.approx(want, rel=1e-5)


def test_histograms_match_numpy(run):
    lines = oi.read_log(run["log_dir"]).histograms()
    assert [h["step"] for h in lines] == [4, 8]
    for h in lines:
        t = h["step"] - 1
        for kind, arrays in (("gradients", run["grads"][t]), ("weights", run["weights"][t + 1])):
            for name, values in zip(run["names"], arrays):
                v = np.asarray(values, np.float64).ravel()
                lo, hi = v.min(), v.max()
                assert h[kind][name]["range"] == pytest.approx([lo, hi], rel=1e-6, abs=1e-30)
                width = hi - lo if hi > lo else 1.0
                index = np.clip(np.floor((v - lo) / width * 16).astype(int), 0, 15)
                assert h[kind][name]["counts"] == np.bincount(index, minlength=16).tolist()


def test_sign_map_codes_of_last_gradient(run):
    with np.load(run["log_dir"] / "signs" / "epoch_0000.npz") as f:
        meta = json.loads(str(f["_meta"]))
        assert meta["step"] == STEPS
        for name, g in zip(run["names"], run["grads"][-1]):
            expected = sign_codes(np.ravel(g))
            np.testing.assert_array_equal(f[name], expected)
    g = np.array([0.0, -1e-5, -2e-6, 3e-6, 1e-5, 2e-5, -2e-5, np.nan])
    np.testing.assert_array_equal(sign_codes(g), [2, -1, -1, 1, 1, 0, 0, 0])


def test_insight_json_keeps_seed_layout(run):
    doc = json.load(open(run["log_dir"] / "insight.json"))
    assert doc["schema_version"] == 2
    assert set(doc["epoch_wise"]) == {"train_mean_loss", "val_mean_loss", "train_mean_acc",
                                      "val_mean_acc"}
    steps = doc["batch_wise"]["no_zero_e5_grad2"]
    assert len(steps) == 1 and len(steps[0]) == STEPS
    assert steps[0] == [r["model"]["no_zero_e5_grad2"] for r in run["records"]]
    assert doc["batch_wise"]["no_zero_e5_grad1"][0][0] is None
    name = run["names"][0]
    assert doc["layers"][name]["epoch_wise"]["wdiff"][0] == pytest.approx(
        np.mean([r["layers"][name]["wdiff"] for r in run["records"]]), rel=1e-6)


def test_read_log_frames(run):
    r = oi.read_log(run["log_dir"])
    assert list(r.steps["step"]) == list(range(1, STEPS + 1))
    assert math.isnan(r.steps["no_zero_e7_grad1"].iloc[0])
    assert r.steps["no_zero_e7_grad2"].iloc[0] == run["records"][0]["model"]["no_zero_e7_grad2"]
    layer = r.layer(run["names"][2])
    assert layer["step"].tolist() == list(range(1, STEPS + 1))
    assert layer["grad_norm"].tolist() == pytest.approx(
        [rec["layers"][run["names"][2]]["grad_norm"] for rec in run["records"]])
    assert r.variables == run["names"]
    # Run.steps comes from model/, the columnar copy of steps.jsonl: the same numbers.
    from optinsight.logs.reader import _steps_frame
    jsonl = _steps_frame(str(run["log_dir"] / "steps.jsonl"))
    np.testing.assert_array_equal(list(r.steps.columns), list(jsonl.columns))
    np.testing.assert_array_equal(r.steps.to_numpy(float), jsonl.to_numpy(float))
    # layers/ is readable with pyarrow alone (docs/logs.md)
    import glob

    import pyarrow as pa
    parts = sorted(glob.glob(str(run["log_dir"] / "layers" / "part-*")))
    assert parts and all(p.endswith(".arrow") for p in parts)  # finished at the epoch end
    plain = pa.concat_tables(pa.ipc.open_file(p).read_all() for p in parts).to_pandas()
    plain = plain[plain["variable"] == run["names"][2]]
    assert plain["step"].tolist() == list(range(1, STEPS + 1))
    assert plain["grad_norm"].tolist() == pytest.approx(layer["grad_norm"].tolist())
    wdiff = r.key("wdiff")
    assert list(wdiff.columns) == ["step"] + run["names"]
    assert wdiff[run["names"][1]].tolist()[1:] == pytest.approx(
        [rec["layers"][run["names"][1]]["wdiff"] for rec in run["records"]][1:])
    assert len(r.epochs) == 1
    with pytest.raises(KeyError, match="no variable"):
        r.layer("nope")


def test_tensorboard_tags_read_back(run):
    from tbparse import SummaryReader

    scalars = SummaryReader(str(run["log_dir"] / "tensorboard")).scalars
    grad_norm = scalars[scalars.tag == "insight/grad_norm"].sort_values("step")
    assert grad_norm.step.tolist() == list(range(1, STEPS + 1))
    assert grad_norm.value.tolist() == pytest.approx(
        [r["model"]["grad_norm"] for r in run["records"]], rel=1e-6)
    per_var = scalars[scalars.tag == f"insight/{run['names'][0]}/wdiff"]
    assert per_var.step.tolist() == list(range(VARIABLE_EVERY, STEPS + 1, VARIABLE_EVERY))
    # Histograms are in TensorBoard's v2 format (tensors of [left, right, count] rows).
    tensors = SummaryReader(str(run["log_dir"] / "tensorboard"), pivot=False).tensors
    hist = tensors[tensors.tag == f"gradients/{run['names'][0]}"].sort_values("step")
    assert hist.step.tolist() == [4, 8]
    logged = oi.read_log(run["log_dir"]).histograms()[0]["gradients"][run["names"][0]]
    buckets = np.asarray(hist.value.iloc[0])
    assert buckets[:, 2].tolist() == logged["counts"]  # 16 bins: under TB_BUCKETS, as is
    assert buckets[0, 0] == pytest.approx(logged["range"][0])
    assert buckets[-1, 1] == pytest.approx(logged["range"][1])


def test_tensorboard_sign_map_images(run):
    """Read with TensorBoard's own loader: a PNG per variable, coloured by sign code."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from optinsight.signs import SIGN_COLOURS, sign_map_image

    events = EventAccumulator(str(run["log_dir"] / "tensorboard" / "train"),
                              size_guidance={"tensors": 0})
    events.Reload()
    name = run["names"][0]
    (event,) = events.Tensors(f"signs/{name}")
    assert events.SummaryMetadata(f"signs/{name}").plugin_data.plugin_name == "images"
    width, height, png = event.tensor_proto.string_val
    image = np.asarray(Image.open(io.BytesIO(png)))
    codes = sign_codes(np.ravel(run["grads"][-1][0]))
    np.testing.assert_array_equal(image, sign_map_image(codes))
    assert (int(width), int(height)) == (image.shape[1], image.shape[0])
    assert tuple(image.reshape(-1, 3)[0]) == SIGN_COLOURS[int(codes[0])]


@pytest.mark.parametrize("kernel", KERNELS)
def test_tracker_counts_nonfinite_and_ignores_them(kernel):
    """Crafted gradients with NaN/Inf and values on the band edges, straight to the tracker."""
    w = tf.Variable(tf.zeros([6]))
    tracker = DynamicsTracker([w], thresholds=(1e-5,), ema_decay=0.5, kernel=kernel)
    g1 = np.array([0.0, 1e-5, -3e-6, 2e-6, np.nan, 5.0], np.float32)
    g2 = np.array([0.0, 2e-6, 4e-6, -1e-6, 1e-6, np.inf], np.float32)

    @tf.function
    def step(g, new_w):
        before = tracker.read_weights()
        w.assign(new_w)
        tracker.update([g], before, tf.constant(1.0))

    step(g1, np.array([0, 1, 2, 3, 4, 5], np.float32))
    step(g2, np.array([0, 1, 1, 4, 4, 5], np.float32))
    rows = tracker.read_rows(1)
    assert [r.step for r in rows] == [2]
    model, layers = summarize(rows[0].stats, rows[0].has_prev, tracker.names, (1e-5,), 0.5)
    assert model["nonfinite_grads"] == 1
    assert model["no_zero_e5_grad1"] == 4  # 0, 1e-5 (inclusive), -3e-6, 2e-6; NaN excluded
    assert model["no_zero_e5_grad2"] == 5
    assert model["no_zero_e5_grad_retained"] == 4
    assert model["no_grad_flipped_e5"] == 2  # -3e-6 -> 4e-6 and 2e-6 -> -1e-6
    assert model["no_min_e5"] == 0 and model["no_max_e5"] == 2  # dw -1, dg + / dw +1, dg -
    assert model["w_diff_0_0_e5_mean"] == pytest.approx(0.5)
    assert model["grad_norm"] == pytest.approx(math.sqrt(2e-6**2 + 4e-6**2 + 1e-6**2 + 1e-6**2))
    # moving average: NaN at step 1 entered as 0, then ĝ = 0.5 * 0 + 0.5 * 1e-6
    ema = tracker.ema_grad.numpy()
    assert ema[4] == pytest.approx(0.5e-6) and ema[5] == 5.0  # Inf leaves the average as it was
    assert model["no_zero_e5_grad2_05avg"] == 5


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("thresholds, shapes, near_zero", [
    ((1e-5,), [(40, 30), (30,), (7,)], 1.0),
    ((1e-7, 1e-6, 1e-5), [(40, 30), (30,), (7,)], 1.0),
    # Several of the native kernel's parallel blocks, most of its chunks without any
    # entry near zero (it skips their retained-entry statistics).
    ((1e-7, 1e-6, 1e-5), [(350, 200), (30,), (7,)], 0.005),
])
def test_tracker_matches_numpy(thresholds, shapes, near_zero, kernel):
    """Other threshold counts change how the per-entry codes are histogrammed (three
    thresholds need two histograms); with ema_decay=0 the averages are the raw values,
    so both families must equal the raw reference exactly. `near_zero`: the fraction
    of the first variable's entries whose gradients come from the small levels (the
    same entries every step); the others are +-1e-3."""
    rng = np.random.default_rng(len(thresholds) + len(shapes[0]))
    near = rng.random(shapes[0]) < near_zero
    variables = [tf.Variable(rng.normal(size=s).astype(np.float32), name=f"v{i}")
                 for i, s in enumerate(shapes)]
    tracker = DynamicsTracker(variables, thresholds=thresholds, ema_decay=0.0, kernel=kernel)
    levels = [0.0, 5e-8, -5e-8, 5e-7, -5e-7, 5e-6, -5e-6, 1e-3, -1e-3]

    @tf.function
    def step(grads, new_weights):
        before = tracker.read_weights()
        for v, w in zip(variables, new_weights):
            v.assign(w)
        tracker.update(grads, before, tf.constant(0.0))

    weights, grads = [[v.numpy() for v in variables]], []
    for t in range(4):
        g = [rng.choice(levels, size=s).astype(np.float32) for s in shapes]
        g[0] = np.where(near, g[0], rng.choice([-1e-3, 1e-3], size=shapes[0]))
        g[2][:] = 0.0  # a dead variable: one code for every entry
        w = [a + rng.choice([-1e-3, 0.0, 1e-3], size=a.shape).astype(np.float32)
             for a in weights[-1]]
        step(g, w)
        grads.append(g)
        weights.append(w)
        (row,) = tracker.read_rows(t)
        model, layers = summarize(row.stats, row.has_prev, tracker.names, thresholds, 0.0)
        if t == 0:
            continue
        every = range(len(shapes))
        for metrics, select in [(layers[n], [i]) for i, n in enumerate(tracker.names)] \
                + [(model, every)]:
            g_prev, g_now, w_prev, w_now = (
                np.concatenate([arrays[i].ravel() for i in select])
                for arrays in (grads[t - 1], g, weights[t], w))
            for th in thresholds:
                want = reference_band(g_prev, g_now, w_prev, w_now, th)
                if select is every:  # no count trivially zero
                    assert min(want["retained"], want["flipped"], want["min"], want["max"]) > 0
                for suffix in ("", "_0avg"):
                    for short, key in key_names(threshold_tag(th), suffix).items():
                        assert metrics[key] == pytest.approx(want[short], rel=1e-6), \
                            (t, select, key)


@pytest.mark.parametrize("kernel", ["native", "xla"])
def test_histograms_skip_nonfinite_and_handle_edge_cases(kernel):
    """Per variable: NaN/Inf left out of range and counts, a constant variable all in
    bin 0, an empty variable all zeros, entries on bin edges, a variable over many of
    the native kernel's blocks; counts equal numpy's over the same range, from the
    XLA function and the native op alike."""
    from optinsight import native
    from optinsight.dynamics import _histograms

    rng = np.random.default_rng(3)
    parts = [rng.normal(size=50).astype(np.float32), np.full(7, 2.5, np.float32),
             np.zeros(0, np.float32), rng.normal(size=40).astype(np.float32),
             np.arange(-16, 17, dtype=np.float32) / 4,  # every bin edge of 8 bins
             rng.standard_cauchy(size=300_001).astype(np.float32)]
    parts[0][[3, 9]] = [np.nan, np.inf]
    parts[3][5] = -np.inf
    parts[5][[7, 150_000, 300_000]] = [np.nan, -np.inf, np.nan]
    # entries on bin edges of 7 bins that (v - lo) * (7 / width) puts in the bin below
    parts.append(np.array([0, 1.391619, 0.19880271, 0.39760542, 0.5964081, 0.79521084,
                           1.1928163], np.float32))
    module = native.load() if kernel == "native" else None
    if kernel == "native" and module is None:
        pytest.skip("the native kernel is not built")
    for bins in (8, 7):
        if kernel == "native":
            counts, ranges = module.insight_histograms([tf.constant(p) for p in parts],
                                                       bins=bins)
        else:
            sizes = [len(p) for p in parts]
            segments = tf.constant(np.repeat(np.arange(len(parts)), sizes), tf.int32)
            counts, ranges = _histograms(tf.constant(np.concatenate(parts)), segments,
                                         len(parts), bins)
        for v, values in enumerate(parts):
            finite = values[np.isfinite(values)].astype(np.float64)
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
            assert ranges.numpy()[v].tolist() == [lo, hi]
            width = hi - lo if hi > lo else 1.0
            index = np.clip(np.floor((finite - lo) / width * bins).astype(int), 0, bins - 1)
            assert counts.numpy()[v].tolist() == np.bincount(index, minlength=bins).tolist()
        if bins == 8:
            assert counts.numpy()[4].tolist() == [4] * 7 + [5]  # the last bin closed


@pytest.mark.parametrize("kernel", ["native", "xla"])
def test_a_zero_size_variable_has_zero_counts_and_maxima_with_either_kernel(kernel):
    """A variable with no entries: every count, sum and maximum 0 (w_diff max too),
    whichever kernel computes the statistics; its neighbour's values are unaffected."""
    from optinsight import native
    from optinsight.dynamics import DynamicsTracker
    from optinsight.metrics import summarize

    if kernel == "native" and native.load() is None:
        pytest.skip("the native kernel is not built")
    variables = [tf.Variable(np.ones(3, np.float32), name="full"),
                 tf.Variable(np.zeros((0, 4), np.float32), name="empty")]
    tracker = DynamicsTracker(variables, kernel=kernel, buffer_size=4)
    for _ in range(2):
        before = tracker.read_weights()
        variables[0].assign_sub([0.1, 0.2, 0.3])
        tracker.update([tf.constant([1e-8, 1.0, -1.0]), tf.zeros((0, 4))], before,
                       tf.constant(1.0))
    row = tracker.read_rows(0)[-1]
    _, layers = summarize(row.stats, row.has_prev, tracker.names, tracker.thresholds,
                          tracker.ema_decay)
    empty, full = layers[tracker.names[1]], layers[tracker.names[0]]
    assert row.step == 2
    for key in ("w_diff_0_0_e7_max", "w_diff_0_0_e5_max", "w_diff_0_0_e7_max_09avg",
                "no_zero_e7_grad2", "grad_norm", "wdiff"):
        assert empty[key] == 0, key
    assert full["w_diff_0_0_e7_max"] == pytest.approx(0.1, rel=1e-5)
