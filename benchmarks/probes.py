"""Time and peak memory of every probe of main.py's set, on the reference CNN and on
Keras's ResNet50 (weights=None, 32×32×3 inputs, 10 classes), compiled with Adam.

Each probe runs in a fresh process: the model takes two training steps on batches of
32 (so the optimizer has its slots), then the probe evaluates --evaluations times on a
128-example probe batch, with one training step between evaluations (the first
evaluation also traces and compiles). Reported per probe: the longest evaluation's
wall time, its peak resident memory above the training steps' peak in the same process
(what the probe needs beyond training), and per evaluation its time and what it says of
its own work (HVPs, examples, residual, parameters covered). A probe still running
after --timeout seconds is stopped and reported as such. Prints a table and writes
benchmarks/results/probes.json.

    python benchmarks/probes.py [--models cnn resnet50] [--probes NAME ...]
                                [--evaluations 3] [--timeout 600]

With --probes, only those (class names) run; the other figures already in
probes.json are kept.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import peak_mib, read_results, write_results  # noqa: E402

MODELS = ("cnn", "resnet50")
PROBE_EXAMPLES = 128
TARGETS = {"seconds": 60, "mib_above_training": 2048}
#: What a probe's result says of its own work, kept beside its time and memory.
REPORTED = ("hessian_examples", "hvps", "lambda_1", "lambda_residual", "sharpness", "parameters")


def child(model_name, index, evaluations):
    import keras
    import numpy as np

    import main

    keras.utils.set_random_seed(0)
    if model_name == "cnn":
        model = main.build_model((32, 32, 3))
    else:
        model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((32 + PROBE_EXAMPLES, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, len(x)), 10)
    for _ in range(2):
        model.train_on_batch(x[:32], y[:32])
    training = peak_mib()
    probe = main.build_probes()[index]
    each = []
    for i in range(evaluations):
        if i:
            model.train_on_batch(x[:32], y[:32])
        start = time.perf_counter()
        out = probe(model, x[32:], y[32:])
        each.append({"seconds": time.perf_counter() - start,
                     **{k: float(out[k]) for k in REPORTED if k in out}})
    print(json.dumps({"probe": type(probe).__name__,
                      "seconds": max(e["seconds"] for e in each),
                      "training_peak_mib": training,
                      "mib_above_training": peak_mib() - training, "evaluations": each}))


def measure(model_name, index, evaluations, timeout):
    try:
        out = subprocess.run([sys.executable, __file__, "--child", model_name, str(index),
                              "--evaluations", str(evaluations)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    notices = [line for line in out.stderr.splitlines() if line.startswith("optinsight:")]
    return {**row, "notices": notices} if notices else row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--probes", nargs="+", help="probe class names (default: all)")
    parser.add_argument("--evaluations", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.evaluations)
    import main as job

    names = [type(p).__name__ for p in job.build_probes()]
    results = {**read_results("probes"), "probe_examples": PROBE_EXAMPLES, "targets": TARGETS}
    for model_name in args.models:
        rows = results.get(model_name, {})
        for index, name in enumerate(names):
            if args.probes and name not in args.probes:
                continue
            row = measure(model_name, index, args.evaluations, args.timeout)
            rows[name] = row
            if "seconds" in row:
                verdict = "ok" if (row["seconds"] <= TARGETS["seconds"] and row[
                    "mib_above_training"] <= TARGETS["mib_above_training"]) else "over"
                text = (f"{row['seconds']:7.1f} s  {row['mib_above_training']:7.0f} MiB above "
                        f"training ({row['training_peak_mib']:.0f} MiB)  {verdict}")
            elif "timeout_s" in row:
                text = f"still running after {row['timeout_s']:.0f} s"
            else:
                text = f"failed: {row['error']}"
            print(f"{model_name:9s} {name:22s} {text}", flush=True)
            for i, evaluation in enumerate(row.get("evaluations", ())):
                print(f"{'':32s} evaluation {i + 1}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in evaluation.items()))
            for notice in row.get("notices", ()):
                print(f"{'':32s} {notice}")
        results[model_name] = rows
    write_results("probes", results)


if __name__ == "__main__":
    main()
