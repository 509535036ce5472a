"""What the benchmark scripts share: writing their figures with the machine's facts."""

import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name, results):
    """Write results (plus cpus and library versions) to benchmarks/results/<name>.json."""
    import keras
    import tensorflow as tf

    results = {**results, "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                                      "keras": keras.__version__}}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
