"""optinsight's instruments against Cockpit's own quantities (issue 30).

Part "equal": the same small MLP and CNN in Keras and in PyTorch, identical weights
(trained a few SGD steps away from initialisation) and one batch of 128 Fashion-MNIST
images. Cockpit (with BackPACK) computes its quantities MeanGSNR, NormTest, InnerTest,
OrthoTest, CABS, EarlyStopping, TICDiag and TICTrace (curvature "diag_ggn_exact", and
"diag_h", Cockpit's default, which equals it on these piecewise-linear networks) on
that batch; `optinsight.instruments.compute` computes its instruments on it. Then four
SGD steps from the same weights on the same batches, with Cockpit's Alpha and
Distance and with `fit` recording alpha and distance; and GradHist2d (how many of its
entries fall in another bin). Prints each quantity's relative difference (target
<= 1e-4).

Part "cost": the same MLP and CNN trained with SGD on batches of 128, every
instrument due at every step. PyTorch: a plain step against a step under Cockpit with
each of its configurations (`cockpit.utils.configuration`); Keras: plain `fit`
against `fit` with `OptimizationInsightCallback(instruments=preset,
histogram_freq=1)` (a histogram every step, as Cockpit's GradHist1d). The runs of
each framework alternate in one process; the figures are median step times (wall
clock, from batch begin to batch begin in Keras) and each preset's ratio to its plain
step. Target: optinsight's extra time (ratio − 1) at most half of Cockpit's for each
preset, and economy <= 1.25. Cockpit's "full" has HessMaxEV and GradHist2d; ours has
mean_gsnr, cabs and early_stopping instead (λmax is the Hessian probe's).

Prints and writes benchmarks/results/instruments.json. Needs the benchmark extras
(`make bench-setup`):

    .venv-bench/bin/python benchmarks/instruments.py [--parts equal cost] [--steps 20]
        [--rounds 3]
"""

import argparse
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
from common import read_results, torch_copy, write_results  # noqa: E402
from overhead import StepTimer  # noqa: E402

import optinsight as oi  # noqa: E402
from optinsight import instruments  # noqa: E402

BATCH = 128
LEARNING_RATE = 0.05
#: optinsight's instrument and the Cockpit quantity (class, keyword arguments) it equals.
COCKPIT = {"mean_gsnr": ("MeanGSNR", {}), "norm_test": ("NormTest", {}),
           "inner_test": ("InnerTest", {}), "ortho_test": ("OrthoTest", {}),
           "cabs": ("CABS", {}), "early_stopping": ("EarlyStopping", {}),
           "tic_diag": ("TICDiag", {"curvature": "diag_ggn_exact"}),
           "tic_trace": ("TICTrace", {"curvature": "diag_ggn_exact"})}
DIAG_H = {"tic_diag_diag_h": ("TICDiag", {}), "tic_trace_diag_h": ("TICTrace", {})}


PRESETS = ("economy", "business", "full")


def fashion_mnist(kind, n):
    """n Fashion-MNIST images in [0, 1] (flattened for the MLP) and their labels."""
    from data_loader import load_fashion_mnist

    images, labels = load_fashion_mnist()[0]
    x = images[:n].astype(np.float32) / 255  # [n, 28, 28, 1]
    return (x.reshape(n, -1) if kind == "mlp" else x), labels[:n].astype(np.int64)


def compiled_model(kind, seed=0):
    """The Keras MLP or CNN (ReLU, logits), compiled with SGD."""
    keras.utils.set_random_seed(seed)
    if kind == "mlp":
        layers = [keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                  keras.layers.Dense(10)]
    else:
        layers = [keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                  keras.layers.MaxPooling2D(2), keras.layers.Conv2D(8, 3, activation="relu"),
                  keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def model_and_batch(kind):
    """The compiled Keras MLP or CNN and a training batch (x, y), the model moved a few
    SGD steps away from initialisation on Fashion-MNIST."""
    x, y = fashion_mnist(kind, BATCH * 5)
    model = compiled_model(kind)
    model.fit(x[BATCH:], y[BATCH:], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return model, x[:BATCH], y[:BATCH]


def cockpit_values(net, x, y, quantities):
    """{name: value} of Cockpit's `quantities` ({name: (class name, kwargs)}) at step 0
    on the batch (x, y) with plain SGD."""
    import torch
    from backpack import extend
    from cockpit import Cockpit
    from cockpit import quantities as cockpit_quantities

    net = extend(net)
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    individual_loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    made = {name: getattr(cockpit_quantities, cls)(track_schedule=lambda step: step >= 0, **kw)
            for name, (cls, kw) in quantities.items()}
    cockpit = Cockpit(net.parameters(), quantities=list(made.values()))
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    inputs = torch.from_numpy(x if x.ndim == 2 else x.transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(y)
    optimizer.zero_grad()
    outputs = net(inputs)
    loss = loss_fn(outputs, labels)
    losses = individual_loss_fn(outputs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit(0, info={"batch_size": len(x), "individual_losses": losses,
                              "loss": loss, "optimizer": optimizer}):
            loss.backward(create_graph=cockpit.create_graph(0))
    return {name: q.get_output()[0] for name, q in made.items()}


def two_step_values(kind, steps=4):
    """Alpha and Distance over `steps` SGD steps from the same weights on the same
    batches: ({"alpha": [...], "distance": [[per variable], ...]} of optinsight's
    callback, the same of Cockpit's quantities), step t of the callback being Cockpit's
    step t − 1."""
    import json

    import torch
    from backpack import extend
    from cockpit import Cockpit
    from cockpit import quantities as cockpit_quantities

    x, y = fashion_mnist(kind, BATCH * steps)
    log_dir = tempfile.mkdtemp(prefix="instruments-equal-")
    model = compiled_model(kind)
    net = extend(torch_copy(model))  # the initial weights
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[
        oi.OptimizationInsightCallback(log_dir, instruments=["alpha", "distance"])])
    with open(os.path.join(log_dir, "instruments.jsonl")) as f:
        records = [json.loads(line) for line in f]
    ours = {"alpha": [r["instruments"]["alpha"] for r in records],
            "distance": [list(r["distance"].values()) for r in records]}
    schedule = lambda step: step >= 0  # noqa: E731
    alpha = cockpit_quantities.Alpha(track_schedule=schedule)
    distance = cockpit_quantities.Distance(track_schedule=schedule)
    cockpit = Cockpit(net.parameters(), quantities=[alpha, distance])
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    individual_loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    inputs = torch.from_numpy(x if x.ndim == 2 else x.transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(y)
    for step in range(steps):
        xb, yb = inputs[step * BATCH:(step + 1) * BATCH], labels[step * BATCH:(step + 1) * BATCH]
        optimizer.zero_grad()
        outputs = net(xb)
        loss = loss_fn(outputs, yb)
        info = {"batch_size": BATCH, "individual_losses": individual_loss_fn(outputs, yb),
                "loss": loss, "optimizer": optimizer}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with cockpit(step, info=info):
                loss.backward(create_graph=cockpit.create_graph(step))
        optimizer.step()
    theirs = {"alpha": [alpha.get_output().get(s) for s in range(steps)],
              "distance": [[float(d) for d in distance.get_output()[s]] for s in range(steps)]}
    return ours, theirs


def recorded_histogram(model, x, y):
    """GradHist2d as `fit` records it at the model's weights on the batch (x, y): one
    step with instruments=["grad_hist_2d"], which records at the weights it starts
    from; the model's weights are put back after."""
    weights = model.get_weights()
    log_dir = tempfile.mkdtemp(prefix="instruments-hist-")
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False, callbacks=[
        oi.OptimizationInsightCallback(log_dir, instruments=["grad_hist_2d"])])
    model.set_weights(weights)
    [(_, counts, _)] = oi.read_log(log_dir).gradient_parameter_histograms()
    return counts


def equal_part(args):
    results = {"target_relative_difference": 1e-4}
    for kind in ("mlp", "cnn"):
        model, x, y = model_and_batch(kind)
        ours = instruments.compute(model, x, y)
        ours.update({f"{name}_diag_h": ours[name] for name in ("tic_diag", "tic_trace")})
        theirs = cockpit_values(torch_copy(model).double(), x.astype(np.float64), y,
                                {**COCKPIT, **DIAG_H})
        rows = {}
        for name, value in ours.items():
            difference = abs(value - theirs[name]) / abs(theirs[name])
            rows[name] = {"optinsight": value, "cockpit": float(theirs[name]),
                          "relative_difference": difference}
            print(f"{kind} {name:18s} optinsight {value:12.6g}  cockpit "
                  f"{float(theirs[name]):12.6g}  relative difference {difference:.1e}",
                  flush=True)
        ours_counts = recorded_histogram(model, x, y)
        theirs_counts = np.asarray(cockpit_values(
            torch_copy(model).double(), x.astype(np.float64), y,
            {"hist": ("GradHist2d", {})})["hist"]["hist"])
        moved = int(np.abs(ours_counts - theirs_counts).sum()) // 2
        rows["grad_hist_2d"] = {"entries": int(theirs_counts.sum()), "moved": moved,
                                "relative_difference": moved / theirs_counts.sum()}
        print(f"{kind} grad_hist_2d       {moved} of {int(theirs_counts.sum())} entries in "
              "another bin", flush=True)
        ours, theirs = two_step_values(kind)
        for step, (a, b) in enumerate(zip(ours["alpha"], theirs["alpha"]), start=1):
            if a is None or b is None:
                print(f"{kind} alpha at step {step}: optinsight {a}, cockpit {b}")
                continue
            rows[f"alpha_step_{step}"] = {"optinsight": a, "cockpit": float(b),
                                          "relative_difference": abs(a - b) / abs(b)}
        for step, (a, b) in enumerate(zip(ours["distance"], theirs["distance"]), start=1):
            if step > 1:  # 0 at the first step
                rows[f"distance_step_{step}"] = {
                    "optinsight": a, "cockpit": b, "relative_difference": float(
                        np.max(np.abs(np.subtract(a, b)) / np.abs(b)))}
        for name in [n for n in rows if n.startswith(("alpha", "distance"))]:
            print(f"{kind} {name:18s} relative difference "
                  f"{rows[name]['relative_difference']:.1e}", flush=True)
        results[kind] = rows
    worst = max(r["relative_difference"] for kind in ("mlp", "cnn")
                for r in results[kind].values())
    results["worst_relative_difference"] = worst
    print(f"worst relative difference: {worst:.1e} (target <= 1e-4)")
    return results


def keras_step_times(kind, x, y, steps, rounds):
    """{mode: median step seconds} of plain `fit` and `fit` with each preset, alternating
    in rounds (round 0 warms up)."""
    log_root = tempfile.mkdtemp(prefix="instruments-bench-")
    runs = {}
    for mode in ("plain",) + PRESETS:
        callbacks = [] if mode == "plain" else [oi.OptimizationInsightCallback(
            os.path.join(log_root, mode), instruments=mode, histogram_freq=1)]
        runs[mode] = (compiled_model(kind), callbacks)
    times = {mode: [] for mode in runs}
    for r in range(rounds + 1):
        for mode in list(runs)[::1 if r % 2 else -1]:
            model, callbacks = runs[mode]
            timer = StepTimer()
            model.fit(x[:BATCH * steps], y[:BATCH * steps], batch_size=BATCH, epochs=1,
                      verbose=0, shuffle=False, callbacks=callbacks + [timer])
            if r:
                times[mode] += [wall for wall, _ in timer.steps()]
    return {mode: float(np.median(t)) for mode, t in times.items()}


def torch_step_times(kind, x, y, steps, rounds):
    """{mode: median step seconds} of a plain PyTorch SGD step and of one under Cockpit
    with each configuration, every quantity due at every step, alternating in rounds
    (round 0 warms up)."""
    import torch
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    torch.set_num_threads(os.cpu_count())
    inputs = torch.from_numpy(x if x.ndim == 2 else x.transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(y)
    runs = {}
    for mode in ("plain",) + PRESETS:
        net = extend(torch_copy(compiled_model(kind)))
        cockpit = None if mode == "plain" else Cockpit(
            net.parameters(), quantities=configuration(mode, track_schedule=lambda s: s >= 0))
        runs[mode] = (net, torch.optim.SGD(net.parameters(), lr=LEARNING_RATE), cockpit)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    individual_loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    times = {mode: [] for mode in runs}
    global_step = {mode: 0 for mode in runs}
    for r in range(rounds + 1):
        for mode in list(runs)[::1 if r % 2 else -1]:
            net, optimizer, cockpit = runs[mode]
            for i in range(steps):
                xb, yb = inputs[i * BATCH:(i + 1) * BATCH], labels[i * BATCH:(i + 1) * BATCH]
                began = time.perf_counter()
                optimizer.zero_grad()
                outputs = net(xb)
                loss = loss_fn(outputs, yb)
                if cockpit is None:
                    loss.backward()
                else:
                    step = global_step[mode]
                    info = {"batch_size": len(xb), "individual_losses":
                            individual_loss_fn(outputs, yb), "loss": loss,
                            "optimizer": optimizer}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        with cockpit(step, info=info):
                            loss.backward(create_graph=cockpit.create_graph(step))
                optimizer.step()
                global_step[mode] += 1
                if r and i:
                    times[mode].append(time.perf_counter() - began)
    return {mode: float(np.median(t)) for mode, t in times.items()}


def cost_part(args):
    results = {"target_extra_time_share": 0.5, "target_economy_ratio": 1.25,
               "batch": BATCH}
    for kind in ("mlp", "cnn"):
        x, y = fashion_mnist(kind, BATCH * args.steps)
        ours = keras_step_times(kind, x, y, args.steps, args.rounds)
        theirs = torch_step_times(kind, x, y, args.steps, args.rounds)
        rows = {}
        for preset in PRESETS:
            ratio, cockpit_ratio = ours[preset] / ours["plain"], theirs[preset] / theirs["plain"]
            rows[preset] = {"optinsight_ratio": ratio, "cockpit_ratio": cockpit_ratio,
                            "extra_time_share": (ratio - 1) / (cockpit_ratio - 1)}
            print(f"{kind} {preset:8s} optinsight {ratio:6.2f}x (plain Keras step "
                  f"{1e3 * ours['plain']:.1f} ms)  cockpit {cockpit_ratio:6.2f}x (plain "
                  f"PyTorch step {1e3 * theirs['plain']:.1f} ms)  extra time "
                  f"{rows[preset]['extra_time_share']:.2f} of Cockpit's", flush=True)
        results[kind] = {"keras_step_s": ours, "pytorch_step_s": theirs, "presets": rows}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["equal", "cost"],
                        choices=["equal", "cost"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = read_results("instruments")
    for part in args.parts:
        results[part] = {"equal": equal_part, "cost": cost_part}[part](args)
    write_results("instruments", results)


if __name__ == "__main__":
    main()
