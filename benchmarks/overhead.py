"""Cost of OptimizationInsightCallback at its defaults against plain `fit`.

Two models: the reference CNN on CIFAR-10-shaped data at batch 256 and a 3-layer
MLP at batch 128. Plain and insight runs alternate in one process (same data,
same number of steps each round); the figures are the median step time of each,
in wall-clock and in process CPU time (all threads), and their ratios. The timer
notes both at each batch begin, on the training thread, and declares itself
async-safe, so it leaves Keras's dispatch as the callbacks under test make it.
Memory: peak resident set size after 100 and after 1,000 steps of
one MLP fit with the callback. Prints the figures and writes
benchmarks/results/overhead.json (with --xla, which times the tracker's XLA version
instead of the fused CPU kernel: overhead_xla.json).

    python benchmarks/overhead.py [--rounds 5] [--steps 40] [--xla]
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import write_results  # noqa: E402

import optinsight as oi  # noqa: E402
from main import build_model  # noqa: E402

TARGETS = {"cnn": 1.10, "mlp": 1.25}


class StepTimer(keras.callbacks.Callback):
    """Wall-clock and CPU seconds between consecutive batch begins (the first batch of
    a fit is skipped)."""

    async_safe = True

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.times.append((time.perf_counter(), time.process_time()))

    def steps(self):
        """[(wall s, cpu s)] of each step but the first and the last."""
        return [tuple(d) for d in np.diff(np.array(self.times), axis=0)]


def mlp():
    x_in = keras.Input((784,))
    h = keras.layers.Dense(512, activation="relu")(x_in)
    h = keras.layers.Dense(256, activation="relu")(h)
    return keras.Model(x_in, keras.layers.Dense(10, activation="softmax")(h))


def cnn():
    model = build_model((32, 32, 3))
    return keras.Model(model.inputs, model.outputs)  # a plain model: the callback installs


def data(kind, n):
    rng = np.random.default_rng(0)
    shape = (n, 32, 32, 3) if kind == "cnn" else (n, 784)
    x = rng.random(shape, dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, n), 10)
    return x, y


def peak_rss_mib():
    """The process's peak resident set size so far (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


class PeakMemory(keras.callbacks.Callback):
    """Peak resident set size after chosen numbers of steps of one fit."""

    def __init__(self, at_steps):
        super().__init__()
        self.at_steps, self.peaks, self._step = set(at_steps), {}, 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step in self.at_steps:
            self.peaks[self._step] = peak_rss_mib()


def compare(kind, batch, steps, rounds, log_root):
    x, y = data(kind, batch * steps)
    models = {}
    for mode in ("plain", "insight"):
        keras.utils.set_random_seed(0)
        models[mode] = (cnn if kind == "cnn" else mlp)()
        models[mode].compile(optimizer="adam", loss="categorical_crossentropy")
    callback = oi.OptimizationInsightCallback(os.path.join(log_root, kind))
    times = {"plain": [], "insight": []}
    for r in range(rounds + 1):  # round 0 warms up (tracing, compilation)
        for mode in ("plain", "insight") if r % 2 else ("insight", "plain"):
            timer = StepTimer()
            extra = [callback] if mode == "insight" else []
            models[mode].fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False,
                             callbacks=extra + [timer])
            if r:
                times[mode] += timer.steps()
    plain, insight = np.median(times["plain"], axis=0), np.median(times["insight"], axis=0)
    return {"batch": batch, "plain_step_ms": 1e3 * plain[0], "insight_step_ms": 1e3 * insight[0],
            "ratio": insight[0] / plain[0], "plain_step_cpu_ms": 1e3 * plain[1],
            "insight_step_cpu_ms": 1e3 * insight[1], "cpu_ratio": insight[1] / plain[1],
            "target": TARGETS[kind], "steps_timed": len(times["plain"])}


def memory_growth(log_root):
    """Peak memory of one 1,000-step MLP fit with the callback, after 100 and 1,000 steps."""
    x, y = data("mlp", 128 * 100)
    model = mlp()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    callback = oi.OptimizationInsightCallback(os.path.join(log_root, "memory"))
    peak = PeakMemory((100, 1000))
    model.fit(x, y, batch_size=128, epochs=10, verbose=0, callbacks=[callback, peak])
    after_100, after_1000 = peak.peaks[100], peak.peaks[1000]
    return {"peak_rss_mib_after_100_steps": after_100,
            "peak_rss_mib_after_1000_steps": after_1000,
            "growth": after_1000 / after_100 - 1, "target": 0.05}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--xla", action="store_true",
                        help="time the XLA version of the statistics (OPTINSIGHT_NATIVE=0)")
    args = parser.parse_args()
    if args.xla:
        os.environ["OPTINSIGHT_NATIVE"] = "0"
    results = {}
    with tempfile.TemporaryDirectory() as log_root:
        for kind, batch in (("cnn", 256), ("mlp", 128)):
            results[kind] = compare(kind, batch, args.steps, args.rounds, log_root)
            r = results[kind]
            print(f"{kind}: wall: plain {r['plain_step_ms']:.2f} ms/step, insight "
                  f"{r['insight_step_ms']:.2f} ms/step, ratio {r['ratio']:.3f} "
                  f"(target <= {r['target']}); CPU: plain {r['plain_step_cpu_ms']:.2f} "
                  f"ms/step, insight {r['insight_step_cpu_ms']:.2f} ms/step, ratio "
                  f"{r['cpu_ratio']:.3f}", flush=True)
        results["memory"] = memory_growth(log_root)
        m = results["memory"]
        print(f"peak memory: {m['peak_rss_mib_after_100_steps']:.0f} MiB after 100 steps, "
              f"{m['peak_rss_mib_after_1000_steps']:.0f} MiB after 1000: growth "
              f"{100 * m['growth']:.1f} % (target < 5 %)")
    results["kernel"] = "xla" if args.xla else "native"
    write_results("overhead_xla" if args.xla else "overhead", results)


if __name__ == "__main__":
    main()
