"""What the benchmark scripts share: timing, peak memory, and writing their figures
with the machine's facts."""

import json
import os
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def peak_mib():
    """This process's peak resident memory in MiB: VmHWM, which starts afresh at exec
    (getrusage's ru_maxrss keeps the high-water mark of the process that started it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall time in seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def read_results(name):
    """The figures last written to benchmarks/results/<name>.json (without the machine's
    facts), so that a run of some parts keeps the others; {} when there are none."""
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if k != "machine"}


def write_results(name, results):
    """Write results (plus cpus and library versions) to benchmarks/results/<name>.json."""
    import keras
    import tensorflow as tf

    results = {**results, "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                                      "keras": keras.__version__}}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)


def torch_copy(model):
    """The same network in PyTorch with the Keras weights: Dense, Conv2D (valid, stride
    1), MaxPooling2D, Flatten and ReLU activations. Images go in as NCHW
    (`x.transpose(0, 3, 1, 2)`); the Dense after a Flatten has its input columns
    reordered from Keras's (h, w, c) to PyTorch's (c, h, w)."""
    import keras
    import numpy as np
    import torch

    layers, spatial = [], None  # the feature map's (h, w, c) before a Flatten
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = np.asarray(layer.kernel)  # [kh, kw, in, out]
            module = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2])
            weight = kernel.transpose(3, 2, 0, 1)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            layers.append(torch.nn.MaxPool2d(layer.pool_size))
            continue
        elif isinstance(layer, keras.layers.Flatten):
            spatial = tuple(layer.input.shape[1:])
            layers.append(torch.nn.Flatten())
            continue
        else:
            kernel = np.asarray(layer.kernel)  # [in, out]
            if spatial is not None:
                kernel = kernel.reshape(*spatial, -1).transpose(2, 0, 1, 3).reshape(
                    kernel.shape)
                spatial = None
            module = torch.nn.Linear(*kernel.shape)
            weight = kernel.T
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(weight.copy()))
            module.bias.copy_(torch.from_numpy(np.asarray(layer.bias)))
        layers.append(module)
        activation = keras.activations.serialize(layer.activation)
        if activation == "relu":
            layers.append(torch.nn.ReLU())
        elif activation != "linear":
            raise ValueError(f"no PyTorch twin for activation {activation!r}")
    return torch.nn.Sequential(*layers)
