"""Reads a run's logs back into pandas: `read_log(log_dir) -> Run`.

Whole-model metrics (steps.jsonl), epochs, probes and the summary are loaded at once;
per-variable data (the `layers/` and `histograms/` stores) is read on demand, one
variable or one key at a time, so memory follows what is asked for, not the run.
"""

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from optinsight.logs.jsonlog import iter_jsonl, jsonl_after, read_json, read_jsonl
from optinsight.logs.layout import Layout
from optinsight.logs.store import iter_batches, part_batches, part_paths, read_parts

_INDEX = ("step", "epoch", "batch")


class ArrayFrames:
    """Per-variable data held in memory: steps [s], values [s, n_vars, n_keys]."""

    def __init__(self, steps, variables, keys, values):
        self.steps, self.variables = np.asarray(steps), list(variables)
        self.keys, self.values = list(keys), values

    def layer(self, variable):
        v = self.variables.index(variable)
        frame = pd.DataFrame(self.values[:, v, :].astype(np.float64), columns=self.keys)
        frame.insert(0, "step", self.steps)
        return frame

    def key(self, key):
        if key not in self.keys:
            raise KeyError(f"no key {key!r} in this run's per-variable data")
        frame = pd.DataFrame(self.values[:, :, self.keys.index(key)].astype(np.float64),
                             columns=self.variables)
        frame.insert(0, "step", self.steps)
        return frame


class StoreFrames:
    """Per-variable data read from a run's `layers/` store on demand."""

    def __init__(self, directory, variables):
        self.directory, self.variables = directory, list(variables)

    def layer(self, variable):
        table = read_parts(self.directory, variables=[variable])
        if table is None:
            return pd.DataFrame(columns=list(_INDEX))
        return table.drop_columns(["variable"]).to_pandas().sort_values("step", kind="stable") \
            .reset_index(drop=True)

    def key(self, key):
        steps, values = [], []
        for path in part_paths(self.directory):
            part_steps, part = part_matrix(path, [key], self.variables)
            steps.append(part_steps)
            values.append(part[:, :, 0])
        frame = pd.DataFrame(np.concatenate(values) if values else
                             np.zeros((0, len(self.variables))), columns=self.variables)
        frame.insert(0, "step", np.concatenate(steps) if steps else np.zeros(0, np.int64))
        return frame


def part_matrix(path, keys, variables):
    """One part of a `layers/` store as arrays: steps [s] (the part's contiguous step
    range) and values [s, len(variables), len(keys)] float64 (NaN where null or
    absent); KeyError if it lacks a key."""
    index = {name: i for i, name in enumerate(variables)}
    batches = [b for b in part_batches(path, ["step", "variable", *keys]) if b.num_rows]
    if not batches:
        return np.zeros(0, np.int64), np.zeros((0, len(variables), len(keys)))
    missing = [k for k in keys if k not in batches[0].schema.names]
    if missing:
        raise KeyError(f"no key {missing[0]!r} in this run's per-variable data")
    first = min(pc.min(b["step"]).as_py() for b in batches)
    last = max(pc.max(b["step"]).as_py() for b in batches)
    values = np.full((last - first + 1, len(variables), len(keys)), np.nan)
    for batch in batches:
        variable = batch["variable"]
        to_column = np.array([index.get(n, -1) for n in variable.dictionary.to_pylist()])
        columns = to_column[variable.indices.to_numpy()]
        known = columns >= 0
        rows = batch["step"].to_numpy()[known] - first
        for i, key in enumerate(keys):
            values[rows, columns[known], i] = batch[key].to_numpy(
                zero_copy_only=False).astype(np.float64)[known]
    return np.arange(first, last + 1), values


def store_variables(directory):
    """The variable names of a store folder (its first batch's dictionary), or []."""
    for batch in iter_batches(directory, ["variable"]):
        return batch["variable"].dictionary.to_pylist()
    return []


@dataclasses.dataclass(repr=False)
class Run:
    """A run's logs.

    Attributes:
        steps: one row per batch: `step`, `epoch`, `batch` and the whole-model keys;
            nulls are NaN. Per-variable data: `variables`, `layer(name)`, `key(key)`.
        epochs: one row per epoch: `epoch` and the epoch_wise keys.
        summary: the insight.json document.
        probes: one row per probe evaluation: `step`, `epoch`, `probe` (its name),
            `kind` (what it measures, `probes.base`), its scalars and, where it wrote
            arrays, `arrays` (a path relative to the log dir).
        log_dir: where the run lives.
        instruments: one row per step the instruments were recorded at: `step`,
            `epoch`, `batch`, each instrument, and `distance/<variable>` (empty without
            instruments; a run in memory keeps at most 4,096 evenly spaced steps and
            no per-variable distance).
    """

    steps: pd.DataFrame
    epochs: pd.DataFrame
    summary: dict
    probes: pd.DataFrame
    log_dir: str
    variable_data: object = None  # ArrayFrames or StoreFrames
    instruments: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def __repr__(self):
        return (f"Run({self.log_dir!r}: {len(self.steps)} steps, {len(self.epochs)} epochs, "
                f"{len(self.variables)} variables)")

    @property
    def variables(self):
        """The recorded variables' names (Keras paths), in the model's order."""
        return list(self.variable_data.variables) if self.variable_data else []

    def layer(self, variable):
        """Every step's metrics of one variable: `step`, `epoch`, `batch` and the keys
        (read from layers/ on demand; nulls are NaN, also at steps where the variable
        was not trained: before it was added, see meta.variable_changes)."""
        if variable not in self.variables:
            raise KeyError(f"no variable {variable!r} in this run; it has {self.variables}")
        frame = self.variable_data.layer(variable)
        if "epoch" in frame and len(frame) < len(self.steps):  # added after step 1
            frame = self.steps[list(_INDEX)].merge(
                frame.drop(columns=["epoch", "batch"]), on="step", how="left")
        return frame

    def key(self, key):
        """One key for every variable: a `step` column and one column per variable
        (KeyError if the run has no such key)."""
        if self.variable_data is None:
            raise KeyError(f"no per-variable data in this run (asked for {key!r})")
        return self.variable_data.key(key)

    def histograms(self, variables=None):
        """Gradient/weight histograms, in step order: a list of {"step", "epoch",
        "gradients": {var: {"range": [lo, hi], "counts": [...]}}, "weights": {...}}
        (histograms/; only `variables` when given)."""
        table = read_parts(Layout(self.log_dir).histograms,
                           variables=None if variables is None else list(variables))
        if table is None:
            return []
        out = {}
        columns = {c: table[c].to_pylist() for c in ("step", "epoch", "kind", "variable",
                                                      "lo", "hi")}
        counts = table["counts"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        for i, step in enumerate(columns["step"]):
            record = out.setdefault(step, {"step": step, "epoch": columns["epoch"][i]})
            record.setdefault(columns["kind"][i], {})[columns["variable"][i]] = {
                "range": [columns["lo"][i], columns["hi"][i]], "counts": counts[i].tolist()}
        return [out[s] for s in sorted(out)]

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

    def gradient_parameter_histograms(self):
        """[(step, counts int64 [gradient bins, parameter bins], ((g_lo, g_hi), (w_lo,
        w_hi)))] of every step that recorded Cockpit's GradHist2d (instruments.jsonl,
        read now, one line at a time)."""
        out = []
        for record in iter_jsonl(Layout(self.log_dir).instruments_jsonl):
            histogram = record.get("grad_hist_2d") if isinstance(record, dict) else None
            if not isinstance(histogram, dict):
                continue
            counts = np.zeros(histogram["bins"], np.int64)
            for i, j, count in histogram["cells"]:
                counts[i, j] = count
            out.append((int(record["step"]), counts, tuple(map(tuple, histogram["range"]))))
        return out

    def zero_since(self):
        """{variable: int64 [units]} of units.npz (docs/logs.md): per output unit, the
        first step of its current run of all-zero gradients, 0 if its last gradient
        was not all zero; {} when the run has none."""
        path = Layout(self.log_dir).units_npz
        if not os.path.exists(path):
            return {}
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files if k != "_step"}

    def sign_maps(self):
        """[(label, {variable: int8 codes}, meta)] of signs/*.npz, in order."""
        directory = Layout(self.log_dir).signs
        out = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name.endswith(".npz") and not name.endswith(".tmp.npz"):
                with np.load(os.path.join(directory, name)) as arrays:
                    meta = json.loads(str(arrays["_meta"]))
                    codes = {k: arrays[k] for k in arrays.files if k != "_meta"}
                out.append((name[:-4], codes, meta))
        return out


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _numbers(mapping):
    return isinstance(mapping, dict) and all(_is_number(v) for v in mapping.values())


def _step_row(record, path, index):
    if not (isinstance(record, dict) and all(_is_int(record.get(k))
                                             for k in ("step", "epoch", "batch"))
            and _numbers(record.get("model"))):
        raise ValueError(f"{path}: record {index + 1} is not a step record (expected "
                         '{"step", "epoch", "batch", "model": {...}})')
    row = {"step": record["step"], "epoch": record["epoch"], "batch": record["batch"]}
    row.update(record["model"])
    return row


#: The fields of a probes frame row that are not the probe's quantities.
PROBE_ROW_FIELDS = ("step", "epoch", "probe", "kind", "arrays", "error")


def probe_row(record, path="probes.jsonl", index=0):
    """The probes frame's row of one probes.jsonl record (ValueError naming `path` and
    the record's line `index` + 1 if it is not one)."""
    if not (isinstance(record, dict) and _is_int(record.get("step"))
            and _is_int(record.get("epoch")) and isinstance(record.get("probe"), str)
            and _numbers(record.get("values", {}))
            and isinstance(record.get("kind", ""), str)
            and isinstance(record.get("arrays", ""), str)):
        raise ValueError(f"{path}: record {index + 1} is not a probe record")
    row = {"step": record["step"], "epoch": record["epoch"], "probe": record["probe"],
           "kind": record.get("kind") or record["probe"]}  # older logs: kind = name
    row.update(record.get("values", {}))
    for key in ("arrays", "error"):  # error: the probe failed, and why (one line)
        if key in record:
            row[key] = record[key]
    return row


def instrument_row(record, path="instruments.jsonl", index=0, distances=True):
    """The instruments frame's row of one instruments.jsonl record: step, epoch, batch,
    each instrument (null as NaN) and, with `distances`, `distance/<variable>`.
    ValueError naming `path` and the line if it is not one."""
    is_dict = isinstance(record, dict)
    values = record.get("instruments") if is_dict else None
    distance = record.get("distance", {}) if is_dict else None
    if not (is_dict and all(_is_int(record.get(k)) for k in _INDEX)
            and _numbers(values) and _numbers(distance)):
        raise ValueError(f"{path}: record {index + 1} is not an instruments record")
    row = {k: record[k] for k in _INDEX}
    row.update({k: np.nan if v is None else v for k, v in values.items()})
    if distances:
        row.update({f"distance/{k}": v for k, v in distance.items()})
    return row


def instruments_frame(path):
    """The steps in the instruments.jsonl file `path` (see `Run.instruments`)."""
    return pd.DataFrame([instrument_row(r, path, i) for i, r in enumerate(read_jsonl(path))])


def _model_frame(directory):
    """The whole-model rows of the `model/` store (what steps.jsonl holds, columnar)."""
    table = read_parts(directory)
    if table is None:
        return pd.DataFrame()
    return table.to_pandas().sort_values("step", kind="stable").reset_index(drop=True)


def _steps_frame(path):
    """steps.jsonl as a frame, one column list per key (no per-row dicts kept)."""
    columns, n = {}, 0
    for i, record in enumerate(iter_jsonl(path)):
        row = _step_row(record, path, i)
        for key, value in row.items():
            column = columns.get(key)
            if column is None:
                column = columns[key] = [None] * n
            column.append(value)
        n += 1
        if len(row) != len(columns):  # keys this row lacks
            for column in columns.values():
                if len(column) < n:
                    column.append(None)
    return pd.DataFrame({k: np.array(v, dtype=float) for k, v in columns.items()})


def probes_frame(path):
    """The probe evaluations in the probes.jsonl file `path` (see `Run.probes`)."""
    return pd.DataFrame([probe_row(r, path, i) for i, r in enumerate(read_jsonl(path))])


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
    if os.path.isfile(log_dir):
        raise FileNotFoundError(f"{log_dir!r} is a file: give the run's log directory "
                                "(the one that holds insight.json)")
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"log dir {log_dir!r} does not exist")
    layout = Layout(log_dir)
    summary_path, steps_path = layout.insight_json, layout.steps_jsonl
    if not os.path.exists(summary_path) and not os.path.exists(steps_path):
        raise FileNotFoundError(
            f"{log_dir!r} holds no optinsight run (no insight.json or steps.jsonl)")
    summary = read_json(summary_path) if os.path.exists(summary_path) else {}
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path} is not an optinsight summary (a JSON object)")
    model = layout.model
    if part_paths(model):
        steps = _model_frame(model)
        # model/ is flushed every 32 steps; steps.jsonl has every whole line.
        last = int(steps["step"].max()) if not steps.empty else 0
        tail = [_step_row(r, steps_path, i) for i, r in enumerate(jsonl_after(steps_path, last))]
        if tail:
            steps = pd.concat([steps, pd.DataFrame(tail)], ignore_index=True)
    else:
        steps = _steps_frame(steps_path)
    if not steps.empty:
        steps = steps.astype(float).astype({k: int for k in _INDEX})
    layers = layout.layers
    variables = summary.get("meta", {}).get("variables") if isinstance(
        summary.get("meta"), dict) else None
    if not (isinstance(variables, list) and all(isinstance(v, str) for v in variables)):
        variables = store_variables(layers)
    variable_data = StoreFrames(layers, variables) if part_paths(layers) \
        else _schema1_layers(steps_path) or StoreFrames(layers, variables)
    return Run(steps=steps, epochs=epoch_frame(summary, summary_path), summary=summary,
               probes=probes_frame(layout.probes_jsonl), log_dir=log_dir,
               variable_data=variable_data,
               instruments=instruments_frame(layout.instruments_jsonl))


def _schema1_layers(path):
    """ArrayFrames of the per-variable values that logs of schema 1 (before the
    layers/ store) kept in each steps.jsonl line under "layers", or None when its lines
    have none. Held in memory: steps × variables × keys floats."""
    records = iter_jsonl(path)
    first = next(records, None)
    if not isinstance(first, dict) or not isinstance(first.get("layers"), dict) \
            or not first["layers"]:
        return None
    variables = list(first["layers"])
    keys = list(first["layers"][variables[0]])
    steps, values = [], []
    for record in [first, *records]:
        layers = record.get("layers", {})
        steps.append(record["step"])
        values.append([[np.nan if layers.get(v, {}).get(k) is None else layers[v][k]
                        for k in keys] for v in variables])
    return ArrayFrames(steps, variables, keys, np.array(values, dtype=np.float64))
