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
