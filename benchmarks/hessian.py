"""Cost and convergence of the Hessian probes on the reference CNN, 1,024 examples.

Prints and writes to benchmarks/results/hessian.json:
* the time of one HVP relative to one gradient, for forward-over-reverse and
  reverse-over-reverse (target <= 2.5), measured alternately in one process;
* the HVPs Lanczos and power iteration need to bring λmax within 1e-3 relative
  error of a tightly converged reference (target for Lanczos <= 20);
* wall time of top_eigenvalues(k=1), top_eigenvalues(k=5) and trace(samples=100).

    python benchmarks/hessian.py [--repeats 5]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import write_results  # noqa: E402

from main import build_model  # noqa: E402
from optinsight.probes import hessian  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((1024, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 1024), 10)
    model = build_model((32, 32, 3))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # away from initialisation
    variables = model.trainable_variables

    @tf.function
    def gradient(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False),
                                      training=False)
        return tape.gradient(loss, variables)

    ops = {m: hessian.HessianOperator(model, x, y, method=m) for m in hessian.METHODS}
    v = [tf.constant(rng.standard_normal(w.shape), w.dtype) for w in variables]
    gradient(x, y)
    for op in ops.values():
        op.matvec_tensors(v)  # trace and compile
    times = {"gradient": [], "forward": [], "reverse": []}
    for _ in range(args.repeats):
        times["gradient"].append(timed(lambda: [t.numpy() for t in gradient(x, y)])[1])
        for m, op in ops.items():
            times[m].append(timed(lambda op=op: [t.numpy() for t in op.matvec_tensors(v)])[1])
    grad_s = float(np.median(times["gradient"]))
    results = {"gradient_s": grad_s}
    for m in hessian.METHODS:
        results[f"hvp_{m}_s"] = float(np.median(times[m]))
        results[f"hvp_{m}_over_gradient"] = results[f"hvp_{m}_s"] / grad_s
        print(f"HVP ({m}-over-reverse): {results[f'hvp_{m}_s'] * 1e3:.0f} ms, "
              f"{results[f'hvp_{m}_over_gradient']:.2f}x a gradient "
              f"({grad_s * 1e3:.0f} ms) (target <= 2.5)", flush=True)

    op = ops[hessian.DEFAULT_METHOD]
    reference = hessian.top_eigenvalues(model, x, y, k=1, tol=1e-9, max_iter=200)[0]
    start = np.random.default_rng(1).standard_normal(op.size)
    alphas, betas, _ = hessian.lanczos(op, op.size, 60, start)
    lanczos_needed = next(
        (m for m in range(1, len(alphas) + 1)
         if abs(np.linalg.eigvalsh(hessian._tridiagonal(alphas[:m], betas[:m - 1])).max()
                - reference) <= 1e-3 * abs(reference)), None)
    q, power_needed = start / np.linalg.norm(start), None
    for i in range(1, 301):
        w = op(q)
        if abs(q @ w - reference) <= 1e-3 * abs(reference):
            power_needed = i
            break
        q = w / np.linalg.norm(w)
    results.update({"lambda_max": float(reference), "lanczos_hvps_to_1e-3": lanczos_needed,
                    "power_hvps_to_1e-3": power_needed})
    print(f"λmax = {reference:.4f}: Lanczos needs {lanczos_needed} HVPs to 1e-3 relative "
          f"error (target <= 20), power iteration {power_needed}", flush=True)
    for label, fn in (("top_eigenvalues_k1_s", lambda: hessian.top_eigenvalues(model, x, y)),
                      ("top_eigenvalues_k5_s",
                       lambda: hessian.top_eigenvalues(model, x, y, k=5)),
                      ("trace_100_s", lambda: hessian.trace(model, x, y, samples=100))):
        results[label] = timed(fn)[1]
        print(f"{label}: {results[label]:.1f} s", flush=True)
    write_results("hessian", results)


if __name__ == "__main__":
    main()
