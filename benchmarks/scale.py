"""The callback at ResNet50 scale and over long runs (issue: bounded logs, lazy reader).

Parts (all by default; pick with --parts):
  bytes      keras.applications.ResNet50 (weights=None, 32x32, 10 classes), Adam, batch
             32, the callback at its defaults, 2 epochs x 40 steps: bytes per step of
             each file under log_dir (checkpoint/ left out). Target <= 48 KB per step.
  epoch_end  a 214-variable MLP (107 Dense(8) layers), 50 epochs x 200 steps: the
             callback's epoch-end time at epoch 2 and at epoch 50. Target within 1.5x.
  reader     a 100,000-step run of 214 variables written by the package's own step
             writer (synthetic statistics), then, in a fresh process, read_log +
             Run.layer(one variable) + Run.key(one key): seconds and peak memory.
             Target < 10 s and < 1 GB.
  overhead   ResNet50 at batch 32, plain fit and fit with the callback alternating in
             one process, --steps steps per epoch: median step time ratio (target
             <= 1.08) and whole-epoch time ratio, epoch-end work included (<= 1.12).
             With --instruments PRESET (--instrument-freq N, default 50) the callback
             records Cockpit's instruments too: the mean step ratio, due steps
             included (target <= 1.10 for economy).

Prints the figures and writes benchmarks/results/scale.json.

    python benchmarks/scale.py [--parts bytes,epoch_end,reader,overhead] [--steps 200]
"""

import argparse
import json
import os
import subprocess
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scale.json")


def resnet50():
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 32, 32, 3), dtype=np.float32),
            keras.utils.to_categorical(rng.integers(0, 10, n), 10))


def du(path):
    """Bytes of the files under `path`."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def bytes_per_step(root, steps=40, epochs=2):
    log_dir = os.path.join(root, "bytes")
    x, y = images(32 * steps)
    resnet50().fit(x, y, batch_size=32, epochs=epochs, verbose=0,
                   callbacks=[oi.OptimizationInsightCallback(log_dir, diagnosis=False)])
    total = steps * epochs
    files = {name: du(os.path.join(log_dir, name)) / total
             for name in sorted(os.listdir(log_dir)) if name != "checkpoint"}
    return {"steps": total, "bytes_per_step": files,
            "total_kb_per_step": sum(files.values()) / 1024, "target_kb": 48}


class EpochEndTimer(keras.callbacks.Callback):
    """Wall time of the callbacks before it in on_epoch_end (placed after them)."""

    def __init__(self):
        super().__init__()
        self.times, self._start = [], None

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._last_batch)


def epoch_end_times(root, epochs=50, steps=200):
    x_in = keras.Input((8,))
    h = x_in
    for _ in range(106):
        h = keras.layers.Dense(8, activation="tanh")(h)
    model = keras.Model(x_in, keras.layers.Dense(8)(h))  # 107 Dense layers: 214 variables
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, 8)).astype("float32")
    timer = EpochEndTimer()
    model.fit(x, x, batch_size=8, epochs=epochs, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(os.path.join(root, "epochs"), checkpoint_freq=0),
        timer])
    at_2, at_50 = timer.times[1], timer.times[epochs - 1]
    return {"variables": len(model.trainable_variables), "steps_per_epoch": steps,
            "epoch_end_s_at_2": at_2, "epoch_end_s_at_50": at_50,
            "ratio": at_50 / at_2, "target": 1.5}


def write_long_run(log_dir, steps=100_000, n_vars=214, burst=32):
    """A run of `steps` steps of `n_vars` variables through StepLog (synthetic stats)."""
    from optinsight.logs.guard import WriteGuard
    from optinsight.logs.jsonlog import JsonlWriter, write_json_atomic
    from optinsight.logs.layout import Layout
    from optinsight.logs.step_log import StepLog
    from optinsight.metrics import BAND_STATS, EXTRA_STATS, GLOBAL_STATS, Row
    from optinsight.schedule import Every

    names = [f"block{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}" for i in range(n_vars)]
    thresholds, decay = (1e-7, 1e-5), 0.9
    n_stats = len(GLOBAL_STATS) + 2 * len(thresholds) * len(BAND_STATS) + len(EXTRA_STATS)
    os.makedirs(log_dir)
    log = StepLog(Layout(log_dir), names, thresholds, decay, None, Every(1), Every(0), (),
                  WriteGuard(log_dir),
                  JsonlWriter(os.path.join(log_dir, "steps.jsonl")))
    rng = np.random.default_rng(0)
    for start in range(0, steps, burst):
        # norms and |dw| sums random floats, counts small integers, as in a real run
        stats = rng.poisson(3.0, (burst, n_vars, n_stats)).astype(np.float64)
        stats[:, :, :4] = rng.random((burst, n_vars, 4))
        rows = [Row(start + i + 1, float(rng.random()), 0.0, start + i > 0, stats[i])
                for i in range(burst)]
        log.write(rows, (start // 2000), (start // 2000) * 2000)
        if (start + burst) % 2000 == 0:
            log.end_epoch(start + burst)
    log.close()
    log.jsonl.close()
    write_json_atomic(os.path.join(log_dir, "insight.json"), {
        "schema_version": 2, "meta": {"variables": names, "thresholds": list(thresholds),
                                      "ema_decay": decay}, "epoch_wise": {}})
    return names


READ = """
import json, sys, time
t = time.perf_counter()
import optinsight as oi
run = oi.read_log(sys.argv[1])
steps = len(run.steps)
layer = run.layer(run.variables[7])
key = run.key("grad_norm")
seconds = time.perf_counter() - t
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"steps": steps, "layer_rows": len(layer), "key_shape": list(key.shape),
                  "seconds": seconds, "peak_rss_mib": peak / 1024}))
"""


def reader(root, steps):
    log_dir = os.path.join(root, "long")
    t = time.perf_counter()
    write_long_run(log_dir, steps)
    written = time.perf_counter() - t
    baseline = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, optinsight; print(json.dumps(int(next(l for l in "
         "open('/proc/self/status') if l.startswith('VmHWM')).split()[1])))"],
        capture_output=True, text=True, check=True).stdout) / 1024
    done = subprocess.run([sys.executable, "-c", READ, log_dir], capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout)
    result.update({"write_s": written, "layers_mib": du(os.path.join(log_dir, "layers")) / 2**20,
                   "import_rss_mib": baseline, "target_s": 10, "target_mib": 1024})
    return result


class StepTimer(keras.callbacks.Callback):
    """Batch-end times and epoch wall times (placed last: epoch-end work included)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.batch_ends, self.epoch_start = [], time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds = time.perf_counter() - self.epoch_start


def overhead(root, steps, rounds, **instruments):
    x, y = images(32 * steps)
    models = {}
    for mode in ("plain", "insight"):
        keras.utils.set_random_seed(0)
        models[mode] = resnet50()
    callback = oi.OptimizationInsightCallback(os.path.join(root, "overhead"), diagnosis=False,
                                              **instruments)
    step_times = {"plain": [], "insight": []}
    epoch_times = {"plain": [], "insight": []}
    for mode in ("plain", "insight"):  # warm-up: tracing and compilation
        models[mode].fit(x[:96], y[:96], batch_size=32, epochs=1, verbose=0,
                         callbacks=[callback] if mode == "insight" else [])
    for r in range(rounds):
        for mode in ("plain", "insight") if r % 2 == 0 else ("insight", "plain"):
            timer = StepTimer()
            extra = [callback] if mode == "insight" else []
            models[mode].fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False,
                             callbacks=extra + [timer])
            step_times[mode] += list(np.diff(timer.batch_ends))
            epoch_times[mode].append(timer.epoch_seconds)
            print(f"  round {r} {mode}: epoch {timer.epoch_seconds:.1f} s", flush=True)
    plain, insight = np.median(step_times["plain"]), np.median(step_times["insight"])
    return {"steps_per_epoch": steps, "rounds": rounds, "plain_step_s": plain,
            "insight_step_s": insight, "step_ratio": insight / plain, "step_target": 1.08,
            "mean_step_ratio": float(np.mean(step_times["insight"])
                                     / np.mean(step_times["plain"])),
            "plain_epoch_s": float(np.sum(epoch_times["plain"])),
            "insight_epoch_s": float(np.sum(epoch_times["insight"])),
            "epoch_ratio": float(np.sum(epoch_times["insight"]) / np.sum(epoch_times["plain"])),
            "epoch_target": 1.12}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bytes,epoch_end,reader,overhead")
    parser.add_argument("--steps", type=int, default=200, help="steps per overhead epoch")
    parser.add_argument("--rounds", type=int, default=1, help="overhead epochs per mode")
    parser.add_argument("--reader-steps", type=int, default=100_000)
    parser.add_argument("--instruments", default=None,
                        help="overhead with Cockpit's instruments (a preset), written as "
                             "overhead_<preset>_every_<N>; target: mean step ratio <= 1.10")
    parser.add_argument("--instrument-freq", type=int, default=50)
    args = parser.parse_args()
    results = {}
    if os.path.exists(RESULTS):  # parts not run keep their last figures
        with open(RESULTS) as f:
            results = {k: v for k, v in json.load(f).items() if k != "machine"}
    with tempfile.TemporaryDirectory() as root:
        for part in args.parts.split(","):
            print(f"{part} ...", flush=True)
            if part == "bytes":
                results[part] = bytes_per_step(root)
            elif part == "epoch_end":
                results[part] = epoch_end_times(root)
            elif part == "reader":
                results[part] = reader(root, args.reader_steps)
            elif part == "overhead" and args.instruments:
                part = f"overhead_{args.instruments}_every_{args.instrument_freq}"
                results[part] = overhead(root, args.steps, args.rounds,
                                         instruments=args.instruments,
                                         instrument_freq=args.instrument_freq)
            elif part == "overhead":
                results[part] = overhead(root, args.steps, args.rounds)
            else:
                parser.error(f"unknown part {part!r}")
            print(json.dumps(results[part], indent=1), flush=True)
    write_results("scale", results)


if __name__ == "__main__":
    main()
