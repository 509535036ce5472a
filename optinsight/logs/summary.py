"""What a run keeps in memory between epochs: every finished epoch's whole-model rows
and per-variable means and the epoch-wise losses. It renders the
insight.json document (docs/logs.md) and the in-memory `Run` the epoch-end diagnosis
reads, and reloads itself from a previous insight.json at resume."""

import numpy as np
import pandas as pd

from optinsight.logs.jsonlog import JsonFragment, JsonList, plain
from optinsight.logs.reader import PROBE_ROW_FIELDS, ArrayFrames, Run, epoch_frame

SCHEMA_VERSION = 2
EPOCH_KEYS = ("train_mean_loss", "val_mean_loss", "train_mean_acc", "val_mean_acc")
_ACCURACY_NAMES = ("accuracy", "acc", "categorical_accuracy", "sparse_categorical_accuracy",
                   "binary_accuracy")


def _accuracy(logs, prefix=""):
    for name in _ACCURACY_NAMES:
        if prefix + name in logs:
            return logs[prefix + name]
    return None


def probe_summary(rows):
    """insight.json's "probes", {probe: {"step": [...], quantity: [...]}}, of the probes
    frame's rows (`reader.probe_row`); failed evaluations are left out."""
    summary = {}
    for row in rows:
        if "error" in row:
            continue
        history = summary.setdefault(row["probe"], {"step": []})
        history["step"].append(row["step"])
        for key, value in row.items():
            if key not in PROBE_ROW_FIELDS:
                history.setdefault(key, []).append(value)
    return summary


class RunHistory:
    """The finished epochs of a run.

    Args:
        names: variable names.
        keys: per-variable metric keys; model_keys: whole-model keys (keys + train_loss).
    """

    def __init__(self, names, keys, model_keys):
        self.names, self.keys, self.model_keys = tuple(names), list(keys), list(model_keys)
        # Per finished epoch: its number, its steps' numbers, whole-model rows [s, keys]
        # and per-variable means [n_vars, keys].
        self.epochs, self.steps, self.model, self.layer_means = [], [], [], []
        self.epoch_wise = {k: [] for k in EPOCH_KEYS}
        # insight.json's growing lists, each finished epoch's values encoded once:
        # batch_wise per model key, epoch_wise means per (variable, key).
        self._json_lists = {}
        self._json_epochs = 0

    def add_epoch(self, epoch, steps, model, layer_means, logs):
        """A finished epoch: steps [s], model rows [s, model keys], means [n_vars, keys],
        and Keras-style `logs` ({"loss", "val_loss", "accuracy", ...})."""
        self.epochs.append(epoch)
        self.steps.append(steps)
        self.model.append(model)
        self.layer_means.append(layer_means)
        values = {"train_mean_loss": logs.get("loss"), "val_mean_loss": logs.get("val_loss"),
                  "train_mean_acc": _accuracy(logs), "val_mean_acc": _accuracy(logs, "val_")}
        for key, value in values.items():
            self.epoch_wise[key].append(None if value is None else float(value))

    def add_variables(self, names):
        """Variables recorded from now on (null in the epochs before)."""
        self.names += tuple(names)

    def document(self, meta, probes):
        """The insight.json document; `meta` gets "epochs" and "null_values" added.
        probes: the probes frame's rows (`reader.probe_row`) of the evaluations so far."""
        counter = [0]
        lists = self._json_lists
        for e in range(self._json_epochs, len(self.model)):
            model, means = self.model[e], self.layer_means[e]
            for i, key in enumerate(self.model_keys):
                lists.setdefault(key, JsonList()).append(model[:, i].tolist())
            for v, name in enumerate(self.names):
                for i, key in enumerate(self.keys):
                    if (name, key) not in lists:  # a variable added in epoch e
                        lists[(name, key)] = JsonList()
                        for _ in range(e):
                            lists[(name, key)].append(None)
                    lists[(name, key)].append(means[v, i] if v < len(means) else None)
        self._json_epochs = len(self.model)
        empty = JsonFragment([])
        batch_wise = {k: lists[k].fragment() if k in lists else empty
                      for k in self.model_keys}
        layers = {name: {"epoch_wise": {
            k: lists[(name, k)].fragment() if (name, k) in lists else empty
            for k in self.keys}} for name in self.names}
        document = plain({
            "schema_version": SCHEMA_VERSION,
            "meta": {**meta, "epochs": len(self.model)},
            "batch_wise": batch_wise,
            "epoch_wise": dict(self.epoch_wise),
            "layers": layers,
            "probes": probe_summary(probes),
        }, counter)
        document["meta"]["null_values"] = counter[0]
        return document

    def run(self, document, log_dir, thinned, probes, instruments):
        """The run as `read_log` loads it, from memory rather than from logs that grow
        with every step: every step's whole-model metrics, and per variable the keys of
        `thinned` (a `ThinnedHistory`) at its steps. document: `document()`; probes:
        the probes frame; instruments: the instruments frame."""
        columns = {
            "step": np.concatenate(self.steps),
            "epoch": np.concatenate([np.full(len(steps), epoch) for epoch, steps
                                     in zip(self.epochs, self.steps)]),
            "batch": np.concatenate([np.arange(len(a)) for a in self.steps]),
        }
        columns.update(zip(self.model_keys, np.concatenate(self.model).T))
        return Run(steps=pd.DataFrame(columns), epochs=epoch_frame(document, "insight.json"),
                   summary=document, probes=probes, instruments=instruments,
                   log_dir=log_dir, variable_data=ArrayFrames(
                       thinned.steps, self.names, thinned.keys, thinned.values))

    def load(self, document, epochs, last_step):
        """Reload the first `epochs` epochs of a previous insight.json `document`, the
        last of which ended at step `last_step`."""
        def array(values):
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        self.epochs = list(range(epochs))
        step = last_step  # restored epochs hold steps ..., last_step, contiguous
        for e in reversed(range(epochs)):
            rows = len(document["batch_wise"][self.model_keys[0]][e])
            self.steps.insert(0, np.arange(step - rows + 1, step + 1))
            step -= rows
        for e in range(epochs):
            self.model.append(np.stack(
                [array(document["batch_wise"][k][e]) for k in self.model_keys], axis=1))
            self.layer_means.append(np.array([  # NaN for variables added at resume
                array([document["layers"][n]["epoch_wise"][k][e] if n in document["layers"]
                       else None for k in self.keys])
                for n in self.names]))
        self.epoch_wise = {k: document["epoch_wise"][k][:epochs] for k in EPOCH_KEYS}
