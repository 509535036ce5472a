"""optinsight's instruments against Cockpit's own quantities (issue 30).

Part "equal": the same small MLP and CNN in Keras and in PyTorch, identical weights
(trained a few SGD steps away from initialisation) and one batch of 128 Fashion-MNIST
images. Cockpit (with BackPACK) computes its quantities MeanGSNR, NormTest, InnerTest,
OrthoTest, CABS, EarlyStopping, TICDiag and TICTrace (curvature "diag_ggn_exact", and
"diag_h", Cockpit's default, which equals it on these piecewise-linear networks) on
that batch; `optinsight.instruments.compute` computes its instruments on it. Prints
each quantity's relative difference (target <= 1e-4).

Prints and writes benchmarks/results/instruments.json. Needs the benchmark extras
(`make bench-setup`):

    .venv-bench/bin/python benchmarks/instruments.py [--parts equal]
"""

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import read_results, torch_copy, write_results  # noqa: E402

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


def model_and_batch(kind, seed=0):
    """A compiled Keras MLP or CNN (ReLU, logits, SGD), a training batch (x, y), moved a
    few SGD steps away from initialisation on Fashion-MNIST."""
    from data_loader import load_fashion_mnist

    images, labels = load_fashion_mnist()[0]
    x = images[:BATCH * 5].astype(np.float32) / 255  # [n, 28, 28, 1]
    y = labels[:BATCH * 5].astype(np.int64)
    keras.utils.set_random_seed(seed)
    if kind == "mlp":
        x = x.reshape(len(x), -1)
        layers = [keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                  keras.layers.Dense(10)]
    else:
        layers = [keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                  keras.layers.MaxPooling2D(2), keras.layers.Conv2D(8, 3, activation="relu"),
                  keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
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
    made = {name: getattr(cockpit_quantities, cls)(track_schedule=lambda step: True, **kw)
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
        results[kind] = rows
    worst = max(r["relative_difference"] for kind in ("mlp", "cnn")
                for r in results[kind].values())
    results["worst_relative_difference"] = worst
    print(f"worst relative difference: {worst:.1e} (target <= 1e-4)")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["equal"], choices=["equal"])
    args = parser.parse_args()
    results = read_results("instruments")
    for part in args.parts:
        results[part] = {"equal": equal_part}[part](args)
    write_results("instruments", results)


if __name__ == "__main__":
    main()
