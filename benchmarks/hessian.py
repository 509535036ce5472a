"""Cost and convergence of the Hessian probes.

Part "cnn", the reference CNN on 1,024 examples:
* the time of one HVP relative to one gradient, for forward-over-reverse and
  reverse-over-reverse (target <= 2.5), measured alternately in one process;
* the HVPs Lanczos and power iteration need to bring λmax within 1e-3 relative
  error of a tightly converged reference (target for Lanczos <= 20);
* wall time of top_eigenvalues(k=1), top_eigenvalues(k=5) and trace(samples=100).

Part "pyhessian" (needs the benchmark extras, `make bench-setup`): a 784-256-128-10
ReLU MLP on 512 Fashion-MNIST examples, identical weights and batch in Keras and
PyTorch; `top_eigenvalues(k=1, tol=1e-3)` against PyHessian's
`eigenvalues(top_n=1, tol=1e-3)`, both warmed up, then timed alternately (target ratio
<= 0.5), and both λmax against a tightly converged one. Also the floor under an HVP
of this MLP that reuses every value of the forward and backward pass: the matrix
products of its tangent pass alone, timed compiled, as many as each method's HVPs.

Part "warm": that MLP trained with SGD on Fashion-MNIST; HessianProbe(k=2) every 50
steps, once starting from its previous eigenvectors and once from random vectors:
the HVPs each takes over the run.

Prints and writes benchmarks/results/hessian.json.

    .venv-bench/bin/python benchmarks/hessian.py [--parts cnn pyhessian warm] [--repeats 5]
"""

import argparse
import os
import sys
from functools import partial

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import read_results, timed, torch_copy, write_results  # noqa: E402

from main import build_model  # noqa: E402
from optinsight.probes import hessian, hvp, krylov  # noqa: E402


def cnn_part(args):
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

    ops = {m: hvp.HessianOperator(model, x, y, method=m) for m in hvp.METHODS}
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
    for m in hvp.METHODS:
        results[f"hvp_{m}_s"] = float(np.median(times[m]))
        results[f"hvp_{m}_over_gradient"] = results[f"hvp_{m}_s"] / grad_s
        print(f"HVP ({m}-over-reverse): {results[f'hvp_{m}_s'] * 1e3:.0f} ms, "
              f"{results[f'hvp_{m}_over_gradient']:.2f}x a gradient "
              f"({grad_s * 1e3:.0f} ms) (target <= 2.5)", flush=True)

    op = ops[hvp.default_method(model)]
    reference = hessian.top_eigenvalues(model, x, y, k=1, tol=1e-9, max_iter=200)[0]
    start = np.random.default_rng(1).standard_normal(op.size)
    alphas, betas = krylov.lanczos(op.matvec, tf.constant(start, op.dtype), 60,
                                    full_reorthogonalization=True)
    lanczos_needed = next(
        (m for m in range(1, len(alphas) + 1)
         if abs(np.linalg.eigvalsh(krylov._tridiagonal(alphas[:m], betas[:m - 1])).max()
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
    return results


def fashion_mlp(n, seed=0):
    """The 784-256-128-10 ReLU MLP (Keras) and n Fashion-MNIST examples scaled to [0, 1]."""
    from data_loader import load_fashion_mnist

    images, labels = load_fashion_mnist()[0]
    x = images[:n].reshape(n, -1).astype(np.float32) / 255
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, labels[:n].astype(np.int64)


def pyhessian_part(args):
    import torch
    from pyhessian import hessian as pyhessian

    pyhessian_products = count_pyhessian_products()
    torch.set_num_threads(os.cpu_count())
    model, x, y = fashion_mlp(512)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # away from initialisation
    net = torch_copy(model).eval()
    data = (torch.from_numpy(x), torch.from_numpy(y))
    criterion = torch.nn.CrossEntropyLoss()
    hessian.top_eigenvalues(model, x, y, k=1, tol=1e-3)  # trace and compile
    reference = hessian.top_eigenvalues(model, x, y, k=1, tol=1e-10, max_iter=300)[0]
    results = {"lambda_max_reference": float(reference), "target_ratio": 0.5}

    def ours(tol, max_iter=100):
        return hessian.top_eigenvalues(model, x, y, k=1, tol=tol, max_iter=max_iter)[0]

    def theirs(tol):
        return pyhessian(net, criterion, data=data, cuda=False).eigenvalues(
            maxIter=1000, tol=tol, top_n=1)[0][0]

    theirs(1e-3)  # warm-up: PyTorch's first call allocates and dispatches slowly
    for tol in (1e-3, 1e-6):  # the setting, and PyHessian at a comparable accuracy
        pyhessian_products.clear()
        row = compare(partial(ours, tol), partial(theirs, tol), reference, args.repeats)
        row["pyhessian_hvps"] = len(pyhessian_products) // args.repeats  # seeded: the same
        op = hvp.HessianOperator(model, x, y)
        krylov.top_eigenpairs(op.matvec, op.random(np.random.default_rng(0)), 1, 100, tol)
        row["optinsight_hvps"] = op.products
        results[f"tol_{tol:g}"] = row
        print(f"λmax on the MLP, 512 examples, tol {tol:g}: optinsight "
              f"{row['optinsight_s']:.3f} s ({op.products} HVPs, error "
              f"{row['optinsight_relative_error']:.1e}), PyHessian {row['pyhessian_s']:.3f} s "
              f"(error {row['pyhessian_relative_error']:.1e}); ratio {row['ratio']:.2f}"
              + (" (target <= 0.5)" if tol == 1e-3 else ""), flush=True)
    # Equal accuracy: the fewest Lanczos products that reach PyHessian's error at tol 1e-3.
    target = results["tol_0.001"]["pyhessian_relative_error"]
    products = next(m for m in range(2, 101)
                    if abs(ours(1e-12, m) - reference) <= target * reference)
    row = compare(partial(ours, 1e-12, products), partial(theirs, 1e-3), reference,
                  args.repeats)
    row["optinsight_hvps"] = products
    results["equal_accuracy"] = row
    print(f"At PyHessian's accuracy at tol 1e-3 ({target:.1e}): optinsight needs {products} "
          f"HVPs, {row['optinsight_s']:.3f} s against {row['pyhessian_s']:.3f} s; ratio "
          f"{row['ratio']:.2f}", flush=True)
    results["floor"] = floor(x, [layer.kernel.shape for layer in model.layers], results,
                             args.repeats)
    return results


def count_pyhessian_products():
    """A list that grows by one at each HVP PyHessian computes from now on."""
    module = sys.modules["pyhessian.hessian"]
    calls, product = [], module.hessian_vector_product

    def counted(*args, **kwargs):
        calls.append(None)
        return product(*args, **kwargs)

    module.hessian_vector_product = counted
    return calls


def floor(x, kernels, results, repeats):
    """The time per HVP of the matrix products of a Dense ReLU network's tangent pass on
    the batch x, and for each row's HVP counts over PyHessian's time: for optinsight the
    lowest ratio an HVP with every forward and backward value at hand reaches with that
    many products, for PyHessian the share of its time.

    For layer l (inputs h, kernel W, tangent V, backward δ, all primal values kept), the
    tangent of H·v needs h'W + hV (its outputs' tangent), δ'Wᵀ + δVᵀ (its inputs'
    backward tangent) and hᵀδ' + h'ᵀδ (its kernel's block): six products, two for the
    first layer (xV and xᵀδ': x is constant and nothing flows back into it)."""
    n = x.shape[0]
    shapes = []  # (left, right, transpose_a, transpose_b) of every product
    for i, (a, b) in enumerate(kernels):
        outputs, kernel = ([n, a], [a, b], False, False), ([n, a], [n, b], True, False)
        inputs = ([n, b], [a, b], False, True)
        shapes += [outputs, kernel] + ([outputs, inputs, inputs, kernel] if i else [])
    operands = [(tf.Variable(tf.random.normal(left)), tf.Variable(tf.random.normal(right)), ta, tb)
                for left, right, ta, tb in shapes]  # variables: constants would be folded

    @tf.function
    def products(count):
        last = tf.constant(0.0)
        for _ in tf.range(count):
            for left, right, ta, tb in operands:  # one after the other, as in Lanczos
                with tf.control_dependencies([last]):  # and none hoisted out of the loop
                    last += tf.matmul(left, right, transpose_a=ta, transpose_b=tb)[0, 0]
        return last

    count = 20
    products(tf.constant(count))
    per_hvp = float(np.median([timed(products, tf.constant(count))[1]
                               for _ in range(repeats)])) / count
    out = {"per_hvp_s": per_hvp}
    for key in ("tol_0.001", "equal_accuracy"):
        row = results[key]
        out[key] = {"optinsight_ratio": row["optinsight_hvps"] * per_hvp / row["pyhessian_s"]}
        if "pyhessian_hvps" in row:
            out[key]["pyhessian_share"] = row["pyhessian_hvps"] * per_hvp / row["pyhessian_s"]
    print(f"Floor: the tangent pass's matrix products take {per_hvp * 1e3:.2f} ms an HVP; "
          f"with {results['tol_0.001']['optinsight_hvps']} HVPs no method's ratio can go "
          f"below {out['tol_0.001']['optinsight_ratio']:.2f} at tol 1e-3 (PyHessian's "
          f"{results['tol_0.001']['pyhessian_hvps']} are "
          f"{out['tol_0.001']['pyhessian_share']:.0%} of its time), "
          f"{out['equal_accuracy']['optinsight_ratio']:.2f} at equal accuracy", flush=True)
    return out


def compare(ours, theirs, reference, repeats):
    """Median times of two λmax functions run alternately, their ratio and errors."""
    import torch

    times, values = {"optinsight": [], "pyhessian": []}, {}
    for _ in range(repeats):
        values["optinsight"], t = timed(ours)
        times["optinsight"].append(t)
        torch.manual_seed(0)
        values["pyhessian"], t = timed(theirs)
        times["pyhessian"].append(t)
    row = {f"{k}_s": float(np.median(v)) for k, v in times.items()}
    row.update({f"{k}_relative_error": float(abs(v - reference) / reference)
                for k, v in values.items()})
    row["ratio"] = row["optinsight_s"] / row["pyhessian_s"]
    return row


def warm_part(args):
    from optinsight.probes import HessianProbe

    model, x, y = fashion_mlp(6400)
    probe_x, probe_y = x[:512], y[:512]
    warm = HessianProbe(k=2, per_layer=False)
    counts = {"warm": [], "cold": []}
    values = []
    for epoch in range(args.warm_evaluations):
        start = 512 + (epoch * 50 * 64) % (len(x) - 512 - 3200)
        model.fit(x[start:start + 3200], y[start:start + 3200], batch_size=64, epochs=1,
                  verbose=0)
        w = warm(model, probe_x, probe_y)
        c = HessianProbe(k=2, per_layer=False)(model, probe_x, probe_y)
        counts["warm"].append(w["hvps"])
        counts["cold"].append(c["hvps"])
        values.append((w["lambda_1"], c["lambda_1"]))
    saved = 1 - sum(counts["warm"]) / sum(counts["cold"])
    results = {"evaluations": args.warm_evaluations, "steps_between": 50,
               "hvps_warm": counts["warm"], "hvps_cold": counts["cold"],
               "fraction_saved": saved,
               "largest_lambda_1_difference": max(abs(a - b) / b for a, b in values)}
    print(f"HessianProbe(k=2) every 50 steps, {args.warm_evaluations} evaluations: "
          f"{sum(counts['warm'])} HVPs warm-started against {sum(counts['cold'])} from random "
          f"({saved:.0%} saved); λ1 agrees to "
          f"{results['largest_lambda_1_difference']:.1e}", flush=True)
    return results


PARTS = {"cnn": cnn_part, "pyhessian": pyhessian_part, "warm": warm_part}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-evaluations", type=int, default=20)
    args = parser.parse_args()
    results = read_results("hessian")
    for part in args.parts:
        results[part] = PARTS[part](args)
    write_results("hessian", results)


if __name__ == "__main__":
    main()
