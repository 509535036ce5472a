"""Where a burst of steps' metrics goes: `steps.jsonl` and `model/` (whole model), the
per-variable store `layers/` (every variable, every step), TensorBoard scalars, and the
in-memory summaries the callback needs at epoch end (whole-model rows, per-variable
epoch means, a bounded thinned history for the diagnosis). Runs on the writer thread.
"""

import numpy as np
import pyarrow as pa

from optinsight.logs.store import PartWriter, dictionary
from optinsight.metrics import (
    count_keys,
    metric_names,
    metric_table,
    model_metric_names,
    table_row_dict,
)

#: Steps of per-variable rows buffered before they reach layers/ as one record batch.
STORE_FLUSH_STEPS = 32


def layer_table(steps, epochs, batches, table, names, keys, counts):
    """The per-variable rows of a burst as a pyarrow Table (docs/logs.md, `layers/`).

    Args:
        steps, epochs, batches: int arrays [s].
        table: float64 [s, n_vars, n_keys] (`metric_table` rows without the model row).
    Columns: step (int64), epoch, batch (int32), variable (dictionary), then one per
    key: counts int64, the rest float32; NaN stored as null.
    """
    s, n_vars, _ = table.shape
    columns = {"step": pa.array(np.repeat(steps, n_vars), pa.int64()),
               "epoch": pa.array(np.repeat(epochs, n_vars), pa.int32()),
               "batch": pa.array(np.repeat(batches, n_vars), pa.int32()),
               "variable": dictionary(np.tile(np.arange(n_vars), s), names)}
    for i, key in enumerate(keys):
        columns[key] = _column(table[:, :, i].reshape(-1), key in counts, np.float32)
    return pa.table(columns)


def _column(values, is_count, float_dtype):
    """A nullable column of float64 `values` (NaN -> null): int64 for counts, else
    `float_dtype`."""
    missing = np.isnan(values)
    mask = missing if missing.any() else None
    if is_count:
        return pa.array(np.where(missing, 0, values).astype(np.int64), mask=mask)
    return pa.array(values.astype(float_dtype), mask=mask)


def model_table(steps, epochs, batches, model, keys, counts):
    """The whole-model rows of a burst as a pyarrow Table (docs/logs.md, `model/`):
    step (int64), epoch, batch (int32), one column per key of `model` [s, len(keys)]:
    counts int64, the rest float64; NaN stored as null."""
    columns = {"step": pa.array(steps, pa.int64()), "epoch": pa.array(epochs, pa.int32()),
               "batch": pa.array(batches, pa.int32())}
    for i, key in enumerate(keys):
        columns[key] = _column(model[:, i], key in counts, np.float64)
    return pa.table(columns)


class ThinnedHistory:
    """At most `capacity` evenly spaced steps of some per-variable keys, in memory.

    Every step is kept until `capacity` are held; then every other one is dropped and
    only every 2nd (4th, ...) later step is kept, so memory is bounded whatever the
    run's length. values: float32 [kept steps, n_vars, len(keys)].
    """

    def __init__(self, keys, n_vars, capacity=4096):
        self.keys, self.capacity = tuple(keys), capacity
        self.steps = np.zeros(0, np.int64)
        self.values = np.zeros((0, n_vars, len(self.keys)), np.float32)
        self._stride, self._seen = 1, 0

    def add_variables(self, count):
        """`count` more variables, NaN at the steps held so far."""
        self.values = np.concatenate(
            [self.values, np.full(self.values.shape[:1] + (count,) + self.values.shape[2:],
                                  np.nan, np.float32)], axis=1)

    def append(self, steps, values):
        """Offer steps [s] with values [s, n_vars, len(keys)]."""
        index = self._seen + np.arange(len(steps))
        self._seen += len(steps)
        keep = index % self._stride == 0
        self.steps = np.concatenate([self.steps, np.asarray(steps)[keep]])
        self.values = np.concatenate([self.values, np.asarray(values, np.float32)[keep]])
        while len(self.steps) > self.capacity:
            self.steps, self.values = self.steps[::2], self.values[::2]
            self._stride *= 2


class StepLog:
    """Writes bursts of steps (`write`) and hands over each epoch (`end_epoch`).

    Args:
        layout: the log dir's `Layout`.
        names: variable names, in the tracker's order.
        tensorboard: a TensorBoardWriter, or None.
        update_freq: when whole-model TensorBoard scalars are due (`schedule.Every`).
        variable_update_freq: when per-variable TensorBoard scalars are due (`Every`;
            at the epoch end they are the epoch's means).
        history_keys: per-variable keys kept (thinned) for the epoch-end diagnosis.
        guard: a `logs.guard.WriteGuard`; a file whose write fails is skipped after.
        jsonl: the JsonlWriter of steps.jsonl.
    """

    def __init__(self, layout, names, thresholds, ema_decay, tensorboard, update_freq,
                 variable_update_freq, history_keys, guard, jsonl):
        self.names = tuple(names)
        self.keys = metric_names(thresholds, ema_decay)
        self.model_keys = model_metric_names(thresholds, ema_decay)
        self.counts = count_keys(thresholds, ema_decay)
        self.thresholds, self.ema_decay = thresholds, ema_decay
        self.tensorboard, self.update_freq = tensorboard, update_freq
        self.variable_update_freq = variable_update_freq
        self.guard, self.jsonl = guard, jsonl
        self.store = PartWriter(layout.layers, STORE_FLUSH_STEPS * len(self.names))
        self.model_store = PartWriter(layout.model, STORE_FLUSH_STEPS)
        self._history_columns = [self.keys.index(k) for k in history_keys if k in self.keys]
        self.history = ThinnedHistory([self.keys[i] for i in self._history_columns],
                                      len(self.names))
        self._new_epoch()

    def add_variables(self, names):
        """Variables trained from now on that were not before (their rows were null):
        every later row has them. The stores start new parts, whose dictionaries name
        them."""
        self.close()
        self.names += tuple(names)
        pad = np.zeros((len(names), len(self.keys)))
        self._sum, self._count = np.vstack([self._sum, pad]), np.vstack([self._count, pad])
        self.history.add_variables(len(names))

    def _new_epoch(self):
        self._steps, self._model = [], []
        n = (len(self.names), len(self.keys))
        self._sum, self._count = np.zeros(n), np.zeros(n)

    def write(self, rows, epoch, epoch_start):
        """Metrics of a burst of `metrics.Row`s of `epoch` to the logs."""
        steps = np.array([row.step for row in rows], np.int64)
        tables = metric_table(np.stack([row.stats for row in rows]),
                              [row.has_prev for row in rows], self.thresholds, self.ema_decay)
        model = np.column_stack([tables[:, -1, :], [row.loss for row in rows],
                                 [row.skipped for row in rows]])
        layers = tables[:, :-1, :]
        batches = steps - epoch_start - 1
        self._steps.append(steps)
        self._model.append(model)
        self._sum += np.nansum(layers, axis=0)
        self._count += np.sum(~np.isnan(layers), axis=0)
        self.history.append(steps, layers[:, :, self._history_columns])
        lines = []
        for step, batch, row in zip(steps.tolist(), batches.tolist(), model):
            lines.append({"step": step, "epoch": epoch, "batch": batch,
                          "model": table_row_dict(row, self.model_keys, self.counts)})
        self.guard.run("steps.jsonl", self.jsonl.write_many, lines)
        self.guard.run("model/", self.model_store.write, model_table(
            steps, np.full(len(steps), epoch), batches, model, self.model_keys,
            self.counts), epoch)
        self.guard.run("layers/", self.store.write, layer_table(
            steps, np.full(len(steps), epoch), batches, layers, self.names, self.keys,
            self.counts), epoch)
        if self.tensorboard is not None:
            self._write_scalars(steps, lines, layers)

    def _write_scalars(self, steps, lines, layers):
        records = []
        for i, (step, line) in enumerate(zip(steps.tolist(), lines)):
            values = {}
            if self.update_freq.due(step - 1, step):
                values.update({f"insight/{k}": v for k, v in line["model"].items()})
            if self.variable_update_freq.due(step - 1, step):
                values.update(self._variable_scalars(layers[i]))
            if values:
                records.append((values, step))
        if records:
            self.guard.run("tensorboard/", self.tensorboard.scalars_at, records)

    def _variable_scalars(self, table):
        """{"insight/<variable>/<key>": value} of a [n_vars, n_keys] table."""
        return {f"insight/{name}/{key}": value
                for name, row in zip(self.names, table.tolist())
                for key, value in zip(self.keys, row)}

    def end_epoch(self, step):
        """The finished epoch: (steps [s], model rows [s, n_model_keys], per-variable
        means [n_vars, n_keys] (NaN where a key had no value)); its per-variable rows
        are flushed and its part file ended. `step`: the run's step (for TensorBoard)."""
        self.guard.run("layers/", self.store.close)
        self.guard.run("model/", self.model_store.close)
        steps = np.concatenate(self._steps) if self._steps else np.zeros(0, np.int64)
        model = np.concatenate(self._model) if self._model else np.zeros(
            (0, len(self.model_keys)))
        with np.errstate(invalid="ignore"):
            means = self._sum / self._count
        if self.tensorboard is not None:
            scalars = {}
            if self.update_freq.at_epoch_end and len(model):
                with np.errstate(invalid="ignore"):
                    scalars.update({f"insight/{k}": float(m) for k, m in
                                    zip(self.model_keys, np.nanmean(model, axis=0))})
            if self.variable_update_freq.at_epoch_end:
                scalars.update(self._variable_scalars(means))
            if scalars:
                self.guard.run("tensorboard/", self.tensorboard.scalars, scalars, step)
        self._new_epoch()
        return steps, model, means

    def close(self):
        self.guard.run("layers/", self.store.close)
        self.guard.run("model/", self.model_store.close)


def histogram_table(steps, epoch, names):
    """Histogram steps' rows (docs/logs.md, `histograms/`) as a pyarrow Table.

    steps: [(step, {"gradients"|"weights": (counts int [n_vars, bins], ranges
    [n_vars, 2])})], every step with the same kinds.
    Columns: step (int64), epoch (int32), kind, variable (dictionaries), lo, hi
    (float64), counts (fixed-size list of int64, bin k spans lo + k·(hi−lo)/bins up to
    the next edge, the last bin closed).
    """
    kinds = list(steps[0][1])
    n_vars = len(names)
    counts = np.concatenate([h[k][0] for _, h in steps for k in kinds]).astype(np.int64)
    ranges = np.concatenate([h[k][1] for _, h in steps for k in kinds]).astype(np.float64)
    per_step = len(kinds) * n_vars
    return pa.table({
        "step": pa.array(np.repeat([step for step, _ in steps], per_step), pa.int64()),
        "epoch": pa.array(np.full(per_step * len(steps), epoch), pa.int32()),
        "kind": dictionary(np.tile(np.repeat(np.arange(len(kinds)), n_vars), len(steps)),
                           kinds),
        "variable": dictionary(np.tile(np.arange(n_vars), len(kinds) * len(steps)), names),
        "lo": pa.array(ranges[:, 0]), "hi": pa.array(ranges[:, 1]),
        "counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.reshape(-1)),
                                                    counts.shape[1]),
    })
