"""Reads a run's logs back into pandas: `read_log(log_dir) -> Run`."""

import dataclasses
import json
import os

import numpy as np
import pandas as pd

from optinsight.logs.jsonlog import read_json, read_jsonl


@dataclasses.dataclass
class Run:
    """A run's logs.

    Attributes:
        steps: one row per batch: `step`, `epoch`, `batch`, the whole-model keys,
            and per-variable columns named `<variable>/<key>`; nulls are NaN.
        epochs: one row per epoch: `epoch` and the epoch_wise keys.
        summary: the insight.json document.
        probes: one row per probe evaluation: `step`, `epoch`, `probe`, its scalars
            and, where it wrote arrays, `arrays` (a path relative to the log dir).
        log_dir: where the run lives.
    """

    steps: pd.DataFrame
    epochs: pd.DataFrame
    summary: dict
    probes: pd.DataFrame
    log_dir: str

    def histograms(self):
        """Gradient/weight histograms: a list of {"step", "epoch", "gradients": {var:
        {"range", "counts"}}, "weights": {...}} (histograms.jsonl)."""
        return read_jsonl(os.path.join(self.log_dir, "histograms.jsonl"))

    def probe_arrays(self, probe):
        """[(step, {name: array})] of every evaluation of `probe` that wrote arrays."""
        rows = self.probes[self.probes["probe"] == probe] if not self.probes.empty else []
        out = []
        if len(rows) and "arrays" in rows:
            for step, path in zip(rows["step"], rows["arrays"]):
                if isinstance(path, str):
                    with np.load(os.path.join(self.log_dir, path)) as arrays:
                        out.append((int(step), dict(arrays)))
        return out

    def sign_maps(self):
        """[(label, {variable: int8 codes}, meta)] of signs/*.npz, in order."""
        directory = os.path.join(self.log_dir, "signs")
        out = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name.endswith(".npz") and not name.endswith(".tmp.npz"):
                with np.load(os.path.join(directory, name)) as arrays:
                    meta = json.loads(str(arrays["_meta"]))
                    codes = {k: arrays[k] for k in arrays.files if k != "_meta"}
                out.append((name[:-4], codes, meta))
        return out

    def layer(self, variable):
        """The per-step metrics of one variable, columns without the prefix."""
        prefix = f"{variable}/"
        columns = [c for c in self.steps.columns if c.startswith(prefix)]
        if not columns:
            raise KeyError(f"no variable {variable!r} in this run; it has "
                           f"{self.summary.get('meta', {}).get('variables')}")
        frame = self.steps[["step", "epoch", "batch"] + columns]
        return frame.rename(columns={c: c[len(prefix):] for c in columns})


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _numbers(mapping):
    return isinstance(mapping, dict) and all(_is_number(v) for v in mapping.values())


def _step_row(record, path, index):
    if not (isinstance(record, dict) and all(_is_int(record.get(k))
                                             for k in ("step", "epoch", "batch"))
            and _numbers(record.get("model"))
            and isinstance(record.get("layers"), dict)
            and all(_numbers(m) for m in record["layers"].values())):
        raise ValueError(f"{path}: record {index + 1} is not a step record (expected "
                         '{"step", "epoch", "batch", "model": {...}, "layers": {...}})')
    row = {"step": record["step"], "epoch": record["epoch"], "batch": record["batch"]}
    row.update(record["model"])
    for variable, metrics in record["layers"].items():
        row.update({f"{variable}/{k}": v for k, v in metrics.items()})
    return row


def _probe_row(record, path, index):
    if not (isinstance(record, dict) and _is_int(record.get("step"))
            and _is_int(record.get("epoch")) and isinstance(record.get("probe"), str)
            and _numbers(record.get("values", {}))
            and isinstance(record.get("arrays", ""), str)):
        raise ValueError(f"{path}: record {index + 1} is not a probe record")
    row = {"step": record["step"], "epoch": record["epoch"], "probe": record["probe"]}
    row.update(record.get("values", {}))
    if "arrays" in record:
        row["arrays"] = record["arrays"]
    return row


def probes_frame(path):
    """The probe evaluations in the probes.jsonl file `path` (see `Run.probes`)."""
    return pd.DataFrame([_probe_row(r, path, i) for i, r in enumerate(read_jsonl(path))])


def epoch_frame(summary, path):
    """The epoch_wise lists of an insight.json document as a frame (one row per epoch);
    ValueError naming `path` if they are malformed."""
    epoch_wise = summary.get("epoch_wise", {})
    columns = epoch_wise.values() if isinstance(epoch_wise, dict) else None
    if columns is None or not all(isinstance(c, list) and all(_is_number(v) for v in c)
                                  for c in columns) \
            or len({len(c) for c in columns}) > 1:
        raise ValueError(f"{path}: epoch_wise must map keys to equally long lists of numbers")
    epochs = pd.DataFrame({k: pd.Series(v, dtype=float) for k, v in epoch_wise.items()})
    epochs.insert(0, "epoch", range(len(epochs)))
    return epochs


def read_log(log_dir):
    """Load the run in `log_dir`.

    Raises FileNotFoundError when `log_dir` is missing or holds no run, and
    ValueError (naming the file) when its files are corrupted. A torn last line of a
    JSON Lines file (a crash mid-write) is ignored.
    """
    log_dir = os.fspath(log_dir)
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"log dir {log_dir!r} does not exist")
    summary_path = os.path.join(log_dir, "insight.json")
    steps_path = os.path.join(log_dir, "steps.jsonl")
    probes_path = os.path.join(log_dir, "probes.jsonl")
    if not os.path.exists(summary_path) and not os.path.exists(steps_path):
        raise FileNotFoundError(
            f"{log_dir!r} holds no optinsight run (no insight.json or steps.jsonl)")
    summary = read_json(summary_path) if os.path.exists(summary_path) else {}
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path} is not an optinsight summary (a JSON object)")
    steps = pd.DataFrame([_step_row(r, steps_path, i)
                          for i, r in enumerate(read_jsonl(steps_path))])
    if not steps.empty:
        steps = steps.astype(float).astype({k: int for k in ("step", "epoch", "batch")})
    return Run(steps=steps, epochs=epoch_frame(summary, summary_path), summary=summary,
               probes=probes_frame(probes_path), log_dir=log_dir)
