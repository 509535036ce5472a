"""The vectorised empirical NTK against loops and against JAX, and its memory.

Part "jax" (needs the benchmark extras, `make bench-setup`): the 784-128-64-10 ReLU
MLP, n = 256, each mode of `ntk.kernel` at its defaults against a jitted JAX
`vmap(jacrev)` Jacobian contracted the same way, on identical weights and inputs,
timed alternately (targets: sum_logits <= 1.0x, trace and full <= 1.5x), and the
largest difference between the two kernels relative to the largest entry.

Part "loops", for the reference CNN (CIFAR-10 shape) and that MLP, n = 256, sum_logits mode:
* time of `ntk.kernel` (vectorised per-example gradients) against the per-pair loop
  (for each of the n(n+1)/2 pairs, two compiled gradient calls and a dot product;
  timed on 200 pairs and scaled to all of them) — target >= 10x — and against a
  per-example loop (one compiled gradient call per example, then J Jᵀ), timed whole;
* peak resident memory of `ntk.kernel` with chunk_size=None and 32, each measured in
  a fresh subprocess.
Prints the figures and writes benchmarks/results/ntk.json.

    .venv-bench/bin/python benchmarks/ntk.py [--parts jax loops] [--repeats 3]
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import peak_mib, read_results, timed, write_results  # noqa: E402

from main import build_model  # noqa: E402
from optinsight.probes import ntk  # noqa: E402

N = 256


def model_and_data(kind):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if kind == "cnn":
        return build_model((32, 32, 3)), rng.random((N, 32, 32, 3), dtype=np.float32)
    x_in = keras.Input((784,))
    h = keras.layers.Dense(128, activation="relu")(x_in)
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.Model(x_in, keras.layers.Dense(10)(h)), rng.random((N, 784), dtype=np.float32)


def example_gradient(model):
    """A compiled f(x_i) -> flat gradient of the summed logits of one example."""
    variables = model.trainable_variables

    @tf.function
    def gradient(xi):
        with tf.GradientTape() as tape:
            out = tf.reduce_sum(ntk.logits(model, xi))
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(out, variables)], 0)

    return gradient


def loop_kernel(model, x):
    gradient = example_gradient(model)
    rows = [gradient(x[i:i + 1]).numpy() for i in range(len(x))]
    J = np.array(rows, dtype=np.float64)
    return J @ J.T


def pair_loop_seconds(model, x, pairs=200):
    """Seconds the per-pair loop would take for all n(n+1)/2 pairs, from `pairs` of them."""
    gradient = example_gradient(model)
    gradient(x[:1])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(pairs):
        i, j = rng.integers(0, len(x), 2)
        float(tf.tensordot(gradient(x[i:i + 1]), gradient(x[j:j + 1]), 1))
    per_pair = (time.perf_counter() - start) / pairs
    return per_pair * len(x) * (len(x) + 1) / 2


def warm_timed(fn):
    """timed(fn) after a first call that traces and compiles."""
    fn()
    return timed(fn)


def memory_child(kind, chunk):
    model, x = model_and_data(kind)
    before = peak_mib()
    ntk.kernel(model, x, chunk_size=None if chunk == 0 else chunk)
    peak = peak_mib()
    print(json.dumps({"peak_mib": peak, "added_mib": peak - before}))


def loops_part(args):
    results = {}
    for kind in ("cnn", "mlp"):
        model, x = model_and_data(kind)
        fast, t_fast = warm_timed(lambda m=model, x=x: ntk.kernel(m, x, chunk_size=64))
        slow, t_slow = warm_timed(lambda m=model, x=x: loop_kernel(m, x))
        np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-3 * np.abs(slow).max())
        t_pairs = pair_loop_seconds(model, x)
        r = {"n": N, "vectorised_s": t_fast, "pair_loop_s_extrapolated": t_pairs,
             "speedup_vs_pair_loop": t_pairs / t_fast, "target_speedup": 10,
             "example_loop_s": t_slow, "speedup_vs_example_loop": t_slow / t_fast}
        for chunk in (0, 32):
            out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(chunk)],
                                 capture_output=True, text=True, check=True).stdout
            r[f"peak_mib_chunk_{chunk or 'none'}"] = json.loads(out.splitlines()[-1])["peak_mib"]
        results[kind] = r
        print(f"{kind}: vectorised {t_fast:.2f} s; per-pair loop {t_pairs:.0f} s "
              f"(extrapolated), {r['speedup_vs_pair_loop']:.0f}x (target >= 10); per-example "
              f"loop {t_slow:.2f} s, {r['speedup_vs_example_loop']:.1f}x; peak memory "
              f"{r['peak_mib_chunk_none']:.0f} MiB unchunked, "
              f"{r['peak_mib_chunk_32']:.0f} MiB with chunk_size=32", flush=True)
    return results


def jax_kernels(model):
    """Jitted JAX functions (params, x) -> kernel per mode, for the Dense-ReLU MLP."""
    import jax
    import jax.numpy as jnp

    def logits(params, xi):
        h = xi
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return h

    def jacobian(params, x, summed):
        f = (lambda p, xi: logits(p, xi).sum()) if summed else logits
        leaves = jax.tree_util.tree_leaves(jax.vmap(jax.jacrev(f), (None, 0))(params, x))
        outputs = 1 if summed else leaves[0].shape[1]  # leaves: [n, (k,) *parameter shape]
        return jnp.concatenate([leaf.reshape(x.shape[0], outputs, -1) for leaf in leaves], 2)

    def sum_logits(params, x):
        j = jacobian(params, x, True)[:, 0]
        return j @ j.T

    def trace(params, x):
        j = jacobian(params, x, False)
        return jnp.einsum("iap,jap->ij", j, j)

    def full(params, x):
        j = jacobian(params, x, False)
        return jnp.einsum("iap,jbp->ijab", j, j)

    params = [(jnp.asarray(layer.kernel.numpy()), jnp.asarray(layer.bias.numpy()))
              for layer in model.layers if layer.weights]
    return params, {"sum_logits": jax.jit(sum_logits), "trace": jax.jit(trace),
                    "full": jax.jit(full)}


def jax_part(args):
    import jax.numpy as jnp

    model, x = model_and_data("mlp")
    params, functions = jax_kernels(model)
    x_jax = jnp.asarray(x)
    results = {"n": N, "targets": {"sum_logits": 1.0, "trace": 1.5, "full": 1.5}}
    for mode, fn in functions.items():
        times = {"optinsight": [], "jax": []}
        ours = ntk.kernel(model, x, mode=mode)  # trace and compile both
        theirs = np.asarray(fn(params, x_jax).block_until_ready())
        for _ in range(args.repeats):
            ours, t = timed(lambda mode=mode: ntk.kernel(model, x, mode=mode))
            times["optinsight"].append(t)
            theirs, t = timed(lambda fn=fn: np.asarray(fn(params, x_jax)
                                                            .block_until_ready()))
            times["jax"].append(t)
        row = {f"{k}_s": float(np.median(v)) for k, v in times.items()}
        row["ratio"] = row["optinsight_s"] / row["jax_s"]
        row["largest_difference"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        results[mode] = row
        print(f"eNTK {mode}, MLP, n = {N}: optinsight {row['optinsight_s']:.2f} s, JAX "
              f"{row['jax_s']:.2f} s, ratio {row['ratio']:.2f} (target <= "
              f"{results['targets'][mode]}); largest difference "
              f"{row['largest_difference']:.1e} of the largest entry", flush=True)
    return results


PARTS = {"jax": jax_part, "loops": loops_part}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-child":
        return memory_child(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = read_results("ntk")
    for part in args.parts:
        result = PARTS[part](args)
        results.update(result if part == "loops" else {part: result})
    write_results("ntk", results)


if __name__ == "__main__":
    main()
