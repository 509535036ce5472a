"""Does the diagnosis name the cause a run really has? Small buggy training setups, each
with its planted cause and a repaired twin, spanning the symptoms of AUTOTRAINER (ICSE
2021: vanishing/exploding gradients, dying ReLU, oscillating loss, slow convergence)
and DeepDiagnosis (ICSE 2022: numerical errors, unchanged weights, saturated
activations, dead nodes, accuracy/loss not improving, vanishing gradients), plus an
improper output activation; and healthy mixed-precision, custom-loop and fine-tuning
runs. Each trains a few epochs with the callback at its defaults (no probes unless the
symptom needs one), then `optinsight.diagnose` reads the logs.

Prints a confusion table (does the first finding name the planted cause; does any;
errors on the twin) and writes benchmarks/results/diagnosis.json. Targets: the first
finding right in >= 90 % of the setups, no error on any healthy twin, <= 10 minutes.

    python benchmarks/diagnosis.py [--only NAME ...]
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import write_results  # noqa: E402

import data_loader  # noqa: E402
import optinsight as oi  # noqa: E402
from optinsight import probes  # noqa: E402


# ----------------------------------------------------------------------------- data
def blobs(n=1024, d=20, classes=3, scale=1.0, seed=0):
    """Gaussian blobs (well separated), inputs times `scale`, one-hot labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 2
    x = ((centres[labels] + rng.normal(size=(n, d))) * scale).astype("float32")
    return x, keras.utils.to_categorical(labels, classes)


def circles(n=1024, seed=0):
    """Two concentric noisy circles (binary labels, shape [n, 1])."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(labels == 1, 1.0, 2.0) + rng.normal(scale=0.1, size=n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1).astype("float32")
    return x, labels[:, None].astype("float32")


_FASHION = {}


def fashion(n=2048, normalise=True, flat=True):
    """The first n Fashion-MNIST training images (Debian's dataset-fashion-mnist)."""
    if "data" not in _FASHION:
        _FASHION["data"] = data_loader.load_fashion_mnist()[0]
    x, y = _FASHION["data"]
    x = x[:n].astype("float32") / (255.0 if normalise else 1.0)
    return (x.reshape(n, -1) if flat else x), keras.utils.to_categorical(y[:n], 10)


# --------------------------------------------------------------------------- models
def mlp(inputs, hidden, activation="relu", out=3, out_activation="softmax", **dense):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((inputs,))]
                            + [keras.layers.Dense(h, activation=activation, **dense)
                               for h in hidden]
                            + [keras.layers.Dense(out, activation=out_activation)])


def cnn(activation="relu", out_activation="softmax"):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 3, activation=activation),
        keras.layers.MaxPooling2D(), keras.layers.Conv2D(32, 3, activation=activation),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation=out_activation)])


def compiled(model, optimizer, loss="categorical_crossentropy"):
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model


def normalised_net(scale):
    """Dense (no bias, weights of standard deviation `scale`) → BatchNormalization →
    ReLU → Dense → softmax. Normalisation makes the first kernel scale-invariant: its
    gradient shrinks as 1/scale, so with large weights SGD barely moves it (the
    learning rate it effectively gets falls as 1/scale²)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((20,)), keras.layers.Dense(32, use_bias=False,
                                               kernel_initializer=scaled_init(scale)),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Dense(32, activation="relu"), keras.layers.Dense(3, activation="softmax")])


def exp_stack(activation):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,))] + [
        layer for _ in range(5) for layer in (keras.layers.Dense(16),
                                              keras.layers.Activation(activation))]
        + [keras.layers.Dense(3, activation="softmax")])


def confident_mlp():
    """An MLP whose output layer starts with large weights: its softmax underflows to
    exact zeros for the classes it rules out."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dense(3, activation="softmax",
                                                kernel_initializer=scaled_init(10.0))])


def log_loss(clip):
    """Cross-entropy written by hand: log(p) of a possibly exact-zero probability."""
    def loss(y_true, y_pred):
        p = keras.ops.clip(y_pred, 1e-7, 1.0) if clip else y_pred
        return -keras.ops.sum(y_true * keras.ops.log(p), axis=-1)
    return loss


def scaled_init(scale):
    return keras.initializers.RandomNormal(stddev=scale, seed=0)


# ---------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Setup:
    """One training run: a compiled model, its data and fit arguments, and the probes
    the symptom needs (they see the first 128 training examples)."""

    model: keras.Model
    data: tuple
    epochs: int = 3
    batch_size: int = 32
    probes: tuple = ()


@dataclasses.dataclass
class Case:
    name: str
    symptom: str  # the peers' name for it
    expected: tuple  # codes that name the planted cause
    buggy: object  # () -> Setup
    twin: object  # () -> Setup: the same with the cause repaired


def _nan_inputs():
    x, y = blobs()
    x[::97, 3] = np.nan
    return x, y


CASES = [
    Case("deep_sigmoid_mlp", "vanishing gradient", ("vanishing_gradients",),
         lambda: Setup(compiled(mlp(20, [32] * 12, "sigmoid"), keras.optimizers.SGD(0.05)),
                       blobs()),
         lambda: Setup(compiled(mlp(20, [32] * 12, "relu", kernel_initializer="he_normal"),
                                keras.optimizers.SGD(0.05)), blobs())),
    Case("deep_tanh_small_init", "vanishing gradient", ("vanishing_gradients",),
         lambda: Setup(compiled(mlp(20, [32] * 15, "tanh",
                                    kernel_initializer=scaled_init(0.05)),
                                keras.optimizers.SGD(0.05)), blobs()),
         lambda: Setup(compiled(mlp(20, [32] * 15, "tanh"), keras.optimizers.SGD(0.05)),
                       blobs())),
    Case("dead_relu_bias", "dead node / dying ReLU", ("dead_layer",),
         lambda: Setup(compiled(mlp(20, [32, 32], bias_initializer=keras.initializers.Constant(
             -20.0)), keras.optimizers.Adam(1e-3)), blobs()),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.Adam(1e-3)), blobs())),
    Case("fashion_dead_relu_bias", "dead node / dying ReLU", ("dead_layer",),
         lambda: Setup(compiled(mlp(784, [64], bias_initializer=keras.initializers.Constant(
             -30.0), out=10), keras.optimizers.Adam(1e-3)), fashion()),
         lambda: Setup(compiled(mlp(784, [64], out=10), keras.optimizers.Adam(1e-3)),
                       fashion())),
    Case("dying_relus_34_layers", "dying ReLU", ("dead_units",),
         lambda: Setup(compiled(mlp(20, [128] * 33), keras.optimizers.Adam(1e-3)),
                       blobs(512)),
         lambda: Setup(compiled(mlp(20, [128] * 33, "leaky_relu"),
                                keras.optimizers.Adam(1e-3)), blobs(512))),
    Case("lr_far_too_high", "loss not decreasing (diverging)", ("lr_too_high", "nonfinite",
                                                                 "unstable_loss"),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(3.0)), blobs()),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(0.05)), blobs())),
    Case("exploding_deep_linear", "exploding gradient", ("exploding_gradients", "nonfinite"),
         lambda: Setup(compiled(mlp(20, [64] * 8, None, kernel_initializer=scaled_init(0.5)),
                                keras.optimizers.SGD(0.01)), blobs()),
         lambda: Setup(compiled(mlp(20, [64] * 8, None), keras.optimizers.SGD(0.01)),
                       blobs())),
    Case("nan_in_inputs", "numerical error", ("nonfinite",),
         lambda: Setup(compiled(mlp(20, [32]), keras.optimizers.Adam(1e-3)), _nan_inputs()),
         lambda: Setup(compiled(mlp(20, [32]), keras.optimizers.Adam(1e-3)), blobs())),
    Case("log_of_zero_loss", "numerical error", ("nonfinite",),
         lambda: Setup(compiled(confident_mlp(), keras.optimizers.SGD(0.01), log_loss(False)),
                       blobs(scale=3.0)),
         lambda: Setup(compiled(confident_mlp(), keras.optimizers.SGD(0.01), log_loss(True)),
                       blobs(scale=3.0))),
    Case("exponential_activations", "numerical error (forward)", ("nonfinite",),
         lambda: Setup(compiled(exp_stack("exponential"), keras.optimizers.SGD(0.01)),
                       blobs(scale=5.0)),
         lambda: Setup(compiled(exp_stack("relu"), keras.optimizers.SGD(0.01)),
                       blobs(scale=5.0))),
    Case("relu_output_cross_entropy", "improper output", ("improper_output",),
         lambda: Setup(compiled(mlp(20, [32], out_activation="relu"),
                                keras.optimizers.Adam(1e-3)), blobs()),
         lambda: Setup(compiled(mlp(20, [32]), keras.optimizers.Adam(1e-3)), blobs())),
    Case("softmax_with_from_logits", "improper output", ("improper_output",),
         lambda: Setup(compiled(mlp(20, [32]), keras.optimizers.Adam(1e-3),
                                keras.losses.CategoricalCrossentropy(from_logits=True)),
                       blobs()),
         lambda: Setup(compiled(mlp(20, [32], out_activation=None),
                                keras.optimizers.Adam(1e-3),
                                keras.losses.CategoricalCrossentropy(from_logits=True)),
                       blobs())),
    Case("sigmoid_output_multiclass", "improper output", ("improper_output",),
         lambda: Setup(compiled(mlp(20, [32], out_activation="sigmoid"),
                                keras.optimizers.Adam(1e-3)), blobs()),
         lambda: Setup(compiled(mlp(20, [32]), keras.optimizers.Adam(1e-3)), blobs())),
    Case("softmax_one_unit_binary", "improper output", ("improper_output",),
         lambda: Setup(compiled(mlp(2, [16, 16], out=1, out_activation="softmax"),
                                keras.optimizers.Adam(1e-2), "binary_crossentropy"), circles()),
         lambda: Setup(compiled(mlp(2, [16, 16], out=1, out_activation="sigmoid"),
                                keras.optimizers.Adam(1e-2), "binary_crossentropy"),
                       circles())),
    Case("shuffled_labels", "accuracy not increasing", ("not_converging",),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.Adam(1e-3)),
                       (blobs()[0], blobs()[1][np.random.default_rng(1).permutation(1024)])),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.Adam(1e-3)), blobs())),
    Case("fashion_cnn_shuffled_labels", "accuracy not increasing", ("not_converging",),
         lambda: Setup(compiled(cnn(), keras.optimizers.Adam(1e-3)),
                       (fashion(1024, flat=False)[0],
                        fashion(1024)[1][np.random.default_rng(1).permutation(1024)]),
                       epochs=2),
         lambda: Setup(compiled(cnn(), keras.optimizers.Adam(1e-3)), fashion(1024, flat=False),
                       epochs=2)),
    Case("lr_far_too_low", "slow convergence / loss not decreasing", ("not_converging",),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(1e-6)), blobs()),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(0.05)), blobs())),
    Case("unnormalised_inputs", "oscillating loss", ("unstable_loss", "lr_too_high",
                                                      "exploding_gradients"),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(0.01, momentum=0.9)),
                       blobs(scale=20.0), epochs=4, batch_size=4),
         lambda: Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(0.01, momentum=0.9)),
                       blobs(), epochs=4, batch_size=4)),
    Case("zero_initialised_layers", "unchanged weights", ("zero_gradients", "dead_layer"),
         lambda: Setup(compiled(keras.Sequential([
             keras.Input((20,)), keras.layers.Dense(32, kernel_initializer="zeros"),
             keras.layers.Dense(32, kernel_initializer="zeros", activation="tanh"),
             keras.layers.Dense(3, activation="softmax")]), keras.optimizers.SGD(0.05)),
             blobs()),
         lambda: Setup(compiled(keras.Sequential([
             keras.Input((20,)), keras.layers.Dense(32),
             keras.layers.Dense(32, activation="tanh"),
             keras.layers.Dense(3, activation="softmax")]), keras.optimizers.SGD(0.05)),
             blobs())),
    Case("stalled_large_weights", "unchanged weights (one layer)", ("stalled_layer",),
         lambda: Setup(compiled(normalised_net(100.0), keras.optimizers.SGD(0.05)), blobs()),
         lambda: Setup(compiled(normalised_net(0.2), keras.optimizers.SGD(0.05)), blobs())),
    Case("saturated_tanh", "saturated activation", ("activation_saturation",
                                                    "vanishing_gradients"),
         lambda: Setup(compiled(mlp(20, [64, 64], "tanh"), keras.optimizers.SGD(0.01)),
                       blobs(scale=50.0), probes=(probes.ActivationProbe(every="epoch"),)),
         lambda: Setup(compiled(mlp(20, [64, 64], "tanh"), keras.optimizers.SGD(0.01)),
                       blobs(), probes=(probes.ActivationProbe(every="epoch"),))),
]


def _mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = mlp(6, [32], out=1, out_activation=None)
    finally:
        keras.config.set_dtype_policy("float32")
    x = np.random.default_rng(0).normal(size=(256, 6)).astype("float32") * 30
    return Setup(compiled(model, keras.optimizers.Adam(1e-2), "mse"),
                 (x, (x.sum(1, keepdims=True) * 10).astype("float32")), epochs=4,
                 batch_size=8)


def _batch_size_one():
    x, y = blobs(256)
    return Setup(compiled(mlp(20, [32, 32]), keras.optimizers.SGD(0.01)), (x, y), epochs=2,
                 batch_size=1)


def _fine_tuning(log_dir):
    """A head trained on a frozen ReLU body, then the body unfrozen."""
    model = mlp(20, [32, 32])
    x, y = blobs()
    for layer in model.layers[:-1]:
        layer.trainable = False
    compiled(model, keras.optimizers.Adam(1e-3))
    cb = oi.OptimizationInsightCallback(log_dir, diagnosis=False)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb])
    for layer in model.layers:
        layer.trainable = True
    compiled(model, keras.optimizers.Adam(1e-4))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb])


def _custom_loop(log_dir):
    """The README's custom loop, without loss= (allowed)."""
    model, optimizer = mlp(20, [32, 32]), keras.optimizers.Adam(1e-3)
    x, y = blobs()
    loss_fn = keras.losses.CategoricalCrossentropy()
    rec = oi.InsightRecorder(log_dir, model, optimizer, diagnosis=False)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        rec.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))

    with rec:
        for epoch in range(3):
            for i in range(0, len(x), 32):
                step(x[i:i + 32], y[i:i + 32])
                rec.batch_end()
            rec.epoch_end(epoch)


HEALTHY = {"mixed_precision": _mixed_precision, "batch_size_one": _batch_size_one,
           "fine_tuning": _fine_tuning, "custom_loop_without_loss": _custom_loop}


def run(setup, log_dir):
    """Train `setup` with the callback into `log_dir`; its findings."""
    x, y = setup.data
    options = {"probes": setup.probes, "probe_data": (x[:128], y[:128])} if setup.probes \
        else {}
    setup.model.fit(x, y, batch_size=setup.batch_size, epochs=setup.epochs, verbose=0,
                    callbacks=[oi.OptimizationInsightCallback(log_dir, diagnosis=False,
                                                              **options)])
    return oi.diagnose(log_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="case names")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    began = time.perf_counter()
    rows, healthy_rows = [], []
    with tempfile.TemporaryDirectory() as root:
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            keras.backend.clear_session()
            buggy = run(case.buggy(), os.path.join(root, case.name))
            keras.backend.clear_session()
            twin = run(case.twin(), os.path.join(root, case.name + "_twin"))
            rows.append({
                "case": case.name, "symptom": case.symptom, "planted": list(case.expected),
                "first": buggy[0].code if buggy else None,
                "first_right": bool(buggy) and buggy[0].code in case.expected,
                "any_right": any(f.code in case.expected for f in buggy),
                "findings": [f"{f.severity} {f.code}" for f in buggy],
                "twin_errors": [f.code for f in twin if f.severity == "error"],
                "twin_findings": [f"{f.severity} {f.code}" for f in twin]})
            print(f"{case.name:30s} first={rows[-1]['first']!s:22s} "
                  f"right={rows[-1]['first_right']!s:5s} twin errors={rows[-1]['twin_errors']}",
                  flush=True)
        for name, make in HEALTHY.items():
            if args.only and name not in args.only:
                continue
            keras.backend.clear_session()
            log_dir = os.path.join(root, name)
            made = make(log_dir) if name in ("fine_tuning", "custom_loop_without_loss") \
                else make()
            findings = run(made, log_dir) if made is not None else oi.diagnose(log_dir)
            healthy_rows.append({"run": name, "errors": [f.code for f in findings
                                                         if f.severity == "error"],
                                 "findings": [f"{f.severity} {f.code}" for f in findings]})
            print(f"{name:30s} healthy: errors={healthy_rows[-1]['errors']}", flush=True)
    seconds = time.perf_counter() - began
    first = sum(r["first_right"] for r in rows)
    anywhere = sum(r["any_right"] for r in rows)
    twin_errors = sum(bool(r["twin_errors"]) for r in rows) + sum(
        bool(r["errors"]) for r in healthy_rows)
    print(f"\n{'case':30s} {'planted':38s} {'first finding':22s} first any twin-errors")
    for r in rows:
        print(f"{r['case']:30s} {'/'.join(r['planted']):38s} {r['first']!s:22s} "
              f"{'yes' if r['first_right'] else 'NO':5s} {'yes' if r['any_right'] else 'NO':3s} "
              f"{','.join(r['twin_errors']) or '-'}")
    for r in healthy_rows:
        print(f"{r['run']:30s} {'(healthy)':38s} {'':22s} {'':5s} {'':3s} "
              f"{','.join(r['errors']) or '-'}")
    summary = {"setups": len(rows), "first_right": first, "any_right": anywhere,
               "first_right_fraction": first / max(len(rows), 1),
               "healthy_runs_with_an_error": twin_errors, "seconds": round(seconds, 1)}
    print(f"\nfirst finding right: {first}/{len(rows)} ({100 * first / max(len(rows), 1):.0f} %, "
          f"target >= 90 %); any finding right: {anywhere}/{len(rows)}; healthy runs with an "
          f"error: {twin_errors} (target 0); {seconds:.0f} s (target <= 600)")
    if not args.only:
        write_results("diagnosis", {"summary": summary, "cases": rows, "healthy": healthy_rows})


if __name__ == "__main__":
    main()
